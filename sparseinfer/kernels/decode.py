"""Launchers of the sparse decode kernels (``_decode_kernel.py``).

    sparse_decode(q, k, v, indices, page_size, valid, scale) -> (out like q, lse [B, Hq] fp32)
    dense_decode(q, k, v, valid, scale) -> out like q   (every slot; torch op sparseinfer::dense_decode)
    quest_scores(q, kmin, kmax) -> [B, Hkv, P] fp32

Shapes and semantics are those of ``sparseinfer.ops.decode`` (callers validate). Static shapes
only: the number of splits and every launch size derive from tensor shapes, never from tensor
values, so a decode step that calls these can be captured in a CUDA graph. Page ids must not
repeat within a row (``ops.decode`` removes repeats unless told they are unique, e.g. top-k).
CUDA tensors run compiled kernels, CPU tensors the same kernels under the Triton interpreter.
"""
from __future__ import annotations

import functools
import math

import torch

from . import pdl
from ._loader import kernel_module


# (block_n tokens per loop iteration, num_warps, num_stages) on CUDA; the interpreter uses
# (64, 4, 1). Unmeasured defaults; benchmarks/decode.py sweeps alternatives.
CUDA_CONFIG = {64: (64, 4, 2), 128: (64, 4, 2)}


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def supported(q: torch.Tensor) -> str | None:
    """None if the kernel takes q's dtype and head_dim, else why not."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16, float32)"
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256):
        return f"head_dim {d} (the kernel takes 16, 32, 64, 128, 256)"
    return None


def sparse_decode(q, k, v, indices, page_size: int, valid, scale: float, *, splits: int | None = None,
                  block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """q [B, Hq, 1, D]; k/v [B, Hkv, N, D]; indices [B, Hkv, K] unique page ids or -1;
    valid [B, Hkv, N] bool or None -> (out [B, Hq, 1, D] in q's dtype, lse [B, Hq] float32).

    Split-K: the K pages of a row are cut into `splits` contiguous chunks, one program each
    (default: enough programs for ~4 waves over the GPU's SMs), merged by a second kernel."""
    return sparse_decode_multi(q, [(k, v, indices, page_size, valid)], scale, splits=splits, block_n=block_n,
                               num_warps=num_warps, num_stages=num_stages)


def sparse_decode_multi(q, parts, scale: float, *, splits: int | None = None, block_n: int | None = None,
                        num_warps: int | None = None, num_stages: int | None = None):
    """Attention over the union of several KV buffers' selected pages, in one merge:
    parts = [(k, v, indices, page_size, valid), ...], each as in `sparse_decode` (same B, Hkv,
    D as q's group). One partial-kernel launch per part (two parts of one page size and validity
    kind: one launch for both), one merge kernel for all."""
    b, hq, _, d = q.shape
    interpret = q.device.type != "cuda"
    mod = kernel_module("_decode_kernel.py", interpret)
    bn0, warps, stages = (64, 4, 1) if interpret else CUDA_CONFIG.get(d, (64, 4, 2))
    warps = num_warps or warps
    stages = num_stages or stages
    q = q if q.stride(-1) == 1 else q.contiguous()
    plans = []
    # default splits: ~4 programs per SM over all parts, shared out by their tokens (even work)
    tokens = [max(1, ind.shape[-1] * ps) for _, _, ind, ps, _ in parts]
    for (k, v, indices, page_size, valid), tok in zip(parts, tokens):
        hkv = k.shape[1]
        npages = indices.shape[-1]
        ps_p2 = _next_pow2(page_size)
        bn = max(block_n or bn0, ps_p2, 16)
        per_iter = bn // ps_p2
        iters = max(1, math.ceil(npages / per_iter))
        sp = splits
        if sp is None:
            target = 4 * _sm_count(q.device.index or 0) if not interpret else 2
            sp = max(1, min(iters, math.ceil(target * tok / sum(tokens) / max(1, b * hkv))))
        sp = max(1, min(int(sp), iters))
        pps = math.ceil(iters / sp) * per_iter  # pages per split, a whole number of iterations
        sp = max(1, math.ceil(npages / pps)) if npages else 1
        plans.append((k, v, indices, page_size, valid, hkv, npages, ps_p2, bn, pps, sp))
    total = sum(p[-1] for p in plans)
    op = torch.empty(b, hq, total, d, dtype=torch.float32, device=q.device)
    lp = torch.empty(b, hq, total, dtype=torch.float32, device=q.device)
    prec = "ieee" if (q.dtype == torch.float32 or interpret) else "tf32"
    args = []  # per part: (buffer args, strides..., N, npages, pps) in the kernel's order
    for k, v, indices, page_size, valid, hkv, npages, ps_p2, bn, pps, sp in plans:
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        idx = indices if indices.dtype == torch.int32 and indices.stride(-1) == 1 else indices.to(torch.int32).contiguous()
        if valid is not None:
            vm = valid.view(torch.uint8) if valid.stride(-1) == 1 else valid.contiguous().view(torch.uint8)
            smb, smh = vm.stride(0), vm.stride(1)
        else:
            vm, smb, smh = idx, 0, 0
        args.append(((k, v, idx, vm), (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                                       idx.stride(0), idx.stride(1), smb, smh), (k.shape[2], npages, pps)))
    # two parts of one page size and validity kind (RaaS: the kept prompt + the page pool) share
    # one launch: no second kernel's tail, and both parts' programs fill the GPU together
    same = len(plans) == 2 and plans[0][3] == plans[1][3] and plans[0][8] == plans[1][8] \
        and (plans[0][4] is None) == (plans[1][4] is None)
    groups = [(0, 1)] if same else [(i,) for i in range(len(plans))]
    base = 0
    for grp in groups:
        first = plans[grp[0]]
        (bufs, strides, sizes), (bufs2, strides2, sizes2) = args[grp[0]], args[grp[-1]]
        _, _, _, page_size, valid, hkv, _, ps_p2, bn, _, sp1 = first
        sp = sum(plans[i][-1] for i in grp)
        mod.decode_partial_kernel[(b * hkv, sp)](
            q, *bufs[:3], bufs[3], op, lp,
            q.stride(0), q.stride(1), *strides,
            *sizes, total, base, float(scale) * 1.4426950408889634,
            *bufs2, *strides2, *sizes2, sp1,
            HKV=hkv, G=hq // hkv, BLOCK_G=max(16, _next_pow2(hq // hkv)), HEAD_D=d, PS=page_size, PS_P2=ps_p2,
            BLOCK_N=bn, HAS_VALID=valid is not None, PREC=prec, STAGES=stages, DOT_F32=interpret,
            TWO=len(grp) == 2, num_warps=warps, num_stages=stages,
        )
        base += sp
    return _merge(mod, q, op, lp)


def _merge(mod, q, op, lp):
    """The merge launch: partials op [B, Hq, S, D] / lp [B, Hq, S] -> (out like q, lse [B, Hq] float32)."""
    b, hq, _, d = q.shape
    out = torch.empty(b, hq, 1, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
    mod.decode_merge_kernel[(b * hq,)](op, lp, out, lse, out.stride(0), out.stride(1), op.shape[2], HQ=hq,
                                       BLOCK_S=min(64, _next_pow2(op.shape[2])), HEAD_D=d,
                                       num_warps=4 if d >= 128 else 2, **pdl.kwargs(q))
    return out, lse


# dense decode: (block_n, num_warps, num_stages, splits per (batch, KV head) or None = ~SPLIT_WAVES
# programs per SM, V loaded with K, skip splits with no valid slot). H100, D 128, bf16, L2-cold
# (benchmarks/results/decode/decode_attention_cold.md, _skip.md, _mha.md, _rule.md). "cuda short" (one
# 128-slot tile per program) when the cache has at most SHORT_WAVES x SMs such tiles over all (batch,
# KV head) rows: 32/8 heads, 4104 slots, B1: 12.6-12.7 us (SDPA + mask 20.4-20.8; SDPA on the filled
# slots only 14.0; 8200 slots: 20.7 vs 19.4 with the long config, B4 4104: 34.0 vs 33.3). Else "cuda":
# full 32K 54.1-54.8 vs 60.2 us; 128K 188 vs 190; a 32K cache holding 4K
# tokens 22.7 us with the empty splits skipped (31.1 without; SDPA + mask 58.6); 32/32 heads (MHA),
# 4K: B1 32.1 vs 37.5, B4 100.6 vs 101.1 (the short config: 33.4 / 112.7). The skip check costs <= 1%
# in full caches, 3.6% with one tile per program: off there.
DENSE_CONFIG = {"cuda": (64, 4, 2, 64, False, True), "cuda short": (128, 8, 1, None, False, False),
                "cpu": (16, 4, 1, None, False, False)}
SPLIT_WAVES = 4
SHORT_WAVES = 2


def dense_decode(q, k, v, valid, scale: float, *, config=None):
    """q [B, Hq, 1, D]; k/v [B, Hkv, N, D]; valid [B, N] bool (slots every head sees) or None ->
    out [B, Hq, 1, D] in q's dtype: attention over every valid slot (no index row; the KV head's
    query heads share each K/V tile), split over N, merged by a second launch. config: a
    DENSE_CONFIG entry; None: the default for the device and the shapes."""
    b, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    interpret = q.device.type != "cuda"
    mod = kernel_module("_decode_kernel.py", interpret)
    if interpret:
        key = "cpu"
    else:
        key = "cuda short" if b * hkv * -(-n // 128) <= SHORT_WAVES * _sm_count(q.device.index or 0) else "cuda"
    bn, warps, stages, sp, early_v, skip = config or DENSE_CONFIG[key]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    npages = max(1, -(-n // bn))
    if sp is None:
        target = SPLIT_WAVES * (_sm_count(q.device.index or 0) if not interpret else 1)
        sp = math.ceil(target / max(1, b * hkv))
    sp = max(1, min(int(sp), npages))
    pps = -(-npages // sp)
    sp = -(-npages // pps)
    op = torch.empty(b, hq, sp, d, dtype=torch.float32, device=q.device)
    lp = torch.empty(b, hq, sp, dtype=torch.float32, device=q.device)
    vm, smb = (valid.view(torch.uint8), valid.stride(0)) if valid is not None else (q, 0)
    strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), 0, 0, smb, 0)
    sizes = (n, npages, pps)
    mod.decode_partial_kernel[(b * hkv, sp)](
        q, k, v, k, vm, op, lp, q.stride(0), q.stride(1), *strides, *sizes, sp, 0, float(scale) * 1.4426950408889634,
        k, v, k, vm, *strides, *sizes, sp,
        HKV=hkv, G=hq // hkv, BLOCK_G=max(16, _next_pow2(hq // hkv)), HEAD_D=d, PS=bn, PS_P2=bn, BLOCK_N=bn,
        HAS_VALID=valid is not None, PREC="ieee" if (q.dtype == torch.float32 or interpret) else "tf32",
        STAGES=stages, DOT_F32=interpret, TWO=False, num_warps=warps, num_stages=stages,
        DENSE=True, EARLY_V=bool(early_v), SKIP=bool(skip) and valid is not None, **pdl.kwargs(q),
    )
    return _merge(mod, q, op, lp)[0]


@torch.library.custom_op("sparseinfer::dense_decode", mutates_args=())
def dense_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """`dense_decode` as a torch op (torch.compile captures it; the fake gives the shape)."""
    return dense_decode(q, k, v, valid, scale)


@dense_decode_op.register_fake
def _dense_decode_fake(q, k, v, valid, scale):
    return q.new_empty(q.shape)  # contiguous, as the kernel's output


def quest_scores(q, kmin, kmax, *, cur=None, block_p: int | None = None):
    """q [B, Hq, 1, D]; kmin/kmax [B, Hkv, P, D] (any float dtype) -> [B, Hkv, P] float32;
    cur [B, Hkv] int64 (contiguous): that page of each row scores +inf (RaaS's current page)."""
    b, hq, _, d = q.shape
    hkv, p = kmin.shape[1], kmin.shape[2]
    interpret = q.device.type != "cuda"
    mod = kernel_module("_decode_kernel.py", interpret)
    q = q if q.stride(-1) == 1 else q.contiguous()
    kmin = kmin if kmin.stride(-1) == 1 else kmin.contiguous()
    kmax = kmax if kmax.stride(-1) == 1 else kmax.contiguous()
    out = torch.empty(b, hkv, p, dtype=torch.float32, device=q.device)
    if p == 0:
        return out
    bp = block_p or (64 if d <= 64 else 32)
    mod.quest_score_kernel[(b * hkv, math.ceil(p / bp))](
        q, kmin, kmax, out, out if cur is None else cur, q.stride(0), q.stride(1),
        kmin.stride(0), kmin.stride(1), kmin.stride(2), kmax.stride(0), kmax.stride(1), kmax.stride(2), p,
        HKV=hkv, G=hq // hkv, HEAD_D=d, BLOCK_P=bp, HAS_CUR=cur is not None, num_warps=4,
    )
    return out
