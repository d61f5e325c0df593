"""Contextual sparsity on a loaded model: `attach(model, mlp=..., heads=...)` / `detach(model)`.

Everything goes through the existing modules (no model code copied):
- TEAL: every sparsified nn.Linear (gate/up/down_proj; q/k/v/o_proj with `attn_sparsity`) gets
  an instance `forward` that drops input channels with |x| <= its layer's threshold
  (reference: masked input then F.linear; triton: `sparseinfer.kernels.gemv.teal_linear`,
  which skips those weight rows).
- Deja Vu MLP: the mlp module gets an instance `forward`: the predictor scores the MLP input
  (or, for predictors trained with source "attn_in", the layer's attention input, captured by a
  forward hook on input_layernorm), the top-K neurons are kept (fixed K per layer, selected by
  `kernels.topk`); reference: the module's own forward with a down_proj pre-hook zeroing the
  other neurons of SiLU(gate) * up; triton: `sparseinfer.kernels.gemv.dejavu_mlp`. With
  "attn_in" predictors on CUDA the selection is a look-ahead: it starts on a side stream in the
  input_layernorm hook and overlaps the attention (`contextual.lookahead`).
- Deja Vu heads: an o_proj pre-hook zeroes the attention output of all but the top-K
  predicted query heads; on the Triton path o_proj then runs the TEAL kernel with threshold 0
  over its column-major weight, so the dropped heads' rows are not read (the attention itself
  still runs for every head).
Calls with more than `max_len` tokens (pre-filling) run dense unless apply_to="all".
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import allocation
from .activations import decoder_layers
from .dejavu import (SELECT_BLOCK, LayerPredictor, Predictors, QuantRows, blocked_top_mask, gate_up_weights,
                     quantized)
from .teal import Thresholds

MLP_METHODS = ("teal", "dejavu")
HEAD_METHODS = ("dejavu",)
BACKENDS = ("auto", "reference", "triton")
_ATTR = "_sparseinfer_contextual"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ContextualStats:
    """calls[(layer, kind)]: number of sparse calls; kept[(layer, site)]: [sum of kept shares
    (a tensor on the model's device: no host sync), number of calls] when record=True."""

    calls: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)
    record: bool = False

    def count(self, layer: int, kind: str) -> None:
        if torch.compiler.is_compiling():
            return
        self.calls[(layer, kind)] = self.calls.get((layer, kind), 0) + 1

    def add_kept(self, layer: int, site: str, share: torch.Tensor) -> None:
        if self.record and not torch.compiler.is_compiling():
            s = self.kept.setdefault((layer, site), [0.0, 0])
            s[0] = s[0] + share.detach().float()
            s[1] += 1

    def kept_share(self) -> dict[str, float]:
        """Mean kept share of input channels per site over all recorded calls."""
        out: dict[str, list[float]] = {}
        for (_, site), (tot, n) in self.kept.items():
            out.setdefault(site, []).append(float(tot) / n)
        return {k: sum(v) / len(v) for k, v in out.items()}

    def reset(self) -> None:
        self.calls.clear()
        self.kept.clear()


@dataclass
class ContextualHandle:
    mlp: str | None
    heads: str | None
    options: dict
    stats: ContextualStats
    restore: list = field(default_factory=list)  # (module, kind, payload) undone by detach


def _per_layer(value, n: int, name: str) -> list[float]:
    vals = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(vals) != n:
        raise ValueError(f"{name}: expected a float or a list of {n} floats (one per layer), got {len(vals)} values")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError(f"{name}: expected sparsities in [0, 1), got {v!r}")
    return [float(v) for v in vals]


def fingerprint(cfg) -> dict:
    return {k: getattr(cfg, k, None) for k in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                                               "num_attention_heads", "num_key_value_heads")}


