"""Launcher of the warp-specialised Hopper kernel (``_gluon_attn.py``, Gluon).

It serves SparseIndex objects made of a 64 x 64 tile list and exact ranges (block-sparse lists), of
exact ranges alone on 128 x 128 tiles (A-shape, vertical-slash's band launch, with its heads' gathered
columns when FLAGS["VS_BAND_COLS"] is on: results/vs_parts_cols3.md, a wash, off by default), or of
vertical-slash's 64 x 64 relative tiles + edges + ranges with holes + columns (its second launch, merged
with the band launch's rows: ``prior``), on bf16 CUDA tensors of an sm_90 GPU, head_dim 128, N of at
least one query block; ``attention.run_index`` sends such calls here when ``FLAGS["GLUON"]`` (and for the
second launch ``FLAGS["GLUON_VS"]``) is on and ``reason`` returns None. Everything else runs the Triton
kernel.

Measured (H100s, one Llama-3-8B layer, benchmarks/results/gluon_ab{1,2,3,4}.md; the range config's stages on an H200 below): block-sparse
realistic top-100 lists, kernel alone, 134.2-141.7 ms vs 154.2-156.8 for the Triton kernel at 512K
(the producer warp keeps two K / V tiles in flight where Triton's pipeliner keeps one), 26.6-27.6
vs 27.2-28.2 ms at 128K; the whole call 141.8-142.6 vs 158.1 ms at 512K. A-shape with two consumer
warpgroups 17.4-17.7 vs 18.2-18.3 ms at 128K (one warpgroup on 64 x 64 tiles: 18.3-18.4 ms; the
two issuing their wgmma in turns: 17.6 ms, not kept). q / k / v are read through 4-D descriptors with
their own strides, so the transposed views of a model's projections need no copy.
"""
from __future__ import annotations

import math

import torch

from .. import index as _index

