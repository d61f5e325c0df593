"""The `sparseinfer` command: demo, search, eval niah | fidelity | ppl | recall | report | adaptive-report | decode."""
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
    runs, info = run_decode(model, tok, _csv(args.policies), budgets, parse_length(args.gen_tokens), args.window)
    command = (f"sparseinfer eval decode --model {args.model} --policies {args.policies} --budgets {args.budgets} "
               f"--gen-tokens {args.gen_tokens} --window {args.window} --out {args.out}")
    info["command"] = command
    path = write_report(runs, dict(info), Path(args.out), args.model, command)
    print(f"wrote {path}, {Path(args.out) / 'decoding.json'} and its PNGs")
    return 0


def cmd_search(args) -> int:
    from . import config as config_io
    from .eval import report
    from .eval.needle import parse_length
    from .models import load_model
    from .search import search

    print(f"loading {args.model} ...", flush=True)
    model, tok = load_model(args.model)
    length = parse_length(args.length) if args.length else None
    cfg = search(model, tok, model_id=args.model, length=length, target_density=args.density, prompts=args.prompts)
    path = config_io.save(cfg, args.out)
    report.print_table(report.config_table(cfg))
    md = report.config_markdown(cfg, Path(args.report or path.parent) / f"{path.stem}.md")
    print(f"searched in {cfg['search']['seconds']:.0f} s; wrote {path} and its report {md} (+ .png)")
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
    dc = evs.add_parser("decode", help="KV-cache policies on long decoding: teacher-forced KL / top-1, KV memory")
    dc.add_argument("--model", default="smollm2-135m", help="embedded name, HF id or path (default: %(default)s)")
    dc.add_argument("--policies", default="dense,streaming,h2o,snapkv,quest,raas", help="comma list (default: %(default)s)")
    dc.add_argument("--budgets", default="64,128,256,512,1024", help="KV budgets in tokens (default: %(default)s)")
    dc.add_argument("--gen-tokens", default="2k", help="tokens generated densely, then replayed (default: %(default)s)")
    dc.add_argument("--window", type=int, default=128, help="steps per point of the curves (default: %(default)s)")
    dc.add_argument("--out", default="docs", help="folder for decoding.md/.json/.png (default: %(default)s)")
    dc.add_argument("--report-only", action="store_true", help="rebuild decoding.md + PNGs from <out>/decoding.json")
    dc.set_defaults(func=cmd_decode)
    s_ = sub.add_parser("search", help="offline per-head pattern search (MInference) -> config JSON + report")
    s_.add_argument("--model", default="smollm2-135m", help="embedded name, HF id or path (default: %(default)s)")
    s_.add_argument("--out", required=True, help="config JSON to write (a PNG report goes beside it)")
    s_.add_argument("--report", default=None, help="folder for the report (.md + .png; default: beside --out)")
    s_.add_argument("--length", default=None, help="calibration length (default: the model's maximum)")
    s_.add_argument("--density", type=float, default=0.1, help="target kept density per head (default: %(default)s)")
    s_.add_argument("--prompts", type=int, default=2, help="calibration prompts (default: %(default)s)")
    s_.set_defaults(func=cmd_search)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
