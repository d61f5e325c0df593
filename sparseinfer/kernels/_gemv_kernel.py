"""Triton kernels for contextual sparsity at decode (batch 1-4 rows). Loaded twice by
`sparseinfer.kernels.gemv`: compiled (CUDA) and under the Triton interpreter (CPU tests).

teal_gemv_kernel:  P[s, m, n] = sum_{k in split s} X[m, k] * [|X[m, k]| > T] * WT[k, n]
    WT [K, N] row-major: input channel k is one contiguous row; a row is loaded only if some
    of the M rows keeps channel k (masked load: skipped rows cost no memory traffic). Split
    over K in ROWS-row pieces, one fp32 partial per split (no atomics, no zeroed output).
    TWO: a second weight WT2 [K, N] on the same input, its partials at P + stride_pw (gate, up).
    FUSED: the last split program of each output block (an atomic counter per block) sums the
    splits into OUT itself (with GLU: SiLU(gate) * up), so no second launch.
    PREFETCH (one row): each step's weight rows are loaded one step ahead and its x two steps
    ahead (register double buffering) instead of the x -> mask -> rows chain per step.
teal_rows_kernel:  OUT[n] = sum_k X[k] * [|X[k]| > T] * WT[k, n], one row (M = 1): each program takes
    ROWS input channels (one split) and W output columns, lists its kept channels (one x load, a
    prefix sum), then walks the list U kept rows per step: each row's W columns are one contiguous
    piece (long pieces, few instructions per byte; dropped rows cost nothing), pipelined STAGES deep
    (cp.async). Splits add their fp32 sums into ACC (atomics; ACC is zero before and after a launch)
    and the last split program of an output block writes OUT (TWO: gate and up weights, OUT =
    SiLU(gate) * up) and zeroes its ACC columns and counter. FINISH = False (gate and up of the MLP):
    the sums stay in ACC; the down launch (XACC) reads them as its x (SiLU(gate) * up in fp32), and
    the last program of each of its splits zeroes that slice. Sums in atomic order: not bitwise
    reproducible from run to run (float addition order).
teal_finish_kernel:  OUT[m, n] = sum_s P[s, m, n] in OUT's dtype; with GLU, P holds gate and
    up partials and OUT = SiLU(gate) * up (the SwiGLU hidden state). (FUSED = False path.)
    LIST (with COMPACT, one row): the kept rows are given: SIDX [K] (row numbers) and SX [K]
    (their fp32 inputs), K = the list length; program k takes list entries k*ROWS.. (Deja Vu's
    down projection over its selected neurons).
dejavu_gateup_kernel:  Hout[m, i] = SiLU(X[m] . WG[i]) * (X[m] . WU[i]) if MASK[m, i] else 0
    WG / WU [I, H] row-major: neuron i is one contiguous row, loaded only if some row keeps i.
dejavu_rows_kernel:  HC[j] = SiLU(X . WG[IDX[j]]) * (X . WU[IDX[j]]) (fp32), one row X [H]: the
    listed neurons' rows gathered, BLOCK_I of them per program, no mask, no unused lanes.
    PDL (programmatic dependent launch, Hopper): the kernel may start before the previous one (the
    selection) ends and waits for its writes (griddepcontrol.wait) before reading anything.
"""
import triton
import triton.language as tl

# Only these two standard-library combine functions (recognised by identity by the interpreter)
# and no other standard-library jit function (tl.zeros / tl.sum / tl.max are jit functions):
# this module also runs under the interpreter when triton was imported in compiled mode.
from triton.language.standard import _elementwise_max as _max_fn  # noqa: E402
from triton.language.standard import _sum_combine as _sum_fn  # noqa: E402

try:  # grid dependency control (Hopper programmatic dependent launch; PDL=True launches only)
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # pragma: no cover - older triton
    gdc_wait = None


