"""Sparse pre-filling attention vs dense SDPA on one GPU: check, then time.

One Llama-3-8B layer: B=1, 32 query heads, 8 KV heads, D=128, bf16, causal.

    python benchmarks/attention.py --autotune            # 128K config sweep, check, full table
    python benchmarks/attention.py                       # check + full table (configs as coded)
    python benchmarks/attention.py --tune                # config sweep at 128K, then the check
    python benchmarks/attention.py --holey               # bands with holes: 1 vs 2 stages
    python benchmarks/attention.py --sizes 32768,131072 --out DIR

1. Check: the Triton kernel vs a float32 reference on the same mask (sparseinfer's chunked
   torch reference) at 16K (+ an odd length, fp16 / D=64 / GQA 4 and 1): rel err <= 1e-2, no NaN.
2. Time (CUDA events, median after warm-up): dense SDPA (cuDNN, flash; "dense" = faster),
   A-shape 128 + 4096, vertical-slash 1000 / 6096 and block-sparse top-100 of 64-blocks, on
   (a) realistic index sets, (b) structured q/k through the estimators, (c) i.i.d. random q/k
   through the estimators. "+est" rows include estimation; every sparseinfer row includes
   index construction. Ratio = dense / time; % limit = ratio * density, with the density of the
   cells kept and with issue 3's nominal one (keys per row / (N / 2), as shared/anchors.md's limits).
Writes JSON + markdown + a PNG of the table to --out (default benchmarks/results/);
`--plot RESULTS.json` redraws the PNG from a committed JSON on any machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseinfer import ops  # noqa: E402
from sparseinfer import kernels  # noqa: E402
from sparseinfer.kernels import attention as katt  # noqa: E402

try:
    from sparseinfer.patterns.vertical_slash import estimate as vs_estimate, vertical_slash_density
except Exception:  # the estimators are written elsewhere; skip their columns if absent
    vs_estimate = vertical_slash_density = None
try:
    from sparseinfer.patterns.block_sparse import estimate as bs_estimate, block_sparse_density
except Exception:
    bs_estimate = block_sparse_density = None

HQ, HKV, D = 32, 8, 128
SINK, WINDOW = 128, 4096
NV, NS = 1000, 6096
TOPK, BS = 100, 64


# ---------------------------------------------------------------- inputs
def realistic_vs(b, h, n, dev, gen):
    """1000 verticals = first 30 + 970 scattered; 6096 slashes = 0..4095 + 10 runs of 200."""
    v_rest = torch.rand(b, h, n - 30, device=dev, generator=gen).argsort(-1)[..., : NV - 30] + 30
    vert = torch.cat([torch.arange(30, device=dev).expand(b, h, 30), v_rest], -1)
    runs = torch.randint(4096, max(4097, n - 200), (b, h, 10), device=dev, generator=gen)
    runs = (runs[..., None] + torch.arange(200, device=dev)).reshape(b, h, 2000)
    sl = torch.cat([torch.arange(4096, device=dev).expand(b, h, 4096), runs], -1).clamp(max=n - 1)
    return vert, sl


def realistic_blocks(b, h, n, dev, gen):
    """top-100 of 64-blocks: the sink block, 16 local blocks, 83 random earlier ones (-1 where
    a query block has fewer causal blocks)."""
    nb = math.ceil(n / BS)
    qb = torch.arange(nb, device=dev).view(1, 1, nb, 1)
    local = qb - torch.arange(16, device=dev)
    rnd = (torch.rand(b, h, nb, TOPK - 17, device=dev, generator=gen) * (qb + 1)).long()
    idx = torch.cat([torch.zeros_like(qb).expand(b, h, nb, 1), local.expand(b, h, nb, 16), rnd], -1)
    return torch.where(idx >= 0, idx, -1)


def structured_qk(b, n, dev, gen, dtype=torch.bfloat16):
    """q/k whose attention looks like real heads': sinks, a local band, a few distant
    diagonals (periodic positional terms) and scattered heavy columns."""
    pos = torch.arange(n, device=dev, dtype=torch.float32)
    half = 32
    q = torch.randn(b, HQ, n, D, device=dev, generator=gen) * 0.5
    k = torch.randn(b, HKV, n, D, device=dev, generator=gen) * 0.5
    # local band: many frequencies (RoPE-like), decaying with distance
    freqs = 1.0 / (64.0 * (2000.0 ** (torch.arange(half - 4, device=dev) / (half - 4))))
    # distant diagonals: a few periods per KV head
    periods = torch.randint(5000, 40000, (HKV, 4), device=dev, generator=gen).float()
    for kh in range(HKV):
        f = torch.cat([freqs, 2 * math.pi / periods[kh]])  # [half]
        ang = pos[:, None] * f[None, :]
        amp = torch.cat([torch.full((half - 4,), 0.9, device=dev), torch.full((4,), 1.4, device=dev)])
        pk = torch.cat([torch.cos(ang), torch.sin(ang)], -1) * torch.cat([amp, amp])
        k[:, kh, :, : 2 * half] = pk
        for g in range(HQ // HKV):
            q[:, kh * (HQ // HKV) + g, :, : 2 * half] = pk * 1.6
    # heavy columns (and sinks): a shared direction u
    u = torch.randn(D - 2 * half, device=dev, generator=gen)
    u = u / u.norm()
    heavy = torch.cat([torch.arange(4, device=dev), torch.randint(0, n, (HKV, 200), device=dev, generator=gen).flatten()])
    kc = k[..., 2 * half:]
    kc[:, :, heavy] += 6.0 * u
    q[..., 2 * half:] += 2.0 * u
    return q.to(dtype), k.to(dtype)


def set_flags(spec: str | None) -> None:
    """--flags of the benchmark scripts: 'NAME=value,...' into katt.FLAGS; booleans and integers
    parse the value as an integer, string-valued flags ("auto") take an integer when the value is
    one (0 = off) and the string otherwise (KERNEL=file)."""
    for kv in (f for f in (spec or "").split(",") if f):
        name, _, val = kv.partition("=")
        if name not in katt.FLAGS or not val:
            raise ValueError(f"--flags: expected NAME=value with NAME in {sorted(katt.FLAGS)}, got {kv!r}")
        cur = katt.FLAGS[name]
        if isinstance(cur, (bool, int)):
            katt.FLAGS[name] = type(cur)(int(val))
        else:
            katt.FLAGS[name] = int(val) if val.lstrip("-").isdigit() else val


def gpu_setup(default_n: int = 131072):
    """The one-call GPU scripts' start: (cuda device, a generator on it seeded 0, N from argv[1] or
    default_n)."""
    dev = torch.device("cuda")
    return dev, torch.Generator(device=dev).manual_seed(0), int(sys.argv[1]) if len(sys.argv) > 1 else default_n


def run_meta() -> dict:
    """device, torch / triton / python versions and the UTC date of a GPU benchmark run."""
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def random_qkv(b, hq, hkv, n, d, dev, gen, dtype):
    q = torch.randn(b, hq, n, d, device=dev, generator=gen, dtype=torch.float32).to(dtype)
    k = torch.randn(b, hkv, n, d, device=dev, generator=gen, dtype=torch.float32).to(dtype)
    v = torch.randn(b, hkv, n, d, device=dev, generator=gen, dtype=torch.float32).to(dtype)
    return q, k, v


# ---------------------------------------------------------------- timing
_FILLER: dict = {}


def busy_ahead(dev, matmuls: int = 6) -> None:
    """Queue ~10 ms of full-power GPU work (bf16 8192^3 products) without waiting for it: the
    host's next launches overlap it, and the card stays at the power it draws under load. (A
    sleep kernel there would idle the card at low power, and the call after it would run at
    higher clocks: H100, 128K block-sparse 26.7 vs 28.5 ms after a sleep kernel that was waited
    for; results/clocks_sleep_s19.md.)"""
    key = (dev.type, dev.index)
    if key not in _FILLER:
        g = torch.Generator(device=dev).manual_seed(1)
        _FILLER[key] = torch.randn(2, 8192, 8192, device=dev, generator=g).to(torch.bfloat16)
    a = _FILLER[key]
    for _ in range(matmuls):
        torch.mm(a[0], a[1])


def bench(fn, budget_s=1.5, max_reps=20, min_reps=3, ahead=False):
    """Median ms over reps (CUDA events) after warm-up; reps fit a time budget. ahead: ~10 ms of
    full-power GPU work (`busy_ahead`) is queued before each rep, so the host's launches overlap
    it (as a model's launches overlap the previous layer's GPU work); host synchronisations inside
    fn still count."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    if one > 1.5:  # long runs (near-dense work at 256K+): fewer repetitions
        min_reps = 1
    reps = int(max(min_reps, min(max_reps, budget_s / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        if ahead:
            torch.cuda.synchronize()
            busy_ahead(torch.device("cuda", torch.cuda.current_device()))
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def logger(first: str | None = None):
    """(lines, log): log(s) prints s at once and keeps it in lines (for write_results); first, when
    given, is logged first (the run's metadata as JSON)."""
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    if first is not None:
        log(first)
    return lines, log


def write_results(out: str, tag: str, data: dict, md: str, lines: list) -> None:
    """A benchmark's results under out/: tag.json (data), tag.md (md) and tag.log (the logged lines)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{tag}.json"), "w") as fh:
        json.dump(data, fh, indent=1)
    with open(os.path.join(out, f"{tag}.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(out, f"{tag}.log"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def length_inputs(n, dev, gen, log):
    """A variant benchmark's start at length n: q / k / v (bf16, this layer's heads), the realistic
    block lists, cuDNN's dense fn and its first timing (logged) -> (q, k, v, blocks, dense_fn, [ms])."""
    torch.cuda.empty_cache()
    q, k, v = random_qkv(1, HQ, HKV, n, D, dev, gen, torch.bfloat16)
    bi = realistic_blocks(1, HQ, n, dev, gen)
    dense_fn = dense_fns(q, k, v)["cudnn"]
    dense = [bench(dense_fn, budget_s=1.0, min_reps=1)]
    log(f"N={n} dense cudnn {dense[0]:.2f} ms")
    return q, k, v, bi, dense_fn, dense


def alternate(fns: dict, rounds: int, budget_s: float, log, tag: str = "") -> dict:
    """name -> list of ms: each callable of fns (name -> fn) timed once per round (`bench`), `rounds`
    rounds, the order reversed every other round (warm-up, drift and the card's power state spread
    over all of them)."""
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = bench(fns[name], budget_s=budget_s)
            times[name].append(t)
            log(f"{tag} round {r} {name:14s} {t:8.2f} ms")
    return times


def dense_fns(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def mk(backend):
        def f():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return f

    def cudnn():
        try:
            return mk(SDPBackend.CUDNN_ATTENTION)()
        except RuntimeError:  # no GQA in this cuDNN path: repeat K/V (baseline only)
            g = q.shape[1] // k.shape[1]
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)

    return {"cudnn": cudnn, "flash": mk(SDPBackend.FLASH_ATTENTION)}


def rel(out, ref):
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm())


def nominal_keys(variant):
    """Keys per row a pattern nominally keeps (sink + window; verticals + slashes; top-k x block),
    or None for dense: issue 3's density limit divides it by the mean causal row length N / 2.
    Its MInference percentages (61-68% vertical-slash, 43-53% block-sparse) come out of this
    count only; the cells a row really keeps (`density`) are fewer (slashes past the row's start
    and the causal triangle's short rows drop out), so "% of limit (cells)" is the stricter one."""
    if variant.startswith("ashape"):
        return SINK + WINDOW
    if variant.startswith("vertical-slash"):
        return NV + NS
    if variant.startswith("block-sparse"):
        return TOPK * BS
    return None


def nominal_density(n, variant):
    keys = nominal_keys(variant)
    return 1.0 if keys is None else min(1.0, keys / (n / 2))


def ashape_density(n, sink, window):
    i = torch.arange(n, dtype=torch.float64)
    w = torch.minimum(i + 1, torch.tensor(float(window))).clamp(min=1)
    s = torch.clamp(torch.minimum(torch.tensor(float(sink)), i + 1 - w), min=0)
    return float((w + s).sum() / (n * (n + 1) / 2))


# ---------------------------------------------------------------- check
def check(dev, gen, log):
    res = []

    def one(name, out, ref_fn):
        ref = ref_fn()
        e = rel(out, ref)
        nan = bool(torch.isnan(out).any())
        ok = e <= 1e-2 and not nan
        res.append({"case": name, "rel_err": e, "nan": nan, "ok": ok})
        log(f"check {name:45s} rel_err {e:.2e} nan {nan} {'OK' if ok else 'FAIL'}")

    for n, hq, hkv, d, dtype in [(16384, HQ, HKV, D, torch.bfloat16), (4096 + 77, 8, 2, 64, torch.float16),
                                 (2048 + 33, 4, 4, 128, torch.bfloat16)]:
        q, k, v = random_qkv(1, hq, hkv, n, d, dev, gen, dtype)
        vert, sl = realistic_vs(1, hq, n, dev, gen)
        tag = f"N={n} H={hq}/{hkv} D={d} {str(dtype)[6:]}"
        one(f"vs realistic {tag}", ops.vertical_slash_attention(q, k, v, vert, sl, backend="triton"),
            lambda: ops.vertical_slash_attention(q, k, v, vert, sl, backend="reference"))
        # scattered slashes (holey merged ranges) + scattered verticals
        sl2 = torch.randint(-1, n, (1, hq, 300), device=dev, generator=gen)
        v2 = torch.randint(-1, n, (1, hq, 200), device=dev, generator=gen)
        one(f"vs scattered {tag}", ops.vertical_slash_attention(q, k, v, v2, sl2, backend="triton"),
            lambda: ops.vertical_slash_attention(q, k, v, v2, sl2, backend="reference"))
        bi = realistic_blocks(1, hq, n, dev, gen)
        one(f"block-sparse {tag}", ops.block_sparse_attention(q, k, v, bi, BS, backend="triton"),
            lambda: ops.block_sparse_attention(q, k, v, bi, BS, backend="reference"))
        one(f"a-shape {tag}", ops.ashape_attention(q, k, v, SINK, WINDOW // 4, backend="triton"),
            lambda: ops.ashape_attention(q, k, v, SINK, WINDOW // 4, backend="reference"))
        del q, k, v
    # batch 2, a tail block, q / k / v as transposed projections' views (the Gluon kernel's 4-D descriptors)
    n, hq, hkv = 3072 + 17, 8, 2
    q, k, v = random_qkv(2, hq, hkv, n, D, dev, gen, torch.bfloat16)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    tag = f"B=2 N={n} H={hq}/{hkv} D={D} bfloat16 q/k/v transposed"
    vert, sl = realistic_vs(2, hq, n, dev, gen)
    bi = realistic_blocks(2, hq, n, dev, gen)
    one(f"vs realistic {tag}", ops.vertical_slash_attention(q, k, v, vert, sl, backend="triton"),
        lambda: ops.vertical_slash_attention(q, k, v, vert, sl, backend="reference"))
    one(f"block-sparse {tag}", ops.block_sparse_attention(q, k, v, bi, BS, backend="triton"),
        lambda: ops.block_sparse_attention(q, k, v, bi, BS, backend="reference"))
    one(f"a-shape {tag}", ops.ashape_attention(q, k, v, SINK, WINDOW // 4, backend="triton"),
        lambda: ops.ashape_attention(q, k, v, SINK, WINDOW // 4, backend="reference"))
    del q, k, v
    if vs_estimate is not None:
        n = 16384
        q, k = structured_qk(1, n, dev, gen)
        v = torch.randn(1, HKV, n, D, device=dev, generator=gen).to(torch.bfloat16)
        vi, si = vs_estimate(q, k, NV, NS)
        one(f"vs estimated structured N={n}", ops.vertical_slash_attention(q, k, v, vi, si, backend="triton"),
            lambda: ops.vertical_slash_attention(q, k, v, vi, si, backend="reference"))
    return res


# ---------------------------------------------------------------- tune
def share_blocks(b, h, n, bsz, share, dev, gen):
    """[B, H, nb, K] block lists keeping ~`share` of each row's causal blocks (the sink, the
    diagonal block, random earlier ones; duplicates dropped by the index): the lists of an
    adaptive method at high density (flexprefill / xattention keep ~60% at 128K)."""
    nb = math.ceil(n / bsz)
    k = max(2, math.ceil(share * nb))
    qb = torch.arange(nb, device=dev).view(1, 1, nb, 1)
    rnd = (torch.rand(b, h, nb, k - 2, device=dev, generator=gen) * (qb + 1)).long()
    need = torch.arange(k - 2, device=dev).view(1, 1, 1, -1) < torch.ceil(share * (qb + 1))
    rnd = torch.where(need, rnd, -1)
    return torch.cat([torch.zeros_like(qb).expand(b, h, nb, 1), qb.expand(b, h, nb, 1), rnd], -1)


def tune(dev, gen, log, n=131072, flex=False, only_vs=None, only_bs=None):
    q, k, v = random_qkv(1, HQ, HKV, n, D, dev, gen, torch.bfloat16)
    vert, sl = realistic_vs(1, HQ, n, dev, gen)
    bi = realistic_blocks(1, HQ, n, dev, gen)
    rows = []
    scale = D ** -0.5
    t = bench(dense_fns(q, k, v)["cudnn"], budget_s=1.0)
    rows.append({"pattern": "dense-cudnn", "config": None, "ms": t})
    log(f"tune dense cudnn {t:8.2f} ms")
    # split: 0 = one masked loop per range, 1 = masked head / unmasked middle / masked tail,
    # 2 = all exact ranges in one flat pipelined loop
    # 3 = masked edge tiles of all ranges in one flat loop, unmasked middles per range
    # 4 = vertical-slash bands as relative tiles + edge lists (index.py), holey bands per range
    # (block_m, block_n, warps, stages, edge stages, split, holey stages)
    # (first sweep, H100 2026-11-25: split 3 beat split 4 at block_m 128, 53 vs 59-64 ms; 128/32 and
    # 64/32 tiles were slower)
    # (second sweep: block_m 64 best for realistic indices with split 3, for structured with split 4;
    # edge stages 3 at block_m 64 with split 3 much slower, 68-80 vs 47-50 ms)
    vs_cfgs = [(128, 64, 8, 3, 2, 3, 2), (128, 64, 8, 3, 2, 4, 2), (64, 64, 4, 3, 2, 3, 2), (64, 64, 4, 3, 2, 4, 2),
               (64, 64, 4, 3, 3, 4, 2), (64, 64, 4, 4, 2, 4, 2)]
    parts_cfgs = [(64, 64, 4, 3, 2, 3, 2)]
    as_cfgs = [(64, 64, 4, 3, 1, 1)]
    if only_vs is not None or only_bs is not None:  # a quick sweep of these configs only
        vs_cfgs, parts_cfgs, as_cfgs = only_vs or [], [], []
    vi = si = None
    if vs_estimate is not None:  # structured q/k: estimated indices (bands with holes), estimation not timed
        qs, ks = structured_qk(1, n, dev, gen)
        vi, si = vs_estimate(qs, ks, NV, NS)
        del qs, ks
    for name, cfgs in (("vs", vs_cfgs), ("vs-structured", vs_cfgs if vi is not None else []), ("ashape", as_cfgs)):
        for cfg in cfgs:
            fn = ((lambda: kernels.vertical_slash_attention(q, k, v, vert, sl, scale, config=cfg)) if name == "vs"
                  else (lambda: kernels.vertical_slash_attention(q, k, v, vi, si, scale, config=cfg))
                  if name == "vs-structured"
                  else (lambda: kernels.ashape_attention(q, k, v, SINK, WINDOW, scale, config=cfg)))
            try:
                t = bench(fn, budget_s=0.4)
            except Exception as e:
                t = float("nan")
                log(f"tune {name} {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
            rows.append({"pattern": name, "config": cfg, "ms": t})
            log(f"tune {name:7s} {cfg} {t:8.2f} ms")
    # where the realistic vertical-slash time goes: the local band alone, + the 10 runs, + the columns
    parts = {"band": (vert[..., :0], sl[..., :WINDOW]), "band+runs": (vert[..., :0], sl),
             "band+columns": (vert, sl[..., :WINDOW]), "all": (vert, sl)}
    for cfg in parts_cfgs:
        for part, (pv, ps) in parts.items():
            t = bench(lambda: kernels.vertical_slash_attention(q, k, v, pv, ps, scale, config=cfg), budget_s=0.4)
            rows.append({"pattern": f"vs-{part}", "config": cfg, "ms": t})
            log(f"tune vs {part:12s} {cfg} {t:8.2f} ms")
    bs_cfgs = only_bs if only_bs is not None else [] if only_vs else [(64, (64, 64, 4, 2, 1, 0)), (64, (64, 64, 4, 3, 1, 0))]
    bi128 = share_blocks(1, HQ, n, 128, 0.6, dev, gen) if any(bsz == 128 for bsz, _ in bs_cfgs) else None
    for bsz, cfg in bs_cfgs:  # (block size, config): top-100 64-blocks, or 128-blocks at ~60% density
        lists = bi if bsz == BS else bi128
        name = "blocks" if bsz == BS else f"blocks{bsz}-share0.6"
        try:
            t = bench(lambda: kernels.block_sparse_attention(q, k, v, lists, bsz, scale, config=cfg), budget_s=0.5)
        except Exception as e:
            t = float("nan")
            log(f"tune {name} {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
        rows.append({"pattern": name, "config": cfg, "ms": t})
        log(f"tune {name}  {cfg} {t:8.2f} ms")
    if flex:  # FlexAttention on the same block lists
        try:
            t = flex_block_sparse_time(q, k, v, bi, n, log)
            rows.append({"pattern": "blocks-flex", "config": None, "ms": t})
        except Exception as e:
            log(f"flex failed: {type(e).__name__}: {str(e)[:300]}")
    return rows


def holey(dev, gen, log, n=131072):
    """Bands with holes (scattered estimated slashes): pipelined (2 stages) vs not, at 128K."""
    rows = []
    scale = D ** -0.5
    base = katt.CONFIGS["vs"][128][:6]
    # correctness of the variant at 16K on scattered slashes
    q, k, v = random_qkv(1, HQ, HKV, 16384, D, dev, gen, torch.bfloat16)
    sl2 = torch.randint(-1, 16384, (1, HQ, 3000), device=dev, generator=gen)
    v2 = torch.randint(-1, 16384, (1, HQ, 500), device=dev, generator=gen)
    ref = ops.vertical_slash_attention(q, k, v, v2, sl2, backend="reference")
    for hs in (1, 2):
        out = kernels.vertical_slash_attention(q, k, v, v2, sl2, scale, config=base + (hs,))
        log(f"holey check stages={hs} rel_err {rel(out, ref):.2e} nan {bool(torch.isnan(out).any())}")
    del q, k, v, ref, out
    q, k, v = random_qkv(1, HQ, HKV, n, D, dev, gen, torch.bfloat16)
    dense = bench(dense_fns(q, k, v)["cudnn"], budget_s=0.5)
    log(f"holey dense cudnn {dense:.2f} ms")
    for case in ("structured", "random"):
        if case == "structured":
            q, k = structured_qk(1, n, dev, gen)
        else:
            q, k, _ = random_qkv(1, HQ, HKV, n, D, dev, gen, torch.bfloat16)
        vi, si = vs_estimate(q, k, NV, NS)
        for hs in (1, 2):
            t = bench(lambda: kernels.vertical_slash_attention(q, k, v, vi, si, scale, config=base + (hs,)),
                      budget_s=0.5, min_reps=2)
            rows.append({"pattern": f"vs-{case}", "config": base + (hs,), "ms": t, "dense_ms": dense})
            log(f"holey {case:10s} holey_stages={hs} {t:9.2f} ms  {dense / t:.2f}x")
    return rows


def variants(dev, gen, log, sizes=(131072, 524288), combos=None, only=None):
    """Kernel variants (katt.FLAGS: KERNEL = kernel file, ORDER = program order, TMA = key
    tiles through tensor descriptors), each checked at 16K against the float32 reference, then
    timed on A-shape, realistic vertical-slash and block-sparse, vertical-slash on keys laid out
    [B, N, Hkv, D] and vertical-slash on indices estimated from structured q/k (bands with
    holes; estimation not timed)."""
    rows = []
    scale = D ** -0.5
    defaults = {k: katt.FLAGS[k] for c in (combos or []) for k in (c[3] if len(c) > 3 else {})}
    combos = combos or [("_attn_kernel.py", 0, 0), ("_attn_kernel.py", 1, 0), ("_attn_kernel.py", 1, 1),
                        ("_attn_kernel.py", 1, 2)]
    q, k, v = random_qkv(1, HQ, HKV, 16384, D, dev, gen, torch.bfloat16)
    vert, sl = realistic_vs(1, HQ, 16384, dev, gen)
    bi = realistic_blocks(1, HQ, 16384, dev, gen)
    refs = {"vs": ops.vertical_slash_attention(q, k, v, vert, sl, backend="reference"),
            "bs": ops.block_sparse_attention(q, k, v, bi, BS, backend="reference"),
            "ashape": ops.ashape_attention(q, k, v, SINK, WINDOW, backend="reference")}
    knc16, vnc16 = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    failed = []
    for combo in combos:
        kern, order, tma, *extra = combo
        katt.FLAGS.update(KERNEL=kern, ORDER=order, TMA=tma, **(extra[0] if extra else {}))
        try:
            outs = {"vs": kernels.vertical_slash_attention(q, k, v, vert, sl, scale),
                    "bs": kernels.block_sparse_attention(q, k, v, bi, BS, scale),
                    "ashape": kernels.ashape_attention(q, k, v, SINK, WINDOW, scale)}
        except Exception as e:  # a variant that does not compile or run is logged and left out
            log(f"variant check {kern} {extra} failed: {type(e).__name__}: {str(e)[:600]}")
            failed.append(combo)
            continue
        if tma != 1:
            outs["vs-nc"] = kernels.vertical_slash_attention(q, knc16, vnc16, vert, sl, scale)
        refs["vs-nc"] = refs["vs"]
        for name, o in outs.items():
            log(f"variant check {kern} order={order} tma={tma} {extra} {name}: rel err {rel(o, refs[name]):.2e} "
                f"nan {bool(torch.isnan(o).any())}")
    combos = [c for c in combos if c not in failed]
    del q, k, v, refs, knc16, vnc16
    for n in sizes:
        torch.cuda.empty_cache()
        q, k, v = random_qkv(1, HQ, HKV, n, D, dev, gen, torch.bfloat16)
        dense = bench(dense_fns(q, k, v)["cudnn"], budget_s=0.5, min_reps=2)
        log(f"variant N={n} dense cudnn {dense:.2f} ms")
        vert, sl = realistic_vs(1, HQ, n, dev, gen)
        bi = realistic_blocks(1, HQ, n, dev, gen)
        knc = k.transpose(1, 2).contiguous().transpose(1, 2)
        vnc = v.transpose(1, 2).contiguous().transpose(1, 2)
        vi = si = None
        if vs_estimate is not None:
            qs, ks = structured_qk(1, n, dev, gen)
            vi, si = vs_estimate(qs, ks, NV, NS)
            del qs, ks
        cases = {"ashape": lambda: kernels.ashape_attention(q, k, v, SINK, WINDOW, scale),
                 "vs": lambda: kernels.vertical_slash_attention(q, k, v, vert, sl, scale),
                 "bs": lambda: kernels.block_sparse_attention(q, k, v, bi, BS, scale),
                 "vs-nc": lambda: kernels.vertical_slash_attention(q, knc, vnc, vert, sl, scale),
                 "vs-structured": lambda: kernels.vertical_slash_attention(q, k, v, vi, si, scale)}
        for kern, order, tma, *extra in combos:
            katt.FLAGS.update(KERNEL=kern, ORDER=order, TMA=tma, **(extra[0] if extra else {}))
            for name, fn in cases.items():
                if (name == "vs-nc" and tma == 1) or (name == "vs-structured" and vi is None) or (
                        only and name not in only):
                    continue
                try:
                    t = bench(fn, budget_s=0.4)
                except Exception as e:
                    t = float("nan")
                    log(f"variant {name} failed: {type(e).__name__}: {str(e)[:300]}")
                rows.append({"N": n, "pattern": name, "kernel": kern, "order": order, "tma": tma, "config": None,
                             "flags": extra[0] if extra else {}, "ms": t, "dense_ms": dense})
                log(f"variant N={n} {name:13s} {kern} order={order} tma={tma} {extra} {t:8.2f} ms {dense / t:6.2f}x")
        del q, k, v, vert, sl, bi, knc, vnc, vi, si
    katt.FLAGS.update(KERNEL="_attn_kernel.py", ORDER=1, TMA="auto", **defaults)
    return rows


def vs_parts(dev, gen, log, sizes, rounds: int = 1, old: bool = False):
    """Time the parts of one vertical-slash call (realistic indices, default config): the index
    construction (graphed), the band launch, the second launch (merge included) and that launch
    without its columns / without its runs / without both (its per-program work alone) / without
    the merge / with its edges visited as unmasked tiles (timing only: those outputs are not the
    attention), and the whole call; with rounds > 1 every part once per round, alternating
    (`alternate`), the median kept. old: also the parts of sessions 25-26's experiments (the
    column pass over 128-row blocks, the band launch with its columns) and of session 28's (the second
    launch on 128-row blocks with two consumer warpgroups)."""
    import dataclasses

    from sparseinfer import index as sidx
    from sparseinfer.kernels import graphed

    rows = []
    scale = D ** -0.5
    bm, bn, *rest = katt._config("vs", D, dev)
    band_cfg = katt._config("ashape", D, dev)
    for n in sizes:
        torch.cuda.empty_cache()
        q, k, v = random_qkv(1, HQ, HKV, n, D, dev, gen, torch.bfloat16)
        dense = bench(dense_fns(q, k, v)["cudnn"], budget_s=0.5, min_reps=2)
        vert, sl = realistic_vs(1, HQ, n, dev, gen)

        from sparseinfer.kernels import gluon as kg

        # as the library builds it (narrow edges in a list of their own where the Gluon kernel runs it)
        narrow = kg.vs_narrow(q, k, v, bm, bn) if katt.FLAGS["GLUON"] and katt.FLAGS["GLUON_VS"] else 0

        def build(vi, si, fused=bool(katt.FLAGS["VS_RUNS_KERNEL"])):
            return sidx.from_vertical_slash(vi, si, n, bm, block_n=bn, band_block_m=band_cfg[0],
                                            band_min=katt.VS_BAND_MIN, max_tiled=katt.FLAGS["VS_TILED_RUNS"] or None,
                                            fused_runs=fused, narrow_n=narrow)

        idx, band = build(vert, sl)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=dev)
        katt.run_index(q, k, v, band, scale, band_cfg[1], *band_cfg[2:], out=out, lse_out=lse)
        prior = (out.clone(), lse, band.range_count[..., 0])
        zero = torch.zeros_like(idx.tile_count)
        no_cols = dataclasses.replace(idx, columns=None, column_count=None)
        no_runs = dataclasses.replace(idx, tile_count=zero, edge_count=zero, range_count=torch.zeros_like(idx.range_count),
                                      edge_count_narrow=None if idx.edge_count_narrow is None else zero)
        fixed = dataclasses.replace(no_runs, columns=None, column_count=None)
        # the edges' key starts as unmasked relative tiles (the same K / V tiles, no mask): what the
        # edge masks cost (the narrow edges stay masked narrow tiles)
        both = torch.sort(torch.cat([idx.tiles[:, :, 0], idx.edges[..., 0]], -1), -1, descending=True)[0]
        as_tiles = dataclasses.replace(idx, tiles=both[:, :, None].contiguous(), tile_count=idx.tile_count + idx.edge_count,
                                       edge_count=zero)
        # (old) the second launch over 128-row query blocks: two consumer warpgroups sharing every K / V tile
        # (each visits the union of the two halves' tiles, masked for its rows): fewer loads, more cells;
        # slower (session 28, results/vs_parts_s28b.md)
        two_ok = old and katt.FLAGS["GLUON"] and kg.band_reason(q, k, v, band_cfg[0], band_cfg[1]) is None
        if two_ok:
            idx2x, _ = sidx.from_vertical_slash(vert, sl, n, 128, block_n=bn, band_block_m=band_cfg[0],
                                                band_min=katt.VS_BAND_MIN, max_tiled=katt.FLAGS["VS_TILED_RUNS"] or None,
                                                fused_runs=bool(katt.FLAGS["VS_RUNS_KERNEL"]))
            pre2x = katt.column_inputs(q, k, v, idx2x)
            ref = katt.run_index(q, k, v, idx, scale, bn, *rest, out=prior[0].clone(), prior=(prior[0].clone(), *prior[1:]))

            def two_fn(stages, regs=240):
                def f(o=None):
                    o = prior[0].clone() if o is None else o
                    return kg.run(q, k, v, idx2x, scale, stages=stages, num_warps=4, maxnreg=168, two=True, overlap=2,
                                  consumer_regs=regs, block_n=bn, out=o, prior=(o, *prior[1:]), col_inputs=pre2x,
                                  check=False)
                return f
            for st in (3, 4):
                got = two_fn(st)()
                log(f"parts N={n}: 128-row second launch, {st} stages: rel. diff to the 64-row one "
                    f"{((got.float() - ref.float()).norm() / ref.float().norm()).item():.2e}, nan {bool(got.isnan().any())}")
            per = {"tiles": idx2x.tile_count.float().mean().item(), "edges": idx2x.edge_count.float().mean().item(),
                   "column tiles": ((idx2x.column_count + bn - 1) // bn).float().mean().item()}
            log(f"parts N={n}: per 128-row block " + ", ".join(f"{k_} {v_:.1f}" for k_, v_ in per.items()))
            out2 = prior[0].clone()
        # the column pass alone over 128-row query blocks (8 warps; a launch of its own would need it):
        # what moving the columns out of the 64-row second launch could save
        idx128, _ = sidx.from_vertical_slash(vert, sl, n, 128, block_n=bn, band_block_m=band_cfg[0],
                                              band_min=katt.VS_BAND_MIN)
        zero128 = torch.zeros_like(idx128.tile_count)
        cols128 = dataclasses.replace(idx128, tile_count=zero128, edge_count=zero128,
                                      range_count=torch.zeros_like(idx128.range_count))
        parts = {
            "index (graphed)": lambda: graphed.build_graphed(("parts", n), build, (vert, sl)),
            "index (eager)": lambda: build(vert, sl),
            # the runs steps in torch ops / in one launch (FLAGS["VS_RUNS_KERNEL"], kernels.runs)
            "index, torch runs (graphed)": lambda: graphed.build_graphed(
                ("parts_t", n), lambda a, c: build(a, c, False), (vert, sl)),
            "index, fused runs (graphed)": lambda: graphed.build_graphed(
                ("parts_f", n), lambda a, c: build(a, c, True), (vert, sl)),
            "band launch": lambda: katt.run_index(q, k, v, band, scale, band_cfg[1], *band_cfg[2:], out=out, lse_out=lse),
            "second launch": lambda: katt.run_index(q, k, v, idx, scale, bn, *rest, out=out, prior=prior),
            "second, no merge": lambda: katt.run_index(q, k, v, idx, scale, bn, *rest, out=out),
            "second, no columns": lambda: katt.run_index(q, k, v, no_cols, scale, bn, *rest, out=out, prior=prior),
            "second, no runs": lambda: katt.run_index(q, k, v, no_runs, scale, bn, *rest, out=out, prior=prior),
            "second, neither": lambda: katt.run_index(q, k, v, fixed, scale, bn, *rest, out=out, prior=prior),
            "second, edges unmasked": lambda: katt.run_index(q, k, v, as_tiles, scale, bn, *rest, out=out, prior=prior),
            **({"second, 128 rows, 3 st": lambda: two_fn(3)(out2), "second, 128 rows, 4 st": lambda: two_fn(4)(out2)}
               if two_ok else {}),
            "whole call": lambda: kernels.vertical_slash_attention(q, k, v, vert, sl, scale),
        }
        if old:
            parts.update({
                "columns, 128 rows": lambda: katt.run_index(q, k, v, cols128, scale, bn, 8, 3, 3, 4, 2, out=out),
                "columns, 128 rows, 2 st": lambda: katt.run_index(q, k, v, cols128, scale, bn, 8, 3, 2, 4, 2, out=out),
                "columns, 64 rows": lambda: katt.run_index(q, k, v, no_runs, scale, bn, *rest, out=out),
            })
        # the band launch with the columns of its heads (FLAGS["VS_BAND_COLS"], Gluon kernel)
        if old and katt.FLAGS["GLUON"] and kg.band_reason(q, k, v, band_cfg[0], band_cfg[1]) is None:
            def build_bc(vi, si):
                return sidx.from_vertical_slash(vi, si, n, bm, block_n=bn, band_block_m=band_cfg[0],
                                                band_min=katt.VS_BAND_MIN, band_columns=True)

            idx2, band2 = build_bc(vert, sl)
            pre = katt.column_inputs(q, k, v, band2)
            katt.run_index(q, k, v, band2, scale, band_cfg[1], *band_cfg[2:], out=out, lse_out=lse)
            prior2 = (out.clone(), lse.clone(), band2.range_count[..., 0])
            gcfg = kg.CONFIGS["ranges"]
            no_cc = dataclasses.replace(band2, column_count=torch.zeros_like(band2.column_count))
            diag = band2.ranges.clone()
            diag[..., 3] = 0
            diag_only = dataclasses.replace(band2, ranges=diag)

            def whole(flag):
                def f():
                    prev, katt.FLAGS["VS_BAND_COLS"] = katt.FLAGS["VS_BAND_COLS"], flag
                    try:
                        return kernels.vertical_slash_attention(q, k, v, vert, sl, scale)
                    finally:
                        katt.FLAGS["VS_BAND_COLS"] = prev
                return f

            parts.update({
                "bc: band index (graphed)": lambda: graphed.build_graphed(
                    ("parts_b", n), lambda si: sidx.band_index(si, n, band_cfg[0], katt.VS_BAND_MIN), (sl,)),
                "bc: band index + columns (graphed)": lambda: graphed.build_graphed(
                    ("parts_bc", n), lambda vi, si: sidx.band_index(si, n, band_cfg[0], katt.VS_BAND_MIN, vertical_idx=vi),
                    (vert, sl)),
                "bc: column inputs (gathers, words)": lambda: katt.column_inputs(q, k, v, band2),
                "bc: band + columns launch, kernel": lambda: kg.run(q, k, v, band2, scale, out=out, lse_out=lse,
                                                                    block_n=band_cfg[1], col_inputs=pre, **gcfg),
                "bc: band + columns launch": lambda: katt.run_index(q, k, v, band2, scale, band_cfg[1], *band_cfg[2:],
                                                                    out=out, lse_out=lse),
                "bc: second launch": lambda: katt.run_index(q, k, v, idx2, scale, bn, *rest, out=out, prior=prior2),
                # where the column pass's time goes (timing only): the band part of the kernel with columns
                # (counts 0), the columns with the diagonal only (session 25 also timed them without the
                # skip bits: results/vs_parts_cols3.md)
                "bc: kernel, column counts 0": lambda: kg.run(q, k, v, no_cc, scale, out=out, lse_out=lse,
                                                              block_n=band_cfg[1], col_inputs=pre, **gcfg),
                "bc: kernel, columns + diagonal": lambda: kg.run(q, k, v, diag_only, scale, out=out, lse_out=lse,
                                                                 block_n=band_cfg[1], col_inputs=pre, **gcfg),
                "bc: whole call": whole(True),
                "bc: whole call, columns in the second launch": whole(False),
            })
        tiles = {"tiles": int(idx.tile_count.sum()), "edges": int(idx.edge_count.sum()),
                 "narrow edges": 0 if idx.edge_count_narrow is None else int(idx.edge_count_narrow.sum()),
                 "column tiles": int(((idx.column_count + bn - 1) // bn).sum()), "query blocks": idx.tile_count.numel()}
        log(f"parts N={n}: dense cudnn {dense:.2f} ms; per query block: " +
            ", ".join(f"{k} {v / tiles['query blocks']:.1f}" for k, v in tiles.items() if k != "query blocks"))
        times = alternate(parts, rounds, 0.4, log, f"parts N={n}") if rounds > 1 else None
        for name, fn in parts.items():
            t = statistics.median(times[name]) if times else bench(fn, budget_s=0.4)
            rows.append({"N": n, "pattern": "vs-parts", "variant": name, "ms": t, "dense_ms": dense, **tiles,
                         **({"rounds_ms": times[name]} if times else {})})
            log(f"parts N={n} {name:20s} {t:8.2f} ms" + (f"  ({' / '.join(f'{x:.2f}' for x in times[name])})"
                                                        if times else ""))
        del q, k, v, vert, sl, idx, band, out, lse, prior, no_cols, no_runs, fixed, as_tiles, idx128, cols128, parts
    return rows


def apply_best(tune_rows, log):
    """Set the kernel configs (head_dim 128) to the fastest measured ones (vertical-slash: the
    least total time over the realistic and the structured estimated indices)."""
    for pat in ("vs", "ashape", "blocks"):
        ok = [r for r in tune_rows if r["pattern"] == pat and r["ms"] == r["ms"]]
        if pat == "vs":
            other = {tuple(r["config"]): r["ms"] for r in tune_rows if r["pattern"] == "vs-structured"}
            ok = [dict(r, ms=r["ms"] + other.get(tuple(r["config"]), 0.0)) for r in ok]
        if ok:
            best = min(ok, key=lambda r: r["ms"])["config"]
            cur = katt.CONFIGS[pat][128]
            katt.CONFIGS[pat][128] = tuple(best) + tuple(cur[len(best):])
            log(f"config {pat}: {katt.CONFIGS[pat][128]}")


def flex_block_sparse_time(q, k, v, bi, n, log):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from sparseinfer.index import _sorted_unique

    b, h, nb, kk = bi.shape
    dev = q.device
    qb = torch.arange(nb, device=dev).view(1, 1, nb, 1)
    big = nb + 1
    idx = torch.where((bi >= 0) & (bi < qb), bi, big)
    s = _sorted_unique(idx, big)
    full_num = (s < big).sum(-1).to(torch.int32)
    full_idx = torch.where(s < big, s, 0).to(torch.int32)
    diag_listed = (bi == qb).any(-1)  # [b, h, nb]
    kv_num = torch.ones(b, h, nb, dtype=torch.int32, device=dev)
    kv_idx = qb.expand(b, h, nb, 1).to(torch.int32).contiguous()

    def mask_mod(bb, hh, qi, ki):
        return (qi >= ki) & ((qi == ki) | diag_listed[bb, hh, qi // BS])

    try:
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BS, mask_mod=mask_mod,
                                      seq_lengths=(n, n), compute_q_blocks=False)
    except TypeError:  # older torch: indices must span all KV blocks
        pad = lambda t: torch.nn.functional.pad(t, (0, nb - t.shape[-1]))  # noqa: E731
        bm = BlockMask.from_kv_blocks(kv_num, pad(kv_idx), full_num, pad(full_idx), BLOCK_SIZE=BS,
                                      mask_mod=mask_mod, seq_lengths=(n, n))
    fa = torch.compile(flex_attention, dynamic=False)
    opts = [None, {"BLOCK_M": 64, "BLOCK_N": 64}]
    out = None
    for o in opts:
        def f():
            return fa(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=o)
        try:
            t0 = time.time()
            out = f()
            torch.cuda.synchronize()
            log(f"flex kernel_options={o} compile+first {time.time() - t0:.1f} s")
            break
        except Exception as e:
            log(f"flex kernel_options={o} failed: {type(e).__name__}: {str(e)[:300]}")
    if out is None:
        raise RuntimeError("flex attention did not run")
    # exactness on a sample of rows vs our kernel
    ours = kernels.block_sparse_attention(q, k, v, bi, BS, D ** -0.5)
    log(f"flex vs kernel rel diff {rel(out, ours):.2e}")
    t = bench(f, budget_s=0.5)
    log(f"tune blocks-flex {t:8.2f} ms")
    return t


# ---------------------------------------------------------------- main table
def run_sizes(sizes, dev, gen, log, save=None, max_random_n=262144):
    rows = []
    scale = D ** -0.5
    for n in sizes:
        try:
            torch.cuda.empty_cache()
            q, k, v = random_qkv(1, HQ, HKV, n, D, dev, gen, torch.bfloat16)
        except torch.OutOfMemoryError:
            log(f"N={n}: out of memory allocating q/k/v, skipped")
            continue
        budget = 0.8
        dense = {}
        for name, fn in dense_fns(q, k, v).items():
            try:
                dense[name] = bench(fn, budget_s=1.0, max_reps=10, min_reps=3 if n < 524288 else 2)
            except Exception as e:
                log(f"N={n} dense {name} failed: {type(e).__name__}: {str(e)[:200]}")
        if not dense:
            continue
        dms = min(dense.values())
        log(f"N={n} dense cudnn {dense.get('cudnn', float('nan')):.2f} ms, flash {dense.get('flash', float('nan')):.2f} ms")

        def add(case, variant, ms, density):
            ratio = dms / ms if ms == ms else float("nan")
            r = {"N": n, "case": case, "variant": variant, "ms": ms, "dense_ms": dms, "ratio": ratio,
                 "density": density, "pct_limit": 100 * ratio * density if density else None}
            r.update(nominal_cols(r))
            rows.append(r)
            dstr = f"{100 * density:6.2f}%" if density else "     -"
            pl = f"{r['pct_limit']:5.0f}%" if density else "    -"
            log(f"N={n:7d} {case:11s} {variant:26s} {ms:9.2f} ms {ratio:7.2f}x density {dstr} limit {pl} "
                f"(nominal {r['pct_limit_nominal']:4.0f}%)")

        add("dense", "cudnn", dense.get("cudnn", float("nan")), 1.0)
        add("dense", "flash", dense.get("flash", float("nan")), 1.0)

        def timed(fn):
            try:
                return bench(fn, budget_s=budget)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                return float("nan")

        # A-shape
        add("-", "ashape 128+4096", timed(lambda: kernels.ashape_attention(q, k, v, SINK, WINDOW, scale)),
            ashape_density(n, SINK, WINDOW))
        # (a) realistic indices
        vert, sl = realistic_vs(1, HQ, n, dev, gen)
        dens = float(vertical_slash_density(n, vert, sl).mean()) if vertical_slash_density else None
        add("realistic", "vertical-slash", timed(lambda: kernels.vertical_slash_attention(q, k, v, vert, sl, scale)), dens)
        bi = realistic_blocks(1, HQ, n, dev, gen)
        dens = float(block_sparse_density(n, bi, BS).mean()) if block_sparse_density else None
        add("realistic", "block-sparse top100", timed(lambda: kernels.block_sparse_attention(q, k, v, bi, BS, scale)), dens)
        del vert, sl, bi
        # (b) structured and (c) random q/k through the estimators
        for case in ("structured", "random"):
            if case == "random" and n > max_random_n:
                log(f"N={n} random q/k: skipped (device time; see smaller N)")
                continue
            if case == "structured":
                del q, k
                q, k = structured_qk(1, n, dev, gen)
            else:
                q, k, _ = random_qkv(1, HQ, HKV, n, D, dev, gen, torch.bfloat16)
            if vs_estimate is not None:
                try:
                    vi, si = vs_estimate(q, k, NV, NS)
                    dens = float(vertical_slash_density(n, vi, si).mean())
                    if case == "structured":
                        near = float((si < 4096).float().mean())
                        log(f"N={n} structured: share of estimated slash offsets < 4096: {100 * near:.1f}%")
                    add(case, "vertical-slash",
                        timed(lambda: kernels.vertical_slash_attention(q, k, v, vi, si, scale)), dens)
                    add(case, "vertical-slash +est", timed(
                        lambda: kernels.vertical_slash_attention(q, k, v, *vs_estimate(q, k, NV, NS), scale)), dens)
                    del vi, si
                except torch.OutOfMemoryError:
                    log(f"N={n} {case} vertical-slash: out of memory, skipped")
                torch.cuda.empty_cache()
            if bs_estimate is not None:
                try:
                    bi = bs_estimate(q, k, TOPK, BS)
                    dens = float(block_sparse_density(n, bi, BS).mean())
                    add(case, "block-sparse top100", timed(lambda: kernels.block_sparse_attention(q, k, v, bi, BS, scale)), dens)
                    add(case, "block-sparse top100 +est", timed(
                        lambda: kernels.block_sparse_attention(q, k, v, bs_estimate(q, k, TOPK, BS), BS, scale)), dens)
                    del bi
                except torch.OutOfMemoryError:
                    log(f"N={n} {case} block-sparse: out of memory, skipped")
                torch.cuda.empty_cache()
        del q, k, v
        torch.cuda.empty_cache()
        if save:
            save(rows)
    return rows


def nominal_cols(r):
    """Issue 3's density limit for a table row: nominal density and % of that limit."""
    d = nominal_density(r["N"], r["variant"])
    return {"density_nominal": d, "pct_limit_nominal": 100 * r["ratio"] * d}


# MInference's own kernels on the same layer and card (issue 3 / shared/anchors.md; ratio vs cuDNN) and
# issue 3's targets, drawn next to the measured rows
MINFERENCE = {"ashape": {32768: 1.97, 131072: 8.2, 262144: 16.9, 524288: 39.7},
              "vertical-slash": {32768: 1.31, 131072: 5.7, 262144: 11.8, 524288: 24.5},
              "block-sparse": {32768: 1.39, 131072: 5.3, 262144: 10.0, 524288: 17.3}}
TARGETS = {"ashape": {131072: 13, 524288: 50}, "vertical-slash": {131072: 7.5, 262144: 15, 524288: 30},
           "block-sparse": {131072: 8.5, 524288: 30}}
PLOTTED = [  # (case, variant) of the table, pattern, line style, label
    ("-", "ashape 128+4096", "ashape", "-", "A-shape 128 + 4096"),
    ("realistic", "vertical-slash", "vertical-slash", "-", "vertical-slash, realistic indices"),
    ("structured", "vertical-slash +est", "vertical-slash", "--", "vertical-slash, structured q/k + estimation"),
    ("random", "vertical-slash +est", "vertical-slash", ":", "vertical-slash, i.i.d. random q/k + estimation"),
    ("realistic", "block-sparse top100", "block-sparse", "-", "block-sparse top-100, realistic indices"),
    ("structured", "block-sparse top100 +est", "block-sparse", "--", "block-sparse, structured q/k + estimation"),
]


def plot(meta, rows, path):
    """PNG of the table: speedup over cuDNN dense and % of the density limit against N, per
    pattern and input, with MInference's kernels and issue 3's targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ashape": "tab:blue", "vertical-slash": "tab:orange", "block-sparse": "tab:green"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for case, variant, pat, style, label in PLOTTED:
        pts = sorted((r["N"], r["ratio"], r["pct_limit"]) for r in rows
                     if r["case"] == case and r["variant"] == variant and r["ms"] == r["ms"])
        if pts:
            ns, ratios, pcts = zip(*pts)
            ax.plot(ns, ratios, style, marker="o", color=colors[pat], label=label)
            ax2.plot(ns, pcts, style, marker="o", color=colors[pat], label=label)
    sizes = {r["N"] for r in rows}
    for pat, pts in MINFERENCE.items():  # at the run's lengths only
        ns = sorted(n for n in pts if n in sizes)
        ax.plot(ns, [pts[n] for n in ns], "-.", marker="x", color=colors[pat], alpha=0.5, lw=1,
                label=f"MInference's {pat} kernel")
    for pat, pts in TARGETS.items():
        ns = sorted(n for n in pts if n in sizes)
        ax.scatter(ns, [pts[n] for n in ns], marker="*", s=140, facecolors="none",
                   edgecolors=colors[pat], label=f"target, {pat}")
    ax.axhline(1.0, color="gray", lw=0.8)
    for a_ in (ax, ax2):
        a_.set_xscale("log", base=2)
        ns = sorted({r["N"] for r in rows})
        a_.set_xticks(ns, [f"{n // 1024}K" for n in ns])
        a_.set_xlabel("sequence length N")
        a_.grid(alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("speedup over cuDNN SDPA (same run)")
    ax2.set_ylabel("% of the density limit (speedup x density)")
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"One Llama-3-8B layer (32 / 8 heads, D 128, bf16, causal), {meta['device']}, {meta['date']}; "
                 f"torch {meta['torch']}, triton {meta['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def limit_section(rows):
    """MInference's kernels (issue 3's ratios) and this run's realistic rows against both density
    limits: issue 3's "61-68%" (vertical-slash) and "43-53%" (block-sparse) reproduce with the
    nominal densities only."""
    pats = [("ashape", "-", "ashape 128+4096"), ("vertical-slash", "realistic", "vertical-slash"),
            ("block-sparse", "realistic", "block-sparse top100")]
    out = ["## The density limit, two ways (realistic indices)", "",
           "Issue 3 puts MInference's kernels at 61-68% (vertical-slash) and 43-53% (block-sparse) of the density "
           "limit. Its ratios (128K-512K) give those shares against the nominal densities; against the cells "
           "kept, vertical-slash's are ~14 points lower (48-52%). Its vertical-slash targets (7.5x / 15x / 30x, "
           "\"(>= 85% of the density limit)\") are 81% of the nominal limit; the anchors it was written from "
           "(shared/anchors.md) give the limit as ~9.2x / ~18.5x / ~37x at 128K / 256K / 512K (density ~10.8% / 5.4% / "
           "2.7%), the nominal one.", "",
           "| N | pattern | MInference ratio | % of limit (cells) | % of limit (nominal) | ours | % of limit (cells) "
           "| % of limit (nominal) |", "|---|---|---|---|---|---|---|---|"]
    for n in sorted({r["N"] for r in rows}):
        for pat, case, variant in pats:
            r = next((x for x in rows if x["N"] == n and x["case"] == case and x["variant"] == variant
                      and x["density"]), None)
            m = MINFERENCE[pat].get(n)
            if r is None or m is None:
                continue
            out.append(f"| {n // 1024}K | {pat} | {m:.2f}x | {100 * m * r['density']:.0f}% | "
                       f"{100 * m * r['density_nominal']:.0f}% | {r['ratio']:.2f}x | {r['pct_limit']:.0f}% | "
                       f"{r['pct_limit_nominal']:.0f}% |")
    return out + [""]


def markdown(meta, checks, rows, tune_rows):
    out = [f"# Sparse attention vs dense, {meta['device']}", "",
           f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}; "
           "B=1, 32 q heads / 8 KV heads, D=128, bf16, causal. ms = median (CUDA events); ratio vs the "
           "faster dense SDPA backend in the same run; % limit = ratio x density. sparseinfer rows include "
           "index construction; '+est' rows include estimation.", ""]
    if checks:
        out += ["## Check vs float32 reference", "", "| case | rel err | NaN | ok |", "|---|---|---|---|"]
        out += [f"| {c['case']} | {c['rel_err']:.2e} | {c['nan']} | {c['ok']} |" for c in checks]
        out.append("")
    if rows:
        rows = [{**r, **nominal_cols(r)} for r in rows]  # results written before the nominal columns
        out += ["## Timings", "",
                "density = the causal (q, k) cells kept; nominal = the keys a row nominally keeps (sink + window, "
                "verticals + slashes, top-k x 64) / (N / 2), the count issue 3's density limit is taken from "
                "(see the last section).", "",
                "| N | inputs | variant | ms | ratio | density | % of limit (cells) | nominal | % of limit (nominal) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            d = f"{100 * r['density']:.2f}%" if r["density"] else "-"
            p = f"{r['pct_limit']:.0f}%" if r["pct_limit"] else "-"
            out.append(f"| {r['N'] // 1024}K | {r['case']} | {r['variant']} | {r['ms']:.2f} | {r['ratio']:.2f}x | {d} | {p} "
                       f"| {100 * r['density_nominal']:.2f}% | {r['pct_limit_nominal']:.0f}% |")
        out.append("")
        out += limit_section(rows)
    if tune_rows and "order" in tune_rows[0]:  # --variants
        out += ["## Kernel variants (program order, TMA key loads; ratio vs cuDNN dense in the same run)", "",
                "| N | pattern | variant | config | ms | ratio |", "|---|---|---|---|---|---|"]
        for r in tune_rows:
            var = (f"{r['kernel']}, " if "kernel" in r else "") + f"order {r['order']}, tma {r['tma']}" + (
                f", fma {int(r['fma'])}" if "fma" in r else "") + "".join(f", {k} {v}" for k, v in r.get("flags", {}).items())
            out.append(f"| {r['N'] // 1024}K | {r['pattern']} | {var} | {r['config'] or 'default'} | {r['ms']:.2f} | "
                       f"{r['dense_ms'] / r['ms']:.2f}x |")
    elif tune_rows and tune_rows[0].get("pattern") == "vs-parts":
        out += ["## Parts of a vertical-slash call (realistic indices; per query block: relative tiles, edge tiles, "
                "column tiles)", "", "| N | part | ms | share of the whole call | tiles / edges / column tiles per block |",
                "|---|---|---|---|---|"]
        for r in tune_rows:
            whole = next(x["ms"] for x in tune_rows if x["N"] == r["N"] and x["variant"] == "whole call")
            qb = r["query blocks"]
            out.append(f"| {r['N'] // 1024}K | {r['variant']} | {r['ms']:.2f} | {100 * r['ms'] / whole:.0f}% | "
                       f"{r['tiles'] / qb:.1f} / {r['edges'] / qb:.1f}"
                       + (f" + {r['narrow edges'] / qb:.1f} narrow" if r.get("narrow edges") else "")
                       + f" / {r['column tiles'] / qb:.1f} |")
    elif tune_rows:
        out += ["## Config sweep (128K)", "", "| pattern | (block_m, block_n, warps, stages) | ms |", "|---|---|---|"]
        out += [f"| {r['pattern']} | {r['config']} | {r['ms']:.2f} |" for r in tune_rows]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32768,65536,131072,262144,524288")
    ap.add_argument("--tune", action="store_true", help="config sweep at 128K instead of the table")
    ap.add_argument("--autotune", action="store_true", help="config sweep at 128K, then the table with the best")
    ap.add_argument("--tune-size", type=int, default=131072, help="the length --tune sweeps at")
    ap.add_argument("--flex", action="store_true", help="also time FlexAttention block-sparse in the sweep")
    ap.add_argument("--holey", action="store_true", help="only: bands with holes, 1 vs 2 pipeline stages, 128K")
    ap.add_argument("--variants", action="store_true", help="only: kernel variants (katt.FLAGS), 128K + 512K")
    ap.add_argument("--ab", default=None, help="with --variants: compare kernel files, e.g. '_attn_kernel_prev.py,_attn_kernel.py'")
    ap.add_argument("--flag-ab", default=None,
                    help="with --variants: katt.FLAGS changes, the defaults vs each (a boolean name flips it, "
                         "NAME=int sets it, 'A+B' both), twice, e.g. VS_BAND,VS_OVERLAP,PF_MAX_N=1048576+PF_DEPTH=2")
    ap.add_argument("--vs-parts", action="store_true",
                    help="only: the parts of a vertical-slash call on realistic indices (index, band launch, second "
                         "launch with / without columns, runs, merge), timed apart")
    ap.add_argument("--rounds", type=int, default=1, help="with --vs-parts: alternating rounds (median kept)")
    ap.add_argument("--parts-old", action="store_true",
                    help="with --vs-parts: also the parts of rejected experiments (sessions 25-26: columns over "
                         "128-row blocks, band + columns; session 28: the second launch on 128-row blocks)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--tag", default="attention")
    ap.add_argument("--bs-configs", default=None,
                    help="with --tune: only these block-sparse (block size: config) pairs, e.g. "
                         "'64:64,64,4,3,1,0;128:128,128,8,3,1,0' (128: lists keeping ~60%% of the blocks)")
    ap.add_argument("--vs-configs", default=None,
                    help="with --tune: only these vertical-slash configs, e.g. '64,64,4,3,3,4,2;64,64,8,3,3,4,2'")
    ap.add_argument("--cases", default=None, help="with --variants: only these cases, e.g. 'vs,vs-structured'")
    ap.add_argument("--flags", default=None,
                    help="katt.FLAGS entries set before anything runs, e.g. 'VS_COL_TMA=1,VS_OVERLAP=0' (integers)")
    ap.add_argument("--plot", default=None, metavar="JSON",
                    help="only: redraw the table's PNG and markdown from a results JSON (next to it; no GPU needed)")
    args = ap.parse_args()
    if args.plot:
        with open(args.plot) as f:
            res = json.load(f)
        if not res.get("rows") or "case" not in res["rows"][0]:
            raise SystemExit(f"--plot: {args.plot} holds no table rows (expected a run of the full table)")
        stem = os.path.splitext(args.plot)[0]
        plot(res["meta"], res["rows"], stem + ".png")
        with open(stem + ".md", "w") as f:
            f.write(markdown(res["meta"], res.get("checks"), res["rows"], res.get("tune")))
        return
    try:
        set_flags(args.flags)
    except ValueError as e:
        raise SystemExit(str(e))
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    meta = {**run_meta(),
            "flags": {k: v for k, v in katt.FLAGS.items()},
            "configs": {k: {str(d): c for d, c in v.items()} for k, v in katt.CONFIGS.items()}}
    lines, log = logger(json.dumps(meta))
    checks, rows, tune_rows = [], [], []

    def save(rows_now=None):
        r = rows_now if rows_now is not None else rows
        meta["configs"] = {k: {str(d): c for d, c in v.items()} for k, v in katt.CONFIGS.items()}
        write_results(args.out, args.tag, {"meta": meta, "checks": checks, "rows": r, "tune": tune_rows},
                      markdown(meta, checks, r, tune_rows), lines)
        if r and "case" in r[0]:  # the table
            plot(meta, r, os.path.join(args.out, f"{args.tag}.png"))

    try:
        if args.holey:
            tune_rows = holey(dev, gen, log)
            return
        if args.vs_parts:
            tune_rows = vs_parts(dev, gen, log, [int(s) for s in args.sizes.split(",") if s], args.rounds,
                                 args.parts_old)
            return
        if args.variants:
            combos = [(f, 1, "auto") for f in args.ab.split(",")] if args.ab else None
            if args.flag_ab:  # katt.FLAGS entries: the defaults, then each set changed; twice
                # "A+B": flip booleans A and B together; "N=int": set N
                sets = [c.split("+") for c in args.flag_ab.split(",")]

                def changed(item):
                    name, _, val = item.partition("=")
                    if name not in katt.FLAGS:
                        raise SystemExit(f"--flag-ab: unknown katt.FLAGS entry {name!r}; known: {sorted(katt.FLAGS)}")
                    return name, (int(val) if val else not katt.FLAGS[name])

                flags = sorted({changed(f)[0] for fs in sets for f in fs})
                one = [{}] + [dict(changed(f) for f in fs) for fs in sets]
                combos = [("_attn_kernel.py", 1, "auto", {**{f: katt.FLAGS[f] for f in flags}, **c})
                          for c in one + one]
            tune_rows = variants(dev, gen, log, [int(s) for s in args.sizes.split(",") if s], combos,
                                 args.cases.split(",") if args.cases else None)
            return
        if args.tune or args.autotune:
            only = ([tuple(int(x) for x in c.split(",")) for c in args.vs_configs.split(";")]
                    if args.vs_configs else None)
            only_bs = ([(int(c.split(":")[0]), tuple(int(x) for x in c.split(":")[1].split(",")))
                        for c in args.bs_configs.split(";")] if args.bs_configs else None)
            tune_rows = tune(dev, gen, log, n=args.tune_size, flex=args.flex, only_vs=only, only_bs=only_bs)
            apply_best(tune_rows, log)
            save()
        if not args.no_check:  # with the configs the table uses
            checks = check(dev, gen, log)
            save()
        if not args.tune:
            rows = run_sizes([int(s) for s in args.sizes.split(",") if s], dev, gen, log, save=save)
    except Exception:
        log(traceback.format_exc())
    finally:
        save()


if __name__ == "__main__":
    main()
