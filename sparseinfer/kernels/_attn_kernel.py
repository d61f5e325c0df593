"""Triton forward kernel over ranges + columns (see sparseinfer/index.py).

This file holds only @triton.jit code. ``sparseinfer.kernels.attention`` loads it twice:
once as compiled GPU code and once (for CPU tensors) with TRITON_INTERPRET=1, because
triton decides between the two at decoration time.

One program = one (batch, query head) x one query block of BLOCK_M rows. It runs
  0. the tile pass (optional): a flat list of key tiles seen whole by every row, unmasked;
  1. the range pass: for each range, the key tiles [kstart, kend) clipped to the band;
     tiles fully inside the band can run without any mask, edge tiles are masked. The loop
     structure is a constexpr choice (SPLIT / FLAT / EDGES, "split" 1 / 2 / 3 in
     attention.CONFIGS; none = one masked loop per range); bands with holes test a byte map;
  2. the column pass: gathered key columns c <= i, skipping cells whose offset is a slash
     (a window of the slash bitmap per column);
with one online softmax (exp2, fp32 accumulation) over all of them.

Query-side indirection (HAS_QROWS): a program's rows are read from a list of original query
positions (-1 = padding) instead of BLOCK_M consecutive rows; q is gathered, the output
scattered back, and causality / bands use the original positions, so a permuted query order
(MMInference's modality runs, grid lines) runs on the same kernel. Only the plain masked range
loop and the column pass (causal mask, no slash bitmap) serve such rows. HAS_MOD: rows whose
modality (MODS[b, i]) is not SLOT are computed but not stored (one launch per query modality
writes its own rows into a shared output).

Two launches over disjoint cells of the same rows (vertical-slash's local band with wide tiles,
then the rest): LSE_OUT stores each row's log2-sum-exp2 (LSE [B, H, N]; programs with no range
store nothing); PRIOR merges such a launch's normalised rows (PRIOR_O, PRIOR_LSE, for the heads
where PRIOR_CNT[b, h] != 0) into this one's in the epilogue; PRIOR_O may be O itself (each
program reads its own rows before writing them).

The column pass (with a slash map) reads each column's 64-bit skip word from a table per
distance m0 - c (CW [B, H, n + 192], col_words_kernel): one load per column.

PF: the tile loop loads the next tile's start one step ahead, so a step's key loads do not wait
on a dependent index load (block-sparse lists; see attention.FLAGS["PF"]).

COL_TMA: the column pass reads K / V rows copied per (batch, query head) in column order
(KCD / VCD: TMA descriptors over [B * H * NCOL, D]) instead of gathering them with pointer loads;
rows past a head's columns belong to the next head or are zeros, and the column mask removes them.

Program order (ORDER 1): the GROUP query heads of a KV head and its query blocks run side by
side, so programs in flight read the keys of one KV head (L2 reuse of scattered key blocks).
Contiguous key tiles load through TMA descriptors (TMA 1 / 2, see _kv) on Hopper; gathered
columns and query-side indirection use pointer loads.

Hopper notes (benchmarks/NOTES_kernels.md): each pipelined loop owns its shared-memory
buffers; a branch on the tile kind inside a pipelined loop crashes triton 3.6's pipeliner, so
masks inside a loop are branch-free and mask-free tiles get loops of their own.
"""
import triton
import triton.language as tl

# Combine functions of triton's standard library: the interpreter recognises these two by
# identity and reduces with numpy. The kernel calls no other standard-library jit function
# (tl.zeros / tl.max / tl.sum / tl.cdiv are jit functions decorated when triton is imported),
# so this module also runs under the interpreter when triton was imported in compiled mode.
from triton.language.standard import _elementwise_max as _max_fn  # noqa: E402
from triton.language.standard import _sum_combine as _sum_fn  # noqa: E402
from triton.language.standard import _elementwise_min as _min_fn  # noqa: E402


