"""Fused Deja Vu selection: the low-rank predictor and a blocked fixed-K neuron selection in two launches.

    sparseinfer::dejavu_select(x [R, Hd], A [r, Hd], B [I, r] or [2I, r], b [I] or None, k, block)
        -> idx [R, k] int32, ascending: per row the k neurons a Deja Vu predictor keeps, chosen
        block by block: the I neurons are cut into blocks of `block`; block j keeps its kb_j
        best-scored neurons, kb_j = floor(k * end_j / I) - floor(k * start_j / I) (k in total,
        in proportion to the block's size). Scores: glu kind (b None, B = [B_gate; B_up]):
        |SiLU(g~) * u~| of [g~ | u~] = (x A^T) B^T; linear kind: (x A^T) B^T + b.

Why blocked: a global top-k needs every score before any neuron is chosen, one more launch and
a single-program selection (kernels.topk: 20 us for 14336 scores on an H100, more than the
predictor's matmuls); per block, each program of the score launch picks its own neurons and
writes its slice of the list (static shapes, no host sync, no global synchronisation). Neuron
order inside a layer is arbitrary, so a block is a random sample of the neurons and its kb-th
score is close to the global k-th: on SmolLM2-135M blocks of 32-256 change neither the
predictors' KL nor an oracle's perplexity beyond noise (benchmarks/results/contextual/
blocked_select_quality.md). block >= I is the global top-k (one block).

Launches: H = x A^T in fp32 (one program per predictor row by default), then one program per
block: its B rows (loaded before H is read: with programmatic dependent launch on Hopper the
score launch starts during the first one and prefetches them), its scores, ranks inside the block
(one NB x NB comparison count; ties to the lower position, NaN last), its slice of idx.
H100, Llama-3.1-8B MLP (14336 neurons), glu predictor, blocks of 32: 10.0 us at rank 128, 11.6 us
at rank 256, against 35-37 us for the torch predictor + kernels.topk; the MLP with its predictor
in front 1.67x / 1.61x of cuBLAS's dense MLP at 50% kept (benchmarks/results/contextual/
contextual_predictor.md).

    sparseinfer::dejavu_select_int4(x [R, Hd], codes [2I, Hd / 2] uint8, scales [2I, Hd / g], k, block)
        -> idx [R, k] int32: the same rule on the int4 kind's scores |SiLU(g~) * u~|, [g~ | u~] =
        x [W_gate; W_up]~^T with the weights as 4-bit codes (two per byte, `dejavu.QuantRows`;
        g = a power of two),
        one launch: each program reads its block's packed gate and up rows and x, scores, selects.
        Bytes: Hd / 2 per neuron and matrix + the scales, 1/6 of the MLP's bf16 weights (plus
        1/96 for the scales at g = 64).

CUDA tensors run the compiled kernels, CPU tensors the same kernels under the Triton interpreter.
The rule on given scores (any dtype, the reference): `sparseinfer.contextual.dejavu.blocked_top_mask`.
"""
from __future__ import annotations

import torch

from ._loader import kernel_module
from .decode import _next_pow2
from . import pdl as _pdl_mod

# (BLOCK_R, BLOCK_H, warps) of the x A^T launch, (BLOCK_K, warps) of the score + selection launch
# (BLOCK_K 0: the rank rounded up to a power of two, at most 256: one chunk for ranks <= 256).
# H100 sweep, benchmarks/contextual.py part P (results/contextual/contextual_predictor*.md).
CONFIG = {"cuda": ((1, 4096, 4), (0, 4)), "cpu": ((4, 64, 1), (16, 1))}
# (groups per step, warps, stages) of the int4 launch (its neurons per program are the caller's block)
INT4_CONFIG = {"cuda": (2, 4, 1), "cpu": (2, 1, 1)}
MAX_ROWS = 8  # rows per launch (decode batches); more rows run in several launches
MAX_BLOCK = 256


