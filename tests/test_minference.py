"""Per-head configs (MInference): config IO and checks, mixed-pattern layers, the search."""
import json

import pytest
import torch

import sparseinfer
from masks import ashape_mask, block_sparse_mask, masked_attention_f64, rel_err, vertical_slash_mask
from sparseinfer import config as config_io
from sparseinfer.integration import run_selections
from sparseinfer.patterns import vertical_slash as vs
from sparseinfer.patterns.minference import MInferenceLayer

HEADS = [
    {"pattern": "vertical_slash", "vertical": 10, "slash": 40},
    {"pattern": "ashape", "sink": 4, "window": 16},
    {"pattern": "block_sparse", "topk": 2, "block_size": 32},
    {"pattern": "vertical_slash", "vertical": 0.05, "slash": 0.25},
]


def test_mixed_layer_matches_per_head_masks():
    torch.manual_seed(0)
    n = 150
    q, k, v = torch.randn(2, 4, n, 64), torch.randn(2, 2, n, 64), torch.randn(2, 2, n, 64)
    parts = MInferenceLayer(HEADS).select(q, k, 0.125)
    assert [p.op for p in parts] == ["vertical_slash_attention", "block_sparse_attention"]
    vs_part, bs_part = parts
    vi, si = vs_part.kwargs["vertical_idx"], vs_part.kwargs["slash_idx"]
    # vertical-slash heads: the estimate's best `budget` entries
    ev, es = vs.estimate(q, k, 10, 40)
    assert set(vi[0, 0][vi[0, 0] >= 0].tolist()) == set(ev[0, 0].tolist())
    assert (vi[:, 3] >= 0).sum(-1).tolist() == [8, 8] and (si[:, 3] >= 0).sum(-1).tolist() == [38, 38]
    masks = torch.stack([
        vertical_slash_mask(n, vi, si)[:, 0],
        ashape_mask(n, 4, 16).expand(2, n, n),
        block_sparse_mask(n, bs_part.kwargs["block_idx"], 32)[:, 2],
        vertical_slash_mask(n, vi, si)[:, 3],
    ], dim=1)
    out = run_selections(parts, q, k, v, 0.125)
    assert rel_err(out, masked_attention_f64(q, k, v, masks)) < 1e-5
    # per-head density: each head counted by the part serving it
    dens = vs_part.density.where(vs_part.heads, bs_part.density)
    want = masks.double().sum((-1, -2)) / (n * (n + 1) / 2)
    assert torch.allclose(dens.double(), want, atol=1e-6)


def _cfg(layers, heads, **extra):
    return {"schema_version": 1, "model": "x", "layers": [[dict(HEADS[0])] * heads] * layers, **extra}


def test_config_errors(tmp_path):
    with pytest.raises(config_io.ConfigError, match="schema_version 1"):
        config_io.validate({"schema_version": 9, "layers": []})
    with pytest.raises(config_io.ConfigError, match="expected pattern in"):
        config_io.validate({"schema_version": 1, "layers": [[{"pattern": "diagonal"}]]})
    with pytest.raises(config_io.ConfigError, match=r"needs \['slash'\]"):
        config_io.validate({"schema_version": 1, "layers": [[{"pattern": "vertical_slash", "vertical": 3}]]})
    with pytest.raises(config_io.ConfigError, match="no such file"):
        config_io.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(config_io.ConfigError, match="not valid JSON"):
        config_io.load(bad)
    path = config_io.save(_cfg(2, 3), tmp_path / "ok.json")
    assert config_io.load(path)["layers"][1][2]["pattern"] == "vertical_slash"


def test_patch_refuses_mismatched_config(smol, tmp_path):
    model, _ = smol
    path = config_io.save(_cfg(30, 8), tmp_path / "c.json")
    with pytest.raises(config_io.ConfigError, match=r"30 layers x 8 heads.*model has 30 layers x 9 heads"):
        sparseinfer.patch(model, "minference", config=str(path))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['topk'\]"):
        sparseinfer.patch(model, "minference", topk=3)
    assert model.config._attn_implementation == "sdpa"


def test_no_shipped_config_for_other_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(config_io.ConfigError, match="sparseinfer search --model"):
        sparseinfer.patch(tiny, "minference")


def test_shipped_config_is_found_and_used(smol, essay_ids):
    model, _ = smol
    path = config_io.shipped_for(model.config)
    cfg = config_io.load(path)
    assert len(cfg["layers"]) == 30 and all(len(h) == 9 for h in cfg["layers"])
    ids = torch.tensor([essay_ids[:1024]])
    with torch.no_grad():
        dense = model(ids).logits
        handle = sparseinfer.patch(model, "minference")
        try:
            out = model(ids).logits
        finally:
            sparseinfer.unpatch(model)
    assert torch.isfinite(out).all() and rel_err(out, dense) > 1e-4
    assert 0.02 < handle.stats.density() < 0.4
    assert {r.method for r in handle.stats.records} == {"minference"}


