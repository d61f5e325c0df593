"""FlexPrefill-style pattern: per head and input, a query-aware block pattern or a
vertical-slash pattern, each sized to reach a cumulative attention mass gamma (arXiv 2502.20766).

Per head, from the last `block_size` queries (the last query block):
1. True block distribution a_true [nb]: their exact causal softmax over all keys, summed into
   key blocks and averaged over the queries. Estimated distribution a_est [nb]: the softmax of
   the mean-pooled last query block against the mean-pooled key blocks. If the
   Jensen-Shannon distance sqrt(JSD(a_true, a_est)) < tau, the pooled estimate is trusted and
   the head is *query-aware*; otherwise it is *vertical-slash*.
2. Query-aware heads: the causal softmax of pooled q blocks against pooled k blocks, per row,
   divided by nb so the whole [nb, nb] map sums to 1; the smallest set of blocks (sorted by
   mass, descending, ties by lower flat index) reaching gamma, plus the sink column (block 0)
   and the diagonal blocks -> `ops.block_sparse_attention`.
3. Vertical-slash heads: the last queries' exact probabilities summed per key (verticals) and
   per diagonal offset (slashes), each normalised to 1; for each, the smallest set reaching
   gamma, plus the sink keys 0..block_size-1 and the offsets 0..block_size-1
   -> `ops.vertical_slash_attention`.

Batched over batch and heads (both patterns are estimated for every head, then masked per
head); one host synchronisation per call (the widest row of the three index tensors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Pattern, Selection, group_scores
from .block_sparse import block_sparse_density
from .vertical_slash import last_query_sums, vertical_slash_density
from .xattention import (_acc_dtype, check_fraction, check_int, head_values, sampled_blocks, sampled_query_rows,
                         table_to_index, threshold_rows)


def mean_pool(x: torch.Tensor, block_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [B, H, N, D] -> [B, H, ceil(N / block_size), D]: each block's mean over its valid rows,
    in `dtype` (default x's). Sums accumulate in `dtype` straight from x (no converted or padded
    copy of x: on CUDA a bf16 / fp16 x is read once)."""
    b, h, n, d = x.shape
    dtype = x.dtype if dtype is None else dtype
    full = n // block_size
    parts = []
    if full:
        parts.append(x[:, :, : full * block_size].reshape(b, h, full, block_size, d).sum(3, dtype=dtype) / block_size)
    if n > full * block_size:  # the last, partial block
        parts.append(x[:, :, full * block_size:].sum(2, keepdim=True, dtype=dtype) / (n - full * block_size))
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


def pooled_scores(q, k, block_size: int, scale: float) -> torch.Tensor:
    """Mean-pooled q blocks against mean-pooled k blocks, causal -> logits [B, Hq, nb, nb]."""
    b, hq, n, d = q.shape
    acc = _acc_dtype(q)
    nb = math.ceil(n / block_size)
    s = group_scores(mean_pool(q, block_size, acc), mean_pool(k, block_size, acc)) * scale
    r = torch.arange(nb, device=q.device)
    return s.masked_fill(r[None, :] > r[:, None], float("-inf"))


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt of the Jensen-Shannon divergence (nats) of distributions along the last dim."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0).sqrt()


def gamma_set(mass: torch.Tensor, gamma: torch.Tensor, forced: int) -> torch.Tensor:
    """mass [B, H, M] summing to 1 -> bool [B, H, M]: the smallest prefix by mass reaching
    gamma [H], plus positions < forced."""
    keep = threshold_rows(mass.unsqueeze(2), gamma).squeeze(2)
    keep[..., : min(forced, mass.shape[-1])] = True
    return keep


@dataclass
class FlexPrefillEstimate:
    """Everything one call estimated (tests and the recorder read it)."""

    query_aware: torch.Tensor  # bool [B, Hq]
    js: torch.Tensor  # [B, Hq] Jensen-Shannon distance
    block_table: torch.Tensor  # bool [B, Hq, nb, nb]: blocks kept (query-aware heads' choice; all heads)
    vertical: torch.Tensor  # bool [B, Hq, N]
    slash: torch.Tensor  # bool [B, Hq, N]
    block_mass: torch.Tensor  # [B, Hq, nb, nb] the normalised pooled map
    vertical_mass: torch.Tensor  # [B, Hq, N]
    slash_mass: torch.Tensor  # [B, Hq, N]


def estimate(q, k, gamma=0.95, tau: float = 0.1, block_size: int = 64, scale: float | None = None,
             fused=None) -> FlexPrefillEstimate:
    """q [B, Hq, N, D], k [B, Hkv, N, D] -> FlexPrefillEstimate (no host synchronisation).
    fused: the last queries' sums through `kernels.lastq` (None = on CUDA,
    `vertical_slash.last_query_sums`)."""
    b, hq, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    nb = math.ceil(n / block_size)
    gam = head_values("gamma", gamma, hq, q.device, 0.0, 1.0)
    L = min(block_size, n)  # the last block's queries: their mean softmax per key and per diagonal
    vmass, smass = (x / L for x in last_query_sums(q, k, L, scale, fused))  # [B, Hq, N] each
    npad = nb * block_size
    a_true = torch.nn.functional.pad(vmass, (0, npad - n)).reshape(b, hq, nb, block_size).sum(-1)
    logits = pooled_scores(q, k, block_size, scale)
    a_est = torch.softmax(logits[:, :, -1], dim=-1)
    js = js_distance(a_true, a_est)
    query_aware = js < tau
    # query-aware: global gamma set over the whole pooled map
    bmass = torch.softmax(logits, dim=-1) / nb
    flat = threshold_rows(bmass.reshape(b, hq, 1, nb * nb), gam.to(bmass.dtype)).reshape(b, hq, nb, nb)
    r = torch.arange(nb, device=q.device)
    table = (flat | (r[None, :] == r[:, None]) | (r[None, :] == 0)) & (r[None, :] <= r[:, None])
    # vertical-slash from the last queries' exact probabilities
    vert = gamma_set(vmass, gam.to(vmass.dtype), block_size)
    slash = gamma_set(smass, gam.to(smass.dtype), block_size)
    return FlexPrefillEstimate(query_aware, js, table, vert, slash, bmass, vmass, smass)


