"""Time to first token of a Llama-3.1-8B-shaped model through transformers: dense SDPA
(cuDNN and flash backends) vs `sparseinfer.patch(model, "vertical_slash")`.

Random bf16 weights built on the GPU from the config (weights do not change speed; nothing
is downloaded). Batch 1, logits for the last token only, KV cache kept (a real pre-fill).

Random weights give unstructured attention, so the estimated slashes scatter over the
whole matrix (the worst case: row "vertical_slash, estimated"). Row "vertical_slash,
realistic" runs the same estimation in every layer (its cost is in the time) but hands the
kernel index sets shaped like real heads' (benchmarks/attention.py: 1000 verticals = first
30 + scattered, 6096 slashes = 0..4095 + 10 runs of 200).
Every patch here passes fuse_qkv=False: the dense rows run the unpatched model, so both keep
q/k/v as three projections (a pre-fill's q/k/v products are compute-bound; fusing them is for
decode steps, sparseinfer.qkv).

--compile adds the dense (cuDNN) and realistic rows with every decoder layer compiled
(torch.compile per layer: the norms, RoPE, residual adds and SwiGLU fuse, about 1 s of
elementwise kernels at 128K; the sparse attention runs eagerly between the graphs).

256K on an 80 GB GPU: the KV cache (34 GB) and the weights (16 GB) leave no room for the MLP's
three [N, 14336] intermediates (7.5 GB each), so `--mlp-chunk 32768` runs every decoder layer's MLP
over the sequence in chunks (`mm_e2e.chunk_mlps`: its own forward, in every row alike; the FLOPs
do not change). `--no-flash` / `--skip-estimated` leave out the rows that cost a dense run each
(FlashAttention-2 is ~1.7x slower than cuDNN; the estimated row is routed dense on random weights).

    python benchmarks/e2e.py --sizes 32768,131072 --out DIR [--compile] [--profile]
    python benchmarks/e2e.py --sizes 262144 --mlp-chunk 32768 --no-flash --skip-estimated --reps 1 --compile --out DIR
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import sparseinfer  # noqa: E402
from attention import realistic_vs  # noqa: E402
from sparseinfer.patterns.base import Selection  # noqa: E402
from sparseinfer.patterns.vertical_slash import vertical_slash_density  # noqa: E402

LLAMA_31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
NV, NS = 1000, 6096


def build_model(max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**dict(LLAMA_31_8B, max_position_embeddings=max(max_len, 131072)))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    torch.set_default_dtype(torch.float32)
    return model.eval()


class RealisticIndices:
    """Wraps a layer's vertical-slash pattern: runs its estimation (cost kept), then returns
    realistic index sets instead of the ones random weights produce."""

    def __init__(self, inner, gen):
        self.inner, self.gen, self.name, self.cache = inner, gen, "vertical_slash", {}

    def select(self, q, k, scale):
        self.inner.select(q, k, scale)  # queued on the stream like any estimation: its time counts
        b, h, n, _ = q.shape
        if n not in self.cache:
            self.cache[n] = realistic_vs(b, h, n, q.device, self.gen)
        vi, si = self.cache[n]
        return [Selection("vertical_slash_attention", {"vertical_idx": vi, "slash_idx": si},
                          vertical_slash_density(n, vi, si))]


def set_compiled(model, on: bool) -> None:
    """Regional compilation: torch.compile on every decoder layer (static shapes), so the
    norms, RoPE, residual adds and SwiGLU fuse; sparseinfer's pre-fill attention runs eagerly
    in between (outside the graph, see `sparseinfer.integration`). on=False restores eager."""
    torch._dynamo.reset()
    # one recompile per layer: transformers' cache update guards on its layer's slot
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(model.model.layers))
    for layer in model.model.layers:
        if on:
            layer.compile(dynamic=False)
        else:
            layer._compiled_call_impl = None


@torch.inference_mode()
def kernel_profile(model, ids, label: str, top: int = 25) -> list:
    """GPU time of one pre-fill by kernel name (torch.profiler), the `top` largest printed."""
    from torch.profiler import ProfilerActivity, profile

    model(ids, logits_to_keep=1, use_cache=True)  # warm
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(ids, logits_to_keep=1, use_cache=True)
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages() if e.device_time_total > 0),
                  key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"--- kernels of one pre-fill, {label}: {total:.1f} ms of GPU time", flush=True)
    for k, ms, c in rows[:top]:
        print(f"  {ms:9.2f} ms  x{c:<5d} {k[:120]}", flush=True)
    return [{"kernel": k[:200], "ms": round(ms, 3), "launches": c} for k, ms, c in rows[:top]]


@torch.inference_mode()
def ttft(model, ids, reps: int, warmup: bool = True) -> list[float]:
    times = []
    for i in range(reps + int(warmup)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(ids, logits_to_keep=1, use_cache=True)
        torch.cuda.synchronize()
        if i or not warmup:  # the first run warms up
            times.append(time.perf_counter() - t)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32768,131072")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--profile", action="store_true", help="also GPU time per kernel of one dense and one realistic pre-fill")
    ap.add_argument("--compile", action="store_true",
                    help="also dense cuDNN and vertical_slash realistic with every decoder layer torch.compile'd")
    ap.add_argument("--skip-vs", action="store_true", help="no vertical_slash rows (with --adaptive)")
    ap.add_argument("--adaptive", action="store_true",
                    help="also time xattention (tau=0.9) and flexprefill (gamma=0.9), block 128, with the default guards")
    ap.add_argument("--mlp-chunk", type=int, default=None,
                    help="run every decoder layer's MLP over the sequence in chunks of this many tokens (memory)")
    ap.add_argument("--no-flash", action="store_true", help="no dense FlashAttention-2 row")
    ap.add_argument("--skip-estimated", action="store_true", help="no 'vertical_slash, estimated' row")
    ap.add_argument("--compiled-only", action="store_true", help="with --compile: only the compiled rows")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    if max(sizes) > 131072 and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and not torch.cuda.is_initialized():
        # at 256K the compiled dense run ran out of memory with 23 GB reserved but unallocated (fragmented
        # blocks of the chunked MLP and the 34 GB KV cache): expandable segments, read when CUDA starts
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        print("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (sizes above 128K)", flush=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build_model(max(sizes))
    if args.mlp_chunk:
        from mm_e2e import chunk_mlps

        chunk_mlps(model, args.mlp_chunk)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, profiles = [], {}
    for n in sizes:
        ids = torch.randint(0, LLAMA_31_8B["vocab_size"], (1, n), device="cuda", generator=gen)
        res = {}
        dense_rows = (("dense cuDNN", SDPBackend.CUDNN_ATTENTION), ("dense flash", SDPBackend.FLASH_ATTENTION))
        dense_rows = () if args.compiled_only else dense_rows[:1] if args.no_flash else dense_rows
        for name, backend in dense_rows:
            try:
                with sdpa_kernel(backend):
                    res[name] = ttft(model, ids, args.reps)
                    if args.profile and name == "dense cuDNN":
                        profiles[(n, name)] = kernel_profile(model, ids, f"{name}, N={n}")
            except Exception as e:  # noqa: BLE001
                print(f"{name} at {n}: {type(e).__name__}: {e}", flush=True)
            torch.cuda.empty_cache()
        vs_rows = () if args.skip_vs or args.compiled_only else (("vertical_slash, realistic", True), ("vertical_slash, estimated", False))
        vs_rows = vs_rows[:1] if args.skip_estimated else vs_rows
        for label, realistic in vs_rows:
            handle = sparseinfer.patch(model, "vertical_slash", vertical=NV, slash=NS, min_len=4096, fuse_qkv=False)
            if realistic:
                for m in model.modules():
                    plan = getattr(m, "_sparseinfer", None)
                    if plan is not None:
                        plan.pattern = RealisticIndices(plan.pattern, gen)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                # the estimated (worst-case) row: one timed run after a warm-up (the guards route
                # its scattered heads dense, so it costs about a dense run)
                res[label] = ttft(model, ids, args.reps) if realistic else ttft(model, ids, 1)
                if args.profile:
                    profiles[(n, label)] = kernel_profile(model, ids, f"{label}, N={n}")
            dens = handle.stats.density()
            routes = sorted({r.reason or r.method for r in handle.stats.records})
            res[label + " route"] = routes
            sparseinfer.unpatch(model)
            torch.cuda.empty_cache()
            res[label + " density"] = dens
        if args.compile:  # the same model with every decoder layer compiled (static shapes)
            for label, patched in (("dense cuDNN (compiled)", False), ("vertical_slash, realistic (compiled)", True)):
                handle = None
                if patched:
                    handle = sparseinfer.patch(model, "vertical_slash", vertical=NV, slash=NS, min_len=4096, fuse_qkv=False)
                    for m in model.modules():
                        plan = getattr(m, "_sparseinfer", None)
                        if plan is not None:
                            plan.pattern = RealisticIndices(plan.pattern, gen)
                set_compiled(model, True)
                try:
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        res[label] = ttft(model, ids, args.reps)  # the warm-up run compiles
                        if args.profile:
                            profiles[(n, label)] = kernel_profile(model, ids, f"{label}, N={n}")
                    if handle is not None:
                        res[label + " density"] = handle.stats.density()
                        res[label + " route"] = sorted({r.reason or r.method for r in handle.stats.records})
                except Exception as e:  # noqa: BLE001
                    print(f"{label} at {n}: {type(e).__name__}: {e}", flush=True)
                finally:
                    set_compiled(model, False)
                    if handle is not None:
                        sparseinfer.unpatch(model)
                    torch.cuda.empty_cache()
        # random weights: near-uniform attention, so the guards should route every head dense
        for label, method, opts in (() if not args.adaptive else (
                ("xattention 0.9, guarded", "xattention", dict(tau=0.9, stride=8, block_size=128)),
                ("flexprefill 0.9, guarded", "flexprefill", dict(gamma=0.9, tau=0.1, block_size=128)))):
            handle = sparseinfer.patch(model, method, min_len=4096, fuse_qkv=False, **opts)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                res[label] = ttft(model, ids, 1)
            res[label + " density"] = handle.stats.density()
            res[label + " route"] = sorted({r.reason or r.method for r in handle.stats.records})
            sparseinfer.unpatch(model)
            torch.cuda.empty_cache()
        dense = min((min(v) for k, v in res.items() if k.startswith("dense") and not k.endswith(("density", "route"))),
                    default=float("nan"))  # no dense row (it failed): speedups are nan
        peak = torch.cuda.max_memory_allocated() / 1e9
        for name, v in res.items():
            if name.endswith("density") or name.endswith("route"):
                continue
            t = min(v)
            mode = [min(x) for k, x in res.items() if k.startswith("dense") and not k.endswith(("density", "route"))
                    and k.endswith("(compiled)") == name.endswith("(compiled)")]
            row = {"n": n, "method": name, "ttft_s": round(t, 3), "all_s": [round(x, 3) for x in v],
                   "speedup_vs_dense": round(dense / t, 2),
                   "speedup_vs_dense_same_mode": round(min(mode) / t, 2) if mode else None, "density": res.get(name + " density", 1.0),
                   "route": res.get(name + " route", ["dense"])}
            rows.append(row)
            print(f"N={n:>7} {name:28s} {t:8.3f} s  x{dense / t:5.2f}  density {row['density']:.3f} {row['route']}", flush=True)
        print(f"peak memory {peak:.1f} GB", flush=True)
        torch.cuda.reset_peak_memory_stats()
    import transformers
    import triton

    meta = {"compile": args.compile, "mlp_chunk": args.mlp_chunk, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": "Llama-3.1-8B shape, random bf16 weights", "vertical": NV, "slash": NS, "reps": args.reps}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "e2e.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows,
                   "profiles": [{"n": n, "method": m, "kernels": v} for (n, m), v in profiles.items()]}, f, indent=1)
    lines = ["# Time to first token, Llama-3.1-8B shape (random bf16 weights), batch 1", "",
             f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
             f"{meta['date']}. Best of {args.reps} after a warm-up; speedup vs the fastest dense row in this run "
             "(and vs the fastest dense row of the same mode, eager or compiled)."
             + (f" Every row's MLP runs over the sequence in chunks of {args.mlp_chunk} tokens." if args.mlp_chunk else ""),
             "", "| N | method | TTFT (s) | speedup | vs dense, same mode | attention density | route |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['method']} | {r['ttft_s']:.3f} | {r['speedup_vs_dense']:.2f}x | "
              f"{r['speedup_vs_dense_same_mode']:.2f}x | {100 * r['density']:.1f}% | {', '.join(r['route'])} |" for r in rows]
    with open(os.path.join(args.out, "e2e.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
