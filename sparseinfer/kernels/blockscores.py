"""Pooled block scores for block-sparse estimation, lower triangle only, as one Triton kernel.

    causal_block_scores(qp [B, Hq, nb, D] float32, kp [B, Hkv, nb, D] float32)
        -> S [B, Hq, nb, nb] float32 with S[b, h, i, j] = qp[b, h, i] . kp[b, h // (Hq / Hkv), j]
           for the tiles holding a cell j <= i; cells of tiles wholly above the diagonal are left
           unwritten (their values are undefined: read S only where j <= i)

What `patterns.block_sparse.estimate` ranks on CUDA: the causal top-k (`kernels.topk`, causal=True)
reads only j <= i, so half of the [nb, nb] products (cuBLAS computes all) are not computed. On
CUDA the products run on tensor cores in "tf32x3" (three TF32 products: float32-level error, not
bit-equal to a float32 GEMM, so near-equal scores may rank differently), under the interpreter
(CPU tensors, tests) in float32.
"""
from __future__ import annotations

import torch
import triton

from ._loader import kernel_module

# (row tile, column tile, warps) on CUDA and under the interpreter
CONFIG = {"cuda": (64, 64, 4), "cpu": (32, 32, 4)}
PREC = {"cuda": "tf32x3", "cpu": "ieee"}


def causal_block_scores(qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    if qp.dim() != 4 or kp.dim() != 4 or qp.dtype != torch.float32 or kp.dtype != torch.float32:
        raise ValueError(f"causal_block_scores: expected float32 qp [B, Hq, nb, D] and kp [B, Hkv, nb, D], got "
                         f"{qp.dtype} {tuple(qp.shape)} and {kp.dtype} {tuple(kp.shape)}")
    b, hq, nb, d = qp.shape
    if kp.shape[0] != b or kp.shape[2:] != (nb, d) or hq % kp.shape[1] or d < 16 or d & (d - 1):
        raise ValueError(f"causal_block_scores: kp must be [{b}, Hkv, {nb}, {d}] with Hkv dividing {hq} and D a "
                         f"power of 2 >= 16, got qp {tuple(qp.shape)}, kp {tuple(kp.shape)}")
    qp = qp if qp.stride(-1) == 1 else qp.contiguous()
    kp = kp if kp.stride(-1) == 1 else kp.contiguous()
    s = torch.empty(b, hq, nb, nb, dtype=torch.float32, device=qp.device)
    if s.numel() == 0:
        return s
    where = "cuda" if qp.is_cuda else "cpu"
    bm, bn, warps = CONFIG[where]
    kernel_module("_blockscores_kernel.py", not qp.is_cuda).causal_scores_kernel[
        (b * hq, triton.cdiv(nb, bm), triton.cdiv(nb, bn))](
        qp, kp, s, nb, hq, hq // kp.shape[1],
        qp.stride(0), qp.stride(1), qp.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
        s.stride(0), s.stride(1), s.stride(2),
        D=d, BM=bm, BN=bn, PREC=PREC[where], num_warps=warps)
    return s
