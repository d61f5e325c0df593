"""Triton kernels for sparse decode attention (one query step) and Quest page scores.

This file holds only @triton.jit code; ``sparseinfer.kernels.decode`` loads it compiled (CUDA)
or under the Triton interpreter (CPU), like ``_attn_kernel.py``.

decode_partial_kernel: one program = one (batch, KV head) x one split of its selected pages.
  The G query heads of the GQA group are rows of one tile (padded to BLOCK_G >= 16 rows for
  tl.dot), so each K/V tile is loaded once for the whole group. A loop iteration gathers
  PAGES = BLOCK_N // PS_P2 pages (page ids from the index row, -1 = padding) as BLOCK_N token
  rows; online softmax in fp32 (exp2). Writes the split's normalised output and its
  log-sum-exp (natural log, -inf when it saw no key) for the merge kernel. Several KV buffers
  (e.g. a kept prompt and a page pool) write their splits side by side (SPLIT_BASE: the first
  split column of this launch; SPLITS: all columns) and one merge kernel combines them all; TWO:
  one launch serves two buffers (its splits >= SPLITS1 read the *2 arguments). DOT_F32 upcasts the
  tiles before tl.dot (the interpreter's tl.dot mishandles bfloat16).
  DENSE: every slot of the buffer in order (no index row: page p = tokens p*PS .., PS = BLOCK_N),
  masked by VALID (e.g. a static cache's filled slots) and N. EARLY_V: V's tile is loaded with
  K's (both in flight at once). SKIP (with DENSE and VALID): a program whose whole split has no
  valid slot (a static cache's unfilled tail) scans the split's VALID bytes once and exits.
decode_merge_kernel: one program = one (batch, query head): merges the splits (flash-decoding).
quest_score_kernel: one program = one (batch, KV head) x BLOCK_P pages:
  sum over the group's heads g and dims d of max(q_gd * kmax_pd, q_gd * kmin_pd);
  non-finite bounds count as 0 and empty pages (kmin_0 > kmax_0) score -inf; with HAS_CUR the
  page CUR[b, h] scores +inf.
"""
import triton
import triton.language as tl

from triton.language.standard import _elementwise_max as _max_fn  # noqa: E402
from triton.language.standard import _sum_combine as _sum_fn  # noqa: E402


@triton.jit
def decode_partial_kernel(
    Q, K, V, IDX, VALID, OP, LP,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ib, stride_ih,
    stride_mb, stride_mh,
    N, NPAGES, PAGES_PER_SPLIT, SPLITS, SPLIT_BASE, qk_scale,
    K2, V2, IDX2, VALID2,
    stride_kb2, stride_kh2, stride_kn2,
    stride_vb2, stride_vh2, stride_vn2,
    stride_ib2, stride_ih2,
    stride_mb2, stride_mh2,
    N2, NPAGES2, PAGES_PER_SPLIT2, SPLITS1,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_D: tl.constexpr,
    PS: tl.constexpr, PS_P2: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_VALID: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr, DOT_F32: tl.constexpr,
    TWO: tl.constexpr,
    DENSE: tl.constexpr = False, EARLY_V: tl.constexpr = False, SKIP: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    if PDL:  # programmatic dependent launch (kernels/pdl.py): the previous kernel's outputs are ready after this
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    split = tl.program_id(1)
    col = SPLIT_BASE + split  # this program's partial column
    if TWO:  # splits >= SPLITS1 read the second KV buffer (same page size, validity, group)
        sec = split >= SPLITS1
        K = tl.where(sec, K2, K)
        V = tl.where(sec, V2, V)
        IDX = tl.where(sec, IDX2, IDX)
        VALID = tl.where(sec, VALID2, VALID)
        stride_kb = tl.where(sec, stride_kb2, stride_kb)
        stride_kh = tl.where(sec, stride_kh2, stride_kh)
        stride_kn = tl.where(sec, stride_kn2, stride_kn)
        stride_vb = tl.where(sec, stride_vb2, stride_vb)
        stride_vh = tl.where(sec, stride_vh2, stride_vh)
        stride_vn = tl.where(sec, stride_vn2, stride_vn)
        stride_ib = tl.where(sec, stride_ib2, stride_ib)
        stride_ih = tl.where(sec, stride_ih2, stride_ih)
        stride_mb = tl.where(sec, stride_mb2, stride_mb)
        stride_mh = tl.where(sec, stride_mh2, stride_mh)
        N = tl.where(sec, N2, N)
        NPAGES = tl.where(sec, NPAGES2, NPAGES)
        PAGES_PER_SPLIT = tl.where(sec, PAGES_PER_SPLIT2, PAGES_PER_SPLIT)
        split = tl.where(sec, split - SPLITS1, split)
    b = (pid // HKV).to(tl.int64)
    h = pid % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_D)
    gmask = offs_g < G
    q = tl.load(Q + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, HEAD_D], 0.0, tl.float32)
    PAGES: tl.constexpr = BLOCK_N // PS_P2
    j = tl.arange(0, BLOCK_N)
    jp = j // PS_P2
    jo = j % PS_P2
    p_lo = split * PAGES_PER_SPLIT
    p_hi = tl.minimum(p_lo + PAGES_PER_SPLIT, NPAGES)
    if SKIP:  # DENSE + HAS_VALID: an empty split runs no tile
        seen_any = tl.full([1024], 0, tl.int32)
        t_hi = tl.minimum(p_hi * PS, N)
        for t0 in range(p_lo * PS, t_hi, 1024):
            t = t0 + tl.arange(0, 1024)
            seen_any = tl.maximum(seen_any, tl.load(VALID + b * stride_mb + h * stride_mh + t, mask=t < t_hi,
                                                    other=0).to(tl.int32))
        p_hi = tl.where(tl.reduce(seen_any, 0, _max_fn) > 0, p_hi, p_lo)
    idx_base = IDX + b * stride_ib + h * stride_ih
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for p0 in tl.range(p_lo, p_hi, PAGES, num_stages=STAGES):
        pm = (p0 + jp) < p_hi
        if DENSE:
            page = tl.where(pm, p0 + jp, -1)
        else:
            page = tl.load(idx_base + p0 + jp, mask=pm, other=-1)
        tok = page * PS + jo
        ok = (page >= 0) & (jo < PS) & (tok < N)
        if HAS_VALID:
            vm = tl.load(VALID + b * stride_mb + h * stride_mh + tok, mask=ok, other=0)
            ok = ok & (vm != 0)
        tok = tl.where(ok, tok, 0)
        m_i, l_i, acc = _tile(q, k_base, v_base, tok, ok, offs_d, stride_kn, stride_vn, qk_scale, m_i, l_i, acc,
                              PREC, DOT_F32, EARLY_V)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    row = (pid.to(tl.int64) * G + offs_g) * SPLITS + col  # partials [B, Hq, SPLITS, (D)]
    tl.store(OP + row[:, None] * HEAD_D + offs_d[None, :], out, mask=gmask[:, None])
    tl.store(LP + row, lse, mask=gmask)


