"""Triton kernels for contextual sparsity at decode (batch 1-4 rows). Loaded twice by
`sparseinfer.kernels.gemv`: compiled (CUDA) and under the Triton interpreter (CPU tests).

teal_gemv_kernel:  Y[m, n] += sum_k X[m, k] * [|X[m, k]| > T] * WT[k, n]
    WT [K, N] row-major: input channel k is one contiguous row; a row is loaded only if some
    of the M rows keeps channel k (masked load: skipped rows cost no memory traffic); fp32
    accumulation, split over K with fp32 atomic adds into a zeroed Y (fp32 atomics work on
    every arch; bf16 atomics would need sm_90).
dejavu_gateup_kernel:  Hout[m, i] = SiLU(X[m] . WG[i]) * (X[m] . WU[i]) if MASK[m, i] else 0
    WG / WU [I, H] row-major: neuron i is one contiguous row, loaded only if some row keeps i.
"""
import triton
import triton.language as tl

# Only these two standard-library combine functions (recognised by identity by the interpreter)
# and no other standard-library jit function (tl.zeros / tl.sum / tl.max are jit functions):
# this module also runs under the interpreter when triton was imported in compiled mode.
from triton.language.standard import _elementwise_max as _max_fn  # noqa: E402
from triton.language.standard import _sum_combine as _sum_fn  # noqa: E402


@triton.jit
def teal_gemv_kernel(X, WT, T, Y, M, K, N, stride_xm, stride_wk, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, K_ITERS: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    t = tl.load(T).to(tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for it in range(K_ITERS):
        offs_k = (pid_k * K_ITERS + it) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        keep = tl.abs(x) > t
        x = tl.where(keep, x, 0.0)
        row = (tl.reduce(keep.to(tl.int32), 0, _max_fn) > 0) & k_ok
        w = tl.load(WT + offs_k[:, None] * stride_wk + offs_n[None, :], mask=row[:, None] & n_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.reduce(x[:, :, None] * w[None, :, :], 1, _sum_fn)
    tl.atomic_add(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def dejavu_gateup_kernel(X, WG, WU, MASK, H_OUT, M, I, HID, stride_xm, stride_wi, stride_mm, stride_hm,
                         BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    m_ok = offs_m < M
    i_ok = offs_i < I
    sel = tl.load(MASK + offs_m[:, None] * stride_mm + offs_i[None, :], mask=m_ok[:, None] & i_ok[None, :], other=0)
    sel = sel != 0
    row = (tl.reduce(sel.to(tl.int32), 0, _max_fn) > 0) & i_ok
    g = tl.full((BLOCK_M, BLOCK_I), 0.0, dtype=tl.float32)
    u = tl.full((BLOCK_M, BLOCK_I), 0.0, dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < HID
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_h[None, :], mask=m_ok[:, None] & h_ok[None, :],
                    other=0.0).to(tl.float32)
        wmask = row[:, None] & h_ok[None, :]
        wg = tl.load(WG + offs_i[:, None] * stride_wi + offs_h[None, :], mask=wmask, other=0.0).to(tl.float32)
        wu = tl.load(WU + offs_i[:, None] * stride_wi + offs_h[None, :], mask=wmask, other=0.0).to(tl.float32)
        g += tl.reduce(x[:, None, :] * wg[None, :, :], 2, _sum_fn)
        u += tl.reduce(x[:, None, :] * wu[None, :, :], 2, _sum_fn)
    h = g / (1.0 + tl.exp(-g)) * u
    h = tl.where(sel, h, 0.0)
    tl.store(H_OUT + offs_m[:, None] * stride_hm + offs_i[None, :], h.to(H_OUT.dtype.element_ty),
             mask=m_ok[:, None] & i_ok[None, :])
