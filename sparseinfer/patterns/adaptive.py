"""Adaptive block-sparse pattern: a learned gate (`sparseinfer.gate`) rates the KV blocks of
every query block; a threshold (per input and head budgets) or a per-row top-k turns the
ratings into block indices for `ops.block_sparse_attention`.

Rules (row i = query block i, key blocks 0..i are causal):
  threshold mode: keep block j iff gate probability p[i, j] >= threshold;
  density mode:   keep the ceil(density * (i + 1)) causal blocks of highest p[i, j];
  always: the sink block 0 and the diagonal block i (so no row is ever empty);
  dense_tail=T: the query blocks holding the last T positions keep every causal block (the
  rows that answer a prompt's final question see the whole context; at N tokens this adds at
  most ~2 * (T + block) / N to the kept density).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..gate import Gates, GateError, causal_blocks
from ..index import row_split
from .base import Pattern, Selection
from .block_sparse import block_rows_density

OPTIONS = ("threshold", "density", "gates", "block_size", "dense_tail")
# patch's default dense_tail: the last query block (where a prompt's question sits) sees every
# causal key. SmolLM2-135M NIAH at 8K, 10 depths: density=0.28 without it 2/10 at 28.8% kept,
# density=0.27 with it 3/10 at 28.9% = dense's 3/10 (docs/gates-smollm2-135m.md)
DENSE_TAIL = 64


def keep_blocks(probs: torch.Tensor, threshold: float | None = None, density: float | None = None) -> torch.Tensor:
    """probs [B, H, nb, nb] gate probabilities -> bool [B, H, nb, nb], the kept key blocks
    (exactly one of threshold / density). A dense tail is not listed here: the op's dense_from."""
    if (threshold is None) == (density is None):
        raise ValueError(f"keep_blocks: expected exactly one of threshold / density, got {threshold!r} / {density!r}")
    nb = probs.shape[-1]
    dev = probs.device
    causal = causal_blocks(nb, dev)
    r = torch.arange(nb, device=dev)
    forced = (r[None, :] == 0) | (r[None, :] == r[:, None])
    if threshold is not None:
        keep = probs >= threshold
    else:
        count = torch.ceil(density * (r + 1).double()).long()  # per row
        order = torch.argsort(probs.masked_fill(~causal, -1.0), dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, r.expand_as(order).contiguous())
        keep = rank < count[:, None]
    return (keep | forced) & causal


def keep_to_index(keep: torch.Tensor) -> torch.Tensor:
    """bool [B, H, nb, nb] -> block_idx [B, H, nb, K] int64 (ascending, -1 padding), K the
    largest row count (one host sync)."""
    counts = keep.sum(-1)
    k = max(1, int(counts.max()))
    nb = keep.shape[-1]
    r = torch.arange(nb, device=keep.device)
    # kept block j goes to column (number of kept blocks before it); dropped ones to a spare
    # column k, cut off below (a scatter: linear in nb, no sort)
    col = torch.where(keep, keep.cumsum(-1) - 1, k)
    idx = torch.full((*keep.shape[:-1], k + 1), -1, dtype=torch.long, device=keep.device)
    idx.scatter_(-1, col, r.expand_as(col))
    return idx[..., :k].contiguous()


def select_index(probs: torch.Tensor, threshold: float | None = None, density: float | None = None,
                 fused: bool | None = None) -> torch.Tensor:
    """keep_to_index(keep_blocks(probs, threshold, density)): probs [B, H, nb, nb]
    -> block_idx [B, H, nb, K] int64 (ascending, -1 padding). fused (default: on CUDA): one
    Triton program per row (`kernels.xattn.select_blocks`: threshold, or top-k without a sort)
    instead of torch's masks, argsort (top-k mode), cumsum and scatter; the same blocks."""
    if (threshold is None) == (density is None):
        raise ValueError(f"select_index: expected exactly one of threshold / density, got {threshold!r} / {density!r}")
    if not (probs.is_cuda if fused is None else fused):
        return keep_to_index(keep_blocks(probs, threshold, density))
    from ..kernels import xattn

    b, h, nb, _ = probs.shape
    if threshold is not None:
        return xattn.select_blocks(probs.float(), torch.full((h,), float(threshold), device=probs.device),
                                   "threshold")
    # as keep_blocks (float64), built on the device: no host-to-device copy per call
    counts = torch.ceil(density * torch.arange(1, nb + 1, dtype=torch.float64, device=probs.device)).to(torch.int32)
    return xattn.select_blocks(probs.float(), torch.zeros(h, device=probs.device), "count", counts)