def probe_density(q, k, gamma=0.95, block_size: int = 64, scale: float | None = None, samples: int = 16) -> torch.Tensor:
    """A cheap estimate of the query-aware pattern's kept density: the pooled map's rows of
    `samples` evenly spaced query blocks (pooled k of every block, pooled q of those only), the
    gamma set taken over them as `estimate` takes it over the whole map (every row weighs the
    same), plus the sink and the diagonal -> float32 [B, Hq] = kept blocks / causal blocks over
    the sampled rows. Every head is scored as query-aware (its vertical-slash density is not
    probed: on near-uniform attention, the inputs the probe is for, both patterns keep nearly
    everything). No host synchronisation."""
    b, hq, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    nb = math.ceil(n / block_size)
    acc = _acc_dtype(q)
    picked, rows = sampled_blocks(nb, samples, q.device)
    qs = sampled_query_rows(q, rows, block_size, acc).reshape(b, hq, len(picked), block_size, d)
    qp = qs.sum(3) / (n - rows * block_size).clamp_max(block_size)[:, None].to(acc)  # block means [B, Hq, S, D]
    s = group_scores(qp, mean_pool(k, block_size, acc)) * scale  # [B, Hq, S, nb]
    r = torch.arange(nb, device=q.device)
    causal = r <= rows[:, None]
    mass = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1) / len(picked)
    gam = head_values("gamma", gamma, hq, q.device, 0.0, 1.0).to(mass.dtype)
    keep = threshold_rows(mass.reshape(b, hq, 1, -1), gam).reshape(b, hq, len(picked), nb)
    keep = (keep | (r == rows[:, None]) | (r == 0)) & causal
    return keep.sum((-1, -2)).float() / (rows + 1).sum().float()


@dataclass
class FlexPrefill(Pattern):
    """Options: gamma (cumulative attention mass to keep, float in (0, 1] or one per query head),
    tau (Jensen-Shannon distance below which a head is query-aware), block_size."""

    name = "flexprefill"
    gamma: float | list = 0.95
    tau: float = 0.1
    block_size: int = 64

    def __post_init__(self):
        check_fraction("gamma", self.gamma)
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or self.tau < 0:
            raise ValueError(f"tau: expected a non-negative float (a Jensen-Shannon distance), got {self.tau!r}")
        check_int("block_size", self.block_size)

    def probe(self, q, k, scale) -> torch.Tensor:
        """[B, Hq] kept density estimated on a few query blocks (see probe_density)."""
        return probe_density(q, k, self.gamma, self.block_size, scale)

    def probe_op(self) -> str:
        return "block_sparse_attention"

    def est_share(self, n: int) -> float:
        """The estimation's cost as a share of cuDNN dense attention at length n, the probe's
        cost in `guards.probe_says_dense`: measured 0.151 / 0.104 / 0.070 / 0.060 / 0.036 / 0.026
        at 48K / 64K / 96K / 128K / 256K / 512K (H100, one 8B layer, structured q/k;
        benchmarks/results/adaptive_breakeven.md, adaptive_guarded*.md, adaptive_long.md): the
        estimation grows about linearly, dense attention as N^2; 0.15 (48K / n)^0.7 stays above
        every measured point."""
        return 0.15 * min(1.0, 49152 / max(n, 1)) ** 0.7

    def select(self, q, k, scale):
        n = q.shape[2]
        est = estimate(q, k, self.gamma, self.tau, self.block_size, scale)
        qa = est.query_aware  # [B, Hq]
        # a head is served by one op for the whole batch: query-aware only if it is for every input
        heads = qa.all(0)
        bt = est.block_table & heads[None, :, None, None]
        vt = (est.vertical & ~heads[None, :, None]).unsqueeze(2)
        st = (est.slash & ~heads[None, :, None]).unsqueeze(2)
        widths = torch.stack([t.sum(-1).max() for t in (bt, vt, st)]).tolist()  # the one host synchronisation
        bidx = table_to_index(bt, widths[0])
        vidx = table_to_index(vt, widths[1]).squeeze(2)
        sidx = table_to_index(st, widths[2]).squeeze(2)
        bsel = Selection("block_sparse_attention", {"block_idx": bidx, "block_size": self.block_size},
                         block_sparse_density(n, bidx, self.block_size), heads)
        vsel = Selection("vertical_slash_attention", {"vertical_idx": vidx, "slash_idx": sidx},
                         vertical_slash_density(n, vidx, sidx), ~heads)
        return [bsel, vsel]