# Per index kind: stages (K / V tiles in flight), consumer warps (16 rows each) per warpgroup,
# registers per thread at launch (the producer warpgroup gives its share to the consumers), the next
# tile's q k^T issued before this tile's softmax (overlap; 2: also the mask inputs loaded ahead), two
# consumer warpgroups on 128-row blocks sharing each K / V tile (two), an earlier launch's rows merged
# through TMA (prior_tma).
# "tiles": block-sparse 64 x 64 tile lists (gluon_ab1.md, H100 512K: 2 stages 134.2 ms, 3 stages
# 151.3, 4 stages 166.2, 3 stages without overlap 168.5; Triton 154.2; gluon_ab2.md: 2 stages without
# overlap 163.4 vs 141.2). "ranges": 128 x 128 tiles of ranges only (A-shape, vertical-slash's band
# launch; gluon_ab2.md, H100 128K: 17.56 ms vs Triton 18.17; without overlap 17.50, 3 stages of
# 64-key tiles 17.89; gluon_ab3.md: the two issuing their wgmma in turns 17.60 vs 17.42, not kept:
# results/gluon_pingpong_rejected.patch). H200 (results/as_stages_h200.md, A-shape 128K kernel alone, 3
# alternating rounds): 3 stages of 128-key tiles 16.43-16.68 ms vs 2 stages 17.49-17.62 (Triton 18.53-18.81;
# maxnreg 160 17.74-17.90): 3 stages, 224 KB of shared memory (226 KB with the column pass; 227 KB per block).
# "vs": vertical-slash's second launch (64 x 64 relative tiles, edges, ranges with holes, gathered columns,
# merged with the band launch's rows), one consumer warpgroup per 64-row block as "tiles", two programs per
# SM (115 KB of shared memory each). H200, realistic indices, whole ops call, 3 alternating rounds
# (results/vs_gluon_ab.md, vs_gluon_ab2.md): 128K 3 stages 29.20 / 29.60 ms, 2 stages 29.48, without
# overlap 30.06, the Triton launch 31.17 / 31.48; 512K 117.87 / 119.59, 2 stages 119.44, Triton 126.48 /
# 127.78. The counts loaded up front and the walk over the ranges skipped when none has holes
# (results/vs_skip_ab.md): 128K 29.26 vs 29.64 ms, 512K 119.33 vs 120.02 (Triton 31.50 / 127.73). Not kept:
# each tile's mask inputs loaded one tile ahead (128K 29.50 vs 29.48, 512K 118.94 vs 120.07;
# results/vs_ahead_ab.md, vs_mask_ahead_rejected.patch); the edge mask from a per-cell (row - column) kept
# in registers (one subtraction and one compare per cell, the key bounds only where a tile crosses them):
# 30.60 ms at 128K, 123.79 at 512K. Masks in inline PTX (_gluon_attn._masked; results/vs_mask_ab.md,
# bs_mask_ab.md): vertical-slash 128K 27.91 vs 29.50 ms, 512K 113.46 vs 118.89; block-sparse 26.42 vs 27.04,
# 126.54 vs 125.41 (a wash: one masked tile per ~100). Since the masks are cheap the loads they wait for
# show (Nsight Compute, results/ncu/ncu_source_vs2_h200_s28.md): overlap 2 loads each tile's mask inputs one
# tile ahead and the column pass's indices two (its skip words' addresses depend on them); prior_tma brings
# the band launch's rows to the epilogue through TMA into the ring slot after the last tile (results/
# vs_ahead_s28.md, 3 rounds): 128K 27.73 ms with both, 27.90 look-ahead only, 27.98 TMA only, 28.22 neither;
# 256K 56.23 / 56.42 / 56.82 / 57.24.
# Not kept: FlashAttention-4's conditional rescaling (the accumulator rescaled only on tiles where some row's max
# grew by more than 8): its warpgroup-wide vote is a shared-memory reduction with three bar.sync per tile, slower
# than the multiplies it skips (128K 28.27 vs 27.71 ms, block-sparse 29.31 vs 26.23; results/vs_lazy_s29.md,
# vs_lazy_rejected.patch); a warp's own vote and branch in inline PTX made ptxas serialize the wgmma (C7511).
# qreg (kept for "vs"): q as the register operand of q k^T (32 registers; a 64 x 64 tile's wgmma then reads
# only K from shared memory: 64 instead of 80 KB of shared-memory traffic per tile with the TMA writes).
# H200, 3 alternating rounds each (results/vs_qreg_s31.md, vs_qk2_s31.md, vs_coldrop_s31.md): 256K 56.10 vs
# 56.65, 55.13 vs 55.75, 54.40 vs 54.80 ms; 128K 27.40 vs 27.76, 27.71 vs 27.72, 27.80 vs 27.70 (within
# that size's ~1 ms spread between rounds). Not kept: the logits two tiles ahead (tile j + 1's q k^T in
# flight during tile j's softmax, K and V buffers released apart, the loop unrolled by two so that no
# pending accumulator is copied, which made ptxas serialise every wgmma: C7514): 128K 29.16 vs 27.72 ms,
# 256K 58.24 vs 55.75 (results/vs_qk2_rejected.patch).
# narrow 32: vertical-slash indices are built with their edges at most 32 keys wide in a list of their own
# (written by kernels.runs.relative_tiles, or index.split_narrow_edges; a quarter of the edges at 128K),
# visited as 64 x 32 tiles (results/vs_narrow_s31.md, 3 alternating rounds): 256K 55.50 vs 55.70 ms
# (faster in every round), 128K 26.81 vs 26.97 (two rounds of three). Halving a tile's cells saves only ~15%
# of its time: the 64 x 64 tiles' cost is mostly per tile, not per cell.
# qreg for block-sparse ("tiles"): a wash (results/bs_qreg_s31.md, whole calls, 3 rounds: 128K 26.54 vs
# 26.61 ms, 512K 125.27 vs 127.14 with the rounds overlapping), left off.
CONFIGS = {"tiles": {"stages": 2, "num_warps": 4, "maxnreg": 128, "overlap": True, "qreg": False},
           "ranges": {"stages": 3, "num_warps": 4, "maxnreg": 168, "overlap": True, "two": True},
           "vs": {"stages": 3, "num_warps": 4, "maxnreg": 128, "overlap": 2, "prior_tma": True, "qreg": True,
                  "narrow": 32}}


