"""Tensor parallelism: which query / KV heads this rank holds, and per-head state sliced to them.

transformers' tensor parallelism (`from_pretrained(..., tp_plan="auto")` under `torchrun`)
splits q/k/v projections column-wise: rank r of a TP group of size W holds the contiguous
query heads [r * Hq / W, (r + 1) * Hq / W) and KV heads [r * Hkv / W, (r + 1) * Hkv / W),
so the attention function sees only its rank's heads ([B, Hq / W, N, D]). Sparse attention
and its index estimation are per head, so they need no communication; only per-head state
(a searched config, trained gates) must be sliced to the local heads, which
`Pattern.shard(heads)` does.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadShard:
    """The heads one rank holds. q: range of global query heads; kv: of global KV heads."""

    rank: int
    size: int
    q: range
    kv: range


def tp_rank_size(model) -> tuple[int, int]:
    """(rank within the tensor-parallel group, group size) of a transformers model; (0, 1)
    when the model is not sharded."""
    size = getattr(model, "tp_size", None) or 1
    if size <= 1:
        return 0, 1
    mesh = getattr(model, "_device_mesh", None)
    if mesh is not None:
        names = getattr(mesh, "mesh_dim_names", None) or ()
        if "tp" in names:
            return mesh["tp"].get_local_rank(), size
        if mesh.ndim == 1:
            return mesh.get_local_rank(), size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == size:
        return dist.get_rank(), size
    raise ValueError(
        f"sparseinfer: the model is tensor-parallel (tp_size={size}) but its rank in the TP group "
        f"could not be found (no 'tp' device mesh, world size != tp_size); expected a model loaded "
        f"with from_pretrained(..., tp_plan='auto') under torchrun"
    )


def head_shard(model, config=None) -> HeadShard | None:
    """The query / KV heads this rank holds, or None for an unsharded model. config: the
    attention's config when it is not `model.config` (a VLM's text config).

    Raises ValueError when the head counts do not divide by the TP size (sharded per-head
    state could not be mapped to whole heads and GQA groups)."""
    rank, size = tp_rank_size(model)
    if size == 1:
        return None
    cfg = config if config is not None else model.config
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    if hq % size or hkv % size:
        raise ValueError(
            f"sparseinfer: tensor parallelism over {size} ranks needs query and KV head counts divisible "
            f"by {size}; the model has {hq} query / {hkv} KV heads"
        )
    lq, lkv = hq // size, hkv // size
    return HeadShard(rank, size, range(rank * lq, (rank + 1) * lq), range(rank * lkv, (rank + 1) * lkv))
