"""Sparse decode GEMVs for contextual sparsity (TEAL, Deja Vu), batch 1-4 rows.

Torch custom ops (so `torch.compile(mode="reduce-overhead", fullgraph=True)` can capture them;
fake implementations give the shapes):
    sparseinfer::teal_gemv(x [M, K], wt [K, N], threshold 0-d fp32) -> [M, N] (x's dtype)
        = (x * (|x| > threshold)) @ wt; wt row-major ([in, out]: a dropped input channel
        skips one contiguous row). No index tensor, no host sync.
    sparseinfer::dejavu_gateup(x [M, H], wg [I, H], wu [I, H], mask [M, I] bool) -> [M, I]
        = SiLU(x @ wg.T) * (x @ wu.T) on the kept neurons, 0 elsewhere.
CUDA tensors run the compiled Triton kernels (`_gemv_kernel.py`); CPU tensors run the same
kernels under the Triton interpreter (tests). fp32 accumulation.

Model-level helpers: `teal_linear(x [.., K], weight [N, K] (stored column-major), threshold, bias)`
and `dejavu_mlp(x [.., H], w_gate, w_up, w_down (column-major), idx [.., Kn])`.
References (any dtype, float64 included): `teal_gemv_reference`, `dejavu_gateup_reference`.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ._loader import kernel_module


# (BLOCK_K, BLOCK_N, K_ITERS, num_warps) for teal_gemv; (BLOCK_I, BLOCK_H, num_warps) for
# dejavu_gateup. GPU defaults, overridable per call (benchmarks/contextual.py sweeps them).
TEAL_CONFIG = {"cuda": (32, 128, 4, 4), "cpu": (16, 32, 1, 1)}
GATEUP_CONFIG = {"cuda": (16, 128, 4), "cpu": (16, 32, 1)}
MAX_ROWS_PER_PROGRAM = 4


def _block_m(m: int) -> int:
    return 1 if m <= 1 else 2 if m <= 2 else 4


def _check_2d(name: str, t: torch.Tensor, dim: int = 2) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")


def teal_gemv_launch(x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor, config=None) -> torch.Tensor:
    """The kernel call behind the op (no custom-op wrapper): config = (BLOCK_K, BLOCK_N, K_ITERS, num_warps)."""
    _check_2d("teal_gemv: x", x)
    _check_2d("teal_gemv: wt", wt)
    if x.shape[1] != wt.shape[0]:
        raise ValueError(f"teal_gemv: x has {x.shape[1]} input channels, wt [K, N] has K = {wt.shape[0]}")
    if wt.stride(1) != 1:
        raise ValueError(f"teal_gemv: expected wt [K, N] with contiguous rows (stride (N, 1)), got strides {wt.stride()}")
    if threshold.numel() != 1:
        raise ValueError(f"teal_gemv: expected a one-element threshold tensor, got shape {tuple(threshold.shape)}")
    if x.device != wt.device:
        raise ValueError(f"teal_gemv: x on {x.device}, wt on {wt.device}")
    x = x if x.stride(1) == 1 else x.contiguous()
    m, k = x.shape
    n = wt.shape[1]
    bk, bn, kit, warps = config or TEAL_CONFIG["cuda" if x.is_cuda else "cpu"]
    bm = _block_m(m)
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    grid = (triton_cdiv(k, bk * kit), triton_cdiv(n, bn), triton_cdiv(m, bm))
    kernel_module("_gemv_kernel.py", not x.is_cuda).teal_gemv_kernel[grid](
        x, wt, threshold.to(device=x.device, dtype=torch.float32).reshape(1), y, m, k, n,
        x.stride(0), wt.stride(0), y.stride(0), BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, K_ITERS=kit, num_warps=warps)
    return y.to(x.dtype)


def dejavu_gateup_launch(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, mask: torch.Tensor,
                         config=None) -> torch.Tensor:
    """The kernel call behind the op: config = (BLOCK_I, BLOCK_H, num_warps)."""
    for name, t in (("x", x), ("wg", wg), ("wu", wu), ("mask", mask)):
        _check_2d(f"dejavu_gateup: {name}", t)
    if wg.shape != wu.shape or wg.shape[1] != x.shape[1] or mask.shape != (x.shape[0], wg.shape[0]):
        raise ValueError(f"dejavu_gateup: expected x [M, H], wg/wu [I, H], mask [M, I]; got x {tuple(x.shape)}, "
                         f"wg {tuple(wg.shape)}, wu {tuple(wu.shape)}, mask {tuple(mask.shape)}")
    if wg.stride(1) != 1 or wu.stride() != wg.stride():
        raise ValueError(f"dejavu_gateup: expected row-major wg/wu with equal strides, got {wg.stride()}, {wu.stride()}")
    x = x if x.stride(1) == 1 else x.contiguous()
    mask = mask.to(torch.int8).contiguous()
    m, hid = x.shape
    i = wg.shape[0]
    bi, bh, warps = config or GATEUP_CONFIG["cuda" if x.is_cuda else "cpu"]
    bm = _block_m(m)
    out = torch.empty(m, i, dtype=x.dtype, device=x.device)
    grid = (triton_cdiv(i, bi), triton_cdiv(m, bm))
    kernel_module("_gemv_kernel.py", not x.is_cuda).dejavu_gateup_kernel[grid](
        x, wg, wu, mask, out, m, i, hid, x.stride(0), wg.stride(0), mask.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_I=bi, BLOCK_H=bh, num_warps=warps)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@torch.library.custom_op("sparseinfer::teal_gemv", mutates_args=())
def teal_gemv(x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return teal_gemv_launch(x, wt, threshold)


@teal_gemv.register_fake
def _teal_gemv_fake(x, wt, threshold):
    return x.new_empty(x.shape[0], wt.shape[1])


@torch.library.custom_op("sparseinfer::dejavu_gateup", mutates_args=())
def dejavu_gateup(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return dejavu_gateup_launch(x, wg, wu, mask)


@dejavu_gateup.register_fake
def _dejavu_gateup_fake(x, wg, wu, mask):
    return x.new_empty(x.shape[0], wg.shape[0])


def teal_gemv_reference(x: torch.Tensor, wt: torch.Tensor, threshold) -> torch.Tensor:
    """(x * (|x| > threshold)) @ wt in x's dtype (pass float64 tensors for an exact reference)."""
    return torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype)) @ wt.to(x.dtype)


