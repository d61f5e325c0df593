"""Column and diagonal sums of the estimating queries' softmax, fused (two Triton kernels).

    query_sums(q [B, Hq, N, D], k [B, Hkv, N, D], pos [B, G * L] int, weight [B, G * L] float,
               groups G, scale) -> (col [B, G, Hq, N], diag [B, G, Hq, N]) float32
        the scores of the queries at pos (one matmul, see matmul_f32), then lastq_sums;
    lastq_sums(s [B, H, G * L, N] float32 logits (times scale) of the queries at pos [B, G * L]
               (int), weight [B, G * L] float, groups G, scale=1.0, diag=True)
        -> (col [B, G, H, N], diag [B, G, H, N] or None)

with p = softmax(scale * s masked to keys <= pos) row by row, col[b, g, h, j] = sum_t w_t p[t, j] and
diag[b, g, h, o] = sum_t w_t p[t, pos_t - o] over the L rows t of group g. The torch path
(softmax, weighted sums, a gather for the diagonals) makes ~6 passes over the [B, H, G*L, N]
scores; this reads them twice (a logsumexp kernel over each row's causal keys, then the sums),
with no masked copy. CUDA tensors run the compiled kernels, CPU tensors the same kernels under
the Triton interpreter (tests).
"""
from __future__ import annotations

import torch
import triton

from ._loader import kernel_module


def matmul_f32(a: torch.Tensor, b: torch.Tensor, tf32: bool = False) -> torch.Tensor:
    """a [..., M, K] @ b [..., K, N] in float32 (same leading dims). bf16 / fp16 pairs on CUDA
    run on the half-precision tensor cores with a float32 output (`torch.bmm(out_dtype=)`:
    products of half-precision values are exact in float32, as with TF32 operands, at twice
    TF32's rate and without float32 copies of the inputs); where that overload is missing, as
    TF32 (a TF32 operand holds every bf16 / fp16 value). float32 inputs run as float32
    (tf32=True: as TF32, for float32 operands that hold half-precision values or need no more)."""
    half = a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype
    if half and _OUT_DTYPE[0]:
        lead = a.shape[:-2]
        try:
            out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
            return out.reshape(*lead, a.shape[-2], b.shape[-1])
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):  # torch without the out_dtype overload (or this dtype pair)
            _OUT_DTYPE[0] = False
    if not (half or (a.is_cuda and tf32)):
        return torch.matmul(a.float(), b.float())
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return torch.matmul(a.float(), b.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


_OUT_DTYPE = [True]  # torch.bmm(..., out_dtype=torch.float32) works here (cleared on the first failure)


def query_sums(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, groups: int, scale: float):
    """See the module docstring (GQA: query heads grouped per KV head, K never repeated)."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    gl = pos.shape[-1]
    qs = q.gather(2, pos[:, None, :, None].expand(b, hq, gl, d))
    s = matmul_f32(qs.reshape(b, hkv, hq // hkv * gl, d), k.transpose(-1, -2)).reshape(b, hq, gl, n)
    return lastq_sums(s, pos, weight, groups, scale)


def lastq_sums(s: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, groups: int, scale: float = 1.0,
               diag: bool = True):
    b, h, gl, n = s.shape
    if s.dtype != torch.float32 or s.stride(-1) != 1 or gl % groups or tuple(pos.shape) != (b, gl) \
            or tuple(weight.shape) != (b, gl):
        raise ValueError(f"lastq_sums: expected float32 s [B, H, G*L, N] (last dim contiguous), pos / weight "
                         f"[B, G*L]; got s {s.dtype} {tuple(s.shape)}, pos {tuple(pos.shape)}, "
                         f"weight {tuple(weight.shape)}, groups {groups}")
    pos = pos.to(torch.int64).contiguous()
    weight = weight.float().contiguous()
    mod = kernel_module("_lastq_kernel.py", not s.is_cuda)
    lse = torch.empty(b, h, gl, dtype=torch.float32, device=s.device)
    mod.lastq_lse_kernel[(b * h * gl,)](
        s, pos, lse, s.stride(0), s.stride(1), s.stride(2), h, gl, float(scale),
        BLOCK=2048 if s.is_cuda else 256, num_warps=4,
    )
    col = torch.empty(b, groups, h, n, dtype=torch.float32, device=s.device)
    dg = torch.empty_like(col) if diag else col  # diag=False: the kernel never touches it
    block = 1024 if s.is_cuda else 256
    mod.lastq_sums_kernel[(b * h * groups, triton.cdiv(n, block))](
        s, lse, pos, weight, col, dg,
        s.stride(0), s.stride(1), s.stride(2),
        n, h, groups, gl // groups, float(scale),
        BLOCK=block, WITH_DIAG=diag, num_warps=4,
    )
    return col, (dg if diag else None)
