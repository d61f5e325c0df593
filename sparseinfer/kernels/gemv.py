"""Sparse decode GEMVs for contextual sparsity (TEAL, Deja Vu), batch 1-4 rows.

Torch custom ops (so `torch.compile(mode="reduce-overhead", fullgraph=True)` can capture them;
fake implementations give the shapes):
    sparseinfer::teal_gemv(x [M, K], wt [K, N], threshold 0-d fp32) -> [M, N] (x's dtype)
        = (x * (|x| > threshold)) @ wt; wt row-major ([in, out]: a dropped input channel
        skips one contiguous row). No index tensor, no host sync.
    sparseinfer::teal_mlp(x [M, H], wg_t [H, I], wu_t [H, I], wd_t [I, H], t_in, t_down) -> [M, H]
        = the SwiGLU MLP with TEAL on the inputs of gate/up (t_in) and down (t_down), in two
        launches (gate and up share one x and one launch; split-K sums by the last split
        program of each output block through per-device counters that reset themselves).
    One-row CUDA calls of both (default config, compact or not) take the gathered-rows loop
    (`teal_rows_launch` / `teal_rows_mlp_launch`, TEAL_ROWS): kept channels listed per program,
    only their rows read; split sums by fp32 atomics (not bitwise reproducible run to run); the
    MLP's hidden state stays fp32 between its launches. SPARSEINFER_TEAL_ROWS=0: the masked loop.
    sparseinfer::dejavu_gateup(x [M, H], wg [I, H], wu [I, H], mask [M, I] bool) -> [M, I]
        = SiLU(x @ wg.T) * (x @ wu.T) on the kept neurons, 0 elsewhere.
    sparseinfer::dejavu_mlp_rows(x [1, H], wg [I, H], wu [I, H], wd_t [I, H], idx [Kn]) -> [1, H]
        = the SwiGLU MLP of one row over the listed neurons only (two launches).
CUDA tensors run the compiled Triton kernels (`_gemv_kernel.py`); CPU tensors run the same
kernels under the Triton interpreter (tests). fp32 accumulation.

Model-level helpers: `teal_linear(x [.., K], weight [N, K] (stored column-major), threshold, bias)`
and `dejavu_mlp(x [.., H], w_gate, w_up, w_down (column-major), idx [.., Kn])`.
References (any dtype, float64 included): `teal_gemv_reference`, `teal_mlp_reference`, `dejavu_gateup_reference`.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from . import pdl
from ._loader import kernel_module
from .decode import _sm_count


# teal_gemv: (BLOCK_K, BLOCK_N, ROWS per program, num_warps, num_stages[, prefetch]); prefetch 1:
# one-row calls load each step's weight rows one step ahead (register double buffering). TEAL_MLP_CONFIG
# is the gate+up launch of teal_mlp (two weights: two accumulators). GPU defaults from the sweeps in
# benchmarks/teal_sweep.py, contextual.py and teal_prefetch.py (H100, 8B shapes, 50%: MLP 77.7 vs
# 79.4 us for the best plain configs, o_proj 9.1 vs 10.3 us; captured step 1.524x vs 1.512x;
# benchmarks/results/contextual/teal_prefetch.md), overridable per call.
# "cuda batch": calls of 2-4 rows keep the plain loop's configs (H100, 8B MLP at 50%: 215 / 362 us at
# 2 / 4 rows vs 307 / 678 us with the one-row configs; cuBLAS 135 us, so the patching sends batches there).
TEAL_CONFIG = {"cuda": (64, 64, 2048, 8, 1, 1), "cuda batch": (64, 128, 1024, 4, 1), "cpu": (16, 32, 32, 1, 1)}
TEAL_MLP_CONFIG = {"cuda": (32, 64, 1024, 4, 1, 1), "cuda batch": (32, 128, 1024, 4, 1), "cpu": (16, 32, 32, 1, 1)}
# teal_mlp's down launch (K = the intermediate size): 1792-row programs (8 K splits over Llama-3's 14336;
# benchmarks/results/contextual/teal_waves.md: 29.0 vs 30.3 us with 2048); the captured 32-layer 8B step
# (H100, TEAL all projections 50%) 4.460 -> 4.412-4.423 ms (contextual_step32_profile.md, _down1792_r*.md)
TEAL_DOWN_CONFIG = dict(TEAL_CONFIG, cuda=(64, 64, 1792, 8, 1, 1))


def _config_key(x: torch.Tensor) -> str:
    """The default-config key of a call on x [M, K]: "cpu", "cuda" (one row) or "cuda batch"."""
    return "cpu" if not x.is_cuda else ("cuda" if x.shape[0] == 1 else "cuda batch")
# (BLOCK_I, BLOCK_H, num_warps) for dejavu_gateup (benchmarks/contextual.py sweeps them).
GATEUP_CONFIG = {"cuda": (16, 128, 4), "cpu": (16, 32, 1)}


def _block_m(m: int) -> int:
    return 1 if m <= 1 else 2 if m <= 2 else 4


def _check_2d(name: str, t: torch.Tensor, dim: int = 2) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")


def _check_teal_weight(name: str, wt: torch.Tensor, k: int, dev) -> None:
    _check_2d(name, wt)
    if wt.shape[0] != k:
        raise ValueError(f"{name}: expected [K, N] with K = {k} input channels, got shape {tuple(wt.shape)}")
    if wt.stride(1) != 1:
        raise ValueError(f"{name}: expected [K, N] with contiguous rows (stride (N, 1)), got strides {wt.stride()}")
    if wt.device != dev:
        raise ValueError(f"{name}: on {wt.device}, x on {dev}")


def _check_threshold(name: str, t: torch.Tensor) -> None:
    if t.numel() != 1:
        raise ValueError(f"{name}: expected a one-element threshold tensor, got shape {tuple(t.shape)}")


# The split sums run inside the partials launch (the last split program of each output block
# adds them up; `_finish_block` in _gemv_kernel.py) instead of a second launch. False: the
# two-launch path (kept for comparison in benchmarks/contextual.py).
FUSED_FINISH = True
# One-row calls (decode, batch 1): compact each split's kept input channels into a list first,
# then loop over full tiles of kept weight rows (COMPACT in _gemv_kernel.py). H100, 8B MLP:
# 1.62x vs 1.68x at 50% sparsity, equal at 60%, 2.10x vs 2.01x at 65%, 2.65x vs 2.22x at 75%,
# 3.00x vs 2.31x at 80% (benchmarks/results/contextual/teal_compact_sweep.md), so the patching
# asks for it (`compact=True`) on layers configured at >= COMPACT_MIN_SPARSITY. The gathered-rows
# loop (TEAL_ROWS, below) beats both at every sparsity (H100, 8B MLP: 2.26x vs 2.01x at 60%, 3.30x
# vs 2.75x at 75%, 4.03x vs 3.18x at 80%, 8.79x vs 5.25x at 90%; contextual/teal_rows_sparsity.md),
# so one-row GPU calls with TEAL_ROWS on take it whether or not they ask for compact.
COMPACT_MIN_SPARSITY = 0.6
# (gate/up launch, down launch) configs of the compacted path: H100 sweep at 50/75/80% sparsity
# (`benchmarks/contextual.py --compact-sweep`, benchmarks/results/contextual/teal_compact_sweep2.json);
# with them the MLP at 75% is 2.75x over cuBLAS (teal_compact_defaults.md)
TEAL_COMPACT_MLP_CONFIG = {"cuda": ((64, 128, 2048, 4, 2), (32, 128, 2048, 4, 4)),
                           "cpu": (TEAL_MLP_CONFIG["cpu"], TEAL_CONFIG["cpu"])}
_COUNTERS: dict = {}  # device -> int32 counters, zero between launches (each launch resets its own)


def _counters(device, size: int) -> torch.Tensor:
    """Per-device zeroed int32 counters for the fused finish. Allocated on the first call on a
    device; a call under CUDA-graph capture needs them allocated before (any eager call does it,
    e.g. the warm-up runs of torch.compile or `prepare_counters`). Launches sharing a device's
    counters must not run concurrently (one stream, as a decode step is)."""
    return _zeroed(_COUNTERS, (device.type, device.index), device, size, 1 << 16, torch.int32, "counters")


def _zeroed(store: dict, key, device, size: int, minimum: int, dtype, what: str) -> torch.Tensor:
    """store[key]: a zeroed buffer of >= size elements on device (at least `minimum`), allocated
    when missing or too small; never under CUDA-graph capture (a clear error instead)."""
    buf = store.get(key)
    if buf is None or buf.numel() < size:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"teal kernels: {what} must be allocated before CUDA-graph capture; run the op once "
                               "eagerly first (or sparseinfer.kernels.gemv.prepare_counters(device))")
        buf = torch.zeros(max(size, minimum), dtype=dtype, device=device)
        store[key] = buf
    return buf


def prepare_counters(device) -> None:
    """Allocate the fused finish's counters and the gathered-rows loop's fp32 sums on `device`
    (before a CUDA-graph capture)."""
    _counters(torch.device(device), 1 << 16)
    _acc(torch.device(device), 1 << 17)
    _acc(torch.device(device), 1 << 17, 1)


# The gathered-rows loop (`teal_rows_kernel`): each program lists its kept input channels, then
# reads U kept weight rows' W output columns per step (long contiguous pieces), STAGES deep; splits
# add up through fp32 atomics. TEAL_ROWS: one-row CUDA calls with the default config (compact
# or not) take it (env SPARSEINFER_TEAL_ROWS=0: the masked loop). H100, Llama-3.1-8B shapes at 50%
# (benchmarks/results/contextual/teal_rows*.md): gate+up 46.5 vs 48.4 us, down 27.2 vs 29.1, q/k/v
# 10.6 vs 11.2, o 9.4 vs 10.3; captured compiled 32-layer step, TEAL all projections 50%
# 4.25 -> 3.97-4.00 ms (1.487x -> 1.58-1.59x against the fastest dense step) with FENCE on,
# 3.92 ms (1.612x) without it; replicated: 3.905-3.911 ms (1.613-1.617x, teal_rows_replicate_s21.md).
# Configs (ROWS, U, W, num_warps, num_stages); keys "cuda KxN" / "cuda glu KxN" (a weight's shape)
# come first; env SPARSEINFER_TEAL_ROWS_CONFIG (JSON {key: config}) adds or replaces entries.
TEAL_ROWS = os.environ.get("SPARSEINFER_TEAL_ROWS", "1") == "1"
TEAL_ROWS_CONFIG = {"cuda": (128, 1, 2048, 4, 6), "cuda glu": (256, 2, 1024, 4, 4), "cpu": (16, 2, 32, 1, 2),
                    # the H100 sweep's best for Llama-3-8B shapes (teal_rows.md)
                    "cuda glu 4096x14336": (256, 2, 1024, 4, 4), "cuda 14336x4096": (256, 2, 2048, 4, 6),
                    "cuda 4096x6144": (32, 1, 2048, 4, 4), "cuda 4096x4096": (64, 2, 1024, 4, 4)}
TEAL_ROWS_CONFIG.update({k: tuple(v) for k, v in json.loads(os.environ.get("SPARSEINFER_TEAL_ROWS_CONFIG", "{}")).items()})
# FENCE: a GPU-scope fence per thread after its split sums. Off: the barrier, then one thread's
# acq_rel counter increment, is the split-K handshake CUTLASS's GenericBarrier uses (arrive_inc:
# __syncthreads, then thread 0's red.release.gpu); each fence waits for its thread's atomics (H100,
# captured 8B step, TEAL all 50%: 3.998 ms with it, 3.921 without, same machine; teal_rows_fence.md).
FENCE = os.environ.get("SPARSEINFER_TEAL_ROWS_FENCE", "0") == "1"
_ACC: dict = {}  # device -> fp32 sums of the gathered-rows loop, zero between launches


def _acc(device, size: int, slot: int = 0) -> torch.Tensor:
    """Per-device zeroed fp32 sums for `teal_rows_kernel` (each launch leaves its columns zero);
    slot 1: the MLP's gate / up sums (between its two launches). Allocated like `_counters`
    (before any CUDA-graph capture)."""
    return _zeroed(_ACC, (device.type, device.index, slot), device, size, 1 << 17, torch.float32, "sums")


def teal_rows_launch(x: torch.Tensor, wt: torch.Tensor, wt2: torch.Tensor | None, threshold: torch.Tensor,
                     config=None) -> torch.Tensor:
    """One `teal_rows_kernel` launch: x [1, K] -> [1, N] in x's dtype = (x * (|x| > threshold)) @ wt,
    or with wt2 (gate, up) SiLU(x' @ wt) * (x' @ wt2). config = (ROWS, U, W, num_warps, num_stages)
    (None: TEAL_ROWS_CONFIG). Not bitwise reproducible (atomic split sums)."""
    _check_2d("teal_rows: x", x)
    m, k = x.shape
    if m != 1:
        raise ValueError(f"teal_rows: one row only, got x of shape {tuple(x.shape)}")
    _check_teal_weight("teal_rows: wt", wt, k, x.device)
    if wt2 is not None and (wt2.shape != wt.shape or wt2.stride() != wt.stride()):
        raise ValueError(f"teal_rows: wt2 {tuple(wt2.shape)} strides {wt2.stride()} differs from wt "
                         f"{tuple(wt.shape)} strides {wt.stride()}")
    _check_threshold("teal_rows", threshold)
    n = wt.shape[1]
    if config is not None and len(config) != 5:
        raise ValueError(f"teal_rows config: expected (ROWS, U, W, num_warps, num_stages), got {tuple(config)}")
    key = "cpu" if not x.is_cuda else ("cuda glu" if wt2 is not None else "cuda")
    rows, u, width, warps, stages = config or TEAL_ROWS_CONFIG.get(f"{key} {k}x{n}", TEAL_ROWS_CONFIG[key])
    x = x if x.stride(1) == 1 else x.contiguous()
    splits, nb = triton_cdiv(k, rows), triton_cdiv(n, width)
    two = wt2 is not None
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    sidx = torch.empty(splits * nb * rows, dtype=torch.int32, device=x.device)
    sx = torch.empty(splits * nb * rows, dtype=torch.float32, device=x.device)
    kernel_module("_gemv_kernel.py", not x.is_cuda).teal_rows_kernel[(splits, nb)](
        x, threshold.to(device=x.device, dtype=torch.float32).reshape(-1)[:1], wt, wt if wt2 is None else wt2,
        _acc(x.device, (2 if two else 1) * n), out, _counters(x.device, nb), sidx, sx, k, n, splits, wt.stride(0),
        ROWS=rows, U=u, W=width, STAGES=stages, TWO=two, FENCE=x.is_cuda and FENCE, num_warps=warps, **pdl.kwargs(x))
    return out


def default_rows(k: int, n: int, bk: int, bn: int, rows: int, sms: int) -> int:
    """ROWS per program of a default-config launch over a [k, n] weight: halved (while it stays a
    multiple of bk) until the launch has >= 2 programs per SM (small projections get more K splits)."""
    while rows > bk and (rows // 2) % bk == 0 and triton_cdiv(k, rows) * triton_cdiv(n, bn) < 2 * sms:
        rows //= 2
    return rows


def _sized(config: tuple, k: int, n: int, x: torch.Tensor) -> tuple:
    """A default config with its ROWS fitted to a [k, n] weight (`default_rows`) on CUDA."""
    if not x.is_cuda:
        return config
    bk, bn, rows, *rest = config
    return (bk, bn, default_rows(k, n, bk, bn, rows, _sm_count(x.device.index or 0)), *rest)


def _teal_partials(x, wt, wt2, threshold, config, out=None, glu: bool = False, compact: bool = False,
                   rows_list=None) -> torch.Tensor:
    """One teal_gemv_kernel launch: x [M, K] -> fp32 partials [splits, 1 or 2 (with wt2), M, N].
    out [M, N]: the fused finish writes the split sums there (SiLU(gate) * up when glu).
    rows_list = (idx int32/int64 [Kn], values fp32 [Kn]): one row whose kept inputs are given (x
    and threshold unused): sum_j values[j] * wt[idx[j]]."""
    m, k = x.shape
    if rows_list is not None:
        m, k, compact = 1, rows_list[0].numel(), True
    n = wt.shape[1]
    if config is not None and len(config) not in (5, 6):
        raise ValueError("teal_gemv config: expected (BLOCK_K, BLOCK_N, ROWS, num_warps, num_stages[, prefetch]), "
                         f"got {tuple(config)}")
    bk, bn, rows, warps, stages, *more = config or TEAL_CONFIG[_config_key(x)]
    prefetch = bool(more and more[0])
    if rows % bk:
        raise ValueError(f"teal_gemv config: ROWS {rows} must be a multiple of BLOCK_K {bk}")
    if config is None:  # small projections (k/v_proj): more K splits (SM count cached: no query per call)
        bk, bn, rows, warps, stages, *more = _sized((bk, bn, rows, warps, stages, *more), k, n, x)
    bm = _block_m(m)
    bk = max(8, bk // bm)  # the [BLOCK_M, BLOCK_K, BLOCK_N] accumulator stays the same size
    splits = triton_cdiv(k, rows)
    p = torch.empty(splits, 1 if wt2 is None else 2, m, n, dtype=torch.float32, device=x.device)
    grid = (splits, triton_cdiv(n, bn), triton_cdiv(m, bm))
    fused = out is not None
    cnt = _counters(x.device, grid[1] * grid[2]) if fused else p
    compact = compact and m == 1
    if rows_list is not None:
        sidx, sx = rows_list
    else:
        sidx = torch.empty(splits * rows, dtype=torch.int32, device=x.device) if compact else p
        sx = torch.empty(splits * rows, dtype=torch.float32, device=x.device) if compact else p
    kernel_module("_gemv_kernel.py", not x.is_cuda).teal_gemv_kernel[grid](
        x, wt, wt if wt2 is None else wt2, threshold.to(device=x.device, dtype=torch.float32).reshape(-1)[:1], p,
        m, k, n, x.stride(0), wt.stride(0), p.stride(0), p.stride(1) if wt2 is not None else 0,
        ROWS=rows, BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, STAGES=stages, TWO=wt2 is not None, num_warps=warps,
        OUT=out if fused else p, CNT=cnt, SPLITS=splits, stride_om=out.stride(0) if fused else 0,
        FUSED=fused, GLU=glu, SIDX=sidx, SX=sx, COMPACT=compact, LIST=rows_list is not None,
        PREFETCH=prefetch and bm == 1 and not compact, **pdl.kwargs(x))
    return p


def _teal(x, wt, wt2, threshold, config, glu: bool, compact: bool = False) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype: the split-K launch, its splits summed in the same launch
    (FUSED_FINISH) or by `_teal_finish`; compact: the compacted-rows loop (one-row calls)."""
    if FUSED_FINISH:
        out = torch.empty(x.shape[0], wt.shape[1], dtype=x.dtype, device=x.device)
        _teal_partials(x, wt, wt2, threshold, config, out=out, glu=glu, compact=compact)
        return out
    return _teal_finish(_teal_partials(x, wt, wt2, threshold, config, compact=compact), x.dtype, glu)


