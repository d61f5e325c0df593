"""Where the learned 64-block gate's kernel time goes with pair blocks (one device call, 128K,
threshold 1e-3, structured q/k): the share of kept cells in pair blocks, then the parts of one
block_sparse_attention call timed apart (row split, pair split, the pair launch, the rest launch with
its merge, the whole call) against the one-launch path, with the density limit of each part.
Writes results/pair_parts.{json,md}."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adaptive  # noqa: E402
import attention as base  # noqa: E402
from sparseinfer import index as sidx  # noqa: E402
from sparseinfer.kernels import attention as katt  # noqa: E402
from sparseinfer.kernels.rows import pair_split  # noqa: E402
from sparseinfer.patterns.adaptive import AdaptiveLayer  # noqa: E402


def main():
    dev, gen, n = base.gpu_setup()
    adaptive._CTX.update(dev=dev, n=n, log=print)
    q, k = base.structured_qk(1, n, dev, gen)
    v = torch.randn(1, base.HKV, n, base.D, device=dev, generator=gen).to(q.dtype)
    scale = base.D ** -0.5
    dense = base.bench(base.dense_fns(q, k, v)["cudnn"], budget_s=1.0)
    sel = AdaptiveLayer(adaptive.distilled_gate(64), 0, threshold=1e-3).select(q, k, scale)[0]
    idx = sel.kwargs["block_idx"]
    dens = float(sel.density.mean())
    before, diag = sidx.row_split(idx, sorted_blocks=True)
    pairs, pc, rest, rc = pair_split(idx, before, None)
    causal = n * (n + 1) / 2 * base.HQ
    pair_cells = float(pc.sum()) * 128 * 128 / causal
    cfg = katt._config("blocks", base.D, dev)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=dev)
    wide = sidx.from_pairs(pairs, pc, n, 128)
    ridx = sidx._block_index(n, 64, 64, rest, rc, diag, tile_scale=64)

    def whole(flag):
        def call():
            katt.FLAGS["BS_PAIRS"] = flag  # set at call time (the dict below builds every lambda first)
            return katt.block_sparse_attention(q, k, v, idx, 64, scale, sorted_blocks=True)
        return call

    parts = {
        "row split (bisection)": lambda: sidx.row_split(idx, sorted_blocks=True),
        "pair split": lambda: pair_split(idx, before, None),
        "pair launch (128 x 128)": lambda: katt.run_index(q, k, v, wide, scale, 128, *katt.PAIR_CONFIG["cuda"], out=out,
                                                          lse_out=lse),
        "rest launch + merge (64 x 64)": lambda: katt.run_index(q, k, v, ridx, scale, 64, *cfg[2:], out=out,
                                                                prior=(out, lse, pc, 1)),
        **{f"rest launch + merge, {w} warps {st} stages": (
            lambda w=w, st=st: katt.run_index(q, k, v, ridx, scale, 64, w, st, 1, 0, out=out, prior=(out, lse, pc, 1)))
           for w, st in ((4, 2), (4, 4), (8, 2))},
        "rest launch + merge (64 x 64, again)": lambda: katt.run_index(q, k, v, ridx, scale, 64, *cfg[2:], out=out,
                                                                       prior=(out, lse, pc, 1)),
        "whole call, pairs": whole("auto"),
        "whole call, one launch": whole(0),
        "whole call, pairs (again)": whole("auto"),
        "whole call, one launch (again)": whole(0),
    }
    rows = []
    for name, fn in parts.items():
        t = base.bench(fn, budget_s=1.0)
        rows.append({"part": name, "ms": t})
        print(f"{name:32s} {t:8.3f} ms", flush=True)
    katt.FLAGS["BS_PAIRS"] = "auto"
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "n": n, "dense_cudnn_ms": dense,
            "density": dens, "pair_cell_share_of_causal": pair_cells, "pair_cell_share_of_kept": pair_cells / dens,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(meta), flush=True)
    d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(d, "pair_parts.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# The learned 64-block gate's kernel with pair blocks, part by part ({meta['device']})", "",
             f"{meta['date']}; torch {meta['torch']}; one Llama-3-8B layer (32 / 8 heads, D 128, bf16), N={n}, structured "
             f"q/k, threshold 1e-3; dense cuDNN {dense:.2f} ms; kept density {100 * dens:.1f}% of the causal cells, "
             f"{100 * pair_cells:.1f}% in pair blocks (= {100 * pair_cells / dens:.0f}% of the kept cells). "
             f"`python benchmarks/pair_parts.py {n}`.", "",
             "| part | ms | dense-equivalent ms of its cells |", "|---|---|---|"]
    for r in rows:
        e = (dense * pair_cells if r["part"].startswith("pair launch") else dense * (dens - pair_cells)
             if r["part"].startswith("rest launch") else dense * dens if r["part"].startswith("whole") else None)
        lim = "" if e is None else f"{e:.2f} ({100 * e / r['ms']:.0f}% of the limit)"
        lines.append(f"| {r['part']} | {r['ms']:.3f} | {lim} |")
    with open(os.path.join(d, "pair_parts.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
