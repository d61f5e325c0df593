"""Block-sparse pattern: top-k KV blocks per query block from mean-pooled q/k block scores.

The diagonal block is always kept; blocks after the query block (non-causal) never are.
Batched over batch and heads, plain torch ops, no host synchronisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Budget, Pattern, Selection, causal_pairs, check_budget_option, group_scores, resolve_budget


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [B, H, N, D] -> float32 [B, H, ceil(N / block_size), D], the mean of each block (tail: its
    valid rows). Summed in float32 from x as it is (a view of its blocks: no float32 copy of x)."""
    b, h, n, d = x.shape
    full = n // block_size
    sums = x[:, :, :full * block_size].unflatten(2, (full, block_size)).sum(3, dtype=torch.float32)
    if full * block_size < n:
        sums = torch.cat([sums, x[:, :, full * block_size:].sum(2, keepdim=True, dtype=torch.float32)], 2)
    counts = torch.full((sums.shape[2],), float(block_size), device=x.device)
    counts[-1] = n - (sums.shape[2] - 1) * block_size
    return sums / counts[:, None]


# The path of `estimate`: "auto" = on CUDA the Triton kernels (scores of the causal tiles,
# `kernels.blockscores`; the causal top-k, `kernels.topk`), torch (float32 matmul, mask, torch.topk)
# otherwise; True = the Triton kernels everywhere (CPU: interpreter); False = torch.
TOPK_KERNEL = "auto"


def estimate(q, k, topk: int, block_size: int = 64, scale: float | None = None, by_score: bool = False) -> torch.Tensor:
    """q [B, Hq, N, D], k [B, Hkv, N, D] -> block_idx [B, Hq, nb, min(topk, nb)] int64, -1 padding
    (query blocks near the start have fewer causal blocks than topk). Each row keeps its own
    block and the best-scoring blocks before it (pooled q . pooled k, float32 [B, Hq, nb, nb]; a
    positive scale does not change the ranking, so the scores are not scaled). Ties at the k-th
    score may resolve differently between the Triton top-k (lower block first) and torch.topk.
    Row order: ascending blocks from the Triton path (CUDA: the scores of causal tiles only,
    `kernels.blockscores`, in tf32x3; a top-k that reads only each row's causal blocks, no masked
    copy), by score from torch.topk; by_score: by score (best first) either way,
    so the first j entries of a row are its best j (per-head budgets below topk)."""
    b, hq, n, d = q.shape
    if scale is not None and not scale > 0:
        raise ValueError(f"block_sparse estimate: expected a positive scale, got {scale!r}")
    nb = math.ceil(n / block_size)
    qp, kp = pool_blocks(q, block_size), pool_blocks(k, block_size)
    kk = min(topk, nb)
    if TOPK_KERNEL is True or (TOPK_KERNEL == "auto" and q.is_cuda):
        from ..kernels.blockscores import causal_block_scores
        from ..kernels.topk import topk_indices_causal

        # the causal tiles only where the kernel serves D (a power of 2 >= 16); the top-k reads j <= i
        s = causal_block_scores(qp, kp) if d >= 16 and d & (d - 1) == 0 else group_scores(qp, kp)
        idx = topk_indices_causal(s.view(-1, nb), kk).view(b, hq, nb, kk)
        if by_score:  # ties keep the lower block first, as the kernel's cut; own block first, padding last
            r = torch.arange(nb, device=s.device)[:, None]
            vals = torch.gather(s, -1, idx.clamp(min=0).long())
            vals = torch.where(idx == r, float("inf"), torch.where(idx < 0, float("-inf"), vals))
            order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
            idx = torch.gather(idx, -1, order)
        return idx.long()
    s = group_scores(qp, kp)
    r = torch.arange(nb, device=q.device)
    s.masked_fill_(r[None, :] > r[:, None], float("-inf"))
    torch.diagonal(s, dim1=-2, dim2=-1).fill_(float("inf"))
    vals, idx = torch.topk(s, kk, dim=-1)
    return torch.where(vals == float("-inf"), -1, idx)


def block_sparse_density(n: int, block_idx: torch.Tensor, block_size: int, sorted_blocks: bool = False) -> torch.Tensor:
    """Exact share of causal pairs `ops.block_sparse_attention` computes -> [B, H] float32, from
    each row's distinct blocks below its own and whether it lists its own (`index.row_split`: on
    CUDA the index build's kernels; no [B, H, nb, nb] table). sorted_blocks: rows ascending
    without repeats (see the op)."""
    from ..index import row_split

    return block_rows_density(n, *row_split(block_idx, sorted_blocks), block_size)


def block_rows_density(n: int, strict: torch.Tensor, diag: torch.Tensor, block_size: int) -> torch.Tensor:
    """The share of causal pairs a block-sparse selection computes, from its rows: strict [B, H, nb]
    = distinct kept blocks j < i of row i, diag [B, H, nb] = 1 where row i keeps its own block
    (else only the diagonal itself) -> [B, H] float32."""
    nb = strict.shape[-1]
    size = torch.full((nb,), float(block_size), device=strict.device, dtype=torch.float64)
    size[-1] = n - (nb - 1) * block_size
    tri = size * (size + 1) / 2
    diag = diag.double()
    # blocks below the diagonal are full ones (only the last block can be short)
    cells = (strict.double() * block_size * size + diag * tri + (1 - diag) * size).sum(-1)
    return (cells / causal_pairs(n)).float()


@dataclass
class BlockSparse(Pattern):
    """Options: topk (KV blocks per query block: an int count, or a float fraction of the
    sequence's blocks), block_size."""

    name = "block_sparse"
    topk: Budget = 0.1
    block_size: int = 64

    def __post_init__(self):
        check_budget_option("topk", self.topk)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size: expected a positive int, got {self.block_size!r}")

    def select(self, q, k, scale):
        n = q.shape[2]
        nb = math.ceil(n / self.block_size)
        kk = resolve_budget("topk", self.topk, nb, minimum=1)
        idx = estimate(q, k, kk, self.block_size, scale)
        dens = block_sparse_density(n, idx, self.block_size)
        return [Selection("block_sparse_attention", {"block_idx": idx, "block_size": self.block_size}, dens)]
