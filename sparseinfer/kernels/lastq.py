"""Column and diagonal sums of the estimating queries' softmax, fused (one Triton kernel).

    lastq_sums(s [B, H, G * L, N] float32 scaled logits of the queries at pos [B, G * L]
               (int), weight [B, G * L] float, groups G) -> (col [B, G, H, N], diag [B, G, H, N])

with p = softmax(s masked to keys <= pos) row by row, col[b, g, h, j] = sum_t w_t p[t, j] and
diag[b, g, h, o] = sum_t w_t p[t, pos_t - o] over the L rows t of group g. The torch path
(softmax, weighted sums, a gather for the diagonals) makes ~6 passes over the [B, H, G*L, N]
scores; this reads them twice (a logsumexp kernel over each row's causal keys, then the sums),
with no masked copy. CUDA tensors run the compiled
kernel, CPU tensors the same kernel under the Triton interpreter (tests).
"""
from __future__ import annotations

import torch
import triton

from ._loader import kernel_module


def lastq_sums(s: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, groups: int):
    b, h, gl, n = s.shape
    if s.dtype != torch.float32 or s.stride(-1) != 1 or gl % groups or tuple(pos.shape) != (b, gl) \
            or tuple(weight.shape) != (b, gl):
        raise ValueError(f"lastq_sums: expected float32 s [B, H, G*L, N] (last dim contiguous), pos / weight "
                         f"[B, G*L]; got s {s.dtype} {tuple(s.shape)}, pos {tuple(pos.shape)}, "
                         f"weight {tuple(weight.shape)}, groups {groups}")
    pos = pos.to(torch.int64).contiguous()
    weight = weight.float().contiguous()
    mod = kernel_module("_lastq_kernel.py", not s.is_cuda)
    lse = torch.empty(b, h, gl, dtype=torch.float32, device=s.device)
    mod.lastq_lse_kernel[(b * h * gl,)](
        s, pos, lse, s.stride(0), s.stride(1), s.stride(2), h, gl,
        BLOCK=2048 if s.is_cuda else 256, num_warps=4,
    )
    col = torch.empty(b, groups, h, n, dtype=torch.float32, device=s.device)
    diag = torch.empty_like(col)
    block = 1024 if s.is_cuda else 256
    mod.lastq_sums_kernel[(b * h * groups, triton.cdiv(n, block))](
        s, lse, pos, weight, col, diag,
        s.stride(0), s.stride(1), s.stride(2),
        n, h, groups, gl // groups,
        BLOCK=block, num_warps=4,
    )
    return col, diag
