"""Long-decoding accuracy and memory of the KV-cache policies (`sparseinfer eval decode`).

(a) Teacher-forced fidelity: the model generates a long answer densely (greedy, EOS
suppressed, step-by-step style prompt); the same tokens are then replayed one step at a time
under each policy and budget, and each step's next-token distribution is compared with the
dense one: KL(dense || policy) and top-1 agreement, per step (curves) and on average.
(b) A scored task (`decode_task`: list recall after unrelated text): accuracy, output length
and repetition rate per policy and budget, greedy generation.
(c) KV memory: the KV slots each cache holds (all layers) as the generation grows.
Writes `<out>/decoding.json`, `<out>/decoding.md` and its PNGs. Every (part, policy, budget)
cell is cached in `<out>/decoding_cache.json` as soon as it is measured (keyed by the model and
the sizes), so an interrupted run resumes and a rerun only measures what is missing.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from ..kv import budget_options, cache_kwargs, kv_cache

PROMPT = (
    "Solve the following problems one after another. For each one, reason step by step, write every "
    "intermediate result, and check the answer before moving on.\n"
    "1. A baker makes 14 trays of 24 rolls and sells 5/8 of them in the morning. How many are left?\n"
    "2. A train travels 180 km at 60 km/h and then 150 km at 75 km/h. What is its average speed?\n"
    "3. The sum of three consecutive odd numbers is 153. What are they?\n"
    "4. A tank fills in 6 hours with pipe A and 9 hours with pipe B. How long with both pipes?\n"
    "5. Anna is twice as old as Ben was when Anna was as old as Ben is now. Ben is 24. How old is Anna?\n"
    "6. How many integers between 1 and 500 are divisible by 3 or 7 but not by both?"
)


@dataclass
class DecodeRun:
    policy: str
    budget: int
    options: dict
    mean_kl: float
    top1: float
    kl_curve: list[float]  # mean KL per window of `window` steps
    top1_curve: list[float]
    kv_tokens: list[list[int]] = field(default_factory=list)  # [step, KV slots over all layers]
    kv_bytes_final: int = 0
    seconds: float = 0.0


def prompt_ids(tokenizer, text: str = PROMPT) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids


@torch.inference_mode()
def dense_reference(model, ids: torch.Tensor, n: int):
    """Greedy dense generation of exactly n tokens: (tokens [n], log-probs [n, V] float16)."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, DynamicCache()), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=model.config.eos_token_id)
    logits = torch.stack(out.logits, 1)[0]  # [n, V]
    return out.sequences[0, ids.shape[1]:], torch.log_softmax(logits.float(), -1).half()


@torch.inference_mode()
def replay(model, ids: torch.Tensor, tokens: torch.Tensor, dense_lp: torch.Tensor, cache, mem_every: int = 64):
    """Teacher-forced replay under `cache`: per-step KL(dense || policy) [n], top-1 agreement [n]
    and [step, KV slots] samples."""
    n = tokens.shape[0]
    kl = torch.zeros(n)
    agree = torch.zeros(n)
    mem = []
    dense_top = dense_lp.argmax(-1)
    kw = cache_kwargs(model, cache)  # once: the keyword does not change between steps
    out = model(ids, **kw, use_cache=True)
    for t in range(n):
        if t:
            out = model(tokens[t - 1:t][None], **kw, use_cache=True)
        lp = torch.log_softmax(out.logits[0, -1].float(), -1)
        ld = dense_lp[t].float()
        kl[t] = (ld.exp() * (ld - lp)).sum().clamp(min=0)
        agree[t] = float(lp.argmax() == dense_top[t])
        if t % mem_every == 0 or t == n - 1:
            mem.append([t, sum(cache.kv_tokens())])
    return kl, agree, mem


def _windows(x: torch.Tensor, w: int) -> list[float]:
    return [round(float(x[i:i + w].mean()), 5) for i in range(0, len(x), w)]