def shipped(model_config, kind: str) -> Path | None:
    """The shipped TEAL thresholds (kind "teal") / Deja Vu predictors ("dejavu") for this
    architecture, or None."""
    import json

    from safetensors import safe_open

    fp = fingerprint(model_config)
    for path in sorted(SHIPPED_DIR.glob(f"*-{kind}.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        if meta.get("fingerprint") == fp:
            return path
    return None


def _is_active(ctx, x: torch.Tensor) -> bool:
    return ctx.apply_all or (x.dim() >= 2 and x.shape[-2] <= ctx.max_len)


@dataclass
class _LayerCtx:
    layer: int
    apply_all: bool
    max_len: int
    backend: str
    stats: ContextualStats
    predictor: LayerPredictor | None = None
    keep_neurons: int = 0
    keep_heads: int = 0
    n_heads: int = 0
    attn_in: torch.Tensor | None = None
    mlp_source: str = "mlp_in"
    neuron_mask: torch.Tensor | None = None
    lookahead: bool = False  # attn_in predictors on CUDA: the selection runs on a side stream
    select_block: int | None = SELECT_BLOCK  # Deja Vu selection rule (dejavu.blocked_top_mask)
    pending_idx: torch.Tensor | None = None  # its list, until the MLP joins it


def _use_triton(ctx: _LayerCtx, x: torch.Tensor) -> bool:
    """backend "auto": the kernels for CUDA fp16/bf16 calls of one token row (batch-1 decode);
    several rows share one weight read, and the union of their kept channels leaves little to
    skip (H100, 8B MLP, batch 4: 0.39x of cuBLAS), so they take the masked-input cuBLAS path."""
    if ctx.backend == "triton":
        return True
    return (ctx.backend == "auto" and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and x.numel() == x.shape[-1])


def _teal_forward(linear: torch.nn.Linear, ctx: _LayerCtx, site: str, threshold: torch.Tensor):
    orig = linear.forward

    def forward(x):
        if not _is_active(ctx, x):
            return orig(x)
        ctx.stats.count(ctx.layer, site)
        if ctx.stats.record:
            ctx.stats.add_kept(ctx.layer, site, (x.abs() > threshold).float().mean())
        if _use_triton(ctx, x):
            from ..kernels.gemv import teal_linear

            return teal_linear(x, linear.weight, threshold, linear.bias)
        return F.linear(torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype, device=x.device)),
                        linear.weight, linear.bias)

    return forward


def _teal_qkv_forward(linear: torch.nn.Linear, ctx: _LayerCtx, threshold: torch.Tensor, buf: torch.Tensor,
                      shared, j: int):
    """q/k/v_proj of one layer share their input and their TEAL threshold: on the Triton path q_proj
    runs one launch over the three weights' shared storage `buf` [H, Oq + Ok + Ov] and k_proj /
    v_proj on the same input read their columns of it (`shared`: a `qkv.SharedProduct`, projection
    j); any other call order or input takes the per-projection kernel."""
    orig = linear.forward
    single = _teal_forward(linear, ctx, "attn_in", threshold)  # recording / reference path

    def forward(x):
        if not _is_active(ctx, x):
            return orig(x)
        if ctx.stats.record or not _use_triton(ctx, x):
            return single(x)
        from ..kernels.gemv import teal_linear

        ctx.stats.count(ctx.layer, "attn_in")
        y = shared.block(j, x, lambda t: teal_linear(t, buf.t(), threshold))
        return teal_linear(x, linear.weight, threshold, linear.bias) if y is None else y

    return forward


def _shared_transposed_storage(weights: list, handle: ContextualHandle) -> torch.Tensor:
    """Weights [O_i, H] -> one row-major buffer [H, sum O_i] holding all of them transposed;
    each weight becomes a view of its columns (same values, no extra memory once the old
    storages are freed); detach gives each a contiguous row-major copy back."""
    buf = torch.cat([w.data.t() for w in weights], dim=1).contiguous()
    o = 0
    for w in weights:
        w.data = buf[:, o:o + w.shape[0]].t()
        handle.restore.append((w, "layout", None))
        o += w.shape[0]
    return buf


