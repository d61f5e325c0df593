"""Warp-specialised Hopper kernel (Gluon) over key-tile lists and ranges (see sparseinfer/index.py).

The same cells as ``_attn_kernel.sparse_fwd_kernel`` for indices made of
* a tile list (whole key tiles, no mask) and plain ranges (band-masked tiles): block-sparse lists
  and A-shape;
* exact ranges and, with HAS_COLS, gathered columns: vertical-slash's band launch (with its columns
  under FLAGS["VS_BAND_COLS"]);
* vertical-slash's second launch: relative tiles (TILES_REL: key starts from the query block's
  first row), an edge list (HAS_EDGES: masked tiles of the exact slash runs, per tile (rel_start,
  rel_end, lo, hi)), the ranges with holes (every tile tests a 64-bit window of the slash bitmap
  per row, as the Triton kernel's _bits_mask), gathered columns, the edges at most NARROW keys wide
  as NARROW-key tiles (``index.split_narrow_edges``; in the first rows of a ring stage), and the
  band launch's rows merged in the epilogue (PRIOR, as the Triton kernel's);
Gathered columns: K / V copied per query head in column order, read through TMA like any tile;
each column's 64-bit skip word, loaded one thread per column and spread to the logits' layout,
masks non-causal cells and cells whose offset is a slash. No query-side indirection, no head
subsets. It differs from the Triton kernel in how the work is laid out on the SM, which Triton's
own pipeliner cannot express:

* a producer warp (worker partition, few registers) issues the TMA loads of Q and of each K / V
  tile into a ring of STAGES shared-memory buffers, up to STAGES tiles ahead of the compute
  (mbarriers "ready" per K and per V, "empty" per stage);
* the consumer warpgroups (default partition) run wgmma q k^T, the online softmax (exp2, fp32)
  and wgmma p v with p from registers; with OVERLAP the next tile's q k^T is issued before this
  tile's softmax (FA3's intra-warpgroup overlap), so the tensor cores and the softmax units run
  side by side; with TWO, two consumer warpgroups (partitions of their own) take the two 64-row
  halves of a 128-row block and share every K / V tile;
* LSE_OUT stores each row's log2-sum-exp2 as the Triton kernel's (vertical-slash's band launch,
  merged by the second launch); with PRIOR 2 the producer TMA-loads those rows into the ring slot
  after the program's last tile (PRIOR 1: the consumer loads them in its epilogue);
* with OVERLAP 2 each tile's mask inputs (edge entries, column skip words, bitmap windows) are loaded
  one tile before they are used, the column pass's indices two (_ahead_next).

One program = one (batch, query head) x one query block of BLOCK_M rows (64 per consumer
warpgroup), programs ordered as ORDER 1 of the Triton kernel (the GROUP query heads of a KV
head side by side, longest rows first). Q / K / V are read through 4-D descriptors over
[B, H, N, D] / [B, Hkv, N, D] with the tensors' own strides (a transposed projection needs no
copy); rows past N read zeros, keys past a range are masked, rows past N not stored.

Compiled only (Gluon has no interpreter): ``attention.run_index`` sends CUDA bf16 calls on
Hopper here (FLAGS["GLUON"]); everything else, and the CPU tests, run the Triton kernel.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def _program(N, H, GROUP, NQB, BLOCK_M: gl.constexpr):
    """(b, h, hk, query block) of this program: ORDER 1 of the Triton kernel."""
    pid = gl.program_id(0)
    g = pid % GROUP
    rest = pid // GROUP
    pid_m = NQB - 1 - rest % NQB
    bhk = rest // NQB
    hkv = H // GROUP
    b = bhk // hkv
    hk = bhk % hkv
    return b, hk * GROUP + g, hk, pid_m


@gluon.jit
def _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, kv_empty, i, b, hk, n0, STAGES: gl.constexpr,
             SUB: gl.constexpr = 1):
    """Ring position i: once its stage is free, TMA-load keys / values n0 .. n0 + BLOCK_N of KV head
    (b, hk) into it, each signalling its ready barrier; returns i + 1. SUB > 1: k_bufs / v_bufs are the
    ring's buffers seen as SUB times as many, SUB times lower ones (narrow tiles): a stage's first is used."""
    s = i % STAGES
    mbarrier.wait(kv_empty.index(s), ((i // STAGES) & 1) ^ 1)
    mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [b, hk, n0, 0], k_ready.index(s), k_bufs.index(s * SUB))
    mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(v_desc, [b, hk, n0, 0], v_ready.index(s), v_bufs.index(s * SUB))
    return i + 1


@gluon.jit
def _counts(b, h, pid_m, lists, cols_args, vs_args, HAS_TILES: gl.constexpr, HAS_EDGES: gl.constexpr,
            HAS_COLS: gl.constexpr):
    """The program's (tile count, edge count, ranges to walk, column count), loaded up front (each
    load where it is used was a latency both partitions waited through). With edges only ranges with
    holes are visited, and the walk over the ranges is skipped when none of them has holes (their
    exact flags in one vector load; at most 32 ranges, else walked: H200 128K 29.26 vs 29.64 ms,
    results/vs_skip_ab.md)."""
    (TILES, TCOUNT, RANGES, RCOUNT, stride_tb, stride_th, stride_tq, stride_tcb, stride_tch,
     stride_rb, stride_rh, stride_rq, stride_rr, stride_cb, stride_ch, stride_cq) = lists
    nt = 0
    ne = 0
    nc = 0
    if HAS_TILES:
        nt = gl.load(TCOUNT + b * stride_tcb + h * stride_tch + pid_m)
    if HAS_EDGES:
        ECOUNT, stride_ecb, stride_ech = vs_args[1], vs_args[4], vs_args[5]
        ne = gl.load(ECOUNT + b * stride_ecb + h * stride_ech + pid_m)
    nr = gl.load(RCOUNT + b * stride_cb + h * stride_ch + pid_m * stride_cq)
    if HAS_COLS:
        CCOUNT, stride_ccb, stride_cch = cols_args[3], cols_args[7], cols_args[8]
        nc = gl.load(CCOUNT + b * stride_ccb + h * stride_cch + pid_m)
    if HAS_EDGES:
        lin: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        r = gl.arange(0, 32, layout=lin)
        ex = gl.load(RANGES + b * stride_rb + h * stride_rh + pid_m * stride_rq + r * stride_rr + 4, mask=r < nr,
                     other=1)
        holes = gl.sum((ex == 0).to(gl.int32), axis=0)
        nr = gl.where((holes > 0) | (nr > 32), nr, 0)
    return nt, ne, nr, nc


@gluon.jit
def _producer(descs, q_tile, bufs, bars, lists, dims, TILE_SCALE, cols_args, vs_args, nar_args,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_TILES: gl.constexpr,
              HAS_COLS: gl.constexpr, TILES_REL: gl.constexpr, HAS_EDGES: gl.constexpr, PRIOR: gl.constexpr,
              NARROW: gl.constexpr):
    """Loads Q, then every K / V tile of the program's sequence (tile list, edge list, then each range's
    tiles (with HAS_EDGES only the ranges with holes), then the gathered column tiles, then the narrow
    edges (NARROW keys each, in the first half of a stage's buffers)) into the ring;
    with PRIOR 2 then the earlier launch's rows of this block into the next ring slot's K buffer.
    The argument tuples are gluon_fwd_kernel's."""
    q_desc, k_desc, v_desc, po_desc, kn_desc, vn_desc = descs
    q_smem, k_bufs, v_bufs, kn_bufs, vn_bufs = bufs
    q_bar, k_ready, v_ready, kv_empty = bars
    (TILES, TCOUNT, RANGES, RCOUNT, stride_tb, stride_th, stride_tq, stride_tcb, stride_tch,
     stride_rb, stride_rh, stride_rq, stride_rr, stride_cb, stride_ch, stride_cq) = lists
    N, H, GROUP, NQB = dims
    b, h, hk, pid_m = _program(N, H, GROUP, NQB, BLOCK_M)
    m0 = pid_m * BLOCK_M
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, h, m0, 0], q_bar, q_tile)
    nt, ne, nr, nc = _counts(b, h, pid_m, lists, cols_args, vs_args, HAS_TILES, HAS_EDGES, HAS_COLS)
    i = 0
    if HAS_TILES:
        t_base = TILES + b * stride_tb + h * stride_th + pid_m * stride_tq
        t0 = m0 if TILES_REL else 0  # relative tiles (vertical-slash): key starts from the block's first row
        for t in range(nt):
            n0 = t0 + gl.load(t_base + t) * TILE_SCALE
            i = _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, kv_empty, i, b, hk, n0, STAGES)
    if HAS_EDGES:  # masked tiles (rel_start, rel_end, lo, hi); starts may be negative: TMA reads zeros there
        EDG, ECOUNT, stride_eb, stride_eh, stride_ecb, stride_ech = vs_args[:6]
        e_base = EDG + b * stride_eb + h * stride_eh
        for t in range(ne):
            i = _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, kv_empty, i, b, hk,
                         m0 + gl.load(e_base + t * 4), STAGES)
    r_base = RANGES + b * stride_rb + h * stride_rh + pid_m * stride_rq
    row_end = gl.minimum(m0 + BLOCK_M, N)
    for r in range(nr):
        rp = r_base + r * stride_rr
        ks = gl.maximum(gl.maximum(gl.load(rp), m0 - gl.load(rp + 3)), 0)
        ke = gl.minimum(gl.minimum(gl.load(rp + 1), m0 + BLOCK_M - gl.load(rp + 2)), row_end)
        if HAS_EDGES:  # exact ranges ran as tiles + edges
            ke = gl.where(gl.load(rp + 4) == 0, ke, ks)
        for n0 in range(ks, ke, BLOCK_N):
            i = _load_kv(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, kv_empty, i, b, hk, n0, STAGES)
    if HAS_COLS:  # the query head's gathered column keys / values, BLOCK_N at a time
        kc_desc, vc_desc = cols_args[:2]
        for c0 in range(0, nc, BLOCK_N):
            i = _load_kv(kc_desc, vc_desc, k_bufs, v_bufs, k_ready, v_ready, kv_empty, i, b, h, c0, STAGES)
    if NARROW:  # edges at most NARROW keys wide: NARROW-row boxes
        EDGN, ECOUNTN, stride_enb, stride_enh, stride_ecnb, stride_ecnh = nar_args
        en_base = EDGN + b * stride_enb + h * stride_enh
        for t in range(gl.load(ECOUNTN + b * stride_ecnb + h * stride_ecnh + pid_m)):
            i = _load_kv(kn_desc, vn_desc, kn_bufs, vn_bufs, k_ready, v_ready, kv_empty, i, b, hk,
                         m0 + gl.load(en_base + t * 4), STAGES, BLOCK_N // NARROW)
    if PRIOR == 2:
        if _prior_written(b, h, pid_m, vs_args):
            s = i % STAGES
            mbarrier.wait(kv_empty.index(s), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(k_ready.index(s), po_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(po_desc, [b, h, m0, 0], k_ready.index(s), k_bufs.index(s))


@gluon.jit
def _prior_written(b, h, pid_m, vs_args):
    """Whether the earlier launch wrote this block's rows (its count for the block is not 0)."""
    PRIOR_CNT, stride_pcb, stride_pch, stride_pcq, qshift = vs_args[11], vs_args[15], vs_args[16], vs_args[17], vs_args[18]
    return gl.load(PRIOR_CNT + b * stride_pcb + h * stride_pch + (pid_m >> qshift) * stride_pcq) != 0


@gluon.jit
def _softmax(s_val, m_i, l_i, qk_scale, MASKED: gl.constexpr):
    """Online softmax step on logits s_val [BLOCK_M, BLOCK_N] (-inf where masked) -> (p, alpha,
    m_new, l_new), m in log2 units."""
    m_new = gl.maximum(m_i, gl.max(s_val, axis=1) * qk_scale)
    if MASKED:
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = gl.exp2(s_val * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@gluon.jit
def _logits(q_smem, k_bufs, k_ready, s_zero, i, STAGES: gl.constexpr, SUB: gl.constexpr = 1):
    """Issue q k^T (async) for the i-th tile of the ring once its K has landed (SUB: see _load_kv)."""
    s = i % STAGES
    mbarrier.wait(k_ready.index(s), (i // STAGES) & 1)
    kt = k_bufs.index(s * SUB).reshape([k_bufs.shape[3], k_bufs.shape[4]]).permute((1, 0))
    return warpgroup_mma(q_smem, kt, s_zero, use_acc=False, is_async=True), kt


@gluon.jit
def _window64(sb_base, p):
    """uint64 [len(p)]: bits p .. p + 63 of the bitmap at sb_base (int32 words), bit 0 = bit p (as the
    Triton kernel's _window64)."""
    w = p >> 5
    sh = (p & 31).to(gl.uint64)
    x0 = gl.load(sb_base + w).to(gl.uint32, bitcast=True).to(gl.uint64)
    x1 = gl.load(sb_base + w + 1).to(gl.uint32, bitcast=True).to(gl.uint64)
    x2 = gl.load(sb_base + w + 2).to(gl.uint32, bitcast=True).to(gl.uint64)
    return ((x0 | (x1 << 32)) >> sh) | ((x2 << 32) << (32 - sh))


@gluon.jit
def _mask_in(j, geo, cols, BLOCK_N: gl.constexpr, MASKED: gl.constexpr):
    """What tile j's mask needs from memory, loaded before its logits are waited for: for the column
    pass (MASKED 2) each column's skip word (bit r: row r of this consumer's rows skips the column,
    see _attn_kernel.col_words_kernel; all bits for columns past the count); for an edge (3) its
    (rel_start, rel_end, lo, hi); for a range with holes (4) each row's 64-bit window of the slash
    bitmap with the band and key bounds folded in (bit k <-> key n0 + BLOCK_N - 1 - k, as the Triton
    kernel's _bits_mask); else nothing."""
    if MASKED == 2:
        return _col_words(_col_idx(j, geo, BLOCK_N), geo)
    elif MASKED == 3:
        ep = geo[0] + j * 4
        return gl.load(ep), gl.load(ep + 1), gl.load(ep + 2), gl.load(ep + 3)
    elif MASKED == 4:
        ks, lo, hi, ke, offs_m, sb_base, PAD = geo
        n0 = ks + j * BLOCK_N
        base = offs_m - n0 - (BLOCK_N - 1)  # offset of bit 0 of the row's window
        win = _window64(sb_base, base + PAD)
        klo = gl.maximum(gl.maximum(lo - base, BLOCK_N - ke + n0), 0)
        khi = gl.minimum(gl.minimum(hi - base, BLOCK_N - 1 - ks + n0), BLOCK_N - 1)
        span = gl.maximum(khi - klo, 0).to(gl.uint64)
        ones = ((base * 0 + 2).to(gl.uint64) << span) - 1
        return win & gl.where(khi >= klo, ones << klo.to(gl.uint64), 0)
    else:
        return 0


@gluon.jit
def _col_idx(j, geo, BLOCK_N: gl.constexpr):
    """The column pass's tile j: its BLOCK_N column indices (-1 past the count), one thread per column
    (the accumulator layout would have every warp load every column's word: 8x the L2 sectors;
    _masked spreads the words to the logits' layout)."""
    col_base, nc = geo[0], geo[2]
    lin: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    g = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=lin)
    return gl.load(col_base + g, mask=g < nc, other=-1)


@gluon.jit
def _col_words(c, geo):
    """Skip words of columns c (see _mask_in; all bits set for c = -1)."""
    cw_base, m0r = geo[1], geo[3]
    return gl.load(cw_base + (m0r - c), mask=c >= 0, other=-1)


@gluon.jit
def _ahead_init(count, geo, cols, BLOCK_N: gl.constexpr, MASKED: gl.constexpr):
    """AHEAD's state before tile 0 (see _ahead_next)."""
    if MASKED == 2:
        return _col_words(_col_idx(0, geo, BLOCK_N), geo), _col_idx(1, geo, BLOCK_N)
    else:
        return _mask_in(0, geo, cols, BLOCK_N, MASKED)


@gluon.jit
def _ahead_next(state, j, count, geo, cols, BLOCK_N: gl.constexpr, MASKED: gl.constexpr):
    """(tile j's mask inputs, the state for tile j + 1): the inputs are loaded one tile before they are
    used, and the column pass's indices two (its skip words' addresses depend on them)."""
    if MASKED == 2:
        words, c = state
        return words, (_col_words(c, geo), _col_idx(j + 2, geo, BLOCK_N))
    else:
        return state, _mask_in(gl.minimum(j + 1, count - 1), geo, cols, BLOCK_N, MASKED)


@gluon.jit
def _band_select(s_val, cols, offs_m, n0, lo, hi, kmin, kend):
    """s_val [rows, BLOCK_N] with -inf where key n0 + c is not kept for row i (kept iff lo <= i - key <= hi and
    kmin <= key < kend): one interval of keys per row, tested per cell by a subtraction, an unsigned compare
    and a select in inline PTX (the compiler packed the 32 compare results of a thread into bit fields
    and unpacked them again when this was written as a bool tensor and a where)."""
    jlo = gl.maximum(offs_m - hi, kmin)
    span = gl.minimum(offs_m - lo, kend - 1) - jlo
    start = gl.where(span >= 0, jlo - n0, 1 << 30)  # an empty row: every c - start is negative
    return gl.inline_asm_elementwise(
        "{ .reg .b32 t; .reg .pred p; sub.s32 t, $1, $2; setp.le.u32 p, t, $3; selp.f32 $0, $4, 0fFF800000, p; }",
        "=r,r,r,r,r", [cols[None, :], start[:, None], gl.maximum(span, 0)[:, None], s_val], dtype=gl.float32,
        is_pure=True, pack=1)


@gluon.jit
def _masked(s_val, j, geo, cols, words, BLOCK_N: gl.constexpr, MASKED: gl.constexpr):
    """MASKED 1: band mask of a range's j-th tile, geo = (n_start, lo, hi, ke, offs_m): cells with
    lo <= i - key <= hi, key < ke. MASKED 2: the column pass, cells whose skip bit is clear.
    MASKED 3: an edge (words = its entry), geo = (edge base, m0, offs_m, N): cells with lo <= i - key
    <= hi, 0 <= key < min(m0 + rel_end, n0 + BLOCK_N, N). MASKED 4: cells whose window bit is set.
    Masks 1-3 test and select in inline PTX: written as a bool tensor and a where, the compiler packed a
    thread's 32 compare results into bit fields and unpacked them again (edges 582 -> 430 SASS
    instructions per tile, columns 493 -> 428; H200 128K 27.91 vs 29.50 ms, results/vs_mask_ab.md)."""
    if MASKED == 1:
        n_start, lo, hi, ke, offs_m = geo
        s_val = _band_select(s_val, cols, offs_m, n_start + j * BLOCK_N, lo, hi, 0, ke)
    elif MASKED == 2:
        # the row's bit of the column's word as two 32-bit halves (bit_lo / bit_hi: the row's bit in its
        # half, 0 in the other): (w_lo & bit_lo) | (w_hi & bit_hi) == 0 keeps the cell
        bit_lo, bit_hi = geo[4], geo[5]
        w = gl.convert_layout(words, cols.type.layout)
        s_val = gl.inline_asm_elementwise(
            "{ .reg .b32 t; .reg .pred p; and.b32 t, $1, $3; lop3.b32 t, t, $2, $4, 0xF8; "
            "setp.eq.u32 p, t, 0; selp.f32 $0, $5, 0fFF800000, p; }",
            "=r,r,r,r,r,r", [w.to(gl.int32)[None, :], (w >> 32).to(gl.int32)[None, :], bit_lo[:, None],
                             bit_hi[:, None], s_val], dtype=gl.float32, is_pure=True, pack=1)
    elif MASKED == 3:
        _e, m0, offs_m, n_max = geo
        e0, e1, lo, hi = words
        n0 = m0 + e0
        ke = gl.minimum(gl.minimum(m0 + e1, n0 + BLOCK_N), n_max)
        s_val = _band_select(s_val, cols, offs_m, n0, lo, hi, 0, ke)
    elif MASKED == 4:
        kidx = (BLOCK_N - 1 - cols).to(gl.uint64)
        s_val = gl.where(((words[:, None] >> kidx[None, :]) & 1) != 0, s_val, float("-inf"))
    return s_val


@gluon.jit
def _segment(acc, m_i, l_i, i, q_smem, k_bufs, v_bufs, k_ready, v_ready, kv_empty, count,
             geo, cols, qk_scale, s_zero,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, MASKED: gl.constexpr, OVERLAP: gl.constexpr,
             p_layout: gl.constexpr, row_o: gl.constexpr, pre=0, PRE: gl.constexpr = False,
             SUB: gl.constexpr = 1):
    """`count` consecutive tiles of the ring (ring position i on): whole tiles of the list
    (MASKED 0), masked band tiles of a range (1), column tiles (2), edges (3) or tiles of a range
    with holes (4); geo: see _masked. OVERLAP: tile j + 1's q k^T and tile j's p v are in flight
    while tile j + 1's softmax runs; OVERLAP 2: also the mask inputs of masks 2-4 loaded ahead
    (_ahead_next), starting from `pre` (_ahead_init's state, loaded earlier) with PRE. SUB: the ring
    seen as narrow tiles (see _load_kv). Returns (acc, m_i, l_i, ring position)."""
    dt: gl.constexpr = q_smem.dtype
    AHEAD: gl.constexpr = OVERLAP == 2 and MASKED >= 2
    if OVERLAP:
        if count > 0:
            s_tok, kt = _logits(q_smem, k_bufs, k_ready, s_zero, i, STAGES, SUB)
            if AHEAD:
                if PRE:
                    st = pre
                else:
                    st = _ahead_init(count, geo, cols, BLOCK_N, MASKED)
                words, st = _ahead_next(st, 0, count, geo, cols, BLOCK_N, MASKED)
            else:
                words = _mask_in(0, geo, cols, BLOCK_N, MASKED)
            s_val, _q, _k = warpgroup_mma_wait(0, deps=(s_tok, q_smem, kt))
            s_val = _masked(s_val, 0, geo, cols, words, BLOCK_N, MASKED)
            p, alpha, m_i, l_i = _softmax(s_val, m_i, l_i, qk_scale, MASKED)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_op = gl.convert_layout(p.to(dt), p_layout)
            for j in range(1, count):
                s_tok, kt = _logits(q_smem, k_bufs, k_ready, s_zero, i + j, STAGES, SUB)
                if AHEAD:
                    words, st = _ahead_next(st, j, count, geo, cols, BLOCK_N, MASKED)
                else:
                    words = _mask_in(j, geo, cols, BLOCK_N, MASKED)  # the column pass's loads before p v
                sp = (i + j - 1) % STAGES
                mbarrier.wait(v_ready.index(sp), ((i + j - 1) // STAGES) & 1)
                vb = v_bufs.index(sp * SUB).reshape([v_bufs.shape[3], v_bufs.shape[4]])
                o_tok = warpgroup_mma(p_op, vb, acc, is_async=True)
                s_val, _q, _k = warpgroup_mma_wait(1, deps=(s_tok, q_smem, kt))
                s_val = _masked(s_val, j, geo, cols, words, BLOCK_N, MASKED)
                p, alpha, m_i, l_i = _softmax(s_val, m_i, l_i, qk_scale, MASKED)
                acc, _v = warpgroup_mma_wait(0, deps=(o_tok, vb))
                mbarrier.arrive(kv_empty.index(sp), count=1)
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                p_op = gl.convert_layout(p.to(dt), p_layout)
            sp = (i + count - 1) % STAGES
            mbarrier.wait(v_ready.index(sp), ((i + count - 1) // STAGES) & 1)
            vb = v_bufs.index(sp * SUB).reshape([v_bufs.shape[3], v_bufs.shape[4]])
            o_tok = warpgroup_mma(p_op, vb, acc, is_async=True)
            acc, _v = warpgroup_mma_wait(0, deps=(o_tok, vb))
            mbarrier.arrive(kv_empty.index(sp), count=1)
    else:
        for j in range(count):
            s_tok, kt = _logits(q_smem, k_bufs, k_ready, s_zero, i + j, STAGES, SUB)
            words = _mask_in(j, geo, cols, BLOCK_N, MASKED)
            s_val, _q, _k = warpgroup_mma_wait(0, deps=(s_tok, q_smem, kt))
            s_val = _masked(s_val, j, geo, cols, words, BLOCK_N, MASKED)
            p, alpha, m_i, l_i = _softmax(s_val, m_i, l_i, qk_scale, MASKED)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_op = gl.convert_layout(p.to(dt), p_layout)
            s = (i + j) % STAGES
            mbarrier.wait(v_ready.index(s), ((i + j) // STAGES) & 1)
            vb = v_bufs.index(s * SUB).reshape([v_bufs.shape[3], v_bufs.shape[4]])
            o_tok = warpgroup_mma(p_op, vb, acc, is_async=True)
            acc, _v = warpgroup_mma_wait(0, deps=(o_tok, vb))
            mbarrier.arrive(kv_empty.index(s), count=1)
    return acc, m_i, l_i, i + count


@gluon.jit
def _consumer(outs, bufs, bars, lists, dims, qk_scale, cols_args, vs_args, nar_args,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
              HAS_TILES: gl.constexpr, OVERLAP: gl.constexpr, NUM_WARPS: gl.constexpr,
              ROW0: gl.constexpr, WG_M: gl.constexpr, LSE_OUT: gl.constexpr, HAS_COLS: gl.constexpr,
              HAS_EDGES: gl.constexpr, PRIOR: gl.constexpr, PAD: gl.constexpr, QREG: gl.constexpr,
              NARROW: gl.constexpr):
    """Rows ROW0 .. ROW0 + WG_M of the program's query block (BLOCK_M rows; the ranges' geometry,
    hence the tile sequence, is the block's, the masks are this consumer's rows'). The argument
    tuples are gluon_fwd_kernel's."""
    O, LSE, stride_ob, stride_oh, stride_on, stride_lb, stride_lh = outs
    q_smem, k_bufs, v_bufs, kn_bufs, vn_bufs = bufs
    q_bar, k_ready, v_ready, kv_empty = bars
    (TILES, TCOUNT, RANGES, RCOUNT, stride_tb, stride_th, stride_tq, stride_tcb, stride_tch,
     stride_rb, stride_rh, stride_rq, stride_rr, stride_cb, stride_ch, stride_cq) = lists
    N, H, GROUP, NQB = dims
    b, h, hk, pid_m = _program(N, H, GROUP, NQB, BLOCK_M)
    m0 = pid_m * BLOCK_M
    dt: gl.constexpr = q_smem.dtype
    if WG_M != BLOCK_M:
        q_smem = q_smem.slice(ROW0, WG_M, dim=0)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    m_i = gl.full([WG_M], float("-inf"), gl.float32, row_s)
    l_i = gl.full([WG_M], 0.0, gl.float32, row_s)
    acc = gl.zeros([WG_M, HEAD_D], gl.float32, o_layout)
    s_zero = gl.zeros([WG_M, BLOCK_N], gl.float32, s_layout)
    offs_m = m0 + ROW0 + gl.arange(0, WG_M, layout=row_s)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    nt, ne, nr, nc = _counts(b, h, pid_m, lists, cols_args, vs_args, HAS_TILES, HAS_EDGES, HAS_COLS)
    if HAS_COLS:  # gathered columns: cells (i, c) with c <= i whose offset i - c is no slash
        kc_desc, vc_desc, COLS, CCOUNT, CW, stride_colb, stride_colh, stride_ccb, stride_cch, stride_cwb, stride_cwh = cols_args
        m0r = m0 + ROW0
        hi_row = (offs_m - m0r) >= 32
        bit32 = gl.full([WG_M], 1, gl.int32, row_s) << ((offs_m - m0r) & 31)
        col_geo = (COLS + b * stride_colb + h * stride_colh, CW + b * stride_cwb + h * stride_cwh + 127, nc, m0r,
                   gl.where(hi_row, 0, bit32), gl.where(hi_row, bit32, 0))
        if OVERLAP == 2:  # the column pass's first mask inputs, loaded while the runs' tiles are visited
            col_pre = _ahead_init(nc, col_geo, cols, BLOCK_N, 2)
        else:
            col_pre = 0
    if PRIOR == 2:  # the earlier launch's log-sum-exp, loaded before the tiles (its rows come through the ring)
        PRIOR_LSE = vs_args[10]
        rows_o = m0 + ROW0 + gl.arange(0, WG_M, layout=row_o)
        s1_pre = gl.load(PRIOR_LSE + b * stride_lb + h * stride_lh + rows_o, mask=rows_o < N, other=float("-inf"))
    mbarrier.wait(q_bar, 0)
    q_mem = q_smem
    if QREG:  # q as the register operand of q k^T: a tile's wgmma reads only its K from shared memory
        q_smem = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
    i = 0
    if HAS_TILES:
        acc, m_i, l_i, i = _segment(acc, m_i, l_i, i, q_smem, k_bufs, v_bufs, k_ready, v_ready, kv_empty, nt,
                                    0, cols, qk_scale, s_zero, BLOCK_N, STAGES, 0, OVERLAP, p_layout, row_o)
    if HAS_EDGES:  # vertical-slash's exact slash runs: masked edge tiles (the unmasked ones were tiles)
        EDG, ECOUNT, stride_eb, stride_eh, stride_ecb, stride_ech, SBITS, stride_sbb, stride_sbh = vs_args[:9]
        acc, m_i, l_i, i = _segment(acc, m_i, l_i, i, q_smem, k_bufs, v_bufs, k_ready, v_ready, kv_empty, ne,
                                    (EDG + b * stride_eb + h * stride_eh, m0, offs_m, N), cols, qk_scale, s_zero,
                                    BLOCK_N, STAGES, 3, OVERLAP, p_layout, row_o)
    r_base = RANGES + b * stride_rb + h * stride_rh + pid_m * stride_rq
    row_end = gl.minimum(m0 + BLOCK_M, N)
    for r in range(nr):
        rp = r_base + r * stride_rr
        lo = gl.load(rp + 2)
        hi = gl.load(rp + 3)
        ks = gl.maximum(gl.maximum(gl.load(rp), m0 - hi), 0)
        ke = gl.minimum(gl.minimum(gl.load(rp + 1), m0 + BLOCK_M - lo), row_end)
        if HAS_EDGES:
            # only ranges with holes are left (exact ones ran as tiles + edges): every tile tests the
            # slash bits
            ke = gl.maximum(gl.where(gl.load(rp + 4) == 0, ke, ks), ks)
            acc, m_i, l_i, i = _segment(acc, m_i, l_i, i, q_smem, k_bufs, v_bufs, k_ready, v_ready, kv_empty,
                                        (ke - ks + BLOCK_N - 1) // BLOCK_N,
                                        (ks, lo, hi, ke, offs_m, SBITS + b * stride_sbb + h * stride_sbh, PAD),
                                        cols, qk_scale, s_zero, BLOCK_N, STAGES, 4, OVERLAP, p_layout, row_o)
        else:
            ke = gl.maximum(ke, ks)
            # tiles [t1, t2) are seen whole by every row (keys m0 + BLOCK_M - 1 - hi .. m0 - lo): no mask;
            # [ks, t1) and [t2, ke) are masked (the producer loads the same tiles ks, ks + BLOCK_N, ...)
            fa = gl.maximum(ks, m0 + BLOCK_M - 1 - hi)
            fb = gl.minimum(ke, m0 - lo + 1)
            n_head = gl.maximum(fa - ks + BLOCK_N - 1, 0) // BLOCK_N
            t1 = gl.minimum(ks + n_head * BLOCK_N, ke)
            n_mid = gl.maximum(fb - t1, 0) // BLOCK_N
            t2 = t1 + n_mid * BLOCK_N
            acc, m_i, l_i, i = _segment(acc, m_i, l_i, i, q_smem, k_bufs, v_bufs, k_ready, v_ready, kv_empty,
                                        (t1 - ks + BLOCK_N - 1) // BLOCK_N, (ks, lo, hi, ke, offs_m), cols, qk_scale,
                                        s_zero, BLOCK_N, STAGES, 1, OVERLAP, p_layout, row_o)
            acc, m_i, l_i, i = _segment(acc, m_i, l_i, i, q_smem, k_bufs, v_bufs, k_ready, v_ready, kv_empty,
                                        n_mid, 0, cols, qk_scale, s_zero, BLOCK_N, STAGES, 0, OVERLAP, p_layout, row_o)
            acc, m_i, l_i, i = _segment(acc, m_i, l_i, i, q_smem, k_bufs, v_bufs, k_ready, v_ready, kv_empty,
                                        (ke - t2 + BLOCK_N - 1) // BLOCK_N, (t2, lo, hi, ke, offs_m), cols, qk_scale,
                                        s_zero, BLOCK_N, STAGES, 1, OVERLAP, p_layout, row_o)
    if HAS_COLS:
        acc, m_i, l_i, i = _segment(acc, m_i, l_i, i, q_smem, k_bufs, v_bufs, k_ready, v_ready, kv_empty,
                                    (nc + BLOCK_N - 1) // BLOCK_N, col_geo, cols, qk_scale,
                                    s_zero, BLOCK_N, STAGES, 2, OVERLAP, p_layout, row_o, col_pre, OVERLAP == 2)
    if NARROW:  # edges at most NARROW keys wide, as NARROW-key tiles (q k^T with q from shared memory)
        sn_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                            instr_shape=[16, NARROW, 16])
        row_sn: gl.constexpr = gl.SliceLayout(1, sn_layout)
        EDGN, ECOUNTN, stride_enb, stride_enh, stride_ecnb, stride_ecnh = nar_args
        nn = gl.load(ECOUNTN + b * stride_ecnb + h * stride_ecnh + pid_m)
        acc, m_n, l_n, i = _segment(acc, gl.convert_layout(m_i, row_sn), gl.convert_layout(l_i, row_sn), i, q_mem,
                                    kn_bufs, vn_bufs, k_ready, v_ready, kv_empty, nn,
                                    (EDGN + b * stride_enb + h * stride_enh, m0, gl.convert_layout(offs_m, row_sn), N),
                                    gl.arange(0, NARROW, layout=gl.SliceLayout(0, sn_layout)), qk_scale,
                                    gl.zeros([WG_M, NARROW], gl.float32, sn_layout), NARROW, STAGES, 3, OVERLAP,
                                    p_layout, row_o, SUB=BLOCK_N // NARROW)
        m_i = gl.convert_layout(m_n, row_s)
        l_i = gl.convert_layout(l_n, row_s)

    l_o = gl.convert_layout(l_i, row_o)
    out = acc / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
    rows = m0 + ROW0 + gl.arange(0, WG_M, layout=row_o)
    offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :]
    if PRIOR:
        # merge an earlier launch's normalised rows over other keys (vertical-slash's band launch; heads /
        # query-block groups where its count is not 0): weights 2^(lse - m) and 2^(m_i - m), as the
        # Triton kernel's epilogue; PRIOR_O may be O (each program reads its own rows first)
        # (PRIOR 2: the rows TMA-loaded by the producer into the ring slot after the last tile, rows past N
        # zero; the lse loaded up front)
        (PRIOR_O, PRIOR_LSE, PRIOR_CNT, stride_pb, stride_ph, stride_pn, stride_pcb, stride_pch, stride_pcq,
         qshift) = vs_args[9:]
        if _prior_written(b, h, pid_m, vs_args):
            if PRIOR == 2:
                sl = i % STAGES
                mbarrier.wait(k_ready.index(sl), (i // STAGES) & 1)
                o1 = k_bufs.index(sl).reshape([k_bufs.shape[3], k_bufs.shape[4]]).load(o_layout).to(gl.float32)
                s1 = s1_pre
            else:
                rmask = rows < N
                o1 = gl.load(PRIOR_O + b * stride_pb + h * stride_ph + rows[:, None] * stride_pn + offs_d[None, :],
                             mask=rmask[:, None], other=0.0).to(gl.float32)
                s1 = gl.load(PRIOR_LSE + b * stride_lb + h * stride_lh + rows, mask=rmask, other=float("-inf"))
            m_o = gl.convert_layout(m_i, row_o)
            m_new = gl.maximum(m_o, s1)
            m_new = gl.where(m_new == float("-inf"), 0.0, m_new)
            w1 = gl.exp2(s1 - m_new)
            w2 = gl.exp2(m_o - m_new)
            den = l_o * w2 + w1
            den = gl.where(den == 0.0, 1.0, den)
            out = (acc * w2[:, None] + o1 * w1[:, None]) / den[:, None]
    if LSE_OUT:
        # each row's log2-sum-exp2 of its scaled logits (-inf: no key) for a later launch's merge; a
        # program with no range and no tile writes neither it nor its rows (as the Triton kernel)
        if (nr > 0) | (nt > 0):
            lse = gl.where(l_i > 0.0, m_i + gl.log2(gl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
            gl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=offs_m < N)
            gl.store(o_ptrs, out.to(dt), mask=(rows < N)[:, None])
    else:
        gl.store(o_ptrs, out.to(dt), mask=(rows < N)[:, None])


@gluon.jit
def gluon_fwd_kernel(q_desc, k_desc, v_desc, po_desc, kn_desc, vn_desc, O, LSE,
                     TILES, TCOUNT, RANGES, RCOUNT,
                     kc_desc, vc_desc, COLS, CCOUNT, CW, stride_colb, stride_colh, stride_ccb, stride_cch,
                     stride_cwb, stride_cwh,
                     EDG, ECOUNT, stride_eb, stride_eh, stride_ecb, stride_ech, SBITS, stride_sbb, stride_sbh,
                     PRIOR_O, PRIOR_LSE, PRIOR_CNT, stride_pb, stride_ph, stride_pn, stride_pcb, stride_pch, stride_pcq,
                     prior_qshift, EDGN, ECOUNTN, stride_enb, stride_enh, stride_ecnb, stride_ecnh,
                     stride_tb, stride_th, stride_tq, stride_tcb, stride_tch,
                     stride_rb, stride_rh, stride_rq, stride_rr, stride_cb, stride_ch, stride_cq,
                     stride_ob, stride_oh, stride_on, stride_lb, stride_lh,
                     N, H, GROUP, NQB, qk_scale, TILE_SCALE,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                     STAGES: gl.constexpr, HAS_TILES: gl.constexpr, PRODUCER_REGS: gl.constexpr, OVERLAP: gl.constexpr,
                     TWO: gl.constexpr, CONSUMER_REGS: gl.constexpr, LSE_OUT: gl.constexpr,
                     HAS_COLS: gl.constexpr, TILES_REL: gl.constexpr, HAS_EDGES: gl.constexpr, PRIOR: gl.constexpr,
                     PAD: gl.constexpr, QREG: gl.constexpr, NARROW: gl.constexpr, num_warps: gl.constexpr):
    """TWO: two consumer warpgroups of num_warps (= 4) warps, rows 0..63 and 64..127 of a 128-row
    block, in partitions of their own (they drift apart: one's softmax runs while the other's wgmma
    does), both reading every K / V tile (a stage is free once both released it)."""
    dt: gl.constexpr = q_desc.dtype
    q_tile = gl.allocate_shared_memory(dt, [1, 1, BLOCK_M, HEAD_D], q_desc.layout)  # TMA box of q_desc
    q_smem = q_tile.reshape([BLOCK_M, HEAD_D])
    k_bufs = gl.allocate_shared_memory(dt, [STAGES, 1, 1, BLOCK_N, HEAD_D], k_desc.layout)  # ring of TMA boxes
    v_bufs = gl.allocate_shared_memory(dt, [STAGES, 1, 1, BLOCK_N, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(kv_empty.index(s), count=2 if TWO else 1)

    WG_M: gl.constexpr = BLOCK_M // 2 if TWO else BLOCK_M
    outs = (O, LSE, stride_ob, stride_oh, stride_on, stride_lb, stride_lh)
    if NARROW:  # the ring's buffers seen as BLOCK_N // NARROW times as many NARROW-row ones (a narrow tile
        # uses a stage's first)
        kn_bufs = k_bufs._reinterpret(dt, [STAGES * (BLOCK_N // NARROW), 1, 1, NARROW, HEAD_D], kn_desc.layout)
        vn_bufs = v_bufs._reinterpret(dt, [STAGES * (BLOCK_N // NARROW), 1, 1, NARROW, HEAD_D], vn_desc.layout)
    else:
        kn_bufs = k_bufs
        vn_bufs = v_bufs
    bufs = (q_smem, k_bufs, v_bufs, kn_bufs, vn_bufs)
    nar_args = (EDGN, ECOUNTN, stride_enb, stride_enh, stride_ecnb, stride_ecnh)
    bars = (q_bar, k_ready, v_ready, kv_empty)
    lists = (TILES, TCOUNT, RANGES, RCOUNT, stride_tb, stride_th, stride_tq, stride_tcb, stride_tch,
             stride_rb, stride_rh, stride_rq, stride_rr, stride_cb, stride_ch, stride_cq)
    dims = (N, H, GROUP, NQB)
    cols_args = (kc_desc, vc_desc, COLS, CCOUNT, CW, stride_colb, stride_colh, stride_ccb, stride_cch,
                 stride_cwb, stride_cwh)
    vs_args = (EDG, ECOUNT, stride_eb, stride_eh, stride_ecb, stride_ech, SBITS, stride_sbb, stride_sbh,
               PRIOR_O, PRIOR_LSE, PRIOR_CNT, stride_pb, stride_ph, stride_pn, stride_pcb, stride_pch, stride_pcq,
               prior_qshift)
    if TWO:
        gl.warp_specialize([
            (_consumer, (outs, bufs, bars, lists, dims, qk_scale, cols_args, vs_args, nar_args, BLOCK_M, BLOCK_N, HEAD_D, STAGES, HAS_TILES,
                         OVERLAP, num_warps, 0, WG_M, LSE_OUT, HAS_COLS, HAS_EDGES, PRIOR, PAD, QREG, NARROW)),
            (_consumer, (outs, bufs, bars, lists, dims, qk_scale, cols_args, vs_args, nar_args, BLOCK_M, BLOCK_N, HEAD_D, STAGES, HAS_TILES,
                         OVERLAP, num_warps, WG_M, WG_M, LSE_OUT, HAS_COLS, HAS_EDGES, PRIOR, PAD, QREG, NARROW)),
            (_producer, ((q_desc, k_desc, v_desc, po_desc, kn_desc, vn_desc), q_tile, bufs, bars, lists, dims, TILE_SCALE,
                         cols_args, vs_args, nar_args, BLOCK_M, BLOCK_N, STAGES, HAS_TILES, HAS_COLS, TILES_REL,
                         HAS_EDGES, PRIOR, NARROW)),
        ], [num_warps, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (outs, bufs, bars, lists, dims, qk_scale, cols_args, vs_args, nar_args, BLOCK_M, BLOCK_N, HEAD_D, STAGES, HAS_TILES,
                         OVERLAP, num_warps, 0, WG_M, LSE_OUT, HAS_COLS, HAS_EDGES, PRIOR, PAD, QREG, NARROW)),
            (_producer, ((q_desc, k_desc, v_desc, po_desc, kn_desc, vn_desc), q_tile, bufs, bars, lists, dims, TILE_SCALE,
                         cols_args, vs_args, nar_args, BLOCK_M, BLOCK_N, STAGES, HAS_TILES, HAS_COLS, TILES_REL,
                         HAS_EDGES, PRIOR, NARROW)),
        ], [1], [PRODUCER_REGS])
