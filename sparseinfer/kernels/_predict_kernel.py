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