class CellCache:
    """Measured cells in a JSON file, written after every cell (resumable runs)."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self.data = json.loads(self.path.read_text()) if self.path and self.path.exists() else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1))


def run_decode(model, tokenizer, policies: list[str], budgets: list[int], gen_tokens: int = 2048,
               window: int = 128, log=print, *, task: dict | None = None, cache_path: Path | None = None,
               model_name: str = "model", parts: str = "fidelity,task") -> tuple[list[DecodeRun], dict]:
    """Measure the cells not in `cache_path` yet; return (fidelity runs, info incl. task rows).
    task: options of `decode_task.recall_cases` (n_cases, n_facts, filler)."""
    from . import decode_task

    cells = CellCache(cache_path)
    todo = [(p, b) for p in policies for b in ([0] if p == "dense" else budgets)]
    ids = prompt_ids(tokenizer).to(model.device)
    info = {"prompt_tokens": int(ids.shape[1]), "gen_tokens": gen_tokens, "window": window,
            "layers": model.config.num_hidden_layers}
    # (b) the scored task first: short generations
    task = dict(task or {})
    task_rows = []
    if "task" in parts:
        cases = decode_task.recall_cases(tokenizer, **task)
        tsig = f"task|{model_name}|{tuple(cases.ids.shape)}|{sorted(task.items())}"
        info["task"] = dict(task, prompt_tokens=int(cases.ids.shape[1]), cases=int(cases.ids.shape[0]),
                            max_new=cases.max_new)
        for policy, budget in todo:
            key = f"{tsig}|{policy}|{budget}"
            row = cells.get(key)
            if row is None:
                t0 = time.perf_counter()
                cache = kv_cache(model, policy, **budget_options(policy, budget))
                row = dict(decode_task.run_recall(model, tokenizer, cases, cache), policy=policy, budget=budget,
                           seconds=round(time.perf_counter() - t0, 1))
                cells.put(key, row)
                log(f"task {policy:>9} budget {budget:>5}: accuracy {row['accuracy']:.3f}  length {row['length']:.1f}  "
                    f"repetition {row['repetition']:.3f}  ({row['seconds']:.0f} s)")
            task_rows.append(row)
    info["task_rows"] = task_rows
    # (a) teacher-forced fidelity and (c) memory
    runs = []
    if "fidelity" in parts:
        fsig = f"fidelity|{model_name}|{int(ids.shape[1])}|{gen_tokens}|{window}"
        missing = [(p, b) for p, b in todo if cells.get(f"{fsig}|{p}|{b}") is None]
        tokens = dense_lp = None
        if missing:
            t0 = time.perf_counter()
            tokens, dense_lp = dense_reference(model, ids, gen_tokens)
            cells.put(f"{fsig}|sample", tokenizer.decode(tokens[:400]))
            log(f"dense reference: {ids.shape[1]} prompt + {gen_tokens} generated tokens in "
                f"{time.perf_counter() - t0:.0f} s")
        for policy, budget in todo:
            key = f"{fsig}|{policy}|{budget}"
            got = cells.get(key)
            if got is None:
                opts = budget_options(policy, budget)
                t0 = time.perf_counter()
                cache = kv_cache(model, policy, **opts)
                kl, agree, mem = replay(model, ids, tokens, dense_lp, cache)
                run = DecodeRun(policy, budget, opts, round(float(kl.mean()), 5), round(float(agree.mean()), 4),
                                _windows(kl, window), _windows(agree, window), mem, cache.kv_bytes(),
                                round(time.perf_counter() - t0, 1))
                log(f"{policy:>9} budget {budget:>5}: top-1 {run.top1:.3f}  KL {run.mean_kl:.4f}  "
                    f"KV slots {mem[-1][1]}  ({run.seconds:.0f} s)")
                cells.put(key, asdict(run))
            else:
                run = DecodeRun(**got)
            runs.append(run)
        info["dense_sample"] = cells.get(f"{fsig}|sample") or ""
    return runs, info


# ---------------------------------------------------------------- report


def load_runs(path: Path) -> tuple[list[DecodeRun], dict, str]:
    """Read back `decoding.json`: (runs, info, model name)."""
    import json

    data = json.loads(Path(path).read_text())
    info = dict(data["config"])
    return [DecodeRun(**r) for r in data["results"]], info, info.pop("model")


def write_report(runs: list[DecodeRun], info: dict, out: Path, model_name: str, command: str,
                 json_too: bool = True) -> Path:
    """decoding.md + PNGs (and decoding.json unless json_too=False, e.g. when rebuilt from it)."""
    from . import report

    out.mkdir(parents=True, exist_ok=True)
    if json_too:
        report.write_json(out / "decoding.json", "decode", dict(info, model=model_name), [asdict(r) for r in runs])
    plt = report._plt()
    policies = [p for p in dict.fromkeys(r.policy for r in runs) if p != "dense"]
    budgets = sorted({r.budget for r in runs if r.policy != "dense"})
    by = {(r.policy, r.budget): r for r in runs}
    w = info["window"]
    if runs:
        _fidelity_plots(plt, out, runs, info, policies, budgets, by, w)
    task_rows = info.get("task_rows") or []
    if task_rows:
        _task_plot(plt, out, task_rows)

    def cell(p, b, f):
        r = by.get((p, b))
        return f(r) if r else "–"

    lines = [
        f"# Long decoding with bounded KV memory ({model_name})",
        "",
        f"Regenerate with `{command}` (cells already in `decoding_cache.json` are reused; "
        "`--report-only` rebuilds this page from `decoding.json`). CPU run, reduced size (see each section). "
        "What a budget B means per policy: streaming keeps 4 sink "
        "tokens + a window of B - 4; h2o keeps B/2 heavy hitters + B/2 recent tokens; snapkv cuts the prompt "
        "to B tokens once and keeps every generated token; quest keeps every token and attends the top B/16 "
        "pages; raas keeps the whole prompt and at most B generated tokens (+ the page being filled). "
        "Compare policies at equal B with that in mind. "
        f"The first two of {info['layers']} layers stay dense in every policy.",
        "",
        "## Use",
        "",
        "```python",
        "cache = sparseinfer.kv_cache(model, \"raas\", budget=1024)        # a fresh cache per generation",
        "out = model.generate(**inputs, past_key_values=cache, max_new_tokens=8192)",
        "sparseinfer.patch(model, \"vertical_slash\", kv=\"raas\", kv_options={\"budget\": 1024})  # or: every generate",
        "```",
        "",
        "| policy | options (defaults) | KV memory | decode reads |",
        "|---|---|---|---|",
        "| `dense` | – | all tokens | all tokens |",
        "| `streaming` | `sink=4`, `window=1020` | sink + window | sink + window |",
        "| `h2o` | `heavy=512`, `recent=512` (accumulated attention) | heavy + recent | heavy + recent |",
        "| `snapkv` | `capacity=1024`, `window=32`, `kernel=7`, `pooling=\"avg\"` | capacity + generated | same |",
        "| `quest` | `budget=1024`, `page_size=16` (Quest bound, last page always) | all tokens | budget |",
        "| `raas` | `budget=1024`, `page_size=16`, `prompt=\"keep\"` or `\"quest\"`, `prompt_budget`, `select` | "
        "prompt + budget + one page | prompt (or its top pages) + held pages |",
        "",
        "Every policy takes `dense_layers` (default 2: the first two layers keep and read every token). "
        "The decode step keeps static shapes and no host sync in raas / streaming / h2o (eviction by argmin of "
        "timestamps or scores on the device); quest and snapkv grow their buffers by design. "
        "Decode attention: `sparseinfer.ops.decode.sparse_decode_attention`: a Triton kernel on CUDA "
        "(`sparseinfer.kernels.decode`: the query heads of a GQA group share each K/V page load, split over the "
        "pages, flash-decoding merge; Quest page scores in a second kernel), the torch reference elsewhere "
        "(this page's runs are CPU runs). GPU speed and memory: `benchmarks/decode.py`.",
        "",
    ]
    lines += _task_lines(info)
    if runs:
        lines += [
            "## Teacher-forced fidelity: top-1 agreement with dense (mean KL(dense || policy) in parentheses)", "",
            f"The model answered a step-by-step prompt ({info['prompt_tokens']} tokens) densely for "
            f"{info['gen_tokens']} tokens (greedy, EOS suppressed); the same tokens were replayed one step at a time "
            "under each KV policy, and each step's next-token distribution was compared with dense. Budgets of "
            f"{info['prompt_tokens'] + info['gen_tokens']} tokens or more (prompt + replayed tokens) keep every token "
            "in every policy, equal to dense by construction: larger budgets need longer runs than this one.", "",
            "| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
    for p in policies if runs else []:
        lines.append(f"| {p} | " + " | ".join(cell(p, b, lambda r: f"{100 * r.top1:.1f}% ({r.mean_kl:.3f})")
                                              for b in budgets) + " |")
    if ("dense", 0) in by:
        d = by[("dense", 0)]
        lines.append(f"| dense (check) | {100 * d.top1:.1f}% ({d.mean_kl:.4f}) |" + " |" * (len(budgets) - 1))
    if not runs:
        return _finish(out, lines)
    lines += ["", "![top-1 agreement over the generation](decoding-top1.png)", "",
              "## KV memory at the end of the generation (KV slots summed over layers, per sequence and KV head)", "",
              "| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for p in policies:
        lines.append(f"| {p} | " + " | ".join(cell(p, b, lambda r: str(r.kv_tokens[-1][1])) for b in budgets) + " |")
    if ("dense", 0) in by:
        lines.append(f"| dense | {by[('dense', 0)].kv_tokens[-1][1]} |" + " |" * (len(budgets) - 1))
    lines += ["", "![KV memory as the generation grows](decoding-memory.png)", "",
              "Step 0 is right after the pre-fill (streaming / h2o / snapkv compress the prompt at the first decode "
              "step); raas allocates prompt + budget + one page up front, so it holds more than dense until the "
              "generation passes budget + one page tokens, and stays flat after that (the slope left is the two "
              "dense layers). Dense and quest coincide (both keep every token), as do streaming and h2o at equal "
              "budgets.", "",
              "Start of the dense answer that was replayed:", "", "```", info.get("dense_sample", "").strip(), "```", ""]
    return _finish(out, lines)


def _finish(out: Path, lines: list[str]) -> Path:
    path = out / "decoding.md"
    path.write_text("\n".join(lines))
    return path


def _fidelity_plots(plt, out, runs, info, policies, budgets, by, w):
    # top-1 agreement curves, one panel per budget
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.4), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], budgets):
        for p in policies:
            r = by.get((p, b))
            if r:
                ax.plot([w * (i + 0.5) for i in range(len(r.top1_curve))], r.top1_curve, label=p, marker=".")
        ax.set_title(f"budget {b}")
        ax.set_xlabel("generated token")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel(f"top-1 agreement with dense (per {w} steps)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decoding-top1.png", dpi=110)
    plt.close(fig)
    # KV memory as the generation grows, at the middle budget
    mb = budgets[len(budgets) // 2] if budgets else 0
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, p in enumerate(["dense"] + policies):
        r = by.get((p, 0 if p == "dense" else mb))
        if r:
            ax.plot([m[0] for m in r.kv_tokens], [m[1] / info["layers"] for m in r.kv_tokens], label=p, marker=".",
                    linestyle=["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))][i % 6], linewidth=2.2 - 0.2 * i)
    ax.set_xlabel("generated token")
    ax.set_ylabel("KV slots per layer (mean)")
    ax.set_title(f"KV memory, budget {mb}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decoding-memory.png", dpi=110)
    plt.close(fig)


def _task_plot(plt, out, rows):
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    dense = [r for r in rows if r["policy"] == "dense"]
    for p in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "dense"):
        pr = sorted((r for r in rows if r["policy"] == p), key=lambda r: r["budget"])
        ax.plot([r["budget"] for r in pr], [r["accuracy"] for r in pr], marker="o", label=p)
    if dense:
        ax.axhline(dense[0]["accuracy"], color="k", linestyle="--", label="dense")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV budget (tokens)")
    ax.set_ylabel("list-recall accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decoding-task.png", dpi=110)
    plt.close(fig)


def _task_lines(info) -> list[str]:
    rows = info.get("task_rows") or []
    if not rows:
        return []
    t = info["task"]
    budgets = sorted({r["budget"] for r in rows if r["policy"] != "dense"})
    by = {(r["policy"], r["budget"]): r for r in rows}
    lines = ["## Scored task: list recall after unrelated text", "",
             f"{t['cases']} prompts of {t['prompt_tokens']} tokens: a list of {t['n_facts']} people with two-digit "
             f"numbers, then ~{t['filler']} tokens of essay text, then \"repeat the list ... in the same order\" "
             f"with its first two lines given. Greedy generation (at most {t['max_new']} tokens). "
             "Accuracy: the fraction of lines 3.. with the right number; length: generated tokens before EOS; "
             "repetition: the fraction of generated lines repeating an earlier one. Each line needs a fact far "
             "back in the prompt and the model's own previous line. Cell: accuracy (length, repetition). "
             "raas keeps the whole prompt by design (its budget bounds the generated tokens only), so a fact in the "
             "prompt survives any raas budget; quest must select the fact's page among all pages, and streaming, "
             "h2o and snapkv must have kept it. With answers this short, raas's page eviction is barely exercised "
             "here (the teacher-forced replay below runs longer).", "",
             "| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for p in dict.fromkeys(r["policy"] for r in rows):
        if p == "dense":
            r = by[("dense", 0)]
            lines.append(f"| dense | {100 * r['accuracy']:.0f}% ({r['length']:.0f}, {r['repetition']:.2f}) |"
                         + " |" * (len(budgets) - 1))
            continue
        cells = []
        for b in budgets:
            r = by.get((p, b))
            cells.append(f"{100 * r['accuracy']:.0f}% ({r['length']:.0f}, {r['repetition']:.2f})" if r else "–")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += ["", "![list-recall accuracy per budget](decoding-task.png)", ""]
    return lines
