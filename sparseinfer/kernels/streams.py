"""Per-device side streams for work that overlaps other kernels (index construction under the
vertical-slash band launch, Deja Vu's look-ahead selection under a layer's attention)."""
from __future__ import annotations

import torch

_STREAMS: dict = {}


def side_stream(device: torch.device, priority: int = 0) -> torch.cuda.Stream:
    """One cached stream per (CUDA device, priority); priority < 0 is higher than the default
    stream's (the block scheduler prefers its kernels)."""
    device = torch.device(device)
    i = device.index if device.index is not None else torch.cuda.current_device()
    key = (i, priority)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device=torch.device("cuda", i), priority=priority)
    return _STREAMS[key]


def existing_side_stream(device: torch.device, priority: int = 0) -> torch.cuda.Stream | None:
    """The stream `side_stream` returns, if it was created already (no stream is created: safe
    inside a graph capture); None otherwise."""
    device = torch.device(device)
    i = device.index if device.index is not None else torch.cuda.current_device()
    return _STREAMS.get((i, priority))