def _list_args(op: str, x: torch.Tensor, n: int, k, block, out: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Checks k (kept neurons of n) and block, and the output list [R, k] (allocated when None);
    -> (out, NB: the neurons per program, a power of two)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"{op}: expected an int k in [1, {n}] (the neurons), got {k!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{op}: expected a positive int block, got {block!r}")
    eff = min(block, n)  # block >= I: one block, the global top-k
    if eff < n and block & (block - 1):
        raise ValueError(f"{op}: block must be a power of two (or >= I = {n} for a global top-k), got {block}")
    nb = _next_pow2(eff)
    if nb > MAX_BLOCK:
        raise ValueError(f"{op}: blocks of at most {MAX_BLOCK} neurons (one program ranks a block), got "
                         f"{eff} (block {block}, I = {n}); a global top-k of many neurons is kernels.topk's job")
    r_rows = x.shape[0]
    if out is None:
        out = torch.empty(r_rows, k, dtype=torch.int32, device=x.device)
    elif out.shape != (r_rows, k) or out.dtype != torch.int32 or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"{op}: out must be a contiguous int32 [{r_rows}, {k}] tensor on {x.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return out, nb


def _pdl(x: torch.Tensor, pdl: int | None) -> tuple[int, dict]:
    """The programmatic dependent launch level (None: `kernels.pdl.DEJAVU_SELECT`; 0 off the Hopper+ GPUs)
    and its launch kwargs."""
    level = _pdl_mod.level(x, _pdl_mod.DEJAVU_SELECT if pdl is None else pdl)
    return level, ({"launch_pdl": True} if level else {})


def _rows_contiguous(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(1) == 1 else t.contiguous() for t in ts]


def _check(x, A, B, b) -> tuple[int, bool]:
    if x.dim() != 2 or A.dim() != 2 or B.dim() != 2 or A.shape[1] != x.shape[1] or B.shape[1] != A.shape[0]:
        raise ValueError(f"dejavu_select: expected x [R, H], A [r, H], B [I or 2I, r], got {tuple(x.shape)}, "
                         f"{tuple(A.shape)}, {tuple(B.shape)}")
    glu = b is None
    if glu and B.shape[0] % 2:
        raise ValueError(f"dejavu_select: the glu kind (b None) needs B [2I, r] (gate rows, then up rows), "
                         f"got {B.shape[0]} rows")
    n = B.shape[0] // 2 if glu else B.shape[0]
    if not glu and (b.dim() != 1 or b.shape[0] != n):
        raise ValueError(f"dejavu_select: expected b [{n}] for B {tuple(B.shape)}, got {tuple(b.shape)}")
    for name, t in (("A", A), ("B", B)) + ((("b", b),) if b is not None else ()):
        if t.device != x.device or not t.is_floating_point():
            raise ValueError(f"dejavu_select: {name} must be a floating tensor on {x.device}, got {t.dtype} on {t.device}")
    return n, glu