def _teal_finish(p: torch.Tensor, dtype: torch.dtype, glu: bool) -> torch.Tensor:
    """Sum the splits of p [splits, W, M, N] -> [M, N] in dtype (W = 2 and glu: SiLU(gate) * up)."""
    _, _, m, n = p.shape
    out = torch.empty(m, n, dtype=dtype, device=p.device)
    block = 1024 if p.is_cuda else 64
    kernel_module("_gemv_kernel.py", not p.is_cuda).teal_finish_kernel[(triton_cdiv(m * n, block),)](
        p, out, m * n, p.shape[0], p.stride(0), p.stride(1), BLOCK=block, GLU=glu, num_warps=4, **pdl.kwargs(p))
    return out


def _check_mlp(name: str, x, wg_t, wu_t, wd_t, t_in, t_down) -> tuple[int, int]:
    """The TEAL MLP's inputs checked (x [M, H], wg_t / wu_t [H, I] alike, wd_t [I, H], one-element
    thresholds) -> (H, I)."""
    _check_2d(f"{name}: x", x)
    hid = x.shape[1]
    _check_teal_weight(f"{name}: wg_t", wg_t, hid, x.device)
    if wu_t.shape != wg_t.shape or wu_t.stride() != wg_t.stride():
        raise ValueError(f"{name}: wu_t {tuple(wu_t.shape)} strides {wu_t.stride()} differs from wg_t "
                         f"{tuple(wg_t.shape)} strides {wg_t.stride()}")
    inter = wg_t.shape[1]
    _check_teal_weight(f"{name}: wd_t", wd_t, inter, x.device)
    if wd_t.shape[1] != hid:
        raise ValueError(f"{name}: wd_t [I, H] must map back to H = {hid}, got shape {tuple(wd_t.shape)}")
    _check_threshold(f"{name}: t_in", t_in)
    _check_threshold(f"{name}: t_down", t_down)
    return hid, inter