@triton.jit
def _tile(q, k_base, v_base, tok, ok, offs_d, stride_kn, stride_vn, qk_scale, m_i, l_i, acc,
          PREC: tl.constexpr, DOT_F32: tl.constexpr, EARLY_V: tl.constexpr):
    """One BLOCK_N tile of keys `tok` (visible where ok) into the online softmax state (m_i, l_i, acc)."""
    k = tl.load(k_base + tok[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None], other=0.0)
    if EARLY_V:
        v = tl.load(v_base + tok[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    qk = tl.where(ok[None, :], qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(qk, 1, _max_fn))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.reduce(p, 1, _sum_fn)
    if not EARLY_V:
        v = tl.load(v_base + tok[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)
    if DOT_F32:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def decode_merge_kernel(OP, LP, O, LSE, stride_ob, stride_oh, SPLITS, HQ: tl.constexpr,
                        BLOCK_S: tl.constexpr, HEAD_D: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)  # b * HQ + h; its partials: OP [pid, SPLITS, D], LP [pid, SPLITS]
    b = (pid // HQ).to(tl.int64)
    h = pid % HQ
    row = pid.to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_D)
    mv = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):  # BLOCK_S splits at a time
        mv = tl.maximum(mv, tl.load(LP + row * SPLITS + s0 + offs_s, mask=s0 + offs_s < SPLITS, other=float("-inf")))
    m = tl.reduce(mv, 0, _max_fn)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    den = tl.full([BLOCK_S], 0.0, tl.float32)
    acc = tl.full([HEAD_D], 0.0, tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        smask = s0 + offs_s < SPLITS
        w = tl.exp(tl.load(LP + row * SPLITS + s0 + offs_s, mask=smask, other=float("-inf")) - m_use)
        den += w
        part = tl.load(OP + (row * SPLITS + s0 + offs_s)[:, None] * HEAD_D + offs_d[None, :], mask=smask[:, None],
                       other=0.0)
        acc += tl.reduce(part * w[:, None], 0, _sum_fn)
    dsum = tl.reduce(den, 0, _sum_fn)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, (acc / tl.where(dsum > 0, dsum, 1.0)).to(O.dtype.element_ty))
    tl.store(LSE + row, tl.where(dsum > 0, m_use + tl.log(tl.where(dsum > 0, dsum, 1.0)), float("-inf")))


@triton.jit
def quest_score_kernel(Q, KMIN, KMAX, S, CUR, stride_qb, stride_qh,
                       stride_nb, stride_nh, stride_np, stride_xb, stride_xh, stride_xp, NPAGES,
                       HKV: tl.constexpr, G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_P: tl.constexpr,
                       HAS_CUR: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // HKV).to(tl.int64)
    h = pid % HKV
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, HEAD_D)
    pmask = offs_p < NPAGES
    lo = tl.load(KMIN + b * stride_nb + h * stride_nh + offs_p[:, None] * stride_np + offs_d[None, :],
                 mask=pmask[:, None], other=0.0).to(tl.float32)
    hi = tl.load(KMAX + b * stride_xb + h * stride_xh + offs_p[:, None] * stride_xp + offs_d[None, :],
                 mask=pmask[:, None], other=0.0).to(tl.float32)
    empty = tl.reduce(tl.where(offs_d[None, :] == 0, lo - hi, 0.0), 1, _sum_fn) > 0
    lo = tl.where((lo == lo) & (tl.abs(lo) < float("inf")), lo, 0.0)
    hi = tl.where((hi == hi) & (tl.abs(hi) < float("inf")), hi, 0.0)
    score = tl.full([BLOCK_P], 0.0, tl.float32)
    for g in tl.static_range(G):
        qg = tl.load(Q + b * stride_qb + (h * G + g) * stride_qh + offs_d).to(tl.float32)
        score += tl.reduce(tl.maximum(qg[None, :] * hi, qg[None, :] * lo), 1, _sum_fn)
    score = tl.where(empty, float("-inf"), score)
    if HAS_CUR:  # the row's current page ranks first (+inf)
        score = tl.where(offs_p == tl.load(CUR + pid), float("inf"), score)
    tl.store(S + pid.to(tl.int64) * NPAGES + offs_p, score, mask=pmask)
