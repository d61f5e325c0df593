"""Does Deja Vu's blocked selection cost accuracy? SmolLM2-135M on the CPU (float32, held-out
essays, every token sparse), the shipped glu predictors, for each selection block size (None =
one global top-K; otherwise each block of `block` neurons keeps its share of the K,
`sparseinfer.contextual.dejavu.blocked_top_mask`):

- with the predictors: perplexity and mean KL(dense || sparse) at several MLP sparsities
  (`sparseinfer.eval.contextual.run`, 2 windows of 1024 tokens);
- with the oracle scores (the true |SiLU(gate) * up|): perplexity change, i.e. what blocking
  costs a perfect predictor.

    python benchmarks/blocked_select_quality.py --out benchmarks/results/contextual   # ~8 min, 2 CPU cores
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sparseinfer.eval.contextual as ev  # noqa: E402
from sparseinfer.contextual.dejavu import blocked_top_mask  # noqa: E402
from sparseinfer.data import heldout_text  # noqa: E402
from sparseinfer.models import load_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--blocks", default="none,32,64,128,256")
    ap.add_argument("--sparsity", default="0.25,0.4,0.5,0.7")
    ap.add_argument("--windows", type=int, default=2)
    args = ap.parse_args()
    blocks = [None if b == "none" else int(b) for b in args.blocks.split(",")]
    sparsity = [float(s) for s in args.sparsity.split(",")]
    model, tok = load_model()
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__,
           "predictor": [], "oracle": []}
    settings = [ev.Setting("dense")] + [ev.Setting("dejavu", "dejavu", s) for s in sparsity]
    attach = ev.attach
    for block in tqdm(blocks, desc="predictor, block sizes"):
        ev.attach = lambda *a, block=block, **k: attach(*a, select_block=block, **k)
        try:
            rows = ev.run(model, tok, settings, length=1024, windows=args.windows, progress=False)
        finally:
            ev.attach = attach
        for r in rows[1:]:
            res["predictor"].append({"block": block, "sparsity": r["mlp_sparsity"], "ppl": r["ppl"], "kl": r["kl"],
                                     "dense_ppl": rows[0]["ppl"]})
    # oracle: each MLP keeps the true top-K of |h| (globally or per block)
    ids = tok(heldout_text(), return_tensors="pt").input_ids[:, :1024]
    state: dict = {}

    def wrap(mlp):
        orig = mlp.forward

        def forward(x):
            if not state:
                return orig(x)
            h = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
            k = round((1 - state["sparsity"]) * h.shape[-1])
            return mlp.down_proj(h * blocked_top_mask(h.abs(), k, state["block"]))

        mlp.forward = forward
        return orig

    origs = [wrap(layer.mlp) for layer in model.model.layers]

    def ppl() -> float:
        with torch.no_grad():
            return math.exp(float(model(ids, labels=ids).loss))

    dense = ppl()
    for s in tqdm(sparsity, desc="oracle"):
        for block in blocks:
            state.update(sparsity=s, block=block)
            res["oracle"].append({"block": block, "sparsity": s, "ppl_change_pct": round(100 * (ppl() / dense - 1), 2)})
            state.clear()
    for layer, o in zip(model.model.layers, origs):
        layer.mlp.forward = o
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "blocked_select_quality.json"), "w") as f:
        json.dump(res, f, indent=1)
    name = lambda b: "global" if b is None else f"blocks of {b}"  # noqa: E731
    lines = ["# Deja Vu blocked selection vs one global top-K (SmolLM2-135M)", "",
             f"`python benchmarks/blocked_select_quality.py`; {res['date']}, {res['device']}, torch {res['torch']}; "
             f"held-out essays, {args.windows} x 1024 tokens, every token sparse, shipped glu predictors (rank 128).", "",
             "## With the predictors: perplexity / mean KL vs dense", "",
             "| selection | " + " | ".join(f"{s:.0%} sparsity" for s in sparsity) + " |",
             "|---|" + "---|" * len(sparsity)]
    for b in blocks:
        cells = [next(f"{r['ppl']:.2f} / {r['kl']:.3f}" for r in res["predictor"] if r["block"] == b and r["sparsity"] == s)
                 for s in sparsity]
        lines.append(f"| {name(b)} | " + " | ".join(cells) + " |")
    lines += ["", f"Dense perplexity {res['predictor'][0]['dense_ppl']:.2f}.", "",
              "## Oracle scores (true |SiLU(gate) * up|): perplexity change vs dense (1024 tokens)", "",
              "| selection | " + " | ".join(f"{s:.0%} sparsity" for s in sparsity) + " |",
              "|---|" + "---|" * len(sparsity)]
    for b in blocks:
        cells = [next(f"{r['ppl_change_pct']:+.2f}%" for r in res["oracle"] if r["block"] == b and r["sparsity"] == s)
                 for s in sparsity]
        lines.append(f"| {name(b)} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "blocked_select_quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