def teal_rows_mlp_launch(x: torch.Tensor, wg_t: torch.Tensor, wu_t: torch.Tensor, wd_t: torch.Tensor,
                         t_in: torch.Tensor, t_down: torch.Tensor, config=None) -> torch.Tensor:
    """The TEAL SwiGLU MLP of one row through `teal_rows_kernel`: x [1, H], wg_t / wu_t [H, I], wd_t [I, H]
    -> [1, H] = down(h * (|h| > t_down)), h = SiLU(gate(x')) * up(x') kept in fp32 (the gate / up
    sums are never rounded to x's dtype: the down launch reads them), x' = x * (|x| > t_in). Two
    launches; config = (gate/up config, down config) (None: TEAL_ROWS_CONFIG)."""
    hid, inter = _check_mlp("teal_rows_mlp", x, wg_t, wu_t, wd_t, t_in, t_down)
    if x.shape[0] != 1:
        raise ValueError(f"teal_rows_mlp: one row only, got x of shape {tuple(x.shape)}")
    if config is not None and (len(config) != 2 or any(len(c) != 5 for c in config)):
        raise ValueError(f"teal_rows_mlp config: expected two (ROWS, U, W, num_warps, num_stages), got {config}")
    x = x if x.stride(1) == 1 else x.contiguous()
    dev = x.device
    key = "cpu" if not x.is_cuda else "cuda"
    cfg_gu = config[0] if config else TEAL_ROWS_CONFIG.get(f"{key} glu {hid}x{inter}",
                                                           TEAL_ROWS_CONFIG["cpu" if key == "cpu" else "cuda glu"])
    cfg_d = config[1] if config else TEAL_ROWS_CONFIG.get(f"{key} {inter}x{hid}", TEAL_ROWS_CONFIG[key])
    mod = kernel_module("_gemv_kernel.py", not x.is_cuda)
    sums = _acc(dev, 2 * inter, 1)  # gate [I], up [I]: zero before, zeroed by the down launch
    out = torch.empty(1, hid, dtype=x.dtype, device=dev)
    for i, (xi, wt, wt2, t, cfg) in enumerate(((x, wg_t, wu_t, t_in, cfg_gu), (sums, wd_t, None, t_down, cfg_d))):
        rows, u, width, warps, stages = cfg
        k, n = wt.shape
        splits, nb = triton_cdiv(k, rows), triton_cdiv(n, width)
        cnt = _counters(dev, 32768 + splits)
        sidx = torch.empty(splits * nb * rows, dtype=torch.int32, device=dev)
        sx = torch.empty(splits * nb * rows, dtype=torch.float32, device=dev)
        mod.teal_rows_kernel[(splits, nb)](
            xi, t.to(device=dev, dtype=torch.float32).reshape(-1)[:1], wt, wt if wt2 is None else wt2,
            sums if i == 0 else _acc(dev, n), out, cnt, sidx, sx, k, n, splits, wt.stride(0),
            ROWS=rows, U=u, W=width, STAGES=stages, TWO=i == 0, FENCE=x.is_cuda and FENCE, FINISH=i == 1,
            XACC=i == 1, SCNT=cnt[32768:], num_warps=warps, **pdl.kwargs(x))
    return out


