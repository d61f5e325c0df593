"""The `sparseinfer` command: demo, search, train-gate, calibrate-mlp, allocate-mlp, train-predictors, eval niah | fidelity |
ppl | recall | report | adaptive-report | decode | contextual."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_METHODS = ["dense", "vertical_slash"]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _run_eval(args, kind: str, run, table) -> list[dict]:
    """Shared by the eval commands: load the model, run `run(model, tok, methods, lengths)`,
    print `table(rows)`, write <out>/<kind>.json; -> rows."""
    from .eval import report
    from .eval.needle import parse_length
    from .eval.runner import as_dicts
    from .models import load_model

    lengths = [parse_length(x) for x in _csv(args.lengths)]
    methods = _csv(args.methods)
    print(f"loading {args.model} ...", flush=True)
    model, tok = load_model(args.model)
    rows = as_dicts(run(model, tok, methods, lengths))
    report.print_table(table(rows))
    config = {"model": args.model, "methods": methods, "lengths": lengths, "min_len": args.min_len}
    path = Path(args.out) / f"{kind}.json"
    report.write_json(path, kind, config, rows)
    print(f"wrote {path}")
    return rows


def cmd_niah(args) -> int:
    from .eval import report
    from .eval.runner import run_niah

    rows = _run_eval(args, "niah", lambda m, t, meth, ls: run_niah(m, t, meth, ls, args.depths, min_len=args.min_len,
                                                                   config=args.config), report.niah_table)
    print(f"wrote {report.niah_heatmap(rows, Path(args.out) / 'niah.png', f'NIAH, {args.model}')}")
    return 0


def cmd_fidelity(args) -> int:
    from .eval import report
    from .eval.runner import run_fidelity

    _run_eval(args, "fidelity", lambda m, t, meth, ls: run_fidelity(m, t, meth, ls, min_len=args.min_len,
                                                                    config=args.config), report.fidelity_table)
    return 0


def cmd_ppl(args) -> int:
    from .eval import report
    from .eval.runner import run_ppl

    _run_eval(args, "ppl", lambda m, t, meth, ls: run_ppl(m, t, meth, ls, args.windows, min_len=args.min_len,
                                                          config=args.config), report.ppl_table)
    return 0


def cmd_recall(args) -> int:
    from .eval import report
    from .eval.needle import parse_length
    from .eval.runner import run_recall
    from .models import load_model

    length = parse_length(args.length)
    print(f"loading {args.model} ...", flush=True)
    model, tok = load_model(args.model)
    out = Path(args.out)
    for spec in _csv(args.methods):
        rec = run_recall(model, tok, spec, length, min_len=args.min_len, config=args.config)
        safe = spec.replace(":", "_").replace("=", "-").replace("/", "_")
        png = report.recall_heatmap(rec.numpy(), out / f"recall-{safe}.png", f"attention recall: {spec}, {length} tokens")
        report.write_json(out / f"recall-{safe}.json", "recall", {"model": args.model, "method": spec, "length": length},
                          [{"layer": i, "recall": [round(float(x), 4) for x in row]} for i, row in enumerate(rec)])
        print(f"{spec}: mean recall {float(rec.nanmean()):.3f}, min {float(rec.min()):.3f} -> {png}")
    return 0


def cmd_decode(args) -> int:
    from .eval.decode import run_decode, write_report
    from .eval.needle import parse_length
    from .models import load_model

    if args.report_only:  # rebuild decoding.md and the PNGs from an existing decoding.json
        from .eval.decode import load_runs

        runs, info, name = load_runs(Path(args.out) / "decoding.json")
        command = info.pop("command", "sparseinfer eval decode")
        print(f"wrote {write_report(runs, info, Path(args.out), name, command, json_too=False)}")
        return 0
    print(f"loading {args.model} ...", flush=True)
    model, tok = load_model(args.model)
    budgets = [parse_length(x) for x in _csv(args.budgets)]
    task = {"n_cases": args.task_cases, "n_facts": args.task_facts, "filler": args.task_filler}
    runs, info = run_decode(model, tok, _csv(args.policies), budgets, parse_length(args.gen_tokens), args.window,
                            task=task, cache_path=Path(args.out) / "decoding_cache.json", model_name=args.model,
                            parts=args.parts)
    command = (f"sparseinfer eval decode --model {args.model} --policies {args.policies} --budgets {args.budgets} "
               f"--gen-tokens {args.gen_tokens} --window {args.window} --task-cases {args.task_cases} "
               f"--task-facts {args.task_facts} --task-filler {args.task_filler} --parts {args.parts} --out {args.out}")
    info["command"] = command
    path = write_report(runs, dict(info), Path(args.out), args.model, command)
    print(f"wrote {path}, {Path(args.out) / 'decoding.json'} and its PNGs")
    return 0


def cmd_search_mm(args) -> int:
    """`sparseinfer search --mm-inputs FILE`: MMInference search of a vision-language model."""
    from collections import Counter

    import torch
    from rich.table import Table

    from . import config as config_io
    from . import mm_search, vlm
    from .eval import report

    if not Path(args.mm_inputs).is_file():
        raise SystemExit(f"--mm-inputs: expected a file saved with torch.save(dict of the processor's tensors), "
                         f"got {args.mm_inputs!r} (no such file)")
    inputs = torch.load(args.mm_inputs, weights_only=True, map_location="cpu")
    if not isinstance(inputs, dict) or not all(torch.is_tensor(v) for v in inputs.values()):
        raise SystemExit(f"--mm-inputs: expected a dict of tensors (input_ids, mm_token_type_ids, pixel_values_videos, "
                         f"video_grid_thw, ...), got {type(inputs).__name__}")
    print(f"loading {args.model} ...", flush=True)
    model = vlm.load_vlm(args.model, device=args.device)
    dev = next(model.parameters()).device
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    modality = vlm.modality_from_inputs(model.config, inputs)
    if modality is None:
        raise SystemExit("--mm-inputs: no modality information: expected 'mm_token_type_ids' or 'input_ids' with "
                         "image / video pad tokens")
    frame = vlm.frame_from_inputs(model.config, inputs)
    levels = tuple(float(x) for x in _csv(args.levels)) if args.levels else mm_search.LEVELS
    cfg = mm_search.search_model(model, inputs, modality, frame, target=args.density,
                                 space=mm_search.candidates(levels), name=args.model)
    path = config_io.save(cfg, args.out)
    kinds = Counter((h["boundary"], h["intra"].get("video", h["intra"].get("all"))["pattern"])
                    for layer in cfg["layers"] for h in layer)
    table = Table(title="MMInference search: heads per boundary type and video intra pattern")
    for c in ("boundary", "video intra", "heads"):
        table.add_column(c)
    for (b, p), c in sorted(kinds.items()):
        table.add_row(b, p, str(c))
    report.print_table(table)
    print(f"searched {len(cfg['layers'])} layers at N={modality.shape[-1]} (frame {frame}) in "
          f"{cfg['search']['seconds']:.0f} s; wrote {path}")
    return 0


def cmd_search(args) -> int:
    from . import config as config_io
    from .eval import report
    from .eval.needle import parse_length
    from .models import load_model
    from .search import search

    if args.mm_inputs:
        return cmd_search_mm(args)
    print(f"loading {args.model} ...", flush=True)
    model, tok = load_model(args.model)
    length = parse_length(args.length) if args.length else None
    cfg = search(model, tok, model_id=args.model, length=length, target_density=args.density, prompts=args.prompts)
    path = config_io.save(cfg, args.out)
    report.print_table(report.config_table(cfg))
    md = report.config_markdown(cfg, Path(args.report or path.parent) / f"{path.stem}.md")
    print(f"searched in {cfg['search']['seconds']:.0f} s; wrote {path} and its report {md} (+ .png)")
    return 0


def cmd_train_gate(args) -> int:
    import torch

    from .eval.needle import parse_length
    from .gate_training import train_gates
    from .models import load_model

    dtype = args.dtype if args.dtype != "auto" else (
        "bfloat16" if args.device and torch.device(args.device).type == "cuda" else "float32")
    print(f"loading {args.model} ({dtype}) ...", flush=True)
    model, tok = load_model(args.model, dtype=getattr(torch, dtype), device=args.device)
    gates, rep = train_gates(model, tok, out=args.out, length=parse_length(args.length) if args.length else None,
                             sequences=args.sequences, row_stride=args.row_stride, block_size=args.block_size,
                             pooling=args.pooling, width=args.width, steps=args.steps, lr=args.lr, model_id=args.model)
    print(f"trained in {rep['seconds']:.0f} s (capture {rep['seconds_capture']:.0f} s, train {rep['seconds_train']:.0f} s); "
          f"KL {rep['loss_first']:.4f} -> {rep['loss_last']:.4f}")
    for key, r in rep.get("heldout", {}).items():
        base = f", mean-pool q.k {r['meanpool_recall']:.3f}" if "meanpool_recall" in r else ""
        print(f"held-out {key}: block recall {r['gate_recall']:.3f}{base} at block density {r['block_density']:.3f}")
    print(f"wrote {args.out}, {rep['loss_png']} and {Path(args.out).with_suffix('.json')}")
    return 0


def cmd_report(args) -> int:
    from .eval.accuracy import build
    from .eval.needle import parse_length

    path = build(args.model, Path(args.out), [parse_length(x) for x in _csv(args.lengths)], args.depths,
                 [parse_length(x) for x in _csv(args.ppl_lengths)], run=not args.from_cache)
    print(f"wrote {path}")
    return 0


def cmd_adaptive_report(args) -> int:
    from .eval.adaptive import build
    from .eval.needle import parse_length

    from .eval.adaptive import METHODS

    only = _csv(args.only) if args.only else None
    bad = sorted(set(only or []) - set(METHODS))
    if bad:
        raise SystemExit(f"adaptive-report: unknown method label(s) {bad}; expected some of {list(METHODS)}")
    methods = {k: METHODS[k] for k in only} if only else None
    path = build(args.model, Path(args.out), [parse_length(x) for x in _csv(args.lengths)], args.windows,
                 methods=methods, run=not args.from_cache)
    print(f"wrote {path} and {path.parent / 'adaptive-kl-density.png'}")
    return 0


def cmd_demo(args) -> int:
    from .eval import report
    from .eval.runner import as_dicts, run_niah
    from .models import DEFAULT_MODEL, load_model

    t0 = time.perf_counter()
    print(f"sparseinfer demo: needle-in-a-haystack on {DEFAULT_MODEL}, dense vs vertical_slash (CPU is fine)")
    model, tok = load_model(DEFAULT_MODEL)
    rows = as_dicts(run_niah(model, tok, DEMO_METHODS, [1024, 2048], 3))
    report.print_table(report.niah_table(rows))
    out = Path(args.out)
    report.write_json(out / "niah.json", "niah", {"model": DEFAULT_MODEL, "methods": DEMO_METHODS}, rows)
    png = report.niah_heatmap(rows, out / "niah.png", f"NIAH, {DEFAULT_MODEL}")
    print(f"plot: {png.resolve()}\nresults: {(out / 'niah.json').resolve()}\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_calibrate_mlp(args) -> int:
    from .contextual import teal
    from .contextual.patching import fingerprint
    from .models import load_model

    print(f"loading {args.model} ...", flush=True)
    model, tok = load_model(args.model)
    th = teal.calibrate(model, tok, n_tokens=args.tokens, window=args.window, model_id=args.model)
    th.meta["fingerprint"] = fingerprint(model.config)
    path = th.save(args.out)
    i = th.n_layers // 2
    print(f"calibrated in {th.meta['seconds']:.0f} s on {args.tokens} tokens; wrote {path}")
    print(f"layer {i} thresholds at 50% sparsity: " + ", ".join(
        f"{s} {th.threshold(i, s, 0.5):.4f}" for s in teal.SITES))
    return 0


def cmd_allocate_mlp(args) -> int:
    from .contextual.allocation import Allocation, allocation, measure
    from .models import load_model

    if args.curves_from:  # reuse the curves measured for an earlier allocation (no forward passes)
        curves = Allocation.load(args.curves_from).curves
        if curves.method != args.method:
            raise ValueError(f"--curves-from {args.curves_from}: curves measured for {curves.method!r}, "
                             f"--method is {args.method!r}")
    else:
        print(f"loading {args.model} ...", flush=True)
        model, tok = load_model(args.model)
        curves = measure(model, tok, args.method, levels=[float(x) for x in _csv(args.levels)], length=args.length,
                         thresholds=args.thresholds, predictors=args.predictors)
        curves.meta["model_id"] = args.model
    alloc = allocation(curves, args.sparsity, args.step)
    path = alloc.save(args.out)
    print(f"{args.method} at mean sparsity {args.sparsity:.0%}: per layer " + " ".join(f"{s:.2f}" for s in alloc.sparsities))
    print(f"sum of the layers' measured KL: allocated {alloc.predicted_kl:.4f} vs uniform {alloc.uniform_kl:.4f} nats; "
          f"wrote {path} (patch(..., mlp={args.method!r}, mlp_sparsity={str(path)!r}))")
    return 0


def cmd_train_predictors(args) -> int:
    from rich.table import Table

    from .contextual import dejavu
    from .contextual.patching import fingerprint
    from .eval import report
    from .models import load_model

    print(f"loading {args.model} ...", flush=True)
    model, tok = load_model(args.model)
    # kind int4: the MLP's own gate / up weights at --bits bits (nothing fitted); the activations
    # still give the recall report and the head predictors
    pred = dejavu.train_for_model(model, tok, n_tokens=args.tokens, window=args.window, model_id=args.model,
                                  rank=args.rank, steps=args.steps, label_frac=args.label_frac, heads=not args.no_heads,
                                  source=args.source, kind=args.kind, finetune_steps=args.finetune_steps,
                                  bits=args.bits)
    pred.meta["fingerprint"] = fingerprint(model.config)
    path = pred.save(args.out)
    rec = pred.meta["recall"]
    keeps = list(rec[0]["mlp"])
    t = Table(title=f"predictor recall on {pred.meta['val_tokens']} held-out tokens (recall / |h|^2 kept, oracle)")
    t.add_column("layer")
    for k in keeps:
        t.add_column(f"MLP keep {float(k):.0%}")
    if rec[0]["heads"]:
        t.add_column(f"heads keep {float(keeps[-1]):.0%}")
    for r in rec:
        cells = [f"{r['mlp'][k]['recall']:.2f} / {r['mlp'][k]['kept']:.2f} ({r['mlp'][k]['oracle_kept']:.2f})" for k in keeps]
        if r["heads"]:
            cells.append(f"{r['heads'][keeps[-1]]['recall']:.2f}")
        t.add_row(str(r["layer"]), *cells)
    report.print_table(t)
    mean = sum(r["mlp"][keeps[-1]]["recall"] for r in rec) / len(rec)
    print(f"trained in {pred.meta['seconds_total']:.0f} s; mean MLP recall at keep {float(keeps[-1]):.0%}: {mean:.3f}; "
          f"wrote {path}")
    return 0


def cmd_contextual(args) -> int:
    from .contextual import dejavu
    from .contextual.dejavu import Predictors
    from .contextual.patching import shipped
    from .contextual.teal import Thresholds
    from .eval import contextual as ev
    from .models import load_model

    print(f"loading {args.model} ...", flush=True)
    model, tok = load_model(args.model)
    pred_path = args.predictors or shipped(model.config, "dejavu")
    teal_path = args.thresholds or shipped(model.config, "teal")
    if pred_path is None or teal_path is None:
        raise ValueError("eval contextual: pass --predictors and --thresholds (none shipped for this model)")
    pred, th = Predictors.load(pred_path), Thresholds.load(teal_path)
    mlp_s = [float(x) for x in _csv(args.mlp_sparsity)]
    head_s = [float(x) for x in _csv(args.head_sparsity)]
    settings = ev.default_settings(mlp_s, head_s)
    extra = {}
    low_rank = pred.meta.get("kind", "linear") if pred.meta.get("kind") != "int4" else "glu"
    for r in (int(x) for x in _csv(args.extra_ranks)):  # low-rank predictors at other ranks, fitted here (the
        # shipped kind, or glu when the shipped predictors are int4)
        print(f"fitting {low_rank} predictors at rank {r} ...", flush=True)
        extra[f"r={r}"] = dejavu.train_for_model(model, tok, n_tokens=pred.meta.get("n_tokens", 4096),
                                                 window=pred.meta.get("window", 1024), model_id=args.model, rank=r,
                                                 heads=False, kind=low_rank,
                                                 source=pred.meta.get("mlp_input", "mlp_in"), progress=False)
        settings += [ev.Setting("dejavu", "dejavu", s, predictors=f"r={r}") for s in mlp_s]
    for b in (int(x) for x in _csv(args.extra_bits)):  # training-free b-bit gate / up copies (kind "int4")
        extra[f"int{b}"] = dejavu.quantized(dejavu.gate_up_weights(model), b)
        settings += [ev.Setting("dejavu", "dejavu", s, predictors=f"int{b}") for s in mlp_s]
    allocs = {}
    if args.allocate:  # calibrated per-layer MLP sparsities at these means (contextual.allocation)
        from .contextual.allocation import allocation, measure

        for m in ("teal", "dejavu"):
            print(f"measuring {m}'s per-layer KL curves ...", flush=True)
            curves = measure(model, tok, m, length=args.allocate_length, thresholds=th, predictors=pred)
            for t in (float(x) for x in _csv(args.allocate)):
                allocs[f"{m} {t:.0%}"] = allocation(curves, t)
                settings.append(ev.Setting(m, m, t, allocation=f"{m} {t:.0%}"))
    rows = ev.run(model, tok, settings, args.length, args.windows, predictors=pred, thresholds=th,
                  extra_predictors=extra, allocations=allocs)
    niah = None
    if args.niah_lengths:  # needle retrieval with the sparsity on the decode steps (pre-fill dense)
        from .eval.needle import parse_length
        from .eval.runner import as_dicts, run_niah

        specs = ["dense"] + [f"dense:mlp={m}:mlp_sparsity={s}" for s in _csv(args.niah_sparsity)
                             for m in ("teal", "dejavu")]
        specs += [f"dense:mlp=dejavu:mlp_sparsity={s}:predictors=int{b}" for s in _csv(args.niah_sparsity)
                  for b in _csv(args.extra_bits)]  # kind int4, built from the model's weights at patch time
        niah = as_dicts(run_niah(model, tok, specs, [parse_length(x) for x in _csv(args.niah_lengths)],
                                 args.niah_depths))
    command = (f"sparseinfer eval contextual --model {args.model} --length {args.length} --windows {args.windows} "
               f"--mlp-sparsity {args.mlp_sparsity} --head-sparsity {args.head_sparsity}"
               + (f" --extra-ranks {args.extra_ranks}" if args.extra_ranks else "")
               + (f" --extra-bits {args.extra_bits}" if args.extra_bits else "")
               + (f" --allocate {args.allocate} --allocate-length {args.allocate_length}" if args.allocate else "")
               + (f" --niah-lengths {args.niah_lengths} --niah-depths {args.niah_depths} --niah-sparsity "
                  f"{args.niah_sparsity}" if args.niah_lengths else "") + f" --out {args.out}")
    path = ev.write_report(rows, Path(args.out), args.model, command, pred.meta, th.meta, args.length, args.windows,
                           niah=niah, allocations=allocs)
    for r in rows:
        print(f"{r['label']:<40} ppl {r['ppl']:.3f}  top1 {r['top1']:.3f}  KL {r['kl']:.4f}")
    print(f"wrote {path}, contextual.json and PNGs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparseinfer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="NIAH on the embedded model: dense vs vertical_slash, table + plot")
    d.add_argument("--out", default="sparseinfer-demo", help="output folder (default: %(default)s)")
    d.set_defaults(func=cmd_demo)
    ev = sub.add_parser("eval", help="evaluate sparse methods against dense")
    evs = ev.add_subparsers(dest="eval_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="smollm2-135m", help="embedded name, HF id or path (default: %(default)s)")
    common.add_argument("--methods", default="dense,vertical_slash",
                        help="comma list; options as name:key=value:... e.g. 'ashape:sink=64:window=0.1' (default: %(default)s)")
    common.add_argument("--lengths", default="1k,2k,4k", help="context lengths in tokens (default: %(default)s)")
    common.add_argument("--min-len", type=int, default=512, help="dense below this many query tokens")
    common.add_argument("--out", default="sparseinfer-eval", help="output folder (default: %(default)s)")
    common.add_argument("--config", default=None, help="per-head config JSON for 'minference' (default: the shipped one)")
    n = evs.add_parser("niah", parents=[common], help="needle-in-a-haystack: table, JSON, heatmap PNG")
    n.add_argument("--depths", type=int, default=5, help="needle depths per length (default: %(default)s)")
    n.set_defaults(func=cmd_niah)
    f = evs.add_parser("fidelity", parents=[common], help="KL of next-token distributions, hidden-state error, density")
    f.set_defaults(func=cmd_fidelity)
    pp = evs.add_parser("ppl", parents=[common], help="perplexity on held-out essays")
    pp.add_argument("--windows", type=int, default=2, help="disjoint windows per length (default: %(default)s)")
    pp.set_defaults(func=cmd_ppl)
    rc = evs.add_parser("recall", parents=[common], help="attention recall per layer/head: heatmap PNG + JSON")
    rc.add_argument("--length", default="4k", help="prompt length in tokens (default: %(default)s)")
    rc.set_defaults(func=cmd_recall)
    rp = evs.add_parser("report", help="the accuracy report (docs/accuracy.md): NIAH, perplexity, KL, density, time")
    rp.add_argument("--model", default="smollm2-135m")
    rp.add_argument("--out", default="docs")
    rp.add_argument("--lengths", default="1k,2k,4k,8k", help="NIAH lengths (default: %(default)s)")
    rp.add_argument("--depths", type=int, default=10, help="NIAH depths (default: %(default)s)")
    rp.add_argument("--ppl-lengths", default="4k,8k", help="perplexity / KL lengths (default: %(default)s)")
    rp.add_argument("--from-cache", action="store_true", help="only write the report from cells already measured")
    rp.set_defaults(func=cmd_report)
    ar = evs.add_parser("adaptive-report", help="adaptive vs fixed-budget methods: KL, ppl, density spread, "
                        "estimation time -> docs/adaptive.md + PNG")
    ar.add_argument("--model", default="smollm2-135m")
    ar.add_argument("--out", default="docs")
    ar.add_argument("--lengths", default="2k,4k", help="context lengths (default: %(default)s)")
    ar.add_argument("--windows", type=int, default=2, help="held-out windows per length (default: %(default)s)")
    ar.add_argument("--only", default=None, help="comma list of method labels to measure, in this order "
                    "(default: all; the page lists every cached cell)")
    ar.add_argument("--from-cache", action="store_true", help="only write the report from cells already measured")
    ar.set_defaults(func=cmd_adaptive_report)
    dc = evs.add_parser("decode", help="KV-cache policies on long decoding: teacher-forced KL / top-1, a scored recall task, KV memory")
    dc.add_argument("--model", default="smollm2-135m", help="embedded name, HF id or path (default: %(default)s)")
    dc.add_argument("--policies", default="dense,streaming,h2o,snapkv,quest,raas", help="comma list (default: %(default)s)")
    dc.add_argument("--budgets", default="64,128,256,512,1024", help="KV budgets in tokens (default: %(default)s)")
    dc.add_argument("--gen-tokens", default="2k", help="tokens generated densely, then replayed (default: %(default)s)")
    dc.add_argument("--window", type=int, default=128, help="steps per point of the curves (default: %(default)s)")
    dc.add_argument("--out", default="docs", help="folder for decoding.md/.json/.png (default: %(default)s)")
    dc.add_argument("--report-only", action="store_true", help="rebuild decoding.md + PNGs from <out>/decoding.json")
    dc.add_argument("--parts", default="fidelity,task", help="fidelity and/or task (default: %(default)s)")
    dc.add_argument("--task-cases", type=int, default=4, help="list-recall prompts, one batch (default: %(default)s)")
    dc.add_argument("--task-facts", type=int, default=12, help="facts per list (default: %(default)s)")
    dc.add_argument("--task-filler", type=int, default=400, help="essay tokens after the list (default: %(default)s)")
    dc.set_defaults(func=cmd_decode)
    cx = evs.add_parser("contextual", help="TEAL / Deja Vu: ppl, top-1, KL vs MLP sparsity, predictor recall")
    cx.add_argument("--model", default="smollm2-135m", help="embedded name, HF id or path (default: %(default)s)")
    cx.add_argument("--length", type=int, default=1024, help="tokens per window (default: %(default)s)")
    cx.add_argument("--windows", type=int, default=1, help="held-out windows (default: %(default)s)")
    cx.add_argument("--mlp-sparsity", default="0.25,0.4,0.5,0.7", help="comma list (default: %(default)s)")
    cx.add_argument("--head-sparsity", default="0.25,0.5", help="comma list (default: %(default)s)")
    cx.add_argument("--predictors", default=None, help="Deja Vu predictors (default: the shipped ones)")
    cx.add_argument("--thresholds", default=None, help="TEAL thresholds (default: the shipped ones)")
    cx.add_argument("--extra-ranks", default="", help="also Deja Vu predictors of the same kind at these ranks, "
                    "fitted on the same calibration text (comma list, e.g. 256)")
    cx.add_argument("--extra-bits", default="", help="also Deja Vu predictors of kind int4 at these bits "
                    "(training-free copies of W_gate / W_up; comma list, e.g. 4)")
    cx.add_argument("--allocate", default="", help="also teal / dejavu rows with calibrated per-layer MLP sparsities "
                    "at these means (`sparseinfer allocate-mlp`; comma list, e.g. 0.4,0.5; default: none)")
    cx.add_argument("--allocate-length", type=int, default=512, help="calibration tokens of --allocate (default: %(default)s)")
    cx.add_argument("--niah-lengths", default="", help="also needle retrieval at these lengths with teal / dejavu "
                    "on the decode steps (comma list, e.g. 1k,2k; default: none)")
    cx.add_argument("--niah-depths", type=int, default=5, help="needle depths per length (default: %(default)s)")
    cx.add_argument("--niah-sparsity", default="0.25,0.4", help="MLP sparsities for the needle rows (default: %(default)s)")
    cx.add_argument("--out", default="docs", help="folder for contextual.md/.json/.png (default: %(default)s)")
    cx.set_defaults(func=cmd_contextual)
    cm = sub.add_parser("calibrate-mlp", help="TEAL: |x| quantiles per layer and projection input -> thresholds file")
    cm.add_argument("--model", default="smollm2-135m", help="embedded name, HF id or path (default: %(default)s)")
    cm.add_argument("--out", required=True, help="thresholds file to write (.safetensors)")
    cm.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default: %(default)s)")
    cm.add_argument("--window", type=int, default=1024, help="tokens per forward (default: %(default)s)")
    cm.set_defaults(func=cmd_calibrate_mlp)
    am = sub.add_parser("allocate-mlp", help="TEAL / Deja Vu: per-layer MLP sparsities at a mean sparsity, from "
                        "each layer's measured KL -> allocation JSON (mlp_sparsity=path)")
    am.add_argument("--model", default="smollm2-135m", help="embedded name, HF id or path (default: %(default)s)")
    am.add_argument("--method", default="teal", choices=["teal", "dejavu"], help="MLP method (default: %(default)s)")
    am.add_argument("--sparsity", type=float, required=True, help="mean MLP sparsity over the layers, e.g. 0.5")
    am.add_argument("--out", required=True, help="allocation file to write (.json)")
    am.add_argument("--length", type=int, default=512, help="calibration tokens (default: %(default)s)")
    am.add_argument("--levels", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                    help="sparsity levels measured per layer (default: %(default)s)")
    am.add_argument("--step", type=float, default=0.05, help="allocation step per layer (default: %(default)s)")
    am.add_argument("--thresholds", default=None, help="TEAL thresholds (default: the shipped ones)")
    am.add_argument("--predictors", default=None, help="Deja Vu predictors (default: the shipped ones)")
    am.add_argument("--curves-from", default=None, help="an earlier allocation file of this method: reuse its "
                    "measured curves (no forward passes), e.g. for another --sparsity")
    am.set_defaults(func=cmd_allocate_mlp)
    tp = sub.add_parser("train-predictors", help="Deja Vu: train per-layer MLP / head predictors, report recall")
    tp.add_argument("--model", default="smollm2-135m", help="embedded name, HF id or path (default: %(default)s)")
    tp.add_argument("--out", required=True, help="predictor file to write (.safetensors)")
    tp.add_argument("--tokens", type=int, default=16384,
                    help="calibration tokens, last 25%% held out; more help the glu kind (SmolLM2 at 40%% sparsity, "
                         "closed form: +58%% ppl with 4096, +38%% with 16384) (default: %(default)s)")
    tp.add_argument("--window", type=int, default=1024, help="tokens per forward (default: %(default)s)")
    tp.add_argument("--rank", type=int, default=128, help="MLP predictor rank (default: %(default)s)")
    tp.add_argument("--source", default="mlp_in", choices=["mlp_in", "attn_in"],
                    help="MLP predictor input: the MLP input, or the attention input (look-ahead) (default: %(default)s)")
    tp.add_argument("--kind", default="glu", choices=["glu", "linear", "int4"],
                    help="MLP predictor: glu = rank-r gate/up model scored |SiLU(g)*u| (closed form, then fine-tuned: "
                         "--finetune-steps), linear = "
                         "Deja Vu's linear scores trained with BCE, int4 = the gate/up weights at --bits bits (nothing "
                         "fitted; heads still trained unless --no-heads) (default: %(default)s)")
    tp.add_argument("--bits", type=int, default=4, help="with --kind int4: bits per weight, 2..8 (default: %(default)s)")
    tp.add_argument("--finetune-steps", type=int, default=200,
                    help="glu: Adam steps per layer fine-tuning the closed-form fit for the top-K selection at 60%% "
                         "and 50%% kept (contextual.dejavu.finetune_glu); 0 = closed form only (default: %(default)s)")
    tp.add_argument("--steps", type=int, default=60, help="Adam steps per predictor (linear and heads) (default: %(default)s)")
    tp.add_argument("--label-frac", type=float, default=0.5, help="share of neurons / heads labelled 1 (default: %(default)s)")
    tp.add_argument("--no-heads", action="store_true", help="train MLP predictors only")
    tp.set_defaults(func=cmd_train_predictors)
    s_ = sub.add_parser("search", help="offline per-head pattern search (MInference) -> config JSON + report")
    s_.add_argument("--model", default="smollm2-135m", help="embedded name, HF id or path (default: %(default)s)")
    s_.add_argument("--out", required=True, help="config JSON to write (a PNG report goes beside it)")
    s_.add_argument("--report", default=None, help="folder for the report (.md + .png; default: beside --out)")
    s_.add_argument("--length", default=None, help="calibration length (default: the model's maximum)")
    s_.add_argument("--density", type=float, default=0.1, help="target kept density per head (default: %(default)s)")
    s_.add_argument("--prompts", type=int, default=2, help="calibration prompts (default: %(default)s)")
    s_.add_argument("--mm-inputs", default=None,
                    help="vision-language models (MMInference): a torch.save'd dict of the processor's tensors for "
                         "one calibration input (input_ids, mm_token_type_ids, pixel_values_videos, video_grid_thw); "
                         "searches boundary types, intra patterns and grid lines per head; --density is then the "
                         "target kernel cost")
    s_.add_argument("--levels", default=None, help="MMInference budget levels, fractions of N (default 0.01,0.02,0.05,0.1)")
    s_.add_argument("--device", default=None, help="MMInference search device, e.g. cuda (default: CPU)")
    s_.set_defaults(func=cmd_search)
    tg = sub.add_parser("train-gate", help="train the learned block gates of 'adaptive' (self-distillation)")
    tg.add_argument("--model", default="smollm2-135m", help="embedded name, HF id or path (default: %(default)s)")
    tg.add_argument("--out", required=True, help="gate file to write (.safetensors; loss PNG + JSON beside it)")
    tg.add_argument("--device", default=None, help="e.g. cuda (default: CPU)")
    tg.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="the frozen model's weights (default auto: bfloat16 on CUDA, float32 on the CPU)")
    tg.add_argument("--length", default=None, help="tokens per calibration sequence (default: min(model max, 8k))")
    tg.add_argument("--sequences", type=int, default=1, help="calibration sequences (default: %(default)s)")
    tg.add_argument("--row-stride", type=int, default=4, help="targets for every n-th query block (default: %(default)s)")
    tg.add_argument("--block-size", type=int, default=64, help="(default: %(default)s)")
    tg.add_argument("--pooling", default="avg,max,min", help="block poolings, concatenated (default: %(default)s)")
    tg.add_argument("--width", type=int, default=12, help="gate projection width per head (default: %(default)s)")
    tg.add_argument("--steps", type=int, default=300, help="Adam steps per layer (default: %(default)s)")
    tg.add_argument("--lr", type=float, default=1e-2, help="(default: %(default)s)")
    tg.set_defaults(func=cmd_train_gate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
