"""Triton kernel: a head's slash offsets -> sorted unique offsets, runs, merged ranges (see runs.py).

One program per (batch, head) holds the head's offsets (sorted beforehand by torch.sort) in
registers (BLOCK >= Ns + 1); each step's prefix sums compact the kept entries; a step that needs
its neighbours' values reads them back from the outputs it just wrote (a barrier in between).
"""
import triton
import triton.language as tl


# the interpreter serves tl.associative_scan / tl.reduce, not tl.cumsum / tl.sum / tl.max; with
# triton's own combine functions it runs them as numpy calls (any other combine: element by element)
@triton.jit
def _cumsum(x):
    return tl.associative_scan(x.to(tl.int32), 0, tl.standard._sum_combine)


@triton.jit
def _count(x):
    return tl.reduce(x.to(tl.int32), 0, tl.standard._sum_combine)


@triton.jit
def _most(x):
    return tl.reduce(x, 0, tl.standard._elementwise_max)


@triton.jit
def _compact_store(ptr, values, keep, fill, offs, width):
    """ptr[rank] = values where keep (rank = position among the kept), ptr[j] = fill for the
    kept count <= j < width (disjoint addresses: no barrier needed between the two stores)."""
    rank = _cumsum(keep) - 1
    count = _count(keep)
    tl.store(ptr + rank, values, mask=keep & (rank < width))
    tl.store(ptr + offs, values * 0 + fill, mask=(offs >= count) & (offs < width))


@triton.jit
def slash_runs_kernel(SL, S, LO, HI, GLO, GHI, EX, TLO, THI, W,
                      stride_sb, stride_sh, stride_sn, NS, N, HEADS, BAND_MIN, MERGE_GAP, MAX_TILED,
                      BLOCK: tl.constexpr):
    """SL [B, H, NS] offsets sorted ascending (any int dtype; < 0 or >= N: padding). Per program
    (b, h), rows of width R = NS + 1 unless said: S sorted unique offsets with 0 added (padding N);
    LO / HI [BLOCK] scratch: the runs of consecutive offsets; W: the end of the first run (offset
    0's), at most N - 1; GLO / GHI / EX: the runs after the first one (when W + 1 >= BAND_MIN > 0:
    the local band, launched apart) grouped where gaps are <= MERGE_GAP (EX = 1 for a group of one
    run, and for padding; padding N); TLO / THI [MAX_TILED]: the first MAX_TILED exact groups,
    whose EX stays 1, the later exact groups' EX cleared (padding N)."""
    pid = tl.program_id(0)
    b = pid // HEADS
    h = pid % HEADS
    R = NS + 1
    offs = tl.arange(0, BLOCK)
    row = pid * R
    # unique positive offsets after offset 0 (self, always): the first of each value, compacted
    base = SL + b * stride_sb + h * stride_sh
    x = tl.load(base + offs * stride_sn, mask=offs < NS, other=-1)
    prev = tl.load(base + (offs - 1) * stride_sn, mask=(offs > 0) & (offs < NS), other=-1)
    keep = (x > 0) & (x < N) & (x != prev)
    rank = _cumsum(keep)
    tl.store(S + row + rank, x.to(tl.int64), mask=keep)
    tl.store(S + row + offs, tl.where(offs == 0, 0, N).to(tl.int64),
             mask=((offs == 0) | (offs > _count(keep))) & (offs < R))
    tl.debug_barrier()
    # runs of consecutive offsets: starts into LO, ends into HI (a run reaching N - 1 ends at N)
    su = tl.load(S + row + offs, mask=offs < R, other=N).to(tl.int32)
    prev = tl.load(S + row + offs - 1, mask=(offs > 0) & (offs < R), other=-2).to(tl.int32)
    nxt = tl.load(S + row + offs + 1, mask=offs + 1 < R, other=N).to(tl.int32)
    valid = su < N
    scr = pid * BLOCK
    _compact_store(LO + scr, su, valid & (su != prev + 1), N, offs, BLOCK)
    _compact_store(HI + scr, su, valid & (nxt != su + 1), N, offs, BLOCK)
    tl.debug_barrier()
    w = tl.minimum(tl.load(HI + scr), N - 1)
    tl.store(W + pid, w.to(tl.int64))
    sh = ((BAND_MIN > 0) & (w + 1 >= BAND_MIN)).to(tl.int32)  # the band's run is left out
    lo = tl.load(LO + scr + offs + sh, mask=offs + sh < BLOCK, other=N)
    hi = tl.load(HI + scr + offs + sh, mask=offs + sh < BLOCK, other=N)
    prev_hi = tl.load(HI + scr + offs + sh - 1, mask=(offs > 0) & (offs + sh - 1 < BLOCK), other=-(1 << 30))
    nxt_lo = tl.load(LO + scr + offs + sh + 1, mask=offs + sh + 1 < BLOCK, other=N)
    valid = (lo < N) & (offs < R)
    g_start = valid & (lo - prev_hi - 1 > MERGE_GAP)
    g_end = valid & ((nxt_lo - hi - 1 > MERGE_GAP) | (nxt_lo >= N))
    _compact_store(GLO + row, lo.to(tl.int64), g_start, N, offs, R)
    _compact_store(GHI + row, hi.to(tl.int64), g_end, N, offs, R)
    _compact_store(EX + row, (g_start & g_end).to(tl.int64), g_start, 1, offs, R)
    tl.debug_barrier()
    # the nearest MAX_TILED exact groups
    glo = tl.load(GLO + row + offs, mask=offs < R, other=N)
    ghi = tl.load(GHI + row + offs, mask=offs < R, other=N)
    ex = (glo < N) & (tl.load(EX + row + offs, mask=offs < R, other=0) != 0)
    keep = ex & (_cumsum(ex) <= MAX_TILED)
    _compact_store(TLO + pid * MAX_TILED, glo, keep, N, offs, MAX_TILED)
    _compact_store(THI + pid * MAX_TILED, ghi, keep, N, offs, MAX_TILED)
    tl.store(EX + row + offs, glo * 0, mask=ex & ~keep)


