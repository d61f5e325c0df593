"""Triton kernel: undo RoPE and pool 64-token blocks in one pass (learned-gate features).

Only @triton.jit code; ``sparseinfer.kernels.pool`` loads it compiled (CUDA tensors) or under
the Triton interpreter (CPU tensors). One program = one (batch, head) x one block of BLOCK
tokens; programs of the same block (all heads) run next to each other, so the block's cos /
sin rows are read from L2. fp32 arithmetic throughout.
"""
import triton
import triton.language as tl

# standard combine functions the interpreter recognises by identity (see _attn_kernel.py)
from triton.language.standard import _elementwise_max as _max_fn  # noqa: E402
from triton.language.standard import _elementwise_min as _min_fn  # noqa: E402
from triton.language.standard import _sum_combine as _sum_fn  # noqa: E402


@triton.jit
def unrotate_pool_kernel(
    X, COS, SIN, OUT,
    stride_xb, stride_xh, stride_xn,
    stride_cb, stride_cn,
    stride_ob, stride_oh, stride_ok,
    N, H, block_size,
    BLOCK: tl.constexpr, HALF: tl.constexpr,
    AVG_AT: tl.constexpr, MAX_AT: tl.constexpr, MIN_AT: tl.constexpr,
):
    pid = tl.program_id(0)  # (batch, head), fastest: heads of one block run together
    blk = tl.program_id(1)
    b = pid // H
    h = pid % H
    rows = blk * block_size + tl.arange(0, BLOCK)
    valid = (tl.arange(0, BLOCK) < block_size) & (rows < N)
    cols = tl.arange(0, HALF)
    x_ptr = X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xn + cols[None, :]
    c_ptr = COS + b * stride_cb + rows[:, None] * stride_cn + cols[None, :]
    s_ptr = SIN + b * stride_cb + rows[:, None] * stride_cn + cols[None, :]
    m = valid[:, None]
    y1 = tl.load(x_ptr, mask=m, other=0.0).to(tl.float32)
    y2 = tl.load(x_ptr + HALF, mask=m, other=0.0).to(tl.float32)
    c1 = tl.load(c_ptr, mask=m, other=1.0)
    c2 = tl.load(c_ptr + HALF, mask=m, other=1.0)
    s1 = tl.load(s_ptr, mask=m, other=0.0)
    s2 = tl.load(s_ptr + HALF, mask=m, other=0.0)
    # RoPE: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 (cos^2 + sin^2 = scale^2) -> x = inverse
    x1 = (y1 * c1 + y2 * s1) / (c1 * c1 + s1 * s1)
    x2 = (y2 * c2 - y1 * s2) / (c2 * c2 + s2 * s2)
    o_base = OUT + b * stride_ob + h * stride_oh + blk * stride_ok
    if AVG_AT >= 0:
        cnt = tl.reduce(valid.to(tl.float32), 0, _sum_fn)
        tl.store(o_base + AVG_AT * 2 * HALF + cols, tl.reduce(x1, 0, _sum_fn) / cnt)
        tl.store(o_base + AVG_AT * 2 * HALF + HALF + cols, tl.reduce(x2, 0, _sum_fn) / cnt)
    if MAX_AT >= 0:
        tl.store(o_base + MAX_AT * 2 * HALF + cols, tl.reduce(tl.where(m, x1, float("-inf")), 0, _max_fn))
        tl.store(o_base + MAX_AT * 2 * HALF + HALF + cols, tl.reduce(tl.where(m, x2, float("-inf")), 0, _max_fn))
    if MIN_AT >= 0:
        tl.store(o_base + MIN_AT * 2 * HALF + cols, tl.reduce(tl.where(m, x1, float("inf")), 0, _min_fn))
        tl.store(o_base + MIN_AT * 2 * HALF + HALF + cols, tl.reduce(tl.where(m, x2, float("inf")), 0, _min_fn))