def teal_gemv_launch(x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor, config=None,
                     compact: bool = False) -> torch.Tensor:
    """The kernel call behind the op (no custom-op wrapper): one launch (split-K partials, summed
    by the last split program of each output block); config = (BLOCK_K, BLOCK_N, ROWS per
    program, num_warps, num_stages[, prefetch]); None: the defaults for the row count (`_config_key`)."""
    _check_2d("teal_gemv: x", x)
    _check_teal_weight("teal_gemv: wt", wt, x.shape[1], x.device)
    _check_threshold("teal_gemv", threshold)
    x = x if x.stride(1) == 1 else x.contiguous()
    if TEAL_ROWS and config is None and x.is_cuda and x.shape[0] == 1:  # compact or not: faster at any sparsity
        return teal_rows_launch(x, wt, None, threshold)
    return _teal(x, wt, None, threshold, config, False, compact)


def teal_mlp_launch(x: torch.Tensor, wg_t: torch.Tensor, wu_t: torch.Tensor, wd_t: torch.Tensor,
                    t_in: torch.Tensor, t_down: torch.Tensor, config=None, compact: bool = False) -> torch.Tensor:
    """SwiGLU MLP with TEAL on both inputs: x [M, H], wg_t / wu_t [H, I], wd_t [I, H] (all
    [in, out] row-major) -> [M, H] = down(h * (|h| > t_down)), h = SiLU(gate(x')) * up(x'),
    x' = x * (|x| > t_in); h in x's dtype (one-row GPU calls with the default config go to
    `teal_rows_mlp_launch`, whose h stays fp32). Two launches: gate and up (one shared x; h = the
    sums of their splits, by the last split program of each block), down. config = (gate/up
    config, down config); compact: the kept-rows-compacted masked loop for one-row calls (with
    its own default configs) where the gathered-rows loop does not run (CPU, TEAL_ROWS off or a
    config given)."""
    hid, inter = _check_mlp("teal_mlp", x, wg_t, wu_t, wd_t, t_in, t_down)
    x = x if x.stride(1) == 1 else x.contiguous()
    compact = compact and x.shape[0] == 1
    key = _config_key(x)
    if TEAL_ROWS and config is None and x.is_cuda and x.shape[0] == 1:  # compact or not: faster at any sparsity
        return teal_rows_mlp_launch(x, wg_t, wu_t, wd_t, t_in, t_down)
    if config is None:  # the masked loop's defaults with ROWS fitted like a single projection's (small models)
        config = TEAL_COMPACT_MLP_CONFIG[key] if compact else (_sized(TEAL_MLP_CONFIG[key], hid, inter, x),
                                                               _sized(TEAL_DOWN_CONFIG[key], inter, hid, x))
    cfg_gu, cfg_d = config
    h = _teal(x, wg_t, wu_t, t_in, cfg_gu, True, compact)
    return _teal(h, wd_t, None, t_down, cfg_d, False, compact)


