"""Independent float64 references for the tests: dense boolean masks built from the
definitions of each pattern, one (i, j) rule at a time, and plain softmax attention.

Nothing here is imported by the package; the package's own references and kernels are
compared against these.
"""
from __future__ import annotations

import numpy as np
import torch


def _as_set(row: torch.Tensor) -> set[int]:
    return {int(x) for x in row.tolist() if int(x) >= 0}


def vertical_slash_mask(n: int, vertical: torch.Tensor, slash: torch.Tensor) -> torch.Tensor:
    """vertical/slash: [B, H, *] -> bool [B, H, n, n]; i attends j iff j <= i and
    (j in vertical or i - j in slash), plus j == i."""
    b, h = vertical.shape[:2]
    out = np.zeros((b, h, n, n), dtype=bool)
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    for bi in range(b):
        for hi in range(h):
            vs = np.zeros(n, dtype=bool)
            vs[list(_as_set(vertical[bi, hi]))] = True
            ss = np.zeros(n, dtype=bool)
            ss[[s for s in _as_set(slash[bi, hi]) if s < n]] = True
            off = np.clip(i - j, 0, n - 1)
            out[bi, hi] = (j <= i) & (vs[j] | ss[off]) | (i == j)
    return torch.from_numpy(out)


def block_sparse_mask(n: int, block_idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """block_idx [B, H, nqb, K] -> bool [B, H, n, n]; i attends j iff j <= i and
    block(j) in block_idx[block(i)], plus j == i."""
    b, h, nqb, _ = block_idx.shape
    out = np.zeros((b, h, n, n), dtype=bool)
    for bi in range(b):
        for hi in range(h):
            for qb in range(nqb):
                rows = slice(qb * block_size, min(n, (qb + 1) * block_size))
                for kb in _as_set(block_idx[bi, hi, qb]):
                    out[bi, hi, rows, kb * block_size:min(n, (kb + 1) * block_size)] = True
    causal = np.tril(np.ones((n, n), dtype=bool))
    return torch.from_numpy(out & causal | np.eye(n, dtype=bool))


def ashape_mask(n: int, sink: int, window: int) -> torch.Tensor:
    """bool [n, n]: j < sink or i - window < j <= i (causal), plus j == i."""
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    m = (j <= i) & ((j < sink) | (j > i - window)) | (i == j)
    return torch.from_numpy(m)


def masked_attention_f64(q, k, v, mask, scale=None) -> torch.Tensor:
    """q [B, Hq, N, D], k/v [B, Hkv, N, D], mask bool broadcastable to [B, Hq, N, N]
    -> float64 [B, Hq, N, D]. K/V heads are repeated for GQA (fine for a reference)."""
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask.to(s.device), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    return float((out - ref).norm() / ref.norm())