def _teal_mlp_forward(mlp, ctx: _LayerCtx, t_in: torch.Tensor, t_down: torch.Tensor, compact: bool = False):
    """The whole SwiGLU MLP through `sparseinfer::teal_mlp` (two launches; compact: the
    kept-rows-compacted loop, for high sparsity) on the Triton path; otherwise (reference
    backend, recording, pre-filling) the per-projection TEAL forwards."""
    orig = mlp.forward

    def forward(x):
        if not _is_active(ctx, x) or ctx.stats.record or not _use_triton(ctx, x):
            return orig(x)
        for site in ("mlp_in", "mlp_in", "down_in"):
            ctx.stats.count(ctx.layer, site)
        from ..kernels.gemv import teal_mlp

        shp = x.shape
        y = teal_mlp(x.reshape(-1, shp[-1]), mlp.gate_proj.weight.t(), mlp.up_proj.weight.t(),
                     mlp.down_proj.weight.t(), t_in, t_down, compact)
        return y.reshape(shp)

    return forward


def _fusable_swiglu(mlp, cfg) -> bool:
    return (getattr(cfg, "hidden_act", None) in ("silu", "swish")
            and all(hasattr(mlp, n) and getattr(mlp, n).bias is None for n in ("gate_proj", "up_proj", "down_proj")))


