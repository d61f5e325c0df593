"""Triton kernels of the fused Deja Vu predictor (only @triton.jit code; ``sparseinfer.kernels.predict``
loads it compiled for CUDA or under the Triton interpreter for CPU).

lowrank_kernel: H [R, r] fp32 = X [R, Hd] @ A[r, Hd]^T, one program per BLOCK_R rows of A (all
    ROWS input rows at once, so A is read once).
blocked_select_kernel: one program per block of NB neurons: the block's scores from H and its
    rows of B (glu: |SiLU(h B_g^T) * (h B_u^T)|, B = [B_g; B_u] [2I, r]; linear: h B^T + b), then
    the block's share of the k kept neurons by rank inside the block (score descending, ties to the
    lower position; NaN ranks last; ranks from one NB x NB comparison count):
    OUT[row, off_j : off_j + kb_j] = the kept positions, ascending, off_j = floor(k * start_j / I).
    No global synchronisation: every block writes its own slice.
int4_select_kernel: the same per block, its scores from the int4 codes of [W_gate; W_up] (kind
    "int4": two codes per byte, one scale per GROUP inputs) and x itself, no low-rank launch.
    Whole groups per step, one scale per (neuron, group) and two contiguous x slices per group
    (H100, 8B shapes: gathering a scale per byte instead ran 3-8x slower, benchmarks/int4_variants.py).
PDL (programmatic dependent launch, Hopper): lowrank_kernel lets the score launch start at once;
    blocked_select_kernel loads its B rows, then waits for H (griddepcontrol.wait); PDL == 2 also
    lets the next launch (the MLP's, launched with PDL) start.
"""
import triton
import triton.language as tl
from triton.language.standard import _sum_combine as _sum_fn  # noqa: E402  (see _gemv_kernel.py)