def dejavu_gateup_launch(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, mask: torch.Tensor,
                         config=None) -> torch.Tensor:
    """The kernel call behind the op: config = (BLOCK_I, BLOCK_H, num_warps)."""
    for name, t in (("x", x), ("wg", wg), ("wu", wu), ("mask", mask)):
        _check_2d(f"dejavu_gateup: {name}", t)
    if wg.shape != wu.shape or wg.shape[1] != x.shape[1] or mask.shape != (x.shape[0], wg.shape[0]):
        raise ValueError(f"dejavu_gateup: expected x [M, H], wg/wu [I, H], mask [M, I]; got x {tuple(x.shape)}, "
                         f"wg {tuple(wg.shape)}, wu {tuple(wu.shape)}, mask {tuple(mask.shape)}")
    if wg.stride(1) != 1 or wu.stride() != wg.stride():
        raise ValueError(f"dejavu_gateup: expected row-major wg/wu with equal strides, got {wg.stride()}, {wu.stride()}")
    x = x if x.stride(1) == 1 else x.contiguous()
    mask = mask.to(torch.int8).contiguous()
    m, hid = x.shape
    i = wg.shape[0]
    bi, bh, warps = config or GATEUP_CONFIG["cuda" if x.is_cuda else "cpu"]
    bm = _block_m(m)
    out = torch.empty(m, i, dtype=x.dtype, device=x.device)
    grid = (triton_cdiv(i, bi), triton_cdiv(m, bm))
    kernel_module("_gemv_kernel.py", not x.is_cuda).dejavu_gateup_kernel[grid](
        x, wg, wu, mask, out, m, i, hid, x.stride(0), wg.stride(0), mask.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_I=bi, BLOCK_H=bh, num_warps=warps)
    return out


