"""The `sparseinfer` command: demo, eval niah, eval fidelity."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_METHODS = ["dense", "vertical_slash"]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_niah(args) -> int:
    from .eval import report
    from .eval.needle import parse_length
    from .eval.runner import as_dicts, run_niah
    from .models import load_model

    lengths = [parse_length(x) for x in _csv(args.lengths)]
    methods = _csv(args.methods)
    print(f"loading {args.model} ...", flush=True)
    model, tok = load_model(args.model)
    rows = as_dicts(run_niah(model, tok, methods, lengths, args.depths, min_len=args.min_len))
    out = Path(args.out)
    report.print_table(report.niah_table(rows))
    config = {"model": args.model, "methods": methods, "lengths": lengths, "depths": args.depths, "min_len": args.min_len}
    report.write_json(out / "niah.json", "niah", config, rows)
    png = report.niah_heatmap(rows, out / "niah.png", f"NIAH, {args.model}")
    print(f"wrote {out / 'niah.json'} and {png}")
    return 0


def cmd_fidelity(args) -> int:
    from .eval import report
    from .eval.needle import parse_length
    from .eval.runner import as_dicts, run_fidelity
    from .models import load_model

    lengths = [parse_length(x) for x in _csv(args.lengths)]
    methods = _csv(args.methods)
    print(f"loading {args.model} ...", flush=True)
    model, tok = load_model(args.model)
    rows = as_dicts(run_fidelity(model, tok, methods, lengths, min_len=args.min_len))
    report.print_table(report.fidelity_table(rows))
    out = Path(args.out)
    report.write_json(out / "fidelity.json", "fidelity", {"model": args.model, "methods": methods, "lengths": lengths}, rows)
    print(f"wrote {out / 'fidelity.json'}")
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
    n = evs.add_parser("niah", parents=[common], help="needle-in-a-haystack: table, JSON, heatmap PNG")
    n.add_argument("--depths", type=int, default=5, help="needle depths per length (default: %(default)s)")
    n.set_defaults(func=cmd_niah)
    f = evs.add_parser("fidelity", parents=[common], help="KL of next-token distributions, hidden-state error, density")
    f.set_defaults(func=cmd_fidelity)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
