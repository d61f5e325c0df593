"""Time to first token of a Llama-3.1-70B-shaped model under tensor parallelism (transformers
`tp_plan="auto"` under torchrun): dense cuDNN SDPA vs `sparseinfer.patch(model, "vertical_slash")`
vs `patch(model, "minference")`, with the memory each GPU holds.

Random bf16 weights materialised directly sharded: rank 0 writes a stub checkpoint (the config and
one norm weight); `from_pretrained(stub, tp_plan="auto")` creates the model on the meta device,
shards it and initialises every missing weight as the rank's local shard (nothing downloaded, no
full copy anywhere). Weights do not change speed, but random weights give unstructured attention:
as in benchmarks/e2e.py, the sparse rows run their index estimation in every layer (its time
counts) and then hand the kernel index sets shaped like real heads' (1000 verticals = first 30 +
scattered, 6096 slashes = 0..4095 + 10 runs of 200; the "realistic density").

The minference config is synthetic (no 70B model to search): per layer, query heads cycle through
A-shape (128 sink + 4096 window), vertical-slash (1000 / 6096, twice) and block-sparse (top 100
64-blocks), so neighbouring heads and KV groups differ and each rank gets its slice of it.

On an 80 GB GPU the full 80 layers do not fit with a 128K pre-fill next to them (70 GB of weights
per GPU at TP = 2); `--layers auto` keeps as many layers as fit and the report also scales the
time to 80 layers (every layer costs the same; embedding and head are negligible).

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 benchmarks/multigpu.py --out DIR
    torchrun --standalone --nproc-per-node 2 benchmarks/multigpu.py --smoke   # CPU, gloo, tiny shapes
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import sparseinfer  # noqa: E402
from attention import realistic_vs  # noqa: E402
from e2e import RealisticIndices  # noqa: E402
from sparseinfer.patterns.base import Selection  # noqa: E402
from sparseinfer.patterns.vertical_slash import vertical_slash_density  # noqa: E402

LLAMA_31_70B = dict(
    vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
SMOKE = dict(LLAMA_31_70B, vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=8,
             num_key_value_heads=4, head_dim=16, num_hidden_layers=2)
NV, NS = 1000, 6096
HEAD_KINDS = [
    {"pattern": "ashape", "sink": 128, "window": 4096},
    {"pattern": "vertical_slash", "vertical": NV, "slash": NS},
    {"pattern": "vertical_slash", "vertical": NV, "slash": NS},
    {"pattern": "block_sparse", "topk": 100, "block_size": 64},
]


def minference_config(heads: int, layers: int) -> dict:
    return {"schema_version": 1, "model": "llama-3.1-70b-shape (synthetic)",
            "layers": [[dict(HEAD_KINDS[(h + li) % len(HEAD_KINDS)]) for h in range(heads)] for li in range(layers)]}


class RealisticMInference:
    """Wraps a rank's MInferenceLayer: estimation runs (its time counts), then the vertical-slash
    heads get realistic index sets; A-shape and block-sparse heads keep what the layer chose."""

    def __init__(self, inner, gen):
        self.inner, self.gen, self.name, self.cache = inner, gen, "minference", {}
        self.is_vs = torch.tensor([h["pattern"] == "vertical_slash" for h in inner.heads])

    def select(self, q, k, scale):
        parts = self.inner.select(q, k, scale)
        b, h, n, _ = q.shape
        if n not in self.cache:
            self.cache[n] = realistic_vs(b, h, n, q.device, self.gen)
        rv, rs = self.cache[n]
        out = []
        for sel in parts:
            if sel.op == "vertical_slash_attention":
                m = self.is_vs.to(q.device)[None, :, None]
                vi, si = sel.kwargs["vertical_idx"], sel.kwargs["slash_idx"]
                vi = torch.where(m, _fit(rv, vi.shape[-1]), vi)
                si = torch.where(m, _fit(rs, si.shape[-1]), si)
                sel = Selection(sel.op, {"vertical_idx": vi, "slash_idx": si}, vertical_slash_density(n, vi, si), sel.heads)
            out.append(sel)
        return out


def _fit(idx: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, K] index set padded with -1 (or cut) to width."""
    if idx.shape[-1] >= width:
        return idx[..., :width]
    pad = idx.new_full((*idx.shape[:-1], width - idx.shape[-1]), -1)
    return torch.cat([idx, pad], -1)


