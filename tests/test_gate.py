"""Learned block gates (sparseinfer.gate), the adaptive pattern and gate training.

Logic on a tiny random-weight Llama (2 layers, 4 query / 2 KV heads, head_dim 16, block 16);
one check on the real SmolLM2-135M with its shipped gates.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

import sparseinfer
from masks import block_sparse_mask, masked_attention_f64, rel_err
from sparseinfer.gate import GateError, Gates, pool_blocks, unrotate
from sparseinfer.gate_training import block_targets, capture, train_layer
from sparseinfer.patterns.adaptive import keep_blocks, keep_to_index, select_index

BS = 16


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peakier attention than the default init, so block choices matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def _gates(model, **kw):
    torch.manual_seed(1)
    return Gates.new(model.config, block_size=BS, width=8, **kw).attach(model)


def _qk(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    q = torch.randn(1, cfg.num_attention_heads, n, d, generator=g)
    k = torch.randn(1, cfg.num_key_value_heads, n, d, generator=g)
    return q, k


def test_unrotate_inverts_the_models_rope(tiny):
    q, _ = _qk(tiny, 50)
    cos, sin = tiny.model.rotary_emb(q, torch.arange(50)[None])
    rotated = q * cos[:, None] + torch.cat([-q[..., 8:], q[..., :8]], -1) * sin[:, None]
    assert torch.allclose(unrotate(rotated, cos, sin), q, atol=1e-5)


def test_pool_blocks_against_loops():
    x = torch.randn(1, 2, 37, 4)
    got = pool_blocks(x, BS, ("avg", "max", "min"))
    assert got.shape == (1, 2, 3, 12)
    for b in range(3):
        blk = x[0, :, b * BS:(b + 1) * BS]
        want = torch.cat([blk.mean(1), blk.amax(1), blk.amin(1)], -1)
        assert torch.allclose(got[0, :, b], want, atol=1e-6)


def test_gate_probs_shape_rows_and_block_causality(tiny):
    gates = _gates(tiny)
    n = 100  # 7 blocks, the last one partial
    q, k = _qk(tiny, n)
    p = gates.probs(1, q, k)
    nb = math.ceil(n / BS)
    assert p.shape == (1, 4, nb, nb)
    assert torch.allclose(p.sum(-1), torch.ones(1, 4, nb), atol=1e-5)
    tri = torch.ones(nb, nb, dtype=torch.bool).tril()
    assert (p[..., ~tri] == 0).all() and (p[..., tri] > 0).all()
    q2, k2 = q.clone(), k.clone()  # change everything from block 3 on: rows 0..2 must not move
    q2[:, :, 3 * BS:] += 5 * torch.randn_like(q2[:, :, 3 * BS:])
    k2[:, :, 3 * BS:] += 5 * torch.randn_like(k2[:, :, 3 * BS:])
    p2 = gates.probs(1, q2, k2)
    assert torch.allclose(p2[:, :, :3], p[:, :, :3], atol=1e-6)
    assert not torch.allclose(p2[:, :, 3:], p[:, :, 3:], atol=1e-3)
    # GQA: query heads 0, 1 share KV head 0; changing KV head 1 leaves them alone
    k3 = k.clone()
    k3[:, 1] += 3
    p3 = gates.probs(1, q, k3)
    assert torch.allclose(p3[:, :2], p[:, :2], atol=1e-6) and not torch.allclose(p3[:, 2:], p[:, 2:], atol=1e-3)


def _brute_keep(p: torch.Tensor, threshold=None, density=None) -> list:
    """Python loops: per (b, h, row) the set of kept blocks."""
    out = []
    for b in range(p.shape[0]):
        for h in range(p.shape[1]):
            for i in range(p.shape[2]):
                row = [float(p[b, h, i, j]) for j in range(i + 1)]
                if threshold is not None:
                    s = {j for j, v in enumerate(row) if v >= threshold}
                else:
                    s = set(sorted(range(i + 1), key=lambda j: -row[j])[:math.ceil(density * (i + 1))])
                out.append(s | {0, i})
    return out


@pytest.mark.parametrize("mode", [{"threshold": 0.08}, {"threshold": 0.0}, {"density": 0.25}, {"density": 0.6}])
def test_keep_blocks_and_index_equal_brute_force(mode):
    torch.manual_seed(3)
    nb = 12
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    p = torch.softmax(torch.randn(2, 3, nb, nb).masked_fill(~causal, float("-inf")) * 2, -1)
    keep = keep_blocks(p, **mode)
    want = _brute_keep(p, **mode)
    got = [{int(j) for j in torch.nonzero(keep[b, h, i]).flatten()} for b in range(2) for h in range(3) for i in range(nb)]
    assert got == want
    idx = keep_to_index(keep)
    from_idx = [{int(j) for j in idx[b, h, i] if j >= 0} for b in range(2) for h in range(3) for i in range(nb)]
    assert from_idx == want
    if mode.get("threshold") == 0.0:
        assert keep.equal(causal.expand_as(keep))


@pytest.mark.parametrize("mode", [{"threshold": 0.08}, {"threshold": 0.0}, {"density": 0.25}, {"density": 0.6},
                                  {"density": 1.0}])
def test_fused_selection_equals_brute_force_with_ties(mode, monkeypatch):
    """select_index's Triton path (threshold compare, or top-k by bisection over the float bits
    without a sort; interpreter here) gives exactly keep_to_index(keep_blocks(...)) and the
    brute-force sets: probabilities with many ties (kept in index order), rows of one block;
    one and two launches."""
    from sparseinfer.kernels import xattn

    gen = torch.Generator().manual_seed(5)
    nb = 13
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    p = torch.softmax(torch.randint(0, 3, (2, 3, nb, nb), generator=gen).float().masked_fill(~causal, float("-inf")), -1)
    want = keep_to_index(keep_blocks(p, **mode))
    got = select_index(p, **mode, fused=True)
    assert got.shape == want.shape and torch.equal(got, want)
    brute = _brute_keep(p, **mode)
    sets = [{int(j) for j in got[b, h, i] if j >= 0} for b in range(2) for h in range(3) for i in range(nb)]
    assert sets == brute
    monkeypatch.setattr(xattn, "ONE_PASS_BYTES", 0)  # a counting launch sizes the output first
    assert torch.equal(select_index(p, **mode, fused=True), want)


@pytest.mark.parametrize("threshold,sync", [(0.05, False), (0.0, False), (0.02, False), (1.0, False), (0.05, True),
                                            (0.02, True)])
def test_gate_select_kernel_equals_float64_selection(threshold, sync, monkeypatch):
    """kernels.gate.gate_select (scores, softmax and threshold selection of a row in one program;
    interpreter here) keeps the blocks of the float64 probabilities (a block whose probability
    is within 1e-6 of the threshold may go either way), plus sink and diagonal;
    rows ascending, -1 after them; as wide as the threshold's bound min(nb, 1.01 / t + 2), or
    (sync: the bound's index over SYNC_FREE_BYTES) as the widest row; GQA (4 query / 2 KV heads),
    a width padded inside the kernel (W = 6), rows longer than one key chunk and a last row group
    past nb (nb = 70), scratch memory that starts dirty."""
    from sparseinfer.kernels import gate
    from sparseinfer.kernels.gate import gate_select

    if sync:
        monkeypatch.setattr(gate, "SYNC_FREE_BYTES", 0)
    gen = torch.Generator().manual_seed(11)
    b, hq, hkv, nb, w = 2, 4, 2, 70, 6
    gq, gk = torch.randn(b, hq, nb, w, generator=gen) * 2, torch.randn(b, hkv, nb, w, generator=gen) * 2
    scale = w ** -0.5
    real_empty = torch.empty  # scratch and output start dirty: nothing may rely on fresh memory
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(0x55555555))
    idx, counts = gate_select(gq, gk, threshold, scale)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert torch.equal(counts, (idx >= 0).sum(-1, dtype=torch.int32))
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    logits = torch.einsum("bhnw,bhmw->bhnm", gq.double(), gk.double().repeat_interleave(hq // hkv, 1)) * scale
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    want = _brute_keep(p, threshold=threshold)
    assert idx.dtype == torch.int32 and idx.shape[:3] == (b, hq, nb)
    widest = 0
    for r, (row, s) in enumerate(zip(idx.reshape(-1, idx.shape[-1]).tolist(), want)):
        i, cnt = r % nb, sum(v >= 0 for v in row)
        assert row[:cnt] == sorted(set(row[:cnt])) and all(v == -1 for v in row[cnt:])
        near = {j for j in range(i + 1) if abs(float(p.reshape(-1, nb, nb)[r // nb, i, j]) - threshold) <= 1e-6}
        assert set(row[:cnt]) ^ s <= near, (r, set(row[:cnt]) ^ s)
        widest = max(widest, cnt)
    bound = nb if threshold == 0 else min(nb, math.floor(1.01 / threshold) + 2)
    assert idx.shape[-1] == (widest if sync else bound) and widest <= bound
    with pytest.raises(ValueError, match="gate_select"):
        gate_select(gq, gk[:, :, :5], threshold, scale)


def test_adaptive_fused_selection_and_sorted_index_build(tiny):
    """The adaptive pattern's fused threshold path (gate_select) keeps the same blocks as its
    probabilities path on the tiny model; its rows promise `sorted_blocks`, and the index built
    without the sort equals the sorted build; a broken promise is refused (CPU check)."""
    from sparseinfer import index as sidx

    gates = _gates(tiny)
    q, k = _qk(tiny, 150, seed=8)
    v = torch.randn_like(k)
    layer = sparseinfer.patterns.adaptive.AdaptiveLayer(gates, 1, threshold=0.03, dense_tail=20)
    (fused,) = layer.select(q, k, 0.25, fused=True)
    (plain,) = layer.select(q, k, 0.25, fused=False)
    assert fused.kwargs["sorted_blocks"] and plain.kwargs["sorted_blocks"]
    a, b = fused.kwargs["block_idx"], plain.kwargs["block_idx"]
    assert a.shape == b.shape and torch.equal(a.long(), b.long())
    # both leave the dense tail's rows (the blocks of the last 20 positions) to dense_from
    first = fused.kwargs["dense_from"]
    assert first == plain.kwargs["dense_from"] == (150 - 20) // BS
    # the density from the kernel's counts and from the sorted rows vs the block table and the mask
    from sparseinfer.patterns.block_sparse import block_sparse_density

    mask = block_sparse_mask(150, b, BS)
    mask[0, :, first * BS:] = torch.ones(150, 150, dtype=torch.bool).tril()[first * BS:]
    want = (mask.sum((-1, -2)).double() / (150 * 151 / 2)).float()
    assert torch.allclose(fused.density, want, rtol=1e-6, atol=0) and torch.allclose(plain.density, want, rtol=1e-6)
    nodense = block_sparse_mask(150, b, BS)  # the table path and the sorted counting, without dense rows
    want = (nodense.sum((-1, -2)).double() / (150 * 151 / 2)).float()
    for srt in (False, True):
        assert torch.allclose(block_sparse_density(150, b, BS, sorted_blocks=srt), want, rtol=1e-6, atol=0)
    for bm, bn in ((16, 16), (8, 16), (16, 8)):  # the no-sort build, its short path when blocks are tiles
        one, two = (sidx.from_block_sparse(a, BS, 150, bm, bn, sorted_blocks=srt, dense_from=first)
                    for srt in (True, False))
        for f in ("tile_count", "ranges", "range_count"):
            assert torch.equal(getattr(one, f), getattr(two, f)), f
        for h in range(a.shape[1]):  # the cells each index visits (tiles past tile_count are never read)
            assert torch.equal(one.cells(0, h), two.cells(0, h))
    for backend in ("triton", "reference"):
        out = sparseinfer.ops.block_sparse_attention(q, k, v, **fused.kwargs, scale=0.25, backend=backend)
        assert rel_err(out, masked_attention_f64(q, k, v, mask, 0.25)) < 1e-5
    bad = a.clone()
    bad[0, 1, 5, :2] = torch.tensor([3, 1], dtype=bad.dtype)
    with pytest.raises(ValueError, match=r"sorted_blocks=True expects each row ascending.*\(0, 1, 5\) has 3, 1"):
        sparseinfer.ops.block_sparse_attention(q, k, v, bad, BS, scale=0.25, sorted_blocks=True)


def test_keep_blocks_needs_one_mode():
    with pytest.raises(ValueError, match="exactly one"):
        keep_blocks(torch.ones(1, 1, 2, 2), threshold=0.1, density=0.1)


@pytest.mark.parametrize("n,tail", [(90, 1), (90, 26), (90, 27), (96, 64), (40, 500)])
def test_dense_tail_rows_keep_every_causal_block(tiny, n, tail):
    """The query blocks holding the last `tail` positions keep all their causal blocks (given to the
    op as dense_from, not listed); the other rows are the plain density-mode sets (brute force), the
    density counts the dense rows, and the op equals the float64 mask."""
    gates = _gates(tiny)
    q, k = _qk(tiny, n, seed=7)
    v = torch.randn_like(k)
    layer = sparseinfer.patterns.adaptive.AdaptiveLayer(gates, 0, None, 0.2, dense_tail=tail)
    (sel,) = layer.select(q, k, 0.25)
    idx = sel.kwargs["block_idx"]
    nb = math.ceil(n / BS)
    first_dense = max(n - tail, 0) // BS  # the block of position n - tail
    assert sel.kwargs["dense_from"] == first_dense
    plain = _brute_keep(gates.probs(0, q, k), density=0.2)
    for h in range(idx.shape[1]):
        for i in range(first_dense):
            assert {int(j) for j in idx[0, h, i] if j >= 0} == plain[h * nb + i]
    out = sparseinfer.ops.block_sparse_attention(q, k, v, **sel.kwargs, scale=0.25, backend="reference")
    mask = block_sparse_mask(n, idx, BS)
    mask[0, :, first_dense * BS:] = torch.ones(n, n, dtype=torch.bool).tril()[first_dense * BS:]
    assert torch.allclose(sel.density, (mask.sum((-1, -2)).double() / (n * (n + 1) / 2)).float(), rtol=1e-6, atol=0)
    assert mask[0, :, max(n - tail, 0):].equal(torch.ones(n, n, dtype=torch.bool).tril()[max(n - tail, 0):].expand_as(mask[0, :, max(n - tail, 0):]))
    assert rel_err(out, masked_attention_f64(q, k, v, mask, 0.25)) < 1e-5


def test_dense_tail_rejects_bad_values(tiny):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="dense_tail expected a token count"):
            sparseinfer.patch(tiny, "adaptive", gates=_gates(tiny), density=0.3, dense_tail=bad)


def _reference_attention(gates, threshold, tail):
    """An attention function: float64 softmax under the block mask built from brute-force keep
    sets (query blocks holding the last `tail` positions: every causal block)."""
    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        n = query.shape[2]
        p = gates.probs(module.layer_idx, query, key)
        sets = _brute_keep(p, threshold=threshold)
        hq, nb = query.shape[1], p.shape[-1]
        mask = torch.zeros(1, hq, n, n, dtype=torch.bool)
        for h in range(hq):
            for i in range(nb):
                for j in (range(i + 1) if i >= (n - tail) // BS else sets[h * nb + i]):
                    mask[0, h, i * BS:(i + 1) * BS, j * BS:(j + 1) * BS] = True
        mask &= torch.ones(n, n, dtype=torch.bool).tril()
        out = masked_attention_f64(query, key, value, mask, scaling)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    return fn


def test_patched_model_equals_float64_reference_under_the_gate_mask(tiny):
    gates = _gates(tiny)
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(5))
    threshold = 0.12
    # the patch's default dense_tail (64): the last 64 positions' query blocks keep every block
    AttentionInterface.register("test_gate_ref", _reference_attention(gates, threshold, 64))
    prev = tiny.config._attn_implementation
    tiny.set_attn_implementation("test_gate_ref")
    try:
        with torch.no_grad():
            ref = tiny(ids).logits
    finally:
        tiny.set_attn_implementation(prev)
    handle = sparseinfer.patch(tiny, "adaptive", gates=gates, threshold=threshold, min_len=0)
    try:
        with torch.no_grad():
            out = tiny(ids).logits
    finally:
        sparseinfer.unpatch(tiny)
    dens = handle.stats.density()
    assert 0.3 < dens < 0.95  # the mask is really sparse, and the check is not vacuous
    assert rel_err(out, ref) < 1e-5
    with torch.no_grad():
        dense = tiny(ids).logits
    assert rel_err(out, dense) > 1e-3


def test_block_sparse_op_under_gate_indices_matches_masks(tiny):
    gates = _gates(tiny)
    q, k = _qk(tiny, 90, seed=2)
    v = torch.randn_like(k)
    layer = sparseinfer.patterns.adaptive.AdaptiveLayer(gates, 0, None, 0.3)
    (sel,) = layer.select(q, k, 0.25)
    out = sparseinfer.ops.block_sparse_attention(q, k, v, **sel.kwargs, scale=0.25, backend="reference")
    mask = block_sparse_mask(90, sel.kwargs["block_idx"], BS)
    assert rel_err(out, masked_attention_f64(q, k, v, mask, 0.25)) < 1e-5
    assert torch.allclose(sel.density, mask[0].sum((-1, -2)).double().div(90 * 91 / 2).float(), atol=1e-6)


def test_block_targets_against_full_softmax():
    torch.manual_seed(4)
    n = 70
    q, k = torch.randn(1, 2, n, 8), torch.randn(1, 1, n, 8)
    tmax, tsum = block_targets(q, k, 0.5, BS)
    kk = k.repeat_interleave(2, 1)
    p = torch.softmax((q @ kk.transpose(-1, -2) * 0.5).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -1e30), -1)
    nb = math.ceil(n / BS)
    for i in range(nb):
        for j in range(nb):
            tile = p[0, :, i * BS:(i + 1) * BS, j * BS:(j + 1) * BS]
            assert torch.allclose(tsum[0, :, i, j], tile.sum((1, 2)) / tile.shape[1], atol=1e-6)
        rowmax = torch.stack([p[0, :, i * BS:(i + 1) * BS, j * BS:(j + 1) * BS].amax((1, 2)) for j in range(nb)], -1)
        assert torch.allclose(tmax[0, :, i], rowmax / rowmax.sum(-1, keepdim=True), atol=1e-6)


def test_training_reduces_kl(tiny):
    gates = _gates(tiny)
    ids = torch.randint(0, 128, (2, 256), generator=torch.Generator().manual_seed(6)).tolist()
    caches = capture(tiny, gates, ids, row_stride=2, progress=False)
    assert caches[0].target[0].shape == (1, 4, 8, 16) and caches[0].rows[1].tolist() == list(range(1, 16, 2))
    losses = train_layer(gates.layers[1], caches[1], 60, 1e-2)
    assert losses[-1] < 0.5 * losses[0]


def test_save_load_roundtrip_and_wrong_files(tiny, tmp_path):
    gates = _gates(tiny)
    path = gates.save(tmp_path / "g.safetensors", dtype=torch.float32)
    back = Gates.load(path).attach(tiny)
    q, k = _qk(tiny, 64)
    assert torch.equal(back.probs(0, q, k), gates.probs(0, q, k))
    other = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        sparseinfer.patch(LlamaForCausalLM(other), "adaptive", gates=str(path))
    with pytest.raises(ValueError, match="block_size"):
        sparseinfer.patch(tiny, "adaptive", gates=str(path), block_size=64)
    with pytest.raises(ValueError, match="not both"):
        sparseinfer.patch(tiny, "adaptive", gates=str(path), threshold=0.1, density=0.1)
    # tensors that do not match the metadata's shapes
    from safetensors.torch import save_file
    import json
    meta = dict(gates.meta, width=4)
    bad = {n: p.detach() for n, p in gates.named_parameters()}
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata={"sparseinfer": json.dumps(meta)})
    with pytest.raises(GateError, match="expected shape"):
        Gates.load(tmp_path / "bad.safetensors")
    save_file(bad, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(ValueError, match="schema_version"):
        Gates.load(tmp_path / "nometa.safetensors")
    with pytest.raises(ValueError, match="no shipped gates"):
        sparseinfer.patch(tiny, "adaptive")


def test_real_model_shipped_gates(smol, essay_ids):
    """SmolLM2 with the gates shipped in the package (found by fingerprint): the kept density
    follows the top-k budget (plus sink and diagonal) and the output stays close to dense."""
    model, _ = smol
    n = 768
    ids = torch.tensor([essay_ids[:n]])
    with torch.no_grad():
        dense = F.log_softmax(model(ids).logits.float(), -1)
    handle = sparseinfer.patch(model, "adaptive", density=0.2)
    try:
        with torch.no_grad():
            out = F.log_softmax(model(ids).logits.float(), -1)
    finally:
        sparseinfer.unpatch(model)
    kl = float(F.kl_div(out, dense, log_target=True, reduction="none").sum(-1).mean())
    nb = n // 64
    rows = [min(r + 1, math.ceil(0.2 * (r + 1)) + (2 if r > 0 else 1)) for r in range(nb)]  # upper bound per row
    assert len(handle.stats.records) == model.config.num_hidden_layers
    assert 0.2 < handle.stats.density() <= sum(64 * 64 * c for c in rows) / (n * (n + 1) / 2) + 1e-6
    assert 0 < kl < 0.3


@pytest.mark.parametrize("argv,want", [([], torch.float32), (["--device", "cuda"], torch.bfloat16),
                                       (["--device", "cuda:1", "--dtype", "float16"], torch.float16),
                                       (["--dtype", "bfloat16"], torch.bfloat16)])
def test_train_gate_cli_loads_the_model_in_the_asked_dtype(monkeypatch, argv, want):
    """`sparseinfer train-gate --dtype auto` (default): bfloat16 on CUDA (an 8B model's weights),
    float32 on the CPU; an explicit --dtype wins."""
    from sparseinfer import cli, models

    class Stop(Exception):
        pass

    seen = {}

    def fake_load(name, dtype, device):
        seen.update(name=name, dtype=dtype, device=device)
        raise Stop

    monkeypatch.setattr(models, "load_model", fake_load)
    with pytest.raises(Stop):
        cli.main(["train-gate", "--model", "some/model", "--out", "g.safetensors"] + argv)
    assert seen["dtype"] == want and seen["name"] == "some/model"
    with pytest.raises(SystemExit):
        cli.main(["train-gate", "--out", "g.safetensors", "--dtype", "int8"])


def test_cos_sin_kept_per_length_and_asked_again_when_the_rotary_changes(tiny):
    """Gates.cos_sin: a pre-fill's layers share one rotary call per length; another length, or
    the rotary's inv_freq changed in place (dynamic RoPE), asks the module again; the values are
    the module's own."""
    gates = _gates(tiny)
    rot = tiny.model.rotary_emb
    calls = []
    handle = rot.register_forward_hook(lambda m, a, out: calls.append(a[1].shape[-1]))
    inv0 = rot.inv_freq.clone()
    try:
        c1, s1 = gates.cos_sin(40, "cpu")
        c2, _ = gates.cos_sin(40, "cpu")
        assert calls == [40] and c2 is c1
        want_c, want_s = rot(torch.zeros(1), torch.arange(40)[None])
        assert torch.equal(c1, want_c) and torch.equal(s1, want_s)
        gates.cos_sin(30, "cpu")
        assert calls[-1] == 30
        calls.clear()
        rot.inv_freq.mul_(0.5)  # in place: same storage, new version
        c3, _ = gates.cos_sin(30, "cpu")
        assert calls == [30] and torch.equal(c3, rot(torch.zeros(1), torch.arange(30)[None])[0])
    finally:
        handle.remove()
        rot.inv_freq.copy_(inv0)
