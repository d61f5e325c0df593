"""The captured, compiled Llama-3.1-8B decode step without and with programmatic dependent launch.

PDL (sparseinfer/kernels/pdl.py) is a process-wide switch read when torch and sparseinfer are
imported (`TORCHINDUCTOR_ENABLE_PDL=1`: torch.compile's kernels and ours), so each mode runs
`benchmarks/contextual.py` part b in its own process on the same GPU, one after the other: the
whole 32-layer step (--full), 4K context, batch 1, bf16 random weights. Reported: each setting's
step time in both modes, its speedup against the fastest dense step of either mode, and the
largest logit difference between the modes (0 for the TEAL and Deja Vu steps: PDL moves kernel
starts, not what they compute; the dense step's differs deterministically, see
results/contextual/pdl_step_determinism.md).

    python benchmarks/pdl_step.py --out DIR [--settings "=dense (sparseinfer attention),=teal all projections 50%"]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = (("off", "0"), ("on", "1"))
DENSE = ("dense (compiled)", "dense (sparseinfer attention) (compiled)")


def run_mode(args, mode: str, flag: str) -> tuple[dict, dict]:
    """contextual.py part b in a child process with TORCHINDUCTOR_ENABLE_PDL=flag -> (its result dict, logits)."""
    out = os.path.join(args.out, f"pdl_{mode}")
    logits = os.path.join(out, "logits.pt")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, TORCHINDUCTOR_ENABLE_PDL=flag)
    env.pop("SPARSEINFER_PDL", None)  # ours follow torch.compile's switch
    cmd = [sys.executable, os.path.join(HERE, "contextual.py"), "--skip", "a,p,t,q", "--compile", "--compiled-only",
           "--layers", str(args.layers), "--full", "--only", args.settings, "--iters", str(args.iters),
           "--save-logits", logits, "--out", out]
    t0 = time.time()
    print(f"[pdl {mode}] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, env=env, check=True)
    print(f"[pdl {mode}] done in {time.time() - t0:.0f} s", flush=True)
    with open(os.path.join(out, "contextual.json")) as f:
        return json.load(f), torch.load(logits)


def markdown(res: dict) -> str:
    md = ["# Decode step without / with programmatic dependent launch (captured, compiled, Llama-3.1-8B shapes)", "",
          f"{res['device']}; torch {res['torch']}, triton {res['triton']}, transformers {res['transformers']}; "
          f"{res['date']}; {res['layers']} layers measured, 4K context, batch 1, bf16 random weights; each mode in "
          "its own process (`TORCHINDUCTOR_ENABLE_PDL=0/1`; sparseinfer's TEAL and decode-attention kernels follow it), "
          "one after the other on the same GPU. Speedups against the fastest dense step of both modes "
          f"({res['fastest_dense']['setting']}, PDL {res['fastest_dense']['mode']}: {res['fastest_dense']['ms']} ms). "
          "`python benchmarks/pdl_step.py`.", "",
          "| setting | ms, PDL off | ms, PDL on | vs the fastest dense (off / on) | logits max abs diff on vs off |",
          "|---|---|---|---|---|"]
    for r in res["rows"]:
        md.append(f"| {r['setting']} | {r['ms_off']} | {r['ms_on']} | {r['speedup_off']}x / {r['speedup_on']}x | "
                  f"{r['logits_max_abs_diff']} |")
    return "\n".join(md) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--settings", default="=dense (sparseinfer attention),=teal all projections 50%,=dejavu mlp 50%",
                   help="contextual.py --only (default: %(default)s)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--repeat", action="store_true", help="run both modes twice: logits compared across processes")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (PDL is a Hopper launch feature)")
    runs = {mode: run_mode(args, mode, flag) for mode, flag in MODES}
    if args.repeat:  # both modes once more: logits of one mode across processes (run-to-run determinism)
        for mode, flag in MODES:
            _, again = run_mode(args, mode + "2", flag)
            for key, lo in runs[mode][1].items():
                if key in again:
                    print(f"[pdl {mode}] {key}: max abs diff between two processes {float((lo - again[key]).abs().max())}")
    ms = {mode: {r["setting"]: r["ms"] for r in res["decode_step"]["rows"] if "ms" in r} for mode, (res, _) in runs.items()}
    fastest = min(((ms[m][s], s, m) for m in ms for s in DENSE if s in ms[m]), default=None)
    if fastest is None:
        p.error(f"no dense setting among the results ({sorted(ms['off'])}): --settings needs one of {DENSE}")
    rows = []
    for s in ms["off"]:
        lo, ln = runs["off"][1].get(f"{args.layers}/{s}"), runs["on"][1].get(f"{args.layers}/{s}")
        rows.append({"setting": s, "ms_off": ms["off"][s], "ms_on": ms["on"].get(s),
                     "speedup_off": round(fastest[0] / ms["off"][s], 3),
                     "speedup_on": round(fastest[0] / ms["on"][s], 3) if s in ms["on"] else None,
                     "logits_max_abs_diff": None if lo is None or ln is None else float((lo - ln).abs().max())})
    head = runs["on"][0]
    res = {k: head[k] for k in ("device", "torch", "triton", "transformers", "date")}
    res.update(layers=args.layers, settings=args.settings, rows=rows,
               fastest_dense={"setting": fastest[1], "mode": fastest[2], "ms": fastest[0]})
    with open(os.path.join(args.out, "pdl_step.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "pdl_step.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