@triton.jit
def _online_softmax(acc, l_i, m_i, qk, v, MASKED: tl.constexpr, PREC: tl.constexpr, qk_scale):
    """One tile of the online softmax: qk [BLOCK_M, BLOCK_N] unscaled logits (-inf where
    masked), v [BLOCK_N, D] -> updated (acc, l_i, m_i), m_i in log2 units (qk_scale includes
    log2(e)). The scale is folded into exp2's argument (one fused multiply-add per cell).
    MASKED: rows may have seen only -inf so far (their max stays -inf; exp2 must not see
    -inf - -inf)."""
    m_new = tl.maximum(m_i, tl.reduce(qk, 1, _max_fn) * qk_scale)
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.reduce(p, 1, _sum_fn)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _kv(k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, kmask, row0, n0,
        MASKED: tl.constexpr, TMA: tl.constexpr):
    """K and V tiles [BLOCK_N, D] of keys offs_n (= n0 + arange). TMA 1: k_base / v_base are
    2-D tensor descriptors over [B * HKV * N, D], the keys rows row0 + n0 ... (row0 = the
    head's first row); keys outside the head read other heads' rows or zeros, which the
    caller's mask removes (their logits are -inf: p = 0 times finite values of V). TMA 2: 4-D
    descriptors [B, HKV, N, D], row0 = b * 65536 + kv head; zeros outside the head. TMA 0:
    pointer loads, masked by kmask when MASKED."""
    if TMA == 2:  # 4-D descriptors [B, HKV, N, D], row0 = b * 65536 + hk
        BN: tl.constexpr = offs_n.shape[0]
        HD: tl.constexpr = offs_d.shape[0]
        k = k_base.load([row0 >> 16, row0 & 65535, n0, 0]).reshape(BN, HD)
        v = v_base.load([row0 >> 16, row0 & 65535, n0, 0]).reshape(BN, HD)
    elif TMA:
        k = k_base.load([row0 + n0, 0])
        v = v_base.load([row0 + n0, 0])
    elif MASKED:
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :])
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :])
    return k, v