@triton.jit
def _finish_block(P, OUT, CNT, offs_m, offs_n, m_ok, n_ok, N, SPLITS, stride_ps, stride_pw, stride_om,
                  GLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The last split program of an output block (a counter per block, acq_rel atomics) sums
    all splits' partials (read past L1) and writes OUT; it resets the counter for the next
    launch."""
    cidx = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    prev = tl.atomic_add(CNT + cidx, 1, sem="acq_rel")
    if prev == SPLITS - 1:
        pmask = m_ok[:, None] & n_ok[None, :]
        pp = P + offs_m[:, None] * N + offs_n[None, :]
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        acc2 = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for s in range(SPLITS):
            acc += tl.load(pp + s * stride_ps, mask=pmask, other=0.0, cache_modifier=".cg")
            if GLU:
                acc2 += tl.load(pp + s * stride_ps + stride_pw, mask=pmask, other=0.0, cache_modifier=".cg")
        if GLU:
            acc = acc / (1.0 + tl.exp(-acc)) * acc2
        tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(OUT.dtype.element_ty), mask=pmask)
        tl.atomic_xchg(CNT + cidx, 0)


@triton.jit
def _rows_load(WT, WT2, rows, ok, offs_n, n_ok, stride_wk, TWO: tl.constexpr):
    """Weight rows `rows` where ok ([BLOCK_K, BLOCK_N], storage dtype) of WT and (TWO) WT2; without
    TWO the second is the first (a placeholder)."""
    wp = rows[:, None] * stride_wk + offs_n[None, :]
    wmask = ok[:, None] & n_ok[None, :]
    w = tl.load(WT + wp, mask=wmask, other=0.0)
    if TWO:
        w2 = tl.load(WT2 + wp, mask=wmask, other=0.0)
    else:
        w2 = w
    return w, w2


@triton.jit
def _rows_fma(acc, acc2, WT, WT2, rows, xv, ok, offs_n, n_ok, stride_wk, TWO: tl.constexpr):
    """acc (+ acc2 with TWO) += xv[:, None] * W[rows] (weight rows where ok; [BLOCK_K, BLOCK_N])."""
    w, w2 = _rows_load(WT, WT2, rows, ok, offs_n, n_ok, stride_wk, TWO)
    acc += xv[:, None] * w.to(tl.float32)
    if TWO:
        acc2 += xv[:, None] * w2.to(tl.float32)
    return acc, acc2


@triton.jit
def teal_gemv_kernel(X, WT, WT2, T, P, M, K, N, stride_xm, stride_wk, stride_ps, stride_pw,
                     ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                     STAGES: tl.constexpr, TWO: tl.constexpr,
                     OUT=None, CNT=None, SPLITS=1, stride_om=0, FUSED: tl.constexpr = False,
                     GLU: tl.constexpr = False, SIDX=None, SX=None, COMPACT: tl.constexpr = False,
                     LIST: tl.constexpr = False, PREFETCH: tl.constexpr = False, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch (kernels/pdl.py): the previous kernel's outputs are ready after this
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    t = tl.load(T).to(tl.float32)
    # elementwise accumulators, summed over k once after the loop (a cross-warp sum per step
    # costs more than the loads: benchmarks/results/contextual/teal_sweep1.md); one row (M = 1,
    # the decode case) keeps them 2-D: a [1, BLOCK_K, BLOCK_N] layout runs ~1.8x slower
    if COMPACT or BLOCK_M == 1:
        acc = tl.full((BLOCK_K, BLOCK_N), 0.0, dtype=tl.float32)
        acc2 = tl.full((BLOCK_K, BLOCK_N), 0.0, dtype=tl.float32)
        if COMPACT:
            sb = pid_k * ROWS
            if LIST:  # the kept rows are given (SIDX / SX, K entries)
                cnt = tl.minimum(K - sb, ROWS)
            else:
                # one row (M = 1): the program's whole x slice in one load, its kept channels
                # compacted (prefix sum) into a scratch list, then a loop over full tiles of kept
                # rows only: gathered weight rows the pipeliner can prefetch (no x -> mask -> row
                # chain per tile)
                offs_r = sb + tl.arange(0, ROWS)
                xr = tl.load(X + offs_r, mask=offs_r < K, other=0.0).to(tl.float32)
                keep_r = (tl.abs(xr) > t) & (offs_r < K)
                ki = keep_r.to(tl.int32)
                pos = tl.associative_scan(ki, 0, _sum_fn) - 1
                cnt = tl.reduce(ki, 0, _sum_fn)
                # programs of one split write the same list (same values)
                tl.store(SIDX + sb + pos, offs_r, mask=keep_r)
                tl.store(SX + sb + pos, xr, mask=keep_r)
                tl.debug_barrier()
            for i in tl.range(0, cnt, BLOCK_K, num_stages=STAGES):
                j = i + tl.arange(0, BLOCK_K)
                jm = j < cnt
                rows = tl.load(SIDX + sb + j, mask=jm, other=0)
                xv = tl.load(SX + sb + j, mask=jm, other=0.0)
                acc, acc2 = _rows_fma(acc, acc2, WT, WT2, rows, xv, jm, offs_n, n_ok, stride_wk, TWO)
        elif PREFETCH:
            # register double buffering: step s's weight rows are loaded one step ahead and its
            # x two steps ahead, so a weight load never waits behind an x load and two steps'
            # rows are in flight per program (the plain loop below chains x -> mask -> rows)
            nsteps: tl.constexpr = ROWS // BLOCK_K
            xb = X + pid_m * stride_xm
            offs_k = pid_k * ROWS + tl.arange(0, BLOCK_K)
            x0 = tl.load(xb + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            keep = (tl.abs(x0) > t) & (offs_k < K)
            x0 = tl.where(keep, x0, 0.0)
            w0, v0 = _rows_load(WT, WT2, offs_k, keep, offs_n, n_ok, stride_wk, TWO)
            offs_k += BLOCK_K
            x1 = tl.load(xb + offs_k, mask=(offs_k < K) & (nsteps > 1), other=0.0).to(tl.float32)
            for it in tl.range(1, nsteps + 1, num_stages=1):
                keep = (tl.abs(x1) > t) & (offs_k < K) & (it < nsteps)
                x1 = tl.where(keep, x1, 0.0)
                w1, v1 = _rows_load(WT, WT2, offs_k, keep, offs_n, n_ok, stride_wk, TWO)
                x2 = tl.load(xb + offs_k + BLOCK_K, mask=(offs_k + BLOCK_K < K) & (it + 1 < nsteps),
                             other=0.0).to(tl.float32)
                acc += x0[:, None] * w0.to(tl.float32)
                if TWO:
                    acc2 += x0[:, None] * v0.to(tl.float32)
                x0, w0, v0, x1 = x1, w1, v1, x2
                offs_k += BLOCK_K
        else:
            for it in tl.range(0, ROWS // BLOCK_K, num_stages=STAGES):
                offs_k = pid_k * ROWS + it * BLOCK_K + tl.arange(0, BLOCK_K)
                x = tl.load(X + pid_m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                keep = (tl.abs(x) > t) & (offs_k < K)  # a negative threshold must not keep rows past K
                x = tl.where(keep, x, 0.0)
                acc, acc2 = _rows_fma(acc, acc2, WT, WT2, offs_k, x, keep, offs_n, n_ok, stride_wk, TWO)
        part = tl.reduce(acc, 0, _sum_fn)[None, :]  # [1, BLOCK_N]
        part2 = tl.reduce(acc2, 0, _sum_fn)[None, :]
    else:
        acc3 = tl.full((BLOCK_M, BLOCK_K, BLOCK_N), 0.0, dtype=tl.float32)
        acc4 = tl.full((BLOCK_M, BLOCK_K, BLOCK_N), 0.0, dtype=tl.float32)
        for it in tl.range(0, ROWS // BLOCK_K, num_stages=STAGES):
            offs_k = pid_k * ROWS + it * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            keep = tl.abs(x) > t
            x = tl.where(keep, x, 0.0)
            row = (tl.reduce(keep.to(tl.int32), 0, _max_fn) > 0) & k_ok
            wmask = row[:, None] & n_ok[None, :]
            wp = offs_k[:, None] * stride_wk + offs_n[None, :]
            w = tl.load(WT + wp, mask=wmask, other=0.0).to(tl.float32)
            acc3 += x[:, :, None] * w[None, :, :]
            if TWO:
                w2 = tl.load(WT2 + wp, mask=wmask, other=0.0).to(tl.float32)
                acc4 += x[:, :, None] * w2[None, :, :]
        part = tl.reduce(acc3, 1, _sum_fn)  # [BLOCK_M, BLOCK_N]
        part2 = tl.reduce(acc4, 1, _sum_fn)
    # this split's partial sums, then (FUSED) the split sums by the last program of the block
    pp = P + pid_k * stride_ps + offs_m[:, None] * N + offs_n[None, :]
    pmask = m_ok[:, None] & n_ok[None, :]
    tl.store(pp, part, mask=pmask)
    if TWO:
        tl.store(pp + stride_pw, part2, mask=pmask)
    if FUSED:
        _finish_block(P, OUT, CNT, offs_m, offs_n, m_ok, n_ok, N, SPLITS, stride_ps, stride_pw, stride_om,
                      GLU, BLOCK_M, BLOCK_N)


@triton.jit
def teal_rows_kernel(X, T, WT, WT2, ACC, OUT, CNT, SIDX, SX, K, N, SPLITS, stride_wk,
                     ROWS: tl.constexpr, U: tl.constexpr, W: tl.constexpr, STAGES: tl.constexpr,
                     TWO: tl.constexpr, FENCE: tl.constexpr = False, FINISH: tl.constexpr = True,
                     XACC: tl.constexpr = False, SCNT=None, PDL: tl.constexpr = False):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = tl.load(T).to(tl.float32)
    offs_r = pid_k * ROWS + tl.arange(0, ROWS)
    if XACC:  # X: a TWO launch's unfinished fp32 sums (gate [K], up [K]): x = SiLU(gate) * up, in fp32
        g = tl.load(X + offs_r, mask=offs_r < K, other=0.0, cache_modifier=".cg")
        xr = g / (1.0 + tl.exp(-g)) * tl.load(X + K + offs_r, mask=offs_r < K, other=0.0, cache_modifier=".cg")
    else:
        xr = tl.load(X + offs_r, mask=offs_r < K, other=0.0).to(tl.float32)
    keep = (tl.abs(xr) > t) & (offs_r < K)  # a negative threshold must not keep rows past K
    ki = keep.to(tl.int32)
    pos = tl.associative_scan(ki, 0, _sum_fn) - 1
    cnt = tl.reduce(ki, 0, _sum_fn)
    lb = (pid_k * tl.num_programs(1) + pid_n) * ROWS  # this program's own list (no sharing)
    tl.store(SIDX + lb + pos, offs_r, mask=keep)
    tl.store(SX + lb + pos, xr, mask=keep)
    tl.debug_barrier()
    cols = pid_n * W + tl.arange(0, W)
    n_ok = cols < N
    acc = tl.full((U, W), 0.0, dtype=tl.float32)
    acc2 = tl.full((U, W), 0.0, dtype=tl.float32)
    for i in tl.range(0, cnt, U, num_stages=STAGES):
        j = i + tl.arange(0, U)
        jm = j < cnt
        r = tl.load(SIDX + lb + j, mask=jm, other=0)
        xv = tl.load(SX + lb + j, mask=jm, other=0.0)
        acc, acc2 = _rows_fma(acc, acc2, WT, WT2, r.to(tl.int64), xv, jm, cols, n_ok, stride_wk, TWO)
    part = tl.reduce(acc, 0, _sum_fn)  # [W]
    tl.atomic_add(ACC + cols, part, mask=n_ok, sem="relaxed")
    if TWO:
        tl.atomic_add(ACC + N + cols, tl.reduce(acc2, 0, _sum_fn), mask=n_ok, sem="relaxed")
    if XACC:  # the last of the split's programs (a counter per split) zeroes its slice of X for the next launch
        done = tl.atomic_add(SCNT + pid_k, 1, sem="acq_rel")
        if done == tl.num_programs(1) - 1:
            zx = tl.full((ROWS,), 0.0, dtype=tl.float32)
            tl.store(X + offs_r, zx, mask=offs_r < K)
            tl.store(X + K + offs_r, zx, mask=offs_r < K)
            tl.atomic_xchg(SCNT + pid_k, 0)
    if not FINISH:  # the sums stay in ACC (a later XACC launch reads and zeroes them)
        return
    if FENCE:  # optional (gemv.FENCE): each thread waits for its own atomics before the barrier. Not needed:
        # the barrier, then one thread's acq_rel counter increment, is the usual split-K handshake
        cnt = tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [cnt], dtype=tl.int32,
                                        is_pure=False, pack=1)
    tl.debug_barrier()  # every thread's sums are in before the counter (acq_rel) says so
    prev = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel")
    if prev == SPLITS - 1:
        a = tl.load(ACC + cols, mask=n_ok, other=0.0, cache_modifier=".cg")
        if TWO:  # gate (ACC) and up (ACC + N): the SwiGLU hidden state
            a2 = tl.load(ACC + N + cols, mask=n_ok, other=0.0, cache_modifier=".cg")
        # the zeroing stores may take another thread layout than the loads (the compiler reuses the atomics'
        # addresses): every load is done before any zero lands
        tl.debug_barrier()
        zero = tl.full((W,), 0.0, dtype=tl.float32)
        tl.store(ACC + cols, zero, mask=n_ok)
        if TWO:
            tl.store(ACC + N + cols, zero, mask=n_ok)
            a = a / (1.0 + tl.exp(-a)) * a2
        tl.store(OUT + cols, a.to(OUT.dtype.element_ty), mask=n_ok)
        tl.atomic_xchg(CNT + pid_n, 0)


@triton.jit
def teal_finish_kernel(P, OUT, MN, SPLITS, stride_ps, stride_pw, BLOCK: tl.constexpr, GLU: tl.constexpr,
                       PDL: tl.constexpr = False):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.full((BLOCK,), 0.0, dtype=tl.float32)
    acc2 = tl.full((BLOCK,), 0.0, dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(P + s * stride_ps + offs, mask=ok, other=0.0)
        if GLU:
            acc2 += tl.load(P + s * stride_ps + stride_pw + offs, mask=ok, other=0.0)
    if GLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=ok)


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


@triton.jit
def dejavu_rows_kernel(X, WG, WU, IDX, HC, KN, HID, stride_wi,
                       BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # launched early: wait for the list (the previous kernel's writes) before reading anything
        gdc_wait()
    offs_j = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = offs_j < KN
    rows = tl.load(IDX + offs_j, mask=ok, other=0).to(tl.int64)
    # elementwise accumulators, summed over H once after the loop (as in teal_gemv_kernel)
    g = tl.full((BLOCK_I, BLOCK_H), 0.0, dtype=tl.float32)
    u = tl.full((BLOCK_I, BLOCK_H), 0.0, dtype=tl.float32)
    for h0 in tl.range(0, HID, BLOCK_H, num_stages=STAGES):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < HID
        x = tl.load(X + offs_h, mask=h_ok, other=0.0).to(tl.float32)
        wp = rows[:, None] * stride_wi + offs_h[None, :]
        wm = ok[:, None] & h_ok[None, :]
        g += tl.load(WG + wp, mask=wm, other=0.0).to(tl.float32) * x[None, :]
        u += tl.load(WU + wp, mask=wm, other=0.0).to(tl.float32) * x[None, :]
    gs = tl.reduce(g, 1, _sum_fn)
    us = tl.reduce(u, 1, _sum_fn)
    tl.store(HC + offs_j, gs / (1.0 + tl.exp(-gs)) * us, mask=ok)

