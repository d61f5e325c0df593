"""Vertical-slash pattern (MInference): estimated online from the last queries.

The last `last_q` queries are scored against every key (softmax in float32); the column
sums rank keys ("verticals") and the sums along each diagonal rank offsets i - j
("slashes"). The first tokens and the local diagonals are always kept. Batched over batch
and heads, plain torch ops, no host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Budget, Pattern, Selection, causal_pairs, check_budget_option, group_scores, resolve_budget

INIT_TOKENS = 30  # first keys always kept as verticals (attention sinks), as MInference does
LOCAL_OFFSETS = 64  # diagonals 0..63 always kept as slashes


def last_query_probs(q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float) -> torch.Tensor:
    """Softmax of the last `last_q` queries over all keys, causal, float32 (float64 inputs:
    float64).

    q [B, Hq, N, D], k [B, Hkv, N, D] -> [B, Hq, L, N], L = min(last_q, N).
    """
    b, hq, n, d = q.shape
    L = min(last_q, n)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = group_scores(q[:, :, n - L :].to(acc), k.to(acc)) * scale
    pos = torch.arange(n - L, n, device=q.device)[:, None]
    s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > pos, float("-inf"))
    return torch.softmax(s, dim=-1)


def diagonal_sums(p: torch.Tensor) -> torch.Tensor:
    """p [B, H, L, N], row t being query N - L + t -> [B, H, N]: out[o] = sum_t p[t, N-L+t-o].

    A skew by reshaping (no scatter): reverse keys, pad each row by L, re-view with row
    length N + L - 1 so row t is shifted right by t; offset o sits in column o + L - 1.
    """
    b, h, L, n = p.shape
    r = torch.nn.functional.pad(p.flip(-1), (0, L))  # [B, H, L, N + L]
    skew = r.reshape(b, h, L * (n + L))[..., : L * (n + L - 1)].reshape(b, h, L, n + L - 1)
    return skew.sum(-2)[..., L - 1 : L - 1 + n]


def _topk_forced(score: torch.Tensor, count: int, forced: int) -> torch.Tensor:
    """Top `count` positions of score [B, H, N], best first; positions < forced come first."""
    n = score.shape[-1]
    forced = min(forced, n)
    big = torch.arange(forced, 0, -1, device=score.device, dtype=score.dtype) + 1e6
    score = torch.cat([big.expand(*score.shape[:-1], forced), score[..., forced:]], dim=-1)
    return torch.topk(score, count, dim=-1).indices


def estimate(q, k, vertical: int, slash: int, last_q: int = 64, scale: float | None = None):
    """q [B, Hq, N, D], k [B, Hkv, N, D] -> (vertical_idx [B, Hq, min(vertical, N)],
    slash_idx [B, Hq, min(slash, N)]), int64, on q's device, best first (a prefix of
    either is the estimate for a smaller budget)."""
    n, d = q.shape[-2:]
    scale = d ** -0.5 if scale is None else scale
    col, diag = last_query_sums(q, k, last_q, scale)
    v_idx = _topk_forced(col, min(vertical, n), INIT_TOKENS)
    s_idx = _topk_forced(diag, min(slash, n), LOCAL_OFFSETS)
    return v_idx, s_idx


def fused_sums(q: torch.Tensor, fused=None):
    """`sparseinfer.kernels.lastq.query_sums` for CUDA tensors when triton is importable, else None
    (the caller takes its torch path). fused=True: the kernels anyway (on the CPU under the Triton
    interpreter), False: None."""
    if fused is False or (fused is None and not q.is_cuda):
        return None
    try:
        from ..kernels.lastq import query_sums
    except ImportError:
        return None
    return query_sums


def last_query_sums(q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float, fused=None):
    """Column sums and diagonal sums of `last_query_probs` -> ([B, Hq, N], [B, Hq, N]) float32.
    On CUDA one TF32 matmul + the fused Triton sums (`sparseinfer.kernels.lastq`: no
    [B, Hq, L, N] softmax pass, mask or skew copies), on the CPU the torch path (fused: see
    `fused_sums`)."""
    b, _, n, _ = q.shape
    query_sums = fused_sums(q, fused)
    if query_sums is not None:
        L = min(last_q, n)
        pos = torch.arange(n - L, n, device=q.device).expand(b, L)
        col, diag = query_sums(q, k, pos, torch.ones(b, L, device=q.device), 1, scale)
        return col[:, 0], diag[:, 0]
    p = last_query_probs(q, k, last_q, scale)
    return p.sum(-2), diagonal_sums(p)


def vertical_slash_density(n: int, vertical_idx: torch.Tensor, slash_idx: torch.Tensor) -> torch.Tensor:
    """Exact share of causal pairs `ops.vertical_slash_attention` computes -> [B, H] float32.

    Cells: sum over verticals v of (n - v), over slashes s of (n - s), minus the pairs
    (v, s) with v + s < n (counted twice), plus the diagonal cells (i, i) when offset 0 is
    not a slash and i is not a vertical.
    """
    b, h = vertical_idx.shape[:2]
    dev = vertical_idx.device
    vm = torch.zeros(b, h, n + 1, device=dev)
    vm.scatter_(2, torch.where(vertical_idx < 0, n, vertical_idx), 1.0)
    sm = torch.zeros(b, h, n + 1, device=dev)
    sm.scatter_(2, torch.where(slash_idx < 0, n, slash_idx), 1.0)
    vm, sm = vm[..., :n].double(), sm[..., :n].double()
    span = torch.arange(n, 0, -1, device=dev, dtype=torch.float64)  # n - x
    s_le = sm.cumsum(-1)  # slashes <= x
    overlap = (vm * s_le.flip(-1)).sum(-1)  # sum_v #{s <= n - 1 - v}
    diag = (1 - sm[..., 0]) * (n - vm.sum(-1))
    cells = (vm * span).sum(-1) + (sm * span).sum(-1) - overlap + diag
    return (cells / causal_pairs(n)).float()


@dataclass
class VerticalSlash(Pattern):
    """Options: vertical, slash (token counts or fractions of N), last_q (queries used to estimate)."""

    name = "vertical_slash"
    vertical: Budget = 0.05
    slash: Budget = 0.05
    last_q: int = 64

    def __post_init__(self):
        check_budget_option("vertical", self.vertical)
        check_budget_option("slash", self.slash)
        if isinstance(self.last_q, bool) or not isinstance(self.last_q, int) or self.last_q < 1:
            raise ValueError(f"last_q: expected a positive int, got {self.last_q!r}")

    def select(self, q, k, scale):
        n = q.shape[2]
        nv = resolve_budget("vertical", self.vertical, n, minimum=1)
        ns = resolve_budget("slash", self.slash, n, minimum=1)
        v_idx, s_idx = estimate(q, k, nv, ns, self.last_q, scale)
        dens = vertical_slash_density(n, v_idx, s_idx)
        return [Selection("vertical_slash_attention", {"vertical_idx": v_idx, "slash_idx": s_idx}, dens)]
