"""Triton kernels of XAttention's estimation: the block mass from strided scores in one pass,
and the per-row selection of blocks (XAttention's tau, also a threshold or a top-k: the
learned gate's rules).

Only @triton.jit code; ``sparseinfer.kernels.xattn`` loads it compiled (CUDA tensors) or under
the Triton interpreter (CPU tensors).
"""
import triton
import triton.language as tl

# combine functions of triton's standard library, which the interpreter recognises (see _attn_kernel.py)
from triton.language.standard import _elementwise_max as _max_fn  # noqa: E402
from triton.language.standard import _sum_combine as _sum_fn  # noqa: E402


@triton.jit
def xattn_scores_mass_kernel(
    S, OUT, SCR,
    stride_sg, stride_sb, stride_sh, stride_sr,
    R, HQ, GRP, R0, GV, NB, SCR_W, SCALE_LOG2,
    GPB: tl.constexpr, QB: tl.constexpr, BN: tl.constexpr, RED: tl.constexpr, STAGES: tl.constexpr,
):
    """Block mass from strided scores in memory (a chunk of R query groups from R0). One program
    = QB query blocks (QB * GPB groups) of one (batch, head), their causal scores read once, BN
    key groups at a time: each [QB * GPB, BN] tile is reduced to a log2-sum-exp per (row, key
    block of GPB groups), written to the program's scratch rows, and folded into the row's online
    log2-sum-exp; then the scratch is read back and exp2(l - lse) summed over each block's GPB
    rows: the block mass of the query blocks' rows."""
    ROWS: tl.constexpr = QB * GPB
    pb = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    pid = bh * tl.num_programs(0) + pb
    scr = SCR + pid.to(tl.int64) * ROWS * SCR_W
    rloc = tl.arange(0, ROWS)
    rin = pb * ROWS + rloc  # row in the chunk
    rows = R0 + rin  # query groups
    base = S + (h % GRP).to(tl.int64) * stride_sg + b.to(tl.int64) * stride_sb + (h // GRP).to(tl.int64) * stride_sh \
        + rin[:, None].to(tl.int64) * stride_sr
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.full([ROWS], 0.0, dtype=tl.float32)
    hi = tl.minimum(R0 + tl.minimum((pb + 1) * ROWS, R), GV)
    for n0 in tl.range(0, hi, BN, num_stages=STAGES):
        cols = n0 + tl.arange(0, BN)
        ok = (cols[None, :] <= rows[:, None]) & (cols[None, :] < GV) & (rin[:, None] < R)
        s = tl.load(base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32) * SCALE_LOG2
        kb = n0 // GPB + tl.arange(0, BN // GPB)
        s3 = tl.reshape(s, [ROWS, BN // GPB, GPB])
        mb = tl.reduce(s3, 2, _max_fn)
        mb_use = tl.where(mb == float("-inf"), 0.0, mb)
        eb = tl.reduce(tl.exp2(s3 - mb_use[:, :, None]), 2, _sum_fn)
        tl.store(scr + rloc[:, None] * SCR_W + kb[None, :], mb_use + tl.log2(eb))
        m_new = tl.maximum(m_i, tl.reduce(mb, 1, _max_fn))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.reduce(eb * tl.exp2(mb_use - m_use[:, None]), 1, _sum_fn)
        m_i = m_new
    lse = tl.where((rows < GV) & (rin < R) & (l_i > 0), m_i + tl.log2(l_i), float("inf"))
    tl.debug_barrier()
    nkb = (hi + BN - 1) // BN * (BN // GPB)
    qb = R0 // GPB + pb * QB + tl.arange(0, QB)  # the program's query blocks
    obase = OUT + bh.to(tl.int64) * NB * NB
    for c0 in range(0, nkb, RED):
        kb = c0 + tl.arange(0, RED)
        lb = tl.load(scr + rloc[:, None] * SCR_W + kb[None, :], mask=kb[None, :] < nkb, other=float("-inf"))
        mass = tl.reduce(tl.reshape(tl.exp2(lb - lse[:, None]), [QB, GPB, RED]), 1, _sum_fn)
        tl.store(obase + qb[:, None].to(tl.int64) * NB + kb[None, :], mass,
                 mask=(qb[:, None] < R0 // GPB + R // GPB) & (kb[None, :] < tl.minimum(nkb, NB)))


@triton.jit
def xattn_select_kernel(MASS, TAU, IDX, CNT, NB, HQ, W, COUNTS, NBP: tl.constexpr, WRITE: tl.constexpr = True,
                        RULE: tl.constexpr = 0):
    """One row r of one (batch, head) of block scores [.., NB] (non-negative, zero past r),
    selected by RULE:
    0 (XAttention's tau): the smallest prefix of its blocks sorted by mass (descending, ties
      by lower index) reaching TAU[h]; tau >= 1 keeps every block with mass (a float sum may
      round to 1 before the smallest ones);
    1 (a threshold): the blocks with score >= TAU[h];
    2 (top-k): the COUNTS[r] highest blocks (ties by lower index) among blocks 0..r;
    plus the sink block 0 and the diagonal block r, none past r; written as ascending block indices to IDX[row, :W] (-1 after the last) and their
    count to CNT[row]. No sort (rules 0 and 2): the cut value is found by bisection over the
    float bit patterns (non-negative floats order as their int32 bits): the smallest b with
    sum(mass > b) < tau (rule 0) or count(score > b) < k (rule 2); blocks above b are kept,
    blocks equal to b in index order while the mass (count) before them stays below tau (k).
    WRITE=False: the counts only."""
    pid = tl.program_id(0)
    r = pid % NB
    h = (pid // NB) % HQ
    j = tl.arange(0, NBP)
    x = tl.load(MASS + pid.to(tl.int64) * NB + j, mask=j < NB, other=0.0)
    tau = tl.load(TAU + h)
    if RULE == 1:
        keep = x >= tau
    else:
        bits = x.to(tl.int32, bitcast=True)
        if RULE == 2:
            bits = tl.where(j <= r, bits, -1)  # candidates: blocks 0..r
            want = tl.load(COUNTS + r)
            x = tl.where(j <= r, 1.0, 0.0)  # each candidate weighs 1: the sums below count
            goal = want.to(tl.float32)
        else:
            goal = tau
        lo = -1  # P(lo) false (by convention), P(hi) true: P(b) = sum(x[bits > b]) < goal
        hi = tl.reduce(bits, 0, _max_fn)
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            p = tl.reduce(tl.where(bits > mid, x, 0.0), 0, _sum_fn) < goal
            go = hi - lo > 1
            hi = tl.where(go & p, mid, hi)
            lo = tl.where(go & (not p), mid, lo)
        above = tl.reduce(tl.where(bits > hi, x, 0.0), 0, _sum_fn)
        tie = (bits == hi) & (j < NB)
        before = tl.associative_scan(tie.to(tl.int32), 0, _sum_fn) - tie.to(tl.int32)  # tied blocks before this one
        keep = ((bits > hi) | (tie & (above + before.to(tl.float32) * x < goal))) & (x > 0)
        if RULE == 0:
            keep = tl.where(tau >= 1.0, x > 0, keep)
    keep = (keep | (j == 0) | (j == r)) & (j <= r)
    pos = tl.associative_scan(keep.to(tl.int32), 0, _sum_fn) - 1
    cnt = tl.reduce(keep.to(tl.int32), 0, _sum_fn)
    if WRITE:
        out = IDX + pid.to(tl.int64) * W
        tl.store(out + pos, j.to(tl.int64), mask=keep & (pos < W))
        tl.store(out + j, tl.full([NBP], -1, tl.int64), mask=(j >= cnt) & (j < W))
    tl.store(CNT + pid, cnt)
