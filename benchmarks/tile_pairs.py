"""Would wider key tiles pay for 64-block lists? One device call (H100):

1. the share of the learned 64-block gate's kept blocks (threshold 1e-3, structured q/k, 128K) and of
   the realistic top-100 lists that come in aligned pairs (blocks 2j, 2j + 1 both kept = one 128-wide
   key tile) or in greedy pairs (any two consecutive kept blocks);
2. the kernel on the same 128-block lists with 64 x 64, 64 x 128 and 128 x 128 tiles (the gain a
   64 x 128 tile loop over pairs could give), checked against the 64 x 64 result.
Writes results/tile_pairs.{json,md}."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention as base  # noqa: E402
import adaptive  # noqa: E402
from sparseinfer import kernels  # noqa: E402


def pair_shares(block_idx: torch.Tensor) -> tuple[float, float]:
    """block_idx [B, H, nb, K] ascending rows (-1 padding at the end) -> (aligned, greedy): share
    of the kept blocks that lie in aligned pairs / in greedy pairs of consecutive blocks."""
    x = block_idx.long()
    valid = x >= 0
    nxt = torch.cat([x[..., 1:], torch.full_like(x[..., :1], -1)], -1)
    aligned = valid & (x % 2 == 0) & (nxt == x + 1)
    # greedy: within each run of consecutive ids, floor(len / 2) pairs
    prev = torch.cat([torch.full_like(x[..., :1], -2), x[..., :-1]], -1)
    start = valid & (prev != x - 1)
    run_id = torch.cumsum(start.long(), -1)
    lens = torch.zeros(*x.shape[:-1], x.shape[-1] + 1, dtype=torch.long, device=x.device)
    lens.scatter_add_(-1, torch.where(valid, run_id, 0), valid.long())
    pairs = (lens[..., 1:] // 2).sum()
    n = valid.sum()
    return float(2 * aligned.sum() / n), float(2 * pairs / n)


def main():
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "shares": {}, "times": []}
    import triton
    out["triton"] = triton.__version__
    n = 131072
    adaptive._CTX.update(dev=dev, n=n, log=print)
    q, k = base.structured_qk(1, n, dev, gen)
    from sparseinfer.patterns.adaptive import AdaptiveLayer
    pat = AdaptiveLayer(adaptive.distilled_gate(64), 0, threshold=1e-3)
    parts = pat.select(q, k, base.D ** -0.5)
    bi = parts[0].kwargs["block_idx"]
    out["shares"]["gate 64 threshold 1e-3 128K"] = pair_shares(bi)
    print("gate shares (aligned, greedy):", out["shares"]["gate 64 threshold 1e-3 128K"], flush=True)
    del parts, bi, q, k
    for nn in (131072, 524288):
        bi = base.realistic_blocks(1, base.HQ, nn, dev, gen)
        bi = torch.sort(torch.where(bi >= 0, bi, 1 << 30), -1).values
        dup = torch.zeros_like(bi, dtype=torch.bool)
        dup[..., 1:] = bi[..., 1:] == bi[..., :-1]
        bi = torch.sort(torch.where(dup | (bi == 1 << 30), 1 << 30, bi), -1).values
        bi = torch.where(bi == 1 << 30, -1, bi)
        out["shares"][f"realistic top-100 {nn // 1024}K"] = pair_shares(bi)
        print(nn, "realistic shares:", out["shares"][f"realistic top-100 {nn // 1024}K"], flush=True)
    del bi
    q, k, v = base.random_qkv(1, base.HQ, base.HKV, n, base.D, dev, gen, torch.bfloat16)
    scale = base.D ** -0.5
    dense = base.bench(base.dense_fns(q, k, v)["cudnn"], budget_s=1.0)
    out["dense_cudnn_ms"] = dense
    print(f"dense cudnn {dense:.2f} ms", flush=True)
    cfgs = [(64, 64, 4, 3, 1, 0), (64, 64, 4, 2, 1, 0), (64, 128, 4, 3, 1, 0), (64, 128, 4, 2, 1, 0),
            (64, 128, 8, 3, 1, 0), (64, 128, 8, 2, 1, 0), (128, 128, 8, 3, 1, 0)]
    for share in (0.2, 0.6):
        lists = base.share_blocks(1, base.HQ, n, 128, share, dev, gen)
        ref = kernels.block_sparse_attention(q, k, v, lists, 128, scale, config=cfgs[0])
        for rnd in range(2):
            for cfg in cfgs:
                try:
                    o = kernels.block_sparse_attention(q, k, v, lists, 128, scale, config=cfg)
                    err = float((o.float() - ref.float()).abs().max())
                    t = base.bench(lambda: kernels.block_sparse_attention(q, k, v, lists, 128, scale, config=cfg),
                                   budget_s=0.5)
                except Exception as e:  # noqa: BLE001
                    err, t = float("nan"), float("nan")
                    print(f"{cfg} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                out["times"].append({"share": share, "round": rnd, "config": cfg, "ms": t, "max_abs_diff": err})
                print(f"share {share} round {rnd} {cfg} {t:8.2f} ms diff {err:.2e}", flush=True)
    d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(d, "tile_pairs.json"), "w") as f:
        json.dump(out, f, indent=1)
    lines = [f"# Key tile width on 128-block lists; pairs in 64-block lists ({out['device']})", "",
             f"{out['date']}; torch {out['torch']}, triton {out['triton']}; one Llama-3-8B layer (32 / 8 heads, D 128, "
             f"bf16), 128K; dense cuDNN {dense:.2f} ms. Script: benchmarks/tile_pairs.py.", "",
             "| lists | share of kept blocks in aligned pairs | in greedy pairs |", "|---|---|---|"]
    lines += [f"| {k_} | {a:.3f} | {g:.3f} |" for k_, (a, g) in out["shares"].items()]
    lines += ["", "| 128-block lists, share kept | round | (block_m, block_n, warps, stages) | ms | max abs diff vs 64 x 64 |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['share']} | {r['round']} | {tuple(r['config'][:4])} | {r['ms']:.2f} | {r['max_abs_diff']:.1e} |"
              for r in out["times"]]
    with open(os.path.join(d, "tile_pairs.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
