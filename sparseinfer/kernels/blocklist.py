"""Block lists -> key tiles in one launch (the block-sparse index's hot part).

    block_tiles(block_idx [B, H, nb, K] int, block_size) ->
        (tiles int32 [B, H, nb, K]: each row's blocks strictly below its own query block,
                                   ascending, deduplicated, times block_size, zero padding;
         count int32 [B, H, nb];
         diag bool [B, H, nb]: the row lists its own block)

what `index.from_block_sparse` builds with ~15 torch passes and two sorts when index blocks,
kernel query blocks and key tiles coincide (H100, top-100 of 64-blocks: 0.96 ms at 128K,
3.3 ms at 512K). K <= MAX_K (the per-row comparison is K x K). CUDA tensors run the compiled
kernel, CPU tensors the same kernel under the Triton interpreter (tests).
"""
from __future__ import annotations

import torch
import triton

from ._loader import kernel_module

MAX_K = 128


def block_tiles(block_idx: torch.Tensor, block_size: int):
    b, h, nb, k = block_idx.shape
    if k > MAX_K or k < 1 or block_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"block_tiles: expected int block_idx [B, H, nb, K] with 1 <= K <= {MAX_K}, "
                         f"got {block_idx.dtype} {tuple(block_idx.shape)}")
    idx = block_idx.contiguous()
    tiles = torch.zeros(b, h, nb, k, dtype=torch.int32, device=idx.device)
    count = torch.empty(b, h, nb, dtype=torch.int32, device=idx.device)
    diag = torch.empty(b, h, nb, dtype=torch.int8, device=idx.device)
    kernel_module("_blocklist_kernel.py", not idx.is_cuda).block_tiles_kernel[(b * h * nb,)](
        idx, tiles, count, diag, k, nb, int(block_size), KP=max(16, triton.next_power_of_2(k)), num_warps=4)
    return tiles, count, diag.bool()
