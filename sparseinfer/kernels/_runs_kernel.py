"""Triton kernel: a head's slash offsets -> sorted unique offsets, runs, merged ranges (see runs.py).

One program per (batch, head) holds the head's offsets (sorted beforehand by torch.sort) in
registers (BLOCK >= Ns + 1); each step's prefix sums compact the kept entries; a step that needs
its neighbours' values reads them back from the outputs it just wrote (a barrier in between).
"""
import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _cumsum(x):  # the interpreter serves tl.associative_scan / tl.reduce, not tl.cumsum / tl.sum
    return tl.associative_scan(x.to(tl.int32), 0, _add)


@triton.jit
def _count(x):
    return tl.reduce(x.to(tl.int32), 0, _add)


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
def _run_tiles(TLO, THI, j, N, BM: tl.constexpr, BN: tl.constexpr):
    """Exact run j of a head (TLO / THI: its offsets lo..hi, lo = N: none) on query blocks of BM rows
    -> (lo, hi, u_lo, nu, a, bq, n_head, n_tail): nu unmasked BN-key tiles from key m0 + u_lo, masked
    head edges from m0 - hi up to m0 + a, tail edges from m0 + bq up to m0 + BM - lo (as
    index._relative_tiles)."""
    lo = tl.load(TLO + j).to(tl.int32)
    hi = tl.minimum(tl.load(THI + j).to(tl.int32), N)
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
def relative_tiles_kernel(TLO, THI, TILES, TCOUNT, EDG, ECOUNT, N, NQB, CAP, TU, TE, FAR,
                          BM: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr, QB: tl.constexpr):
    """Per program (one head): its CAP exact runs TLO / THI (sorted, padding N; consecutive runs more
    than BM offsets apart) -> TILES [TU] relative unmasked tile starts, descending (padding -FAR),
    TCOUNT [NQB] tiles with start >= -m0; EDG [TE, 4] (start, end, lo, hi) by start descending
    (padding (-FAR, 0, 0, 0)), ECOUNT [NQB] edges with start > -m0 - BN. The runs' tiles and edges
    come out already in descending order (run j + 1's lie left of run j's), so no sort."""
    pid = tl.program_id(0)
    TLO += pid * CAP
    THI += pid * CAP
    TILES += pid * TU
    EDG += pid * TE * 4
    k = tl.arange(0, KB)
    tpos = 0
    epos = 0
    for j in range(CAP):
        lo, hi, u_lo, nu, a, bq, nh, nt = _run_tiles(TLO, THI, j, N, BM, BN)
        tl.store(TILES + tpos + nu - 1 - k, (u_lo + k * BN).to(tl.int32), mask=k < nu)
        ne = nh + nt
        head = k < nh
        start = tl.where(head, -hi + k * BN, bq + (k - nh) * BN)
        end = tl.where(head, a, BM - lo)
        e = EDG + (epos + ne - 1 - k) * 4
        tl.store(e, start.to(tl.int32), mask=k < ne)
        tl.store(e + 1, end.to(tl.int32), mask=k < ne)
        tl.store(e + 2, (lo + k * 0).to(tl.int32), mask=k < ne)
        tl.store(e + 3, (hi + k * 0).to(tl.int32), mask=k < ne)
        tpos += nu
        epos += ne
    for t0 in range(tpos, TU, KB):
        tl.store(TILES + t0 + k, -FAR + k * 0, mask=t0 + k < TU)
    for t0 in range(epos, TE, KB):
        e = EDG + (t0 + k) * 4
        tl.store(e, -FAR + k * 0, mask=t0 + k < TE)
        for c in tl.static_range(1, 4):
            tl.store(e + c, k * 0, mask=t0 + k < TE)
    q = tl.arange(0, QB)
    for q0 in range(0, NQB, QB):
        m0 = (q0 + q) * BM
        tc = q * 0
        ec = q * 0
        for j in range(CAP):
            lo, hi, u_lo, nu, a, bq, nh, nt = _run_tiles(TLO, THI, j, N, BM, BN)
            tc += tl.minimum(tl.maximum(nu - tl.maximum(-_floor_div(m0 + u_lo, BN), 0), 0), nu)
            ec += tl.minimum(tl.maximum(nh - tl.maximum(_floor_div(hi - m0 - BN, BN) + 1, 0), 0), nh)
            ec += tl.minimum(tl.maximum(nt - tl.maximum(_floor_div(-m0 - BN - bq, BN) + 1, 0), 0), nt)
        tl.store(TCOUNT + pid * NQB + q0 + q, tc.to(tl.int32), mask=q0 + q < NQB)
        tl.store(ECOUNT + pid * NQB + q0 + q, ec.to(tl.int32), mask=q0 + q < NQB)
