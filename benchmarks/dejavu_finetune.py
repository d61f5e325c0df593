"""Deja Vu glu predictors on SmolLM2-135M: the closed-form fit (`dejavu.fit_glu`) vs the same fit
fine-tuned for the selection (`dejavu.finetune_glu`, the default of `train` / `sparseinfer
train-predictors`). Both from the same calibration activations (the first `--tokens` tokens of
`haystack_text`, the last 25% held out for the recall report, as `dejavu.train` does); perplexity,
KL and top-1 vs dense on held-out essays with every token sparse, through the library's patched
path (`sparseinfer.eval.contextual.run`, the protocol of docs/contextual.md).

    python benchmarks/dejavu_finetune.py --out benchmarks/results/contextual     # ~25 min, 2 CPU cores
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparseinfer.contextual import dejavu  # noqa: E402
from sparseinfer.contextual.activations import collect, decoder_layers  # noqa: E402
from sparseinfer.data import haystack_text  # noqa: E402
from sparseinfer.eval import contextual as ev  # noqa: E402
from sparseinfer.models import load_model  # noqa: E402


def blocked_kept(s, mag, keep):
    """Share of sum(h^2) kept by the blocked selection of the scores (the inference rule)."""
    k = max(1, round(keep * mag.shape[1]))
    e = mag.float() ** 2
    return float(((e * dejavu.blocked_top_mask(s, k, dejavu.SELECT_BLOCK)).sum(1) / e.sum(1)).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default: %(default)s)")
    ap.add_argument("--length", type=int, default=1024, help="held-out tokens (default: %(default)s)")
    ap.add_argument("--ranks", default="128,256")
    ap.add_argument("--sparsity", default="0.25,0.4,0.5")
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps per layer (default: %(default)s)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, tok = load_model()
    acts = collect(model, tok, haystack_text(), args.tokens, 1024, False, ("mlp_in", "down_in"))
    t_collect = time.perf_counter() - t0
    weights = [(lay.mlp.gate_proj.weight.detach().float(), lay.mlp.up_proj.weight.detach().float())
               for lay in decoder_layers(model)]
    n = acts.n_tokens
    n_val = max(1, int(n * 0.25))
    tr, va = slice(0, n - n_val), slice(n - n_val, n)
    sparsity = [float(s) for s in args.sparsity.split(",")]
    preds, fits = {}, []
    for rank in (int(r) for r in args.ranks.split(",")):
        closed, tuned = [], []
        sec = {"closed": 0.0, "finetune": 0.0}
        rec = {"closed": {}, "finetuned": {}}
        for i, (wg, wu) in enumerate(weights):
            x = acts.layer("mlp_in", i).float()
            mag = acts.layer("down_in", i).float().abs()
            t1 = time.perf_counter()
            m = x[tr].double()
            A, B = dejavu.fit_glu(x[tr], torch.cat([m @ wg.double().T, m @ wu.double().T], dim=1), rank)
            t2 = time.perf_counter()
            A2, B2 = dejavu.finetune_glu(x[tr], mag[tr], A, B, args.steps, gen=torch.Generator().manual_seed(i))
            t3 = time.perf_counter()
            sec["closed"] += t2 - t1
            sec["finetune"] += t3 - t2
            for name, (a, b), out in (("closed", (A, B), closed), ("finetuned", (A2, B2), tuned)):
                p = dejavu.LayerPredictor(a, b, None)
                out.append(p)
                with torch.no_grad():
                    s = p.mlp_scores(x[va])
                for keep in (0.75, 0.6, 0.5):
                    r, kept, oracle = dejavu.recall(s, mag[va], keep)
                    d = rec[name].setdefault(str(keep), {"recall": 0.0, "kept": 0.0, "kept_blocked": 0.0, "oracle_kept": 0.0})
                    d["recall"] += r / len(weights)
                    d["kept"] += kept / len(weights)
                    d["kept_blocked"] += blocked_kept(s, mag[va], keep) / len(weights)
                    d["oracle_kept"] += oracle / len(weights)
            print(f"rank {rank} layer {i}: closed {t2 - t1:.1f} s, fine-tune {t3 - t2:.1f} s", flush=True)
        meta = {"kind": "glu", "rank": rank, "n_tokens": n, "mlp_input": "mlp_in"}
        preds[f"r={rank} closed"] = dejavu.Predictors(closed, dict(meta))
        preds[f"r={rank} finetuned"] = dejavu.Predictors(tuned, dict(meta, finetune_steps=args.steps))
        fits.append({"rank": rank, "seconds_closed": round(sec["closed"], 1), "seconds_finetune": round(sec["finetune"], 1),
                     "recall": {k: {kk: {m_: round(v, 4) for m_, v in vv.items()} for kk, vv in d.items()}
                                for k, d in rec.items()}})
        print(json.dumps(fits[-1]), flush=True)
    settings = [ev.Setting("dense")] + [ev.Setting("dejavu", "dejavu", s, predictors=key)
                                        for key in preds for s in sparsity]
    rows = ev.run(model, tok, settings, args.length, 1, progress=False, extra_predictors=preds)
    dense = rows[0]
    for r in rows:
        r["delta_pct"] = round(100 * (r["ppl"] / dense["ppl"] - 1), 2)
        print(f"{r['label']:<40} ppl {r['ppl']:.3f} ({r['delta_pct']:+.1f}%)  KL {r['kl']:.4f}  top1 {r['top1']:.3f}", flush=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(),
            "cpu": f"{platform.machine()}, {torch.get_num_threads()} threads", "model": "smollm2-135m (float32)",
            "calibration_tokens": n, "val_tokens": n_val, "heldout_tokens": args.length, "steps": args.steps,
            "seconds_collect": round(t_collect, 1), "seconds_total": round(time.perf_counter() - t0, 1)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dejavu_finetune.json"), "w") as f:
        json.dump({"meta": meta, "fits": fits, "rows": rows}, f, indent=1)
    lines = ["# Deja Vu glu predictors on SmolLM2-135M: closed form vs fine-tuned for the selection", "",
             f"{meta['date']}, CPU ({meta['cpu']}), torch {meta['torch']}; `python benchmarks/dejavu_finetune.py`. "
             f"Predictors fitted on {n} tokens of `haystack_text` ({n_val} held out for the recall columns); "
             f"perplexity on {args.length} held-out tokens (`heldout_text`), every token sparse, blocked top-K "
             f"selection ({dejavu.SELECT_BLOCK} neurons per block), masked reference path (`sparseinfer.eval.contextual.run`, "
             "as docs/contextual.md). Fine-tuning: `dejavu.finetune_glu`, "
             f"{args.steps} Adam steps per layer from the closed form, kept shares 0.6 and 0.5.", "",
             f"Dense ppl {dense['ppl']:.3f}.", "",
             "| rank | predictor | MLP sparsity | ppl | vs dense | KL (nats) | top-1 vs dense |", "|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        rank, how = r["predictors"].split(" ")
        lines.append(f"| {rank[2:]} | {how} | {r['mlp_sparsity']:.0%} | {r['ppl']:.3f} | {r['delta_pct']:+.1f}% | "
                     f"{r['kl']:.4f} | {r['top1']:.3f} |")
    lines += ["", "Mean over layers on the held-out calibration tokens: recall of the true top-K (global top-K, as the "
              "trainer reports) / share of sum(h^2) kept by the global / the blocked top-K (oracle in brackets); "
              "fit seconds for all 30 layers (collection of activations: "
              f"{meta['seconds_collect']} s).", "",
              "| rank | predictor | fit s | keep 75% | keep 60% | keep 50% |", "|---|---|---|---|---|---|"]
    for f_ in fits:
        for how in ("closed", "finetuned"):
            cells = [f"{d['recall']:.3f} / {d['kept']:.3f} / {d['kept_blocked']:.3f} ({d['oracle_kept']:.3f})"
                     for d in f_["recall"][how].values()]
            sec = f_["seconds_closed"] + (f_["seconds_finetune"] if how == "finetuned" else 0)
            lines.append(f"| {f_['rank']} | {how} | {sec:.0f} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "dejavu_finetune.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
