"""Torch references of the sparse attention ops: exact, device-agnostic, chunked over
queries so no [N, N] tensor of the whole problem is ever built (they run at 8K+ on a CPU).

Every op here is "masked causal softmax attention" with a per-(batch, head) rule saying
which keys a query block sees; the rules live in the `*_rows` builders below.
GQA is computed by grouping query heads per KV head (K/V are never repeated).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# rows(i0, i1) -> bool [B, Hq or 1, i1 - i0, i1]: which keys 0..i1-1 queries i0..i1-1 see
RowMask = Callable[[int, int], torch.Tensor]

_CHUNK_ELEMS = 1 << 24  # scores per chunk (B * Hq * rows * keys); ~64 MB in float32


def masked_attention(q, k, v, rows: RowMask, scale: float) -> torch.Tensor:
    """q [B, Hq, N, D], k/v [B, Hkv, N, D] -> [B, Hq, N, D] in q's dtype.

    Query i sees key j iff j <= i and rows(...)[.., i, j]; i always sees i (callers
    include it). Computed chunk by chunk of queries with torch's SDPA and a boolean mask,
    in float32 (float64 for float64 inputs); GQA without repeating K/V.
    """
    b, hq, n, d = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = k.to(acc), v.to(acc)
    out = torch.empty_like(q)
    chunk = max(1, min(n, _CHUNK_ELEMS // max(1, b * hq * n)))
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        causal = torch.arange(i0, i1, device=q.device)[:, None] >= torch.arange(i1, device=q.device)[None, :]
        mask = rows(i0, i1) & causal  # [B|1, Hq|1, c, i1]
        o = F.scaled_dot_product_attention(
            q[:, :, i0:i1].to(acc), k[:, :, :i1], v[:, :, :i1], attn_mask=mask, scale=scale,
            enable_gqa=hq != k.shape[1],
        )
        out[:, :, i0:i1] = o.to(q.dtype)
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
        # Toeplitz view T[a, j] = smask[i0 + a - j] (False for negative offsets), no gather:
        # z[t] = smask[i1 - 1 - t]; z.unfold gives z[u + j] for row u = i1 - 1 - i.
        z = torch.cat([smask[..., :i1].flip(-1), smask.new_zeros(b, h, i1 - i0 - 1)], -1)
        s = z.unfold(-1, i1, 1).flip(-2)  # [B, H, c, i1]
        return s | vmask[:, :, None, :i1] | _diag(i0, i1, dev)

    return rows


def block_sparse_rows(n: int, block_idx: torch.Tensor, block_size: int, dense_from: int | None = None) -> RowMask:
    """block_idx [B, H, ceil(N / block_size), K] KV-block indices per query block; -1 = padding;
    query blocks >= dense_from see every key (causality applied by the caller)."""
    b, h, nqb, _ = block_idx.shape
    dev = block_idx.device
    nkb = nqb
    table = torch.zeros(b, h, nqb, nkb + 1, dtype=torch.bool, device=dev)
    table.scatter_(3, torch.where(block_idx < 0, nkb, block_idx).long(), True)
    table = table[..., :nkb]

    def rows(i0, i1):
        qb = torch.arange(i0, i1, device=dev) // block_size
        kb = torch.arange(i1, device=dev) // block_size
        m = table[:, :, qb][:, :, :, kb] | _diag(i0, i1, dev)
        return m if dense_from is None else m | (qb >= dense_from)[None, None, :, None]

    return rows


def ashape_rows(n: int, sink: int, window: int, device) -> RowMask:
    """Key j visible to query i iff j < sink or i - window < j (causality applied by the caller)."""

    def rows(i0, i1):
        i = torch.arange(i0, i1, device=device)[:, None]
        j = torch.arange(i1, device=device)[None, :]
        return ((j < sink) | (j > i - window) | (i == j))[None, None]

    return rows


def selection_rows(op: str, kwargs: dict, n: int, device) -> RowMask:
    """The row-mask builder of an op call (`op` a `sparseinfer.ops` function name)."""
    if op == "vertical_slash_attention":
        return vertical_slash_rows(n, kwargs["vertical_idx"], kwargs["slash_idx"])
    if op == "block_sparse_attention":
        return block_sparse_rows(n, kwargs["block_idx"], kwargs["block_size"], kwargs.get("dense_from"))
    if op == "ashape_attention":
        return ashape_rows(n, kwargs["sink"], kwargs["window"], device)
    if op == "dense_attention":
        return dense_rows(n, device)
    raise ValueError(f"selection_rows: unknown op {op!r}")


def write_heads(o: torch.Tensor, heads: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """An op's full output o [B, Hq, N, D] as the ops return it: heads (bool [Hq]) only, the
    other heads' rows zeros, or, given out (like o), written into out where the other heads'
    rows keep their values."""
    if out is None:
        return o if heads is None else o * heads.view(1, -1, 1, 1).to(o.dtype)
    if heads is None:
        return out.copy_(o)
    out[:, heads] = o[:, heads].to(out.dtype)
    return out
