"""Vision-language models and MMInference: `patch(model, "mminference", ...)`.

Reached through `sparseinfer.patch` (integration.py dispatches here) for

* vision-language models whose language model is Qwen2-like (Qwen2-VL, Qwen2.5-VL): any
  method; only the language model's attention is replaced (transformers' per-sub-config
  selection, ``set_attn_implementation({"text_config": "sparseinfer", "vision_config": ...})``);
  the vision tower keeps its implementation;
* method "mminference" on a text model (Llama/Qwen2-like): modality ids are then set by the
  caller, ``handle.context.set(modality [B, N], frame)``.

Modality ids reach the attention function without copying model code: a forward pre-hook on
the model reads ``mm_token_type_ids`` (0 text, 1 image, 2 video), or else the image/video pad
token runs of ``input_ids``, and the frame size ((H / merge) * (W / merge) tokens per frame)
from ``video_grid_thw``, and stores them on the `ModalityContext` every layer's pattern reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from . import config as config_io
from . import integration as integ
from .patterns.mm import MMInferenceLayer, ModalityContext, check_head

VLM_TYPES = ("qwen2_vl", "qwen2_5_vl")
MM_OPTIONS = ("config", "head", "last_q", "strides", "frame")

# one head entry used for every head when neither a config nor a head is given: Q-boundary,
# vertical-slash for text and images, grid for video (budgets: fractions of N / tokens)
DEFAULT_HEAD = {
    "boundary": "q",
    "intra": {
        "all": {"pattern": "vertical_slash", "vertical": 0.02, "slash": 0.02},
        "video": {"pattern": "grid", "sink": 64, "window": 0.02},
    },
}


@dataclass
class MMPatchHandle(integ.PatchHandle):
    """A PatchHandle with the modality context (mminference) and the hooks to remove on unpatch."""

    context: ModalityContext | None = None
    hooks: list = field(default_factory=list)


def handles(model, method: str) -> bool:
    """Whether `patch(model, method)` is served here."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return mt in VLM_TYPES or method == "mminference"


def load_vlm(name_or_path: str, *, dtype: torch.dtype = torch.float32, device=None):
    """A vision-language model (HF id or local folder) in eval mode with SDPA attention, through
    transformers' image-text-to-text auto class (Qwen2-VL, Qwen2.5-VL, ...)."""
    from transformers import AutoModelForImageTextToText

    path = Path(name_or_path) if Path(name_or_path).exists() else name_or_path
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return (model.to(device) if device is not None else model).eval()


def _text_config(model):
    cfg = model.config
    return cfg.text_config if cfg.model_type in VLM_TYPES else cfg


def modality_from_inputs(model_config, kwargs: dict) -> torch.Tensor | None:
    """[B, N] int64 modality ids from a forward's keyword arguments, or None."""
    tt = kwargs.get("mm_token_type_ids")
    if tt is not None:
        return tt.long()
    ids = kwargs.get("input_ids")
    if ids is None:
        return None
    out = torch.zeros_like(ids, dtype=torch.long)
    img, vid = getattr(model_config, "image_token_id", None), getattr(model_config, "video_token_id", None)
    if img is not None:
        out = torch.where(ids == img, 1, out)
    if vid is not None:
        out = torch.where(ids == vid, 2, out)
    return out


