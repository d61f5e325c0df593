"""Index construction replayed from a CUDA graph.

Building a vertical-slash `SparseIndex` is ~250 small torch launches (sorts, searchsorted,
scatters): on an H100 the GPU needs ~1.4 ms for them but the host ~3-6 ms to launch them
(128K-512K, `benchmarks/profile_index.py`), so a pre-filling call that follows a host sync
(the density guard's decision, a fresh prompt) waits for the host. The construction has fixed
shapes and no host synchronisation, so it can be captured once per input signature and replayed
as one launch:

    build_graphed(key, build, inputs) -> build(*inputs)

key: hashable, must determine every shape and constant of the construction (the inputs' shapes,
dtypes and device are added); build: a function of CUDA tensors returning tensors or a
dataclass of tensors / ints; inputs: CUDA tensors. The first call per key runs build eagerly
(warm-up) and captures it (one device synchronisation); later calls copy the inputs into the
graph's static buffers and replay. The result's tensors are the graph's static outputs: valid
until the next call with the same key on any stream, which is what a launcher that consumes
them at once (same stream) needs. At most `MAX_GRAPHS` signatures are kept (least recently
used dropped); a signature whose capture fails is built eagerly from then on.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

MAX_GRAPHS = 16
_GRAPHS: "OrderedDict[tuple, tuple | None]" = OrderedDict()


def build_graphed(key, build, inputs: tuple):
    """See the module docstring."""
    if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs) or torch.cuda.is_current_stream_capturing():
        return build(*inputs)  # CPU tensors, or inside the caller's own graph capture: plain launches
    full = (key, tuple((tuple(t.shape), t.dtype, t.device) for t in inputs))
    with torch.cuda.device(inputs[0].device):
        entry = _GRAPHS.get(full, ())
        if entry == ():
            entry = _capture(build, inputs)
            _GRAPHS[full] = entry
            while len(_GRAPHS) > MAX_GRAPHS:
                _GRAPHS.popitem(last=False)
        else:
            _GRAPHS.move_to_end(full)
        if entry is None:  # not capturable: eager
            return build(*inputs)
        graph, static, out = entry
        for s, t in zip(static, inputs):
            s.copy_(t)
        graph.replay()
        return out


def _capture(build, inputs):
    static = tuple(t.clone() for t in inputs)
    side = torch.cuda.Stream(device=inputs[0].device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: allocator and library workspaces
        build(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = build(*static)
    except Exception:  # an op that cannot be captured: build eagerly from now on
        torch.cuda.synchronize()
        return None
    return graph, static, out


def clear() -> None:
    """Drop every captured graph (frees their memory pools once unreferenced)."""
    _GRAPHS.clear()
