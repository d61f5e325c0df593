"""transformers integration: `patch(model, method, **options)` / `unpatch(model)`.

Goes through transformers' attention-function registry: one function, registered once as
"sparseinfer", reads the plan that `patch` attached to each attention module. No model
code is copied. The dense path is transformers' own SDPA function with the same mask
function, so `patch(model, "dense")` reproduces the unpatched SDPA model exactly.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import config as config_io
from . import guards, ops
from . import parallel
from .patterns import PATTERNS, Pattern
from .patterns.base import Selection, combined_density
from .patterns.minference import MInferenceLayer

IMPL = "sparseinfer"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
METHODS = ("dense",) + tuple(PATTERNS) + ("minference", "mminference", "adaptive")
_ATTR = "_sparseinfer"
# A KV-cache policy object set on attention modules by sparseinfer.kv. It must offer
#   decode_attention(layer_idx, query [B, Hq, 1, D], key, value [B, Hkv, Nk, D], scale)
#       -> [B, Hq, 1, D], or None to let the call run as usual (dense over what the cache returned);
#   observe_prefill(layer_idx, query [B, Hq, N, D], key [B, Hkv, N, D], scale) -> None.
KV_ATTR = "_sparseinfer_kv"


@dataclass
class CallRecord:
    """One attention call. density: [B, Hq] tensor (on the model's device), None when dense."""

    layer: int
    q_len: int
    method: str
    density: torch.Tensor | None
    reason: str = ""  # why a call ran dense: decode, chunk, short, break-even, mask, dropout, rollout,
    # dense_layers, density (the density guard; some heads only when `dense_heads` is set)
    dense_heads: torch.Tensor | None = None  # bool [Hq]: heads the density guard routed dense


@dataclass
class PatchStats:
    """What the patched model computed, call by call (reset with `.reset()`). Calls traced by
    torch.compile are not recorded: host-side bookkeeping inside a compiled graph would make
    every call fail the graph's guards and recompile."""

    records: list[CallRecord] = field(default_factory=list)
    shadow: list = field(default_factory=list)  # sparseinfer.shadow.ShadowRecord, with patch(shadow=...)

    def reset(self) -> None:
        self.records.clear()
        self.shadow.clear()

    def add(self, record: "CallRecord") -> None:
        if not torch.compiler.is_compiling():
            self.records.append(record)

    def density(self) -> float:
        """Kept share of causal (query, key) pairs over all recorded calls, weighted by each
        call's pair count; dense calls count as 1.0. NaN when nothing was recorded."""
        num = den = 0.0
        for r in self.records:
            pairs = r.q_len * (r.q_len + 1) / 2
            d = 1.0 if r.density is None else float(r.density.float().mean())
            num += d * pairs
            den += pairs
        return num / den if den else float("nan")

    def per_layer(self) -> dict[int, float]:
        out: dict[int, list[float]] = {}
        for r in self.records:
            out.setdefault(r.layer, []).append(1.0 if r.density is None else float(r.density.float().mean()))
        return {k: sum(v) / len(v) for k, v in sorted(out.items())}


@dataclass
class LayerPlan:
    """Attached to each attention module as `module._sparseinfer`."""

    layer: int
    pattern: Pattern | None  # None = dense
    min_len: int
    stats: PatchStats
    backend: str
    warned: set  # shared by all layers of one patch: each warning once per patch
    observer: Callable | None = None  # observer(layer, q, k, scale) on every full pre-fill call
    shard: parallel.HeadShard | None = None  # the heads this tensor-parallel rank holds
    max_density: float | None = None  # density guard (sparseinfer.guards); None = the kernel's break-even
    dense_reason: str = ""  # why pattern is None: "rollout" / "dense_layers" ("" = method "dense")
    recorder: object | None = None  # a sparseinfer.monitor.Recorder while `record(model)` is open
    shadow: object | None = None  # a sparseinfer.shadow.Shadow with patch(shadow=...)

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(msg, stacklevel=3)


@dataclass
class PatchHandle:
    """Returned by `patch`; also at `model._sparseinfer_patch`."""

    method: str
    options: dict
    stats: PatchStats
    previous_impl: str
    contextual: object = None  # a sparseinfer.contextual.ContextualHandle when mlp= / heads= were given
    shadow: object | None = None  # a sparseinfer.shadow.Shadow with patch(shadow=...)
    qkv_fused: int = 0  # attention layers whose q/k/v projections run as one product (patch(fuse_qkv=...))


def _dense(module, query, key, value, attention_mask, **kwargs):
    if (query.shape[2] == 1 and query.is_cuda and not kwargs.get("dropout")
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None):
        return gqa_decode_attention(query, key, value, attention_mask, kwargs.get("scaling")), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


# the patched model's dense decode steps on CUDA: "triton" = `ops.dense_decode_attention` (no K/V copy
# per query head, split over the cache, a merge launch) where the mask is a plain bool mask; "sdpa" =
# SDPA with the KV heads shared (`enable_gqa`). H100: 12.7 vs 20.8 us at 4K (benchmarks/decode_attention.py).
DECODE_KERNEL = "triton"


def gqa_decode_attention(query, key, value, attention_mask, scaling=None, backend: str = "auto") -> torch.Tensor:
    """One decode step with the KV heads shared: query [B, Hq, 1, D], key/value [B, Hkv, L, D],
    attention_mask None or [B|1, 1, 1, L] (bool or additive) -> [B, 1, Hq, D]. transformers' SDPA
    path copies K/V once per query head when a mask is given (StaticCache): H100, 32/8 heads,
    D 128, 4K cache: 17 us with `enable_gqa` instead of 111 us (32K: 61 vs 746). A bool mask (or
    none) runs the dense decode kernel instead on CUDA (`DECODE_KERNEL`; backend="triton" forces
    it, on a CPU under the interpreter); additive masks stay on SDPA."""
    b, _, _, d = query.shape
    m = attention_mask
    if m is not None and m.dim() == 4 and m.shape[-1] > key.shape[-2]:  # as transformers' SDPA path slices it
        m = attention_mask = m[..., : key.shape[-2]]
    plain = m is None or (m.dtype == torch.bool and m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == 1
                          and m.shape[0] in (1, b) and m.shape[3] == key.shape[2])
    if plain and (backend == "triton" or (backend == "auto" and DECODE_KERNEL == "triton" and query.is_cuda
                                          and ops.decode._triton_reason(query, "auto") is None)):
        valid = None if m is None else m[:, 0, 0, :].expand(b, -1)
        out = ops.dense_decode_attention(query, key, value, valid=valid, scale=d ** -0.5 if scaling is None else scaling,
                                         backend=backend)
        return out.transpose(1, 2).contiguous()
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous()


# which measured break-even length (sparseinfer.kernels.attention.BREAK_EVEN) applies to a pattern
_BREAK_EVEN_KEY = {"ashape": "ashape", "block_sparse": "block_sparse", "vertical_slash": "vertical_slash_estimated",
                   "minference": "vertical_slash_estimated", "adaptive": "adaptive", "xattention": "xattention",
                   "flexprefill": "flexprefill",
                   # not measured on its own; its kernel is the vertical-slash one (grid lines as columns)
                   "mminference": "vertical_slash_estimated"}


def _break_even(plan: LayerPlan, query: torch.Tensor) -> int:
    """Below this many tokens the GPU kernel is slower than dense SDPA (measured on an H100,
    estimation included): 0 off CUDA, or when a backend is forced."""
    if not query.is_cuda or plan.backend != "auto" or not ops._use_triton(query, "auto"):
        return 0
    from .kernels.attention import BREAK_EVEN

    return BREAK_EVEN.get(_BREAK_EVEN_KEY.get(plan.pattern.name, ""), 0)


def run_selections(parts: list[Selection], q, k, v, scale: float, backend: str = "auto",
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Compute a pattern's selections: one op call each; a selection serving some heads only
    supplies those heads' outputs. q [B, Hq, N, D], k/v [B, Hkv, N, D] -> [B, Hq, N, D].
    out: a single selection of a pre-filling op writes into this tensor like q (any strides with
    a contiguous last dim: the integration passes its [B, N, Hq, D] result buffer seen as
    [B, Hq, N, D], so the layout transformers wants costs no copy); heads the selection does not
    serve are left as they are."""
    if out is not None and len(parts) == 1 and parts[0].op in _HEAD_OPS:
        sel = parts[0]
        extra = {"heads": sel.heads} if sel.heads is not None else {}
        return getattr(ops, sel.op)(q, k, v, **sel.kwargs, scale=scale, backend=backend, out=out, **extra)
    out = None
    for sel in parts:
        # heads a selection does not serve (or the guards sent dense) carry empty indices; the
        # three pre-filling ops also skip them (`heads=`), so they cost the kernel nothing
        extra = {"heads": sel.heads} if sel.heads is not None and sel.op in _HEAD_OPS else {}
        if out is not None and extra:  # later selections write their heads into the first one's output
            out = getattr(ops, sel.op)(q, k, v, **sel.kwargs, scale=scale, backend=backend, out=out, **extra)
            continue
        o = getattr(ops, sel.op)(q, k, v, **sel.kwargs, scale=scale, backend=backend, **extra)
        out = o if out is None else torch.where(sel.heads[None, :, None, None], o, out)
    return out


_HEAD_OPS = ("vertical_slash_attention", "block_sparse_attention", "ashape_attention")
DIRECT_OUT = True  # pre-filling ops write transformers' [B, N, Hq, D] layout directly (see _attention)


def sparse_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function. query [B, Hq, Nq, D], key/value [B, Hkv, Nk, D]
    -> ([B, Nq, Hq, D], None), as transformers' attention functions return.

    Under torch.compile, calls of more than one query row (pre-filling) run eagerly, outside
    the graph (index estimation syncs with the host and launches its own kernels; the rest of
    the model still compiles around it); decode steps are traced like any attention."""
    if query.shape[2] > 1 and torch.compiler.is_compiling():
        return _attention_eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return _attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    plan: LayerPlan | None = getattr(module, _ATTR, None)
    kv = getattr(module, KV_ATTR, None)
    if kv is not None:  # a KV-cache policy attached by sparseinfer.kv: it may take decode steps
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        if query.shape[2] == 1:
            out = kv.decode_attention(module.layer_idx, query, key, value, scale)
            if out is not None:
                if plan is not None:
                    plan.stats.add(CallRecord(plan.layer, 1, "kv", None, "decode"))
                return out.transpose(1, 2).contiguous(), None
        elif query.shape[2] == key.shape[2]:
            kv.observe_prefill(module.layer_idx, query, key, scale)
    if plan is not None and plan.shadow is not None and plan.shadow.forcing:  # shadow's dense replay
        return _dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if plan is not None and plan.observer is not None and query.shape[2] == key.shape[2]:
        plan.observer(plan.layer, query, key, query.shape[-1] ** -0.5 if scaling is None else scaling)
    if plan is None or plan.pattern is None:
        if plan is not None:
            plan.stats.add(CallRecord(plan.layer, query.shape[2], "dense", None, plan.dense_reason))
            if plan.recorder is not None:
                plan.recorder.dense(plan.layer, query.shape[2], plan.dense_reason)
        return _dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    nq, nk = query.shape[2], key.shape[2]
    if plan.shard is not None and (query.shape[1], key.shape[1]) != (len(plan.shard.q), len(plan.shard.kv)):
        raise ValueError(
            f"sparseinfer: layer {plan.layer} on tensor-parallel rank {plan.shard.rank} expected "
            f"{len(plan.shard.q)} query / {len(plan.shard.kv)} KV heads, got {query.shape[1]} / {key.shape[1]}"
        )
    reason = None
    if nq != nk:
        reason = "chunk" if nq > 1 else "decode"
    elif nq < plan.min_len:
        reason = "short"
    elif nq < _break_even(plan, query):
        reason = "break-even"
    elif attention_mask is not None:
        reason = "mask"
        plan.warn_once(
            "mask",
            "sparseinfer: this call carries an attention mask beyond plain causality (padding or a "
            "sliding window); it is computed with dense attention.",
        )
    elif module.training and dropout > 0:
        reason = "dropout"
    if reason == "chunk":
        plan.warn_once("chunk", "sparseinfer: a pre-fill chunk after cached tokens is computed densely.")
    if reason is not None:
        plan.stats.add(CallRecord(plan.layer, nq, "dense", None, reason))
        if plan.recorder is not None:
            plan.recorder.dense(plan.layer, nq, reason)
        return _dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    rec = plan.recorder
    t0 = rec.start(query) if rec is not None else 0.0
    # density guard, first a cheap probe (patterns that have one): when the densities estimated
    # on a few query blocks predict no gain over dense once the estimation is paid
    # (`guards.probe_says_dense`), run dense without the estimation
    probe = getattr(plan.pattern, "probe", None)
    lim = 1.0 if probe is None else guards.density_limit(plan.pattern.probe_op(), plan.max_density, query,
                                                         plan.backend, getattr(plan.pattern, "block_size", None))
    if lim < 1.0:
        est_share = getattr(plan.pattern, "est_share", None)
        if guards.probe_says_dense(probe(query, key, scale), lim, plan.max_density is not None,
                                   est_share(nq) if est_share else 0.0):
            plan.stats.add(CallRecord(plan.layer, nq, "dense", None, "density"))
            if rec is not None:
                rec.dense(plan.layer, nq, "density")
            return _dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    parts = plan.pattern.select(query, key, scale)
    # density guard: heads whose estimated density is above the kernel's break-even run dense.
    # Their indices are emptied on the device and the sparse kernel is queued *before* the host
    # reads the decision (one sync, while the kernel runs): reading it first would leave the GPU
    # idle while the host launches the index construction (~3 ms per layer at 128K).
    over = guards.over_break_even(parts, query, plan.backend, plan.max_density)
    if over is not None:
        parts = guards.drop_heads(parts, over)
    t_est = rec.start(query) if rec is not None else None  # the estimation's end (monitoring syncs anyway)
    # the result in transformers' layout [B, N, Hq, D], written by the kernel through a transposed
    # view (DIRECT_OUT; was a [B, Hq, N, D] result and a copy: 1 GB at 128K for an 8B layer);
    # heads the selection leaves out are the guard's dense heads, written below
    buf = (torch.empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1], dtype=query.dtype,
                       device=query.device).transpose(1, 2) if DIRECT_OUT and value.shape[-1] == query.shape[-1]
           else None)
    out = run_selections(parts, query, key, value, scale, plan.backend, out=buf)
    if over is not None:
        flags = torch.stack([over.any(), over.all()]).tolist()
        if flags[1]:
            plan.stats.add(CallRecord(plan.layer, nq, "dense", None, "density"))
            if rec is not None:
                rec.dense(plan.layer, nq, "density")
            return _dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if not flags[0]:
            over = None
    density = combined_density(parts)
    if over is not None:
        density = torch.where(over, torch.ones_like(density), density)
    if rec is not None:
        rec.sparse(plan.layer, plan.pattern.name, query, key, scale, parts, density, t0, over, t_end=t_est)
    if over is not None:
        out = guards.dense_heads_attention(out, query, key, value, over, scale)
    plan.stats.add(CallRecord(plan.layer, nq, plan.pattern.name, density, "density" if over is not None else "", over))
    out = out.transpose(1, 2).contiguous()
    if plan.shadow is not None and plan.shadow.sample_call():
        ref, _ = _dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        plan.shadow.attention(plan.layer, out, ref)
    return out, None