def dejavu_gateup_reference(x, wg, wu, mask) -> torch.Tensor:
    h = F.silu(x @ wg.to(x.dtype).T) * (x @ wu.to(x.dtype).T)
    return h * mask.to(h.dtype)


def teal_linear(x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor, bias=None) -> torch.Tensor:
    """F.linear(x * (|x| > threshold), weight, bias) through the kernel. x [.., K], weight [N, K]
    stored column-major (weight.t() contiguous; see contextual.patching._transpose_storage)."""
    shp = x.shape
    y = teal_gemv(x.reshape(-1, shp[-1]), weight.t(), threshold).reshape(*shp[:-1], weight.shape[0])
    return y if bias is None else y + bias


def dejavu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
               idx: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP over the neurons idx [.., Kn] of each row: x [.., H] -> [.., H]. w_gate / w_up
    [I, H] row-major, w_down [H, I] stored column-major (w_down.t() [I, H] contiguous)."""
    shp = x.shape
    x2 = x.reshape(-1, shp[-1])
    mask = torch.zeros(x2.shape[0], w_gate.shape[0], dtype=torch.bool, device=x.device)
    mask.scatter_(1, idx.reshape(x2.shape[0], -1), True)
    h = dejavu_gateup(x2, w_gate, w_up, mask)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    return teal_gemv(h, w_down.t(), zero).reshape(shp)