@triton.jit
def _band_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, offs_n, kmask, lo, hi,
               qk_scale, PREC: tl.constexpr, row0=0, n0=0, TMA: tl.constexpr = False):
    """One masked key tile of a band: keys offs_n where kmask, cells with lo <= i - j <= hi."""
    k, v = _kv(k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, kmask, row0, n0, True, TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    rel = (offs_m - lo)[:, None] - offs_n[None, :]
    mask = (rel.to(tl.uint32) <= (hi - lo).to(tl.uint32)) & kmask[None, :]
    qk = tl.where(mask, qk, float("-inf"))
    return _online_softmax(acc, l_i, m_i, qk, v, True, PREC, qk_scale)


@triton.jit
def _window64(sb_base, p):
    """uint64 [len(p)]: bits p .. p + 63 of the bitmap at sb_base (int32 words), bit 0 = bit p;
    three word loads per entry."""
    w = p >> 5
    sh = (p & 31).to(tl.uint64)
    x0 = tl.load(sb_base + w).to(tl.uint32, bitcast=True).to(tl.uint64)
    x1 = tl.load(sb_base + w + 1).to(tl.uint32, bitcast=True).to(tl.uint64)
    x2 = tl.load(sb_base + w + 2).to(tl.uint32, bitcast=True).to(tl.uint64)
    return ((x0 | (x1 << 32)) >> sh) | ((x2 << 32) << (32 - sh))


@triton.jit
def _ones(a, b):
    """uint64: bits a..b set (clipped to 0..63; none when b < a)."""
    lo = tl.maximum(a, 0)
    hi = tl.minimum(b, 63)
    span = tl.maximum(hi - lo, 0).to(tl.uint64)
    ones = ((tl.full(lo.shape, 2, tl.uint64) << span) - 1) << lo.to(tl.uint64)
    return tl.where(hi >= lo, ones, 0)


@triton.jit
def _bits_mask(sb_base, offs_m, n0, lo, hi, ks, ke, BLOCK_N: tl.constexpr, PAD: tl.constexpr):
    """bool [BLOCK_M, BLOCK_N]: cell (i, n0 + c) is kept iff its offset o = i - n0 - c is a slash
    (bit PAD + o of the bitmap at sb_base) with lo <= o <= hi and ks <= n0 + c < ke. Per row
    one 64-bit window of the bitmap (bit k <-> c = BLOCK_N - 1 - k), the band and key bounds
    folded into it, then one shift per cell (instead of a byte gather)."""
    base = offs_m - n0 - (BLOCK_N - 1)  # offset of bit 0 of the row's window
    win = _window64(sb_base, base + PAD)
    klo = tl.maximum(lo - base, BLOCK_N - ke + n0)
    khi = tl.minimum(hi - base, BLOCK_N - 1 - ks + n0)
    win = win & _ones(klo, tl.minimum(khi, BLOCK_N - 1))
    kidx = (BLOCK_N - 1 - tl.arange(0, BLOCK_N)).to(tl.uint64)
    return ((win[:, None] >> kidx[None, :]) & 1) != 0


@triton.jit
def _tiles(acc, l_i, m_i, q, k_base, v_base, sbits_base, stride_kn, stride_vn, offs_m, offs_d,
           n_lo, n_hi, kend, band_lo, band_hi, qk_scale,
           BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_SMAP: tl.constexpr, PREC: tl.constexpr,
           STAGES: tl.constexpr, PAD: tl.constexpr = 512, row0=0,
           TMA: tl.constexpr = False):
    for n0 in tl.range(n_lo, n_hi, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            kmask = offs_n < kend
            k, v = _kv(k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, kmask, row0, n0, True, TMA)
        else:
            k, v = _kv(k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, offs_n, row0, n0, False, TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if MASKED:
            if USE_SMAP:
                mask = _bits_mask(sbits_base, offs_m, n0, band_lo, band_hi, n0, kend, BLOCK_N, PAD)
            else:
                diff = offs_m[:, None] - offs_n[None, :]
                mask = kmask[None, :] & (diff >= band_lo) & (diff <= band_hi)
            qk = tl.where(mask, qk, float("-inf"))
        acc, l_i, m_i = _online_softmax(acc, l_i, m_i, qk, v, MASKED, PREC, qk_scale)
    return acc, l_i, m_i


@triton.jit
def _range_tiles(acc, l_i, m_i, q, k_base, v_base, sbits_base, stride_kn, stride_vn, offs_m, offs_d,
                 kstart, kend, band_lo, band_hi, qk_scale,
                 BLOCK_N: tl.constexpr, USE_SMAP: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
                 PAD: tl.constexpr = 512, row0=0,
                 TMA: tl.constexpr = False):
    """One pipelined loop over the key tiles [kstart, kend) of a range, band mask on every
    tile (branch-free: a branch on the tile kind inside the loop breaks triton's pipeliner)."""
    rel_m = offs_m - band_lo
    width = (band_hi - band_lo).to(tl.uint32)
    for n0 in tl.range(kstart, kend, BLOCK_N, num_stages=STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kmask = offs_n < kend
        k, v = _kv(k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, kmask, row0, n0, True, TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if USE_SMAP:
            mask = _bits_mask(sbits_base, offs_m, n0, band_lo, band_hi, kstart, kend, BLOCK_N, PAD)
        else:
            rel = rel_m[:, None] - offs_n[None, :]  # (i - j) - lo
            mask = (rel.to(tl.uint32) <= width) & kmask[None, :]
        qk = tl.where(mask, qk, float("-inf"))
        acc, l_i, m_i = _online_softmax(acc, l_i, m_i, qk, v, True, PREC, qk_scale)
    return acc, l_i, m_i


@triton.jit
def _geom(rp, m0, row_end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Range at rp -> (kstart, kend, t1, t2, lo, hi, exact) for the query block at m0: key
    tiles start at kstart; [t1, t2) are whole tiles every row sees (no mask needed); the
    tiles of [kstart, t1) and [t2, kend) need the band mask. Holey ranges: t1 = t2 = kstart."""
    lo = tl.load(rp + 2)
    hi = tl.load(rp + 3)
    exact = tl.load(rp + 4)
    ks = tl.maximum(tl.maximum(tl.load(rp), m0 - hi), 0)
    ke = tl.minimum(tl.minimum(tl.load(rp + 1), m0 + BLOCK_M - lo), row_end)
    ke = tl.maximum(ke, ks)
    fa = tl.maximum(ks, m0 + BLOCK_M - 1 - hi)
    fb = tl.minimum(ke, m0 - lo + 1)
    n_head = tl.maximum((fa - ks + BLOCK_N - 1) // BLOCK_N, 0)
    t1 = tl.minimum(ks + n_head * BLOCK_N, ke)
    n_mid = tl.maximum((fb - t1) // BLOCK_N, 0)
    n_mid = tl.where(exact != 0, n_mid, 0)
    t1 = tl.where(exact != 0, t1, ks)
    t2 = t1 + n_mid * BLOCK_N
    return ks, ke, t1, t2, lo, hi, exact


@triton.jit
def col_words_kernel(SB, CWO, stride_sbb, stride_sbh, stride_cwb, stride_cwh, NE, H,
                     PAD: tl.constexpr, BLOCK: tl.constexpr):
    """CWO [B, H, NE] int64: entry e is the column pass's 64-bit skip word for a column at
    distance d = m0 - c = e - 127 from the query block's first row: bit r set iff d + r < 0 (not
    causal) or d + r is a slash (bit PAD + d + r of the bitmap SB)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    d = tl.minimum(e, NE - 1) - 127
    win = _window64(SB + b * stride_sbb + h * stride_sbh, d + PAD) | _ones(d * 0, -d - 1)
    tl.store(CWO + b * stride_cwb + h * stride_cwh + e, win.to(tl.int64, bitcast=True), mask=e < NE)


@triton.jit
def sparse_fwd_kernel(
    Q, K, V, O,
    TILES, TCOUNT, RANGES, RCOUNT, COLS, CCOUNT, EDG, ECOUNT, SBITS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_tb, stride_th, stride_tq, stride_tcb, stride_tch,
    stride_rb, stride_rh, stride_rq, stride_rr,
    stride_cb, stride_ch, stride_cq,
    stride_colb, stride_colh,
    stride_ccb, stride_cch,
    stride_eb, stride_eh, stride_ecb, stride_ech, stride_sbb, stride_sbh,
    N, H, GROUP, NQB, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    HAS_TILES: tl.constexpr, HAS_COLS: tl.constexpr, HAS_SMAP: tl.constexpr, PREC: tl.constexpr,
    STAGES: tl.constexpr, EDGE_STAGES: tl.constexpr, SPLIT: tl.constexpr, FLAT: tl.constexpr,
    EDGES: tl.constexpr, HOLEY_STAGES: tl.constexpr = 1, TILES_REL: tl.constexpr = False,
    HAS_EDGES: tl.constexpr = False, PAD: tl.constexpr = 512,
    QROWS=None, stride_qrb=0, stride_qrh=0, MODS=None, stride_mb=0, SLOT=0,
    HAS_QROWS: tl.constexpr = False, HAS_MOD: tl.constexpr = False,
    ORDER: tl.constexpr = 0, KD=None, VD=None, TMA: tl.constexpr = False,
    HEADS=None, HAS_HEADS: tl.constexpr = 0,
    LSE=None, PRIOR_O=None, PRIOR_LSE=None, stride_lb=0, stride_lh=0, stride_pb=0, stride_ph=0, stride_pn=0,
    PRIOR_CNT=None, stride_pcb=0, stride_pch=0, stride_pcq=0, PRIOR_QSHIFT: tl.constexpr = 0,
    LSE_OUT: tl.constexpr = False, PRIOR: tl.constexpr = False,
    KCD=None, VCD=None, NCOL=0, COL_TMA: tl.constexpr = False,
    CW=None, stride_cwb=0, stride_cwh=0, PF: tl.constexpr = False, TILE_SCALE=1,
):
    if ORDER == 1:
        # 1-D grid, (batch, KV head) slowest, then query blocks (longest rows first), then the
        # GROUP query heads sharing the KV head: programs running at the same time read the
        # keys of one KV head (L2 reuse for scattered key blocks)
        pid = tl.program_id(0)
        g = pid % GROUP
        rest = pid // GROUP
        pid_m = NQB - 1 - rest % NQB
        bhk = rest // NQB
        HKV = H // GROUP
        b = bhk // HKV
        hk = bhk % HKV
        h = hk * GROUP + g
    else:
        pid_bh = tl.program_id(0)
        pid_m = NQB - 1 - tl.program_id(1)  # longest rows first
        b = pid_bh // H
        h = pid_bh % H
        hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_d = tl.arange(0, HEAD_D)
    if HAS_QROWS:
        # gathered rows (original positions, -1 = padding): keys are clipped to the rows' span
        offs_m = tl.load(QROWS + b * stride_qrb + h * stride_qrh + m0 + tl.arange(0, BLOCK_M))
        row_ok = offs_m >= 0
        m_hi = tl.reduce(offs_m, 0, _max_fn) + 1
        m0 = tl.reduce(tl.where(row_ok, offs_m, N), 0, _min_fn)
    else:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        m_hi = m0 + BLOCK_M
    if HAS_MOD:
        row_ok = row_ok & (tl.load(MODS + b * stride_mb + offs_m, mask=row_ok, other=-1) == SLOT)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    sbits_base = SBITS + b * stride_sbb + h * stride_sbh
    if TMA:  # contiguous key tiles through TMA descriptors over [B * HKV * N, D]
        kt_base = KD
        vt_base = VD
        if TMA == 2:
            row0 = b * 65536 + hk
        else:
            row0 = (b * (H // GROUP) + hk) * N
    else:
        kt_base = k_base
        vt_base = v_base
        row0 = 0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_D], 0.0, dtype=tl.float32)

    row_end = tl.minimum(m_hi, N)
    if HAS_HEADS:  # heads not computed: their output rows are zeros (HAS_HEADS 1) or not written (2).
        # An early exit: counts multiplied by a loaded flag cost the computed heads 8-10% (H100, 128K,
        # XAttention's lists with every head on: 178.6 / 184.6 vs 168.5 / 169.6 ms; results/heads_exit_ab.md)
        if tl.load(HEADS + h) == 0:
            if HAS_HEADS == 1:
                tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                         tl.full([BLOCK_M, HEAD_D], 0.0, dtype=O.dtype.element_ty), mask=row_ok[:, None])
            return

    # 0. tile list: BLOCK_N-wide key tiles every row of the block sees entirely (no mask);
    #    one flat loop, so loads of the next tile overlap the current one (block-sparse); entries
    #    are key starts / TILE_SCALE (block ids of sorted block lists)
    if HAS_TILES:
        nt = tl.load(TCOUNT + b * stride_tcb + h * stride_tch + pid_m)
        t_base = TILES + b * stride_tb + h * stride_th + pid_m * stride_tq
        t0 = m0 if TILES_REL else 0  # relative tiles (vertical-slash): shared by all query blocks
        if PF:  # each step loads the next tile's start (the key loads need not wait for it)
            nxt = tl.load(t_base, mask=nt > 0, other=0)
        for t in tl.range(0, nt, num_stages=STAGES):
            if PF:
                n0 = t0 + nxt * TILE_SCALE
                nxt = tl.load(t_base + t + 1, mask=t + 1 < nt, other=0)
            else:
                n0 = t0 + tl.load(t_base + t) * TILE_SCALE
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k, v = _kv(kt_base, vt_base, stride_kn, stride_vn, offs_n, offs_d, offs_n, row0, n0, False, TMA)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC)
            acc, l_i, m_i = _online_softmax(acc, l_i, m_i, qk, v, False, PREC, qk_scale)

    # 0b. edge list (vertical-slash relative tiles): masked tiles of the exact bands, one flat
    #     pipelined loop whose per-tile parameters do not depend on the previous tile
    if HAS_EDGES:
        ne = tl.load(ECOUNT + b * stride_ecb + h * stride_ech + pid_m)
        e_base = EDG + b * stride_eb + h * stride_eh
        for t in tl.range(0, ne, num_stages=EDGE_STAGES):
            ep = e_base + t * 4
            n0 = m0 + tl.load(ep)
            ke = tl.minimum(tl.minimum(m0 + tl.load(ep + 1), n0 + BLOCK_N), N)
            lo = tl.load(ep + 2)
            hi = tl.load(ep + 3)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kmask = (offs_n >= 0) & (offs_n < ke)
            acc, l_i, m_i = _band_tile(acc, l_i, m_i, q, kt_base, vt_base, stride_kn, stride_vn, offs_m, offs_d,
                                       offs_n, kmask, lo, hi, qk_scale, PREC, row0=row0, n0=n0, TMA=TMA)

    # 1. ranges
    nr = tl.load(RCOUNT + b * stride_cb + h * stride_ch + pid_m * stride_cq)
    r_base = RANGES + b * stride_rb + h * stride_rh + pid_m * stride_rq
    if FLAT:
        # exact ranges as one flat pipelined loop over all their tiles (loads of the next range
        # overlap the current one); a holey or empty range costs one fully masked tile here and
        # runs in the loop below
        total = 0
        for r in range(nr):
            rp = r_base + r * stride_rr
            ks = tl.maximum(tl.maximum(tl.load(rp), m0 - tl.load(rp + 3)), 0)
            ke = tl.minimum(tl.minimum(tl.load(rp + 1), m0 + BLOCK_M - tl.load(rp + 2)), row_end)
            nt_r = tl.maximum((ke - ks + BLOCK_N - 1) // BLOCK_N, 1)
            total += tl.where(tl.load(rp + 4) != 0, nt_r, 1)
        lo = tl.load(r_base + 2)
        hi = tl.load(r_base + 3)
        n0 = tl.maximum(tl.maximum(tl.load(r_base), m0 - hi), 0)
        kend = tl.minimum(tl.minimum(tl.load(r_base + 1), m0 + BLOCK_M - lo), row_end)
        kend = tl.where(tl.load(r_base + 4) != 0, kend, n0)
        r = 0
        for t in tl.range(0, total, num_stages=STAGES):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kmask = offs_n < kend
            acc, l_i, m_i = _band_tile(acc, l_i, m_i, q, kt_base, vt_base, stride_kn, stride_vn, offs_m, offs_d,
                                       offs_n, kmask, lo, hi, qk_scale, PREC, row0=row0, n0=n0, TMA=TMA)
            # advance: next tile of this range, or the first tile of the next range
            n0 = n0 + BLOCK_N
            nxt = n0 >= kend
            r = r + nxt.to(tl.int32)
            rp = r_base + tl.minimum(r, nr - 1) * stride_rr
            lo2 = tl.load(rp + 2)
            hi2 = tl.load(rp + 3)
            ks2 = tl.maximum(tl.maximum(tl.load(rp), m0 - hi2), 0)
            ke2 = tl.minimum(tl.minimum(tl.load(rp + 1), m0 + BLOCK_M - lo2), row_end)
            ke2 = tl.where(tl.load(rp + 4) != 0, ke2, ks2)
            n0 = tl.where(nxt, ks2, n0)
            kend = tl.where(nxt, ke2, kend)
            lo = tl.where(nxt, lo2, lo)
            hi = tl.where(nxt, hi2, hi)

    if EDGES:
        # masked edge tiles of all exact ranges in one flat pipelined loop (jumping over each
        # range's unmasked middle, which runs below); a range with no edge tile (or holey)
        # costs one fully masked tile here
        total = 0
        for r in range(nr):
            ks, ke, t1, t2, lo, hi, exact = _geom(r_base + r * stride_rr, m0, row_end, BLOCK_M, BLOCK_N)
            ne = (t1 - ks + BLOCK_N - 1) // BLOCK_N + (ke - t2 + BLOCK_N - 1) // BLOCK_N
            total += tl.where((exact != 0) & (ne > 0), ne, 1)
        ks, ke, t1, t2, lo, hi, exact = _geom(r_base, m0, row_end, BLOCK_M, BLOCK_N)
        ke = tl.where(exact != 0, ke, ks)
        n0 = tl.where(t1 == ks, t2, ks)
        r = 0
        for t in tl.range(0, total, num_stages=EDGE_STAGES):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kmask = offs_n < ke
            acc, l_i, m_i = _band_tile(acc, l_i, m_i, q, kt_base, vt_base, stride_kn, stride_vn, offs_m, offs_d,
                                       offs_n, kmask, lo, hi, qk_scale, PREC, row0=row0, n0=n0, TMA=TMA)
            # advance
            n0 = n0 + BLOCK_N
            n0 = tl.where(n0 == t1, t2, n0)
            nxt = n0 >= ke
            r = r + nxt.to(tl.int32)
            ks2, ke2, t12, t22, lo2, hi2, ex2 = _geom(r_base + tl.minimum(r, nr - 1) * stride_rr, m0, row_end,
                                                     BLOCK_M, BLOCK_N)
            ke2 = tl.where(ex2 != 0, ke2, ks2)
            n0 = tl.where(nxt, tl.where(t12 == ks2, t22, ks2), n0)
            ke = tl.where(nxt, ke2, ke)
            t1 = tl.where(nxt, t12, t1)
            t2 = tl.where(nxt, t22, t2)
            lo = tl.where(nxt, lo2, lo)
            hi = tl.where(nxt, hi2, hi)

    for r in range(nr):
        rp = r_base + r * stride_rr
        start = tl.load(rp)
        end = tl.load(rp + 1)
        lo = tl.load(rp + 2)
        hi = tl.load(rp + 3)
        exact = tl.load(rp + 4)
        kstart = tl.maximum(tl.maximum(start, m0 - hi), 0)
        kend = tl.minimum(tl.minimum(end, m_hi - lo), row_end)
        if HAS_EDGES:
            if exact == 0:  # exact bands ran as relative tiles + edges
                if HAS_SMAP:
                    acc, l_i, m_i = _range_tiles(acc, l_i, m_i, q, kt_base, vt_base, sbits_base, stride_kn, stride_vn,
                                                 offs_m, offs_d, kstart, kend, lo, hi, qk_scale, BLOCK_N,
                                                 True, PREC, HOLEY_STAGES, PAD, row0=row0, TMA=TMA)
        elif EDGES:
            if exact != 0:
                _a, _b, t1, t2, _c, _d, _e = _geom(rp, m0, row_end, BLOCK_M, BLOCK_N)
                if t2 > t1:
                    acc, l_i, m_i = _tiles(acc, l_i, m_i, q, kt_base, vt_base, sbits_base, stride_kn, stride_vn,
                                           offs_m, offs_d, t1, t2, kend, lo, hi, qk_scale, BLOCK_N, False, False,
                                           PREC, STAGES, row0=row0, TMA=TMA)
            else:
                if HAS_SMAP:
                    acc, l_i, m_i = _range_tiles(acc, l_i, m_i, q, kt_base, vt_base, sbits_base, stride_kn, stride_vn,
                                                 offs_m, offs_d, kstart, kend, lo, hi, qk_scale, BLOCK_N,
                                                 True, PREC, HOLEY_STAGES, row0=row0, TMA=TMA)
        elif FLAT:
            if exact == 0:
                if HAS_SMAP:
                    acc, l_i, m_i = _range_tiles(acc, l_i, m_i, q, kt_base, vt_base, sbits_base, stride_kn, stride_vn,
                                                 offs_m, offs_d, kstart, kend, lo, hi, qk_scale, BLOCK_N,
                                                 True, PREC, EDGE_STAGES, row0=row0, TMA=TMA)
        elif not SPLIT:
            if exact != 0:
                acc, l_i, m_i = _range_tiles(acc, l_i, m_i, q, kt_base, vt_base, sbits_base, stride_kn, stride_vn,
                                             offs_m, offs_d, kstart, kend, lo, hi, qk_scale, BLOCK_N,
                                             False, PREC, STAGES, row0=row0, TMA=TMA)
            else:
                if HAS_SMAP:  # a band with holes: test each offset
                    acc, l_i, m_i = _range_tiles(acc, l_i, m_i, q, kt_base, vt_base, sbits_base, stride_kn, stride_vn,
                                                 offs_m, offs_d, kstart, kend, lo, hi, qk_scale, BLOCK_N,
                                                 True, PREC, EDGE_STAGES, row0=row0, TMA=TMA)
        elif exact != 0:
            # keys valid for every row of the block: [m0 + BLOCK_M - 1 - hi, m0 - lo]
            fa = tl.maximum(kstart, m0 + BLOCK_M - 1 - hi)
            fb = tl.minimum(kend, m0 - lo + 1)
            n_head = tl.maximum((fa - kstart + BLOCK_N - 1) // BLOCK_N, 0)
            t1 = kstart + n_head * BLOCK_N
            n_mid = tl.maximum((fb - t1) // BLOCK_N, 0)
            if n_mid > 0:
                t2 = t1 + n_mid * BLOCK_N
                acc, l_i, m_i = _tiles(acc, l_i, m_i, q, kt_base, vt_base, sbits_base, stride_kn, stride_vn, offs_m,
                                       offs_d, kstart, t1, kend, lo, hi, qk_scale, BLOCK_N, True, False, PREC, EDGE_STAGES, row0=row0, TMA=TMA)
                acc, l_i, m_i = _tiles(acc, l_i, m_i, q, kt_base, vt_base, sbits_base, stride_kn, stride_vn, offs_m,
                                       offs_d, t1, t2, kend, lo, hi, qk_scale, BLOCK_N, False, False, PREC, STAGES, row0=row0, TMA=TMA)
                acc, l_i, m_i = _tiles(acc, l_i, m_i, q, kt_base, vt_base, sbits_base, stride_kn, stride_vn, offs_m,
                                       offs_d, t2, kend, kend, lo, hi, qk_scale, BLOCK_N, True, False, PREC, EDGE_STAGES, row0=row0, TMA=TMA)
            else:
                acc, l_i, m_i = _tiles(acc, l_i, m_i, q, kt_base, vt_base, sbits_base, stride_kn, stride_vn, offs_m,
                                       offs_d, kstart, kend, kend, lo, hi, qk_scale, BLOCK_N, True, False, PREC, EDGE_STAGES, row0=row0, TMA=TMA)
        else:
            if HAS_SMAP:  # a band with holes: test each offset
                acc, l_i, m_i = _tiles(acc, l_i, m_i, q, kt_base, vt_base, sbits_base, stride_kn, stride_vn, offs_m,
                                       offs_d, kstart, kend, kend, lo, hi, qk_scale, BLOCK_N, True, True, PREC, EDGE_STAGES, row0=row0, TMA=TMA)

    # 2. gathered columns c <= i, minus cells whose offset i - c is a slash (counted above): per
    #    column one window of the slash bitmap over its offsets m0 - c .. m0 + BLOCK_M - 1 - c
    #    (bit r <-> row m0 + r), negative offsets set too, then one shift per cell
    if HAS_COLS:
        nc = tl.load(CCOUNT + b * stride_ccb + h * stride_cch + pid_m)
        col_base = COLS + b * stride_colb + h * stride_colh
        rr = tl.arange(0, BLOCK_M)
        cw_base = CW + b * stride_cwb + h * stride_cwh + 127
        for c0 in tl.range(0, nc, BLOCK_N, num_stages=EDGE_STAGES):
            offs_c = c0 + tl.arange(0, BLOCK_N)
            cmask = offs_c < nc
            cols = tl.load(col_base + offs_c, mask=cmask, other=0)
            if HAS_SMAP:
                o_lo = m0 - cols
                skip = tl.load(cw_base + o_lo).to(tl.uint64, bitcast=True)  # words per distance m0 - c
                if BLOCK_M > 64:
                    skip_hi = tl.load(cw_base + o_lo + 64).to(tl.uint64, bitcast=True)
                    bits = tl.where(rr[:, None] >= 64, skip_hi[None, :], skip[None, :]) >> (rr & 63).to(tl.uint64)[:, None]
                else:
                    bits = skip[None, :] >> rr.to(tl.uint64)[:, None]
                mask = ((bits & 1) == 0) & cmask[None, :]
            else:  # no slashes: a plain causal mask (gathered rows included)
                mask = (cols[None, :] <= offs_m[:, None]) & cmask[None, :]
            if COL_TMA:  # the head's column keys copied in order beforehand: contiguous tiles through TMA
                crow = (b * H + h) * NCOL + c0
                k = KCD.load([crow, 0])
                v = VCD.load([crow, 0])
            else:
                k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=cmask[:, None], other=0.0)
                v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=cmask[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC)
            qk = tl.where(mask, qk, float("-inf"))
            acc, l_i, m_i = _online_softmax(acc, l_i, m_i, qk, v, True, PREC, qk_scale)

    if LSE_OUT:
        # log2-sum-exp2 of each row's scaled logits (-inf: no key) for a later launch's merge; a
        # program with no range and no tile stores nothing (that launch reads PRIOR_CNT first)
        work = nr > 0
        if HAS_TILES:
            work = work | (nt > 0)
        row_ok = row_ok & work
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if PRIOR:
        # merge with an earlier launch's normalised output and log2-sum-exp2 over other keys of the
        # same rows (heads where PRIOR_CNT[b, h] is not 0; with stride_pcq, query blocks where
        # PRIOR_CNT[b, h, pid_m >> PRIOR_QSHIFT] is not 0): weights 2^(lse - m) and 2^(m_i - m)
        if tl.load(PRIOR_CNT + b * stride_pcb + h * stride_pch + (pid_m >> PRIOR_QSHIFT) * stride_pcq) != 0:
            o1 = tl.load(PRIOR_O + b * stride_pb + h * stride_ph + offs_m[:, None] * stride_pn + offs_d[None, :],
                         mask=row_ok[:, None], other=0.0).to(tl.float32)
            s1 = tl.load(PRIOR_LSE + b * stride_lb + h * stride_lh + offs_m, mask=row_ok, other=float("-inf"))
            m_new = tl.maximum(m_i, s1)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            w1 = tl.math.exp2(s1 - m_new)
            w2 = tl.math.exp2(m_i - m_new)
            den = l_i * w2 + w1
            den = tl.where(den == 0.0, 1.0, den)
            out = (acc * w2[:, None] + o1 * w1[:, None]) / den[:, None]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