_attention_eager = torch.compiler.disable(_attention)
AttentionInterface.register(IMPL, sparse_attention_forward)
AttentionMaskInterface.register(IMPL, sdpa_mask)


def _attention_modules(model) -> list[torch.nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
    if not mods:
        raise ValueError(f"patch: found no attention modules with a layer_idx in {type(model).__name__}")
    return mods


def _make_patterns(method: str, options: dict, model) -> list[Pattern | None]:
    """One pattern per decoder layer (None = dense)."""
    n_layers = model.config.num_hidden_layers
    if method not in METHODS:
        raise ValueError(f"patch: unknown method {method!r}; expected one of {list(METHODS)}")
    if method == "dense":
        if options:
            raise ValueError(f"patch: method 'dense' takes no options besides min_len/backend, got {sorted(options)}")
        return [None] * n_layers
    if method == "minference":
        bad = sorted(set(options) - {"config", "last_q"})
        if bad:
            raise ValueError(f"patch: unknown option(s) {bad} for method 'minference'; expected any of "
                             f"['config', 'last_q', 'min_len', 'backend']")
        cfg = options.get("config")
        source = str(cfg) if cfg is not None else "shipped config"
        if cfg is None:
            cfg = config_io.shipped_for(model.config)
        cfg = config_io.validate(cfg, "config") if isinstance(cfg, dict) else config_io.load(cfg)
        config_io.check_matches(cfg, model.config, source)
        return [MInferenceLayer(heads, options.get("last_q", 64)) for heads in cfg["layers"]]
    if method == "adaptive":  # learned gates (sparseinfer.gate)
        from .patterns.adaptive import make_layers

        return make_layers(model, options)
    cls = PATTERNS[method]
    valid = cls.option_names()
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(
            f"patch: unknown option(s) {bad} for method {method!r}; expected any of {valid + ['min_len', 'backend']}"
        )
    return [cls(**options)] * n_layers


def patch(model, method: str = "vertical_slash", *, min_len: int = 512, backend: str = "auto", kv: str | None = None,
          kv_options: dict | None = None, max_density: float | None = None, layers=None, dense_layers=None,
          shadow: float = 0.0, shadow_seed: int = 0, mlp: str | None = None, mlp_sparsity=0.5, heads: str | None = None,
          head_sparsity=0.5, predictors=None, contextual_options: dict | None = None, fuse_qkv: bool | None = None,
          **options):
    """Make `model`'s pre-filling attention sparse with `method`; returns a `PatchHandle`.

    method: one of "dense", "ashape" (sink, window), "vertical_slash" (vertical, slash, last_q),
    "block_sparse" (topk, block_size), "minference" (config: a per-head config path or dict,
    see `sparseinfer.config`; None = the config shipped for this model; last_q), "mminference"
    (config, head, last_q, strides, frame; vision-language models, see `sparseinfer.vlm`), "adaptive"
    (threshold or density, gates: a gate file, None = the gates shipped for this model; see
    `sparseinfer.patterns.adaptive`). Budgets are token counts (int) or fractions of N (float).
    min_len: calls with fewer query tokens than this, decoding steps, pre-fill chunks after
    cached tokens and masked (padded) batches run dense SDPA. On CUDA with backend="auto",
    calls shorter than the kernel's measured break-even length against dense SDPA
    (`sparseinfer.kernels.attention.BREAK_EVEN`) run dense too; each call's route is in
    `handle.stats.records`. backend: as in `sparseinfer.ops`.
    kv: a KV-cache policy for decoding (see `sparseinfer.kv`: "dense", "streaming", "h2o",
    "snapkv", "quest", "raas") with its options in kv_options (e.g. {"budget": 1024}); every
    `generate` that starts with the default empty cache then gets a fresh policy cache.
    mlp / heads: contextual sparsity in decoding steps (`sparseinfer.contextual.attach`):
    mlp="teal" | "dejavu" with mlp_sparsity (float, per-layer list, or a calibrated per-layer
    `contextual.allocation.Allocation` / its JSON path from `sparseinfer allocate-mlp`), heads="dejavu" with
    head_sparsity, predictors = a Deja Vu predictor file (None = the shipped one; "int4" = 4-bit
    copies of the model's own gate / up weights, made at patch time, no file); more
    options (thresholds, attn_sparsity, apply_to, max_len, backend) in contextual_options.
    fuse_qkv: each layer's q/k/v projections as one matrix product over one stacked weight buffer
    (`sparseinfer.qkv`; the parameters become views of it, no extra memory; a decode step's three
    GEMVs become one: H100, Llama-3.1-8B shapes, 20.5 vs 30.6 us per layer). None: on when the model is
    on a GPU. Projections that contextual sparsity replaces (TEAL on q/k/v) keep their own path.
    Patching an already patched model replaces the previous patch.

    Guards and rollout (every method): max_density: per call and head, when the estimated kept
    density is above it, that head runs dense SDPA (None: the kernel's measured break-even,
    `sparseinfer.guards.BREAK_EVEN_DENSITY`, when the Triton kernel serves the call, plus for
    vertical-slash heads the area the kernel would visit, `guards.BREAK_EVEN_WORK`; off on
    the CPU, where the reference costs the same at any density). layers: only these layers
    sparse (staged rollout); dense_layers: these layers dense. shadow: share of sparse calls
    (and of pre-fill forwards) also run dense to record the divergence in `handle.stats.shadow`
    (`sparseinfer.shadow`), deterministic given shadow_seed; outputs are the sparse ones.
    Monitoring: `with sparseinfer.record(model, audit=0.1) as rec:` (`sparseinfer.monitor`).
    A model sharded by transformers' tensor parallelism (tp_plan="auto" under torchrun) is
    patched the same way in every rank: each rank's per-head state is sliced to its heads
    (`sparseinfer.parallel`).
    """
    from . import vlm

    if vlm.handles(model, method):  # vision-language models and MMInference (sparseinfer/vlm.py)
        extra = {k: v for k, v in dict(max_density=max_density, layers=layers, dense_layers=dense_layers,
                                       shadow=shadow or None, mlp=mlp, heads=heads, predictors=predictors,
                                       contextual_options=contextual_options, fuse_qkv=fuse_qkv).items()
                 if v is not None}
        if extra:
            raise ValueError(f"patch: option(s) {sorted(extra)} are not supported with {method!r} / vision-language "
                             f"models yet; expected only the method's options, min_len and backend")
        return vlm.patch_model(model, method, min_len=min_len, backend=backend, kv=kv, kv_options=kv_options,
                               **options)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"patch: expected a model of type {list(SUPPORTED_MODEL_TYPES)}, got {model_type!r}")
    if isinstance(min_len, bool) or not isinstance(min_len, int) or min_len < 0:
        raise ValueError(f"patch: min_len expected a non-negative int, got {min_len!r}")
    ops._validate.check_backend(backend)
    guards.check_max_density(max_density)
    if fuse_qkv is not None and not isinstance(fuse_qkv, bool):
        raise ValueError(f"patch: fuse_qkv expected None, True or False, got {fuse_qkv!r}")
    from . import shadow as shadow_mod

    shadow_mod.check_shadow(shadow, shadow_seed)
    dense_reasons = guards.rollout_reasons(model.config.num_hidden_layers, layers, dense_layers)
    patterns = _make_patterns(method, options, model)
    patterns = [None if r else p for p, r in zip(patterns, dense_reasons)]
    shard = parallel.head_shard(model)  # None unless tensor-parallel
    if shard is not None:
        patterns = [None if p is None else p.shard(shard) for p in patterns]
        if mlp is not None or heads is not None:
            raise ValueError(
                f"patch: mlp={mlp!r} / heads={heads!r} (contextual sparsity) cannot run under tensor parallelism "
                f"(its thresholds and predictors are for whole, unsharded projections); expected mlp=None, heads=None"
            )
    if kv is not None:
        from . import kv as kv_policies

        kv_policies.SparseKVCache(kv, model.config.num_hidden_layers, **dict(kv_options or {}))  # validate first
    elif kv_options:
        raise ValueError(f"patch: kv_options given without a kv policy (kv=None), got {sorted(kv_options)}")
    if hasattr(model, "_sparseinfer_patch"):
        unpatch(model)
    mods = _attention_modules(model)
    stats = PatchStats()
    previous = model.config._attn_implementation
    warned: set = set()
    shadow_obj = shadow_mod.Shadow(shadow, shadow_seed, stats.shadow, min_len) if shadow > 0 else None
    for m in mods:
        setattr(m, _ATTR, LayerPlan(m.layer_idx, patterns[m.layer_idx], min_len, stats, backend, warned,
                                    max_density=max_density, dense_reason=dense_reasons[m.layer_idx] if
                                    method != "dense" else "", shadow=shadow_obj, shard=shard))
    model.set_attn_implementation(IMPL)
    generic = {k: v for k, v in dict(max_density=max_density, layers=layers, dense_layers=dense_layers).items()
               if v is not None}
    if shadow > 0:
        generic.update(shadow=shadow, shadow_seed=shadow_seed)
    handle = PatchHandle(method, dict(options, min_len=min_len, backend=backend, **generic), stats, previous)
    handle.shadow = shadow_obj
    model._sparseinfer_patch = handle
    if shadow_obj is not None:
        shadow_obj.attach(model)
    if kv is not None:
        kv_policies.attach(model, kv, kv_options)
    if mlp is not None or heads is not None or contextual_options:
        from . import contextual

        try:
            handle.contextual = contextual.attach(model, mlp=mlp, mlp_sparsity=mlp_sparsity, heads=heads,
                                                  head_sparsity=head_sparsity, predictors=predictors,
                                                  **dict(contextual_options or {}))
        except Exception:
            unpatch(model)
            raise
    if fuse_qkv is None:
        fuse_qkv = any(p.is_cuda for p in model.parameters())
    if fuse_qkv and shard is None:
        from . import qkv

        handle.qkv_fused = qkv.fuse(model)
    return handle


def unpatch(model) -> None:
    """Restore the attention implementation the model had before `patch`."""
    handle = getattr(model, "_sparseinfer_patch", None)
    if handle is None:
        raise ValueError("unpatch: this model is not patched by sparseinfer")
    from . import kv as kv_policies

    kv_policies.detach(model)  # KV-cache policies (hook, spec, caches on the modules)
    from . import qkv

    qkv.unfuse(model)  # before contextual.detach: fusion was applied after it
    for hook in getattr(handle, "hooks", ()):  # e.g. the modality pre-hook of sparseinfer.vlm
        hook.remove()
    if hasattr(model, "_sparseinfer_contextual"):
        from . import contextual

        contextual.detach(model)
    if getattr(handle, "shadow", None) is not None:
        handle.shadow.detach()
    for m in _attention_modules(model):
        if hasattr(m, _ATTR):
            delattr(m, _ATTR)
    model.set_attn_implementation(handle.previous_impl)
    del model._sparseinfer_patch
