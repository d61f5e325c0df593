"""XAttention's estimation on the GPU (Triton kernels in `_xattn_kernel.py`):

    scores_block_mass(s [G, B, Hkv, R, K] strided scores of R query groups from r0, out, r0,
                      g_valid, gpb, scale): out[b, h, r0 / gpb + i, c] = sum over the gpb query
        groups of query block i and the gpb key groups of block c of the causal softmax of
        scale * s over key groups j <= query group, j < g_valid (groups past the input weigh 0;
        rows not normalised); one read of the (half-precision) scores instead of the float32
        scores and two passes of `kernels.lastq`;
    select_blocks(mass [B, Hq, nb, nb], tau [Hq], rule) -> block_idx [B, Hq, nb, K]: the per-row
        threshold of `patterns.xattention.threshold_rows` (or the learned gate's threshold /
        top-k rules) plus the sink and diagonal blocks, compacted (no sort, one program per row).

CUDA tensors run the compiled kernels, CPU tensors the same kernels under the Triton
interpreter (tests).
"""
from __future__ import annotations

import math

import torch
import triton

from ._loader import kernel_module

# xattn_scores_mass_kernel on CUDA: (key groups per step, query blocks per program, num_warps, stages)
# (benchmarks/NOTES_kernels.md: 1.08 ms vs 1.12 ms for (256, 1, 4, 1) on a 128K chunk's 2 GB of scores)
SCORES_CONFIG = (128, 1, 2, 1)
# select_blocks writes full-width rows (then slices) up to this size; larger outputs take a
# counting pass first and are written at the widest row's width
ONE_PASS_BYTES = 1 << 30


def scores_block_mass(s: torch.Tensor, out: torch.Tensor, r0: int, g_valid: int, gpb: int, scale: float) -> None:
    """The block mass of a chunk of query groups from their strided scores in memory:
    s [G, B, Hkv, R, K] (any strides, the last one 1; unscaled scores of query groups r0 .. r0 + R
    of query head hkv * G + g against key groups 0 .. K - 1, K >= min(r0 + R, g_valid)) ->
    writes out[b, h, r0 / gpb + i, c] (out [B, Hq, nb, nb] float32, zero-initialised; key blocks
    past the causal range are not written): see the module docstring."""
    grp, b, hkv, r, kk = s.shape
    hq = grp * hkv
    if s.stride(-1) != 1 or r % gpb or r0 % gpb or out.dtype != torch.float32 or out.shape[:2] != (b, hq) \
            or kk < min(r0 + r, g_valid) or gpb & (gpb - 1):
        raise ValueError(f"scores_block_mass: expected s [G, B, Hkv, R, K] (last dim contiguous, R and r0 multiples "
                         f"of gpb={gpb}, a power of two, K >= {min(r0 + r, g_valid)}) and out float32 [B, {hq}, nb, nb]; "
                         f"got s {tuple(s.shape)} strides {s.stride()}, r0 {r0}, out {out.dtype} {tuple(out.shape)}")
    nb = out.shape[-1]
    bn, qb, warps, stages = SCORES_CONFIG if s.is_cuda else (16, 2, 4, 1)
    bn = max(bn, gpb)
    rows = qb * gpb
    scr_w = triton.cdiv(min(r0 + r, g_valid), bn) * (bn // gpb)
    grid = (triton.cdiv(r, rows), b * hq)
    scr = torch.empty(grid[0] * grid[1] * rows, scr_w, dtype=torch.float32, device=s.device)
    mod = kernel_module("_xattn_kernel.py", not s.is_cuda)
    mod.xattn_scores_mass_kernel[grid](
        s, out, scr, s.stride(0), s.stride(1), s.stride(2), s.stride(3),
        r, hq, grp, r0, g_valid, nb, scr_w, float(scale) * math.log2(math.e),
        GPB=gpb, QB=qb, BN=bn, RED=max(16, min(256, triton.next_power_of_2(bn // gpb))), STAGES=stages,
        num_warps=warps,
    )


_RULES = {"mass": 0, "threshold": 1, "count": 2}


def select_blocks(mass: torch.Tensor, tau: torch.Tensor, rule: str = "mass",
                  counts: torch.Tensor | None = None) -> torch.Tensor:
    """mass [B, Hq, nb, nb] float32 block scores (non-negative, zero above the diagonal), tau [Hq]
    -> block_idx [B, Hq, nb, K] int64, -1 padding, K = the widest row (one host synchronisation):
    per row the blocks of a rule plus the sink and the diagonal, ascending (one Triton program per
    row, `xattn_select_kernel`):
    "mass": `patterns.xattention.threshold_rows` (mass row-normalised; tau = the share to keep);
    "threshold": scores >= tau (the learned gate's threshold mode);
    "count": the counts[r] (int [nb]) highest blocks of row r, ties by lower index (its top-k mode).
    Up to ONE_PASS_BYTES the rows are written nb wide and sliced to K; beyond, a counting launch
    sizes them first."""
    b, hq, nb, nb2 = mass.shape
    if mass.dtype != torch.float32 or nb != nb2 or tuple(tau.shape) != (hq,) or rule not in _RULES \
            or (rule == "count") != (counts is not None) or (counts is not None and tuple(counts.shape) != (nb,)):
        raise ValueError(f"select_blocks: expected float32 mass [B, Hq, nb, nb], tau [Hq], a rule of {list(_RULES)} and "
                         f"counts [nb] exactly for rule 'count'; got mass {mass.dtype} {tuple(mass.shape)}, tau "
                         f"{tuple(tau.shape)}, rule {rule!r}, counts {None if counts is None else tuple(counts.shape)}")
    mass = mass.contiguous()
    tau = tau.float().contiguous()
    counts = (torch.zeros(1, dtype=torch.int32, device=mass.device) if counts is None
              else counts.to(device=mass.device, dtype=torch.int32).contiguous())
    cnt = torch.empty(b, hq, nb, dtype=torch.int32, device=mass.device)
    nbp = triton.next_power_of_2(nb)
    mod = kernel_module("_xattn_kernel.py", not mass.is_cuda)
    launch = mod.xattn_select_kernel[(b * hq * nb,)]
    warps = 4 if nbp <= 1024 else 8 if nbp <= 4096 else 16
    opts = dict(NBP=nbp, RULE=_RULES[rule], num_warps=warps)
    if b * hq * nb * nb * 8 <= ONE_PASS_BYTES:
        idx = torch.empty(b, hq, nb, nb, dtype=torch.int64, device=mass.device)
        launch(mass, tau, idx, cnt, nb, hq, nb, counts, **opts)
        return idx[..., :max(1, int(cnt.max()))]
    launch(mass, tau, cnt, cnt, nb, hq, 1, counts, WRITE=False, **opts)
    width = max(1, int(cnt.max()))
    idx = torch.empty(b, hq, nb, width, dtype=torch.int64, device=mass.device)
    launch(mass, tau, idx, cnt, nb, hq, width, counts, **opts)
    return idx
