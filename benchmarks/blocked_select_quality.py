"""Does Deja Vu's blocked selection cost accuracy? SmolLM2-135M on the CPU (float32, held-out
essays, every token sparse), the shipped glu predictors, for each selection block size (None =
one global top-K; otherwise each block of `block` neurons keeps its share of the K,
`sparseinfer.contextual.dejavu.blocked_top_mask`):

- with the predictors: perplexity and mean KL(dense || sparse) at several MLP sparsities
  (`sparseinfer.eval.contextual.run`, 2 windows of 1024 tokens);
- with the oracle scores (the true |SiLU(gate) * up|): perplexity change, i.e. what blocking
  costs a perfect predictor;
- needle retrieval with the sparsity on the decode steps (global vs the default block, at
  --niah-sparsity, --niah-depths depths per length; `sparseinfer eval niah`'s prompts).

    python benchmarks/blocked_select_quality.py --out benchmarks/results/contextual   # ~15 min, 2 CPU cores
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
import sparseinfer.contextual as contextual  # noqa: E402
from sparseinfer.contextual.dejavu import SELECT_BLOCK, blocked_top_mask  # noqa: E402
from sparseinfer.eval.runner import run_niah  # noqa: E402
from sparseinfer.data import heldout_text  # noqa: E402
from sparseinfer.models import load_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--blocks", default="none,32,64,128,256")
    ap.add_argument("--sparsity", default="0.25,0.4,0.5,0.7")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--niah-lengths", default="1024,2048")
    ap.add_argument("--niah-depths", type=int, default=10)
    ap.add_argument("--niah-sparsity", default="0.25,0.4")
    args = ap.parse_args()
    blocks = [None if b == "none" else int(b) for b in args.blocks.split(",")]
    sparsity = [float(s) for s in args.sparsity.split(",")]
    model, tok = load_model()
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__,
           "predictor": [], "oracle": [], "niah": []}
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
    # needle retrieval: patch(...) -> contextual.attach, with the selection rule forced
    lengths = [int(x) for x in args.niah_lengths.split(",") if x]
    attach_c = contextual.attach
    for s in [float(x) for x in args.niah_sparsity.split(",") if lengths and x]:
        for block in (None, SELECT_BLOCK):
            contextual.attach = lambda *a, block=block, **k: attach_c(*a, **dict(k, select_block=block))
            try:
                got = run_niah(model, tok, [f"dense:mlp=dejavu:mlp_sparsity={s}"], lengths, args.niah_depths,
                               progress=False)
            finally:
                contextual.attach = attach_c
            for L in lengths:
                hits = [r.correct for r in got if r.length == L]
                res["niah"].append({"block": block, "sparsity": s, "length": L, "correct": sum(hits), "of": len(hits)})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "blocked_select_quality.json"), "w") as f:
        json.dump(res, f, indent=1)
    def table(title: str, part: str, cell) -> list[str]:
        """One row per selection, one column per sparsity."""
        out = [title, "", "| selection | " + " | ".join(f"{s:.0%} sparsity" for s in sparsity) + " |",
               "|---|" + "---|" * len(sparsity)]
        for b in blocks:
            cells = [cell(next(r for r in res[part] if r["block"] == b and r["sparsity"] == s)) for s in sparsity]
            out.append(f"| {'global' if b is None else f'blocks of {b}'} | " + " | ".join(cells) + " |")
        return out

    lines = ["# Deja Vu blocked selection vs one global top-K (SmolLM2-135M)", "",
             f"`python benchmarks/blocked_select_quality.py`; {res['date']}, {res['device']}, torch {res['torch']}; "
             f"held-out essays, {args.windows} x 1024 tokens, every token sparse, shipped glu predictors (rank 128).", ""]
    lines += table("## With the predictors: perplexity / mean KL vs dense", "predictor",
                   lambda r: f"{r['ppl']:.2f} / {r['kl']:.3f}")
    lines += ["", f"Dense perplexity {res['predictor'][0]['dense_ppl']:.2f}.", ""]
    lines += table("## Oracle scores (true |SiLU(gate) * up|): perplexity change vs dense (1024 tokens)", "oracle",
                   lambda r: f"{r['ppl_change_pct']:+.2f}%")
    if res["niah"]:
        lines += ["", f"## Needle retrieval, decode steps sparse ({args.niah_depths} depths per length)", "",
                  "| MLP sparsity | selection | " + " | ".join(f"{L} tok" for L in lengths) + " |",
                  "|---|---|" + "---|" * len(lengths)]
        for s in sorted({r["sparsity"] for r in res["niah"]}):
            for b in (None, SELECT_BLOCK):
                cells = [next(f"{r['correct']}/{r['of']}" for r in res["niah"]
                              if r["block"] == b and r["sparsity"] == s and r["length"] == L) for L in lengths]
                lines.append(f"| {s:.0%} | {'global' if b is None else f'blocks of {b}'} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "blocked_select_quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
