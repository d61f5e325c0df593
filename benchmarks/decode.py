"""Decode speed and KV memory: dense vs Quest / RaaS sparse decoding (issue 7), one GPU call.

(a) Decode attention of one layer alone, Llama-3-8B shapes (32 q / 8 kv heads, head_dim 128,
    bf16), batch 8 (and 1), 128K context: dense SDPA over every token vs
    - quest: page scores over all 128K/16 pages (Quest bound from per-page min/max keys, fp32
      and bf16 bounds) + top-k (L/16 pages, last page forced) + the Triton sparse kernel;
    - raas: the RaaS layer's decode attention (the prompt of 1K tokens kept whole, L + 16
      generated tokens held: score the held pages, refresh timestamps, top-k, two kernel calls,
      merge) and its full per-layer step (cache write + eviction + attention);
    - the kernel alone over L selected pages, and over all pages (its bandwidth on dense work).
    Every function is timed as a CUDA graph of 10 calls (launch overhead out), best of 5.
    Bytes bound: the K/V (and bound) bytes each one must read at 3 TB/s-class bandwidth.
(b) The whole decode step of a Llama-3.1-8B-shaped model (random bf16 weights built from the
    config on the GPU; `--layers` may cut the depth, reported) captured in a CUDA graph:
    dense (transformers StaticCache, SDPA) vs raas (sparseinfer.kv_cache, every layer raas:
    dense_layers=0, since the dense layers of a SparseKVCache grow by concatenation and are not
    capturable), at a 32K context, batch 8. Caches are filled directly with random K/V (a 1K
    prompt, the rest "generated"); nothing is pre-filled or downloaded.
(c) KV memory: bytes each cache holds as the generated length grows (raas: measured on the
    filled SparseKVCache; dense: the KV the context needs), and the allocator's view after
    `--flat-steps` replays of the captured raas step (flat: no growth).

    python benchmarks/decode.py --out benchmarks/results/decode     # H100: ~2-3 minutes
    python benchmarks/decode.py --smoke --out /tmp/decode_smoke       # CPU, tiny shapes, < 1 min
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import sparseinfer  # noqa: E402
from sparseinfer.kernels import decode as kd  # noqa: E402
import contextual as cb  # noqa: E402  (capture)
from sparseinfer.kv.layers import RaaSLayer  # noqa: E402
from sparseinfer.ops.decode import _decode, page_bounds, quest_scores  # noqa: E402

LLAMA_31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
SMOKE_CFG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)
PS = 16


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------- timing


def timed(fn, cuda: bool, inner: int = 10, rounds: int = 5) -> tuple[float, str]:
    """Seconds per call: a CUDA graph of `inner` calls, best of `rounds` replays (eager on a
    CPU, or when capture fails: the second element says which)."""
    if not cuda:
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, "eager (cpu)"
    cb.capture(fn, graph=False)  # the warm-up
    how = "cuda graph"
    try:
        run = cb.capture(fn, inner=inner, warm=False).replay
    except Exception as e:  # noqa: BLE001
        log(f"    capture failed ({type(e).__name__}: {str(e)[:200]}); timing eagerly")
        torch.cuda.synchronize()
        how = "eager"

        def run():
            for _ in range(inner):
                fn()
    best = math.inf
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3 / inner)
    return best, how


# ---------------------------------------------------------------- (a) attention alone


def fill_raas_layer(layer: RaaSLayer, b, hkv, d, prompt, generated, dtype, dev, gen):
    """Put a RaaS layer in the state of `prompt` pre-filled + `generated` decoded tokens
    (random keys/values, every held page full, random timestamps)."""
    kp = torch.randn(b, hkv, prompt, d, device=dev, dtype=dtype, generator=gen)
    layer.update(kp, torch.randn_like(kp))  # the pre-fill branch: allocates the fixed buffers
    layer.gk.normal_(generator=gen)
    layer.gv.normal_(generator=gen)
    layer.fill.fill_(PS)
    s = layer.slots
    layer.ts.copy_(torch.rand(b, hkv, s, device=dev, generator=gen) * generated)
    gmin, gmax = page_bounds(layer.gk, PS)
    layer.gmin.copy_(gmin)
    layer.gmax.copy_(gmax)
    layer.cur.zero_()
    layer.gvalid.fill_(True)  # every held page full (the fused bookkeeping's validity bits)
    layer.step.fill_(generated)
    layer.seen = prompt + generated


def bench_attention(b, n, budget, prompt, cuda, dev, dtype, hq=32, hkv=8, d=128, sweep=True):
    gen = torch.Generator(device=dev).manual_seed(0)
    scale = d ** -0.5
    q = torch.randn(b, hq, 1, d, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(b, hkv, n, d, device=dev, dtype=dtype, generator=gen)
    v = torch.randn_like(k)
    npg = n // PS
    kmin, kmax = page_bounds(k[:, :, :npg * PS], PS)  # fp32 bounds [B, Hkv, P, D]
    kmin16, kmax16 = kmin.to(dtype), kmax.to(dtype)
    kpages = budget // PS
    rows = []
    kv_bytes = 2 * b * hkv * n * d * k.element_size()

    def row(name, fn, read_bytes, note=""):
        t, how = timed(fn, cuda)
        rows.append({"batch": b, "context": n, "budget": budget, "method": name, "ms": round(t * 1e3, 4),
                     "bytes_read_MB": round(read_bytes / 1e6, 1), "GBps": round(read_bytes / t / 1e9, 1),
                     "timing": how, "note": note})
        log(f"  B={b} N={n} L={budget} {name:42s} {t * 1e3:9.4f} ms  {read_bytes / t / 1e9:7.1f} GB/s  ({how})")
        return t

    t_dense = row("dense SDPA", lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True),
                  kv_bytes)
    all_pages = torch.arange(npg, device=dev, dtype=torch.int32).expand(b, hkv, npg).contiguous()
    row("kernel, all pages (dense work)", lambda: kd.sparse_decode(q, k, v, all_pages, PS, None, scale), kv_bytes)

    def quest_step(bmin, bmax):
        def fn():
            s = quest_scores(q, bmin, bmax, backend="triton")
            s = torch.cat([s[..., :-1], torch.full_like(s[..., -1:], math.inf)], -1)  # the last page always
            idx = s.topk(kpages, -1).indices
            return _decode(q, k, v, idx, PS, None, scale, backend="triton", unique=True)
        return fn

    sel_bytes = 2 * b * hkv * budget * d * k.element_size()
    t_q32 = row("quest: scores(fp32 bounds)+top-k+kernel", quest_step(kmin, kmax),
                sel_bytes + 2 * kmin.numel() * 4)
    t_q16 = row("quest: scores(bf16 bounds)+top-k+kernel", quest_step(kmin16, kmax16),
                sel_bytes + 2 * kmin16.numel() * kmin16.element_size())
    row("quest: scores only (bf16 bounds)", lambda: quest_scores(q, kmin16, kmax16, backend="triton"),
        2 * kmin16.numel() * kmin16.element_size())
    idx_sel = torch.stack([torch.randperm(npg, device=dev, generator=gen)[:kpages] for _ in range(b * hkv)])
    idx_sel = idx_sel.reshape(b, hkv, kpages).to(torch.int32).contiguous()
    t_kernel = row("kernel alone, L/16 random pages", lambda: kd.sparse_decode(q, k, v, idx_sel, PS, None, scale),
                   sel_bytes)
    best_cfg = None
    if sweep and cuda:
        for bn in (32, 64, 128):
            for w in (4, 8):
                for st in (2, 3):
                    try:
                        t, _ = timed(lambda: kd.sparse_decode(q, k, v, idx_sel, PS, None, scale, block_n=bn,
                                                              num_warps=w, num_stages=st), cuda)
                    except Exception as e:  # noqa: BLE001
                        log(f"    config {bn}/{w}/{st}: {type(e).__name__}")
                        continue
                    log(f"    kernel config block_n={bn} warps={w} stages={st}: {t * 1e3:.4f} ms")
                    if best_cfg is None or t < best_cfg[0]:
                        best_cfg = (t, bn, w, st)
        if best_cfg:
            rows.append({"batch": b, "context": n, "budget": budget, "method": "kernel alone, best swept config",
                         "ms": round(best_cfg[0] * 1e3, 4), "bytes_read_MB": round(sel_bytes / 1e6, 1),
                         "GBps": round(sel_bytes / best_cfg[0] / 1e9, 1), "timing": "cuda graph",
                         "note": f"block_n={best_cfg[1]} warps={best_cfg[2]} stages={best_cfg[3]}"})
    # raas: a layer holding a 1K prompt + budget generated tokens (of n - prompt generated)
    cache = sparseinfer.kv.SparseKVCache("raas", 1, dense_layers=0, budget=budget, page_size=PS)
    layer = cache.layers[0]
    fill_raas_layer(layer, b, hkv, d, prompt, n - prompt, dtype, dev, gen)
    raas_bytes = (2 * b * hkv * (prompt + budget + PS) * d * k.element_size()
                  + 2 * layer.gmin.numel() * layer.gmin.element_size())
    t_raas = row("raas: decode attention (score+refresh+select)", lambda: layer.decode_attention(q, scale),
                 raas_bytes, f"prompt {prompt} kept whole")
    knew = torch.randn(b, hkv, 1, d, device=dev, dtype=dtype, generator=gen)

    def raas_step():
        layer.update(knew, knew)
        return layer.decode_attention(q, scale)
    t_raas_step = row("raas: full layer step (write+evict+attention)", raas_step, raas_bytes)
    if cuda:  # the same with the torch bookkeeping (~25 small ops) instead of the two fused kernels
        layer.kernels = False
        row("raas, torch bookkeeping: decode attention", lambda: layer.decode_attention(q, scale), raas_bytes)
        row("raas, torch bookkeeping: full layer step", raas_step, raas_bytes)
        layer.kernels = None
    for r in rows:
        r["speedup_vs_dense"] = round(t_dense / (r["ms"] / 1e3), 2)
    bound = {"quest": kv_bytes / (sel_bytes + 2 * kmin16.numel() * kmin16.element_size()),
             "raas": kv_bytes / raas_bytes}
    del k, v, kmin, kmax, kmin16, kmax16, cache, layer
    return rows, bound


# ---------------------------------------------------------------- (b) the captured model step


def build_model(cfg_dict, layers, dev):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**dict(cfg_dict, num_hidden_layers=layers))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    try:
        with dev:
            model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval(), cfg, dtype


def fill_static(cache, cfg, b, ctx, dtype, dev, gen):
    d = cfg.head_dim
    probe = torch.zeros(b, cfg.num_key_value_heads, 1, d, device=dev, dtype=dtype)
    for layer in cache.layers:
        try:
            layer.lazy_initialization(probe, probe)
        except TypeError:  # older transformers: lazy_initialization(key_states)
            layer.lazy_initialization(probe)
        layer.keys.normal_(generator=gen)
        layer.values.normal_(generator=gen)
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.fill_(ctx - 1)


def step_fn(model, cache, tok, pos, ctx=None):
    """One decode step at position pos (fixed). A StaticCache whose layers count tokens in a
    device tensor (transformers >= 5.2x) is rewound first, so every replay writes slot ctx - 1."""
    lengths = [lay.cumulative_length for lay in cache.layers
               if isinstance(getattr(lay, "cumulative_length", None), torch.Tensor)] if ctx else []

    ck = sparseinfer.kv.cache_kwargs(model, cache)  # `cache=` from transformers 5.24

    def f():
        for t in lengths:
            t.fill_(ctx - 1)
        with torch.no_grad():
            return model(input_ids=tok, position_ids=pos, cache_position=pos[0], **ck, use_cache=True).logits
    return f


def _nomask_impl() -> str:
    """Register (once) an attention function that runs decode steps as SDPA over all the keys it
    is given, without a mask; pre-fill calls go to transformers' SDPA function."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = "bench_dense_nomask"

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if query.shape[2] != 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        o = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)
        return o.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def bench_model(cfg_dict, layers, b, ctx, prompt, budget, cuda, dev, flat_steps):
    from transformers import StaticCache

    gen = torch.Generator(device=dev).manual_seed(1)
    t0 = time.perf_counter()
    model, cfg, dtype = build_model(cfg_dict, layers, dev)
    log(f"  model: {layers} layers, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params "
        f"({time.perf_counter() - t0:.0f} s)")
    tok = torch.randint(0, cfg.vocab_size, (b, 1), device=dev, generator=gen)
    pos = torch.full((b, 1), ctx - 1, device=dev, dtype=torch.long)
    out = {"layers": layers, "batch": b, "context": ctx, "prompt": prompt, "budget": budget}
    # q/k/v as one product in every step here (sparseinfer.qkv): what the raas step gets from
    # kv_cache's patch on a GPU, so the dense steps get it too (session 17; earlier results: neither)
    from sparseinfer import qkv

    qkv.fuse(model)
    # dense: StaticCache of exactly `ctx` tokens (the step attends all of them)
    cache = StaticCache(config=cfg, max_cache_len=ctx)
    fill_static(cache, cfg, b, ctx, dtype, dev, gen)
    dense_kv = sum(x.numel() * x.element_size() for lay in cache.layers for x in (lay.keys, lay.values))
    try:
        t, how = timed(step_fn(model, cache, tok, pos, ctx), cuda, inner=3, rounds=3)
        out.update(dense_ms=round(t * 1e3, 3), dense_timing=how)
        log(f"  dense StaticCache step: {t * 1e3:.3f} ms ({how})")
    except Exception as e:  # noqa: BLE001
        out.update(dense_error=f"{type(e).__name__}: {str(e)[:300]}")
        log(f"  dense step failed: {out['dense_error']}")
    out["dense_kv_GB"] = round(dense_kv / 1e9, 3)
    # the fastest dense step: the same full cache, SDPA over exactly the valid KV with no mask
    # (every slot holds a token), so SDPA takes its flash path instead of the masked one
    try:
        model.set_attn_implementation(_nomask_impl())
        t, how = timed(step_fn(model, cache, tok, pos, ctx), cuda, inner=3, rounds=3)
        out.update(dense_nomask_ms=round(t * 1e3, 3), dense_nomask_timing=how)
        log(f"  dense no-mask step: {t * 1e3:.3f} ms ({how})")
    except Exception as e:  # noqa: BLE001
        out.update(dense_nomask_error=f"{type(e).__name__}: {str(e)[:300]}")
        log(f"  dense no-mask step failed: {out['dense_nomask_error']}")
    finally:
        model.set_attn_implementation("sdpa")
    del cache
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    # the no-mask dense step at shorter contexts too: its time is linear in the context, which
    # (b2) integrates over a whole generation
    out["dense_nomask_by_context"] = {ctx: out.get("dense_nomask_ms")}
    for c in (x for x in (ctx // 8, ctx // 2) if prompt < x < ctx):
        try:
            model.set_attn_implementation(_nomask_impl())
            cache = StaticCache(config=cfg, max_cache_len=c)
            fill_static(cache, cfg, b, c, dtype, dev, gen)
            pc = torch.full((b, 1), c - 1, device=dev, dtype=torch.long)
            t, how = timed(step_fn(model, cache, tok, pc, c), cuda, inner=3, rounds=3)
            out["dense_nomask_by_context"][c] = round(t * 1e3, 3)
            log(f"  dense no-mask step at context {c}: {t * 1e3:.3f} ms ({how})")
        except Exception as e:  # noqa: BLE001
            log(f"  dense no-mask step at context {c} failed: {type(e).__name__}: {str(e)[:200]}")
        finally:
            model.set_attn_implementation("sdpa")
            cache = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    # raas: every layer a RaaS layer (dense_layers=0), filled as after `prompt` + rest generated
    cache = sparseinfer.kv_cache(model, "raas", budget=budget, page_size=PS, dense_layers=0)
    for layer in cache.layers:
        fill_raas_layer(layer, b, cfg.num_key_value_heads, cfg.head_dim, prompt, ctx - prompt - 1, dtype, dev, gen)
    out["raas_kv_GB"] = round(cache.kv_bytes() / 1e9, 3)
    f = step_fn(model, cache, tok, pos)
    try:
        t, how = timed(f, cuda, inner=3, rounds=3)
        out.update(raas_ms=round(t * 1e3, 3), raas_timing=how)
        log(f"  raas step (L={budget}): {t * 1e3:.3f} ms ({how})")
    except Exception as e:  # noqa: BLE001
        out.update(raas_error=f"{type(e).__name__}: {str(e)[:300]}")
        log(f"  raas step failed: {out['raas_error']}")
    if cuda:  # the torch bookkeeping instead of the fused kernels, for comparison
        for layer in cache.layers:
            layer.kernels = False
        try:
            t, how = timed(step_fn(model, cache, tok, pos), cuda, inner=3, rounds=3)
            out.update(raas_torch_bookkeeping_ms=round(t * 1e3, 3))
            log(f"  raas step, torch bookkeeping: {t * 1e3:.3f} ms ({how})")
        except Exception as e:  # noqa: BLE001
            log(f"  raas step, torch bookkeeping failed: {type(e).__name__}: {str(e)[:200]}")
        for layer in cache.layers:
            layer.kernels = None
    if "dense_ms" in out and "raas_ms" in out:
        out["speedup"] = round(out["dense_ms"] / out["raas_ms"], 2)
    if "dense_nomask_ms" in out and "raas_ms" in out:
        out["speedup_vs_nomask"] = round(out["dense_nomask_ms"] / out["raas_ms"], 2)
    pts = {c: v for c, v in out.get("dense_nomask_by_context", {}).items() if v is not None}
    out["dense_nomask_by_context"] = {str(c): v for c, v in out.get("dense_nomask_by_context", {}).items()}
    if len(pts) >= 2 and "raas_ms" in out:
        out["generation"] = generation_time(pts, out["raas_ms"], prompt, 32768)
    # flat memory: replay the captured raas step many times (the pages evict and refill)
    if cuda and flat_steps and "raas_ms" in out:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            f()
        torch.cuda.synchronize()
        m0 = torch.cuda.memory_allocated()
        for _ in range(flat_steps):
            g.replay()
        torch.cuda.synchronize()
        out["flat_steps"] = flat_steps
        out["allocated_growth_MB_over_flat_steps"] = round((torch.cuda.memory_allocated() - m0) / 1e6, 3)
        out["raas_kv_GB_after"] = round(cache.kv_bytes() / 1e9, 3)
    if cuda:
        out["peak_allocated_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    sparseinfer.unpatch(model)
    del model, cache
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def generation_time(dense_ms: dict, raas_ms: float, prompt: int, generated: int) -> dict:
    """Seconds to generate `generated` tokens after a `prompt`-token prompt, integrated over the
    steps: the dense step time fitted as a + b * context (least squares over the measured
    contexts), raas taken flat at its step time measured with a full budget (an upper bound:
    before the budget fills, it reads less)."""
    import numpy as np

    c = np.array(sorted(dense_ms), dtype=float)
    t = np.array([dense_ms[int(x)] for x in c])
    slope, icpt = np.polyfit(c, t, 1)
    ctxs = np.arange(prompt + 1, prompt + generated + 1, dtype=float)
    dense_s = float((icpt + slope * ctxs).sum()) / 1e3
    raas_s = raas_ms * generated / 1e3
    return {"generated": generated, "prompt": prompt, "dense_s": round(dense_s, 1), "raas_s": round(raas_s, 1),
            "speedup": round(dense_s / raas_s, 2), "dense_fit_ms": [round(float(icpt), 3), round(float(slope) * 1024, 4)],
            "dense_points_ms": {int(k): v for k, v in dense_ms.items()}}


def memory_table(hkv, d, layers, prompt, budget, gens, dtype_bytes, b):
    """KV bytes per sequence batch as the generation grows: dense needs every token, raas
    (measured on a filled SparseKVCache at each length, on the CPU, one layer scaled) holds
    prompt + budget + one page."""
    rows = []
    for g in gens:
        cache = sparseinfer.kv.SparseKVCache("raas", 1, dense_layers=0, budget=budget, page_size=PS)
        layer = cache.layers[0]
        kp = torch.zeros(1, 1, prompt, d, dtype=torch.bfloat16)
        layer.update(kp, kp)
        per_tok = 2 * hkv * d * dtype_bytes * layers * b
        rows.append({"generated": g, "dense_GB": round((prompt + g) * per_tok / 1e9, 3),
                     "raas_GB": round(layer.kv_tokens() * per_tok / 1e9, 3)})
    return rows


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    ap.add_argument("--context", type=int, default=131072, help="(a) context (default: %(default)s)")
    ap.add_argument("--budgets", default="1024,4096", help="(a) budgets L (default: %(default)s)")
    ap.add_argument("--batches", default="8,1", help="(a) batch sizes (default: %(default)s)")
    ap.add_argument("--model-context", type=int, default=32768, help="(b) context (default: %(default)s)")
    ap.add_argument("--model-budget", type=int, default=4096, help="(b) raas budget (default: %(default)s)")
    ap.add_argument("--layers", type=int, default=32, help="(b) decoder layers (default: %(default)s, the full 8B)")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--flat-steps", type=int, default=1000)
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    dev = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        args.context, args.budgets, args.batches = 512, "64", "2"
        args.model_context, args.model_budget, args.layers, args.prompt, args.flat_steps = 256, 64, 2, 64, 0
    dtype = torch.bfloat16 if cuda else torch.float32
    t_start = time.perf_counter()
    att_rows, bounds = [], {}
    for b in (int(x) for x in args.batches.split(",")):
        for budget in (int(x) for x in args.budgets.split(",")):
            log(f"(a) decode attention: batch {b}, context {args.context}, budget {budget}")
            kw = dict(hq=4, hkv=2, d=32) if args.smoke else {}
            r, bd = bench_attention(b, args.context, budget, args.prompt, cuda, dev, dtype,
                                    sweep=(b == 8 and budget == 4096) or args.smoke, **kw)
            att_rows += r
            bounds[f"B{b} L{budget}"] = {k: round(v, 1) for k, v in bd.items()}
            if cuda:
                torch.cuda.empty_cache()
    model_res = None
    if not args.skip_model:
        log(f"(b) captured decode step: context {args.model_context}, raas L={args.model_budget}")
        cfg = SMOKE_CFG if args.smoke else LLAMA_31_8B
        model_res = bench_model(cfg, args.layers, 2 if args.smoke else 8, args.model_context, args.prompt,
                                args.model_budget, cuda, dev, args.flat_steps)
    mem = memory_table(8, 128, 32, args.prompt, args.model_budget, [1024, 4096, 8192, 16384, 32768], 2, 8)
    import transformers
    import triton

    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "smoke": args.smoke, "attention_shapes": "32 q / 8 kv heads, head_dim 128, bf16" if not args.smoke else
            "4 q / 2 kv heads, head_dim 32, fp32", "page_size": PS, "prompt": args.prompt,
            "seconds": round(time.perf_counter() - t_start, 1)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode.json"), "w") as f:
        json.dump({"meta": meta, "attention": att_rows, "bytes_bound_speedup": bounds, "model_step": model_res,
                   "memory": mem}, f, indent=1)
    lines = [f"# Sparse decoding: speed and KV memory ({'SMOKE, CPU' if args.smoke else meta['device']})", "",
             f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
             f"python {meta['python']}, {meta['date']}. Regenerate with `python benchmarks/decode.py --out DIR`.", "",
             f"## (a) Decode attention of one layer ({meta['attention_shapes']}), context {args.context}", "",
             "Each row is one call per layer per step, timed as a CUDA graph of 10 calls (best of 5). raas holds a "
             f"{args.prompt}-token prompt whole and L + 16 generated tokens; quest keeps every token and scores all "
             "pages. Bytes-bound speedups (dense bytes / bytes the method must read): "
             + "; ".join(f"{k}: quest {v['quest']}x, raas {v['raas']}x" for k, v in bounds.items()) + ".", "",
             "| batch | L | method | ms | speedup vs dense SDPA | GB/s | bytes read (MB) | note |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['budget']} | {r['method']} | {r['ms']:.4f} | {r['speedup_vs_dense']:.2f}x | "
              f"{r['GBps']} | {r['bytes_read_MB']} | {r['note']} {'' if r['timing'] == 'cuda graph' else r['timing']} |"
              for r in att_rows]
    if model_res:
        m = model_res
        lines += ["", f"## (b) The captured decode step, Llama-3.1-8B shape ({m['layers']} layers, random bf16 weights), "
                  f"batch {m['batch']}, context {m['context']}", "",
                  "The whole transformers forward of one token, captured in a CUDA graph (3 steps per graph, best of 3). "
                  "dense: transformers StaticCache of exactly the context, SDPA. raas: `sparseinfer.kv_cache(model, "
                  f"\"raas\", budget={m['budget']}, dense_layers=0)` (every layer raas: the dense layers of a "
                  "SparseKVCache grow by concatenation and cannot be captured), filled as after a "
                  f"{m['prompt']}-token prompt and {m['context'] - m['prompt']} generated tokens.", "",
                  "| method | step (ms) | KV held (GB) |", "|---|---|---|",
                  f"| dense StaticCache | {m.get('dense_ms', m.get('dense_error'))} | {m['dense_kv_GB']} |",
                  f"| dense, no mask (SDPA over exactly the valid KV; the fastest dense step) | "
                  f"{m.get('dense_nomask_ms', m.get('dense_nomask_error'))} | {m['dense_kv_GB']} |",
                  f"| raas L={m['budget']} | {m.get('raas_ms', m.get('raas_error'))} | {m['raas_kv_GB']} |",
                  f"| raas L={m['budget']}, torch bookkeeping (before the fused kernels) | "
                  f"{m.get('raas_torch_bookkeeping_ms', '–')} | {m['raas_kv_GB']} |", "",
                  f"Speedup: {m.get('speedup', '–')}x vs StaticCache, {m.get('speedup_vs_nomask', '–')}x vs the "
                  f"no-mask dense step. Timing: dense {m.get('dense_timing', '–')}, "
                  f"raas {m.get('raas_timing', '–')}. Peak allocated: {m.get('peak_allocated_GB', '–')} GB."]
        if "flat_steps" in m:
            lines.append(f"After {m['flat_steps']} replays of the captured raas step the allocator grew by "
                         f"{m['allocated_growth_MB_over_flat_steps']} MB; raas KV held: {m['raas_kv_GB_after']} GB.")
    gm = (model_res or {}).get("generation")
    if gm:
        lines += ["", f"## (b2) Generating {gm['generated']} tokens after a {gm['prompt']}-token prompt "
                  f"(batch {model_res['batch']}, captured steps)", "",
                  "Integrated from the step times: the fastest dense step (no mask) measured at contexts "
                  + ", ".join(f"{c}: {gm['dense_points_ms'][c]} ms" for c in sorted(gm['dense_points_ms'])) + " and fitted as "
                  f"{gm['dense_fit_ms'][0]} ms + {gm['dense_fit_ms'][1]} ms per 1K tokens of context; raas flat at its "
                  f"full-budget step time (an upper bound). dense **{gm['dense_s']} s**, raas **{gm['raas_s']} s**: "
                  f"**{gm['speedup']}x**."]
    lines += ["", f"## (c) KV memory as the generation grows (Llama-3.1-8B, 32 layers, batch 8, bf16, prompt {args.prompt}, "
              f"raas L={args.model_budget})", "", "| generated | dense (GB) | raas (GB) |", "|---|---|---|"]
    lines += [f"| {r['generated']} | {r['dense_GB']} | {r['raas_GB']} |" for r in mem]
    with open(os.path.join(args.out, "decode.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log(f"wrote {args.out}/decode.json and decode.md in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