def _launch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, b: torch.Tensor | None, k: int, block: int,
            out: torch.Tensor | None = None, config=None, pdl: int | None = None) -> torch.Tensor:
    """The two launches; out: a contiguous int32 [R, k] tensor to write into; pdl: programmatic
    dependent launch level (None: `kernels.pdl.DEJAVU_SELECT`; Hopper and later only)."""
    n, glu = _check(x, A, B, b)
    out, nb = _list_args("dejavu_select", x, n, k, block, out)
    r_rows = x.shape[0]
    if r_rows == 0:
        return out
    (br, bh, w1), (bk, w2) = config or CONFIG["cuda" if x.is_cuda else "cpu"]
    bk = bk or min(_next_pow2(A.shape[0]), 256)
    pdl, extra = _pdl(x, pdl)
    mod = kernel_module("_predict_kernel.py", not x.is_cuda)
    x, A, B = _rows_contiguous(x, A, B)
    rank = A.shape[0]
    for r0 in range(0, r_rows, MAX_ROWS):
        xr = x[r0:r0 + MAX_ROWS]
        rows = xr.shape[0]
        rp2 = _next_pow2(rows)
        h = torch.empty(rows, rank, dtype=torch.float32, device=x.device)
        mod.lowrank_kernel[(-(-rank // br),)](xr, A, h, rows, x.shape[1], rank, xr.stride(0), A.stride(0), h.stride(0),
                                             ROWS=rp2, BLOCK_R=br, BLOCK_H=bh, PDL=pdl > 0, num_warps=w1)
        o = out[r0:r0 + rows]
        mod.blocked_select_kernel[(-(-n // nb),)](h, B, b if b is not None else h, o, rows, n, rank, k, h.stride(0),
                                                 B.stride(0), o.stride(0), ROWS=rp2, NB=nb, BLOCK_K=bk, GLU=glu,
                                                 HAS_BIAS=b is not None, PDL=pdl, num_warps=w2,
                                                 **extra)
    return out


@torch.library.custom_op("sparseinfer::dejavu_select", mutates_args=())
def dejavu_select(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, b: torch.Tensor | None, k: int,
                  block: int) -> torch.Tensor:
    return _launch(x, A, B, b, k, block)


@dejavu_select.register_fake
def _dejavu_select_fake(x, A, B, b, k, block):
    return x.new_empty(x.shape[0], k, dtype=torch.int32)


def _launch_int4(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, k: int, block: int,
                 out: torch.Tensor | None = None, config=None, pdl: int | None = None) -> torch.Tensor:
    """The int4 kind's one launch; out / pdl as in `_launch` (pdl >= 1: the next launch, the MLP's
    when launched with PDL, may start during this one)."""
    if x.dim() != 2 or codes.dim() != 2 or scales.dim() != 2 or codes.dtype != torch.uint8 \
            or codes.shape[1] * 2 != x.shape[1] or codes.shape[0] % 2 or scales.shape[0] != codes.shape[0]:
        raise ValueError(f"dejavu_select_int4: expected x [R, H], codes uint8 [2I, H / 2] (two 4-bit codes per byte), "
                         f"scales [2I, H / group], got x {tuple(x.shape)}, codes {codes.dtype} {tuple(codes.shape)}, "
                         f"scales {tuple(scales.shape)}")
    hd, n = x.shape[1], codes.shape[0] // 2
    group = hd // max(scales.shape[1], 1)
    if scales.shape[1] < 1 or hd % scales.shape[1] or group < 2 or group & (group - 1):
        raise ValueError(f"dejavu_select_int4: scales [2I, {scales.shape[1]}] do not cut H = {hd} into groups of a "
                         f"power of two >= 2 inputs")
    if not x.is_floating_point() or not scales.is_floating_point() or codes.device != x.device \
            or scales.device != x.device:
        raise ValueError(f"dejavu_select_int4: x and scales must be floating and every tensor on {x.device}, got x "
                         f"{x.dtype} on {x.device}, codes on {codes.device}, scales {scales.dtype} on {scales.device}")
    out, nb = _list_args("dejavu_select_int4", x, n, k, block, out)
    r_rows = x.shape[0]
    if r_rows == 0:
        return out
    ng, warps, stages = config or INT4_CONFIG["cuda" if x.is_cuda else "cpu"]
    pdl, extra = _pdl(x, pdl)
    mod = kernel_module("_predict_kernel.py", not x.is_cuda)
    x, codes, scales = _rows_contiguous(x, codes, scales)
    for r0 in range(0, r_rows, MAX_ROWS):
        xr, o = x[r0:r0 + MAX_ROWS], out[r0:r0 + MAX_ROWS]
        rows = xr.shape[0]
        mod.int4_select_kernel[(-(-n // nb),)](xr, codes, scales, o, rows, n, hd, k, xr.stride(0), codes.stride(0),
                                              scales.stride(0), o.stride(0), ROWS=_next_pow2(rows), NB=nb,
                                              NG=ng, GROUP=group, PDL=min(pdl, 1), num_warps=warps,
                                              num_stages=stages, **extra)
    return out


@torch.library.custom_op("sparseinfer::dejavu_select_int4", mutates_args=())
def dejavu_select_int4(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, k: int, block: int) -> torch.Tensor:
    return _launch_int4(x, codes, scales, k, block)


@dejavu_select_int4.register_fake
def _dejavu_select_int4_fake(x, codes, scales, k, block):
    return x.new_empty(x.shape[0], k, dtype=torch.int32)
