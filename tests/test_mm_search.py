"""MMInference offline search: kernel-aware cost, per-head choice by output error, config round trip."""
import pytest
import torch

import sparseinfer
from sparseinfer import config as config_io
from sparseinfer import mm_search
from sparseinfer.ops.mm import mm_density
from sparseinfer.patterns.mm import MMInferenceLayer, ModalityContext
from sparseinfer.synthetic_video import video_qkv
from test_mm_vlm import vl  # noqa: F401  (the tiny Qwen2-VL fixture)


def test_search_picks_modality_aware_heads_on_video_input():
    """The last queries are text: only Q-/2D-boundary candidates estimate the video heads from
    video queries; the search must find that out from the output error alone."""
    n = 1024
    q, k, v, mod, _, _ = video_qkv(1, 4, 2, n, 64, 64, seed=0)
    heads, info = mm_search.search_layer(q, k, v, mod, 64, 0.125, target=0.6, space=mm_search.candidates((0.05,)))
    assert all(h["boundary"] in ("q", "2d") for h in heads), heads
    assert all(i["error"] < 0.1 and i["cost"] <= 0.6 for i in info), info


def test_kernel_cost_counts_tiles_at_least_the_cells():
    n = 700
    q, k, _, mod, _, _ = video_qkv(1, 4, 2, n, 32, 64, seed=1)
    (sel,) = MMInferenceLayer(mm_search.candidates((0.05,))[10:14], ModalityContext(mod, 64)).select(q, k, 0.2)
    kw = sel.kwargs
    cost = mm_search.kernel_cost(n, mod, kw["vertical_idx"], kw["slash_idx"], kw["dense_rows"])
    dens = mm_density(n, mod, kw["vertical_idx"], kw["slash_idx"], kw["dense_rows"])
    assert (cost >= dens - 1e-6).all() and (cost < 4 * dens + 0.2).all()


def test_search_model_config_round_trip(vl, tmp_path):  # noqa: F811
    model, inputs, _ = vl
    mod = inputs["mm_token_type_ids"]
    cfg = mm_search.search_model(model, inputs, mod, frame=16, target=0.8, space=mm_search.candidates((0.05, 0.1)),
                                 name="tiny-qwen2-vl")
    assert cfg["kind"] == "mminference" and len(cfg["layers"]) == 2 and all(len(h) == 4 for h in cfg["layers"])
    path = config_io.save(cfg, tmp_path / "mm.json")
    assert _patched_forward(model, inputs, path).stats.density() < 1.0


def _patched_forward(model, inputs, config):
    """One forward with `patch(model, "mminference", config=...)`; every layer must take the
    sparse route. -> the patch handle."""
    handle = sparseinfer.patch(model, "mminference", config=str(config), min_len=0)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        sparseinfer.unpatch(model)
    assert [r.method for r in handle.stats.records] == ["mminference"] * 2
    return handle


def test_cli_search_mm_inputs_writes_a_config_patch_reads(vl, tmp_path):  # noqa: F811
    """`sparseinfer search --model DIR --mm-inputs FILE`: the VLM search from the command line
    (model saved and reloaded, inputs from torch.save), and the config it writes patches."""
    from sparseinfer import cli

    model, inputs, _ = vl
    model.save_pretrained(tmp_path / "vl")
    torch.save(inputs, tmp_path / "inputs.pt")
    out = tmp_path / "mm.json"
    rc = cli.main(["search", "--model", str(tmp_path / "vl"), "--mm-inputs", str(tmp_path / "inputs.pt"),
                   "--out", str(out), "--density", "0.8", "--levels", "0.05"])
    assert rc == 0
    cfg = config_io.load(out)
    assert cfg["kind"] == "mminference" and cfg["search"]["frame"] == 16 and len(cfg["layers"]) == 2
    _patched_forward(model, inputs, out)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(SystemExit, match="expected a dict of tensors"):
        cli.main(["search", "--model", str(tmp_path / "vl"), "--mm-inputs", str(tmp_path / "list.pt"), "--out", str(out)])
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["search", "--model", str(tmp_path / "vl"), "--mm-inputs", str(tmp_path / "none.pt"), "--out", str(out)])
