"""Only @triton.jit code; ``sparseinfer.kernels.blockscores`` loads it compiled (CUDA tensors) or
under the Triton interpreter (CPU tensors).

causal_scores_kernel: one program per (batch x query head, row tile, column tile) of the pooled
block scores S[b, h, i, j] = QP[b, h, i] . KP[b, h // GROUP, j] (float32 operands and sums), for
column tiles at or left of the row tile's diagonal only: the programs above it return at once and
those cells are never written.
"""
import triton
import triton.language as tl


@triton.jit
def causal_scores_kernel(QP, KP, S, NB, H, GROUP,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         stride_sb, stride_sh, stride_sn,
                         D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    pid_bh = tl.program_id(0).to(tl.int64)  # [B, H, nb, nb] offsets pass 2^31 (64 heads at nb 8192)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    if tj * BN > ti * BM + BM - 1:  # every cell of the tile lies above the diagonal
        return
    b = pid_bh // H
    h = pid_bh % H
    rows = ti * BM + tl.arange(0, BM)
    cols = tj * BN + tl.arange(0, BN)
    d = tl.arange(0, D)
    q = tl.load(QP + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + d[None, :],
                mask=(rows < NB)[:, None], other=0.0)
    k = tl.load(KP + b * stride_kb + (h // GROUP) * stride_kh + cols[:, None] * stride_kn + d[None, :],
                mask=(cols < NB)[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    tl.store(S + b * stride_sb + h * stride_sh + rows[:, None] * stride_sn + cols[None, :], s,
             mask=(rows < NB)[:, None] & (cols < NB)[None, :])