def write_stub(path: str, cfg: dict) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    LlamaConfig(**cfg).save_pretrained(path)
    save_file({"model.norm.weight": torch.ones(cfg["hidden_size"], dtype=torch.bfloat16)},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def auto_layers(cfg: dict, n_max: int, world: int) -> int:
    """As many layers as fit next to an n_max pre-fill (GB estimates, bf16), a multiple of 8."""
    total = torch.cuda.get_device_properties(0).total_memory / 1e9
    h, f, kv, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"], cfg["head_dim"]
    q = cfg["num_attention_heads"] * d
    per_layer = (2 * h * q + 2 * h * kv * d + 3 * h * f) * 2 / world / 1e9 + 2 * n_max * kv * d * 2 * 2 / world / 1e9
    fixed = 2 * cfg["vocab_size"] * h * 2 / world / 1e9 + 14 * n_max / 131072 + 6  # embed + head, activations, slack
    return max(8, min(cfg["num_hidden_layers"], int((total - fixed) / per_layer) // 8 * 8))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def ttft(model, ids, reps: int, device: str) -> list[float]:
    """Wall time of a pre-fill (logits of the last token, KV cache kept), slowest rank, after a warm-up."""
    times = []
    for i in range(reps + 1):
        dist.barrier()
        sync(device)
        t = time.perf_counter()
        model(ids, logits_to_keep=1, use_cache=True)
        sync(device)
        dt = torch.tensor([time.perf_counter() - t], dtype=torch.float64, device=device)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if i:
            times.append(float(dt))
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="65536,131072")
    ap.add_argument("--layers", default="auto")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shapes")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group("gloo" if args.smoke else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [int(x) for x in args.sizes.split(",")] if not args.smoke else [256, 384]
    cfg = dict(SMOKE if args.smoke else LLAMA_31_70B)
    full_layers = cfg["num_hidden_layers"]
    if args.layers != "auto":
        cfg["num_hidden_layers"] = int(args.layers)
    elif not args.smoke:
        cfg["num_hidden_layers"] = auto_layers(cfg, max(sizes), world)
    n_layers = cfg["num_hidden_layers"]
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], max(sizes))
    stub = os.path.join(tempfile.gettempdir(), f"sparseinfer-70b-stub-{n_layers}")
    if rank == 0:
        os.makedirs(stub, exist_ok=True)
        write_stub(stub, cfg)
    dist.barrier()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(stub, tp_plan="auto", dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    shard = sparseinfer.parallel.head_shard(model)
    if rank == 0:
        print(f"world {world}, {n_layers} of {full_layers} layers, loaded in {load_s:.1f} s; rank 0 holds query heads "
              f"{shard.q.start}-{shard.q.stop - 1}, KV heads {shard.kv.start}-{shard.kv.stop - 1}", flush=True)
    weights_gb = (torch.cuda.memory_allocated() if device == "cuda" else 0) / 1e9
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        dense_ctx = lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)  # noqa: E731
    else:
        dense_ctx = contextlib.nullcontext
    gen = torch.Generator(device=device).manual_seed(0)
    mcfg = minference_config(cfg["num_attention_heads"], n_layers)
    small = dict(vertical=16, slash=32, last_q=16) if args.smoke else dict(vertical=NV, slash=NS)
    rows = []
    for n in sizes:
        ids = torch.randint(0, cfg["vocab_size"], (1, n), device=device, generator=gen)
        res = {}
        for label, method, options in (
            ("dense (cuDNN SDPA)", None, {}),
            ("vertical_slash", "vertical_slash", small),
            ("minference (synthetic config)", "minference", {"config": mcfg} if not args.smoke else
             {"config": minference_config(cfg["num_attention_heads"], n_layers), "last_q": 16}),
        ):
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            handle = None
            if method is not None:
                # backend="triton": the kernel at every size (auto would route below its break-even to dense)
                handle = sparseinfer.patch(model, method, min_len=0, backend="triton" if device == "cuda" else "reference",
                                           **options)
                if not args.smoke:
                    for m in model.modules():
                        plan = getattr(m, "_sparseinfer", None)
                        if plan is not None and plan.pattern is not None:
                            wrap = RealisticIndices if method == "vertical_slash" else RealisticMInference
                            plan.pattern = wrap(plan.pattern, gen)
            with dense_ctx():
                times = ttft(model, ids, args.reps, device)
            density = handle.stats.density() if handle else 1.0
            if handle:
                sparseinfer.unpatch(model)
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0], dtype=torch.float64,
                                device=device)
            peaks = [torch.zeros_like(peak) for _ in range(world)]
            dist.all_gather(peaks, peak)
            res[label] = (min(times), times, density, [round(float(p), 1) for p in peaks])
        dense = res["dense (cuDNN SDPA)"][0]
        for label, (t, times, density, peaks) in res.items():
            row = {"n": n, "method": label, "ttft_s": round(t, 3), "all_s": [round(x, 3) for x in times],
                   "ttft_80_layers_s": round(t * full_layers / n_layers, 2), "speedup_vs_dense": round(dense / t, 2),
                   "density": round(density, 4), "peak_gb_per_gpu": peaks}
            rows.append(row)
            if rank == 0:
                print(f"N={n:>7} {label:32s} {t:8.3f} s  x{dense / t:5.2f}  density {density:.3f}  peak GB/GPU {peaks}",
                      flush=True)
    if rank == 0:
        import transformers

        try:
            import triton

            triton_v = triton.__version__
        except ImportError:
            triton_v = None
        meta = {"device": f"{world} x " + (torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"),
                "torch": torch.__version__, "triton": triton_v, "transformers": transformers.__version__,
                "python": platform.python_version(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "model": "Llama-3.1-70B shape, random bf16 weights, tp_plan='auto'", "tp": world, "layers": n_layers,
                "full_layers": full_layers, "weights_gb_per_gpu": round(weights_gb, 1), "load_s": round(load_s, 1),
                "vertical": NV, "slash": NS, "reps": args.reps}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "multigpu.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        lines = [f"# Time to first token, Llama-3.1-70B shape, tensor parallel over {world} GPUs", "",
                 f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
                 f"{meta['date']}. {n_layers} of the 80 layers (what fits beside the pre-fill), random bf16 weights "
                 f"sharded at load ({meta['weights_gb_per_gpu']} GB per GPU), batch 1. Best of {args.reps} after a "
                 f"warm-up, slowest rank; speedup vs dense cuDNN SDPA in this run. Sparse rows: estimation in every "
                 f"layer, realistic index sets ({NV} verticals / {NS} slashes).", "",
                 "| N | method | TTFT (s) | scaled to 80 layers (s) | speedup | attention density | peak GB per GPU |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['method']} | {r['ttft_s']:.3f} | {r['ttft_80_layers_s']:.1f} | "
                  f"{r['speedup_vs_dense']:.2f}x | {100 * r['density']:.1f}% | {r['peak_gb_per_gpu']} |" for r in rows]
        with open(os.path.join(args.out, "multigpu.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
