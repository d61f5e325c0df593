"""Triton top-k selection without a sort (only @triton.jit code; ``sparseinfer.kernels.topk``
loads it compiled for CUDA or under the Triton interpreter for CPU; ``_raas_kernel`` shares
its helpers).

The k-th largest score is found by bisection on the scores' ordered integer keys (a float's
bit pattern with the magnitude bits of negative values flipped orders like the float), each
step one count over the row held in registers; ties at the threshold go to the lower position.
(Radix select with tl.histogram, 8 bits per pass, measured slower on an H100: 29-40 us vs 20.5
us for 14336 bf16 scores; benchmarks/results/contextual/contextual_topk_radix.md.)

topk_indices_kernel: one program per row of BITS [R, n] (the scores' bit patterns: int16 for
    fp16 / bf16, int32 for fp32) -> OUT [R, k] int32, the positions of the row's k largest
    scores in ascending order (a compacted mask: no sort of the kept list either); MASK_OUT:
    OUT [R, n] uint8, 1 at the kept positions. CAUSAL: the rows are query blocks i = row % n of
    square block-score matrices [n, n]: only positions j <= i count, j = i is always kept, and a
    row keeps min(k, i + 1) positions (the caller fills OUT with -1 first); a launch takes the
    rows ROW0 .. ROW0 + ROWS - 1 of every matrix, so rows of one length class share N_P2.
"""
import triton
import triton.language as tl

# standard-library combine functions only (see _gemv_kernel.py: this module also runs under the
# interpreter when triton was imported in compiled mode)
from triton.language.standard import _elementwise_max as _max_fn  # noqa: E402
from triton.language.standard import _elementwise_min as _min_fn  # noqa: E402
from triton.language.standard import _sum_combine as _sum_fn  # noqa: E402


@triton.jit
def _kth_largest_key(key, n, STEPS: tl.constexpr):
    """The n-th largest of the int32 keys (n >= 1; the smallest key if n exceeds their count):
    bisection on count(key >= t) >= n between the smallest and the largest key; STEPS = the
    keys' bit width + 1 always converges."""
    lo = tl.reduce(key, 0, _min_fn).to(tl.int64)  # count(key >= lo) = all
    hi = tl.reduce(key, 0, _max_fn).to(tl.int64) + 1  # count(key >= hi) = 0
    for _ in range(STEPS):
        mid = lo + (hi - lo) // 2
        ok = tl.reduce((key >= mid.to(tl.int32)).to(tl.int32), 0, _sum_fn) >= n
        lo = tl.where(ok & (hi - lo > 1), mid, lo)
        hi = tl.where(ok | (hi - lo <= 1), hi, mid)
    return lo.to(tl.int32)


@triton.jit
def _top_n(key, ok, n, STEPS: tl.constexpr):
    """bool like key: the n largest keys among `ok` (ties at the threshold in position order)."""
    t = _kth_largest_key(key, n, STEPS)
    gt = ok & (key > t)
    eq = ok & (key == t)
    room = n - tl.reduce(gt.to(tl.int32), 0, _sum_fn)
    return gt | (eq & (tl.associative_scan(eq.to(tl.int32), 0, _sum_fn) <= room))


@triton.jit
def topk_indices_kernel(BITS, OUT, n, k, stride_row, N_P2: tl.constexpr, FLIP: tl.constexpr,
                        LOWEST: tl.constexpr, STEPS: tl.constexpr, MASK_OUT: tl.constexpr = False,
                        CAUSAL: tl.constexpr = False, ROW0=0, ROWS=1):
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, N_P2)
    if CAUSAL:  # query block i of a square block-score matrix (rows ROW0 .. ROW0 + ROWS - 1 of each
        # matrix in this launch): positions j <= i, its own block first (above every score), min(k, i + 1) kept
        i = ROW0 + (pid % ROWS).to(tl.int32)
        row = (pid // ROWS) * n + i
        ok = offs <= i
        kept = tl.minimum(k, i + 1)
    else:
        row = pid
        ok = offs < n
        kept = k
    bits = tl.load(BITS + row * stride_row + offs, mask=ok, other=0).to(tl.int32)  # sign-extended
    key = tl.where(bits >= 0, bits, bits ^ FLIP)  # ordered like the floats
    if CAUSAL:
        key = tl.where(offs == i, FLIP, key)  # FLIP = the largest key of the type
    key = tl.where(ok, key, LOWEST)  # padding: below every score's key
    pick = _top_n(key, ok, kept, STEPS)
    if MASK_OUT:  # OUT [R, n] uint8: 1 where kept
        tl.store(OUT + row * n + offs, pick.to(tl.uint8), mask=ok)
    else:
        pos = tl.associative_scan(pick.to(tl.int32), 0, _sum_fn) - 1
        tl.store(OUT + row * k + pos, offs.to(tl.int32), mask=pick)
