"""Top-k positions without a sort: the selection step of fixed-K contextual sparsity.

    sparseinfer::topk_indices(scores [R, n] fp32 / fp16 / bf16, k) -> [R, k] int32
    sparseinfer::topk_mask(scores [R, n], k) -> bool [R, n] (the same set as a mask)
        the positions of each row's k largest scores, ascending (ties at the k-th value go to
        the lower positions). One launch, one program per row; the k-th largest score by
        bisection on the scores' ordered bit patterns (16 steps for 16-bit scores, 32 for fp32),
        the kept positions compacted by a prefix sum. Static shapes, no host sync (CUDA-graph
        capturable; a torch custom op with a fake implementation for torch.compile).
    sparseinfer::topk_indices_causal(scores [R, n], k) -> [R, k] int32: R / n stacked block-score
        matrices (block-sparse estimation), row r ranking only blocks j <= r % n with its own
        first, -1 padded; one launch per row-length class (CAUSAL_* below).

For Deja Vu's 8B MLP (14336 bf16 scores, k = 7168) on an H100 (benchmarks/contextual.py times
them side by side): this op 20.5 us (8 warps), a descending sort and its first k 31.5 us,
torch.topk 50 us unsorted / 87 us sorted.
CUDA tensors run the compiled kernel, CPU tensors the same kernel under the Triton interpreter;
`topk_indices_reference` is torch.topk's set, sorted.
"""
from __future__ import annotations

import torch

from ._loader import kernel_module
from .decode import _next_pow2

_BITS = {torch.float32: (torch.int32, 0x7FFFFFFF, -(1 << 31), 33),
         torch.float16: (torch.int16, 0x7FFF, -(1 << 15) - 1, 17),
         torch.bfloat16: (torch.int16, 0x7FFF, -(1 << 15) - 1, 17)}
# rows of up to this many scores: one program holds the row in registers
MAX_N = 1 << 17
# causal rows (block-score matrices): one launch per length class (rows i in [2^j, 2^(j+1)), from
# CAUSAL_MIN on; rows below it in one launch), each with a register row of its class's width (rows of the
# first classes would otherwise bisect a whole matrix row of padding); CAUSAL_WARPS: warps per
# program (None: by row width, as for plain rows). H100, block-sparse estimation of one 8B layer
# (benchmarks/results/bs_estimate_warps_s22.md): 4 warps 2.87-2.94 / 8.78 / 33.7 ms at 128K / 256K / 512K,
# by width 2.91 / 9.30 / 33.7, 2 warps 2.65-2.77 / 8.96 / 35.9, 16 warps 4.6 / 12.7 / 44.8; one launch
# 3.26 / 11.64 / 42.2 (the top-k kernel over whole masked rows before: 4.04-4.27 / 15.0 / 55.4 in all)
CAUSAL_SPLIT = True
CAUSAL_MIN = 256
CAUSAL_WARPS = 4


def _warps(n_p2: int) -> int:
    return 1 if n_p2 <= 256 else 4 if n_p2 <= 2048 else 8