def test_allocate_is_the_best_feasible_choice():
    import itertools

    from sparseinfer.search import allocate

    g = torch.Generator().manual_seed(0)
    recall = torch.tensor([[0.5, 0.6, 0.9, 1.0], [0.8, 0.95, 0.99, 1.0], [0.99, 0.995, 1.0, 1.0]])
    density = torch.tensor([[0.05, 0.1, 0.2, 1.0]] * 3)
    assert allocate(recall, density, 0.1).tolist() == [2, 0, 0]  # the diffuse head gets the most
    for trial in range(5):
        recall = torch.rand(4, 5, generator=g)
        density = torch.rand(4, 5, generator=g).round(decimals=3)
        target = float(density.min(1).values.mean()) + 0.1 * trial
        choice = allocate(recall, density, target)
        rows = torch.arange(4)
        assert float(density[rows, choice].mean()) <= target + 1e-6
        best = max(float(recall[rows, torch.tensor(c)].sum()) for c in itertools.product(range(5), repeat=4)
                   if float(density[rows, torch.tensor(c)].mean()) <= target + 1e-6)
        assert float(recall[rows, choice].sum()) == pytest.approx(best, abs=1e-6)


def test_search_meets_its_density_and_prefers_recall(smol, tmp_path):
    from sparseinfer.search import search

    model, tok = smol
    cfg = search(model, tok, length=768, target_density=0.2, prompts=1, progress=False)
    config_io.validate(cfg)
    assert cfg["fingerprint"] == config_io.fingerprint(model.config)
    heads = [h for layer in cfg["layers"] for h in layer]
    assert len(heads) == 270
    dens = [h["density"] for h in heads]
    assert all(0 < d <= 1.0 for d in dens) and sum(dens) / len(dens) <= 0.2 + 1e-4
    assert max(dens) > 0.2 + 1e-3  # budgets moved to the heads that need them
    assert all(0 < h["recall"] <= 1.0 + 1e-6 for h in heads)
    # the calibration-length density, applied through patch, is near the target
    path = config_io.save(cfg, tmp_path / "s.json")
    from sparseinfer.search import calibration_prompts

    ids = torch.tensor([calibration_prompts(tok, 768, 1)[0]])
    handle = sparseinfer.patch(model, "minference", config=str(path), min_len=0)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        sparseinfer.unpatch(model)
    assert 0.12 < handle.stats.density() <= 0.21
    assert json.loads(path.read_text())["search"]["target_density"] == 0.2


@pytest.mark.parametrize("mode", [False, True])
def test_block_sparse_heads_with_different_budgets_keep_their_best_blocks(monkeypatch, mode):
    """Block-sparse heads of one layer with different top-k: each keeps its own best-scoring
    blocks (the estimate's rows come ascending from the Triton top-k on CUDA, by score from
    torch.topk: the per-head cut must rank by score either way); mode: bs.TOPK_KERNEL."""
    from sparseinfer.patterns import block_sparse as bs

    torch.manual_seed(3)
    n = 400
    q, k = torch.randn(1, 3, n, 32), torch.randn(1, 3, n, 32)
    heads = [{"pattern": "block_sparse", "topk": t, "block_size": 32} for t in (2, 5, 3)]
    monkeypatch.setattr(bs, "TOPK_KERNEL", mode)
    (part,) = MInferenceLayer(heads).select(q, k, 0.125)
    got = part.kwargs["block_idx"]
    monkeypatch.setattr(bs, "TOPK_KERNEL", False)
    for h, t in enumerate((2, 5, 3)):
        want = bs.estimate(q[:, h:h + 1], k[:, h:h + 1], t, 32, 0.125)[0, 0]
        for r in range(got.shape[2]):
            assert set(got[0, h, r].tolist()) - {-1} == set(want[r].tolist()) - {-1}, (h, r)


def test_search_block_sparse_candidates_keep_each_heads_best_blocks_with_either_topk(monkeypatch):
    """search.layer_candidates: a block-sparse budget of kk blocks keeps each head's kk best-scoring
    blocks, whether bs.estimate selects with the Triton top-k (what CUDA takes: rows come ascending)
    or with torch.topk (rows by score). It once kept the lowest block ids on CUDA."""
    from sparseinfer import search
    from sparseinfer.patterns import block_sparse as bs

    torch.manual_seed(5)
    n, d = 1024, 32
    q, k = torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    k[:, :, 700:760] += 0.8 * q[:, :, -1:].mean(0)  # late heavy blocks: the best are not the lowest ids
    got = {}
    for mode in (False, True):
        monkeypatch.setattr(bs, "TOPK_KERNEL", mode)
        cands = [c for c in search.layer_candidates(q, k, d ** -0.5, [0.05, 0.2]) if c["pattern"] == "block_sparse"]
        got[mode] = cands
    assert len(got[False]) == len(got[True]) == 2
    for a, b in zip(got[False], got[True]):
        assert a["budgets"] == b["budgets"]
        assert torch.equal(a["density"], b["density"])
        assert torch.allclose(a["recall"], b["recall"], rtol=0, atol=1e-6)