def index_kind(idx: _index.SparseIndex, head_dim: int, block_n: int) -> tuple[str | None, str | None]:
    """(kind, None) when the kernel serves this index with CONFIGS[kind], else (None, why not):
    a 64 x 64 tile list + exact ranges, or exact ranges alone on 128 x 128 tiles, with gathered
    columns when the ranges are known exact (``idx.ranges_exact``: vertical-slash's band index with
    its columns, ``index.band_index(..., vertical_idx=)``); head_dim 128. (Ranges with holes come
    only with a slash map and no ranges_exact, which is refused.)"""
    has_cols = idx.columns is not None and idx.columns.shape[-1] > 0
    if idx.tiles_relative or idx.edges is not None:  # vertical-slash's second launch
        if idx.edges is None or not idx.tiles_relative:
            return None, "relative tiles without edges, or edges without relative tiles"
        if (has_cols or idx.slash_map is not None) and idx.slash_bits is None:
            return None, "gathered columns or ranges with holes without slash_bits"
        if head_dim != 128:
            return None, f"head_dim {head_dim} (128 measured)"
        if idx.block_m != 64 or idx.block_n != 64 or block_n != 64:
            return None, f"relative tiles {idx.block_m} x {idx.block_n} (64 x 64 measured)"
        if idx.edges_narrow is not None and idx.narrow_n != 32:
            return None, f"narrow edges of {idx.narrow_n} keys (32 measured)"
        return "vs", None
    if has_cols and not (idx.ranges_exact and idx.slash_bits is not None):
        return None, "gathered columns with ranges not known exact or without slash_bits"
    if idx.slash_map is not None and not idx.ranges_exact:
        return None, "slash map (ranges with holes)"
    if has_cols and idx.tiles is not None and idx.tiles.shape[-1] > 0:
        return None, "gathered columns with a tile list"
    if head_dim != 128:
        return None, f"head_dim {head_dim} (128 measured)"
    if idx.tiles is not None and idx.tiles.shape[-1] > 0:
        if idx.block_m != 64 or idx.block_n != 64 or block_n != 64:
            return None, f"tiles {idx.block_m} x {idx.block_n} (64 x 64 measured)"
        return "tiles", None
    if idx.block_m != 128 or block_n != 128:
        return None, f"ranges on {idx.block_m} x {block_n} tiles (128 x 128 measured)"
    return "ranges", None


def route(q, k, v, idx: _index.SparseIndex, block_n: int) -> tuple[str | None, str | None]:
    """(kind, None) when ``run`` serves this call on this device with CONFIGS[kind] (block_n-wide key
    tiles), else (None, why not)."""
    why = _device_reason(q, k, v, idx.block_m)
    return (None, why) if why is not None else index_kind(idx, q.shape[-1], block_n)


def reason(q, k, v, idx: _index.SparseIndex, block_n: int) -> str | None:
    """None when ``run`` serves this call on this device (with block_n-wide key tiles), else why not."""
    return route(q, k, v, idx, block_n)[1]


def vs_narrow(q, k, v, block_m: int, block_n: int) -> int:
    """The narrow_n to build a vertical-slash index with (``index.from_vertical_slash(narrow_n=)``) for
    a second launch of block_m x block_n tiles that this kernel serves on these tensors
    (CONFIGS["vs"]["narrow"]), else 0 (the Triton kernel would merge the narrow edges back)."""
    if (block_m, block_n) != (64, 64) or q.shape[-1] != 128 or _device_reason(q, k, v, block_m) is not None:
        return 0
    return int(CONFIGS["vs"].get("narrow", 0))


def band_reason(q, k, v, block_m: int, block_n: int) -> str | None:
    """None when ``run`` serves vertical-slash's band launch with its columns
    (``index.band_index(..., vertical_idx=)``) on block_m x block_n tiles for these tensors, else why not."""
    if (block_m, block_n) != (128, 128):
        return f"band launch on {block_m} x {block_n} tiles (128 x 128 measured)"
    if q.shape[-1] != 128:
        return f"head_dim {q.shape[-1]} (128 measured)"
    return _device_reason(q, k, v, block_m)


