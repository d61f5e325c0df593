"""Launchers: pattern arguments -> SparseIndex (on the device) -> one Triton kernel.

CUDA tensors run the compiled kernel; CPU tensors run the same kernel under the Triton
interpreter (a second copy of the kernel module, loaded with TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math

import torch

from .. import index as _index
from . import gluon as _gluon
from . import graphed
from ._loader import kernel_module
from .pdl import hopper as _hopper
from .streams import side_stream



CONFIGS = {
    # vertical-slash: 64-row blocks, bands as relative tiles + edges (split 4); H100 sweep
    # 2026-11-25 (benchmarks/results/attention.md): 45.4 ms realistic + 58.5 ms structured at 128K
    "vs": {128: (64, 64, 4, 3, 3, 4, 2), 64: (64, 64, 4, 3, 3, 4, 2)},
    # A-shape: 128 x 128 tiles with TMA (2026-11-26 sweep, benchmarks/results/attention_variants.md)
    "ashape": {128: (128, 128, 8, 3, 1, 1), 64: (64, 64, 4, 3, 1, 1)},
    "blocks": {128: (64, 64, 4, 3, 1, 0), 64: (64, 64, 4, 3, 1, 0)},
}
# interpreter (CPU tensors): larger, fewer programs run faster; same loop structure as on GPU
_CPU_CONFIGS = {"vs": (64, 64, 4, 1, 1, 4), "ashape": (64, 64, 4, 1, 1, 1), "blocks": (64, 64, 4, 1, 1, 0)}

# Sequence lengths below which the sparse kernel was slower than cuDNN dense attention on an
# H100 (one Llama-3-8B layer, bf16; benchmarks/results/attention.md). Callers that may swap
# the pattern for dense attention (the integration layer) can read these; the ops never do,
# since dense attention is not the same function.
BREAK_EVEN = {
    "ashape": 0,  # 3.28x at 32K (2026-11-26, program order + TMA)
    "block_sparse": 0,  # 2.10x at 32K (top-100 of 64-blocks)
    "vertical_slash": 32 * 1024,  # realistic indices: 1.30x at 32K; shorter lengths unmeasured
    # what a patched model uses (indices estimated per call): structured q/k 1.08x at 32K, but
    # TTFT 8B at 32K with random weights (scattered slashes, every head sent dense by the guards)
    # 0.92x: the estimation and index construction a dense-routed call still pays (~3.7 ms per
    # layer) outweigh the gain there (realistic indices: 1.06x TTFT), so 32K stays dense
    "vertical_slash_estimated": 40 * 1024,
    # adaptive methods (estimation + kernel, structured q/k; results/adaptive_breakeven.md, adaptive_recall.md,
    # adaptive_guarded.md, 2026-11-26): below 64K a call the density guard sends dense still pays the
    # probe (~1-1.7 ms: xattention, flexprefill) or the estimation (the gate: 2.3 ms at 48K) plus one
    # host synchronisation (~1-2 ms more of exposed launches): 5-10% of dense attention at 48K, 5-6% at
    # 64K, ~1% at 128K; and even where they run sparse they barely win below 64K (flexprefill gamma 0.9
    # 0.81x / 1.07x at 32K / 48K, xattention tau 0.9 0.83x / 0.98x, the learned gate 0.83x / 1.12x)
    "flexprefill": 64 * 1024,
    "adaptive": 64 * 1024,
    "xattention": 64 * 1024,
}


# Kernel variants (ablations: benchmarks/attention.py --variants). ORDER 1: the programs of one
# KV head's query heads and query blocks run together (L2 reuse of scattered key blocks;
# block-sparse 51 -> 34 ms at 128K on an H100); 0: heads fastest. TMA: contiguous key tiles
# through tensor descriptors ("auto" = on for fp16 / bf16 on sm_90+ GPUs, and in the
# interpreter; 1 = 2-D descriptors over [B * Hkv * N, D] (k / v must allow that view), 2 = 4-D
# descriptors [B, Hkv, N, D] (any layout), 0 = pointer loads).
# GRAPH_INDEX: vertical-slash indices built by replaying a CUDA graph (`graphed`), not ~250 launches.
# VS_BAND: vertical-slash's local band (offsets 0..w of a head, w + 1 >= VS_BAND_MIN) runs as a
# launch of its own with the A-shape config (128 x 128 tiles on the GPU); the second launch (the
# rest: 64 x 64 tiles) merges it in. VS_OVERLAP: with VS_BAND on a GPU, the band's index is built
# first (no sort) and the rest of the index on a side stream while the band launch runs. Off since the
# band launch is the Gluon kernel (one program per SM holding the whole register file: the side
# stream's graph nodes only interleave with its programs, and cost more than they hide): H200, 128K
# realistic, 5 alternating rounds, off 33.16-33.45 vs on 33.44-33.74 ms, faster in every round
# (results/vs_overlap_ab.md); again with the graphed two-launch index and both launches on Gluon: 27.41 vs
# 28.18 ms (27.71 with a default-priority side stream; results/vs_overlap_s29.md); the band launch first and the
# index after it on the same stream 27.95 vs 27.57 (results/vs_bandfirst_s29.md).
# VS_TILED_RUNS: at most this many exact slash runs per head (the nearest) become relative tiles + edges
# (index.from_vertical_slash(max_tiled=)); the lists were sized by the number of slashes (6096 realistic: ~37K
# edge slots per head, sorted and stacked in every call); 0: no cap. With VS_OVERLAP off (results/vs_cap_ab.md,
# H200 128K, 3 rounds): 33.36 ms vs 33.61 uncapped.
# VS_RUNS_KERNEL: on a GPU the sort, runs, grouping and tile cap of the index in one torch.sort + one
# launch, and the capped runs' relative tiles + edges in one more (kernels.runs,
# index.from_vertical_slash(fused_runs=)) instead of ~180 torch launches: H200 128K realistic, graphed
# index 0.47 vs 1.10 ms (eager 1.18 vs 2.74), whole call 32.71 vs 33.29 ms, 3 alternating rounds
# (results/vs_runs_kernel_ab2.md, vs_parts_runs2.md; the runs launch alone: 0.66 ms, 32.40 vs 32.95,
# 512K 132.60 vs 132.63, vs_runs_kernel_ab.md). Measured and not kept: the column pass
# testing each cell's skip bit with an AND against a per-row bit instead of a 64-bit shift (128K 33.28 vs
# 33.21 ms, 512K 135.15 vs 133.88; results/vs_rowbit_ab.md).
# VS_COL_TMA: gathered columns' K / V rows copied per query head in column order before the
# launch (on TMA-capable devices), the column pass then loads them through TMA. PF: block-sparse tile lists (not
# vertical-slash's relative tiles) load the next tile's start one step ahead, for n <= PF_MAX_N
# (H100, realistic top-100 lists, A/B alternated twice, results/attention_pf_ab.md: 128K 28.5-28.6
# vs 31.1-33.1 ms, 256K 65.5-66.0 vs 70.8-73.6; slower at 512K: 160.8-163.9 vs 153.3-153.7, again in
# attention_pf512_ab.md: 159.7-165.1 vs 152.4-153.1). Measured and not kept (attention_pf512_ab.md,
# attention_pfrel_ab.md): two tiles ahead (128K 37.7 vs 27.6-29.2 ms), vertical-slash's relative
# tiles one step ahead (128K 39.3-39.4 vs 32.5-32.7 ms).
# VS_BAND_COLS: the band launch also runs the gathered columns of the heads that have a band (128-row
# query blocks, skip words per column; index.band_index(..., vertical_idx=)) and the second launch only
# the other slash runs; on a GPU only where the Gluon kernel serves the band launch. Off: a wash on an
# H200 (realistic indices, whole call, 3 alternating rounds, results/vs_parts_cols3.md: 128K 32.79 vs
# 32.96 ms, 256K 65.69 vs 67.67, 512K 136.34 vs 132.96; the Gluon column pass costs 3.9 ms at 128K where
# it saves the second launch 4.0, its skip bits ~1 ms of it). Measured and not kept: the band launch also
# taking each head's exact slash runs as ranges (masked 128 x 128 tiles; the second launch's 64 x 64 relative
# tiles + edges waste fewer cells): H200 realistic, 3 alternating rounds, 128K 36.07 vs 33.09 ms, 512K 144.37
# vs 133.59, with the columns too 38.24 / 153.55 (results/vs_runs_ab.md, vs_band_runs_rejected.patch).
# VS_BAND_COLS again with session 30's kernels (results/vs_bandcols_s30.md): 128K 28.96 vs 28.01 ms, 256K 57.92
# vs 57.35.
# Not kept either: both launches in one (each 128-row block's band, then per consumer warpgroup its 64-row block of
# the second launch, no merge): 128K 28.34 vs 27.02 ms at best, 256K 56.95 vs 53.72 (results/vs_fused2_s30.md,
# vs_fused3_s30.md, vs_fused_rejected.patch; at one program per SM the serial latencies the second launch's two
# programs per SM overlap are exposed).
# GLUON: block-sparse 64 x 64 tile lists and 128 x 128 range-only launches (A-shape, vertical-slash's
# band) on sm_90 (bf16, head_dim 128) run the warp-specialised Gluon kernel (kernels/gluon.py;
# H100 block-sparse 512K 134.2-141.2 vs 154.2-154.8 ms, A-shape 128K 17.56 vs 18.17 ms,
# results/gluon_ab{1,2}.md) when the call asks for nothing it lacks (q_rows, modality, heads, and
# prior but in the second launch below); False: always the Triton kernel. GLUON_VS (with GLUON):
# vertical-slash's second launch (relative tiles, edges, ranges with holes, columns, the band launch's
# rows merged in) on the Gluon kernel too
# (gluon.CONFIGS["vs"]; H200 realistic, whole call, 3 alternating rounds: 128K 29.20-29.60 vs 31.17-31.48
# ms, 512K 117.87-119.59 vs 126.48-127.78; outputs bit-identical; results/vs_gluon_ab{,2}.md; with its masks
# in inline PTX 27.91 / 113.46 ms, results/vs_mask_ab.md).
FLAGS = {"ORDER": 1, "TMA": "auto", "KERNEL": "_attn_kernel.py",  # KERNEL: a kernel file (A/B runs)
         "GLUON": True, "GLUON_VS": True,
         "GRAPH_INDEX": True, "VS_BAND": True, "VS_OVERLAP": False, "VS_BAND_COLS": False, "VS_TILED_RUNS": 64,
         "VS_RUNS_KERNEL": True,
         "VS_COL_TMA": True, "PF": True, "PF_MAX_N": 256 * 1024,
         # BS_LISTS: unordered block lists sorted by kernels.rows.block_lists (see index._lists_kernel);
         # BS_PAIRS: 64-block lists' pair blocks as 128 x 128 tiles in a launch of their own (_block_pairs)
         "BS_LISTS": "auto", "BS_PAIRS": "auto"}


VS_BAND_MIN = 2048


def _tma_mode(q, k, v, q_rows) -> int:
    """FLAGS["TMA"] resolved for these tensors (0 pointer loads, 1 / 2 descriptors, see FLAGS)."""

    def flat(t):  # rows (b, h, n) at stride D, 16-byte aligned
        b, h, n, d = t.shape
        return (t.stride(2) == d and (h == 1 or t.stride(1) == n * d) and (b == 1 or t.stride(0) == h * n * d)
                and t.data_ptr() % 16 == 0 and d * t.element_size() % 16 == 0)

    def aligned(t):
        return t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])

    mode = FLAGS["TMA"]
    if mode != "auto":
        mode = int(mode)
        if mode and q_rows is not None:
            raise ValueError("TMA descriptors do not serve gathered query rows (q_rows): set FLAGS['TMA'] to 0")
        if (mode == 1 and not (flat(k) and flat(v))) or (mode == 2 and not (aligned(k) and aligned(v))):
            raise ValueError(f"TMA mode {mode}: k / v strides {k.stride()} / {v.stride()} do not allow it "
                             "(1: contiguous [B, Hkv, N, D]; 2: 16-byte aligned strides)")
        return mode
    if q_rows is not None:  # query-side indirection: pointer loads only
        return 0
    if q.device.type == "cuda" and (not _hopper(q.device) or k.element_size() != 2):
        return 0  # descriptors measured for fp16 / bf16 on Hopper only
    if flat(k) and flat(v):
        return 1
    return 2 if aligned(k) and aligned(v) else 0


def _descriptors(k, v, block_n: int, mode: int):
    """TMA descriptors of k / v [B, Hkv, N, D]: mode 1 over the [B * Hkv * N, D] view (tiles may
    read rows of the next head or batch, or zeros past the end; the kernel masks those keys),
    mode 2 over [B, Hkv, N, D] itself (any strides; zeros outside each head)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if mode == 2:
        return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, t.shape[-1]]) for t in (k, v)]
    return [TensorDescriptor(t, [t.numel() // t.shape[-1], t.shape[-1]], [t.shape[-1], 1], [block_n, t.shape[-1]])
            for t in (k, v)]


def _pow2_factor(x: int) -> int:
    return x & -x


def _config(kind: str, d: int, device: torch.device, config=None):
    """(block_m, block_n, num_warps, num_stages, edge_stages, split[, holey_stages]); entries
    of ``config`` (a tuple of up to 7) that are not None win."""
    base = _CPU_CONFIGS[kind] if device.type != "cuda" else CONFIGS[kind].get(d, (128, 64, 4, 2, 1, 0))
    if config is None:
        return tuple(base)
    base = tuple(base) + (1,) * (7 - len(base))  # holey_stages (split 3 only) defaults to 1
    config = tuple(config) + (None,) * (len(base) - len(config))
    return tuple(c if c is not None else b for c, b in zip(config, base))


def column_inputs(q, k, v, idx: _index.SparseIndex) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a column pass reads besides idx, for q [B, Hq, N, D], k / v [B, Hkv, N, D] and an index
    with columns [B, Hq, C] and slash_bits: (kc, vc, cw) = each query head's column keys / values in
    column order [B, Hq, C, D] (padding columns read key N - 1, masked), and the skip words int64
    [B, Hq, N + 192] per distance m0 - c (``_attn_kernel.col_words_kernel``; 64 rows a word). Built
    by the launch unless given (``run_index(col_inputs=)``: vertical-slash builds them on its side
    stream)."""
    b, hq, n, _ = q.shape
    hkv = k.shape[1]
    cidx = idx.columns.long().clamp(max=n - 1)
    kvh = (torch.arange(hq, device=q.device) // (hq // hkv)).view(1, hq, 1)
    bi = torch.arange(b, device=q.device).view(b, 1, 1)
    ne = n + 192  # distances m0 - c from -127 (128-row blocks) to n + 64
    cw = torch.empty(b, hq, ne, dtype=torch.int64, device=q.device)
    sb = idx.slash_bits
    kernel_module(FLAGS["KERNEL"], q.device.type != "cuda").col_words_kernel[(b * hq, math.ceil(ne / 1024))](
        sb, cw, sb.stride(0) if sb.shape[0] > 1 else 0, sb.stride(1) if sb.shape[1] > 1 else 0,
        cw.stride(0), cw.stride(1), ne, hq, PAD=_index.BITS_PAD, BLOCK=1024)
    return k[bi, kvh, cidx], v[bi, kvh, cidx], cw


def check_merge(q, lse_out, prior, nqb: int) -> None:
    """Raises ValueError unless lse_out / prior are what ``run_index`` documents for q [B, Hq, N, D]
    with nqb query blocks (both launch kernels read them as such)."""
    b, hq, n, _ = q.shape
    if lse_out is not None and prior is not None:
        raise ValueError("run_index: lse_out and prior cannot be combined in one launch")
    for name, t in (("lse_out", lse_out), ("prior lse", prior[1] if prior is not None else None)):
        if t is not None and (t.shape != (b, hq, n) or t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError(f"{name}: expected a contiguous float32 tensor of shape {(b, hq, n)}, got "
                             f"{t.dtype} {tuple(t.shape)}")
    if prior is None:
        return
    if prior[0].shape != q.shape or prior[0].stride(-1) != 1:
        raise ValueError(f"prior output: expected shape {tuple(q.shape)} with a contiguous last dim, got "
                         f"{tuple(prior[0].shape)} strides {prior[0].stride()}")
    prior_c = prior[2]
    qshift = prior[3] if len(prior) > 3 else 0
    groups = -(-nqb // (1 << qshift))
    if (prior_c.dtype != torch.int32 or prior_c.shape[:2] != (b, hq) or prior_c.dim() not in (2, 3)
            or (prior_c.dim() == 3 and prior_c.shape[2] != groups)):
        raise ValueError(f"prior written: expected int32 [{b}, {hq}] (heads) or [{b}, {hq}, {groups}] "
                         f"(query blocks >> {qshift}), got {prior_c.dtype} {tuple(prior_c.shape)}")


def run_index(q, k, v, idx: _index.SparseIndex, scale: float, block_n: int, num_warps: int = 8,
              num_stages: int = 2, edge_stages: int = 1, split: int = 0, holey_stages: int = 1, *,
              q_rows: torch.Tensor | None = None, modality: torch.Tensor | None = None, slot: int = 0,
              out: torch.Tensor | None = None, heads: torch.Tensor | None = None,
              lse_out: torch.Tensor | None = None, prior: tuple | None = None,
              col_inputs: tuple | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, N, D] over k/v [B, Hkv, N, D] restricted to the cells of ``idx``
    (built with block_m = idx.block_m). Returns a tensor like q.

    q_rows: int32 [B|1, Hq|1, nqb * block_m] original query positions (-1 = padding): query
    block t is rows q_rows[..., t * block_m:(t + 1) * block_m] (query-side indirection; idx's
    per-block lists then refer to these tiles; only plain ranges and columns without a slash
    map). modality [B, N] + slot: only rows whose modality is ``slot`` are written. out: write
    into this tensor (like q; rows not written keep their values) instead of a new one.
    heads: bool [Hq]: the other heads' programs visit nothing and write zeros, or, when `out`
    is given, leave out's rows of those heads as they are.
    lse_out: float32 [B, Hq, N] contiguous: receives each row's log2-sum-exp2 of its scaled
    logits (-inf for a row with no key); query blocks with no range (range_count 0) write
    neither it nor their output rows. prior = (o [B, Hq, N, D] like q, lse float32 [B, Hq, N]
    contiguous, written int32 [B, Hq]): another launch's result over other keys of the same
    rows (disjoint cells), with the heads it wrote (!= 0: every row); merged in for those
    heads: the output is attention over the union. A fourth entry s (prior = (o, lse, written,
    s)) and written int32 [B, Hq, ceil(nqb / 2^s)]: per group of 2^s query blocks instead (a
    launch of query blocks 2^s times as tall wrote those; the others are not read).
    col_inputs: ``column_inputs(q, k, v, idx)`` built beforehand (else here, when idx has columns)."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {d} not supported by the Triton kernel (16..256, power of 2)")
    orig_dtype = q.dtype
    user_out = None
    interpret = q.device.type != "cuda"
    # float64, and bfloat16 under the interpreter (triton 3.6's interpreted tl.dot mishandles
    # bfloat16 operands): computed in float32, cast back at the end
    if q.dtype == torch.float64 or (interpret and q.dtype == torch.bfloat16):
        wide = q.dtype
        q, k, v = q.float(), k.float(), v.float()
        if out is not None and out.dtype == wide and out.shape == q.shape:
            user_out, out = out, out.float()  # computed in float32, written back at the end
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(f"out: expected a tensor like q ({tuple(q.shape)}, {q.dtype}, last dim contiguous), "
                         f"got {tuple(out.shape)}, {out.dtype}")
    keep_others = out is not None and heads is not None
    out = torch.empty_like(q) if out is None else out
    if FLAGS["GLUON"] and not interpret and q_rows is None and modality is None and heads is None:
        kind, _ = _gluon.route(q, k, v, idx, block_n)
        if kind == "vs" and not FLAGS["GLUON_VS"] or kind != "vs" and prior is not None:
            kind = None
        if kind is not None:
            return _gluon.run(q, k, v, idx, scale, out=out, lse_out=lse_out, block_n=block_n, check=False,
                              col_inputs=col_inputs, prior=prior, **_gluon.CONFIGS[kind])
    if idx.edges_narrow is not None:  # narrow tiles are the Gluon kernel's: back to block_n-key edges
        idx = _index.merge_narrow_edges(idx)
    mod = kernel_module(FLAGS["KERNEL"], interpret)
    nqb = math.ceil(n / idx.block_m)
    if q_rows is not None:
        if q_rows.dim() != 3 or q_rows.shape[-1] % idx.block_m or q_rows.dtype != torch.int32:
            raise ValueError(f"q_rows: expected int32 [B|1, Hq|1, T * block_m={idx.block_m}], got "
                             f"{q_rows.dtype} {tuple(q_rows.shape)}")
        if split != 0 or idx.slash_map is not None or idx.tiles is not None or idx.edges is not None:
            raise ValueError("q_rows (gathered query rows) needs plain ranges and columns: split=0, no slash map, "
                             "no tiles or edges")
        nqb = q_rows.shape[-1] // idx.block_m
    ranges, rc = idx.ranges, idx.range_count
    has_cols = idx.columns is not None and idx.columns.shape[-1] > 0
    has_smap = idx.slash_map is not None
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    has_tiles = idx.tiles is not None and idx.tiles.shape[-1] > 0
    if has_tiles and idx.block_n != block_n:
        raise ValueError(f"index tiles are {idx.block_n} wide, kernel block_n is {block_n}")
    tiles = idx.tiles if has_tiles else dummy
    tc = idx.tile_count if has_tiles else dummy
    has_edges = idx.edges is not None
    if has_edges and idx.block_n != block_n:
        raise ValueError(f"index edges are {idx.block_n} wide, kernel block_n is {block_n}")
    if has_smap and (block_n > 64 or idx.block_m > 128):
        raise ValueError("vertical-slash indices need block_n <= 64 and block_m <= 128 (64-bit slash windows), "
                         f"got block_n={block_n}, block_m={idx.block_m}")
    edges = idx.edges if has_edges else dummy
    ec = idx.edge_count if has_edges else dummy
    sbits = idx.slash_bits if has_smap else dummy
    cols = idx.columns if has_cols else dummy
    cc = idx.column_count if has_cols else dummy

    def st(t, i):
        return t.stride(i) if t.dim() > i and t.shape[i] > 1 else 0

    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    if interpret:
        prec = "ieee"
    order = FLAGS["ORDER"]
    tma = _tma_mode(q, k, v, q_rows)
    kd, vd = _descriptors(k, v, block_n, tma) if tma else (None, None)
    grid = (b * hq * nqb,) if order == 1 else (b * hq, nqb)
    qr = q_rows if q_rows is not None else dummy
    hon = heads.to(torch.int8).contiguous() if heads is not None else dummy
    mods = modality.contiguous() if modality is not None else dummy  # [B, N]: rows read with stride 1
    check_merge(q, lse_out, prior, nqb)
    lse_t = lse_out if lse_out is not None else (prior[1] if prior is not None else dummy)
    prior_o = prior[0] if prior is not None else dummy
    prior_c = prior[2] if prior is not None else dummy
    qshift = prior[3] if prior is not None and len(prior) > 3 else 0
    per_block = prior is not None and prior_c.dim() == 3
    # the column pass through TMA: each head's column keys / values copied in column order first
    col_tma = bool(FLAGS["VS_COL_TMA"]) and bool(tma) and has_cols and q_rows is None
    col_words = has_cols and has_smap
    if (col_tma or col_words) and col_inputs is None:
        col_inputs = column_inputs(q, k, v, idx)
    elif col_inputs is not None and col_inputs[0].dtype != k.dtype:  # computed in float32 here (see above)
        col_inputs = (col_inputs[0].to(k.dtype), col_inputs[1].to(v.dtype), col_inputs[2])
    kcd = vcd = None
    ncol = 0
    if col_tma:
        ncol = cols.shape[-1]
        kcd, vcd = _descriptors(col_inputs[0], col_inputs[1], block_n, 1)
    # block-sparse tile lists: the next tile's start loaded one step ahead (FLAGS["PF"])
    pf = bool(FLAGS["PF"]) and has_tiles and not idx.tiles_relative and n <= FLAGS["PF_MAX_N"]
    # the column pass's skip words per distance m0 - c, built once per call (one small launch; was
    # three bitmap words and shifts per column per tile: H100 128K 34.7 vs 34.7-36.1 ms, 256K 69.3-70.8
    # vs 71.1-73.6, results/attention_colwords_ab.md)
    cw = col_inputs[2] if col_words else dummy
    mod.sparse_fwd_kernel[grid](
        q, k, v, out,
        tiles, tc, ranges, rc, cols, cc, edges, ec, sbits,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        st(tiles, 0) if has_tiles else 0, st(tiles, 1) if has_tiles else 0, st(tiles, 2) if has_tiles else 0,
        st(tc, 0) if has_tiles else 0, st(tc, 1) if has_tiles else 0,
        st(ranges, 0), st(ranges, 1), st(ranges, 2), ranges.stride(3),
        st(rc, 0), st(rc, 1), rc.stride(2),
        st(cols, 0) if has_cols else 0, st(cols, 1) if has_cols else 0,
        st(cc, 0) if has_cols else 0, st(cc, 1) if has_cols else 0,
        st(edges, 0) if has_edges else 0, st(edges, 1) if has_edges else 0,
        st(ec, 0) if has_edges else 0, st(ec, 1) if has_edges else 0,
        st(sbits, 0) if has_smap else 0, st(sbits, 1) if has_smap else 0,
        n, hq, hq // hkv, nqb, float(scale) * 1.4426950408889634,
        BLOCK_M=idx.block_m, BLOCK_N=block_n, HEAD_D=d,
        HAS_TILES=has_tiles, HAS_COLS=has_cols, HAS_SMAP=has_smap, PREC=prec,
        STAGES=num_stages, EDGE_STAGES=edge_stages, SPLIT=split == 1, FLAT=split == 2, EDGES=split == 3,  # 4: edges
        HOLEY_STAGES=holey_stages, TILES_REL=has_tiles and idx.tiles_relative, HAS_EDGES=has_edges,
        PAD=_index.BITS_PAD,
        QROWS=qr, stride_qrb=st(qr, 0) if q_rows is not None else 0, stride_qrh=st(qr, 1) if q_rows is not None else 0,
        MODS=mods, stride_mb=mods.stride(0) if modality is not None else 0, SLOT=int(slot),
        HAS_QROWS=q_rows is not None, HAS_MOD=modality is not None,
        ORDER=order, KD=kd, VD=vd, TMA=tma, HEADS=hon, HAS_HEADS=0 if heads is None else (2 if keep_others else 1),
        LSE=lse_t, PRIOR_O=prior_o, PRIOR_LSE=lse_t, stride_lb=hq * n, stride_lh=n,
        stride_pb=prior_o.stride(0) if prior is not None else 0, stride_ph=prior_o.stride(1) if prior is not None else 0,
        stride_pn=prior_o.stride(2) if prior is not None else 0,
        PRIOR_CNT=prior_c, stride_pcb=st(prior_c, 0) if prior is not None else 0,
        stride_pch=st(prior_c, 1) if prior is not None else 0,
        stride_pcq=prior_c.stride(2) if per_block else 0, PRIOR_QSHIFT=qshift,
        LSE_OUT=lse_out is not None, PRIOR=prior is not None,
        KCD=kcd, VCD=vcd, NCOL=ncol, COL_TMA=col_tma,
        CW=cw, stride_cwb=cw.stride(0) if col_words else 0, stride_cwh=cw.stride(1) if col_words else 0,
        PF=pf, TILE_SCALE=idx.tile_scale if has_tiles else 1,
        num_warps=num_warps, num_stages=num_stages,
    )
    if user_out is not None:
        return user_out.copy_(out)
    return out if out.dtype == orig_dtype else out.to(orig_dtype)


def vertical_slash_attention(q, k, v, vertical_idx, slash_idx, scale, *, config=None, heads=None, out=None):
    """config: optional (block_m, block_n, num_warps, num_stages, edge_stages, split) override;
    heads: optional bool [Hq], the heads computed (the others' outputs are zeros, or out's rows
    when out is given); out: see run_index."""
    bm, bn, *rest = _config("vs", q.shape[-1], q.device, config)
    n, tiles_n = q.shape[2], bn if rest[3] == 4 else None
    # the local band in a launch of its own with the A-shape config (FLAGS["VS_BAND"])
    band_cfg = _config("ashape", q.shape[-1], q.device) if FLAGS["VS_BAND"] and tiles_n is not None else None
    band_bm = band_cfg[0] if band_cfg is not None else None
    band_min = VS_BAND_MIN if q.is_cuda else 16  # interpreter: small shapes take the two-launch path too (tests)

    # the band launch also takes the gathered columns of its heads where the Gluon kernel serves it
    # (FLAGS["VS_BAND_COLS"]; on a CPU the interpreted Triton kernel, for the tests)
    band_cols = (band_cfg is not None and bool(FLAGS["VS_BAND_COLS"]) and heads is None
                 and (not q.is_cuda or (FLAGS["GLUON"] and _gluon.band_reason(q, k, v, band_bm, band_cfg[1]) is None)))

    # edges at most `narrow` keys wide in a list of their own where the Gluon kernel runs the second launch
    narrow = (_gluon.vs_narrow(q, k, v, bm, bn) if tiles_n is not None and heads is None and FLAGS["GLUON"]
              and FLAGS["GLUON_VS"] else 0)

    def build(vi, si):
        return _index.from_vertical_slash(vi, si, n, bm, block_n=tiles_n, band_block_m=band_bm, band_min=band_min,
                                          band_columns=band_cols, max_tiled=FLAGS["VS_TILED_RUNS"] or None,
                                          fused_runs=bool(FLAGS["VS_RUNS_KERNEL"]) and q.is_cuda, narrow_n=narrow)

    def built(key, fn, inputs):  # replayed from a CUDA graph (FLAGS["GRAPH_INDEX"]) or eager
        return graphed.build_graphed(key, fn, inputs) if FLAGS["GRAPH_INDEX"] and q.is_cuda else fn(*inputs)

    side = side_stream(q.device, -1) if (band_cfg is not None and FLAGS["VS_OVERLAP"] and q.is_cuda
                                      and not torch.cuda.is_current_stream_capturing()) else None
    full_key = ("vertical_slash", n, bm, tiles_n, band_bm, band_cols, FLAGS["VS_TILED_RUNS"], FLAGS["VS_RUNS_KERNEL"],
                narrow)
    if side is None:
        idx = built(full_key, build, (vertical_idx, slash_idx))
        if band_cfg is None:
            return run_index(q, k, v, idx, scale, bn, *rest, heads=heads, out=out)
        idx, band = idx
    else:
        # the band's index first (a presence map and an argmin, no sort) and the band launch, then
        # the full index on a side stream: it is built while the band launch runs, and the host
        # work of launching it comes after the band launch, not before it
        if band_cols:
            band = built(("vs_band_cols", n, band_bm, band_min),
                         lambda vi, si: _index.band_index(si, n, band_bm, band_min, vertical_idx=vi),
                         (vertical_idx, slash_idx))
        else:
            band = built(("vs_band", n, band_bm, band_min),
                         lambda si: _index.band_index(si, n, band_bm, band_min), (slash_idx,))
        ready = torch.cuda.Event()
        ready.record()  # the inputs, and earlier calls' reads of the graphed index buffers
    # both launches write the one output: the band launch its heads' rows, the second launch reads
    # them back (each program its own rows) and overwrites them merged (no second q-sized buffer);
    # heads not computed stay as `out` had them (zeros when there was no `out`)
    if out is None:
        out = torch.zeros_like(q) if heads is not None else torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    # the column keys / values in column order and the skip words (column_inputs): the same for
    # both launches (the same sorted columns and slash bits); with band_cols built here for the band
    # launch, else for the second launch on the side stream while the band launch runs
    pre = column_inputs(q, k, v, band) if band_cols else None
    out = run_index(q, k, v, band, scale, band_cfg[1], *band_cfg[2:], heads=heads, out=out, lse_out=lse,
                    col_inputs=pre)
    if side is not None:
        side.wait_event(ready)
        for t in (vertical_idx, slash_idx, k, v):
            t.record_stream(side)
        with torch.cuda.stream(side):
            idx, _ = built(full_key, build, (vertical_idx, slash_idx))
            side_pre = pre is None
            if side_pre:
                pre = column_inputs(q, k, v, idx)
        main = torch.cuda.current_stream(q.device)
        main.wait_stream(side)
        made_on_side = list(pre) if side_pre else []  # eager index tensors too:
        if not (FLAGS["GRAPH_INDEX"] and q.is_cuda):
            made_on_side += [idx.ranges, idx.range_count, idx.columns, idx.column_count, idx.tiles, idx.tile_count,
                             idx.edges, idx.edge_count, idx.edges_narrow, idx.edge_count_narrow, idx.slash_bits]
        for t in made_on_side:
            if t is not None:
                t.record_stream(main)
    return run_index(q, k, v, idx, scale, bn, *rest, heads=heads, out=out, prior=(out, lse, band.range_count[..., 0]),
                     col_inputs=pre)


def ashape_attention(q, k, v, sink, window, scale, *, config=None, heads=None, out=None):
    bm, bn, *rest = _config("ashape", q.shape[-1], q.device, config)
    idx = _index.from_ashape(q.shape[2], int(sink), int(window), q.shape[0], q.shape[1], bm, q.device)
    return run_index(q, k, v, idx, scale, bn, *rest, heads=heads, out=out)


def block_sparse_attention(q, k, v, block_idx, block_size, scale, *, config=None, heads=None, out=None,
                           sorted_blocks: bool = False, dense_from: int | None = None):
    """Kernel row/column tiles are min(128, largest power of 2 dividing block_size) (64 on the
    CPU), so every kernel query block lies in one index block; block sizes with no power-of-2
    factor >= 16 run the torch reference. sorted_blocks: rows ascending and unique (no sort);
    dense_from: query blocks from there on see every causal key (one range each). Ascending
    64-block lists on a GPU run in two launches (pair blocks as 128 x 128 tiles, then the rest;
    FLAGS["BS_PAIRS"], `_block_pairs`)."""
    block_size = int(block_size)
    f = _pow2_factor(block_size)
    _, _, *rest = _config("blocks", q.shape[-1], q.device, None)
    cap = 128 if q.device.type == "cuda" else 64
    bm, bn = min(f, cap), min(f, cap)
    if bm == 128 and q.device.type == "cuda":  # 8 warps, 3 stages: 128.5 vs 133.5 ms (2 stages) for 128-blocks
        rest = [8, 3] + list(rest[2:])  # keeping ~60% at 128K (H100, results/attention_tune10.md)
    if config is not None:
        config = tuple(config) + (None,) * (2 + len(rest) - len(config))
        bm, bn, *rest = (c if c is not None else x for c, x in zip(config, (bm, bn, *rest)))
    if f < 16 or block_size % bm:
        from ..ops import reference as ref

        o = ref.masked_attention(q, k, v, ref.block_sparse_rows(q.shape[2], block_idx, block_size, dense_from), scale)
        return ref.write_heads(o, heads, out)
    if config is None and bm == bn == block_size and _pairs_on(q, block_idx, block_size, sorted_blocks):
        return _block_pairs(q, k, v, block_idx, block_size, scale, rest, heads, out, dense_from, sorted_blocks)
    idx = _index.from_block_sparse(block_idx, block_size, q.shape[2], bm, bn, sorted_blocks=sorted_blocks,
                                   dense_from=dense_from)
    return run_index(q, k, v, idx, scale, bn, *rest, heads=heads, out=out)


# Pair blocks (FLAGS["BS_PAIRS"]): key blocks 2J, 2J + 1 that both query blocks 2I and 2I + 1 of a
# sorted 64-block list keep run as one 128 x 128 tile in a launch of 128-row query blocks (8 warps);
# the rest of the lists as 64 x 64 tiles in a second launch that merges the first one's rows (the
# merge reads them only for query pairs with pair blocks). H100, the same 128-block lists at 128K
# (results/tile_pairs.md): 128 x 128 tiles 46.5-47.6 ms vs 64 x 64 tiles 54.6-57.7 ms; the learned
# 64-block gate keeps ~81% of its blocks in aligned key pairs of a row. "auto": CUDA, ascending
# lists (sorted_blocks); 1 / True: also unordered lists (sorted by kernels.rows.block_lists first).
PAIR_CONFIG = {"cuda": (8, 3, 1, 0), "cpu": (4, 1, 1, 0)}  # (warps, stages, edge stages, split)


def _pairs_on(q, block_idx, block_size: int, sorted_blocks: bool) -> bool:
    mode = FLAGS.get("BS_PAIRS", "auto")
    on = (q.is_cuda and sorted_blocks) if mode == "auto" else bool(mode)
    return (on and block_size == 64 and q.shape[2] > 2 * block_size
            and (sorted_blocks or _index._lists_kernel(block_idx)))


def _block_pairs(q, k, v, block_idx, block_size, scale, rest, heads, out, dense_from, sorted_blocks):
    """block_sparse_attention of block lists in two launches: the pair blocks
    (kernels.rows.pair_split) as tiles of 2 x block_size keys for query blocks of 2 x block_size
    rows, storing each row's log2-sum-exp2; then the rest of the lists, merging those rows.
    Unordered lists are sorted and deduplicated first (kernels.rows.block_lists)."""
    from .rows import block_lists, pair_split

    n = q.shape[2]
    if sorted_blocks:
        before, diag = _index.row_split(block_idx, sorted_blocks=True)
    else:
        block_idx, before, diag = block_lists(block_idx)
    pairs, pair_count, rest_idx, rest_count = pair_split(block_idx, before, dense_from)
    wide = _index.from_pairs(pairs, pair_count, n, 2 * block_size)
    lse = torch.empty(q.shape[0], q.shape[1], n, dtype=torch.float32, device=q.device)
    if out is None:  # both launches write into it; rows of heads not computed stay zeros
        out = torch.empty_like(q) if heads is None else torch.zeros_like(q)
    cfg = PAIR_CONFIG["cuda" if q.is_cuda else "cpu"]
    o = run_index(q, k, v, wide, scale, 2 * block_size, *cfg, heads=heads, out=out, lse_out=lse)
    idx = _index._block_index(n, block_size, block_size, rest_idx, rest_count, diag, dense_from=dense_from,
                              tile_scale=block_size)
    return run_index(q, k, v, idx, scale, block_size, *rest, heads=heads, out=o, prior=(o, lse, pair_count, 1))