def frame_from_inputs(model_config, kwargs: dict) -> int | None:
    """Tokens per video frame after the spatial merge, from the first video's grid (t, h, w)."""
    thw = kwargs.get("video_grid_thw")
    if thw is None or len(thw) == 0:
        return None
    merge = getattr(getattr(model_config, "vision_config", None), "spatial_merge_size", 1) or 1
    _, h, w = (int(x) for x in thw[0])
    return (h // merge) * (w // merge)


def _mm_layers(options: dict, tc, context: ModalityContext) -> list:
    bad = sorted(set(options) - set(MM_OPTIONS))
    if bad:
        raise ValueError(f"patch: unknown option(s) {bad} for method 'mminference'; expected any of "
                         f"{list(MM_OPTIONS) + ['min_len', 'backend']}")
    cfg, head = options.get("config"), options.get("head")
    if cfg is not None and head is not None:
        raise ValueError("patch: mminference takes a per-head 'config' or one 'head' entry for every head, not both")
    last_q = options.get("last_q", 64)
    if isinstance(last_q, bool) or not isinstance(last_q, int) or last_q < 1:
        raise ValueError(f"patch: last_q expected a positive int, got {last_q!r}")
    strides = options.get("strides")
    strides = tuple(strides) if strides is not None else None
    if cfg is not None:
        source = str(cfg) if isinstance(cfg, (str, Path)) else "config"
        cfg = config_io.validate(cfg, "config") if isinstance(cfg, dict) else config_io.load(cfg)
        if cfg.get("kind") != "mminference":
            raise ValueError(f"patch: {source}: expected an MMInference config (\"kind\": \"mminference\"), "
                             f"got kind {cfg.get('kind')!r}")
        config_io.check_matches(cfg, tc, source)
        layers = cfg["layers"]
    else:
        head = check_head(DEFAULT_HEAD if head is None else head, "head")
        layers = [[head] * tc.num_attention_heads] * tc.num_hidden_layers
    return [MMInferenceLayer(list(h), context, last_q, strides) for h in layers]


def patch_model(model, method: str, *, min_len: int, backend: str, kv, kv_options, **options) -> MMPatchHandle:
    """`sparseinfer.patch` for VLMs and for "mminference" (see the module docstring)."""
    tc = _text_config(model)
    if tc.model_type not in integ.SUPPORTED_MODEL_TYPES + ("qwen2_vl_text", "qwen2_5_vl_text"):
        raise ValueError(f"patch: expected a language model of type {list(integ.SUPPORTED_MODEL_TYPES)} "
                         f"(or a VLM of type {list(VLM_TYPES)}), got {tc.model_type!r}")
    if kv is not None or kv_options:
        raise ValueError(f"patch: KV-cache policies are not supported with {method!r} / vision-language models yet")
    if isinstance(min_len, bool) or not isinstance(min_len, int) or min_len < 0:
        raise ValueError(f"patch: min_len expected a non-negative int, got {min_len!r}")
    integ.ops._validate.check_backend(backend)
    context = None
    if method == "mminference":
        context = ModalityContext()
        patterns = _mm_layers(options, tc, context)
    else:
        patterns = integ._make_patterns(method, options, SimpleNamespace(config=tc))
    shard = integ.parallel.head_shard(model, tc)  # None unless tensor-parallel
    if shard is not None:
        patterns = [None if p is None else p.shard(shard) for p in patterns]
    if hasattr(model, "_sparseinfer_patch"):
        integ.unpatch(model)
    mods = integ._attention_modules(model)
    stats = integ.PatchStats()
    warned: set = set()
    for m in mods:
        setattr(m, integ._ATTR, integ.LayerPlan(m.layer_idx, patterns[m.layer_idx], min_len, stats, backend, warned,
                                                shard=shard))
    hooks = []
    if model.config.model_type in VLM_TYPES:
        previous = {"text_config": tc._attn_implementation,
                    "vision_config": model.config.vision_config._attn_implementation}
        model.set_attn_implementation({"text_config": integ.IMPL, "vision_config": previous["vision_config"]})
        if context is not None:
            mcfg = model.config

            def stash(_module, args, kwargs):
                kw = dict(kwargs)
                if args:
                    kw.setdefault("input_ids", args[0])
                ids = kw.get("input_ids")
                # decoding steps (one new token) keep the pre-fill's ids; they run dense anyway
                if ids is not None and ids.shape[-1] == 1 and context.modality is not None:
                    return None
                context.set(modality_from_inputs(mcfg, kw), frame_from_inputs(mcfg, kw) or context.frame)
                return None

            hooks.append(model.register_forward_pre_hook(stash, with_kwargs=True))
    else:
        previous = model.config._attn_implementation
        model.set_attn_implementation(integ.IMPL)
    handle = MMPatchHandle(method, dict(options, min_len=min_len, backend=backend), stats, previous,
                           context=context, hooks=hooks)
    if context is not None and options.get("frame"):
        context.frame = int(options["frame"])
    model._sparseinfer_patch = handle
    return handle