@dataclass
class AdaptiveLayer(Pattern):
    """One layer: gates (the model's `Gates`), layer index, threshold or density."""

    name = "adaptive"
    per_head = True
    gates: Gates = None
    layer: int = 0
    threshold: float | None = None
    density: float | None = None
    dense_tail: int = 0  # the query blocks holding the last dense_tail positions run dense (patch default 64)
    local: object = None  # a LayerGate sliced to a tensor-parallel rank's heads (see `shard`)

    def shard(self, shard) -> "AdaptiveLayer":
        """This layer for the heads `shard` (sparseinfer.parallel.HeadShard) holds: the gate's
        per-head projections sliced to them."""
        return dataclasses.replace(self, local=self.gates.layers[self.layer].sliced(shard.q, shard.kv))

    def select(self, q, k, scale, fused: bool | None = None):
        """fused (default: on CUDA): threshold mode scores, normalises and selects each row in one
        kernel (`kernels.gate.gate_select`: no [B, H, nb, nb] probabilities in memory); otherwise the
        gate's probabilities and `select_index`. Either way the rows come ascending and unique, so
        the index build skips its sort (`sorted_blocks`), and the dense tail's rows go to the op as
        `dense_from` instead of listing every block (the index stays as wide as the widest sparse row)."""
        n = q.shape[2]
        bs = self.gates.block_size
        gate = self.gates.layers[self.layer] if self.local is None else self.local.to(q.device)
        with torch.no_grad():
            qf, kf = self.gates.features(q, k)
            nb = qf.shape[2]
            tail = 0 if self.dense_tail <= 0 else nb - (max(n - self.dense_tail, 0) // bs)
            if self.threshold is not None and (q.is_cuda if fused is None else fused):
                from ..kernels.gate import gate_select

                gq, gk = gate.project(qf, kf)
                idx, counts = gate_select(gq, gk, self.threshold, gate.width ** -0.5)
                strict, diag = counts - 1, torch.ones_like(counts)  # every row keeps its diagonal block
            else:
                idx = select_index(gate(qf, kf).exp(), self.threshold, self.density)
                strict, diag = row_split(idx, sorted_blocks=True)
        kw = {"block_idx": idx, "block_size": bs, "sorted_blocks": True}
        if tail > 0:  # rows from dense_from on: every causal block
            kw["dense_from"] = nb - tail
            r = torch.arange(nb, device=idx.device)
            strict = torch.where(r >= nb - tail, r, strict)
            diag = torch.where(r >= nb - tail, True, diag.bool())
        return [Selection("block_sparse_attention", kw, block_rows_density(n, strict, diag, bs))]


def make_layers(model, options: dict) -> list[AdaptiveLayer]:
    """patch(model, "adaptive", threshold= | density=, gates=path | Gates | None, block_size=,
    dense_tail=)."""
    from ..gate import resolve

    bad = sorted(set(options) - set(OPTIONS))
    if bad:
        raise ValueError(f"patch: unknown option(s) {bad} for method 'adaptive'; expected any of "
                         f"{list(OPTIONS) + ['min_len', 'backend']}")
    threshold, density = options.get("threshold"), options.get("density")
    if threshold is not None and density is not None:
        raise ValueError(f"adaptive: expected threshold= (threshold mode) or density= (top-k mode), not both; "
                         f"got threshold={threshold!r}, density={density!r}")
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"adaptive: density expected a share in (0, 1], got {density!r}")
        density = float(density)
    else:
        threshold = 1e-3 if threshold is None else threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"adaptive: threshold expected a probability in [0, 1], got {threshold!r}")
        threshold = float(threshold)
    tail = options.get("dense_tail", DENSE_TAIL)
    if isinstance(tail, bool) or not isinstance(tail, int) or tail < 0:
        raise ValueError(f"adaptive: dense_tail expected a token count >= 0, got {tail!r}")
    gates = resolve(options.get("gates"), model)
    bs = options.get("block_size")
    if bs is not None and bs != gates.block_size:
        raise GateError(f"adaptive: block_size={bs!r} but the gates were trained with block_size {gates.block_size}")
    return [AdaptiveLayer(gates, i, threshold, density, tail) for i in range(model.config.num_hidden_layers)]

