"""Ablation for docs/gates-smollm2-135m.md: where adaptive's accuracy comes from.

Same per-row budgets as `adaptive:density=D` (sink + diagonal + top ceil(D * (i + 1)) blocks
of row i), but blocks ranked by the block_sparse pattern's mean-pooled post-RoPE q.k instead
of the learned gate. Also adaptive's threshold mode with the gate replaced by the same
mean-pool softmax. KL vs dense on held-out essays (as `eval fidelity`).

    python benchmarks/gate_ablation.py --length 4096 --densities 0.1,0.25 --thresholds 0.03 --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sparseinfer  # noqa: E402
from sparseinfer.data import heldout_text  # noqa: E402
from sparseinfer.gate_training import meanpool_scores  # noqa: E402
from sparseinfer.patterns.adaptive import keep_blocks, keep_to_index  # noqa: E402
from sparseinfer.patterns.base import Pattern, Selection  # noqa: E402
from sparseinfer.patterns.block_sparse import block_sparse_density  # noqa: E402


@dataclass
class MeanPoolKeep(Pattern):
    name = "meanpool_keep"
    threshold: float | None = None
    density: float | None = None

    def select(self, q, k, scale):
        idx = keep_to_index(keep_blocks(meanpool_scores(q, k, scale, 64), self.threshold, self.density))
        return [Selection("block_sparse_attention", {"block_idx": idx, "block_size": 64},
                          block_sparse_density(q.shape[2], idx, 64))]


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--densities", default="0.1,0.25")
    ap.add_argument("--thresholds", default="0.03")
    ap.add_argument("--out", default="/tmp/gate_ablation")
    args = ap.parse_args(argv)
    model, tok = sparseinfer.load_model()
    ids = torch.tensor([tok(heldout_text(), add_special_tokens=False).input_ids[:args.length]])
    ref = F.log_softmax(model(ids).logits.float(), -1)
    rows = []
    modes = [{"density": float(d)} for d in args.densities.split(",") if d] + \
            [{"threshold": float(t)} for t in args.thresholds.split(",") if t]
    for mode in modes:
        handle = sparseinfer.patch(model, "adaptive", **mode)  # then swap the gate for mean-pool ranking
        for m in model.modules():
            if hasattr(m, "_sparseinfer"):
                m._sparseinfer.pattern = MeanPoolKeep(**mode)
        try:
            logp = F.log_softmax(model(ids).logits.float(), -1)
        finally:
            sparseinfer.unpatch(model)
        kl = float(F.kl_div(logp, ref, log_target=True, reduction="none").sum(-1).mean())
        row = {"method": f"meanpool+sink+diag:{next(iter(mode))}={next(iter(mode.values()))}", "length": args.length,
               "density": handle.stats.density(), "kl": kl,
               "top1_agree": float((logp.argmax(-1) == ref.argmax(-1)).float().mean())}
        print(json.dumps(row), flush=True)
        rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump({"results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