@triton.jit
def _floor_div(a, b):  # b > 0; Triton's // truncates toward zero
    return tl.where(a < 0, (a - b + 1) // b, a // b)


@triton.jit
def _run_tiles(lo, hi, N, BM: tl.constexpr, BN: tl.constexpr):
    """Exact runs (offsets lo..hi, int32 scalars or vectors; lo >= N: none) on query blocks of BM rows
    -> (lo, hi, u_lo, nu, a, bq, n_head, n_tail): nu unmasked BN-key tiles from key m0 + u_lo, masked
    head edges from m0 - hi up to m0 + a, tail edges from m0 + bq up to m0 + BM - lo (as
    index._relative_tiles)."""
    hi = tl.minimum(hi, N)
    ok = lo < N
    lo = tl.where(ok, lo, 0)
    hi = tl.where(ok, hi, 0)
    u_lo = -_floor_div(-(BM - 1 - hi), BN) * BN
    u_hi = _floor_div(-lo - BN + 1, BN) * BN
    nu = tl.where(ok, tl.maximum(_floor_div(u_hi - u_lo, BN) + 1, 0), 0)
    a = tl.where(nu > 0, u_lo, BM - lo)
    bq = tl.where(nu > 0, u_lo + nu * BN, BM - lo)
    n_head = tl.where(ok, -_floor_div(-(a + hi), BN), 0)
    n_tail = tl.where(ok, -_floor_div(-(BM - lo - bq), BN), 0)
    return lo, hi, u_lo, nu, a, bq, n_head, n_tail


@triton.jit
def _runs_at(TLO, THI, j0, CAP, N, RB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NW: tl.constexpr):
    """Runs j0 .. j0 + RB - 1 of a head as vectors [RB]: _run_tiles' values, plus hn / tn (int32 0 / 1):
    the last head edge / the last tail edge is at most NW keys wide (a narrow edge; never with NW 0;
    the other edges are BN wide)."""
    j = j0 + tl.arange(0, RB)
    lo = tl.load(TLO + j, mask=j < CAP, other=N).to(tl.int32)
    hi = tl.load(THI + j, mask=j < CAP, other=N).to(tl.int32)
    lo, hi, u_lo, nu, a, bq, nh, nt = _run_tiles(lo, hi, N, BM, BN)
    hn = ((nh > 0) & (a + hi - (nh - 1) * BN <= NW)).to(tl.int32)
    tn = ((nt > 0) & (BM - lo - bq - (nt - 1) * BN <= NW)).to(tl.int32)
    return lo, hi, u_lo, nu, a, bq, nh, nt, hn, tn


@triton.jit
def _store_edges(E, pos, start, end, lo, hi, mask):
    e = E + pos * 4
    tl.store(e, start.to(tl.int32), mask=mask)
    tl.store(e + 1, end.to(tl.int32), mask=mask)
    tl.store(e + 2, lo.to(tl.int32), mask=mask)
    tl.store(e + 3, hi.to(tl.int32), mask=mask)


@triton.jit
def _pad_edges(E, first, TE, FAR, KB: tl.constexpr):
    k = tl.arange(0, KB)
    for t0 in range(first, TE, KB):
        _store_edges(E, t0 + k, -FAR + k * 0, k * 0, k * 0, k * 0, t0 + k < TE)


@triton.jit
def relative_tiles_kernel(TLO, THI, TILES, TCOUNT, EDG, ECOUNT, ENAR, NCOUNT, N, NQB, CAP, TU, TE, FAR,
                          BM: tl.constexpr, BN: tl.constexpr, NW: tl.constexpr, RB: tl.constexpr,
                          RC: tl.constexpr, KT: tl.constexpr, KE: tl.constexpr, KB: tl.constexpr,
                          QB: tl.constexpr):
    """Program (head, chunk): the head's CAP exact runs TLO / THI (sorted, padding N; consecutive runs
    more than BM offsets apart). Chunk 0 writes TILES [TU] relative unmasked tile starts, descending
    (padding -FAR), and EDG [TE, 4] (start, end, lo, hi) by start descending (padding (-FAR, 0, 0, 0));
    with NW > 0 the edges at most NW keys wide go to ENAR [TE, 4] instead. Every program writes, for
    its QB query blocks, TCOUNT (tiles with start >= -m0), ECOUNT (edges with start > -m0 - BN) and
    NCOUNT (narrow edges with start > -m0 - NW). Run j + 1's tiles and edges lie left of run j's, so
    each list is in order without a sort; the runs are taken RB at a time as vectors (positions from
    prefix sums), no per-run loop; the counts RC runs x QB query blocks at a time (RC 16, QB 64: ptxas
    kept 64 x 64 in 255 registers with spills, two programs per SM)."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    TLO += pid * CAP
    THI += pid * CAP
    if chunk == 0:
        TILES += pid * TU
        EDG += pid * TE * 4
        ENAR += pid * TE * 4
        kt = tl.arange(0, KT)[None, :]
        k = tl.arange(0, KE)[None, :]
        tpos = 0
        epos = 0
        npos = 0
        for j0 in range(0, CAP, RB):
            lo, hi, u_lo, nu, a, bq, nh, nt, hn, tn = _runs_at(TLO, THI, j0, CAP, N, RB, BM, BN, NW)
            nn = hn + tn
            ne = nh + nt - nn  # the wide ones
            t_at = tpos + _cumsum(nu) - nu  # each run's first slot in each list
            e_at = epos + _cumsum(ne) - ne
            n_at = npos + _cumsum(nn) - nn
            for k0 in range(0, _most(nu), KT):
                kk = k0 + kt
                tl.store(TILES + (t_at + nu - 1)[:, None] - kk, (u_lo[:, None] + kk * BN).to(tl.int32),
                         mask=kk < nu[:, None])
            # edge k of a run (ascending start): heads k < nh, then tails; a narrow head edge (the
            # last head) precedes the tails, so a wide edge's rank among the wide ones is k - that
            nh2 = nh[:, None]
            head = k < nh2
            start = tl.where(head, -hi[:, None] + k * BN, bq[:, None] + (k - nh2) * BN)
            end = tl.where(head, a[:, None], BM - lo[:, None])
            real = k < (nh + nt)[:, None]
            narrow = ((k == nh2 - 1) & (hn[:, None] != 0)) | ((k == (nh + nt)[:, None] - 1) & (tn[:, None] != 0))
            before = ((k >= nh2) & (hn[:, None] != 0)).to(tl.int32)  # narrow edges before edge k
            lo2 = lo[:, None] + k * 0
            hi2 = hi[:, None] + k * 0
            _store_edges(EDG, (e_at + ne - 1)[:, None] - (k - before), start, end, lo2, hi2, real & ~narrow)
            if NW > 0:
                _store_edges(ENAR, (n_at + nn - 1)[:, None] - before, start, end, lo2, hi2, real & narrow)
            tpos += _count(nu)
            epos += _count(ne)
            npos += _count(nn)
        kb = tl.arange(0, KB)
        for t0 in range(tpos, TU, KB):
            tl.store(TILES + t0 + kb, -FAR + kb * 0, mask=t0 + kb < TU)
        _pad_edges(EDG, epos, TE, FAR, KB)
        if NW > 0:
            _pad_edges(ENAR, npos, TE, FAR, KB)
    # counts: query blocks x runs, RC runs at a time
    qb = chunk * QB + tl.arange(0, QB)
    m0 = (qb * BM)[None, :]
    tc = qb * 0  # (tl.zeros: not in the interpreter)
    ec = qb * 0
    nc = qb * 0
    for j0 in range(0, CAP, RC):
        lo, hi, u_lo, nu, a, bq, nh, nt, hn, tn = _runs_at(TLO, THI, j0, CAP, N, RC, BM, BN, NW)
        lo, hi, u_lo, nu, a, bq = lo[:, None], hi[:, None], u_lo[:, None], nu[:, None], a[:, None], bq[:, None]
        nh, nt, hn, tn = nh[:, None], nt[:, None], hn[:, None], tn[:, None]
        tc += _count(tl.minimum(tl.maximum(nu - tl.maximum(-_floor_div(m0 + u_lo, BN), 0), 0), nu))
        e = tl.minimum(tl.maximum(nh - tl.maximum(_floor_div(hi - m0 - BN, BN) + 1, 0), 0), nh)
        e += tl.minimum(tl.maximum(nt - tl.maximum(_floor_div(-m0 - BN - bq, BN) + 1, 0), 0), nt)
        if NW > 0:  # the narrow last head / tail edges: out of the wide count, into the narrow one
            sh = -hi + (nh - 1) * BN
            st = bq + (nt - 1) * BN
            e -= hn * (sh > -m0 - BN).to(tl.int32) + tn * (st > -m0 - BN).to(tl.int32)
            nc += _count(hn * (sh > -m0 - NW).to(tl.int32) + tn * (st > -m0 - NW).to(tl.int32))
        ec += _count(e)
    tl.store(TCOUNT + pid * NQB + qb, tc, mask=qb < NQB)
    tl.store(ECOUNT + pid * NQB + qb, ec, mask=qb < NQB)
    if NW > 0:
        tl.store(NCOUNT + pid * NQB + qb, nc, mask=qb < NQB)
