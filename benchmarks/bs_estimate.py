"""Block-sparse estimation (`patterns.block_sparse.estimate`, top-100 of 64-blocks) on one GPU: the
CUDA path (scores of the causal tiles only, `kernels.blockscores`, tf32x3; a top-k whose rows read
only up to their own block; launch settings in VARIANTS), the same top-k on cuBLAS float32 scores
of every cell, and the path they replaced (float32 scores scaled, masked above the diagonal, own
block set to +inf, then the top-k over whole rows), each
checked to keep the same blocks, timed with CUDA events one after the other, twice, and the
kernels of one call (torch.profiler). Structured q/k of benchmarks/attention.py, one Llama-3-8B
layer.

    python benchmarks/bs_estimate.py --sizes 131072,262144,524288 [--out DIR --tag bs_estimate]
    python benchmarks/bs_estimate.py --real-model [--sizes 2048,4096]   # CPU: SmolLM2, both paths vs dense
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import attention as A  # noqa: E402  (structured q/k, bench, run_meta)
from sparseinfer.kernels import topk as tk  # noqa: E402
from sparseinfer.kernels.topk import topk_indices  # noqa: E402
from sparseinfer.patterns import block_sparse as bs  # noqa: E402
from sparseinfer.patterns.base import group_scores  # noqa: E402


def masked_rows(q, k, topk, block_size=64):
    """The replaced path: scaled float32 scores, -inf above the diagonal, +inf on it, whole rows."""
    b, hq, n, d = q.shape
    nb = math.ceil(n / block_size)
    s = group_scores(bs.pool_blocks(q, block_size), bs.pool_blocks(k, block_size)).mul_(d ** -0.5)
    r = torch.arange(nb, device=q.device)
    s.masked_fill_(r[None, :] > r[:, None], float("-inf"))
    torch.diagonal(s, dim1=-2, dim2=-1).fill_(float("inf"))
    kk = min(topk, nb)
    idx = topk_indices(s.reshape(-1, nb), kk).view(b, hq, nb, kk).long()
    return torch.where(torch.gather(s, -1, idx) == float("-inf"), -1, idx)


# the causal top-k's launch settings (sparseinfer.kernels.topk): length classes on / off, warps
VARIANTS = {"causal, one launch, warps by width": {"CAUSAL_SPLIT": False, "CAUSAL_WARPS": None},
            "causal, length classes, warps by width": {"CAUSAL_WARPS": None},
            "causal, length classes, 4 warps (default)": {}}


def with_knobs(knobs: dict, fn):
    """fn() with sparseinfer.kernels.topk's CAUSAL_* settings changed, then restored."""
    keep = {name: getattr(tk, name) for name in knobs}
    for name, val in knobs.items():
        setattr(tk, name, val)
    try:
        return fn()
    finally:
        for name, val in keep.items():
            setattr(tk, name, val)


def cublas_scores_causal_topk(q, k, topk, block_size=64):
    """The estimate with float32 cuBLAS scores of every cell (not only the causal tiles) and the
    causal top-k: what the block-score kernel (tf32x3, causal tiles) replaces."""
    b, hq, n, d = q.shape
    nb = math.ceil(n / block_size)
    s = group_scores(bs.pool_blocks(q, block_size), bs.pool_blocks(k, block_size))
    return tk.topk_indices_causal(s.view(-1, nb), min(topk, nb)).view(b, hq, nb, -1).long()