# dejavu_mlp_rows: (BLOCK_I, BLOCK_H, num_warps, num_stages) of the gathered gate/up rows, and
# the down launch's teal config (BLOCK_K, BLOCK_N, list entries per program, warps, stages)
# (H100 sweep at 50%, benchmarks/contextual.py: every config within 73.6-81 us for the MLP);
# "cuda_small" for lists of at most 3/8 of the neurons (sweep at 25% kept, 2026-11-26: 0.0430 ->
# 0.0390 ms for the 8B MLP, 3.09x -> 3.41x over cuBLAS; results/contextual/contextual_dejavu25.md)
DEJAVU_ROWS_CONFIG = {"cuda": ((16, 256, 4, 2), (32, 128, 1024, 4, 4)),
                      "cuda_small": ((16, 256, 4, 3), (128, 64, 1024, 4, 3)),
                      "cpu": ((8, 16, 1, 1), (16, 32, 32, 1, 1))}


def dejavu_mlp_rows_launch(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd_t: torch.Tensor,
                           idx: torch.Tensor, config=None, pdl: bool | None = None) -> torch.Tensor:
    """Deja Vu SwiGLU MLP of one row over the listed neurons: x [1, H], wg / wu [I, H]
    row-major, wd_t [I, H] row-major (down_proj.weight.t()), idx [Kn] (any order, no repeats)
    -> [1, H] = sum_j SiLU(x . wg[idx_j]) * (x . wu[idx_j]) * wd_t[idx_j]. Two launches: the
    gathered gate/up rows -> fp32 h of the listed neurons; the down rows of the same list
    (split over the list, summed by the last split program). config = (gate/up, down); pdl: the
    gate/up launch starts while the kernel before it (the selection) ends (programmatic dependent
    launch, Hopper+; None: `kernels.pdl.DEJAVU_ROWS`)."""
    _check_2d("dejavu_mlp_rows: x", x)
    if x.shape[0] != 1:
        raise ValueError(f"dejavu_mlp_rows: expected one row x [1, H], got shape {tuple(x.shape)}")
    hid = x.shape[1]
    for name, w in (("wg", wg), ("wu", wu), ("wd_t", wd_t)):
        _check_2d(f"dejavu_mlp_rows: {name}", w)
        if w.shape[1] != hid or w.stride(1) != 1 or w.device != x.device:
            raise ValueError(f"dejavu_mlp_rows: expected {name} [I, {hid}] row-major on {x.device}, got shape "
                             f"{tuple(w.shape)} strides {w.stride()} on {w.device}")
    if wu.shape != wg.shape or wd_t.shape != wg.shape or wu.stride() != wg.stride():
        raise ValueError(f"dejavu_mlp_rows: wg {tuple(wg.shape)}, wu {tuple(wu.shape)}, wd_t {tuple(wd_t.shape)} differ")
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"dejavu_mlp_rows: expected idx [Kn] int32/int64, got {idx.dtype} {tuple(idx.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    idx = idx.contiguous()  # int32 or int64 as given (no conversion launch per call)
    kn = idx.numel()
    key = ("cuda_small" if kn * 8 <= 3 * wg.shape[0] else "cuda") if x.is_cuda else "cpu"
    (bi, bh, warps, stages), cfg_d = config or DEJAVU_ROWS_CONFIG[key]
    hc = torch.empty(kn, dtype=torch.float32, device=x.device)
    pdl = _rows_pdl(x, pdl)
    kernel_module("_gemv_kernel.py", not x.is_cuda).dejavu_rows_kernel[(max(1, triton_cdiv(kn, bi)),)](
        x, wg, wu, idx, hc, kn, hid, wg.stride(0), BLOCK_I=bi, BLOCK_H=bh, STAGES=stages, num_warps=warps,
        PDL=pdl, **({"launch_pdl": True} if pdl else {}))
    out = torch.empty(1, hid, dtype=x.dtype, device=x.device)
    # the list launch reads no threshold: hc stands in for it (no zero-fill launch per call)
    _teal_partials(x, wd_t, None, hc, cfg_d, out=out, rows_list=(idx, hc))
    return out


