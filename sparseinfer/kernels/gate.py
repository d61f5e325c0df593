"""The learned gate's threshold selection in one Triton kernel (`_gate_kernel.py`):

    gate_select(gq [B, Hq, nb, W], gk [B, Hkv, nb, W], threshold, scale)
        -> (block_idx int32 [B, Hq, nb, K] (ascending, -1 padding; K = the widest row),
            counts int32 [B, Hq, nb] (kept blocks per row))

= ``kernels.xattn.select_blocks(softmax(scale * gq gk^T, causal), threshold, "threshold")``
without the [B, Hq, nb, nb] scores, log-softmax and probabilities in memory: a program of RB rows
computes their scores twice from gq / gk (W is small: the gate's width), once for the softmax
statistics and once to decide, and writes the kept sets as bits (nb / 8 bytes per row) and their
counts; a second launch turns the bits into index rows. Their width needs no host
synchronisation: a row keeps at most floor(1 / threshold) blocks by probability (they sum to <= 1)
plus the sink and the diagonal, so K = min(nb, 1.01 / threshold + 2) when that index fits in
SYNC_FREE_BYTES; otherwise the widest row's count, read on the host (one synchronisation, which
leaves the GPU idle while the host queues the index build and the attention kernel: ~1 ms per
layer at 128K on an H100). Dense rows (a prompt's tail) are not its business: the op's
`dense_from` takes them. CUDA tensors run the compiled kernels, CPU tensors the same kernels under
the Triton interpreter (tests).
"""
from __future__ import annotations

import math

import torch
import triton

from ._loader import kernel_module

# largest index [B, Hq, nb, K] int32 sized by the threshold's bound instead of a host read (1 GiB:
# 64-blocks, threshold 1e-3, 32 heads: 128K 265 MB, 256K 530 MB; 512K reads the widest row)
SYNC_FREE_BYTES = 1 << 30


def gate_select(gq: torch.Tensor, gk: torch.Tensor, threshold: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gq [B, Hq, nb, W], gk [B, Hkv, nb, W] float32 (block-RoPE'd gate projections), Hq a
    multiple of Hkv -> (block_idx int32 [B, Hq, nb, K], counts int32 [B, Hq, nb]): per row r the
    key blocks j <= r whose probability softmax_j(scale * gq[r] . gk[j]) is >= threshold, plus the
    sink block 0 and the diagonal r; ascending, -1 after the last; counts = how many per row.
    K: min(nb, floor(1.01 / threshold) + 2) if that index takes <= SYNC_FREE_BYTES, else the widest
    row's count (a host synchronisation)."""
    if gq.dim() != 4 or gk.dim() != 4 or gq.dtype != torch.float32 or gk.dtype != torch.float32 \
            or gq.shape[0] != gk.shape[0] or gq.shape[2:] != gk.shape[2:] or gq.shape[1] % gk.shape[1] \
            or gq.device != gk.device:
        raise ValueError(f"gate_select: expected float32 gq [B, Hq, nb, W] and gk [B, Hkv, nb, W] (Hq a multiple of "
                         f"Hkv) on one device; got gq {gq.dtype} {tuple(gq.shape)} on {gq.device}, gk {gk.dtype} "
                         f"{tuple(gk.shape)} on {gk.device}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"gate_select: expected threshold in [0, 1], got {threshold!r}")
    b, hq, nb, w = gq.shape
    gq, gk = (t if t.stride(-1) == 1 else t.contiguous() for t in (gq, gk))
    rows = b * hq * nb
    nw = triton.cdiv(nb, 32)
    words = torch.empty(rows, nw, dtype=torch.int32, device=gq.device)
    cnt = torch.empty(rows, dtype=torch.int32, device=gq.device)
    mod = kernel_module("_gate_kernel.py", not gq.is_cuda)
    rb, bk, warps = (64, 64, 4) if gq.is_cuda else (16, 32, 1)
    mod.gate_keep_kernel[(b * hq * triton.cdiv(nb, rb),)](
        gq, gk, words, cnt, nb, hq, hq // gk.shape[1], w, nw, float(threshold),
        float(scale) * math.log2(math.e),
        gq.stride(0), gq.stride(1), gq.stride(2), gk.stride(0), gk.stride(1), gk.stride(2),
        WP=max(16, triton.next_power_of_2(w)), RB=rb, BK=bk, PREC="ieee", num_warps=warps)
    bound = nb if threshold <= 0 else min(nb, math.floor(1.01 / threshold) + 2)
    if rows * bound * 4 <= SYNC_FREE_BYTES:
        width = bound  # no row can be wider: no host synchronisation
    else:
        width = max(1, int(cnt.max()))  # the widest row
    idx = torch.empty(b, hq, nb, width, dtype=torch.int32, device=gq.device)
    block = min(1024 if gq.is_cuda else 64, triton.next_power_of_2(nb))
    mod.gate_index_kernel[(rows,)](words, cnt, idx, nb, nw, width, BLOCK=block, num_warps=4)
    return idx, cnt.view(b, hq, nb)
