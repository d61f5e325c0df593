"""What every pre-filling pattern shares: budgets, the selection it hands to an op, options.

A pattern looks at q and k of one attention call and *estimates indices*; it never computes
attention. The integration passes the indices to the matching `sparseinfer.ops` function.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

Budget = int | float


def resolve_budget(name: str, value: Budget, n: int, *, minimum: int = 0) -> int:
    """A budget is a token count (int >= 0) or a fraction of n (float in (0, 1]); -> count <= n."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected an int token count or a float fraction in (0, 1], got {value!r}")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name}: expected a fraction in (0, 1] when a float, got {value!r}")
        count = math.ceil(value * n)
    else:
        if value < 0:
            raise ValueError(f"{name}: expected a non-negative token count, got {value!r}")
        count = value
    return max(minimum, min(int(count), n))


def check_budget_option(name: str, value: Any) -> None:
    """Validate a budget at patch time, before any input is seen."""
    resolve_budget(name, value, 1 << 30)


@dataclass
class Selection:
    """What a pattern chose for one attention call.

    op: name of the `sparseinfer.ops` function; kwargs: its index arguments (tensors on q's
    device, shapes documented by the op); density: [B, Hq] float32 tensor, the share of the
    N (N + 1) / 2 causal (query, key) pairs that will be computed (kept on the device; read
    it lazily, it is not synced here).
    heads: None when the selection serves every head; else bool [Hq], the heads it serves
    (a pattern mixing ops per head returns one Selection per op; in each, the heads it does
    not serve carry empty indices, so they cost the kernel nothing).
    """

    op: str
    kwargs: dict
    density: torch.Tensor
    heads: torch.Tensor | None = None


def combined_density(parts: list[Selection]) -> torch.Tensor:
    """[B, Hq] density of a list of per-head selections."""
    if len(parts) == 1 and parts[0].heads is None:
        return parts[0].density
    return sum(torch.where(p.heads, p.density, torch.zeros_like(p.density)) for p in parts)


@dataclass
class Pattern:
    """Base class: a pattern's options are its dataclass fields."""

    name: ClassVar[str] = ""
    # True for patterns holding per-head state (configs, gates): they must override `shard`.
    per_head: ClassVar[bool] = False

    def shard(self, shard) -> "Pattern":
        """This pattern for the heads one tensor-parallel rank holds (`sparseinfer.parallel.HeadShard`).
        Patterns whose options apply to every head alike return themselves."""
        if self.per_head:
            raise ValueError(
                f"pattern {self.name!r} holds per-head state but cannot slice it to a tensor-parallel "
                f"rank's heads; it cannot run sharded"
            )
        return self

    def select(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> list[Selection]:
        """q [B, Hq, N, D], k [B, Hkv, N, D] (post-RoPE) -> the selections for this call."""
        raise NotImplementedError

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def causal_pairs(n: int) -> float:
    return n * (n + 1) / 2


def group_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, L, D] @ k [B, Hkv, N, D]^T under GQA -> [B, Hq, L, N]: the query heads of a KV
    head stacked along M, one [G * L, D] x [D, N] matmul per KV head (no copy of k: a broadcast
    batch dim would make torch.matmul copy k once per query head of the group)."""
    b, hq, l, d = q.shape
    hkv = k.shape[1]
    return torch.matmul(q.reshape(b, hkv, hq // hkv * l, d), k.transpose(-1, -2)).reshape(b, hq, l, k.shape[2])

