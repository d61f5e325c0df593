"""Triton kernels of the learned gate's threshold selection: block scores, their softmax and the
kept blocks in one launch, no [nb, nb] score matrix in memory; then the kept blocks as index rows.

Only @triton.jit code; ``sparseinfer.kernels.gate`` loads it compiled (CUDA tensors) or under
the Triton interpreter (CPU tensors).
"""
import triton
import triton.language as tl

# combine functions of triton's standard library, which the interpreter recognises (see _attn_kernel.py)
from triton.language.standard import _elementwise_max as _max_fn  # noqa: E402
from triton.language.standard import _sum_combine as _sum_fn  # noqa: E402


@triton.jit
def _logits(gq, kbase, j, NB, stride_kn, offs_w, w_ok, rows, PREC: tl.constexpr):
    """[RB, BK] logits (log2 units) of the query rows gq [RB, WP] against key blocks j [BK];
    -inf past each row's diagonal."""
    gk = tl.load(kbase + j[:, None] * stride_kn + offs_w[None, :], mask=(j[:, None] < NB) & w_ok[None, :], other=0.0)
    lg = tl.dot(gq, tl.trans(gk), input_precision=PREC)
    return tl.where(j[None, :] <= rows[:, None], lg, float("-inf"))


@triton.jit
def gate_keep_kernel(GQ, GK, WORDS, CNT, NB, HQ, GROUP, WID, NW, THR, SCALE_LOG2,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     WP: tl.constexpr, RB: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Rows r0 .. r0 + RB of (batch b, query head h): logits l_j = SCALE * gq[r] . gk[j] over key
    blocks j <= r (gk of the head's KV head), p = softmax(l); kept: p_j >= THR, the sink j = 0,
    the diagonal j = r. Two passes over the key blocks (the
    rows' max and sum, then the decisions); each row's kept set as bits (bit j % 32 of word
    j // 32 of WORDS[row, :NW]; the words past the group's last row's diagonal are not written)
    and its count in CNT[row]: one decision per block, so counts and bits always agree."""
    pid = tl.program_id(0)
    ngrp = (NB + RB - 1) // RB
    g = pid % ngrp
    h = (pid // ngrp) % HQ
    b = pid // (ngrp * HQ)
    rows = g * RB + tl.arange(0, RB)
    r_ok = rows < NB
    offs_w = tl.arange(0, WP)
    w_ok = offs_w < WID
    gq = tl.load(GQ + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_w[None, :],
                 mask=r_ok[:, None] & w_ok[None, :], other=0.0) * SCALE_LOG2  # log2 units: exp2 below
    kbase = GK + b * stride_kb + (h // GROUP) * stride_kh
    last = tl.minimum(g * RB + RB, NB)  # key blocks 0 .. last - 1 are causal for some row
    m = tl.full([RB], -1.0e30, dtype=tl.float32)  # finite start: no inf - inf; block 0 is always causal
    s = tl.full([RB], 0.0, dtype=tl.float32)
    for j0 in range(0, last, BK):
        lg = _logits(gq, kbase, j0 + tl.arange(0, BK), NB, stride_kn, offs_w, w_ok, rows, PREC)
        mn = tl.maximum(m, tl.reduce(lg, 1, _max_fn))
        s = s * tl.exp2(m - mn) + tl.reduce(tl.exp2(lg - mn[:, None]), 1, _sum_fn)
        m = mn
    cut = THR * s  # p_j >= THR  <=>  exp2(l_j - m) >= THR * sum
    row_base = ((b * HQ + h) * NB + rows).to(tl.int64) * NW
    cnt = tl.full([RB], 0, dtype=tl.int32)
    bit = tl.arange(0, 32)
    for j0 in range(0, last, BK):
        j = j0 + tl.arange(0, BK)
        lg = _logits(gq, kbase, j, NB, stride_kn, offs_w, w_ok, rows, PREC)
        keep = (tl.exp2(lg - m[:, None]) >= cut[:, None]) | (j[None, :] == 0) | (j[None, :] == rows[:, None])
        keep = keep & (j[None, :] <= rows[:, None])
        ki = keep.to(tl.int32)
        cnt += tl.reduce(ki, 1, _sum_fn)
        words = tl.reduce(tl.reshape(ki, [RB, BK // 32, 32]) << bit[None, None, :], 2, _sum_fn)  # distinct bits
        wi = j0 // 32 + tl.arange(0, BK // 32)
        tl.store(WORDS + row_base[:, None] + wi[None, :], words, mask=r_ok[:, None] & (wi[None, :] < NW))
    tl.store(CNT + (b * HQ + h) * NB + rows, cnt, mask=r_ok)


@triton.jit
def gate_index_kernel(WORDS, CNT, IDX, NB, NW, OUT_W, BLOCK: tl.constexpr):
    """Row `pid`'s kept bits (WORDS[pid, :NW], blocks 0 .. r for row r = pid % NB: later words may
    be unwritten) -> ascending block indices in IDX[pid, :OUT_W] (int32), -1 after the last."""
    r = tl.program_id(0) % NB
    pid = tl.program_id(0).to(tl.int64)
    n = tl.load(CNT + pid)
    wbase = WORDS + pid * NW
    out = IDX + pid * OUT_W
    base = 0
    for j0 in range(0, r + 1, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ok = j <= r
        w = tl.load(wbase + j // 32, mask=ok, other=0)
        keep = (((w >> (j % 32)) & 1) != 0) & ok
        ki = keep.to(tl.int32)
        pos = base + tl.associative_scan(ki, 0, _sum_fn) - 1
        tl.store(out + pos, j, mask=keep & (pos < OUT_W))  # OUT_W >= the count (kernels.gate)
        base += tl.reduce(ki, 0, _sum_fn)
    for p0 in range(n, OUT_W, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        tl.store(out + p, tl.full([BLOCK], -1, tl.int32), mask=p < OUT_W)
