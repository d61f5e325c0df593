"""Torch references of the sparse attention ops: exact, device-agnostic, chunked over
queries so no [N, N] tensor of the whole problem is ever built (they run at 8K+ on a CPU).

Every op here is "masked causal softmax attention" with a per-(batch, head) rule saying
which keys a query block sees; the rules live in the `*_rows` builders below.
GQA is computed by grouping query heads per KV head (K/V are never repeated).
"""
from __future__ import annotations

from typing import Callable

import torch

# rows(i0, i1) -> bool [B, Hq or 1, i1 - i0, i1]: which keys 0..i1-1 queries i0..i1-1 see
RowMask = Callable[[int, int], torch.Tensor]

_CHUNK_ELEMS = 1 << 24  # scores per chunk (B * Hq * rows * keys); ~64 MB in float32


def masked_attention(q, k, v, rows: RowMask, scale: float) -> torch.Tensor:
    """q [B, Hq, N, D], k/v [B, Hkv, N, D] -> [B, Hq, N, D] in q's dtype.

    Query i sees key j iff j <= i and rows(...)[.., i, j]; i always sees i (callers
    include it). Scores and softmax run in float32 (float64 for float64 inputs).
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.reshape(b, hkv, g, n, d)
    kk = k.unsqueeze(2)
    vv = v.unsqueeze(2)
    out = torch.empty_like(q)
    chunk = max(1, min(n, _CHUNK_ELEMS // max(1, b * hq * n)))
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        s = torch.matmul(qg[..., i0:i1, :].to(acc), kk[..., :i1, :].to(acc).transpose(-1, -2)) * scale
        m = rows(i0, i1)  # [B, Hq|1, c, i1]
        m = m.expand(b, hq, i1 - i0, i1).reshape(b, hkv, g, i1 - i0, i1)
        causal = torch.arange(i0, i1, device=q.device)[:, None] >= torch.arange(i1, device=q.device)[None, :]
        s = s.masked_fill(~(m & causal), float("-inf"))
        p = torch.softmax(s, dim=-1)
        o = torch.matmul(p, vv[..., :i1, :].to(acc))
        out[:, :, i0:i1] = o.reshape(b, hq, i1 - i0, d).to(q.dtype)
    return out


def _diag(i0: int, i1: int, device) -> torch.Tensor:
    return torch.arange(i0, i1, device=device)[:, None] == torch.arange(i1, device=device)[None, :]


def dense_rows(n: int, device) -> RowMask:
    return lambda i0, i1: torch.ones(1, 1, i1 - i0, i1, dtype=torch.bool, device=device)


def vertical_slash_rows(n: int, vertical_idx: torch.Tensor, slash_idx: torch.Tensor) -> RowMask:
    """vertical_idx [B, H, Nv] key positions, slash_idx [B, H, Ns] offsets i - j; -1 = padding."""
    b, h = vertical_idx.shape[:2]
    dev = vertical_idx.device
    # membership tables [B, H, N + 1]; the last slot swallows the -1 padding
    vmask = torch.zeros(b, h, n + 1, dtype=torch.bool, device=dev)
    vmask.scatter_(2, torch.where(vertical_idx < 0, n, vertical_idx).long(), True)
    smask = torch.zeros(b, h, n + 1, dtype=torch.bool, device=dev)
    smask.scatter_(2, torch.where(slash_idx < 0, n, slash_idx).long(), True)
    vmask, smask = vmask[..., :n], smask[..., :n]

    def rows(i0, i1):
        off = (torch.arange(i0, i1, device=dev)[:, None] - torch.arange(i1, device=dev)[None, :]).clamp(min=0)
        s = smask[:, :, off]  # [B, H, c, i1]
        return s | vmask[:, :, None, :i1] | _diag(i0, i1, dev)

    return rows


def block_sparse_rows(n: int, block_idx: torch.Tensor, block_size: int) -> RowMask:
    """block_idx [B, H, ceil(N / block_size), K] KV-block indices per query block; -1 = padding."""
    b, h, nqb, _ = block_idx.shape
    dev = block_idx.device
    nkb = nqb
    table = torch.zeros(b, h, nqb, nkb + 1, dtype=torch.bool, device=dev)
    table.scatter_(3, torch.where(block_idx < 0, nkb, block_idx).long(), True)
    table = table[..., :nkb]

    def rows(i0, i1):
        qb = torch.arange(i0, i1, device=dev) // block_size
        kb = torch.arange(i1, device=dev) // block_size
        return table[:, :, qb][:, :, :, kb] | _diag(i0, i1, dev)

    return rows


def ashape_rows(n: int, sink: int, window: int, device) -> RowMask:
    """Key j visible to query i iff j < sink or i - window < j (causality applied by the caller)."""

    def rows(i0, i1):
        i = torch.arange(i0, i1, device=device)[:, None]
        j = torch.arange(i1, device=device)[None, :]
        return ((j < sink) | (j > i - window) | (i == j))[None, None]

    return rows
