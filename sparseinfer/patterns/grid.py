"""Grid pattern (MMInference): video tokens attend along a grid of period = a frame.

Estimation (batched over batch and heads, torch ops, no host synchronisation): the column
mass of the last queries' softmax (`vertical_slash.last_query_probs(...).sum(-2)`) is folded by
every candidate stride s (keys j grouped by j mod s); the phase p whose keys carry the largest
mass is that stride's best line set, scored by the z-score of its mean mass (its excess over
the mean of all keys, in units of the standard error of a mean over that many keys). A planted
period s0 scores z at s0, about z / sqrt(k) at a multiple k s0 (a subset of the same lines,
fewer keys) and about z / sqrt(2) at s0 / 2 (half the keys are off the lines), so the best
score is the period itself, not a multiple or divisor; ties within ``tol`` go to the smaller
stride. Keys that would dominate any fold
(the attention sinks at the start and the local band of the last queries) are left out; each key's mass
is divided by the mean mass of the keys within +-max(strides) of it (attention decays with
distance, which would favour the few lines nearest the queries), and clipped at ``clip``
times the mean so one heavy key cannot fake a period.

Lines: keys j = p (mod s) are vertical lines (every query sees them: gathered columns of the
kernel index), queries i = p (mod s) are horizontal lines (rows attending every causal key:
`ops.mm_attention`'s dense rows).
"""
from __future__ import annotations

import math

import torch

from ..index import device_tensor

DEFAULT_STRIDES = tuple(range(16, 1025, 16))


def candidate_strides(n: int, frame: int | None = None, strides=None) -> list[int]:
    """Sorted candidate strides (default multiples of 16 up to 1024, plus the frame size),
    keeping those with at least two periods in n tokens."""
    cand = set(DEFAULT_STRIDES if strides is None else strides)
    if frame:
        cand.add(int(frame))
    bad = [s for s in cand if isinstance(s, bool) or not isinstance(s, int) or s < 2]
    if bad:
        raise ValueError(f"grid strides: expected ints >= 2, got {sorted(map(str, bad))}")
    out = sorted(s for s in cand if 2 * s <= n)
    return out or [max(2, n // 2)]


def estimate_grid(colmass: torch.Tensor, strides: list[int], key_mask: torch.Tensor | None = None,
                  tol: float = 0.05, clip: float = 8.0):
    """colmass [B, H, N] (attention mass per key) -> (stride [B, H] int64, phase [B, H] int64,
    score [B, H] float32: the chosen lines' z-score).

    key_mask: bool broadcastable to [B, H, N], the keys to look at (None = all).
    """
    b, h, n = colmass.shape
    dev = colmass.device
    incl = torch.ones(1, 1, n, dtype=torch.bool, device=dev) if key_mask is None else key_mask.bool()
    while incl.dim() < 3:
        incl = incl.unsqueeze(0)
    w = incl.float()
    c = colmass.float() * w
    # divide out the slow trend (mass decaying with distance to the queries): each key over the
    # mean of the included keys within +-max(strides), by prefix sums (O(N))
    half = max(strides)
    cc = torch.nn.functional.pad(c.double().cumsum(-1), (1, 0))
    cw = torch.nn.functional.pad(w.double().cumsum(-1), (1, 0))
    lo = (torch.arange(n, device=dev) - half).clamp(min=0)
    hi = (torch.arange(n, device=dev) + half + 1).clamp(max=n)
    local = (cc[..., hi] - cc[..., lo]) / (cw[..., hi] - cw[..., lo]).clamp(min=1)
    c = torch.where(local > 0, c / local.clamp(min=1e-30).float(), torch.zeros_like(c)) * w
    cnt = w.sum(-1, keepdim=True).clamp(min=1)
    mean = c.sum(-1, keepdim=True) / cnt
    c = torch.minimum(c, clip * mean)
    mean = c.sum(-1, keepdim=True) / cnt
    std = (((c - mean) * w) ** 2).sum(-1, keepdim=True).div(cnt).sqrt().clamp(min=1e-30)
    scores, phases = [], []
    # pad once; for each stride a prefix of whole periods is a view [.., periods, s] (no copy)
    c_pad = torch.nn.functional.pad(c, (0, max(strides)))
    w_pad = torch.nn.functional.pad(w, (0, max(strides)))
    for s in strides:
        m = -(-n // s) * s
        cs = c_pad[..., :m].view(b, h, m // s, s).sum(-2)
        ws = w_pad[..., :m].view(w.shape[0], w.shape[1], m // s, s).sum(-2)
        # z-score of each phase's mean: (line mean - mean) / (std / sqrt(lines))
        z = (cs - mean * ws) / (std * ws.clamp(min=1).sqrt())
        z = torch.where(ws > 0, z, torch.full_like(z, float("-inf")))
        best, p = z.max(-1)
        scores.append(best)
        phases.append(p)
    score = torch.stack(scores, -1)  # [B, H, S]
    phase = torch.stack(phases, -1)
    top = score.max(-1, keepdim=True).values
    ok = score >= top - tol * top.abs()
    pick = ok.to(torch.int8).argmax(-1)  # first (smallest) stride within tol of the best
    st = device_tensor(strides, dev, torch.int64)
    return (st[pick], phase.gather(-1, pick[..., None])[..., 0],
            score.gather(-1, pick[..., None])[..., 0].float())


def grid_lines(stride: torch.Tensor, phase: torch.Tensor, n: int, min_stride: int) -> torch.Tensor:
    """stride, phase [B, H] -> positions p, p + s, p + 2s, ... < n as [B, H, ceil(n / min_stride)]
    int64, -1 padding (a fixed size, so no host synchronisation)."""
    t = torch.arange(math.ceil(n / min_stride), device=stride.device)
    pos = phase[..., None] + t * stride[..., None]
    return torch.where(pos < n, pos, -1)


def permutation(modality: torch.Tensor, lines: torch.Tensor) -> torch.Tensor:
    """MMInference's token permutation: modality runs contiguous, grid lines moved to the end.

    modality [B, N] ints; lines [B, H, M] positions of the grid lines (-1 padding) -> perm
    [B, H, N] int64: the original positions in permuted order, sorted by (is a line, modality,
    position), so the non-line tokens of each modality form one contiguous run in original order
    and the lines form the last block (the "right band" of keys / "bottom band" of queries).
    sparseinfer computes the same cells without permuting (gathered columns and gathered rows,
    causality by original positions, see ops/mm.py); this function is the reference for that.
    Inverse: ``torch.argsort(perm, -1)``."""
    b, n = modality.shape
    h = lines.shape[1]
    is_line = torch.zeros(b, h, n + 1, dtype=torch.int64, device=modality.device)
    is_line.scatter_(-1, torch.where(lines < 0, n, lines).long(), 1)
    key = (is_line[..., :n] * (modality.max() + 1) + modality.long()[:, None, :]) * n + torch.arange(n, device=modality.device)
    return torch.argsort(key, -1)