def _rows_pdl(x: torch.Tensor, on: bool | None) -> bool:
    """PDL for the listed-neurons gate/up launch: `on` (None: `pdl.DEJAVU_ROWS`) where PDL exists."""
    return bool(pdl.level(x, pdl.DEJAVU_ROWS if on is None else on))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@torch.library.custom_op("sparseinfer::teal_gemv", mutates_args=())
def teal_gemv(x: torch.Tensor, wt: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return teal_gemv_launch(x, wt, threshold)


@teal_gemv.register_fake
def _teal_gemv_fake(x, wt, threshold):
    return x.new_empty(x.shape[0], wt.shape[1])


@torch.library.custom_op("sparseinfer::teal_mlp", mutates_args=())
def teal_mlp(x: torch.Tensor, wg_t: torch.Tensor, wu_t: torch.Tensor, wd_t: torch.Tensor, t_in: torch.Tensor,
             t_down: torch.Tensor, compact: bool = False) -> torch.Tensor:
    return teal_mlp_launch(x, wg_t, wu_t, wd_t, t_in, t_down, compact=compact)


@teal_mlp.register_fake
def _teal_mlp_fake(x, wg_t, wu_t, wd_t, t_in, t_down, compact=False):
    return x.new_empty(x.shape[0], wd_t.shape[1])


@torch.library.custom_op("sparseinfer::dejavu_gateup", mutates_args=())
def dejavu_gateup(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return dejavu_gateup_launch(x, wg, wu, mask)


@dejavu_gateup.register_fake
def _dejavu_gateup_fake(x, wg, wu, mask):
    return x.new_empty(x.shape[0], wg.shape[0])


@torch.library.custom_op("sparseinfer::dejavu_mlp_rows", mutates_args=())
def dejavu_mlp_rows(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd_t: torch.Tensor,
                    idx: torch.Tensor) -> torch.Tensor:
    return dejavu_mlp_rows_launch(x, wg, wu, wd_t, idx)


@dejavu_mlp_rows.register_fake
def _dejavu_mlp_rows_fake(x, wg, wu, wd_t, idx):
    return x.new_empty(1, x.shape[1])


def teal_gemv_reference(x: torch.Tensor, wt: torch.Tensor, threshold) -> torch.Tensor:
    """(x * (|x| > threshold)) @ wt in x's dtype (pass float64 tensors for an exact reference)."""
    return torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype)) @ wt.to(x.dtype)


