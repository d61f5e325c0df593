"""Does writing the attention output into transformers' [B, N, H, D] layout (a transposed view, as
`integration.DIRECT_OUT` does) slow the kernel? One device call: A-shape (128 x 128 tiles), 128-block
lists keeping 60% (XAttention-like, 128 x 128 tiles) and the realistic top-100 64-block lists (64 x 64
tiles) at 128K, each timed with its own [B, H, N, D] output and with a transposed [B, N, H, D] buffer,
alternated twice; outputs compared. Writes results/out_layout.{json,md}."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention as base  # noqa: E402
from sparseinfer import kernels  # noqa: E402


def main():
    dev, gen, n = base.gpu_setup()
    q, k, v = base.random_qkv(1, base.HQ, base.HKV, n, base.D, dev, gen, torch.bfloat16)
    scale = base.D ** -0.5
    dense = base.bench(base.dense_fns(q, k, v)["cudnn"], budget_s=1.0)
    bi64 = base.realistic_blocks(1, base.HQ, n, dev, gen)
    bi128 = base.share_blocks(1, base.HQ, n, 128, 0.6, dev, gen)
    buf = torch.empty(1, n, base.HQ, base.D, dtype=q.dtype, device=dev)
    cases = {"ashape 128+4096": lambda out: kernels.ashape_attention(q, k, v, base.SINK, base.WINDOW, scale, out=out),
             "blocks 128, 60%": lambda out: kernels.block_sparse_attention(q, k, v, bi128, 128, scale, out=out),
             "blocks 64, top-100": lambda out: kernels.block_sparse_attention(q, k, v, bi64, 64, scale, out=out)}
    rows = []
    for name, fn in cases.items():
        ref = fn(None)
        got = fn(buf.transpose(1, 2))
        diff = float((got.float() - ref.float()).abs().max())
        for rnd in range(2):
            for layout, out in (("[B, H, N, D]", None), ("[B, N, H, D] view", buf.transpose(1, 2))):
                t = base.bench(lambda: fn(out), budget_s=1.0)
                rows.append({"case": name, "round": rnd, "out": layout, "ms": t, "max_abs_diff": diff})
                print(f"{name:20s} round {rnd} out {layout:18s} {t:8.2f} ms  (diff {diff:.1e})", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "n": n, "dense_cudnn_ms": dense,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(d, "out_layout.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Output layout and kernel time ({meta['device']})", "",
             f"{meta['date']}; torch {meta['torch']}; one Llama-3-8B layer (32 / 8 heads, D 128, bf16), N={n}; "
             f"dense cuDNN {dense:.2f} ms. `python benchmarks/out_layout.py {n}`.", "",
             "| case | round | output | ms | max abs diff between layouts |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['round']} | {r['out']} | {r['ms']:.2f} | {r['max_abs_diff']:.1e} |" for r in rows]
    with open(os.path.join(d, "out_layout.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
