"""MInference: each head gets its own pattern and budget from an offline-searched config
(`sparseinfer.config`); indices are still estimated online per input.

A-shape heads are written as vertical-slash indices (the first `sink` keys as verticals,
offsets 0..window-1 as slashes: the same cells), so one layer needs at most two ops:
vertical-slash for A-shape and vertical-slash heads, block-sparse for block-sparse heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..index import device_tensor
from . import block_sparse as bs
from . import vertical_slash as vs
from .base import Pattern, Selection, resolve_budget


@dataclass
class MInferenceLayer(Pattern):
    """heads: one config entry per query head (see sparseinfer.config)."""

    name = "minference"
    per_head = True
    heads: list = None
    last_q: int = 64

    def shard(self, shard) -> "MInferenceLayer":
        """The config entries of the query heads `shard.q` (a tensor-parallel rank's heads)."""
        return MInferenceLayer(self.heads[shard.q.start:shard.q.stop], self.last_q)

    def _counts(self, key: str, kinds: tuple[str, ...], n: int) -> list[int]:
        return [resolve_budget(key, h[key], n) if h["pattern"] in kinds else 0 for h in self.heads]

    def select(self, q, k, scale):
        b, hq, n, _ = q.shape
        if len(self.heads) != hq:
            raise ValueError(f"minference: config has {len(self.heads)} heads for this layer, the call has {hq}")
        dev = q.device
        kinds = [h["pattern"] for h in self.heads]
        parts = []
        vs_heads = [kd != "block_sparse" for kd in kinds]
        if any(vs_heads):
            is_as = device_tensor([kd == "ashape" for kd in kinds], dev)[None, :, None]
            nv = [max(a, c) for a, c in zip(self._counts("vertical", ("vertical_slash",), n), self._counts("sink", ("ashape",), n))]
            ns = [max(a, c) for a, c in zip(self._counts("slash", ("vertical_slash",), n), self._counts("window", ("ashape",), n))]
            NV, NS = max(1, max(nv)), max(1, max(ns))
            if "vertical_slash" in kinds:
                v_idx, s_idx = vs.estimate(q, k, NV, NS, self.last_q, scale)
            else:
                v_idx = torch.zeros(b, hq, NV, dtype=torch.long, device=dev)
                s_idx = torch.zeros(b, hq, NS, dtype=torch.long, device=dev)
            ar_v, ar_s = torch.arange(NV, device=dev), torch.arange(NS, device=dev)
            v_idx = torch.where(is_as, ar_v, v_idx)  # A-shape: keys 0..sink-1
            s_idx = torch.where(is_as, ar_s, s_idx)  # A-shape: offsets 0..window-1
            v_idx = torch.where(ar_v < device_tensor(nv, dev)[None, :, None], v_idx, -1)
            s_idx = torch.where(ar_s < device_tensor(ns, dev)[None, :, None], s_idx, -1)
            heads = device_tensor(vs_heads, dev)
            v_idx = torch.where(heads[None, :, None], v_idx, -1)
            s_idx = torch.where(heads[None, :, None], s_idx, -1)
            dens = vs.vertical_slash_density(n, v_idx, s_idx)
            parts.append(Selection("vertical_slash_attention", {"vertical_idx": v_idx, "slash_idx": s_idx}, dens, heads))
        if "block_sparse" in kinds:
            sizes = {h["block_size"] for h in self.heads if h["pattern"] == "block_sparse"}
            if len(sizes) != 1:
                raise ValueError(f"minference: block-sparse heads of one layer need one block_size, got {sorted(sizes)}")
            size = sizes.pop()
            nb = math.ceil(n / size)
            kk = self._counts("topk", ("block_sparse",), nb)
            # heads with budgets below the widest keep the first entries of their rows: rows by score
            cut = len({c for c, kd in zip(kk, kinds) if kd == "block_sparse"}) > 1
            idx = bs.estimate(q, k, max(1, max(kk)), size, scale, by_score=cut)
            heads = device_tensor([kd == "block_sparse" for kd in kinds], dev)
            keep = torch.arange(idx.shape[-1], device=dev) < device_tensor(kk, dev)[:, None, None]
            idx = torch.where(keep[None] & heads[None, :, None, None], idx, -1)
            dens = bs.block_sparse_density(n, idx, size)
            parts.append(Selection("block_sparse_attention", {"block_idx": idx, "block_size": size}, dens, heads))
        return parts
