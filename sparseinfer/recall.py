"""Attention recall: the share of the dense softmax mass a sparse selection keeps.

Measured on sampled blocks of query rows (the full N x N matrix is never built), so it runs
for every layer and head of a model at its full context length on a CPU.
"""
from __future__ import annotations

import torch

from .ops.reference import selection_rows
from .patterns.base import Selection, group_scores


def row_blocks(n: int, count: int = 8, rows: int = 64) -> list[tuple[int, int]]:
    """`count` blocks of `rows` query rows spread over [0, n), the last one ending at n."""
    rows = min(rows, n)
    ends = sorted({max(rows, round(n * (i + 1) / count)) for i in range(count)})
    return [(e - rows, e) for e in ends]


def dense_probs(q: torch.Tensor, k: torch.Tensor, scale: float, i0: int, i1: int) -> torch.Tensor:
    """Causal softmax of queries i0..i1-1 over keys 0..i1-1: [B, Hq, i1 - i0, i1], float32."""
    b, hq = q.shape[:2]
    s = group_scores(q[:, :, i0:i1].float(), k[:, :, :i1].float()) * scale
    causal = torch.arange(i0, i1, device=q.device)[:, None] >= torch.arange(i1, device=q.device)[None, :]
    return torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)


class RecallProbe:
    """Dense probabilities of sampled rows of one (q, k), computed once; recall of any selection.

    q [B, Hq, N, D], k [B, Hkv, N, D].
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, scale: float, blocks: list[tuple[int, int]] | None = None):
        self.n = q.shape[2]
        self.device = q.device
        self.blocks = blocks or row_blocks(self.n)
        self.probs = [dense_probs(q, k, scale, i0, i1) for i0, i1 in self.blocks]

    def recall(self, parts: list[Selection]) -> torch.Tensor:
        """-> [B, Hq]: kept share of the dense mass, averaged over the sampled rows."""
        total = None
        for sel in parts:
            rows = selection_rows(sel.op, sel.kwargs, self.n, self.device)
            kept = torch.stack([
                torch.where(rows(i0, i1), p, 0.0).sum(-1).mean(-1) for p, (i0, i1) in zip(self.probs, self.blocks)
            ]).mean(0)
            if sel.heads is not None:
                kept = torch.where(sel.heads, kept, torch.zeros_like(kept))
            total = kept if total is None else total + kept
        return total
