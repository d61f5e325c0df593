"""Guards shared by every pre-filling method: per-head density fallback and staged rollout.

* Per head, when the kept density a pattern estimated for this input is above the kernel's
  break-even density, the sparse kernel would be slower than dense attention: that head runs
  dense SDPA instead (its sparse indices are emptied, so the kernel skips it).
* Per head, for vertical-slash, when the area the kernel would visit (scattered slashes merge
  into bands with holes: the visited area can be near 100% at 5% kept density) is above the
  kernel's break-even area, that head runs dense too (`over_work`).
  `over_break_even` is the one call the integration makes (both checks, device tensors).
* `layers=[...]` (only these layers sparse) and `dense_layers=[...]` (these layers dense) are
  resolved at patch time into per-layer dense reasons.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import ops
from .patterns.base import Selection

# Break-even kept density per op on the GPU kernel (H100, bf16, Llama-3-8B layer): the density
# at which the kernel's time equals cuDNN SDPA's, read off benchmarks/results/attention.md
# (2026-11-26 05:20 UTC) as the lowest (measured % of the density limit) / 100 over 32K-512K:
# block-sparse top-100 61% (realistic, 32K; 65-79% elsewhere), vertical-slash 32% (structured
# q/k with estimation, 32K; 40-63% elsewhere), A-shape 79% (32K). Above it, dense is faster.
# (Before the program-order / TMA kernel: 0.43 / 0.35 / 0.73.)
BREAK_EVEN_DENSITY = {"block_sparse_attention": 0.61, "vertical_slash_attention": 0.32, "ashape_attention": 0.79}
# Block-sparse on 128-blocks (XAttention / FlexPrefill / 128-block gates): the kernel alone, on
# their estimated lists, reached (density x dense time) / kernel time = 0.66-0.73 at 32K,
# 0.75-0.79 at 48K, 0.78-0.81 at 64K, 0.83-0.85 at 96K, 0.85-0.88 at 128K, 0.91-0.94 at 256K and
# 0.97-0.98 at 512K (H100, one 8B layer, densities 22-85%; benchmarks/results/adaptive_recall.md,
# adaptive_breakeven.md, adaptive_guarded*.md, adaptive_long.md, 2026-11-26): the lowest of each
# length is the break-even density *after* the estimation (its cost is spent either way);
# interpolated in log N, clamped outside. A probe deciding before the estimation weighs the
# estimation's cost against what the heads would save (`probe_says_dense`).
BREAK_EVEN_DENSITY_BLOCK128 = ((32768, 0.66), (49152, 0.75), (65536, 0.78), (98304, 0.83), (131072, 0.85),
                               (262144, 0.91), (524288, 0.97))


def _block128_limit(n: int) -> float:
    ns, ds = zip(*BREAK_EVEN_DENSITY_BLOCK128)
    return float(np.interp(math.log2(max(n, 1)), np.log2(ns), ds))  # clamped outside the table


# Break-even visited area (share of the causal cells in the tiles the kernel visits,
# `index.vertical_slash_work`) for vertical-slash: on an H100 (2026-11-26, one 8B layer,
# benchmarks/results/attention.md) the kernel took 1.7-2.6x cuDNN's time per visited cell
# (realistic indices 2.17x at 32K with 35.5% visited: 1.30x faster than dense; structured q/k with
# estimation 2.64x at 35.2%: 1.08x; i.i.d. random q/k 2.25x at 100%: 0.44x), so above
# 1 / 2.6 = 0.38 a head is faster dense.
BREAK_EVEN_WORK = {"vertical_slash_attention": 0.38}


def check_max_density(value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"patch: max_density expected None (the kernel's break-even) or a float in (0, 1], got {value!r}")


def density_limit(op: str, max_density: float | None, q: torch.Tensor, backend: str,
                  block_size: int | None = None) -> float:
    """The kept density above which a head of `op` runs dense. max_density None: the measured
    GPU break-even when the Triton kernel serves the call, else 1.0 (the CPU reference costs
    the same at any density, so no guard). block_size: a block-sparse selection's block (128
    and more: BREAK_EVEN_DENSITY_BLOCK128 at q's length)."""
    if max_density is not None:
        return float(max_density)
    if ops._use_triton(q, backend):
        if op == "block_sparse_attention" and block_size is not None and block_size >= 128:
            return _block128_limit(q.shape[2])
        return BREAK_EVEN_DENSITY.get(op, 1.0)
    return 1.0


# A probed call runs sparse only when its predicted cost is below this share of dense attention
# (the cost model leaves out the probe itself, one host sync and the index construction: 2-4% of
# dense at 64K-128K on the H100, benchmarks/results/adaptive_guarded_long.md)
PROBE_MARGIN = 0.97


