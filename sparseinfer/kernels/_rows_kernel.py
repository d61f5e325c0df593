"""Triton kernels: block rows of an index (``kernels.rows``): ascending rows split at their query
block; unordered rows sorted, deduplicated and split.

Only @triton.jit code; ``sparseinfer.kernels.rows`` loads it compiled (CUDA tensors) or under
the Triton interpreter (CPU tensors). Only core language functions and the standard combine
functions the interpreter recognises (see _attn_kernel.py): the sort is a bitonic network of
tl.gather steps written here.
"""
import triton
import triton.language as tl

from triton.language.standard import _elementwise_max as _max_fn  # noqa: E402
from triton.language.standard import _sum_combine as _sum_fn  # noqa: E402


@triton.jit
def sorted_rows_kernel(IDX, TC, DIAG, ROWS, NB, K, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """BLOCK rows per program; row r = (b * H + h) * NB + q of IDX [ROWS, K] (ascending block ids,
    -1 after the last): TC[r] = how many entries lie in [0, q) (a prefix: found by bisection,
    STEPS >= log2(K + 1) loads), DIAG[r] = 1 when the entry after them is q."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < ROWS
    q = r % NB
    base = IDX + r.to(tl.int64) * K
    lo = tl.full([BLOCK], 0, tl.int32)  # entries [0, lo) are in [0, q)
    hi = tl.full([BLOCK], 0, tl.int32) + K  # entries [hi, K) are not
    for _ in range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        x = tl.load(base + mid, mask=ok & active, other=-1)
        inside = (x >= 0) & (x < q)
        lo = tl.where(active & inside, mid + 1, lo)
        hi = tl.where(active & (x < 0), mid, hi)
        hi = tl.where(active & (x >= q), mid, hi)
    d = tl.load(base + lo, mask=ok & (lo < K), other=-1)
    tl.store(TC + r, lo, mask=ok)
    tl.store(DIAG + r, (d == q).to(tl.int8), mask=ok)


@triton.jit
def _bitonic_sort(s, j, LOG: tl.constexpr):
    """Sort each row of s [R, 2^LOG] ascending (j = arange(2^LOG)[None, :]): at stage (k, d) each
    slot takes the min or max of itself and its partner slot ^ d, ascending runs where slot & k == 0."""
    for a in tl.static_range(1, LOG + 1):
        for b in tl.static_range(a):
            d = 1 << (a - 1 - b)
            partner = j ^ d
            other = tl.gather(s, partner + 0 * s, 1)
            up = (j & (1 << a)) == 0  # the run this slot belongs to ascends
            low = j < partner  # this slot is the lower of the pair
            take_min = up == low
            s = tl.where(take_min, tl.minimum(s, other), tl.maximum(s, other))
    return s


@triton.jit
def block_lists_kernel(IDX, TILES, TC, DIAG, ROWS, NB, K, stride_ir, BIG,
                       BR: tl.constexpr, KP: tl.constexpr, LOG: tl.constexpr):
    """BR rows per program; row r = (b * H + h) * NB + q of IDX [ROWS, K] (block ids in any order,
    -1 padding, repeats allowed; row stride stride_ir): TILES[r, :TC[r]] = the distinct ids in
    [0, q) ascending (TILES [ROWS, K] int32; later entries unwritten), DIAG[r] = 1 when q is listed.
    KP = 2^LOG >= K."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = r < ROWS
    q = (r % NB)[:, None]
    j = tl.arange(0, KP)[None, :]
    x = tl.load(IDX + r.to(tl.int64)[:, None] * stride_ir + j, mask=ok[:, None] & (j < K), other=-1).to(tl.int32)
    diag = tl.reduce((x == q).to(tl.int32), 1, _max_fn)
    s = _bitonic_sort(tl.where((x >= 0) & (x < q), x, BIG), j + 0 * x, LOG)
    prev = tl.gather(s, tl.maximum(j - 1, 0) + 0 * s, 1)
    keep = (s < BIG) & ((j == 0) | (s != prev))
    ki = keep.to(tl.int32)
    pos = tl.associative_scan(ki, 1, _sum_fn) - 1
    tl.store(TILES + r.to(tl.int64)[:, None] * K + pos, s, mask=keep & ok[:, None])
    tl.store(TC + r, tl.reduce(ki, 1, _sum_fn), mask=ok)
    tl.store(DIAG + r, diag.to(tl.int8), mask=ok)


@triton.jit
def _listed(base, n, y, STEPS: tl.constexpr):
    """bool [BLOCK]: whether each y [BLOCK] is among the first n entries of the ascending row at
    base (bisection, STEPS >= log2(n + 1) loads)."""
    lo = y * 0
    hi = y * 0 + n
    for _ in range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        x = tl.load(base + mid, mask=active, other=0)
        lo = tl.where(active & (x < y), mid + 1, lo)
        hi = tl.where(active & (x >= y), mid, hi)
    x = tl.load(base + lo, mask=lo < n, other=-1)
    return (lo < n) & (x == y)


@triton.jit
def pair_split_kernel(IDX, TC, REST, RC, PAIRS, PC, NB, K, KP, DENSE_FROM,
                      BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """Row r = (b * H + h) * NB + q of IDX [ROWS, K] (ascending block ids; its first TC[r] lie in
    [0, q)) and its partner row q ^ 1 of the same head (none when q ^ 1 >= NB): key block pair
    J (blocks 2J, 2J + 1) is a pair block of the query pair I = q // 2 when J < I, both rows'
    prefixes list 2J and 2J + 1 (a missing partner row counts as listing them) and the pair's
    rows lie below DENSE_FROM. REST[r, :RC[r]] = the prefix without pair-block entries (ascending;
    later entries unwritten); the even row writes PAIRS[(b * H + h) * ceil(NB / 2) + I, :PC[..]]
    = the pair blocks J ascending, -1 up to KP."""
    r = tl.program_id(0)
    q = r % NB
    bh = r // NB
    p = q ^ 1
    has_p = p < NB
    rp = bh * NB + tl.where(has_p, p, q)
    i_pair = q // 2
    usable = tl.maximum(q, tl.where(has_p, p, q)) < DENSE_FROM
    base = IDX + r.to(tl.int64) * K
    pbase = IDX + rp.to(tl.int64) * K
    n = tl.load(TC + r)
    n_p = tl.load(TC + rp)
    rest = REST + r.to(tl.int64) * K
    pairs = PAIRS + (bh * ((NB + 1) // 2) + i_pair).to(tl.int64) * KP
    even = (q % 2) == 0
    nr = 0
    npair = 0
    for j0 in range(0, n, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ok = j < n
        x = tl.load(base + j, mask=ok, other=0)
        odd = (x % 2) == 1
        # the other block of x's pair in this row: the neighbouring entry (rows are ascending, unique)
        nb_pos = tl.where(odd, j - 1, j + 1)
        nb_val = tl.load(base + nb_pos, mask=ok & (nb_pos >= 0) & (nb_pos < n), other=-1)
        lo_blk = x - odd.to(x.dtype)
        self_pair = nb_val == (x ^ 1)
        other_pair = _listed(pbase, n_p, lo_blk, STEPS) & _listed(pbase, n_p, lo_blk + 1, STEPS)
        other_pair = other_pair | (p >= NB)
        s = ok & self_pair & other_pair & ((x // 2) < i_pair) & usable
        keep = ok & ~s
        ki = keep.to(tl.int32)
        pos = nr + tl.associative_scan(ki, 0, _sum_fn) - 1
        tl.store(rest + pos, x.to(tl.int32), mask=keep)
        nr += tl.reduce(ki, 0, _sum_fn)
        if even:
            first = s & ~odd
            fi = first.to(tl.int32)
            ppos = npair + tl.associative_scan(fi, 0, _sum_fn) - 1
            tl.store(pairs + ppos, (x // 2).to(tl.int32), mask=first)
            npair += tl.reduce(fi, 0, _sum_fn)
    tl.store(RC + r, nr)
    if even:
        tl.store(PC + bh * ((NB + 1) // 2) + i_pair, npair)
        for p0 in range(npair, KP, BLOCK):
            pp = p0 + tl.arange(0, BLOCK)
            tl.store(pairs + pp, tl.full([BLOCK], -1, tl.int32), mask=pp < KP)