def _device_reason(q, k, v, block_m: int) -> str | None:
    if q.device.type != "cuda":
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return "not an sm_90 GPU"
    if q.dtype != torch.bfloat16 or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype} / {k.dtype} / {v.dtype} (bf16: fp16 is unchecked on the GPU)"
    if q.shape[2] < block_m:
        return f"N = {q.shape[2]} shorter than one {block_m}-row block (a TMA box larger than the tensor, unchecked)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not _tma_ok(t):
            return f"{name} strides {t.stride()} (TMA needs a contiguous last dim and 16-byte aligned strides)"
    return None


def _tma_ok(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor can read t: contiguous last dim, 16-byte aligned base and strides."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])


def run(q, k, v, idx: _index.SparseIndex, scale: float, *, stages: int = 2, num_warps: int = 4,
        maxnreg: int = 128, overlap: bool | int = True, producer_regs: int = 24, block_n: int = 64,
        two: bool = False, consumer_regs: int = 240, prior_tma: bool = False, qreg: bool = False, narrow: int = 0,
        lse_out: torch.Tensor | None = None, out: torch.Tensor | None = None, check: bool = True,
        col_inputs: tuple | None = None, prior: tuple | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, N, D] over k / v [B, Hkv, N, D] restricted to idx's cells (a tile list
    + ranges, or ranges alone). Returns a tensor like q (``out`` when given).

    block_m = idx.block_m = 16 * num_warps, or twice that with ``two`` consumer warpgroups sharing
    each K / V tile (each in a partition of its own, with consumer_regs registers); block_n =
    idx.block_n, or ``block_n`` for an index of ranges only. lse_out: float32 [B, Hq, N] receives
    each row's log2-sum-exp2 (as ``attention.run_index``'s). check=False skips ``reason``
    (benchmarks trying other shapes). An index with gathered columns (vertical-slash's band launch)
    needs ``attention.column_inputs``' tensors: built here unless given as col_inputs. prior: another
    launch's rows over other keys, merged in (``attention.run_index``'s prior: (o, lse, written[, s])).
    overlap: the next tile's q k^T issued before this tile's softmax; 2: also each tile's mask inputs
    loaded a tile ahead (the column pass's indices two). prior_tma: the prior rows come to the epilogue
    through TMA into the ring slot after the last tile (64-row blocks of one warpgroup, a prior o like q
    that TMA can read; else they are loaded in the epilogue). qreg: q as the register operand of q k^T.
    narrow: the narrow_n vertical-slash indices are built with (``attention.vertical_slash_attention``;
    the kernel follows the index: its ``edges_narrow`` run as narrow_n-key tiles)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from ._loader import kernel_module

    why = reason(q, k, v, idx, idx.block_n if idx.tiles is not None else block_n) if check else None
    if why is not None:
        raise ValueError(f"the Gluon kernel does not serve this call: {why}")
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    bm = idx.block_m
    has_tiles = idx.tiles is not None and idx.tiles.shape[-1] > 0
    bn = idx.block_n if has_tiles else block_n
    if bm != 16 * num_warps * (2 if two else 1):
        raise ValueError(f"block_m {bm} needs {bm // 16} consumer warps, got num_warps={num_warps} (two={two})")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(f"out: expected a tensor like q ({tuple(q.shape)}, {q.dtype}, last dim contiguous), "
                         f"got {tuple(out.shape)}, {out.dtype}")
    from .attention import check_merge

    check_merge(q, lse_out, prior, math.ceil(n / bm))
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16

    def desc(t, rows):  # 4-D [B, H, N, D] with the tensor's own strides; rows past N read zeros
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, d],
                                gl.NVMMASharedLayout.get_default_for([1, 1, rows, d], gdt))

    out = torch.empty_like(q) if out is None else out
    nqb = math.ceil(n / bm)
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    tiles = idx.tiles if has_tiles else dummy
    tc = idx.tile_count if has_tiles else dummy

    def st(t, i):
        return t.stride(i) if t.dim() > i and t.shape[i] > 1 else 0

    ranges, rc = idx.ranges, idx.range_count
    has_cols = idx.columns is not None and idx.columns.shape[-1] > 0
    has_edges = idx.edges is not None
    mod = kernel_module("_gluon_attn.py", False)
    if has_cols:  # K / V rows of each query head's columns in column order, and the skip words
        cols, cc = idx.columns, idx.column_count
        if bm != (128 if two else 64):
            raise ValueError(f"gathered columns need 64-row consumers (block_m 128 with two, else 64), got "
                             f"block_m {bm}, two={two}")
        from .attention import column_inputs

        kc, vc, cw = column_inputs(q, k, v, idx) if col_inputs is None else col_inputs
        col_args = (desc(kc, bn), desc(vc, bn), cols, cc, cw, st(cols, 0), st(cols, 1), st(cc, 0), st(cc, 1),
                    cw.stride(0), cw.stride(1))
    else:
        kd = desc(k, bn)
        col_args = (kd, kd, dummy, dummy, dummy, 0, 0, 0, 0, 0, 0)
    if has_edges:  # vertical-slash's second launch: edges, and the slash bits of ranges with holes
        edges, ec, sb = idx.edges, idx.edge_count, idx.slash_bits if idx.slash_bits is not None else dummy
        edge_args = (edges, ec, st(edges, 0), st(edges, 1), st(ec, 0), st(ec, 1), sb,
                     st(sb, 0) if idx.slash_bits is not None else 0, st(sb, 1) if idx.slash_bits is not None else 0)
    else:
        edge_args = (dummy, dummy, 0, 0, 0, 0, dummy, 0, 0)
    nar = idx.narrow_n if has_edges and idx.edges_narrow is not None else 0
    if nar:  # edges at most nar keys wide, as nar-key tiles
        en, ecn = idx.edges_narrow, idx.edge_count_narrow
        nar_args = (en, ecn, st(en, 0), st(en, 1), st(ecn, 0), st(ecn, 1))
    else:
        nar_args = (dummy, dummy, 0, 0, 0, 0)
    pmode = 0
    if prior is not None:
        po, plse, pc = prior[:3]
        # prior_tma: the producer TMA-loads the earlier launch's rows into the ring slot after the last
        # tile (a K buffer: 64-row blocks of one warpgroup only, rows TMA can read)
        pmode = 2 if (prior_tma and bm == bn and not two and po.dtype == q.dtype and po.shape == q.shape
                      and _tma_ok(po)) else 1
        prior_args = (po, plse, pc, po.stride(0), po.stride(1), po.stride(2), st(pc, 0), st(pc, 1),
                      pc.stride(2) if pc.dim() == 3 else 0, prior[3] if len(prior) > 3 else 0)
    else:
        prior_args = (dummy, dummy, dummy, 0, 0, 0, 0, 0, 0, 0)
    kd = desc(k, bn)
    pod = desc(po, bn) if pmode == 2 else kd  # the prior rows' descriptor (a K buffer's box)
    vd = desc(v, bn)
    knd, vnd = (desc(k, nar), desc(v, nar)) if nar else (kd, vd)
    mod.gluon_fwd_kernel[(b * hq * nqb,)](
        desc(q, bm), kd, vd, pod, knd, vnd, out, lse_out if lse_out is not None else dummy, tiles, tc, ranges, rc,
        *col_args, *edge_args, *prior_args, *nar_args,
        st(tiles, 0) if has_tiles else 0, st(tiles, 1) if has_tiles else 0, st(tiles, 2) if has_tiles else 0,
        st(tc, 0) if has_tiles else 0, st(tc, 1) if has_tiles else 0,
        st(ranges, 0), st(ranges, 1), st(ranges, 2), ranges.stride(3),
        st(rc, 0), st(rc, 1), rc.stride(2),
        out.stride(0), out.stride(1), out.stride(2), hq * n, n,
        n, hq, hq // hkv, nqb, float(scale) * 1.4426950408889634, idx.tile_scale if has_tiles else 1,
        BLOCK_M=bm, BLOCK_N=bn, HEAD_D=d, STAGES=stages, HAS_TILES=has_tiles, PRODUCER_REGS=producer_regs,
        OVERLAP=overlap, TWO=two, CONSUMER_REGS=consumer_regs,
        LSE_OUT=lse_out is not None, HAS_COLS=has_cols, TILES_REL=bool(idx.tiles_relative), HAS_EDGES=has_edges,
        PRIOR=pmode, PAD=_index.BITS_PAD, QREG=bool(qreg), NARROW=nar, num_warps=num_warps, maxnreg=maxnreg)
    return out