def probe_says_dense(density: torch.Tensor, limit: float, caller_limit: bool, est_share: float) -> bool:
    """The density probe's decision, before the estimation (one host sync). density [B, Hq]:
    the probe's kept density per head; limit: `density_limit` for the call (< 1). caller_limit
    (the caller set max_density): dense when every head is above it. Otherwise a cost model in
    units of dense attention: the estimation (est_share) plus, per head, d / limit (the limit
    is the kernel's break-even density after the estimation; heads above it would run dense,
    cost 1), averaged over heads (worst input of the batch): dense when that reaches
    PROBE_MARGIN."""
    worst = density.amax(0)  # [Hq]
    if caller_limit:
        return bool((worst > limit).all())
    return bool(est_share + (worst / limit).clamp_max(1.0).mean() >= PROBE_MARGIN)


def over_limit(parts: list[Selection], limits: list[float]) -> torch.Tensor | None:
    """-> bool [Hq]: heads whose kept density (worst input of the batch) is above their op's
    limit; None when every limit is 1.0 (nothing can exceed it: no work, no synchronisation)."""
    out = None
    for sel, lim in zip(parts, limits):
        if lim >= 1.0:
            continue
        over = (sel.density > lim).any(0)
        if sel.heads is not None:
            over &= sel.heads
        out = over if out is None else out | over
    return out


def over_work(parts: list[Selection], q: torch.Tensor, backend: str, max_density: float | None) -> torch.Tensor | None:
    """-> bool [Hq]: heads whose vertical-slash indices would make the Triton kernel visit more
    than BREAK_EVEN_WORK of the causal area (worst input of the batch); None when no part is
    vertical-slash, when the kernel does not serve the call (the CPU reference's cost does not
    depend on the pattern), or when the caller set max_density (then that is the only guard).
    q [B, Hq, N, D]; device tensors, no host sync."""
    if max_density is not None or not ops._use_triton(q, backend):
        return None
    from .index import vertical_slash_work

    out = None
    for sel in parts:
        lim = BREAK_EVEN_WORK.get(sel.op)
        if lim is None:
            continue
        work = vertical_slash_work(q.shape[2], sel.kwargs["vertical_idx"], sel.kwargs["slash_idx"])
        over = (work > lim).any(0)
        if sel.heads is not None:
            over &= sel.heads
        out = over if out is None else out | over
    return out


def over_break_even(parts: list[Selection], q: torch.Tensor, backend: str,
                    max_density: float | None) -> torch.Tensor | None:
    """The guard: -> bool [Hq] heads that run dense (their kept density above their op's limit,
    `density_limit` with each selection's block size, or for vertical-slash the visited area
    above BREAK_EVEN_WORK, `over_work`); None when nothing can be over. q [B, Hq, N, D]; no
    host sync."""
    over = over_limit(parts, [density_limit(p.op, max_density, q, backend, p.kwargs.get("block_size"))
                              for p in parts])
    work = over_work(parts, q, backend, max_density)
    if work is None:
        return over
    return work if over is None else over | work


def drop_heads(parts: list[Selection], heads: torch.Tensor) -> list[Selection]:
    """Empty the index tensors of `heads` (bool [Hq]) so the sparse op does no work for them."""
    out = []
    for sel in parts:
        kw = {}
        for key, val in sel.kwargs.items():
            if torch.is_tensor(val) and val.dim() >= 2 and val.shape[1] == heads.shape[0]:
                val = torch.where(heads.view(1, -1, *([1] * (val.dim() - 2))), -1, val)
            kw[key] = val
        keep = ~heads if sel.heads is None else sel.heads & ~heads
        out.append(Selection(sel.op, kw, torch.where(heads, 0.0, sel.density), keep))
    return out


def dense_heads_attention(out: torch.Tensor, q, k, v, heads: torch.Tensor, scale: float) -> torch.Tensor:
    """Overwrite out[:, heads] ([B, Hq, N, D]) with dense causal attention of those heads only."""
    idx = heads.nonzero().flatten()
    g = q.shape[1] // k.shape[1]
    o = ops.dense_attention(q[:, idx], k[:, idx // g], v[:, idx // g], scale=scale)
    out = out.clone()
    out[:, idx] = o.to(out.dtype)
    return out


def rollout_reasons(n_layers: int, layers, dense_layers) -> list[str]:
    """Per layer: "" (sparse), "rollout" (not in `layers`) or "dense_layers"."""

    def check(name, val):
        if val is None:
            return None
        if isinstance(val, (str, bytes)) or not hasattr(val, "__iter__"):
            raise ValueError(f"patch: {name} expected a list of layer indices, got {val!r}")
        val = list(val)
        bad = [x for x in val if isinstance(x, bool) or not isinstance(x, int) or not -n_layers <= x < n_layers]
        if bad:
            raise ValueError(f"patch: {name} expected layer indices in [0, {n_layers}), got {bad}")
        return {x % n_layers for x in val}

    on, off = check("layers", layers), check("dense_layers", dense_layers)
    return ["dense_layers" if off and i in off else "rollout" if on is not None and i not in on else ""
            for i in range(n_layers)]
