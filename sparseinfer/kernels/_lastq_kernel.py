"""Triton kernel: column and diagonal sums of the estimating queries' softmax (MInference /
MMInference index estimation) from the logits, in one pass per output block.

Only @triton.jit code; ``sparseinfer.kernels.lastq`` loads it compiled (CUDA tensors) or under
the Triton interpreter (CPU tensors). One program = one (batch, head, query group) x one block
of BLOCK key positions / offsets; it loops over the group's L queries.
"""
import triton
import triton.language as tl

# standard combine functions the interpreter recognises by identity (see _attn_kernel.py)
from triton.language.standard import _elementwise_max as _max_fn  # noqa: E402
from triton.language.standard import _sum_combine as _sum_fn  # noqa: E402


@triton.jit
def lastq_sums_kernel(
    S, LSE, POS, W, COL, DIAG,
    stride_sb, stride_sh, stride_st,
    N, H, G, L, SCALE,
    BLOCK: tl.constexpr, WITH_DIAG: tl.constexpr = True,
):
    pid = tl.program_id(0)
    g = pid % G
    h = (pid // G) % H
    b = pid // (G * H)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    col = tl.full([BLOCK], 0.0, dtype=tl.float32)  # not tl.zeros: see _attn_kernel.py
    diag = tl.full([BLOCK], 0.0, dtype=tl.float32)
    for t in range(0, L):
        row = g * L + t
        base = S + b * stride_sb + h * stride_sh + row * stride_st
        lse = tl.load(LSE + (b * H + h) * G * L + row)
        p_t = tl.load(POS + b * G * L + row)
        w = tl.load(W + b * G * L + row)
        x = tl.load(base + offs, mask=inb & (offs <= p_t), other=float("-inf"))
        col += w * tl.exp(x * SCALE - lse)
        if WITH_DIAG:
            j = p_t - offs  # offset o = offs <-> key p_t - o
            y = tl.load(base + j, mask=inb & (j >= 0), other=float("-inf"))
            diag += w * tl.exp(y * SCALE - lse)
    out = ((b * G + g) * H + h) * N
    tl.store(COL + out + offs, col, mask=inb)
    if WITH_DIAG:
        tl.store(DIAG + out + offs, diag, mask=inb)


@triton.jit
def lastq_lse_kernel(
    S, POS, LSE,
    stride_sb, stride_sh, stride_st,
    H, GL, SCALE,
    BLOCK: tl.constexpr,
):
    """logsumexp of one row of s over its causal keys 0..pos (one program per (b, h, row)):
    an online max / sum per lane, combined at the end. Logits are s * SCALE."""
    pid = tl.program_id(0)
    row = pid % GL
    h = (pid // GL) % H
    b = pid // (GL * H)
    base = S + b * stride_sb + h * stride_sh + row * stride_st
    p_t = tl.load(POS + b * GL + row)
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    acc = tl.full([BLOCK], 0.0, dtype=tl.float32)
    for n0 in range(0, p_t + 1, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs <= p_t, other=float("-inf")) * SCALE
        m_new = tl.maximum(m, x)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - m_use) + tl.exp(x - m_use)
        m = m_new
    top = tl.reduce(m, 0, _max_fn)
    total = tl.reduce(acc * tl.exp(m - top), 0, _sum_fn)
    tl.store(LSE + pid, top + tl.log(total))
