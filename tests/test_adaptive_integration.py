"""Guards (density, rollout), monitoring (record) and shadow mode, on tiny random models and on
direct attention calls, against float64 references."""
from __future__ import annotations

import json
import math

import pytest
import torch

import sparseinfer
from masks import block_sparse_mask, masked_attention_f64, rel_err
from sparseinfer import integration as integ
from sparseinfer.eval.runner import parse_method
from sparseinfer.patterns import XAttention

N = 256


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper attention than the default init, so patterns differ from dense
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    ids = torch.randint(0, 64, (1, N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
    return model, ids, dense


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


XA = {"stride": 4, "block_size": 32}
FP = {"block_size": 32}


@pytest.mark.parametrize("method,full,small", [("xattention", dict(XA, tau=1.0), dict(XA, tau=0.3)),
                                               ("flexprefill", dict(FP, gamma=1.0), dict(FP, gamma=0.5))])
def test_full_mass_matches_dense_and_small_differs(tiny, method, full, small):
    model, ids, dense = tiny
    sparseinfer.patch(model, method, min_len=0, **full)
    got = _logits(model, ids)
    h = sparseinfer.patch(model, method, min_len=0, **small)
    low = _logits(model, ids)
    sparseinfer.unpatch(model)
    assert rel_err(got, dense) < 1e-4
    assert rel_err(low, dense) > 1e-3 and torch.isfinite(low).all()
    assert 0 < h.stats.density() < 1


def test_parse_method_reaches_new_patterns(tiny):
    model, ids, _ = tiny
    for spec in ("xattention:tau=0.8:stride=4:block_size=32", "flexprefill:gamma=0.9:tau=0.2:block_size=32"):
        name, opts = parse_method(spec)
        h = sparseinfer.patch(model, name, min_len=0, **opts)
        _logits(model, ids)
        assert {r.method for r in h.stats.records} == {name}
    sparseinfer.unpatch(model)


# ---------------------------------------------------------------- direct attention calls
class _Attn(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = groups
        self.layer_idx = 0


def _call(plan, q, k, v):
    mod = _Attn(q.shape[1] // k.shape[1]).eval()
    mod._sparseinfer = plan
    out, _ = integ.sparse_attention_forward(mod, q, k, v, None, scaling=q.shape[-1] ** -0.5)
    return out.transpose(1, 2)


def _qkv(n=N, hq=4, hkv=2, d=16):
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, hkv, n, d, generator=g)
    # each query looks like its own key, more or less strongly: heads from flat to peaked (local)
    q = torch.randn(1, hq, n, d, generator=g) * 0.5 + k.repeat_interleave(hq // hkv, 1) * torch.tensor(
        [0.0, 0.5, 1.0, 3.0])[None, :, None, None]
    u = torch.randn(d, generator=g)
    k[:, :, :4] += 3 * u  # sink keys, which some heads attend to strongly
    q += u * torch.tensor([0.0, 0.5, 1.0, 2.0])[None, :, None, None]
    return q, k, torch.randn(1, hkv, n, d, generator=g)


def _plan(pattern, **kw):
    return integ.LayerPlan(0, pattern, 0, integ.PatchStats(), "auto", set(), **kw)


@pytest.mark.parametrize("direct", [True, False])
def test_density_guard_routes_heads_over_the_limit_to_dense(monkeypatch, direct):
    """direct: the op writes transformers' [B, N, Hq, D] result through a transposed view
    (integration.DIRECT_OUT), its float buffers allocated full of NaN here: a head nobody wrote
    would show."""
    monkeypatch.setattr(integ, "DIRECT_OUT", direct)
    real_empty = torch.empty

    def nan_empty(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    q, k, v = _qkv()
    pat = XAttention(tau=0.9, stride=4, block_size=32)
    sel = pat.select(q, k, 0.25)[0]
    dens = sel.density[0]
    assert dens.max() - dens.min() > 0.05  # the heads differ
    limit = float(dens.sort().values[1:3].mean())  # two heads above, two below
    over = dens > limit
    plan = _plan(pat, max_density=limit)
    out = _call(plan, q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # [B, N, Hq, D], as transformers wants
    mask = torch.where(over[None, :, None, None], torch.ones(N, N, dtype=torch.bool).tril(),
                       block_sparse_mask(N, sel.kwargs["block_idx"], 32))
    assert rel_err(out, masked_attention_f64(q, k, v, mask, 0.25)) < 1e-5
    rec = plan.stats.records[-1]
    assert rec.reason == "density" and torch.equal(rec.dense_heads, over)
    assert torch.allclose(rec.density[0], torch.where(over, 1.0, dens))
    # every head over: the whole call is dense; max_density=1.0: the guard is off
    plan = _plan(pat, max_density=float(dens.min()) / 2)
    out = _call(plan, q, k, v)
    assert plan.stats.records[-1].reason == "density" and plan.stats.records[-1].density is None
    assert rel_err(out, masked_attention_f64(q, k, v, torch.ones(N, N, dtype=torch.bool).tril(), 0.25)) < 1e-5
    plan = _plan(pat, max_density=1.0)
    _call(plan, q, k, v)
    assert plan.stats.records[-1].reason == "" and plan.stats.records[-1].dense_heads is None


def test_vertical_slash_work_tracks_the_visited_area():
    """The visited-area estimate behind the vertical-slash guard: exact for one local band,
    within 15% of the built index's visited tiles for a realistic shape, and near 1 for
    scattered slashes whose kept density is low (bands with holes)."""
    from sparseinfer.index import from_vertical_slash, vertical_slash_work
    from sparseinfer.patterns.vertical_slash import vertical_slash_density

    n = 600
    band = torch.arange(50).expand(1, 2, 50)
    w = vertical_slash_work(n, torch.full((1, 2, 1), -1), band, 64)
    assert torch.allclose(w, torch.full((1, 2), n * (49 + 64) / (n * (n + 1) / 2)))
    g = torch.Generator().manual_seed(0)
    vert, scat = torch.randint(0, n, (1, 2, 10), generator=g), torch.randint(0, n, (1, 2, 60), generator=g)
    assert (vertical_slash_work(n, vert, scat, 64) == 1.0).all()
    assert (vertical_slash_density(n, vert, scat) < 0.15).all()
    n = 8192
    vert = torch.cat([torch.arange(8).expand(1, 2, 8), torch.randint(8, n, (1, 2, 60), generator=g)], -1)
    runs = torch.randint(300, n - 60, (1, 2, 5), generator=g)
    sl = torch.cat([torch.arange(256).expand(1, 2, 256), (runs[..., None] + torch.arange(50)).reshape(1, 2, 250)], -1)
    w = vertical_slash_work(n, vert, sl, 64)
    want = from_vertical_slash(vert, sl, n, 64).work_fraction(64, samples=1000)
    assert ((w - want).abs() < 0.15 * want).all(), (w, want)


def test_work_guard_routes_scattered_vertical_slash_heads_to_dense():
    """When the Triton kernel serves the call, vertical-slash heads whose slashes scatter (the
    kernel would visit nearly every cell) run dense; heads with a local band stay sparse."""
    from masks import vertical_slash_mask

    from sparseinfer.patterns.base import Pattern, Selection

    n = 1024
    q, k, v = _qkv(n=n)
    g = torch.Generator().manual_seed(4)
    vert = torch.randint(0, n, (1, 4, 6), generator=g)
    # heads 0-1: 60 scattered offsets (work 1.0); heads 2-3: offsets 0..9 (work 0.15)
    sl = torch.cat([torch.randint(0, n, (1, 2, 60), generator=g), torch.arange(60).expand(1, 2, 60) % 10], 1)

    class Fixed(Pattern):
        name = "vertical_slash"

        def select(self, q, k, scale):
            return [Selection("vertical_slash_attention", {"vertical_idx": vert, "slash_idx": sl},
                              torch.full((1, 4), 0.1))]

    over = torch.tensor([True, True, False, False])
    plan = integ.LayerPlan(0, Fixed(), 0, integ.PatchStats(), "triton", set())
    out = _call(plan, q, k, v)
    mask = torch.where(over[None, :, None, None], torch.ones(n, n, dtype=torch.bool).tril(),
                       vertical_slash_mask(n, vert, sl))
    assert rel_err(out, masked_attention_f64(q, k, v, mask, 0.25)) < 1e-4
    rec = plan.stats.records[-1]
    assert rec.reason == "density" and torch.equal(rec.dense_heads, over)
    # the caller's max_density is then the only guard; off for the CPU reference
    for backend, kw in (("triton", {"max_density": 1.0}), ("reference", {})):
        plan = integ.LayerPlan(0, Fixed(), 0, integ.PatchStats(), backend, set(), **kw)
        out = _call(plan, q, k, v)
        assert plan.stats.records[-1].dense_heads is None
        assert rel_err(out, masked_attention_f64(q, k, v, vertical_slash_mask(n, vert, sl), 0.25)) < 1e-4


def test_density_probe_skips_the_estimation_when_every_head_goes_dense(monkeypatch):
    """The probe (the estimate on a few query blocks) tracks the full estimate's density, and a
    call whose every head is over the limit runs dense without paying the full estimation."""
    from sparseinfer.patterns.xattention import probe_density

    q, k, v = _qkv(n=512)
    pat = XAttention(tau=0.9, stride=4, block_size=32)
    full = pat.select(q, k, 0.25)[0].density
    probe = probe_density(q, k, 0.9, 4, 32, 0.25, samples=8)
    assert probe.shape == full.shape and (probe - full).abs().max() < 0.06, (probe, full)
    monkeypatch.setattr(pat, "select", lambda *a: (_ for _ in ()).throw(AssertionError("estimated")))
    plan = _plan(pat, max_density=float(full.min()) / 2)
    out = _call(plan, q, k, v)
    assert plan.stats.records[-1].reason == "density"
    assert rel_err(out, masked_attention_f64(q, k, v, torch.ones(512, 512, dtype=torch.bool).tril(), 0.25)) < 1e-5


def test_xattention_probe_is_the_estimate_on_the_sampled_rows():
    """The probe (its sampled query groups reversed, k in order) keeps the full estimate's blocks
    when every query block is sampled: the same antidiagonal sums, in float64."""
    from sparseinfer.patterns import xattention as xa

    n, bs = 510, 20  # a partial last block
    q, k, _ = _qkv(n=n)
    q, k = q.double(), k.double()
    for tau in (0.5, 0.9):
        idx, _ = xa.estimate(q, k, tau, 4, bs, 0.25, fused=False)
        nb = idx.shape[2]
        blocks = (idx >= 0).sum((-1, -2)).double() / (nb * (nb + 1) / 2)
        probe = xa.probe_density(q, k, tau, 4, bs, 0.25, samples=nb, fused=False)
        assert torch.allclose(probe.double(), blocks, atol=1e-6), (tau, probe, blocks)


def test_flexprefill_probe_tracks_the_query_aware_density_and_skips_the_estimation(monkeypatch):
    """FlexPrefill's probe (the pooled map on a few query blocks, the gamma set over them) tracks
    the full estimate's query-aware density; exact when every block is sampled; a call whose
    every head is over the limit runs dense without the full estimation."""
    from sparseinfer.patterns import FlexPrefill
    from sparseinfer.patterns import flexprefill as fp
    from sparseinfer.patterns.block_sparse import block_sparse_density
    from sparseinfer.patterns.xattention import table_to_index

    n, bs = 510, 25  # a partial last block
    q, k, v = _qkv(n=n)
    for gamma in (0.5, 0.9):
        est = fp.estimate(q, k, gamma, 0.1, bs, 0.25)
        nb = est.block_table.shape[-1]
        blocks = est.block_table.sum((-1, -2)).float() / (nb * (nb + 1) / 2)  # kept / causal blocks, all heads
        exact = fp.probe_density(q, k, gamma, bs, 0.25, samples=nb)
        assert torch.allclose(exact, blocks, atol=1e-6), (exact, blocks)
        probe = fp.probe_density(q, k, gamma, bs, 0.25, samples=8)
        assert probe.shape == blocks.shape and (probe - blocks).abs().max() < 0.08, (gamma, probe, blocks)
        pairs = block_sparse_density(n, table_to_index(est.block_table), bs)  # what the guard compares later
        assert ((probe - pairs).abs() < 0.1).all() and pairs.min() < 0.7, (probe, pairs)  # not all kept
    pat = FlexPrefill(gamma=0.9, tau=0.1, block_size=bs)
    monkeypatch.setattr(pat, "select", lambda *a: (_ for _ in ()).throw(AssertionError("estimated")))
    plan = _plan(pat, max_density=float(probe.min()) / 2)
    out = _call(plan, q, k, v)
    assert plan.stats.records[-1].reason == "density"
    assert rel_err(out, masked_attention_f64(q, k, v, torch.ones(n, n, dtype=torch.bool).tril(), 0.25)) < 1e-5


def test_recorder_audit_is_the_true_mass_kept_on_the_last_queries(tmp_path):
    q, k, v = _qkv()
    pat = XAttention(tau=0.7, stride=4, block_size=32)
    plan = _plan(pat)
    plan.recorder = sparseinfer.monitor.Recorder(audit=1.0)
    _call(plan, q, k, v)
    tr = plan.recorder.calls[0]
    idx = pat.select(q, k, 0.25)[0].kwargs["block_idx"]
    mask = block_sparse_mask(N, idx, 32)[0, :, -64:]  # [Hq, 64, N]
    kk = k.double().repeat_interleave(2, 1)[0]
    s = (q.double()[0, :, -64:] @ kk.transpose(-1, -2)) * 0.25
    causal = torch.arange(N - 64, N)[:, None] >= torch.arange(N)[None, :]
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    want = (p * mask).sum(-1).mean(-1)
    assert torch.allclose(tr.covered[0].double(), want, atol=1e-5)
    assert (want < 1).all() and tr.estimate_s > 0 and tr.reason == ""


def test_record_on_a_model(tiny, tmp_path):
    model, ids, _ = tiny
    with pytest.raises(ValueError, match="patched"):
        with sparseinfer.record(model):
            pass
    h = sparseinfer.patch(model, "xattention", min_len=0, dense_layers=[2], **XA)
    with sparseinfer.record(model, audit=0.5, seed=3) as rec:
        _logits(model, ids)
        _logits(model, ids[:, :8])  # a second, short call (sparse too: min_len=0)
    plans = [m._sparseinfer for m in integ._attention_modules(model)]
    assert all(p.recorder is None for p in plans)  # off again after the block
    layers = rec.layers()
    assert [r["layer"] for r in layers] == [0, 1, 2]
    assert layers[2]["sparse_calls"] == 0 and layers[2]["fallbacks"] == {"dense_layers": 2}
    for r in layers[:2]:
        want = torch.stack([c.density[0] for c in h.stats.records if c.layer == r["layer"]]).mean(0)
        assert torch.allclose(torch.tensor(r["density"]), want)
    audited = sum(r["audited_calls"] for r in layers)
    assert 0 < audited < 4  # deterministic sampling at 0.5 over 4 sparse calls (seed 3)
    table = rec.summary(print_it=False)
    assert table.row_count == 3
    data = json.loads(rec.to_json(tmp_path / "rec.json"))
    assert data["layers"][0]["density"] == layers[0]["density"]
    png = rec.heatmap(tmp_path / "rec.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sparseinfer.unpatch(model)


def test_rollout_layers_and_errors(tiny):
    model, ids, dense = tiny
    h = sparseinfer.patch(model, "xattention", min_len=0, layers=[1], dense_layers=[0], **XA)
    _logits(model, ids)
    by = {r.layer: (r.method, r.reason) for r in h.stats.records}
    assert by == {0: ("dense", "dense_layers"), 1: ("xattention", ""), 2: ("dense", "rollout")}
    sparseinfer.patch(model, "flexprefill", min_len=0, layers=[], **FP)
    assert torch.equal(_logits(model, ids), dense)
    for bad in ({"layers": [3]}, {"dense_layers": "0"}, {"max_density": 0.0}, {"max_density": 1.5},
                {"shadow": 2.0}, {"shadow": 0.1, "shadow_seed": 0.5}):
        with pytest.raises(ValueError):
            sparseinfer.patch(model, "xattention", **bad)
    sparseinfer.unpatch(model)


def test_shadow_records_divergence_without_changing_outputs(tiny):
    model, ids, dense = tiny
    sparseinfer.patch(model, "xattention", min_len=0, tau=0.3, **XA)
    plain = _logits(model, ids)
    plain_gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    h = sparseinfer.patch(model, "xattention", min_len=0, tau=0.3, shadow=1.0, **XA)
    got = _logits(model, ids)
    assert torch.equal(got, plain)
    att = [r for r in h.stats.shadow if r.kind == "attention"]
    lg = [r for r in h.stats.shadow if r.kind == "logits"]
    assert sorted(r.layer for r in att) == [0, 1, 2] and all(float(r.value) > 1e-3 for r in att)
    want = torch.nn.functional.kl_div(torch.log_softmax(plain, -1), torch.log_softmax(dense, -1), log_target=True,
                                      reduction="none").sum(-1).mean()
    assert len(lg) == 1 and abs(float(lg[0].value) - float(want)) < 1e-5 and float(want) > 1e-4
    # density statistics are not polluted by the dense replay
    assert {r.method for r in h.stats.records} == {"xattention"}
    # generate with a cache: the replay does not write into it
    h.stats.reset()
    assert torch.equal(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0), plain_gen)
    assert sum(r.kind == "logits" for r in h.stats.shadow) == 1  # the pre-fill only, not decode steps
    assert sum(r.kind == "attention" for r in h.stats.shadow) == 3  # the pre-fill ran sparse
    # full mass: the recorded error is float noise; sampling is deterministic given the seed
    h = sparseinfer.patch(model, "xattention", min_len=0, tau=1.0, shadow=1.0, **XA)
    _logits(model, ids)
    assert all(float(r.value) < 1e-4 for r in h.stats.shadow)
    picks = []
    for _ in range(2):
        h = sparseinfer.patch(model, "xattention", min_len=0, tau=0.3, shadow=0.5, shadow_seed=5, **XA)
        for _ in range(3):
            _logits(model, ids)
        picks.append([(r.kind, r.layer) for r in h.stats.shadow])
    assert picks[0] == picks[1] and 0 < len(picks[0]) < 12
    sparseinfer.unpatch(model)


def test_shadow_replay_leaves_the_callers_cache_under_either_keyword(tiny):
    """transformers >= 5.24 passes the Cache as `cache` (`past_key_values` before): the dense replay
    must run on a copy of it under whichever keyword the call used, never append to the caller's."""
    import inspect

    from transformers import DynamicCache

    model, ids, _ = tiny
    names = [n for n in ("past_key_values", "cache") if n in inspect.signature(model.forward).parameters]
    assert names  # this transformers knows at least one of them
    for name in names:
        plain = DynamicCache()
        sparseinfer.patch(model, "xattention", min_len=0, tau=0.3, **XA)
        with torch.no_grad():
            want = model(ids, use_cache=True, **{name: plain}).logits
        h = sparseinfer.patch(model, "xattention", min_len=0, tau=0.3, shadow=1.0, **XA)
        cache = DynamicCache()
        with torch.no_grad():
            got = model(ids, use_cache=True, **{name: cache}).logits
        assert sum(r.kind == "logits" for r in h.stats.shadow) == 1  # the replay ran
        assert cache.get_seq_length() == ids.shape[1], name
        assert torch.equal(got, want)
        assert all(torch.equal(a.keys, b.keys) for a, b in zip(cache.layers, plain.layers))
    sparseinfer.unpatch(model)


def test_adaptive_report_from_cached_cells(tmp_path):
    from sparseinfer.eval import adaptive

    cache = tmp_path / "adaptive"
    cache.mkdir()
    cells = {("dense", "dense"): (0.0, 3.0, 1.0), ("xattention 0.9", "xattention"): (0.02, 3.1, 0.5),
             ("xattention 0.8", "xattention"): (0.05, 3.2, 0.3), ("block_sparse 10%", "block_sparse"): (0.9, 4.0, 0.2)}
    for (label, fam), (kl, nll, dens) in cells.items():
        for w, jitter in enumerate((0.0, 0.1)):
            row = {"method": label, "family": fam, "spec": adaptive.METHODS[label][1], "length": 2048, "window": w,
                   "kl": kl, "nll": nll, "top1_agree": 0.9, "density": dens + jitter * (fam != "dense"),
                   "density_heads": [dens] * 8 + [1.0] * 2, "covered": 0.95, "covered_min": 0.5,
                   "estimate_ms": 3.0, "seconds": 1.0}
            (cache / f"{label.replace(' ', '_')}-2048-w{w}.json").write_text(json.dumps(row))
    md = adaptive.build("tiny", tmp_path, [2048], windows=2, run=False).read_text()
    line = next(x for x in md.splitlines() if x.startswith("| xattention 0.9 |"))
    # perplexity exp(3.1) vs exp(3.0); density mean over windows 55%, sd 5 points; heads p10-p90 50-100%
    assert "| 22.198 | +10.52% | 55.0% | 50-100% | 5.0 |" in line
    assert "block_sparse 20% 2048 w0" in md  # listed as not measured
    assert (tmp_path / "adaptive-kl-density.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "adaptive.json").read_text())["rows"][0]["method"] == "dense"


def test_block128_break_even_density_follows_the_length():
    """Block-sparse on 128-blocks: the measured break-even density (0.66 at 32K ... 0.97 at 512K,
    log-interpolated between the measured lengths, clamped); 64-blocks keep the table; the
    caller's max_density wins; no guard on the CPU reference. A probe's limit is lower by the
    estimation's share of dense time, unless the caller set max_density."""
    from sparseinfer import guards

    q16, q32, q40, q64, q128, q512, q1m = (torch.empty(1, 1, n, 8, device="meta")
                                           for n in (16384, 32768, 40132, 65536, 131072, 524288, 1 << 20))
    op = "block_sparse_attention"
    assert guards.density_limit(op, None, q16, "triton", 128) == pytest.approx(0.66)
    assert guards.density_limit(op, None, q32, "triton", 128) == pytest.approx(0.66)
    t = math.log2(40132 / 32768) / math.log2(49152 / 32768)
    assert guards.density_limit(op, None, q40, "triton", 128) == pytest.approx(0.66 + t * 0.09)
    assert guards.density_limit(op, None, q64, "triton", 128) == pytest.approx(0.78)
    assert guards.density_limit(op, None, q128, "triton", 256) == pytest.approx(0.85)
    assert guards.density_limit(op, None, q512, "triton", 128) == pytest.approx(0.97)
    assert guards.density_limit(op, None, q1m, "triton", 128) == pytest.approx(0.97)
    assert guards.density_limit(op, None, q128, "triton", 64) == guards.BREAK_EVEN_DENSITY[op]
    assert guards.density_limit(op, None, q128, "triton") == guards.BREAK_EVEN_DENSITY[op]
    assert guards.density_limit(op, 0.3, q128, "triton", 128) == 0.3
    assert guards.density_limit(op, None, q128, "reference", 128) == 1.0
    # the probe's decision: a cost model in units of dense attention (estimation + per head
    # min(1, d / limit)), or every head over the caller's max_density
    lim = guards.density_limit(op, None, q128, "triton", 128)
    d = torch.tensor([[0.9, 0.9, 0.9, 0.5]])  # one sparse-worthy head cannot pay the estimation
    assert guards.probe_says_dense(d, lim, False, 0.12)  # 0.12 + (3 + 0.5 / 0.85) / 4 = 1.02
    d = torch.tensor([[0.6, 0.6, 0.6, 0.6]])  # 0.12 + 0.6 / 0.85 = 0.83
    assert not guards.probe_says_dense(d, lim, False, 0.12)
    assert guards.probe_says_dense(d, lim, False, 0.27)  # a costlier estimation
    assert not guards.probe_says_dense(torch.tensor([[0.6, 0.6], [0.9, 0.2]]), 0.7, True, 0.12)
    assert guards.probe_says_dense(torch.tensor([[0.6, 0.8], [0.9, 0.2]]), 0.7, True, 0.12)
    # the patterns' estimation shares: xattention's constant (N^2 / stride, like dense), FlexPrefill's
    # falling with N (its estimation grows about linearly)
    from sparseinfer.patterns import FlexPrefill

    assert XAttention(stride=8).est_share(131072) == 0.12 and XAttention(stride=16).est_share(524288) == 0.08
    fp = FlexPrefill()
    assert fp.est_share(32768) == pytest.approx(0.15) and fp.est_share(65536) > fp.est_share(131072) > 0.06


def test_every_sparse_method_has_a_measured_break_even_length(monkeypatch):
    """Each pre-filling method maps to a measured break-even length (`kernels.attention.BREAK_EVEN`);
    the adaptive methods have their own (64K: estimation, probe and guard costs included), not
    block_sparse's 0; nothing on a forced backend or off CUDA."""
    from types import SimpleNamespace

    from sparseinfer import integration, ops
    from sparseinfer.kernels.attention import BREAK_EVEN

    monkeypatch.setattr(ops, "_use_triton", lambda q, backend: True)
    cuda_q = SimpleNamespace(is_cuda=True)

    def length(name, backend="auto", q=cuda_q):
        return integration._break_even(SimpleNamespace(backend=backend, pattern=SimpleNamespace(name=name)), q)

    for name in integration.METHODS:
        if name != "dense":
            assert integration._BREAK_EVEN_KEY[name] in BREAK_EVEN, name
    assert (length("flexprefill"), length("adaptive"), length("xattention")) == (64 * 1024,) * 3
    assert length("block_sparse") == 0 and length("vertical_slash") == 40 * 1024
    assert length("xattention", backend="triton") == 0
    assert length("xattention", q=SimpleNamespace(is_cuda=False)) == 0