try:  # grid dependency control (Hopper programmatic dependent launch); absent from the interpreter's path
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def lowrank_kernel(X, A, H, R, HD, RANK, stride_x, stride_a, stride_h,
                   ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # the score launch may start now (it prefetches its B rows, then waits for H)
        gdc_launch_dependents()
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = tl.arange(0, ROWS)
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.full([ROWS, BLOCK_R], 0.0, dtype=tl.float32)
    for h0 in range(0, HD, BLOCK_H):
        hh = h0 + offs_h
        x = tl.load(X + rows[:, None] * stride_x + hh[None, :], mask=(rows[:, None] < R) & (hh[None, :] < HD),
                    other=0.0).to(tl.float32)
        a = tl.load(A + offs_r[:, None] * stride_a + hh[None, :], mask=(offs_r[:, None] < RANK) & (hh[None, :] < HD),
                    other=0.0).to(tl.float32)
        acc += tl.reduce(x[:, None, :] * a[None, :, :], 2, _sum_fn)
    tl.store(H + rows[:, None] * stride_h + offs_r[None, :], acc, mask=(rows[:, None] < R) & (offs_r[None, :] < RANK))


@triton.jit
def blocked_select_kernel(H, B, BIAS, OUT, R, I, RANK, k, stride_h, stride_b, stride_o,
                          ROWS: tl.constexpr, NB: tl.constexpr, BLOCK_K: tl.constexpr,
                          GLU: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr = 0):
    if PDL == 2:  # the MLP's launch may start (it waits for this kernel's list)
        gdc_launch_dependents()
    j = tl.program_id(0)
    offs_n = j * NB + tl.arange(0, NB)
    nok = offs_n < I
    rows = tl.arange(0, ROWS)
    offs_k = tl.arange(0, BLOCK_K)
    kok = offs_k < RANK
    bmask = nok[:, None] & kok[None, :]
    # the first BLOCK_K columns of the block's B rows (all of them when BLOCK_K >= RANK) are
    # loaded before H is needed: with PDL they stream in while the x A^T launch still runs
    b1 = tl.load(B + offs_n[:, None] * stride_b + offs_k[None, :], mask=bmask, other=0.0).to(tl.float32)
    if GLU:  # the up rows follow the I gate rows
        b2 = tl.load(B + (offs_n[:, None] + I) * stride_b + offs_k[None, :], mask=bmask, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
    h = tl.load(H + rows[:, None] * stride_h + offs_k[None, :], mask=(rows[:, None] < R) & kok[None, :], other=0.0)
    s1 = tl.reduce(h[:, None, :] * b1[None, :, :], 2, _sum_fn)
    if GLU:
        s2 = tl.reduce(h[:, None, :] * b2[None, :, :], 2, _sum_fn)
    else:
        s2 = s1
    for k0 in range(BLOCK_K, RANK, BLOCK_K):
        kk = k0 + offs_k
        kok = kk < RANK
        h = tl.load(H + rows[:, None] * stride_h + kk[None, :], mask=(rows[:, None] < R) & kok[None, :], other=0.0)
        bmask = nok[:, None] & kok[None, :]
        b1 = tl.load(B + offs_n[:, None] * stride_b + kk[None, :], mask=bmask, other=0.0).to(tl.float32)
        s1 += tl.reduce(h[:, None, :] * b1[None, :, :], 2, _sum_fn)
        if GLU:
            b2 = tl.load(B + (offs_n[:, None] + I) * stride_b + kk[None, :], mask=bmask, other=0.0).to(tl.float32)
            s2 += tl.reduce(h[:, None, :] * b2[None, :, :], 2, _sum_fn)
    if GLU:
        s = tl.abs(s1 / (1.0 + tl.exp(-s1)) * s2)
    elif HAS_BIAS:
        s = s1 + tl.load(BIAS + offs_n, mask=nok, other=0.0).to(tl.float32)[None, :]
    else:
        s = s1
    _select_store(s, nok, offs_n, j, rows, R, I, k, OUT, stride_o, ROWS, NB)


@triton.jit
def _select_store(s, nok, offs_n, j, rows, R, I, k, OUT, stride_o, ROWS: tl.constexpr, NB: tl.constexpr):
    """scores s [ROWS, NB] of block j (neurons offs_n) -> its share of the k kept neurons per row,
    written ascending to OUT[row, off_j : off_j + kb_j]."""
    s = tl.where(nok[None, :] & (s == s), s, float("-inf"))  # padding and NaN rank last
    # this block's slice of the output: [off, off_next), proportional to its neurons
    start = (j * NB).to(tl.int64)
    end = tl.minimum(start + NB, I)
    off = (k * start) // I
    kb = ((k * end) // I - off).to(tl.int32)
    idx = tl.arange(0, NB)
    for row in tl.static_range(ROWS):
        sr = tl.reduce(tl.where(rows[:, None] == row, s, 0.0), 0, _sum_fn)  # [NB]
        sr = tl.where(nok, sr, float("-inf"))
        # rank of each neuron in its block (one NB x NB count): larger scores first, ties by position
        # (a bisection on the scores' bits instead, as kernels.topk does, measured slower: 26.5 vs 20.4 us)
        before = (sr[None, :] > sr[:, None]) | ((sr[None, :] == sr[:, None]) & (idx[None, :] < idx[:, None]))
        rank = tl.reduce(before.to(tl.int32), 1, _sum_fn)
        keep = rank < kb
        pos = tl.associative_scan(keep.to(tl.int32), 0, _sum_fn) - 1
        tl.store(OUT + row * stride_o + off + pos, offs_n.to(tl.int32), mask=keep & (row < R))


@triton.jit
def _nibbles(c):
    """uint8 bytes -> (low, high) nibbles as signed values in [-8, 7] (fp32)."""
    c = c.to(tl.int32)
    return (((c & 15) ^ 8) - 8).to(tl.float32), ((((c >> 4) & 15) ^ 8) - 8).to(tl.float32)


@triton.jit
def int4_select_kernel(X, Q, S, OUT, R, I, HD, k, stride_x, stride_q, stride_s, stride_o,
                       ROWS: tl.constexpr, NB: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr,
                       PDL: tl.constexpr = 0):
    """One program per block of NB neurons: g~, u~ = x . (gate / up rows of the 4-bit codes * their
    scales) over all HD inputs, NG whole groups per step as [NB, NG, GROUP / 2] byte tiles (byte t
    of a group: input t in the low nibble, t + GROUP / 2 in the high one, two's complement;
    Q [2I, HD / 2], S [2I, HD / GROUP]), then |SiLU(g~) * u~| and the block's share of the list."""
    GB: tl.constexpr = GROUP // 2
    if PDL:  # the MLP's launch may start (it waits for this kernel's list)
        gdc_launch_dependents()
    j = tl.program_id(0)
    offs_n = j * NB + tl.arange(0, NB)
    nok = offs_n < I
    rows = tl.arange(0, ROWS)
    offs_g = tl.arange(0, NG)
    offs_t = tl.arange(0, GB)
    ngroups = HD // GROUP
    q_g = (Q + offs_n.to(tl.int64) * stride_q)[:, None, None]
    q_u = (Q + (offs_n + I).to(tl.int64) * stride_q)[:, None, None]
    s_g = (S + offs_n.to(tl.int64) * stride_s)[:, None]
    s_u = (S + (offs_n + I).to(tl.int64) * stride_s)[:, None]
    if ROWS == 1:  # decode: elementwise accumulators, one cross-lane sum after the loop
        acc_g = tl.full([NB, NG, GB], 0.0, dtype=tl.float32)
        acc_u = tl.full([NB, NG, GB], 0.0, dtype=tl.float32)
    else:  # a few rows: the codes are read once for all of them, sums per step
        s1 = tl.full([ROWS, NB], 0.0, dtype=tl.float32)
        s2 = tl.full([ROWS, NB], 0.0, dtype=tl.float32)
    for g0 in range(0, ngroups, NG):
        grp = g0 + offs_g
        gok = grp < ngroups
        m2 = nok[:, None] & gok[None, :]
        m3 = m2[:, :, None]
        boff = (grp[:, None] * GB + offs_t[None, :])[None, :, :]  # [1, NG, GB] byte offsets
        ch = grp[:, None] * GROUP + offs_t[None, :]  # [NG, GB] the low nibbles' inputs
        wg_lo, wg_hi = _nibbles(tl.load(q_g + boff, mask=m3, other=0))
        wu_lo, wu_hi = _nibbles(tl.load(q_u + boff, mask=m3, other=0))
        sg = tl.load(s_g + grp[None, :], mask=m2, other=0.0).to(tl.float32)[:, :, None]
        su = tl.load(s_u + grp[None, :], mask=m2, other=0.0).to(tl.float32)[:, :, None]
        if ROWS == 1:
            xa = tl.load(X + ch, mask=gok[:, None], other=0.0).to(tl.float32)[None, :, :]
            xb = tl.load(X + ch + GB, mask=gok[:, None], other=0.0).to(tl.float32)[None, :, :]
            acc_g += (wg_lo * xa + wg_hi * xb) * sg
            acc_u += (wu_lo * xa + wu_hi * xb) * su
        else:
            for row in tl.static_range(ROWS):
                xm = gok[:, None] & (row < R)
                xa = tl.load(X + row * stride_x + ch, mask=xm, other=0.0).to(tl.float32)[None, :, :]
                xb = tl.load(X + row * stride_x + ch + GB, mask=xm, other=0.0).to(tl.float32)[None, :, :]
                pg = tl.reduce(tl.reduce((wg_lo * xa + wg_hi * xb) * sg, 2, _sum_fn), 1, _sum_fn)  # [NB]
                pu = tl.reduce(tl.reduce((wu_lo * xa + wu_hi * xb) * su, 2, _sum_fn), 1, _sum_fn)
                s1 += tl.where(rows[:, None] == row, pg[None, :], 0.0)
                s2 += tl.where(rows[:, None] == row, pu[None, :], 0.0)
    if ROWS == 1:
        s1 = tl.reduce(tl.reduce(acc_g, 2, _sum_fn), 1, _sum_fn)[None, :]
        s2 = tl.reduce(tl.reduce(acc_u, 2, _sum_fn), 1, _sum_fn)[None, :]
    s = tl.abs(s1 / (1.0 + tl.exp(-s1)) * s2)
    _select_store(s, nok, offs_n, j, rows, R, I, k, OUT, stride_o, ROWS, NB)