def kernels_of(fn) -> list[dict]:
    """GPU kernels of one call: name, total us, count."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:90], "us": e.device_time_total, "count": e.count}
            for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r["us"])[:8]


def real_model(sizes: list[int], out: str, tag: str) -> None:
    """The embedded SmolLM2-135M patched with block_sparse (top 10% / 30% of 64-blocks) on Paul
    Graham essays, the estimate through the Triton path (bs.TOPK_KERNEL = True: the block-score
    kernel and the causal top-k, under the interpreter on a CPU, float32 products) and through
    torch: KL to dense, NLL, top-1 agreement with dense, density (sparseinfer.eval.adaptive.run_cell)."""
    import sparseinfer
    from sparseinfer.data import haystack_text
    from sparseinfer.eval.adaptive import _hidden, run_cell

    model, tok = sparseinfer.load_model("smollm2-135m")
    text = haystack_text()
    rows = []
    for n in sizes:
        ids = tok(text, return_tensors="pt").input_ids[:, 1000:1000 + n]
        with torch.inference_mode():
            dense = _hidden(model, ids)
        for topk in (0.1, 0.3):
            for mode in (False, True):
                bs.TOPK_KERNEL = mode
                r = run_cell(model, ids, dense, f"block_sparse:topk={topk}")
                rows.append({"N": n, "topk": topk, "path": "triton kernels (interpreter)" if mode else "torch",
                             **{k: r[k] for k in ("kl", "nll", "top1_agree", "density")}})
                print(rows[-1], flush=True)
    bs.TOPK_KERNEL = "auto"
    with open(os.path.join(out, f"{tag}.json"), "w") as f:
        json.dump({"model": "smollm2-135m (GGUF Q4_1, float32)", "torch": torch.__version__, "rows": rows}, f, indent=1)
    md = ["# Block-sparse estimate, both paths on SmolLM2-135M (CPU)", "",
          f"torch {torch.__version__}; Paul Graham essays (tokens 1000 ..), block_sparse top-k of 64-blocks; "
          "KL (nats / token) and top-1 agreement against the dense model on the same window.", "",
          "| N | top-k | estimate path | KL vs dense | NLL | top-1 agreement | density |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['N']} | {r['topk']} | {r['path']} | {r['kl']:.4f} | {r['nll']:.4f} | {r['top1_agree']:.4f} | "
           f"{r['density']:.3f} |" for r in rows]
    with open(os.path.join(out, f"{tag}.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default=None, help="default 131072,262144,524288 (GPU), 2048,4096 (--real-model)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="bs_estimate")
    ap.add_argument("--real-model", action="store_true", help="only: the CPU check on SmolLM2 (both paths vs dense)")
    args = ap.parse_args()
    if args.real_model:
        os.makedirs(args.out, exist_ok=True)
        real_model([int(x) for x in (args.sizes or "2048,4096").split(",")], args.out, args.tag)
        return
    args.sizes = args.sizes or "131072,262144,524288"
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    res = {"meta": A.run_meta(), "rows": [], "profiles": {}}
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    for n in [int(x) for x in args.sizes.split(",")]:
        torch.cuda.empty_cache()
        q, k = A.structured_qk(1, n, dev, gen)
        old = masked_rows(q, k, A.TOPK)
        paths = {"masked rows (replaced)": lambda: masked_rows(q, k, A.TOPK),
                 "cuBLAS scores, causal top-k": lambda: cublas_scores_causal_topk(q, k, A.TOPK)}
        for name, knobs in VARIANTS.items():
            paths[name] = (lambda kn: lambda: with_knobs(kn, lambda: bs.estimate(q, k, A.TOPK, A.BS)))(knobs)
        same = {}
        for name, fn in paths.items():
            got = fn()
            same[name] = int((got.sort(-1).values == old.sort(-1).values).all(-1).sum())
            log(f"N={n} {name}: rows keeping the replaced path's blocks {same[name]} / {old.shape[:-1].numel()}")
        for rnd in range(2):
            for name, fn in paths.items():
                ms = A.bench(fn, budget_s=0.5)
                res["rows"].append({"N": n, "path": name, "round": rnd, "ms": ms,
                                    "same_rows": same[name], "rows": old.shape[:-1].numel()})
                log(f"N={n} {name:34s} round {rnd}: {ms:8.2f} ms")
        res["profiles"][str(n)] = {name: kernels_of(fn) for name, fn in paths.items()
                                   if name in ("masked rows (replaced)", "causal, length classes, 4 warps (default)")}
        for name, ks in res["profiles"][str(n)].items():
            log(f"N={n} {name}: " + "; ".join(f"{r['kernel'][:40]} {r['us'] / 1e3:.2f} ms" for r in ks[:5]))
        del q, k, old
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump(res, f, indent=1)
    m = res["meta"]
    md = [f"# Block-sparse estimation, {m['device']}", "",
          f"{m['date']}; torch {m['torch']}, triton {m['triton']}; one Llama-3-8B layer (32 / 8 heads, D 128, bf16), "
          "structured q/k, top-100 of 64-blocks; ms = median of CUDA-event timings, two rounds in turn.", "",
          "| N | path | round | ms | rows keeping the same blocks |", "|---|---|---|---|---|"]
    md += [f"| {r['N'] // 1024}K | {r['path']} | {r['round']} | {r['ms']:.2f} | {r['same_rows']} / {r['rows']} |"
           for r in res["rows"]]
    md += ["", "## Kernels of one call (top 5)", ""] + [f"* {line}" for line in lines if ": " in line and "ms;" in line]
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
