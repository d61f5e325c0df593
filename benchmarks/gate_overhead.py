"""Learned-gate estimation time vs dense attention, one Llama-3-8B layer (issue 6 target: the
gate costs <= 5% of dense attention at 128K).

B=1, 32 query heads, 8 KV heads, D=128, bf16, causal; random q/k/v (speed does not depend on
the values) and untrained gates of the default shape (block 64, avg/max/min pooling, width 16;
Llama-3.1-8B RoPE: theta 500000, llama3 scaling).

    python benchmarks/gate_overhead.py --out DIR                  # H100: 32K, 64K, 128K (~1-2 min)
    python benchmarks/gate_overhead.py --smoke --out /tmp/gs      # CPU, tiny shapes (< 1 min)

Timed (CUDA events, median of --reps after warm-up):
  dense_cudnn / dense_flash: F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)
      with the cuDNN / flash backend; dense_cudnn_rep: cuDNN on K/V repeated to 32 heads
      beforehand (a backend that fails is reported, not fatal); dense_best: the fastest;
  gate_features: undo RoPE + pool q and k to blocks; gate_scores: projections, block RoPE,
      causal softmax over key blocks; gate_select: threshold -> kept blocks -> block_idx
      (`select_index`; in brackets torch's path, and whether both give the same indices);
  gate_total: all three (what `patch(model, "adaptive")` adds before the kernel);
  kernel (optional, --kernel): the block-sparse op on the gate's indices (density as kept).
Writes gate_overhead.json + gate_overhead.md to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseinfer.gate import Gates  # noqa: E402
from sparseinfer.patterns.adaptive import keep_blocks, keep_to_index, select_index  # noqa: E402


def llama8b_config(layers: int = 1):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192})


def timer(fn, reps: int, warmup: int, cuda: bool) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def sdpa(q, k, v, backend):
    """backend "cudnn_rep": cuDNN on K/V already repeated to 32 heads (if a build lacks GQA there)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = backend.removesuffix("_rep")
    b = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[name]
    with sdpa_kernel(b):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not backend.endswith("_rep"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32768,65536,131072")
    ap.add_argument("--threshold", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--kernel", action="store_true", help="also time the block-sparse kernel on the gate's indices")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, float32")
    ap.add_argument("--pool-configs", default="",
                    help="also time the features with these `kernels.pool.CONFIG` entries, e.g. '64,4,1;16,4,3' "
                         "(rows per step, warps, stages), alternated twice, each checked vs the default")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = [512, 1024] if args.smoke else [int(x) for x in args.sizes.split(",")]
    reps, warmup = (2, 1) if args.smoke else (args.reps, 3)
    backends = ["math"] if args.smoke else ["cudnn", "flash", "cudnn_rep"]
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = llama8b_config()
    gates = Gates.new(cfg, width=args.width, model="llama-3.1-8b (random gates)").to(dev)
    gates.rotary = LlamaRotaryEmbedding(cfg).to(dev)
    layer = gates.layers[0]
    info = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shape": "B=1, Hq=32, Hkv=8, D=128", "dtype": str(dtype), "block_size": gates.block_size,
            "pooling": ",".join(gates.pooling), "width": args.width, "threshold": args.threshold, "smoke": args.smoke}
    try:
        import transformers
        import triton

        info.update(transformers=transformers.__version__, triton=triton.__version__)
    except Exception:
        pass
    print(json.dumps(info), flush=True)
    rows = []
    for n in sizes:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, 32, n, 128, device=dev, dtype=dtype, generator=g)
        k = torch.randn(1, 8, n, 128, device=dev, dtype=dtype, generator=g)
        v = torch.randn(1, 8, n, 128, device=dev, dtype=dtype, generator=g)
        row = {"n": n}
        for be in backends:
            try:
                kk, vv = (k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)) if be.endswith("_rep") else (k, v)
                row[f"dense_{be}_ms"] = timer(lambda: sdpa(q, kk, vv, be), reps, warmup, cuda)
                del kk, vv
            except Exception as e:  # a backend this build / GPU lacks
                row[f"dense_{be}_ms"] = None
                row[f"dense_{be}_error"] = f"{type(e).__name__}: {e}"[:200]
            print(f"N={n} dense {be}: {row[f'dense_{be}_ms']}", flush=True)
        with torch.no_grad():
            feats = gates.features(q, k)
            probs = layer(*feats).exp()
            keep = keep_blocks(probs, threshold=args.threshold)
            row["gate_features_ms"] = timer(lambda: gates.features(q, k), reps, warmup, cuda)
            pos = torch.arange(n, device=dev)[None]
            row["rotary_ms"] = timer(lambda: gates.rotary(q[:1, :1, :1].float(), pos), reps, warmup, cuda)
            print(f"N={n} features {row['gate_features_ms']:.3f} ms, of which cos / sin {row['rotary_ms']:.3f} ms",
                  flush=True)
            # the torch path (unrotate + pool_blocks, several passes) that the fused kernel replaces
            from sparseinfer.gate import pool_blocks, unrotate

            def torch_features():
                cos, sin = gates.rotary(q[:1, :1, :1].float(), torch.arange(n, device=dev)[None])
                return (pool_blocks(unrotate(q, cos, sin), gates.block_size, gates.pooling),
                        pool_blocks(unrotate(k, cos, sin), gates.block_size, gates.pooling))
            ref = torch_features()
            row["features_max_abs_diff_vs_torch"] = max(float((a - r).abs().max()) for a, r in zip(feats, ref))
            row["features_max_abs"] = max(float(r.abs().max()) for r in ref)
            row["gate_features_torch_ms"] = timer(torch_features, reps, warmup, cuda)
            del ref
            if args.pool_configs:
                from sparseinfer.kernels import pool

                key = "cuda" if cuda else "cpu"
                default = pool.CONFIG[key]
                cfgs = [tuple(int(x) for x in c.split(",")) for c in args.pool_configs.split(";") if c]
                row["pool_configs"] = {}
                for rep in range(2):
                    for c in cfgs:
                        pool.CONFIG[key] = c
                        try:
                            diff = max(float((a - r).abs().max()) for a, r in zip(gates.features(q, k), feats))
                            t = timer(lambda: gates.features(q, k), reps, warmup, cuda)
                        finally:
                            pool.CONFIG[key] = default
                        row["pool_configs"].setdefault(str(c), []).append(t)
                        print(f"N={n} features with pool.CONFIG {c}: {t:.3f} ms (max abs diff vs default {diff:.1e})",
                              flush=True)
            row["gate_scores_ms"] = timer(lambda: layer(*feats).exp(), reps, warmup, cuda)
            # the selection the library runs (`select_index`: one Triton program per row on CUDA)
            # and torch's masks + cumsum + scatter, which must give the same indices
            row["gate_select_ms"] = timer(lambda: select_index(probs, threshold=args.threshold), reps, warmup, cuda)
            row["gate_select_torch_ms"] = timer(lambda: keep_to_index(keep_blocks(probs, threshold=args.threshold)),
                                                reps, warmup, cuda)
            row["select_same_as_torch"] = bool(torch.equal(select_index(probs, threshold=args.threshold),
                                                           keep_to_index(keep_blocks(probs, threshold=args.threshold))))
            row["gate_total_ms"] = timer(
                lambda: select_index(gates.probs(0, q, k), threshold=args.threshold), reps, warmup, cuda)
            # what the patched layer runs: the adaptive pattern's selection (fused threshold kernel on CUDA,
            # the block density from its counts), without and with patch's dense tail
            from sparseinfer.patterns.adaptive import DENSE_TAIL, AdaptiveLayer

            for tail in (0, DENSE_TAIL):
                pat = AdaptiveLayer(gates, 0, threshold=args.threshold, dense_tail=tail)
                row[f"gate_library_tail{tail}_ms"] = timer(lambda: pat.select(q, k, 128 ** -0.5), reps, warmup, cuda)
                print(f"N={n} library selection, dense_tail {tail}: {row[f'gate_library_tail{tail}_ms']:.3f} ms",
                      flush=True)
            nb = keep.shape[-1]
            row["kept_block_density"] = float(keep.sum() / (32 * nb * (nb + 1) / 2))
            if args.kernel:
                try:
                    from sparseinfer import ops

                    idx = keep_to_index(keep)
                    row["kernel_ms"] = timer(lambda: ops.block_sparse_attention(q, k, v, idx, gates.block_size),
                                             reps, warmup, cuda)
                except Exception:
                    row["kernel_error"] = traceback.format_exc(limit=2)[-300:]
        dense = [row[f"dense_{be}_ms"] for be in backends if row.get(f"dense_{be}_ms")]
        row["dense_best_ms"] = min(dense) if dense else None
        row["gate_overhead_pct"] = 100 * row["gate_total_ms"] / row["dense_best_ms"] if dense else None
        print(json.dumps(row), flush=True)
        rows.append(row)
        del q, k, v, feats, probs, keep
        if cuda:
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gate_overhead.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    lines = [f"# Learned-gate overhead vs dense attention ({info['device']})", "",
             ", ".join(f"{k}: {v}" for k, v in info.items()), "",
             "| N | dense best ms | gate features ms (torch path) | gate scores ms | gate select ms (torch path, same) "
             "| gate total ms | overhead % | features: max abs diff fused vs torch (max abs) "
             "| library selection ms (dense tail 0 / 64) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"| {r['n']} | {fmt(r['dense_best_ms'])} | {fmt(r['gate_features_ms'])} "
                     f"({fmt(r.get('gate_features_torch_ms'))}) | {fmt(r['gate_scores_ms'])} | "
                     f"{fmt(r['gate_select_ms'])} ({fmt(r.get('gate_select_torch_ms'))}, {r.get('select_same_as_torch')}) | "
                     f"{fmt(r['gate_total_ms'])} | {fmt(r['gate_overhead_pct'])} | "
                     f"{r.get('features_max_abs_diff_vs_torch', float('nan')):.1e} ({r.get('features_max_abs', float('nan')):.1f}) | "
                     f"{fmt(r.get('gate_library_tail0_ms'))} / {fmt(r.get('gate_library_tail64_ms'))} |")
    with open(os.path.join(args.out, "gate_overhead.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[4:]), flush=True)
    print(f"wrote {args.out}/gate_overhead.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
