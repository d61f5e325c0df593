"""GPU check of the Deja Vu look-ahead (side-stream selection) on an 8B-shaped random model.

1. Eager (2 layers): the list each layer's MLP receives equals the blocked selection of the same
   predictor on the same attention input (`dejavu.blocked_top_indices`, the library's rule, in
   float32 on the kernel's bf16 inputs), over 20 steps (near-ties aside).
2. Compiled and captured (4 layers, 4K StaticCache, torch.compile then one CUDA graph, as in
   benchmarks/contextual.py part b): 20 replays of the look-ahead step against the same step with
   the selection inline (`lookahead=False`). The side stream reads the attention input in place
   (no copy since session 17): a buffer reused before the join would change the lists and the
   logits, so any difference is a race.

    python benchmarks/gpu_check_lookahead.py [--out DIR]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import contextual as cb  # noqa: E402

import sparseinfer  # noqa: E402
from sparseinfer.contextual import lookahead  # noqa: E402
from sparseinfer.contextual.dejavu import SELECT_BLOCK, Predictors, blocked_top_indices  # noqa: E402

dev, dt = torch.device("cuda"), torch.bfloat16


def eager_check() -> dict:
    model = cb.build_model(cb.LLAMA_31_8B, 2, dev, dt)
    th, pred = cb.fake_files(model, dev)
    pred = Predictors(pred.layers, dict(pred.meta, mlp_input="attn_in"))
    sparseinfer.patch(model, "dense", mlp="dejavu", mlp_sparsity=0.5, predictors=pred, contextual_options={"thresholds": th})
    seen, ins = [], []
    orig = lookahead.dejavu_mlp_joined
    lookahead.dejavu_mlp_joined = lambda x, wg, wu, wd, idx, src=None: seen.append(idx.clone()) or orig(x, wg, wu, wd, idx, src)
    hooks = [lay.input_layernorm.register_forward_hook(lambda m, a, o: ins.append(o.detach().clone()))
             for lay in model.model.layers]
    k = round(0.5 * model.config.intermediate_size)
    worst, mism = 0, 0
    ids = torch.randint(0, model.config.vocab_size, (1, 1), device=dev)
    try:
        for _ in range(20):
            seen.clear()
            ins.clear()
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
            for li, (x, got) in enumerate(zip(ins, seen)):
                # the kernel's inputs (bf16 predictor, bf16 x) in float32: only summation order differs
                p = pred.layers[li].to(dev, dt).to(dev, torch.float32)
                want = blocked_top_indices(p.mlp_scores(x.reshape(1, -1).float()), k, SELECT_BLOCK)
                d = k - len(set(got.flatten().tolist()) & set(want.flatten().tolist()))
                worst = max(worst, d)
                mism += d > 0
    finally:
        lookahead.dejavu_mlp_joined = orig
        for h in hooks:
            h.remove()
        sparseinfer.unpatch(model)
    return {"steps": 20, "layers": 2, "k": k, "worst_neurons_differing": worst, "lists_differing": mism}


def captured_logits(model, pred, th, lookahead_on: bool, ctx: int, replays: int) -> list[torch.Tensor]:
    from transformers import StaticCache

    sparseinfer.patch(model, "dense", mlp="dejavu", mlp_sparsity=0.5, predictors=pred,
                      contextual_options={"thresholds": th, "lookahead": lookahead_on})
    torch._dynamo.reset()
    fwd = torch.compile(model.forward, dynamic=False)
    cfg = model.config
    g_in = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), device=dev, generator=g_in)
    tok = torch.randint(0, cfg.vocab_size, (1, 1), device=dev, generator=g_in)
    cache = StaticCache(config=cfg, max_cache_len=ctx + 8)
    ck = sparseinfer.kv.cache_kwargs(model, cache)  # `cache=` from transformers 5.24
    with torch.no_grad():
        model(input_ids=ids, **ck, cache_position=torch.arange(ctx, device=dev), use_cache=True)
    pos = torch.tensor([ctx], device=dev)
    lengths = [lay.cumulative_length for lay in getattr(cache, "layers", [])
               if isinstance(getattr(lay, "cumulative_length", None), torch.Tensor)]
    ctx_t = [torch.full_like(t, ctx) for t in lengths]
    out = torch.empty(1, 1, cfg.vocab_size, device=dev, dtype=torch.float32)

    def step():
        if lengths:
            torch._foreach_copy_(lengths, ctx_t)
        with torch.no_grad():
            out.copy_(fwd(input_ids=tok, **ck, cache_position=pos, position_ids=pos[None],
                          use_cache=True).logits.float())

    g = cb.capture(step)
    got = []
    for _ in range(replays):
        g.replay()
        got.append(out.clone())
    torch.cuda.synchronize()
    sparseinfer.unpatch(model)
    return got


def captured_check(ctx: int = 4096, replays: int = 20) -> dict:
    model = cb.build_model(cb.LLAMA_31_8B, 4, dev, dt)
    th, pred = cb.fake_files(model, dev)
    pred = Predictors(pred.layers, dict(pred.meta, mlp_input="attn_in"))
    la = captured_logits(model, pred, th, True, ctx, replays)
    inline = captured_logits(model, pred, th, False, ctx, replays)
    ref = inline[0]
    return {"layers": 4, "context": ctx, "replays": replays,
            "lookahead_replays_max_abs_diff_vs_inline": max(float((x - ref).abs().max()) for x in la),
            "inline_replays_max_abs_diff": max(float((x - ref).abs().max()) for x in inline),
            "logits_max_abs": float(ref.abs().max())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "pdl_env": os.environ.get("TORCHINDUCTOR_ENABLE_PDL"), "eager": eager_check(), "captured": captured_check()}
    print(json.dumps(res, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check_lookahead.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
