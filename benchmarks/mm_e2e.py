"""Time to first token of a Qwen2.5-VL-7B-shaped language model on a synthetic video input:
dense SDPA (cuDNN and flash backends) vs `sparseinfer.patch(model, "vertical_slash")` vs
`sparseinfer.patch(model, "mminference")`.

Model: transformers' `Qwen2_5_VLForConditionalGeneration` built from a config with random bf16
weights directly on the GPU (nothing downloaded; weights do not change the speed). Language model
as Qwen2.5-VL-7B: hidden 3584, intermediate 18944, 28 layers, 28 attention heads / 4 KV heads,
head_dim 128, vocab 152064, rope_theta 1e6, M-RoPE sections [16, 24, 24]. The vision tower is
shrunk to one block (it never runs: the input is token ids, so there are no pixels to encode;
this saves ~1.3 GB). Batch 1, `use_cache=False`, `logits_to_keep=1` (full logits at 512K would
be ~150 GB).

Input (sparseinfer.synthetic_video.layout): a 64-token text prefix, video frames of --frame
tokens (default 1024 = a 32 x 32 merged grid, 896 x 896 pixels) with a 64-token text segment
after every 4 frames, a 64-token text suffix. Token ids are random text ids (no image/video pad
tokens, so the model embeds them as text and no vision encoder runs); each contiguous run of
frames is one video clip with 3-D M-RoPE `position_ids` [3, 1, N] as the processor would give
them (t = 2 x frame index, h / w = row / column in the merged grid, offset by the position
where the clip starts; text continues at the clip's largest position + 1), `video_grid_thw`
(one row per clip, pre-merge h / w) and `mm_token_type_ids` (0 text, 2 video). sparseinfer's
forward pre-hook (sparseinfer/vlm.py) reads the modality ids from `mm_token_type_ids` and the
frame size from `video_grid_thw`; the model itself ignores `video_grid_thw` because
`position_ids` are given.

Variants (--variants):
  dense-cudnn     the model's SDPA attention under sdpa_kernel(CUDNN_ATTENTION); if cuDNN refuses
                  GQA, K/V are repeated to 28 heads first (as benchmarks/mminference.py's
                  `dense_fns` does; the row says so)
  dense-flash     the same under sdpa_kernel(FLASH_ATTENTION)
  vertical_slash  patch(model, "vertical_slash", vertical=1000, slash=1024): the MInference text
                  pattern, estimated from the last 64 queries. With random weights the attention
                  is unstructured, so the estimated slashes scatter over the whole matrix (the
                  kernel's worst case): this row is "random-weight estimate", not a real model's
                  cost.
  mm-q-grid       patch(model, "mminference", head=<Q-boundary: text vertical-slash 1000 / 1024,
                  video grid sink 128 window 1024>, strides=(frame,)): the head entry of the
                  "mm-q-grid" variant in benchmarks/mminference.py. strides=(frame,) is passed
                  because the frame size is known from the video grid, and with random weights the
                  grid search would otherwise pick an arbitrary stride, making the cost
                  meaningless. Every head of every layer uses this entry.
The ratio of each row is against the faster dense backend at the same N on the same device.
The sparse rows report handle.stats.density(): the kept share of causal (query, key) pairs over
all 28 layers' calls (1.0 for a call that ran dense).

Memory: the MLP intermediates at 512K (512K x 18944 bf16 = 20 GB each, three alive) do not fit
an 80 GB H100, so each decoder layer's `mlp` forward is wrapped to run over the sequence in
chunks of --mlp-chunk tokens (default 32768): a wrapper around the module's own forward, applied
to every variant alike, so it costs the same in every row (the MLP's FLOPs do not change).

Timing: for each (N, variant) one warm-up forward at the same N with the decoder cut to its first
layer (compiles the Triton kernels, builds cuDNN's graph for this shape, fills the allocator's
cache; ~1/28 of a run), then ONE timed full forward (torch.cuda.synchronize + time.perf_counter).
Results are rewritten after every row (--out: mm_e2e.json, mm_e2e.md; mm_e2e.log appended), and
rows from earlier calls in the same --out are kept (a row with the same N and variant is
replaced), so the GPU run can be split across calls with --sizes / --variants.

    python benchmarks/mm_e2e.py --sizes 131072,262144 --out benchmarks/results/mm_e2e
    python benchmarks/mm_e2e.py --sizes 524288 --variants dense-cudnn,mm-q-grid --out benchmarks/results/mm_e2e
    python benchmarks/mm_e2e.py --sizes 524288 --variants vertical_slash,dense-flash --out benchmarks/results/mm_e2e
    python benchmarks/mm_e2e.py --smoke --out /tmp/mm-e2e-smoke   # CPU, tiny, float32, < 1 min

--smoke: a tiny config (2 layers, hidden 128, 4 heads / 2 KV heads, head_dim 32), N=1024, frame
64, float32 on the CPU, sparse variants on backend "reference", budgets scaled by 1/8 (as
benchmarks/mminference.py's smoke does), MLP chunks of 256 tokens. It first checks that the
chunked MLP leaves the logits unchanged, that the K/V-repeat dense fallback equals SDPA, and that
"mminference" (mm-q-grid's GPU budgets, which cover all of N=1024) and "vertical_slash" with a
full budget give the dense logits. --arch qwen2 builds a Qwen2ForCausalLM with the same language
model dims instead (1-D positions; modality ids set with handle.context.set; same attention
cost), in case the VLM class misbehaves.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import sparseinfer  # noqa: E402
from sparseinfer.synthetic_video import layout  # noqa: E402

# Qwen2.5-VL-7B-Instruct's language model
QWEN25_VL_7B_TEXT = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1e6,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, use_sliding_window=False, sliding_window=32768,
    max_window_layers=28, bos_token_id=151643, eos_token_id=151645,
)
# the vision tower never runs (no pixels): one block of the real widths
VISION_STUB = dict(depth=1, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                   spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, fullatt_block_indexes=[0])
SMOKE_TEXT = dict(QWEN25_VL_7B_TEXT, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_window_layers=2,
                  rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})  # head_dim 32
SMOKE_VISION = dict(VISION_STUB, hidden_size=64, intermediate_size=64, num_heads=2, out_hidden_size=128)
TEXT_IDS = 151643  # ids below this are ordinary text tokens (specials, incl. the vision pads, start here)
T_STEP = 2  # M-RoPE temporal step per frame: tokens_per_second 2 x 1 s per temporal patch (2 frames at 2 fps)

VARIANTS = ("dense-cudnn", "dense-flash", "vertical_slash", "mm-q-grid")
REPEAT_IMPL = "sdpa_repeat_kv"


def budgets(smoke: bool) -> dict:
    """Token budgets; the smoke run scales them by 1/8 (benchmarks/mminference.py's `variants`)."""
    s = 0.125 if smoke else 1
    return dict(vertical=int(1000 * s), slash=int(1024 * s), sink=int(128 * s), window=int(1024 * s))


def mm_head(b: dict) -> dict:
    """The "mm-q-grid" head entry of benchmarks/mminference.py: Q-boundary, text / image
    vertical-slash, video grid (sink + local window + lines at the frame period)."""
    return {"boundary": "q", "intra": {
        "all": {"pattern": "vertical_slash", "vertical": b["vertical"], "slash": b["slash"]},
        "video": {"pattern": "grid", "sink": b["sink"], "window": b["window"]}}}


# ---------------------------------------------------------------- model


def build_model(arch: str, smoke: bool, dev, dtype):
    text = SMOKE_TEXT if smoke else QWEN25_VL_7B_TEXT
    if arch == "vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        cfg = Qwen2_5_VLConfig(text_config=dict(text), vision_config=dict(SMOKE_VISION if smoke else VISION_STUB))
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(**{k: v for k, v in text.items() if k != "rope_scaling"})
        cls = Qwen2ForCausalLM
    with torch.device(dev):
        model = cls._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def text_decoder(model):
    """The module holding the language model's decoder layers (`.layers`)."""
    for m in model.modules():
        layers = getattr(m, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return m
    raise ValueError(f"no decoder layers with self_attn found in {type(model).__name__}")


def chunk_mlps(model, chunk: int) -> int:
    """Wrap every decoder layer's `mlp` forward (its own forward, unchanged) to run over the
    sequence in chunks of `chunk` tokens, writing into one output buffer. -> number wrapped."""
    layers = text_decoder(model).layers
    for layer in layers:
        inner = layer.mlp.forward

        def forward(x, _inner=inner):
            n = x.shape[-2]
            if n <= chunk:
                return _inner(x)
            out = None
            for i in range(0, n, chunk):
                y = _inner(x[..., i:i + chunk, :])
                if out is None:
                    out = y.new_empty(x.shape[:-1] + y.shape[-1:])
                out[..., i:i + chunk, :] = y
            return out

        layer.mlp.forward = forward
    return len(layers)


@contextlib.contextmanager
def first_layer_only(model):
    """Run the model with its decoder cut to the first layer (the warm-up at the timed N)."""
    dec = text_decoder(model)
    full = dec.layers
    dec.layers = torch.nn.ModuleList([full[0]])
    try:
        yield
    finally:
        dec.layers = full


def sdpa_repeat_kv(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense fallback for a cuDNN without GQA: K/V repeated to the query heads, then plain SDPA
    (as benchmarks/mminference.py's `dense_fns`). query [B, Hq, N, D], key/value [B, Hkv, N, D]."""
    g = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         is_causal=attention_mask is None and query.shape[2] > 1)
    return out.transpose(1, 2).contiguous(), None


def set_dense_impl(model, impl: str) -> None:
    """"sdpa" or REPEAT_IMPL for the language model (the vision tower keeps SDPA)."""
    if model.config.model_type == "qwen2_5_vl":
        model.set_attn_implementation({"text_config": impl, "vision_config": "sdpa"})
    else:
        model.set_attn_implementation(impl)


def register_repeat_impl() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(REPEAT_IMPL, sdpa_repeat_kv)
    AttentionMaskInterface.register(REPEAT_IMPL, sdpa_mask)


# ---------------------------------------------------------------- inputs


def frame_grid(frame: int) -> tuple[int, int]:
    """(rows, columns) of a frame of `frame` merged tokens, as square as possible."""
    h = int(frame ** 0.5)
    while frame % h:
        h -= 1
    return h, frame // h


def make_inputs(arch: str, n: int, frame: int, text_every: int, text_len: int, dev, seed: int = 0) -> dict:
    """Forward kwargs for N tokens: input_ids, position_ids (3-D M-RoPE for "vl"),
    mm_token_type_ids / video_grid_thw ("vl"); plus "modality" [1, N] for handle.context.set."""
    mod = layout(n, frame, text_every, text_len)
    gh, gw = frame_grid(frame)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TEXT_IDS, (1, n), generator=g)
    pos = torch.empty(3, n, dtype=torch.int64)
    is_vid = (mod == 2).tolist()
    clips = []  # frames per clip
    i, nxt = 0, 0  # token index, next text position
    while i < n:
        j = i
        while j < n and is_vid[j] == is_vid[i]:
            j += 1
        k = torch.arange(j - i)
        if is_vid[i]:
            f, r, c = k // frame, (k % frame) // gw, k % gw
            pos[0, i:j], pos[1, i:j], pos[2, i:j] = nxt + f * T_STEP, nxt + r, nxt + c
            nxt = int(pos[:, i:j].max()) + 1
            clips.append(-(-(j - i) // frame))
        else:
            pos[:, i:j] = nxt + k
            nxt += j - i
        i = j
    out = {"input_ids": ids.to(dev), "modality": mod[None].to(dev)}
    if arch == "vl":
        out["position_ids"] = pos[:, None, :].to(dev)
        out["mm_token_type_ids"] = mod[None].to(dev)
        out["video_grid_thw"] = torch.tensor([[t, 2 * gh, 2 * gw] for t in clips], dtype=torch.int64, device=dev)
    return out


def forward(model, inputs: dict):
    kw = {k: v for k, v in inputs.items() if k != "modality"}
    return model(**kw, use_cache=False, logits_to_keep=1).logits


# ---------------------------------------------------------------- variants


class Variant:
    """Sets a variant up on the model (`enter`), runs it (`context`), takes it down (`exit`)."""

    def __init__(self, name, args):
        self.name, self.args, self.handle, self.note = name, args, None, ""
        self.repeat = False

    def context(self):
        if self.args.smoke or not self.name.startswith("dense"):
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.CUDNN_ATTENTION if self.name == "dense-cudnn" else SDPBackend.FLASH_ATTENTION)

    def enter(self, model, inputs):
        b = budgets(self.args.smoke)
        backend = "reference" if self.args.smoke else "auto"
        if self.name == "vertical_slash":
            self.handle = sparseinfer.patch(model, "vertical_slash", vertical=b["vertical"], slash=b["slash"],
                                            backend=backend)
        elif self.name == "mm-q-grid":
            self.handle = sparseinfer.patch(model, "mminference", head=mm_head(b), strides=(self.args.frame,),
                                            backend=backend)
            if model.config.model_type != "qwen2_5_vl":  # a text model: no pre-hook, set the ids here
                self.handle.context.set(inputs["modality"], self.args.frame)
        elif self.repeat:
            set_dense_impl(model, REPEAT_IMPL)

    def exit(self, model):
        if self.handle is not None:
            sparseinfer.unpatch(model)
            self.handle = None
        elif self.repeat:
            set_dense_impl(model, "sdpa")

    def warm(self, model, inputs):
        with first_layer_only(model), self.context():
            forward(model, inputs)

    def warm_with_fallback(self, model, inputs):
        """The warm-up; dense-cudnn / dense-flash retry with K/V repeated if the backend refuses GQA."""
        try:
            self.warm(model, inputs)
        except RuntimeError as e:
            if not self.name.startswith("dense") or self.repeat or self.args.smoke:
                raise
            self.repeat = True
            self.note = f"K/V repeated to the query heads ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            set_dense_impl(model, REPEAT_IMPL)
            self.warm(model, inputs)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run_one(model, inputs, n, var: Variant, dev, log) -> dict:
    row = {"N": n, "variant": var.name}
    t0 = time.perf_counter()
    var.enter(model, inputs)
    try:
        var.warm_with_fallback(model, inputs)
        sync(dev)
        row["warmup_s"] = round(time.perf_counter() - t0, 2)
        log(f"  N={n} {var.name}: warm-up (first layer only, N={n}) {row['warmup_s']:.1f} s")
        if var.handle is not None:
            var.handle.stats.reset()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(dev)
        t = time.perf_counter()
        with var.context():
            logits = forward(model, inputs)
        sync(dev)
        row["seconds"] = round(time.perf_counter() - t, 3)
        row["finite"] = bool(torch.isfinite(logits).all())
        del logits
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if dev.type == "cuda" else None
        if var.handle is not None:
            recs = var.handle.stats.records
            row["density"] = var.handle.stats.density()
            row["route"] = sorted({r.reason or r.method for r in recs})
            row["calls"] = len(recs)
        else:
            row["density"], row["route"] = 1.0, [REPEAT_IMPL if var.repeat else "dense"]
        if var.note:
            row["note"] = var.note
        log(f"  N={n} {var.name}: {row['seconds']:.3f} s, density {100 * row['density']:.2f}%, route {row['route']}, "
            f"peak {row['peak_gb']} GiB{', ' + var.note if var.note else ''}")
    finally:
        var.exit(model)
    return row


# ---------------------------------------------------------------- checks (smoke)


def checks(model, args, dev, log) -> dict:
    """CPU, tiny: chunked MLP, K/V-repeat fallback and full-budget sparse patches vs dense logits."""
    out = {}
    n = args.sizes[0]
    inputs = make_inputs(args.arch, n, args.frame, args.text_every, args.text_len, dev, seed=1)
    with torch.inference_mode():
        ref = forward(model, inputs)
        chunk_mlps(model, args.mlp_chunk)
        got = forward(model, inputs)
        out["chunked_mlp_max_abs_diff"] = float((got - ref).abs().max())
        set_dense_impl(model, REPEAT_IMPL)
        got = forward(model, inputs)
        set_dense_impl(model, "sdpa")
        out["repeat_kv_max_abs_diff"] = float((got - ref).abs().max())
        full = budgets(False)  # mm-q-grid's GPU budgets: at N=1024 they keep every pair
        h = sparseinfer.patch(model, "mminference", head=mm_head(full), strides=(args.frame,), backend="reference")
        if args.arch != "vl":
            h.context.set(inputs["modality"], args.frame)
        got = forward(model, inputs)
        out["mminference_full_max_abs_diff"] = float((got - ref).abs().max())
        out["mminference_full_density"] = h.stats.density()
        out["mminference_frame_seen"] = h.context.frame
        out["mminference_video_share_seen"] = float((h.context.modality == 2).float().mean())
        sparseinfer.unpatch(model)
        h = sparseinfer.patch(model, "vertical_slash", vertical=n, slash=n, backend="reference")
        got = forward(model, inputs)
        out["vertical_slash_full_max_abs_diff"] = float((got - ref).abs().max())
        out["vertical_slash_full_density"] = h.stats.density()
        sparseinfer.unpatch(model)
    out["logit_scale"] = float(ref.abs().max())
    try:  # the head entry should be the one benchmarks/mminference.py times as "mm-q-grid"
        sys.path.insert(0, HERE)
        from mminference import variants as mm_variants

        out["head_matches_mminference_py"] = mm_variants(False)["mm-q-grid"][1] == mm_head(budgets(False))
    except Exception as e:  # noqa: BLE001  (that file is edited separately; informative only)
        out["head_matches_mminference_py"] = f"not checked: {type(e).__name__}: {e}"
    ok = all(out[k] <= 1e-4 * max(1.0, out["logit_scale"]) for k in out if k.endswith("max_abs_diff"))
    out["ok"] = bool(ok and out["mminference_full_density"] == 1.0 and out["mminference_frame_seen"] == args.frame)
    log(f"checks at N={n}: {json.dumps(out)}")
    return out


# ---------------------------------------------------------------- results


def load(path: str, fresh: bool) -> dict:
    if not fresh and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"runs": [], "rows": []}


def with_ratios(rows: list[dict]) -> list[dict]:
    """ratio = the faster dense row's seconds at the same N and device / this row's seconds."""
    best = {}
    for r in rows:
        if r["variant"].startswith("dense") and r.get("seconds"):
            key = (r["N"], r["device"])
            best[key] = min(best.get(key, float("inf")), r["seconds"])
    for r in rows:
        b = best.get((r["N"], r["device"]))
        r["ratio"] = round(b / r["seconds"], 3) if b and r.get("seconds") else None
    return rows


def markdown(data: dict) -> str:
    rows = sorted(data["rows"], key=lambda r: (r["device"], r["N"], VARIANTS.index(r["variant"])
                                               if r["variant"] in VARIANTS else 99))
    lines = ["# Time to first token, Qwen2.5-VL-7B-shaped language model (random weights), synthetic video input", "",
             "Batch 1, use_cache=False, logits_to_keep=1; MLP run in sequence chunks in every row; one warm-up "
             "(first decoder layer only, same N) then one timed forward. ratio = the faster dense backend's seconds "
             "at this N / this row's (> 1: faster). density: kept share of causal pairs over all layers "
             "(handle.stats.density()). vertical_slash: random weights scatter its estimate (worst case). "
             "mm-q-grid: strides=(frame,).", "", "Runs:"]
    for i, m in enumerate(data["runs"]):
        lines.append(f"- {i}: {m['device']}, torch {m['torch']}, triton {m['triton']}, transformers "
                     f"{m['transformers']}, python {m['python']}, {m['date']}; sizes {m['sizes']}, variants "
                     f"{m['variants']}, frame {m['frame']}, arch {m['arch']}")
    lines += ["", "| N | variant | seconds | ratio vs dense | density | peak GiB | route | run | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sec = f"{r['seconds']:.3f}" if r.get("seconds") is not None else "-"
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "-"
        dens = f"{100 * r['density']:.2f}%" if r.get("density") is not None else "-"
        note = r.get("error") or r.get("note") or ""
        lines.append(f"| {r['N'] // 1024}K | {r['variant']} | {sec} | {ratio} | {dens} | {r.get('peak_gb', '-')} | "
                     f"{', '.join(r.get('route', []))} | {r['run']} | {note} |")
    if data.get("checks"):
        lines += ["", f"Checks (smoke): `{json.dumps(data['checks'])}`"]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 131072,262144,524288; smoke 1024)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--frame", type=int, default=None, help="video tokens per frame (default 1024, as the issue asks; smoke 64)")
    ap.add_argument("--text-every", type=int, default=4, help="a text segment after every this many frames")
    ap.add_argument("--text-len", type=int, default=64, help="tokens per text segment")
    ap.add_argument("--mlp-chunk", type=int, default=None, help="tokens per MLP chunk (default 32768; smoke 256)")
    ap.add_argument("--arch", choices=("vl", "qwen2"), default="vl",
                    help="vl: Qwen2_5_VLForConditionalGeneration (default); qwen2: Qwen2ForCausalLM, same dims")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny config, float32, backend 'reference'")
    ap.add_argument("--fresh", action="store_true", help="drop rows from earlier calls in --out")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "mm_e2e"))
    args = ap.parse_args()
    args.sizes = [int(s) for s in (args.sizes or ("1024" if args.smoke else "131072,262144,524288")).split(",")]
    args.frame = args.frame or (64 if args.smoke else 1024)
    args.mlp_chunk = args.mlp_chunk or (256 if args.smoke else 32768)
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; expected any of {list(VARIANTS)}")
    os.makedirs(args.out, exist_ok=True)
    jpath, mpath, lpath = (os.path.join(args.out, f"mm_e2e.{e}") for e in ("json", "md", "log"))
    logf = open(lpath, "a")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    dev = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    import transformers

    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    meta = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton_v, "transformers": transformers.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "argv": sys.argv[1:], "sizes": args.sizes, "variants": names, "frame": args.frame,
            "text_every": args.text_every, "text_len": args.text_len, "mlp_chunk": args.mlp_chunk, "arch": args.arch,
            "budgets": budgets(args.smoke), "mm_head": mm_head(budgets(args.smoke)), "dtype": str(dtype)}
    data = load(jpath, args.fresh)
    data["runs"].append(meta)
    run_id = len(data["runs"]) - 1

    def save():
        with_ratios(data["rows"])
        with open(jpath, "w") as f:
            json.dump(data, f, indent=1)
        with open(mpath, "w") as f:
            f.write(markdown(data))

    log(f"=== mm_e2e run {run_id}: {json.dumps(meta)}")
    register_repeat_impl()
    t0 = time.perf_counter()
    model = build_model(args.arch, args.smoke, dev, dtype)
    nparam = sum(p.numel() for p in model.parameters())
    log(f"model {type(model).__name__} built in {time.perf_counter() - t0:.1f} s: {nparam / 1e9:.2f} B parameters, "
        f"{len(text_decoder(model).layers)} decoder layers, {dtype}, attention {model.config._attn_implementation}")
    if args.smoke:
        data["checks"] = checks(model, args, dev, log)  # wraps the MLPs itself (after an unwrapped reference)
    else:
        chunk_mlps(model, args.mlp_chunk)
    log(f"MLP forward of every decoder layer runs in chunks of {args.mlp_chunk} tokens")
    save()
    try:
        for n in args.sizes:
            t = time.perf_counter()
            inputs = make_inputs(args.arch, n, args.frame, args.text_every, args.text_len, dev)
            vid = float((inputs["modality"] == 2).float().mean())
            clips = len(inputs["video_grid_thw"]) if "video_grid_thw" in inputs else "-"
            log(f"N={n}: inputs in {time.perf_counter() - t:.1f} s; video share {vid:.3f}, {clips} video clips, "
                f"frame {args.frame} ({frame_grid(args.frame)} merged grid)")
            for name in names:
                row = None
                try:
                    with torch.inference_mode():
                        row = run_one(model, inputs, n, Variant(name, args), dev, log)
                except Exception as e:  # noqa: BLE001  (OOM etc.: record it, go on)
                    log(f"  N={n} {name}: FAILED\n{traceback.format_exc()}")
                    row = {"N": n, "variant": name, "seconds": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                finally:
                    gc.collect()
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                row.update(run=run_id, device=meta["device"])
                data["rows"] = [r for r in data["rows"] if (r["N"], r["variant"], r["device"]) !=
                                (n, name, meta["device"])] + [row]
                save()
            del inputs
    finally:
        save()
        for r in sorted(data["rows"], key=lambda r: (r["N"], r["variant"])):
            if r["device"] == meta["device"] and r["N"] in args.sizes:
                log(f"N={r['N']:>7} {r['variant']:15s} " + (f"{r['seconds']:8.3f} s  ratio {r['ratio'] or 0:5.2f}x  "
                    f"density {100 * r['density']:6.2f}%" if r.get("seconds") is not None else r.get("error", "")))
        log(f"wrote {jpath}, {mpath}; total {time.perf_counter() - t0:.0f} s")
        logf.close()


if __name__ == "__main__":
    main()
