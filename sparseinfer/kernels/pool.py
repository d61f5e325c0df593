"""Fused RoPE undo + block pooling (the learned gate's features) as one Triton kernel.

    unrotate_pool(x [B, H, N, D], cos [B|1, N, D], sin [B|1, N, D], block_size, pooling)
        -> [B, H, ceil(N / block_size), len(pooling) * D] float32

= ``gate.pool_blocks(gate.unrotate(x, cos, sin), block_size, pooling)`` computed in float32
in one read of x (the torch path makes several passes over [B, H, N, D]). CUDA tensors run
the compiled kernel, CPU tensors the same kernel under the Triton interpreter (tests).
``supported(x, cos)`` says whether the shapes fit (rotary over all of D, D a power of 2 >= 16,
block_size <= 1024); callers fall back to the torch path otherwise.
"""
from __future__ import annotations

import math

import torch
import triton

from ._loader import kernel_module

_NAMES = ("avg", "max", "min")
# (rows per step, warps, pipeline stages, heads per program) on CUDA, and under the interpreter
CONFIG = {"cuda": (2, 2, 3, 8), "cpu": (16, 4, 1, 4)}


def supported(x: torch.Tensor, cos: torch.Tensor, block_size: int) -> bool:
    d = x.shape[-1]
    return (x.dim() == 4 and cos.shape[-1] == d and d >= 16 and d & (d - 1) == 0 and 0 < block_size <= 1024
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32))


def unrotate_pool(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_size: int,
                  pooling: tuple[str, ...]) -> torch.Tensor:
    if not supported(x, cos, block_size):
        raise ValueError(f"unrotate_pool: expected x [B, H, N, D] (D a power of 2 >= 16, fp16/bf16/fp32) with "
                         f"cos/sin [B|1, N, D] and 0 < block_size <= 1024; got x {tuple(x.shape)} {x.dtype}, "
                         f"cos {tuple(cos.shape)}, block_size {block_size}")
    bad = [p for p in pooling if p not in _NAMES]
    if bad or not pooling:
        raise ValueError(f"unrotate_pool: pooling must be names from {_NAMES}, got {pooling!r}")
    b, h, n, d = x.shape
    if cos.shape[-2] != n or sin.shape != cos.shape or cos.shape[0] not in (1, b):
        raise ValueError(f"unrotate_pool: cos/sin must be [{b} or 1, {n}, {d}], got {tuple(cos.shape)} / {tuple(sin.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos.float().contiguous()
    sin = sin.float().contiguous()
    nb = math.ceil(n / block_size)
    out = torch.empty(b, h, nb, len(pooling) * d, dtype=torch.float32, device=x.device)
    at = {p: (pooling.index(p) if p in pooling else -1) for p in _NAMES}
    mod = kernel_module("_pool_kernel.py", x.device.type != "cuda")
    block = triton.next_power_of_2(block_size)
    rows, warps, stages, hg = CONFIG["cuda" if x.is_cuda else "cpu"]
    hg = min(hg, triton.next_power_of_2(h))
    mod.unrotate_pool_kernel[(b * triton.cdiv(h, hg), nb)](
        x, cos, sin, out,
        x.stride(0), x.stride(1), x.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        n, h, block_size,
        BLOCK=block, HALF=d // 2, ROWS=min(rows, block), STAGES=stages, HG=hg,
        AVG_AT=at["avg"], MAX_AT=at["max"], MIN_AT=at["min"],
        num_warps=warps,
    )
    return out
