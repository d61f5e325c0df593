"""Triton kernels for the RaaS KV policy's per-step bookkeeping (``sparseinfer.kv.layers.RaaSLayer``).

Only @triton.jit code; ``sparseinfer.kernels.raas`` loads it compiled (CUDA) or under the Triton
interpreter (CPU). One program = one (batch, KV head) row; S page slots of PS tokens each.

raas_update_kernel: write one decode token. STEP (generated tokens so far, before this one)
  decides whether it opens a new page (STEP % PS == 0): then the slot with the smallest
  timestamp (a free slot has -inf; the first minimum on ties) becomes the current page, its
  timestamp is set to STEP, its fill count, key bounds and token validity restart. The token's
  key/value go to row cur * PS + STEP % PS of the slot buffers, the page's element-wise key
  min/max (the keys' dtype: exact) and fill count take it in, and its validity bit is set.
raas_select_kernel: from the page scores BOUND (Quest bounds, the current page +inf, free slots
  -inf): the NREF highest-scoring slots get timestamp STEP - 1 (refresh) and the NSEL highest
  become the page ids to attend, in slot order (int32, padded with -1); slots scoring -inf are
  never picked. The n-th largest score: `_topk_kernel._top_n` (bisection on the scores'
  ordered bit patterns, no sort); ties at it go to the lower slot.
"""
import os

import triton
import triton.language as tl
from triton.language.standard import _elementwise_min as _min_fn  # noqa: E402
from triton.language.standard import _sum_combine as _sum_fn  # noqa: E402

from sparseinfer.kernels._loader import kernel_module

# the bisection top-n of the top-k kernel, loaded in this module's mode (compiled / interpreted)
_top_n = kernel_module("_topk_kernel.py", os.environ.get("TRITON_INTERPRET") == "1")._top_n


@triton.jit
def raas_update_kernel(KN, VN, GK, GV, TS, FILL, CUR, GMIN, GMAX, GVALID, STEP,
                       stride_knb, stride_knh, stride_vnb, stride_vnh, stride_gb, stride_gh, stride_gn,
                       S, H: tl.constexpr, S_P2: tl.constexpr, PS: tl.constexpr, PS_P2: tl.constexpr,
                       HEAD_D: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    row = pid.to(tl.int64)
    step = tl.load(STEP)
    in_page = step % PS
    new_page = in_page == 0
    offs_s = tl.arange(0, S_P2)
    ts = tl.load(TS + row * S + offs_s, mask=offs_s < S, other=float("inf"))
    tmin = tl.reduce(ts, 0, _min_fn)
    victim = tl.reduce(tl.where(ts == tmin, offs_s, S_P2), 0, _min_fn)  # the first minimum
    cur = tl.where(new_page, victim, tl.load(CUR + row))
    tl.store(CUR + row, cur.to(tl.int64))
    tl.store(TS + row * S + cur, step.to(tl.float32), mask=new_page)
    fill = tl.load(FILL + row * S + cur)
    tl.store(FILL + row * S + cur, tl.where(new_page, 0, fill) + 1)
    offs_d = tl.arange(0, HEAD_D)
    k = tl.load(KN + b * stride_knb + h * stride_knh + offs_d)
    v = tl.load(VN + b * stride_vnb + h * stride_vnh + offs_d)
    tok = cur * PS + in_page
    dst = b.to(tl.int64) * stride_gb + h * stride_gh + tok * stride_gn + offs_d
    tl.store(GK + dst, k)
    tl.store(GV + dst, v)
    kf = k.to(tl.float32)
    bnd = (row * S + cur) * HEAD_D + offs_d
    lo = tl.load(GMIN + bnd).to(tl.float32)
    hi = tl.load(GMAX + bnd).to(tl.float32)
    tl.store(GMIN + bnd, tl.where(new_page, kf, tl.minimum(lo, kf)).to(GMIN.dtype.element_ty))
    tl.store(GMAX + bnd, tl.where(new_page, kf, tl.maximum(hi, kf)).to(GMAX.dtype.element_ty))
    # validity of the page's tokens: a new page keeps only its first token; else one more
    offs_t = tl.arange(0, PS_P2)
    vbase = GVALID + row * S * PS + cur * PS
    tl.store(vbase + offs_t, (offs_t == 0).to(tl.uint8), mask=new_page & (offs_t < PS))
    tl.store(vbase + in_page, tl.full((), 1, tl.uint8), mask=in_page != 0)


@triton.jit
def raas_select_kernel(BOUND, TS, SEL, STEP, S, NREF: tl.constexpr, NSEL: tl.constexpr, S_P2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, S_P2)
    ok = offs < S
    score = tl.load(BOUND + row * S + offs, mask=ok, other=float("-inf"))
    scored = ok & (score > float("-inf"))  # free slots score -inf and are never picked
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # ordered like the floats
    key = tl.where(scored, key, -(1 << 31))  # below every float's key: the range stays 2^32
    now = (tl.load(STEP) - 1).to(tl.float32)  # the step of the token just written
    refresh = _top_n(key, scored, NREF, 33)
    tl.store(TS + row * S + offs, tl.full((S_P2,), 0.0, tl.float32) + now, mask=refresh)
    pick = _top_n(key, scored, NSEL, 33)
    pos = tl.associative_scan(pick.to(tl.int32), 0, _sum_fn) - 1
    count = tl.reduce(pick.to(tl.int32), 0, _sum_fn)
    tl.store(SEL + row * NSEL + pos, offs.to(tl.int32), mask=pick & (pos < NSEL))
    tl.store(SEL + row * NSEL + offs, tl.full((S_P2,), -1, tl.int32), mask=(offs >= count) & (offs < NSEL))
