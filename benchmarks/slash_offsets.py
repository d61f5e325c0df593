"""Where do a real model's estimated slashes sit? SmolLM2-135M on an 8K NIAH prompt (CPU).

For every layer, vertical-slash estimation (last 64 queries, 1000 verticals / 6096-equivalent
share of slashes = 5% of N each) and the share of the chosen slash offsets below 64, 512,
1024 and N/2. Compare with the structured / i.i.d. inputs of benchmarks/attention.py.

    python benchmarks/slash_offsets.py [--length 8192]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import sparseinfer
from sparseinfer.eval.needle import NeedleBuilder
from sparseinfer.patterns import vertical_slash as vs

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=8192)
    args = ap.parse_args()
    model, tok = sparseinfer.load_model("smollm2-135m")
    ids = NeedleBuilder(tok, seed=3).build(args.length, 0.5).input_ids
    n = len(ids)
    bounds = (64, 512, 1024, n // 2)
    rows = []

    def observe(layer, q, k, scale):
        _, s_idx = vs.estimate(q, k, vertical=1, slash=max(1, n // 20), scale=scale)
        s = s_idx.flatten().float()
        rows.append({"layer": layer, **{f"below_{b}": round(float((s < b).float().mean()), 4) for b in bounds}})

    sparseinfer.patch(model, "dense")
    for m in model.modules():
        if hasattr(m, "_sparseinfer"):
            m._sparseinfer.observer = observe
    with torch.inference_mode():
        model(torch.tensor([ids]), logits_to_keep=1)
    sparseinfer.unpatch(model)
    mean = {key: round(sum(r[key] for r in rows) / len(rows), 4) for key in rows[0] if key != "layer"}
    out = {"model": "smollm2-135m", "tokens": n, "slash_budget": n // 20, "mean": mean, "layers": rows}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "slash_offsets_smollm2.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(mean))


if __name__ == "__main__":
    main()