def _select_top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[.., n] -> bool [.., n]: True at the k largest (kernels.topk on CUDA; the torch rule,
    `dejavu.blocked_top_mask` with one block, where triton is missing)."""
    try:
        from ..kernels.topk import select_top_mask
    except ImportError:
        return blocked_top_mask(scores, k, None)
    return select_top_mask(scores, k)


def _fused_select(x: torch.Tensor, p: LayerPredictor, k: int, block: int) -> torch.Tensor:
    """x [R, H] -> idx [R, k] int32: the predictor's blocked selection in the kernels (kernels.predict):
    the int4 kind's one launch over its packed codes, else the low-rank kind's two."""
    from ..kernels.predict import dejavu_select, dejavu_select_int4

    if isinstance(p.B, QuantRows):
        return dejavu_select_int4(x, p.B.codes, p.B.scales, k, block)
    return dejavu_select(x, p.A, p.B, p.b, k, block)


def _dejavu_mlp_forward(mlp, ctx: _LayerCtx):
    orig = mlp.forward

    def forward(x):
        src = x if ctx.mlp_source == "mlp_in" else ctx.attn_in
        if not _is_active(ctx, x) or src is None:
            return orig(x)
        ctx.stats.count(ctx.layer, "mlp")
        if ctx.pending_idx is not None:  # look-ahead: the list was selected on the side stream
            from .lookahead import dejavu_mlp_joined

            (idx, begun_on), ctx.pending_idx = ctx.pending_idx, None
            shp = x.shape
            return dejavu_mlp_joined(x.reshape(1, shp[-1]), mlp.gate_proj.weight, mlp.up_proj.weight,
                                     mlp.down_proj.weight.t(), idx, begun_on).reshape(shp)
        p, k, blk = ctx.predictor, ctx.keep_neurons, ctx.select_block
        if _use_triton(ctx, x):
            from ..kernels.gemv import dejavu_mlp

            if blk is None:  # one global top-k (CUDA: one bisection launch, no sort): ascending positions
                from ..kernels.topk import select_top

                idx = select_top(p.mlp_scores(src), k)
            else:  # predictor + blocked selection fused (kernels.predict)
                idx = _fused_select(src.reshape(-1, src.shape[-1]), p, k, blk).reshape(*src.shape[:-1], k)
            return dejavu_mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, idx)
        if blk is not None and src.is_cuda and ctx.backend != "reference":  # several rows on CUDA: the
            # fused selection, its lists as the mask the masked cuBLAS path applies
            idx = _fused_select(src.reshape(-1, src.shape[-1]), p, k, blk)
            mask = torch.zeros(idx.shape[0], p.B.shape[0] // (2 if p.glu else 1), dtype=torch.bool, device=src.device)
            ctx.neuron_mask = mask.scatter_(1, idx.long(), True).reshape(*src.shape[:-1], -1)
        elif blk is None:
            ctx.neuron_mask = _select_top_mask(p.mlp_scores(src), k)
        else:
            ctx.neuron_mask = blocked_top_mask(p.mlp_scores(src), k, blk)
        try:
            return orig(x)
        finally:
            ctx.neuron_mask = None

    return forward


def _down_pre_hook(ctx: _LayerCtx):
    def hook(module, args):
        if ctx.neuron_mask is None:
            return None
        h = args[0]
        return (h * ctx.neuron_mask.to(h.dtype),) + tuple(args[1:])

    return hook


def _heads_pre_hook(ctx: _LayerCtx):
    def hook(module, args):
        h = args[0]  # [B, T, Hq * D]
        if not _is_active(ctx, h) or ctx.attn_in is None:
            return None
        ctx.stats.count(ctx.layer, "heads")
        scores = ctx.predictor.head_scores(ctx.attn_in)  # [B, T, Hq]
        mask = _select_top_mask(scores, ctx.keep_heads)  # bool [B, T, Hq]
        shp = h.shape
        return (h.reshape(*shp[:-1], ctx.n_heads, -1) * mask[..., None]).reshape(shp),

    return hook


def _zero_skip_forward(linear: torch.nn.Linear, ctx: _LayerCtx):
    """o_proj under heads="dejavu": on the Triton path the TEAL kernel with threshold 0 over
    the column-major weight, so the rows of the dropped heads' (zeroed) input channels are
    never read; elsewhere the original forward."""
    orig = linear.forward
    zero = torch.zeros((), dtype=torch.float32, device=linear.weight.device)

    def forward(x):
        if not _is_active(ctx, x) or not _use_triton(ctx, x):
            return orig(x)
        from ..kernels.gemv import teal_linear

        return teal_linear(x, linear.weight, zero, linear.bias)

    return forward


def _capture_hook(ctx: _LayerCtx):
    def hook(module, args, out):
        ctx.attn_in = out
        if ctx.lookahead and out.numel() == out.shape[-1] and _is_active(ctx, out) and _use_triton(ctx, out):
            # Deja Vu look-ahead (one token row: the listed-neurons kernel)
            from .lookahead import select_begin

            p = ctx.predictor
            x1 = out.reshape(1, out.shape[-1])
            ctx.pending_idx = (select_begin(x1, p.A, p.B, p.b, ctx.keep_neurons, ctx.select_block or 0), x1)

    return hook


def _transpose_storage(p: torch.nn.Parameter, handle: ContextualHandle) -> None:
    """Store a weight [out, in] column-major (its .t() [in, out] contiguous: one input channel =
    one contiguous row) in place, same values; detach restores the row-major layout."""
    if p.stride(0) == 1 and p.dim() == 2:
        return
    p.data = p.data.t().contiguous().t()
    handle.restore.append((p, "layout", None))


def attach(model, *, mlp: str | None = None, mlp_sparsity=0.5, heads: str | None = None, head_sparsity=0.5,
           attn_sparsity=None, predictors=None, thresholds=None, apply_to: str = "decode", max_len: int = 4,
           backend: str = "auto", record: bool = False, lookahead: bool = True,
           select_block: int | None = SELECT_BLOCK) -> ContextualHandle:
    """Contextual sparsity for decoding steps of a Llama-family model.

    mlp: "teal" (thresholds on the inputs of gate/up_proj and of down_proj, each dropping an
    `mlp_sparsity` share of channels on the calibration text) | "dejavu" (a predictor keeps
    round((1 - mlp_sparsity) * I) neurons per token) | None.
    heads: "dejavu" (keep round((1 - head_sparsity) * Hq) query heads per token) | None.
    attn_sparsity: TEAL on q/k/v_proj and o_proj inputs too (needs thresholds; any mlp method).
    *_sparsity: a float or one float per layer; mlp_sparsity also a calibrated per-layer
    `allocation.Allocation` (or the path of its JSON, `sparseinfer allocate-mlp`).
    predictors / thresholds: a path or a loaded `Predictors` / `Thresholds`; None = the file
    shipped for this architecture (`sparseinfer/configs/*-dejavu|teal.safetensors`; for mlp="dejavu"
    without heads and no shipped file: "int4", with a warning);
    predictors="int4" (or "intB", B in 2..8): Deja Vu's kind "int4" built here from the model's
    own W_gate / W_up rounded to B bits (training-free, no file, no head predictors;
    `dejavu.quantized`: on SmolLM2 +2.5% perplexity at 40% MLP sparsity).
    apply_to: "decode" (calls with <= max_len tokens per sequence; pre-filling stays dense) | "all".
    backend: "auto" (Triton kernels for CUDA fp16/bf16 one-row calls, else the masked torch reference) |
    "reference" | "triton" (forced; CPU tensors run the Triton interpreter).
    record: keep the measured kept share of TEAL inputs in handle.stats (costs a reduction per call).
    lookahead: with Deja Vu predictors trained on the attention input ("attn_in") and the Triton
    path, select the MLP's neurons on a side CUDA stream during the attention (CPU: inline);
    while attached, torch._inductor.config.reorder_for_locality is off (see contextual.lookahead).
    select_block: Deja Vu's selection rule (`dejavu.blocked_top_mask`): a power of two <= 256 =
    each block of that many neurons keeps its share of the K (the predictor and the selection then
    run fused in two launches on the Triton path, `kernels.predict`); None = one global top-K.
    """
    if mlp not in (None,) + MLP_METHODS:
        raise ValueError(f"mlp: expected one of {[None, *MLP_METHODS]}, got {mlp!r}")
    if heads not in (None,) + HEAD_METHODS:
        raise ValueError(f"heads: expected one of {[None, *HEAD_METHODS]}, got {heads!r}")
    if apply_to not in ("decode", "all"):
        raise ValueError(f"apply_to: expected 'decode' or 'all', got {apply_to!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
    if select_block is not None and (isinstance(select_block, bool) or not isinstance(select_block, int)
                                     or not 1 <= select_block <= 256 or select_block & (select_block - 1)):
        raise ValueError(f"select_block: expected None (one global top-K) or a power of two <= 256, got {select_block!r}")
    cfg = model.config
    layers = decoder_layers(model)
    n = len(layers)
    if mlp is None and heads is None and attn_sparsity is None:
        raise ValueError("attach: nothing to do (mlp=None, heads=None, attn_sparsity=None)")
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish") and mlp == "dejavu" and backend != "reference":
        raise ValueError(f"mlp='dejavu' kernels assume SiLU, the model uses {cfg.hidden_act!r}; use backend='reference'")
    mlp_sp = _per_layer(allocation.per_layer(mlp_sparsity, n, mlp), n, "mlp_sparsity")
    head_sp = _per_layer(head_sparsity, n, "head_sparsity")
    attn_sp = _per_layer(attn_sparsity, n, "attn_sparsity") if attn_sparsity is not None else None
    th = pred = None
    if mlp == "teal" or attn_sp is not None:
        src = thresholds if thresholds is not None else shipped(cfg, "teal")
        if src is None:
            raise ValueError("TEAL: no thresholds given and none shipped for this model; run "
                             "`sparseinfer calibrate-mlp --model M --out teal.safetensors` and pass thresholds=path")
        th = src if isinstance(src, Thresholds) else Thresholds.load(src)
        th.check_matches(cfg, str(src))
    if isinstance(predictors, str) and predictors.startswith("int") and predictors[3:].isdigit():
        if heads == "dejavu":
            raise ValueError(f"predictors={predictors!r} (the MLP's own weights rounded) has no head predictors; "
                             f"heads='dejavu' needs a predictor file")
        predictors = quantized(gate_up_weights(model), int(predictors[3:]),
                                      meta={"source": "the model's own gate / up weights, at attach"})
    if mlp == "dejavu" or heads == "dejavu":
        src = predictors if predictors is not None else shipped(cfg, "dejavu")
        if src is None and heads != "dejavu":  # training-free: the model's own weights at 4 bits
            warnings.warn("Deja Vu: no predictors given and none shipped for this model: using predictors='int4' "
                          "(the MLP's gate / up weights rounded to 4 bits, built now); pass a file from "
                          "`sparseinfer train-predictors` for low-rank ones", stacklevel=3)
            src = quantized(gate_up_weights(model), 4, meta={"source": "the model's own gate / up weights"})
        if src is None:
            raise ValueError("Deja Vu: heads='dejavu' needs head predictors and none are shipped for this model; run "
                             "`sparseinfer train-predictors --model M --out predictors.safetensors` and pass predictors=path")
        pred = src if isinstance(src, Predictors) else Predictors.load(src)
        pred.check_matches(cfg, str(src), heads == "dejavu")
    if hasattr(model, _ATTR):
        detach(model)
    stats = ContextualStats(record=record)
    handle = ContextualHandle(mlp, heads, dict(mlp_sparsity=mlp_sparsity, head_sparsity=head_sparsity,
                                               attn_sparsity=attn_sparsity, apply_to=apply_to, max_len=max_len,
                                               backend=backend), stats)
    dev = next(model.parameters()).device
    q = pred.layers[0].B if mlp == "dejavu" else None
    if isinstance(q, QuantRows):  # kind "int4": the kernel reads packed 4-bit codes of the MLP input's weights
        if pred.meta.get("mlp_input", "mlp_in") != "mlp_in":
            raise ValueError(f"Deja Vu: int4 predictors are the MLP's own gate / up weights and score the MLP input; "
                             f"this file says mlp_input={pred.meta.get('mlp_input')!r}")
        if not q.packed and backend != "reference" and (backend == "triton" or dev.type == "cuda"):
            raise ValueError(f"Deja Vu: the int4 kind's kernel reads 4-bit codes, these predictors have {q.bits} bits; "
                             f"use bits <= 4, or backend='reference' to check their accuracy")
    n_heads = cfg.num_attention_heads
    try:
        for i, layer in enumerate(layers):
            ctx = _LayerCtx(i, apply_to == "all", max_len, backend, stats, n_heads=n_heads, select_block=select_block)
            m, a = layer.mlp, layer.self_attn
            wants_triton = backend == "triton" or (backend == "auto" and dev.type == "cuda")

            def teal(linear, site, s):
                t = torch.tensor(th.threshold(i, site, s), dtype=torch.float32, device=dev)
                if wants_triton:
                    _transpose_storage(linear.weight, handle)
                linear.forward = _teal_forward(linear, ctx, site, t)
                handle.restore.append((linear, "forward", None))
                return t

            if mlp == "teal" and mlp_sp[i] > 0:
                t_in = teal(m.gate_proj, "mlp_in", mlp_sp[i])
                teal(m.up_proj, "mlp_in", mlp_sp[i])
                t_down = teal(m.down_proj, "down_in", mlp_sp[i])
                if wants_triton and _fusable_swiglu(m, cfg):
                    from ..kernels.gemv import COMPACT_MIN_SPARSITY

                    m.forward = _teal_mlp_forward(m, ctx, t_in, t_down, mlp_sp[i] >= COMPACT_MIN_SPARSITY)
                    handle.restore.append((m, "forward", None))
            if attn_sp is not None and attn_sp[i] > 0:
                qkv = (a.q_proj, a.k_proj, a.v_proj)
                if wants_triton and all(p.bias is None for p in qkv):  # one launch for the three
                    t = torch.tensor(th.threshold(i, "attn_in", attn_sp[i]), dtype=torch.float32, device=dev)
                    from ..qkv import SharedProduct

                    buf = _shared_transposed_storage([p.weight for p in qkv], handle)
                    shared = SharedProduct(SharedProduct.bounds_of([p.weight for p in qkv]))
                    for j, p in enumerate(qkv):
                        p.forward = _teal_qkv_forward(p, ctx, t, buf, shared, j)
                        handle.restore.append((p, "forward", None))
                else:
                    for p in qkv:
                        teal(p, "attn_in", attn_sp[i])
                teal(a.o_proj, "o_in", attn_sp[i])
            if pred is not None:
                ctx.predictor = pred.layers[i].to(dev, next(model.parameters()).dtype)  # no per-call casts
                ctx.mlp_source = pred.meta.get("mlp_input", "mlp_in")
                handle.restore.append((layer.input_layernorm.register_forward_hook(_capture_hook(ctx)), "hook", None))
            if mlp == "dejavu" and mlp_sp[i] > 0:
                ctx.keep_neurons = max(1, round((1 - mlp_sp[i]) * cfg.intermediate_size))
                if wants_triton:
                    _transpose_storage(m.down_proj.weight, handle)
                m.forward = _dejavu_mlp_forward(m, ctx)
                handle.restore.append((m, "forward", None))
                # look-ahead predictors (trained on the attention input): select on a side stream
                ctx.lookahead = lookahead and ctx.mlp_source == "attn_in" and wants_triton
                if ctx.lookahead and not any(kind == "inductor" for _, kind, _ in handle.restore):
                    from .lookahead import keep_inductor_order

                    kept = keep_inductor_order()  # torch.compile would sink the fork next to the MLP
                    if kept is not None:
                        handle.restore.append((kept[0], "inductor", kept[1]))
                handle.restore.append((m.down_proj.register_forward_pre_hook(_down_pre_hook(ctx)), "hook", None))
            if heads == "dejavu" and head_sp[i] > 0:
                ctx.keep_heads = max(1, round((1 - head_sp[i]) * n_heads))
                handle.restore.append((a.o_proj.register_forward_pre_hook(_heads_pre_hook(ctx)), "hook", None))
                o_teal = attn_sp is not None and attn_sp[i] > 0  # TEAL's o_proj skips zero inputs already
                if wants_triton and not o_teal:  # read only the kept heads' rows of o_proj
                    _transpose_storage(a.o_proj.weight, handle)
                    a.o_proj.forward = _zero_skip_forward(a.o_proj, ctx)
                    handle.restore.append((a.o_proj, "forward", None))
    except Exception:
        _undo(handle)
        raise
    setattr(model, _ATTR, handle)
    return handle


def _undo(handle: ContextualHandle) -> None:
    for obj, kind, payload in reversed(handle.restore):
        if kind == "forward":
            obj.__dict__.pop("forward", None)
        elif kind == "hook":
            obj.remove()
        elif kind == "layout":
            obj.data = obj.data.contiguous()
        elif kind == "inductor":  # look-ahead turned inductor's locality pass off
            obj.reorder_for_locality = payload
    handle.restore.clear()


def detach(model) -> None:
    """Remove contextual sparsity (hooks, forwards, weight layouts); ValueError if none attached."""
    handle = getattr(model, _ATTR, None)
    if handle is None:
        raise ValueError("detach: no contextual sparsity attached to this model")
    _undo(handle)
    delattr(model, _ATTR)


def neurons_kept(model_config, mlp_sparsity: float) -> int:
    return max(1, round((1 - mlp_sparsity) * model_config.intermediate_size))


__all__ = ["attach", "detach", "shipped", "fingerprint", "ContextualHandle", "ContextualStats", "MLP_METHODS",
           "HEAD_METHODS"]
