"""Block rows of an index, each row's split at its own query block found on the device.

Ascending rows, without a pass over the rows:

    sorted_rows_split(idx int32 / int64 [B, H, nb, K]) -> (before int32 [B, H, nb], diag bool [B, H, nb])

Row q (ascending block ids without repeats, -1 after the last, as the adaptive selections
write them) lists its blocks < q first, then possibly q itself: ``before`` = how many lie in
[0, q) (found by bisection, ~log2 K loads per row), ``diag`` = whether q follows them. The same
as ((idx >= 0) & (idx < q)).sum(-1) and (idx == q).any(-1) (five passes over a [B, H, nb, K]
index: ~1 ms at 128K on 64-blocks on an H100) for such rows. CUDA tensors run the compiled
kernel, CPU tensors the same kernel under the Triton interpreter.

Rows in any order (block lists as users and top-k estimates give them), one launch:

    block_lists(idx [B, H, nb, K] int, any order, -1 padding, repeats allowed)
        -> (tiles int32 [B, H, nb, K]: the distinct ids in [0, q) ascending, first ``before`` entries
            valid, before int32 [B, H, nb], diag bool [B, H, nb])

= index._sorted_unique's two sorts and the masks around them (H100: 3.3 ms at 512K for top-100 of
64-blocks, 32 heads), as one program per few rows: a bitonic sort of the row in registers (K <=
MAX_LIST), neighbours compared for repeats, kept entries compacted by a prefix sum.

Pair blocks of ascending rows (key blocks 2J, 2J + 1 both rows of a query pair 2I, 2I + 1 list):

    pair_split(idx [B, H, nb, K], before [B, H, nb], dense_from) -> (pairs, pair_count, rest, rest_count)

one program per row: its entries' partners by the neighbouring entry, the partner row's by
bisection; the pair blocks then run as tiles of twice the size (kernels.attention._block_pairs).
"""
from __future__ import annotations

import torch
import triton

from ._loader import kernel_module


def sorted_rows_split(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if idx.dim() != 4 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sorted_rows_split: expected int32/int64 idx [B, H, nb, K], got {idx.dtype} {tuple(idx.shape)}")
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


def pair_split(idx: torch.Tensor, before: torch.Tensor, dense_from: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx [B, H, nb, K] int32 / int64 ascending rows whose first ``before`` [B, H, nb] entries lie
    below the row's own block -> (pairs int32 [B, H, ceil(nb / 2), max(1, K // 2)], pair_count int32
    [B, H, ceil(nb / 2)], rest int32 [B, H, nb, K], rest_count int32 [B, H, nb]).

    Query blocks 2I and 2I + 1 (one block of twice the size) and key blocks 2J and 2J + 1 form a
    pair block when J < I, both rows list both key blocks and both rows are below ``dense_from``
    (None: nb); a last unpaired row (odd nb) pairs with itself. pairs[.., I, :] = those J
    ascending, -1 padding; rest[.., q, :rest_count] = row q's entries below q without its pair
    blocks, ascending (later entries unwritten). The union of the pair blocks' cells and the
    rest is the rows' cells below the diagonal block: the pair blocks run as tiles of twice the
    size (kernels.attention.block_sparse_attention), the rest as before."""
    if idx.dim() != 4 or idx.dtype not in (torch.int32, torch.int64) or before.shape != idx.shape[:3]:
        raise ValueError(f"pair_split: expected int32/int64 idx [B, H, nb, K] and before [B, H, nb], got "
                         f"{idx.dtype} {tuple(idx.shape)} and {tuple(before.shape)}")
    b, h, nb, k = idx.shape
    idx = idx.contiguous()
    before = before.to(torch.int32).contiguous()
    nb2, kp = (nb + 1) // 2, max(1, k // 2)
    dev = idx.device
    pairs = torch.empty(b, h, nb2, kp, dtype=torch.int32, device=dev)
    pair_count = torch.empty(b, h, nb2, dtype=torch.int32, device=dev)
    rest = torch.empty(b, h, nb, max(k, 1), dtype=torch.int32, device=dev)
    rest_count = torch.empty(b, h, nb, dtype=torch.int32, device=dev)
    rows = b * h * nb
    if rows == 0:
        return pairs, pair_count, rest, rest_count
    mod = kernel_module("_rows_kernel.py", not idx.is_cuda)
    mod.pair_split_kernel[(rows,)](
        idx, before, rest, rest_count, pairs, pair_count, nb, max(k, 1), kp, nb if dense_from is None else int(dense_from),
        BLOCK=256 if idx.is_cuda else 32, STEPS=max(1, (k + 1).bit_length()), num_warps=4)
    return pairs, pair_count, rest, rest_count


MAX_LIST = 512  # longest rows block_lists takes (one row in registers)


def block_lists(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if idx.dim() != 4 or idx.dtype not in (torch.int32, torch.int64) or idx.shape[-1] > MAX_LIST:
        raise ValueError(f"block_lists: expected int32/int64 idx [B, H, nb, K] with K <= {MAX_LIST}, got "
                         f"{idx.dtype} {tuple(idx.shape)}")
    b, h, nb, k = idx.shape
    if idx.stride(-1) != 1 or idx.stride(0) != h * idx.stride(1) or idx.stride(1) != nb * idx.stride(2):
        idx = idx.contiguous()
    rows = b * h * nb
    tiles = torch.empty(b, h, nb, k, dtype=torch.int32, device=idx.device)
    before = torch.empty(b, h, nb, dtype=torch.int32, device=idx.device)
    diag = torch.empty(b, h, nb, dtype=torch.int8, device=idx.device)
    if rows == 0 or k == 0:
        return tiles, before.zero_(), diag.zero_().bool()
    kp = max(2, triton.next_power_of_2(k))
    br = max(1, min(8, 1024 // kp)) if idx.is_cuda else 4
    mod = kernel_module("_rows_kernel.py", not idx.is_cuda)
    mod.block_lists_kernel[(triton.cdiv(rows, br),)](
        idx, tiles, before, diag, rows, nb, k, idx.stride(2), (1 << 31) - 1,
        BR=br, KP=kp, LOG=kp.bit_length() - 1, num_warps=4)
    return tiles, before, diag.view(torch.bool)