def teal_mlp_reference(x, wg_t, wu_t, wd_t, t_in, t_down) -> torch.Tensor:
    """The TEAL SwiGLU MLP in x's dtype (float64 tensors for an exact reference)."""
    h = F.silu(teal_gemv_reference(x, wg_t, t_in)) * teal_gemv_reference(x, wu_t, t_in)
    return teal_gemv_reference(h, wd_t, t_down)


def dejavu_gateup_reference(x, wg, wu, mask) -> torch.Tensor:
    h = F.silu(x @ wg.to(x.dtype).T) * (x @ wu.to(x.dtype).T)
    return h * mask.to(h.dtype)


def teal_linear(x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor, bias=None) -> torch.Tensor:
    """F.linear(x * (|x| > threshold), weight, bias) through the kernel. x [.., K], weight [N, K]
    stored column-major (weight.t() contiguous; see contextual.patching._transpose_storage)."""
    shp = x.shape
    y = teal_gemv(x.reshape(-1, shp[-1]), weight.t(), threshold).reshape(*shp[:-1], weight.shape[0])
    return y if bias is None else y + bias


def dejavu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
               idx: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP over the neurons idx [.., Kn] of each row: x [.., H] -> [.., H]. w_gate / w_up
    [I, H] row-major, w_down [H, I] stored column-major (w_down.t() [I, H] contiguous)."""
    shp = x.shape
    x2 = x.reshape(-1, shp[-1])
    if x2.shape[0] == 1:  # decode at batch 1: the listed rows only (no mask, no zero-filled h)
        return dejavu_mlp_rows(x2, w_gate, w_up, w_down.t(), idx.reshape(-1)).reshape(shp)
    mask = torch.zeros(x2.shape[0], w_gate.shape[0], dtype=torch.bool, device=x.device)
    mask.scatter_(1, idx.reshape(x2.shape[0], -1).long(), True)
    h = dejavu_gateup(x2, w_gate, w_up, mask)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    return teal_gemv(h, w_down.t(), zero).reshape(shp)
