"""A-shape (StreamingLLM-like) pattern: the first `sink` keys and a local `window`; no estimation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Budget, Pattern, Selection, causal_pairs, check_budget_option, resolve_budget


def ashape_density(n: int, sink: int, window: int, device=None) -> torch.Tensor:
    """Exact share of causal pairs kept by `ops.ashape_attention(sink, window)` -> scalar tensor."""
    i = torch.arange(n, device=device, dtype=torch.float64)
    win = torch.clamp(torch.full_like(i, window), max=i + 1)  # j in (i - window, i]
    snk = torch.clamp(torch.full_like(i, sink), max=i + 1)  # j < sink
    overlap = torch.clamp(snk - torch.clamp(i - window + 1, min=0), min=0)
    self_extra = (i >= sink).to(i.dtype) if window == 0 else torch.zeros_like(i)  # j == i always kept
    return ((win + snk - overlap + self_extra).sum() / causal_pairs(n)).float()


@dataclass
class AShape(Pattern):
    """Options: sink (first keys every query sees), window (local keys), each a token count
    or a fraction of N."""

    name = "ashape"
    sink: Budget = 128
    window: Budget = 0.1

    def __post_init__(self):
        check_budget_option("sink", self.sink)
        check_budget_option("window", self.window)

    def select(self, q, k, scale):
        b, hq, n, _ = q.shape
        sink = resolve_budget("sink", self.sink, n)
        window = resolve_budget("window", self.window, n)
        dens = ashape_density(n, sink, window, q.device).expand(b, hq)
        return [Selection("ashape_attention", {"sink": sink, "window": window}, dens)]
