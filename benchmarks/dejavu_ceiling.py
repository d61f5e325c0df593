"""How good can per-token MLP neuron selection be on SmolLM2-135M? Perplexity on held-out
essays (1024 tokens, every token sparse, CPU, float32) when each token keeps the top-K neurons
of its SwiGLU hidden state h = SiLU(gate) * up ranked by

- oracle: the true |h| (the ceiling any predictor can reach),
- svd r: |SiLU(g~) * u~| with g~, u~ from rank-r truncated SVDs of W_gate and W_up (a
  training-free low-rank predictor),
- int b: |SiLU(g~) * u~| with g~, u~ from b-bit copies of W_gate and W_up (symmetric, one
  scale per 64 input channels: b/16 of their bf16 bytes); "int b gate": |SiLU(g~)| alone
  (CATS's score on a b-bit gate copy: half those bytes),

against the trained Deja Vu predictors in docs/contextual.md (same text, same protocol).

    python benchmarks/dejavu_ceiling.py --out benchmarks/results/contextual --bits 4,3   # ~4 min, 2 CPU cores
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseinfer.contextual.dejavu import blocked_top_mask  # noqa: E402
from sparseinfer.data import heldout_text  # noqa: E402
from sparseinfer.models import load_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--keep", default="0.75,0.6,0.5")
    ap.add_argument("--ranks", default="128,256")
    ap.add_argument("--bits", default="", help="e.g. '4,3,2': b-bit copies of W_gate / W_up as the predictor")
    ap.add_argument("--block", type=int, default=None,
                    help="the package's blocked rule (each block of this many neurons keeps its share of K; "
                         "contextual.dejavu.blocked_top_mask) instead of one global top-K per token")
    args = ap.parse_args()
    model, tok = load_model()
    ids = tok(heldout_text(), return_tensors="pt").input_ids[:, : args.tokens]
    state: dict = {}

    def ppl() -> float:
        with torch.no_grad():
            return math.exp(float(model(ids, labels=ids).loss))

    def wrap(mlp):
        orig = mlp.forward
        (ug, sg, vg), (uu, su, vu) = (torch.linalg.svd(w.weight.float(), full_matrices=False)
                                      for w in (mlp.gate_proj, mlp.up_proj))

        qcache: dict = {}  # bits -> (W_gate, W_up) rounded to b bits, symmetric, one scale per 64 inputs

        def quant(w, b, group=64):
            wg = w.float().reshape(w.shape[0], -1, group)
            qmax = 2 ** (b - 1) - 1
            sc = wg.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
            return ((wg / sc).round().clamp(-qmax - 1, qmax) * sc).reshape(w.shape)

        def forward(x):
            if not state:
                return orig(x)
            h = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
            if state["how"] == "oracle":
                score = h.abs()
            elif state["how"] in ("int", "int gate"):
                b = state["rank"]
                if b not in qcache:
                    qcache[b] = (quant(mlp.gate_proj.weight, b), quant(mlp.up_proj.weight, b))
                g = F.silu(x.float() @ qcache[b][0].T)
                score = g.abs() if state["how"] == "int gate" else (g * (x.float() @ qcache[b][1].T)).abs()
            else:
                r = state["rank"]
                g = (x.float() @ vg[:r].T * sg[:r]) @ ug[:, :r].T
                u = (x.float() @ vu[:r].T * su[:r]) @ uu[:, :r].T
                score = (F.silu(g) * u).abs()
            k = round(state["keep"] * h.shape[-1])
            return mlp.down_proj(h * blocked_top_mask(score, k, args.block))

        mlp.forward = forward

    for layer in model.model.layers:
        wrap(layer.mlp)
    dense = ppl()
    rows = [{"how": "dense", "keep": 1.0, "ppl": round(dense, 3), "delta_pct": 0.0}]
    print(f"dense ppl {dense:.3f}", flush=True)
    for keep in (float(x) for x in args.keep.split(",")):
        kinds = [("oracle", None, "oracle")] + [("svd", int(r), f"svd r={r}") for r in args.ranks.split(",") if r]
        kinds += [(how, int(b), f"int {b}{tail}") for b in args.bits.split(",") if b
                  for how, tail in (("int", ""), ("int gate", " gate only"))]
        for how, rank, label in kinds:  # rank: the SVD rank, or the bits of the int copies
            state.update(how=how, keep=keep, rank=rank)
            p = ppl()
            rows.append({"how": label, "keep": keep, "ppl": round(p, 3),
                         "delta_pct": round(100 * (p / dense - 1), 1)})
            print(f"keep {keep:.2f} {rows[-1]['how']:<10} ppl {p:.3f} ({rows[-1]['delta_pct']:+.1f}%)", flush=True)
        state.clear()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
            "model": "smollm2-135m (float32)", "tokens": int(ids.shape[1]), "block": args.block}
    os.makedirs(args.out, exist_ok=True)
    name = "dejavu_ceiling" + ("" if args.block is None else f"_block{args.block}")
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = ["# Per-token MLP neuron selection on SmolLM2-135M: the ceiling", "",
             f"{meta['date']}, CPU, torch {meta['torch']}; {meta['tokens']} held-out tokens, every token sparse. "
             "MLP sparsity = 1 - keep; " + ("global top-K per token" if args.block is None else
                                            f"blocks of {args.block} neurons each keep their share of K") +
             ". The trained Deja Vu predictors on the same text: "
             "`docs/contextual.md`.", "",
             "| ranking | keep | ppl | vs dense |", "|---|---|---|---|"]
    lines += [f"| {r['how']} | {r['keep']} | {r['ppl']} | {r['delta_pct']:+.1f}% |" for r in rows]
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
