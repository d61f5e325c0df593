"""Triton kernel: split ascending block rows at their query block (``kernels.rows``).

Only @triton.jit code; ``sparseinfer.kernels.rows`` loads it compiled (CUDA tensors) or under
the Triton interpreter (CPU tensors).
"""
import triton
import triton.language as tl


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
