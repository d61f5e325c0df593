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
