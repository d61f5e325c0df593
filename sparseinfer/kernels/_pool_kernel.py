"""Triton kernel: undo RoPE and pool blocks of tokens in one pass (learned-gate features).

Only @triton.jit code; ``sparseinfer.kernels.pool`` loads it compiled (CUDA tensors) or under
the Triton interpreter (CPU tensors). One program = HG heads of one batch x one block of BLOCK
tokens, walked ROWS rows at a time (the loads of the next chunks in flight while one is summed,
running sum / max / min kept per row slot and reduced once at the end); each chunk's cos / sin
rows are loaded once for the HG heads, and programs of the same block run next to each other, so
those rows come from L2. fp32 arithmetic throughout.
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
    BLOCK: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr, HG: tl.constexpr,
    AVG_AT: tl.constexpr, MAX_AT: tl.constexpr, MIN_AT: tl.constexpr,
):
    pid = tl.program_id(0)  # (batch, head group), fastest: the heads of one block run together
    blk = tl.program_id(1)
    ngroups = (H + HG - 1) // HG
    b = pid // ngroups
    heads = (pid % ngroups) * HG + tl.arange(0, HG)
    h_ok = (heads < H)[:, None, None]
    cols = tl.arange(0, HALF)
    x_base = X + b * stride_xb + heads[:, None, None] * stride_xh + cols[None, None, :]
    c_base = COS + b * stride_cb + cols[None, :]
    s_base = SIN + b * stride_cb + cols[None, :]
    sum1 = tl.full([HG, ROWS, HALF], 0.0, tl.float32)
    sum2 = tl.full([HG, ROWS, HALF], 0.0, tl.float32)
    max1 = tl.full([HG, ROWS, HALF], float("-inf"), tl.float32)
    max2 = tl.full([HG, ROWS, HALF], float("-inf"), tl.float32)
    min1 = tl.full([HG, ROWS, HALF], float("inf"), tl.float32)
    min2 = tl.full([HG, ROWS, HALF], float("inf"), tl.float32)
    for r0 in tl.range(0, BLOCK, ROWS, num_stages=STAGES):
        r = r0 + tl.arange(0, ROWS)
        rows = blk * block_size + r
        mr = ((r < block_size) & (rows < N))[:, None]  # [ROWS, 1]
        m = mr[None, :, :] & h_ok  # [HG, ROWS, 1]
        x_ptr = x_base + rows[None, :, None] * stride_xn
        y1 = tl.load(x_ptr, mask=m, other=0.0).to(tl.float32)
        y2 = tl.load(x_ptr + HALF, mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(c_base + rows[:, None] * stride_cn, mask=mr, other=1.0)
        c2 = tl.load(c_base + rows[:, None] * stride_cn + HALF, mask=mr, other=1.0)
        s1 = tl.load(s_base + rows[:, None] * stride_cn, mask=mr, other=0.0)
        s2 = tl.load(s_base + rows[:, None] * stride_cn + HALF, mask=mr, other=0.0)
        # RoPE: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 (cos^2 + sin^2 = scale^2) -> x = inverse
        a1 = (c1 / (c1 * c1 + s1 * s1))[None, :, :]
        b1 = (s1 / (c1 * c1 + s1 * s1))[None, :, :]
        a2 = (c2 / (c2 * c2 + s2 * s2))[None, :, :]
        b2 = (s2 / (c2 * c2 + s2 * s2))[None, :, :]
        x1 = y1 * a1 + y2 * b1
        x2 = y2 * a2 - y1 * b2
        if AVG_AT >= 0:  # masked rows load y = 0: x = 0
            sum1 += x1
            sum2 += x2
        if MAX_AT >= 0:
            max1 = tl.maximum(max1, tl.where(m, x1, float("-inf")))
            max2 = tl.maximum(max2, tl.where(m, x2, float("-inf")))
        if MIN_AT >= 0:
            min1 = tl.minimum(min1, tl.where(m, x1, float("inf")))
            min2 = tl.minimum(min2, tl.where(m, x2, float("inf")))
    o_base = OUT + b * stride_ob + heads[:, None] * stride_oh + blk * stride_ok + cols[None, :]
    ho = (heads < H)[:, None]
    if AVG_AT >= 0:
        cnt = tl.minimum(block_size, N - blk * block_size).to(tl.float32)
        tl.store(o_base + AVG_AT * 2 * HALF, tl.reduce(sum1, 1, _sum_fn) / cnt, mask=ho)
        tl.store(o_base + AVG_AT * 2 * HALF + HALF, tl.reduce(sum2, 1, _sum_fn) / cnt, mask=ho)
    if MAX_AT >= 0:
        tl.store(o_base + MAX_AT * 2 * HALF, tl.reduce(max1, 1, _max_fn), mask=ho)
        tl.store(o_base + MAX_AT * 2 * HALF + HALF, tl.reduce(max2, 1, _max_fn), mask=ho)
    if MIN_AT >= 0:
        tl.store(o_base + MIN_AT * 2 * HALF, tl.reduce(min1, 1, _min_fn), mask=ho)
        tl.store(o_base + MIN_AT * 2 * HALF + HALF, tl.reduce(min2, 1, _min_fn), mask=ho)
