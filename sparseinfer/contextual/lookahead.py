"""Deja Vu look-ahead: a layer's MLP neuron selection computed off the critical path.

With predictors trained on the layer's attention input (`train-predictors --source attn_in`),
the MLP's neuron list is known before the attention runs. `select_begin` forks to a side CUDA
stream as soon as that input exists (the input_layernorm output) and runs the predictor and the
top-K selection there, overlapping q/k/v, the attention and o_proj; the MLP's kernel op waits
for the side stream (the join) right before it reads the list.

    sparseinfer::select_begin(x [R, H], A [r, H], B, b, k, block) -> idx [R, k] int32
        the positions (ascending) of the k neurons the predictor keeps per row (B [I, r], b [I]:
        scores (x A^T) B^T + b; B [2I, r], b None: |SiLU(g~) * u~| of [g~ | u~] = (x A^T) B^T) by
        `dejavu.blocked_top_mask` (block 0: one global top-k), computed on the device's side
        stream (CUDA: kernels.predict, or the scores + kernels.topk for block 0); CPU tensors
        compute inline.
    sparseinfer::dejavu_mlp_joined(x [1, H], wg, wu, wd_t, idx, src) -> [1, H]
        the join, then `kernels.gemv.dejavu_mlp_rows` over the list; src = select_begin's x
        (read by nothing here: it keeps that buffer alive up to the join, see below).

Both are torch custom ops: torch.compile keeps them opaque (in order once `keep_inductor_order`
has turned inductor's locality pass off, which `attach` does while look-ahead is on), and a CUDA graph
captures the fork and the join as event dependencies (the side stream joins the capture through
an event recorded on the capturing stream and is joined back by the wait). The side stream reads
select_begin's x in place; the join op takes that x as an input, so a compiled graph cannot reuse
its buffer before the join (eagerly, x and the list stay referenced here until the join). An
earlier version copied x on the calling stream before the fork instead: one more kernel per layer
on the critical path (H100, captured compiled 32-layer Llama-3.1-8B step, PDL on: 5.160 ms with
the copy, 5.110 ms without; benchmarks/results/contextual/).
"""
from __future__ import annotations

import torch

from ..kernels.streams import existing_side_stream, side_stream
from .dejavu import LayerPredictor, blocked_top_indices

_held: dict[int, list] = {}  # device -> tensors the side stream reads, kept until the join


@torch.library.custom_op("sparseinfer::select_begin", mutates_args=())
def select_begin(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, b: torch.Tensor | None, k: int,
                 block: int) -> torch.Tensor:
    from ..kernels.predict import _launch as fused_select
    from ..kernels.topk import topk_indices_launch

    if x.dim() != 2 or A.shape[1] != x.shape[1] or B.shape[1] != A.shape[0] or (
            b is not None and b.shape != (B.shape[0],)) or (b is None and B.shape[0] % 2):
        raise ValueError(f"select_begin: expected x [R, H], A [r, H], B [I, r] with b [I] (linear) or B [2I, r] "
                         f"with b None (glu), got {tuple(x.shape)}, {tuple(A.shape)}, {tuple(B.shape)}, "
                         f"{None if b is None else tuple(b.shape)}")

    scores = LayerPredictor(A, B, b).mlp_scores  # b None: the glu kind

    if not x.is_cuda:
        return blocked_top_indices(scores(x), k, block or None)
    out = torch.empty(x.shape[0], k, dtype=torch.int32, device=x.device)
    main = torch.cuda.current_stream(x.device)
    side = side_stream(x.device)
    fork = torch.cuda.Event()
    fork.record(main)
    side.wait_event(fork)
    with torch.cuda.stream(side):
        if block:
            fused_select(x, A, B, b, k, block, out=out)
        else:
            topk_indices_launch(scores(x), k, out=out)
    _held.setdefault(side.device.index, []).extend((x, out))
    return out


@select_begin.register_fake
def _select_begin_fake(x, A, B, b, k, block):
    return x.new_empty(x.shape[0], k, dtype=torch.int32)


@torch.library.custom_op("sparseinfer::dejavu_mlp_joined", mutates_args=())
def dejavu_mlp_joined(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd_t: torch.Tensor,
                      idx: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
    """The calling stream waits for the side stream (every selection begun so far), then the
    listed-neurons MLP of one row (kernels.gemv.dejavu_mlp_rows_launch). src (select_begin's x) is
    not read: as an input of this op its buffer stays unreused until the join."""
    from ..kernels.gemv import dejavu_mlp_rows_launch

    if x.is_cuda:
        dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
        side = existing_side_stream(x.device)
        if side is not None:
            torch.cuda.current_stream(x.device).wait_stream(side)
        _held.pop(dev, None)
    return dejavu_mlp_rows_launch(x, wg, wu, wd_t, idx.reshape(-1))


@dejavu_mlp_joined.register_fake
def _dejavu_mlp_joined_fake(x, wg, wu, wd_t, idx, src=None):
    return x.new_empty(1, x.shape[1])


def keep_inductor_order() -> tuple | None:
    """torch.compile: inductor's locality pass (`torch._inductor.config.reorder_for_locality`)
    moves an op right before its first user, which puts the fork next to the MLP and leaves
    nothing to overlap (H100, 8B layer, compiled + captured: 0.1925 ms with the pass, 0.1540 ms
    without; the dense step 0.2087 vs 0.2093 ms). Turns the pass off; returns (config module,
    previous value) for restoring, or None where inductor is missing. The order never changes
    the result (the MLP's op waits for the side stream)."""
    try:
        import torch._inductor.config as icfg
    except Exception:  # pragma: no cover - torch without inductor
        return None
    prev = icfg.reorder_for_locality
    icfg.reorder_for_locality = False
    return icfg, prev


def pending() -> int:
    """Devices with a selection begun and not joined (0 after every complete forward)."""
    return len(_held)
