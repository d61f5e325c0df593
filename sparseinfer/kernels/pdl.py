"""Programmatic dependent launch (PDL, Hopper and newer) of our decode kernels: its switches and launch keywords.

With PDL a kernel is launched while the kernel before it on the stream is still running: its
programs become resident as the previous kernel's last programs start, wait there
(`griddepcontrol.wait`, before any load of a previous kernel's output and before any store)
and run the moment it completes, so each small decode kernel's launch latency overlaps the
tail of the one before. CUDA graphs keep the dependency; our kernels compute bitwise the same.

It pays when the kernels around ours take part too: torch.compile's with
`TORCHINDUCTOR_ENABLE_PDL=1` (cuBLAS's take part on their own). That variable, set before
torch is imported, turns ours on as well; `SPARSEINFER_PDL=0/1` overrides it for ours, and
`ENABLED` can be set before the first launch. Captured, compiled Llama-3.1-8B step on an H100
(4K context): dense 6.99 -> 6.62 ms, TEAL all projections 50% 4.43 -> 4.25 ms
(benchmarks/results/contextual/pdl_step.md). Deja Vu's launches gain from PDL by themselves, so they
take part whatever `ENABLED` says, each family by its own switch here: `DEJAVU_ROWS`, `DEJAVU_SELECT`.

A kernel taking part has a `PDL: tl.constexpr` argument; `kwargs(t)` gives it and the launch option;
`level(t, value)` gives a Deja Vu switch's value where PDL exists (CUDA, compute capability >= 9), else 0.
"""
from __future__ import annotations

import functools
import os

import torch


def enabled_from(env) -> bool:
    """PDL for our kernels from an environment mapping: SPARSEINFER_PDL if set, else
    TORCHINDUCTOR_ENABLE_PDL ("1": on)."""
    return env.get("SPARSEINFER_PDL", env.get("TORCHINDUCTOR_ENABLE_PDL", "0")) == "1"


ENABLED = enabled_from(os.environ)
# Deja Vu's listed-neurons MLP: its gate/up launch starts while the selection ends and waits for the list
# (8B MLP + fused predictor, H100: 79.5 vs 80.7 us; the down launch too: 99 us, its early programs hold SMs
# the multi-wave gate/up launch needs; benchmarks/results/contextual/contextual_predictor.md)
DEJAVU_ROWS = True
# Deja Vu's fused predictor + selection (kernels.predict): 0 off; 1 = the score launch starts during x A^T
# and prefetches its B rows; 2 = and lets the next launch (the MLP's, launched with PDL) start early too
DEJAVU_SELECT = 2


@functools.lru_cache(maxsize=8)
def hopper(device: torch.device) -> bool:
    """sm_90 or later (TMA descriptors, programmatic dependent launch); cached per device."""
    return torch.cuda.get_device_capability(device)[0] >= 9


def level(t: torch.Tensor, value) -> int:
    """int(value) (a switch's value: bool or level) for launches over tensors on t's device where PDL
    exists (a CUDA GPU of compute capability >= 9), else 0."""
    return int(value) if t.is_cuda and hopper(t.device) else 0


def kwargs(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel over tensors on t's device: {"PDL": bool} and, when PDL is
    on and the device is a CUDA GPU of compute capability >= 9, {"launch_pdl": True}."""
    if ENABLED and t.is_cuda and hopper(t.device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
