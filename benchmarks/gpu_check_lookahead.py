"""GPU check of the Deja Vu look-ahead (side-stream selection): on a 2-layer 8B-shaped random
model, the list each layer's MLP receives equals the inline selection of the same predictor on
the same attention input (ties aside), over repeated eager steps.
    python benchmarks/gpu_check_lookahead.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import contextual as cb  # noqa: E402

import sparseinfer  # noqa: E402
from sparseinfer.contextual import lookahead  # noqa: E402
from sparseinfer.contextual.dejavu import Predictors  # noqa: E402
from sparseinfer.kernels.topk import select_top  # noqa: E402

dev, dt = torch.device("cuda"), torch.bfloat16
model = cb.build_model(cb.LLAMA_31_8B, 2, dev, dt)
th, pred = cb.fake_files(model, dev)
pred = Predictors(pred.layers, dict(pred.meta, mlp_input="attn_in"))
sparseinfer.patch(model, "dense", mlp="dejavu", mlp_sparsity=0.5, predictors=pred, contextual_options={"thresholds": th})
seen = []
orig = lookahead.dejavu_mlp_joined
lookahead.dejavu_mlp_joined = lambda x, wg, wu, wd, idx: seen.append(idx.clone()) or orig(x, wg, wu, wd, idx)
ins = []
hooks = [lay.input_layernorm.register_forward_hook(lambda m, a, o: ins.append(o.detach().clone())) for lay in model.model.layers]
k = round(0.5 * model.config.intermediate_size)
worst, mism = 0, 0
ids = torch.randint(0, model.config.vocab_size, (1, 1), device=dev)
for rep in range(20):
    seen.clear()
    ins.clear()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    torch.cuda.synchronize()
    for li, (x, got) in enumerate(zip(ins, seen)):
        p = pred.layers[li].to(dev, dt)
        want = select_top(p.mlp_scores(x.reshape(1, -1)), k)
        d = k - len(set(got.flatten().tolist()) & set(want.flatten().tolist()))
        worst = max(worst, d)
        mism += d > 0
print(f"look-ahead vs inline lists over 20 steps x 2 layers: worst {worst} of {k} neurons differ, {mism} lists differ")
