"""Dense decode attention (one query row against a KV cache) on one GPU: SDPA with the KV heads
shared (`enable_gqa`, what the patched model ran), the same on the valid slots only (no mask: the
cuDNN floor, not capturable when the length lives on the device), FlexAttention (compiled, its
decoding kernel; --flex) and sparseinfer's dense decode kernel (`kernels.decode.dense_decode`: no
index row, the GQA group's heads share each K/V tile, split over the cache, merged by a second
launch) over a sweep of configs; every variant checked against float32 attention first.

Llama-3.1-8B attention shapes (32 query / 8 KV heads, D 128, bf16): a StaticCache of 4096 + 8
slots with 4097 filled (the captured decode step's case), a 32K cache with 4097 filled, full 32K
and 128K caches, and batch 4 at 32K. With --step: the captured compiled 8B decode step (4K
context, benchmarks/contextual.py part B: dense, dense with sparseinfer's attention, TEAL on all
projections at 50%) with the patched model's dense decode on SDPA, then on the kernel with the
best config of the 4K case as the default.

    python benchmarks/decode_attention.py --out benchmarks/results/decode [--step] [--profile]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import contextual as ctx  # noqa: E402  (timed, copy_bandwidth, part_b, LLAMA_31_8B, log)
from sparseinfer import integration  # noqa: E402
from sparseinfer.kv import cache_kwargs  # noqa: E402
from sparseinfer.kernels import decode as kd  # noqa: E402

CASES = [(1, 4104, 4097), (1, 32776, 4097), (1, 32776, 32776), (1, 131080, 131080), (4, 32776, 32776)]
# (block_n, warps, stages, splits per (batch, KV head) or None = auto, V loaded with K, skip empty tiles)
CONFIGS = list(itertools.product((32, 64, 128), (4, 8), (1, 2), (None, 64, 128, 256), (False, True), (False,))) + \
    [(128, 8, 2, 128, True, True), (64, 4, 2, 64, False, True), (128, 4, 2, None, False, True), (32, 4, 2, 128, True, True)]


def micro(args, res, dev, dt, hq, hkv, d, bw) -> dict:
    """Every variant on every case; returns the best kernel config of each case."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    best = {}
    for b, slots, filled in args.cases or CASES:
        g = torch.Generator(device=dev).manual_seed(slots)
        q = torch.randn(b, hq, 1, d, device=dev, dtype=dt, generator=g)
        k, v = (torch.randn(b, hkv, slots, d, device=dev, dtype=dt, generator=g) for _ in range(2))
        valid = torch.zeros(b, slots, dtype=torch.bool, device=dev)
        valid[:, :filled] = True
        mask = valid[:, None, None, :]
        scale = d ** -0.5
        kr, vr = (t[:, :, :filled].float().repeat_interleave(hq // hkv, 1) for t in (k, v))
        ref = torch.softmax(q.float() @ kr.transpose(-1, -2) * scale, -1) @ vr
        nbytes = 2 * b * hkv * filled * d * dt.itemsize
        case = f"B{b} slots {slots} filled {filled}"
        ctx.log(f"{case}: bytes bound {nbytes / bw * 1e6:.1f} us")

        # cold caches: the timed call walks `copies` K/V buffers in turn (>= 96 MB of filled slots,
        # twice the H100's 50 MB L2), as a decode step's 32 layers do; time per call
        copies = [(k, v)] + [(k.clone(), v.clone()) for _ in range(max(0, int(-(-96e6 // nbytes)) - 1) if args.cold else 0)]

        def record(variant, fn, extra=None):
            try:
                out = fn(k, v)
                err = float((out.float() - ref).norm() / ref.norm())
                ok = err < 1e-2 and not bool(out.isnan().any())
                us = ctx.timed(lambda: [fn(kc, vc) for kc, vc in copies], args.iters, True) * 1e3 / len(copies) \
                    if ok else None
            except Exception as e:  # noqa: BLE001 - a variant that cannot run is recorded, not fatal
                res["rows"].append({"case": case, "variant": variant, "error": f"{type(e).__name__}: {e}"[:300]})
                ctx.log(f"  {variant}: FAILED {type(e).__name__}: {str(e)[:200]}")
                return None
            row = {"case": case, "batch": b, "slots": slots, "filled": filled, "variant": variant, "us": us and round(us, 2),
                   "rel_err": err, "bound_us": round(nbytes / bw * 1e6, 2), "buffers": len(copies), **(extra or {})}
            res["rows"].append(row)
            return us

        sdpa = record("sdpa enable_gqa + mask", lambda k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=True))
        record("sdpa enable_gqa, filled slots only (no mask)", lambda k, v: F.scaled_dot_product_attention(
            q, k[:, :, :filled], v[:, :, :filled], scale=scale, enable_gqa=True))

        def score_mod(score, bi, h, q_idx, kv_idx):
            return torch.where(valid[bi, kv_idx], score, -float("inf"))

        if args.flex:
            record("flex_attention (compiled)", lambda k, v: flex(q, k, v, score_mod=score_mod, enable_gqa=True,
                                                                   scale=scale))
        times = {}
        for cfg in args.configs or CONFIGS:
            bn, w, st, sp, early_v, skip = cfg
            us = record(f"kernel bn{bn} w{w} st{st} splits {sp or 'auto'}{' early V' if early_v else ''}"
                        f"{' skip' if skip else ''}", lambda k, v: kd.dense_decode(q, k, v, valid, scale, config=cfg),
                        {"config": list(cfg)})
            if us is not None:
                times[cfg] = us
        lib = record("kernel, library default", lambda k, v: kd.dense_decode(q, k, v, valid, scale))
        top = sorted(times.items(), key=lambda kv: kv[1])[:5]
        for cfg, us in top:
            ctx.log(f"  best {cfg}: {us:.2f} us")
        ctx.log(f"  sdpa {sdpa and round(sdpa, 2)} us, library default {lib and round(lib, 2)} us")
        best[case] = top[0][0] if top else None
    return best


def model_check(dev, dt, sh) -> dict:
    """One eager decode step of a 2-layer 8B-shaped model (patched, StaticCache of 4096 + 8 slots):
    logits with the dense decode on SDPA vs on the kernel."""
    import sparseinfer
    from transformers import StaticCache

    model = ctx.build_model(sh, 2, dev, dt)
    sparseinfer.patch(model, "dense")
    ids = torch.randint(0, model.config.vocab_size, (1, 4097), device=dev)
    logits = {}
    for label in ("sdpa", "triton"):
        integration.DECODE_KERNEL = label
        cache = StaticCache(config=model.config, max_cache_len=4104)
        ck = cache_kwargs(model, cache)  # `cache=` from transformers 5.24
        with torch.no_grad():
            model(input_ids=ids[:, :4096], **ck, cache_position=torch.arange(4096, device=dev))
            pos = torch.tensor([4096], device=dev)
            logits[label] = model(input_ids=ids[:, 4096:], **ck, cache_position=pos,
                                  position_ids=pos[None]).logits.float()
    sparseinfer.unpatch(model)
    integration.DECODE_KERNEL = "triton"
    err = float((logits["triton"] - logits["sdpa"]).norm() / logits["sdpa"].norm())
    ctx.log(f"model check: decode-step logits, kernel vs SDPA: rel. err {err:.2e}")
    return {"decode_logits_rel_err_kernel_vs_sdpa": err}


def markdown(res) -> str:
    out = [f"# Dense decode attention, {res['device']}", "",
           f"{res['date']}; torch {res['torch']}, triton {res['triton']}, transformers {res['transformers']}; "
           f"{res.get('heads', [32, 8])[0]} query / {res.get('heads', [32, 8])[1]} KV heads, D 128, bf16, one query row; us = median of CUDA-graph replays (per call; "
           f"{'each replay walks enough K/V copies for >= 96 MB of filled slots: L2-cold' if res.get('cold') else 'one K/V buffer'}); bound = K/V bytes "
           f"of the filled slots at the copy bandwidth ({res['copy_bandwidth_GBs']} GB/s). Every variant checked vs "
           "float32 attention (rel. err < 1e-2) before timing.", "",
           "| case | variant | us | vs sdpa + mask | bound us | rel err |", "|---|---|---|---|---|---|"]
    by_case = {}
    for r in res["rows"]:
        by_case.setdefault(r["case"], []).append(r)
    for case, rows in by_case.items():
        sd = next((r["us"] for r in rows if r["variant"] == "sdpa enable_gqa + mask" and r.get("us")), None)
        kern = sorted((r for r in rows if r["variant"].startswith("kernel bn") and r.get("us")), key=lambda r: r["us"])
        keep = [r for r in rows if not r["variant"].startswith("kernel bn")] + kern[:3]
        for r in keep:
            if "error" in r:
                out.append(f"| {case} | {r['variant']} | failed: {r['error'][:80]} | | | |")
                continue
            ratio = f"{sd / r['us']:.2f}x" if sd and r.get("us") else ""
            out.append(f"| {case} | {r['variant']} | {r['us']} | {ratio} | {r['bound_us']} | {r['rel_err']:.1e} |")
    if "model_check" in res:
        out += ["", f"Model check (2-layer 8B-shaped model, random bf16 weights, eager decode step at 4097 tokens): "
                f"logits with the kernel vs SDPA rel. err {res['model_check']['decode_logits_rel_err_kernel_vs_sdpa']:.1e}."]
    if "step" in res:
        out += ["", "## Captured compiled 8B decode step (4K context; 2/4-layer extrapolation to 32 layers)", "",
                f"Kernel config of the 4104-slot cache in the triton run: {res.get('step_config')}; the step resets the "
                "cache's token counters with one multi-tensor copy (not a fill per layer).", "",
                "| patched dense decode | setting | est. 32 layers ms | vs the fastest dense step (either run) |",
                "|---|---|---|---|"]
        for lab, st in res["step"].items():
            for e in st["extrapolated"]:
                out.append(f"| {lab} | {e['setting']} | {e['est_32_layers_ms']} | {res['step_ratio'].get(lab + '/' + e['setting'], '')} |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ctx.gpu_args(p, "also the captured compiled decode step, SDPA vs the kernel")
    p.add_argument("--no-micro", action="store_true", help="skip the sweep (with --step: the library defaults)")
    p.add_argument("--check", action="store_true", help="the model-level logits check (also run by --step)")
    p.add_argument("--config", default=None, help="with --no-micro: JSON [block_n, warps, stages, splits|null, "
                   "early_v, skip] as the kernel default of --step")
    p.add_argument("--warm", dest="cold", action="store_false", help="time on one K/V buffer (L2-warm below 50 MB)")
    p.add_argument("--configs", type=lambda t: [tuple(c) for c in json.loads(t)], default=None,
                   help="JSON list of kernel configs to sweep instead of CONFIGS")
    p.add_argument("--heads", type=lambda t: tuple(int(x) for x in t.split("/")), default=None,
                   help="query / KV heads of the sweep (default 32/8, Llama-3.1-8B; e.g. 32/32 for an MHA model)")
    p.add_argument("--cases", type=lambda t: [tuple(c) for c in json.loads(t)], default=None,
                   help="JSON list of [batch, slots, filled] instead of CASES")
    p.add_argument("--only", default="sparseinfer attention,teal all", help="--step: the settings of "
                   "benchmarks/contextual.py part B to run (names containing one of these)")
    p.add_argument("--flex", action="store_true", help="also FlexAttention (compiled; 10-40x slower here)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    args = p.parse_args()
    dev, dt, sh = torch.device("cuda"), torch.bfloat16, ctx.LLAMA_31_8B
    d = sh["hidden_size"] // sh["num_attention_heads"]
    hq, hkv = args.heads or (sh["num_attention_heads"], sh["num_key_value_heads"])
    res, bw = ctx.run_header(dev)
    res.update(rows=[], cold=args.cold, heads=[hq, hkv])
    os.makedirs(args.out, exist_ok=True)
    name = "decode_attention" + ("_step" if args.no_micro else "") + args.tag
    path = os.path.join(args.out, name + ".json")
    if not args.no_micro:
        t0 = time.time()
        best = micro(args, res, dev, dt, hq, hkv, d, bw)
        res["best"] = {c: list(v) if v else None for c, v in best.items()}
        ctx.log(f"sweep done in {time.time() - t0:.0f} s")
        first = best.get(f"B1 slots {CASES[0][1]} filled {CASES[0][2]}")
        if first:  # the 4K step's case decides the default of the step runs below
            kd.DENSE_CONFIG["cuda short"] = tuple(first)
            ctx.log(f"kernel default for --step: {kd.DENSE_CONFIG['cuda short']}")
    if args.no_micro and args.config:
        kd.DENSE_CONFIG["cuda short"] = tuple(json.loads(args.config))
    res["step_config"] = list(kd.DENSE_CONFIG["cuda short"])
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    if args.step or args.check:
        res["model_check"] = model_check(dev, dt, sh)
    if args.step:
        steps = {}
        for label in ("sdpa", "triton"):
            integration.DECODE_KERNEL = label
            ns = argparse.Namespace(context=4096, layers=args.layers, iters=args.iters, compile=True, compiled_only=True,
                                    profile=args.profile, only=args.only, no_reorder=False)
            out = {}
            t0 = time.time()
            ctx.part_b(ns, dev, dt, sh, out)
            steps[label] = out["decode_step"]
            ctx.log(f"step ({label}) done in {time.time() - t0:.0f} s")
        integration.DECODE_KERNEL = "triton"
        res["step"] = steps
        ratio = {}  # against the fastest dense step of either run
        dense = [e["est_32_layers_ms"] for st in steps.values() for e in st["extrapolated"]
                 if e["setting"].startswith("dense")]
        for lab, st in steps.items():
            for e in st["extrapolated"]:
                ratio[f"{lab}/{e['setting']}"] = f"{min(dense) / e['est_32_layers_ms']:.3f}x"
                ctx.log(f"  step {lab:<7} {e['setting']:<44} {e['est_32_layers_ms']:.3f} ms  "
                        f"{ratio[lab + '/' + e['setting']]} vs the fastest dense step")
        res["step_ratio"] = ratio
    ctx.save(args.out, name, res, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