def topk_indices_launch(scores: torch.Tensor, k: int, num_warps: int | None = None, mask: bool = False,
                        out: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """mask: bool [R, n] (True at the kept positions) instead of the positions; out: write the
    positions into this contiguous int32 [R, k] tensor. causal: the rows are stacked square
    block-score matrices [.., n, n] (row r = query block r % n): each row ranks only its causal
    positions j <= r % n, keeps its own block first and min(k, r % n + 1) positions, -1 after them
    (no masked copy of the scores, and only the causal part is read)."""
    if scores.dim() != 2:
        raise ValueError(f"topk_indices: expected scores [R, n], got shape {tuple(scores.shape)}")
    if scores.dtype not in _BITS:
        raise ValueError(f"topk_indices: expected float32 / float16 / bfloat16 scores, got {scores.dtype}")
    r, n = scores.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"topk_indices: expected an int k in [1, {n}] (the row length), got {k!r}")
    if n > MAX_N:
        raise ValueError(f"topk_indices: rows of at most {MAX_N} scores, got {n}")
    if causal and (mask or r % n):
        raise ValueError(f"topk_indices(causal=True): expected stacked square [.., {n}, {n}] score matrices "
                         f"(rows a multiple of {n}) and positions (mask=False), got {r} rows, mask={mask}")
    ity, flip, lowest, steps = _BITS[scores.dtype]
    bits = (scores if scores.stride(1) == 1 else scores.contiguous()).view(ity)
    if out is not None and (mask or out.shape != (r, k) or out.dtype != torch.int32 or not out.is_contiguous()
                            or out.device != scores.device):
        raise ValueError(f"topk_indices: out must be a contiguous int32 [{r}, {k}] tensor on {scores.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if out is None:
        out = (torch.empty(r, n, dtype=torch.bool, device=scores.device) if mask
               else torch.empty(r, k, dtype=torch.int32, device=scores.device))
    if causal:  # rows with fewer than k causal positions end in -1
        out.fill_(-1)
    if r == 0:
        return out
    kern = kernel_module("_topk_kernel.py", not scores.is_cuda).topk_indices_kernel
    if not causal:
        n_p2 = _next_pow2(n)
        kern[(r,)](bits, out.view(torch.uint8) if mask else out, n, k, bits.stride(0), N_P2=n_p2, FLIP=flip,
                   LOWEST=lowest, STEPS=steps, MASK_OUT=mask, num_warps=num_warps or _warps(n_p2))
        return out
    edges = [0, n]
    if CAUSAL_SPLIT:  # length classes: rows i in [2^j, 2^(j+1)) hold 2^j + 1 .. 2^(j+1) scores
        edges = [0] + [w for w in (1 << j for j in range(n.bit_length())) if CAUSAL_MIN <= w < n] + [n]
    for lo, hi in zip(edges[:-1], edges[1:]):
        n_p2 = _next_pow2(hi)  # row i holds i + 1 <= hi scores
        kern[(r // n * (hi - lo),)](bits, out, n, k, bits.stride(0), N_P2=n_p2, FLIP=flip, LOWEST=lowest,
                                    STEPS=steps, CAUSAL=True, ROW0=lo, ROWS=hi - lo,
                                    num_warps=num_warps or CAUSAL_WARPS or _warps(n_p2))
    return out


@torch.library.custom_op("sparseinfer::topk_indices", mutates_args=())
def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    return topk_indices_launch(scores, k)


@topk_indices.register_fake
def _topk_indices_fake(scores, k):
    return scores.new_empty(scores.shape[0], k, dtype=torch.int32)


@torch.library.custom_op("sparseinfer::topk_indices_causal", mutates_args=())
def topk_indices_causal(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [R, n], R a multiple of n (stacked block-score matrices) -> [R, k] int32: per row
    r its own block r % n and the best of the blocks before it, ascending, -1 padded."""
    return topk_indices_launch(scores, k, causal=True)


@topk_indices_causal.register_fake
def _topk_indices_causal_fake(scores, k):
    return scores.new_empty(scores.shape[0], k, dtype=torch.int32)


@torch.library.custom_op("sparseinfer::topk_mask", mutates_args=())
def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    return topk_indices_launch(scores, k, mask=True)


@topk_mask.register_fake
def _topk_mask_fake(scores, k):
    return scores.new_empty(scores.shape, dtype=torch.bool)


def topk_indices_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk's positions, ascending, int32 (ties may pick other positions than the kernel)."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values.to(torch.int32)


def select_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [.., n] -> [.., k] int32 positions of the k largest (ascending): the kernel for
    CUDA fp16 / bf16 / fp32 scores, torch.topk elsewhere (CPU, float64)."""
    if scores.is_cuda and scores.dtype in _BITS:
        return topk_indices(scores.reshape(-1, scores.shape[-1]), k).reshape(*scores.shape[:-1], k)
    return topk_indices_reference(scores, k)


def select_top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [.., n] -> bool [.., n], True at the k largest (ties: lower positions on CUDA)."""
    if scores.is_cuda and scores.dtype in _BITS:
        return topk_mask(scores.reshape(-1, scores.shape[-1]), k).reshape(scores.shape)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)
