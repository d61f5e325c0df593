"""Ascending block rows split at their own query block, without a pass over the rows:

    sorted_rows_split(idx int32 [B, H, nb, K]) -> (before int32 [B, H, nb], diag bool [B, H, nb])

Row q (ascending block ids without repeats, -1 after the last, as the adaptive selections
write them) lists its blocks < q first, then possibly q itself: ``before`` = how many lie in
[0, q) (found by bisection, ~log2 K loads per row), ``diag`` = whether q follows them. The same
as ((idx >= 0) & (idx < q)).sum(-1) and (idx == q).any(-1) (five passes over a [B, H, nb, K]
index: ~1 ms at 128K on 64-blocks on an H100) for such rows. CUDA tensors run the compiled
kernel, CPU tensors the same kernel under the Triton interpreter.
"""
from __future__ import annotations

import torch
import triton

from ._loader import kernel_module


def sorted_rows_split(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if idx.dim() != 4 or idx.dtype != torch.int32:
        raise ValueError(f"sorted_rows_split: expected int32 idx [B, H, nb, K], got {idx.dtype} {tuple(idx.shape)}")
    b, h, nb, k = idx.shape
    idx = idx.contiguous()
    rows = b * h * nb
    before = torch.empty(b, h, nb, dtype=torch.int32, device=idx.device)
    diag = torch.empty(b, h, nb, dtype=torch.int8, device=idx.device)
    if rows == 0:
        return before, diag.bool()
    block = 256 if idx.is_cuda else 64
    mod = kernel_module("_rows_kernel.py", not idx.is_cuda)
    mod.sorted_rows_kernel[(triton.cdiv(rows, block),)](
        idx, before, diag, rows, nb, max(k, 1), BLOCK=block, STEPS=max(1, (k + 1).bit_length()), num_warps=4)
    return before, diag.view(torch.bool)
