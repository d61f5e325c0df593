"""Launchers of the RaaS bookkeeping kernels (``_raas_kernel.py``): one launch each instead of
the ~20 small torch ops per step of ``RaaSLayer``'s reference path; static shapes, no host sync
(CUDA-graph capturable). CUDA tensors run compiled kernels, CPU tensors the interpreter.

    raas_update(k, v, gk, gv, ts, fill, cur, gmin, gmax, gvalid, step)    (all updated in place)
        k / v [B, H, 1, D] the new token; gk / gv [B, H, S * PS, D]; ts [B, H, S] fp32;
        fill [B, H, S] int64; cur [B, H] int64; gmin / gmax [B, H, S, D] (contiguous, any float);
        gvalid [B, H, S * PS] bool (contiguous); step 0-d int64 (tokens generated before this one).
    raas_select(bound, ts, step, n_refresh, n_select) -> [B, H, n_select] int32
        bound [B, H, S] fp32 page scores (current page +inf, free slots -inf); refreshes the
        timestamps of the n_refresh best slots in place; the n_select best slot ids, -1-padded.
"""
from __future__ import annotations

import torch

from ._loader import kernel_module
from .decode import _next_pow2 as _p2


def raas_update(k, v, gk, gv, ts, fill, cur, gmin, gmax, gvalid, step) -> None:
    b, h, s = ts.shape
    d = k.shape[-1]
    ps = gk.shape[2] // s
    for name, t in (("ts", ts), ("fill", fill), ("cur", cur), ("gmin", gmin), ("gmax", gmax), ("gvalid", gvalid)):
        if not t.is_contiguous():
            raise ValueError(f"raas_update: {name} must be contiguous, got strides {t.stride()}")
    if gk.stride() != gv.stride() or gk.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"raas_update: expected unit-stride head dims and equal gk/gv strides, got "
                         f"k {k.stride()}, v {v.stride()}, gk {gk.stride()}, gv {gv.stride()}")
    kernel_module("_raas_kernel.py", not k.is_cuda).raas_update_kernel[(b * h,)](
        k, v, gk, gv, ts, fill, cur, gmin, gmax, gvalid.view(torch.uint8), step,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), gk.stride(0), gk.stride(1), gk.stride(2),
        s, H=h, S_P2=_p2(s), PS=ps, PS_P2=_p2(ps), HEAD_D=d, num_warps=1 if d <= 64 else 2)


def raas_select(bound, ts, step, n_refresh: int, n_select: int) -> torch.Tensor:
    b, h, s = bound.shape
    if not (bound.is_contiguous() and ts.is_contiguous()) or ts.shape != bound.shape:
        raise ValueError(f"raas_select: expected contiguous bound and ts of one shape, got {tuple(bound.shape)} "
                         f"and {tuple(ts.shape)}")
    if bound.dtype != torch.float32:
        raise ValueError(f"raas_select: expected float32 scores, got {bound.dtype}")
    sel = torch.empty(b, h, n_select, dtype=torch.int32, device=bound.device)
    sp2 = _p2(s)
    kernel_module("_raas_kernel.py", not bound.is_cuda).raas_select_kernel[(b * h,)](
        bound, ts, sel, step, s, NREF=n_refresh, NSEL=n_select, S_P2=sp2, num_warps=1 if sp2 <= 1024 else 4)
    return sel
