"""XAttention and FlexPrefill patterns against brute-force float64 re-implementations of their
rules (loops over blocks, groups and queries; nothing shared with the package)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from masks import block_sparse_mask, masked_attention_f64, rel_err, vertical_slash_mask
from sparseinfer.integration import run_selections
from sparseinfer.patterns import FlexPrefill, XAttention
from sparseinfer.patterns import flexprefill as fp
from sparseinfer.patterns import xattention as xa


def _qkv(n, hq=4, hkv=2, d=8, seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64)
    k[:, :, :3] += 2.0 * q[:, :1, -1:].mean(1, keepdim=True)  # a few sink-like keys
    return q, k, v


def _prefix(items: list[tuple[float, int]], tau: float) -> set[int]:
    """The smallest prefix of (mass, id) sorted by mass desc, id asc, reaching tau."""
    kept, cum = set(), 0.0
    for m, i in sorted(items, key=lambda t: (-t[0], t[1])):
        if cum >= tau or (m <= 0 and kept):
            break
        kept.add(i)
        cum += m
    return kept


def _softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


# ---------------------------------------------------------------- XAttention
def brute_xattention(q, k, tau, stride, bs, scale):
    """-> (kept sets [b][h][row], mass [b, h, nb, nb])."""
    q, k = q.numpy(), k.numpy()
    b, hq, n, d = q.shape
    grp = hq // k.shape[1]
    nb = math.ceil(n / bs)
    ng = nb * bs // stride
    gv = math.ceil(n / stride)
    qp = np.zeros((b, hq, nb * bs, d)); qp[:, :, :n] = q
    kp = np.zeros((b, k.shape[1], nb * bs, d)); kp[:, :, :n] = k
    mass = np.zeros((b, hq, nb, nb))
    kept = []
    for bi in range(b):
        kb = []
        for h in range(hq):
            for g in range(gv):
                scores = []
                for j in range(g + 1):
                    s = sum(qp[bi, h, g * stride + stride - 1 - t] @ kp[bi, h // grp, j * stride + t] for t in range(stride))
                    scores.append(s * scale / stride)
                p = _softmax(scores)
                for j in range(g + 1):
                    mass[bi, h, g * stride // bs, j * stride // bs] += p[j]
            rows = []
            for r in range(nb):
                mass[bi, h, r] /= mass[bi, h, r].sum()
                t = tau[h] if isinstance(tau, list) else tau
                rows.append(_prefix([(mass[bi, h, r, c], c) for c in range(r + 1)], t) | {0, r})
            kb.append(rows)
        kept.append(kb)
    return kept, mass


def _sets(idx):
    return [[[{int(x) for x in row if x >= 0} for row in head] for head in bat] for bat in idx.tolist()]


@pytest.mark.parametrize("n,stride,bs,tau", [(200, 4, 32, 0.9), (128, 8, 32, [0.5, 0.8, 0.95, 1.0])])
def test_xattention_matches_brute_force(n, stride, bs, tau):
    q, k, v = _qkv(n)
    scale = 8 ** -0.5
    idx, mass = xa.estimate(q, k, tau, stride, bs, scale)
    kept, ref_mass = brute_xattention(q, k, tau, stride, bs, scale)
    np.testing.assert_allclose(mass.numpy(), ref_mass, atol=1e-10)
    assert _sets(idx) == kept
    # cumulative-mass property and the forced blocks, row by row
    taus = tau if isinstance(tau, list) else [tau] * 4
    for h, head in enumerate(kept[0]):
        for r, row in enumerate(head):
            assert {0, r} <= row and max(row) <= r
            assert ref_mass[0, h, r, sorted(row)].sum() >= taus[h] - 1e-12
    # the output is dense attention under the induced mask
    sel = XAttention(tau=tau, stride=stride, block_size=bs).select(q, k, scale)
    out = run_selections(sel, q, k, v, scale, backend="reference")
    ref = masked_attention_f64(q, k, v, block_sparse_mask(n, idx, bs), scale)
    assert rel_err(out, ref) < 1e-10
    assert torch.isfinite(out).all()


def test_xattention_density_adapts_to_tau_and_options_validated():
    q, k, _ = _qkv(1024)
    d = [float(XAttention(tau=t, stride=4, block_size=32).select(q, k, 0.35)[0].density.mean()) for t in (0.3, 0.9, 1.0)]
    assert d[0] < d[1] < d[2]
    for bad in ({"tau": 0.0}, {"tau": 1.5}, {"tau": "x"}, {"stride": 0}, {"block_size": 30, "stride": 8}):
        with pytest.raises(ValueError):
            XAttention(**bad)
    with pytest.raises(ValueError, match="per-head"):
        XAttention(tau=[0.9, 0.9]).select(q, k, 0.35)


# ---------------------------------------------------------------- FlexPrefill
def brute_flexprefill(q, k, gamma, tau, bs, scale):
    q, k = q.numpy(), k.numpy()
    b, hq, n, d = q.shape
    grp = hq // k.shape[1]
    nb = math.ceil(n / bs)
    L = min(bs, n)
    out = []
    for h in range(hq):
        kh = k[0, h // grp]
        P = np.zeros((L, n))
        for t in range(L):
            i = n - L + t
            P[t, : i + 1] = _softmax([q[0, h, i] @ kh[j] * scale for j in range(i + 1)])
        a_true = np.array([P[:, c * bs:(c + 1) * bs].sum() / L for c in range(nb)])
        pq = np.stack([q[0, h, r * bs:(r + 1) * bs].mean(0) for r in range(nb)])
        pk = np.stack([kh[r * bs:(r + 1) * bs].mean(0) for r in range(nb)])
        a_est = _softmax([pq[-1] @ pk[c] * scale for c in range(nb)])
        m = (a_true + a_est) / 2
        js = math.sqrt(max(0.0, 0.5 * sum(x * math.log(x / y) for x, y in zip(a_true, m) if x > 0)
                           + 0.5 * sum(x * math.log(x / y) for x, y in zip(a_est, m) if x > 0)))
        items = []
        for r in range(nb):
            pr = _softmax([pq[r] @ pk[c] * scale for c in range(r + 1)]) / nb
            items += [(pr[c], r * nb + c) for c in range(r + 1)]
        flat = _prefix(items, gamma)
        blocks = [{c for c in range(r + 1) if r * nb + c in flat} | {0, r} for r in range(nb)]
        vm = [(P[:, j].sum() / L, j) for j in range(n)]
        sm = [(sum(P[t, n - L + t - o] for t in range(L) if n - L + t - o >= 0) / L, o) for o in range(n)]
        vert = _prefix(vm, gamma) | set(range(min(bs, n)))
        slash = _prefix(sm, gamma) | set(range(min(bs, n)))
        out.append(dict(js=js, qa=js < tau, blocks=blocks, vert=vert, slash=slash))
    return out


@pytest.mark.parametrize("n,bs,gamma,tau", [(150, 16, 0.9, 0.2), (150, 16, 0.95, 0.0), (96, 32, 0.8, 1.0)])
def test_flexprefill_matches_brute_force(n, bs, gamma, tau):
    q, k, v = _qkv(n, seed=1)
    scale = 8 ** -0.5
    est = fp.estimate(q, k, gamma, tau, bs, scale)
    ref = brute_flexprefill(q, k, gamma, tau, bs, scale)
    for h, r in enumerate(ref):
        assert abs(float(est.js[0, h]) - r["js"]) < 1e-9
        assert bool(est.query_aware[0, h]) == r["qa"]
        assert [{int(c) for c in row.nonzero().flatten()} for row in est.block_table[0, h]] == r["blocks"]
        assert {int(j) for j in est.vertical[0, h].nonzero()} == r["vert"]
        assert {int(o) for o in est.slash[0, h].nonzero()} == r["slash"]
        # cumulative mass: the kept verticals / slashes / blocks hold >= gamma of the estimated mass
        assert float(est.vertical_mass[0, h][est.vertical[0, h]].sum()) >= gamma - 1e-12
        assert float(est.slash_mass[0, h][est.slash[0, h]].sum()) >= gamma - 1e-12
        assert float(est.block_mass[0, h][est.block_table[0, h]].sum()) >= gamma - 1e-12
    parts = FlexPrefill(gamma=gamma, tau=tau, block_size=bs).select(q, k, scale)
    qa = torch.tensor([r["qa"] for r in ref])
    assert torch.equal(parts[0].heads, qa) and torch.equal(parts[1].heads, ~qa)
    mask = torch.where(qa[None, :, None, None], block_sparse_mask(n, parts[0].kwargs["block_idx"], bs),
                       vertical_slash_mask(n, parts[1].kwargs["vertical_idx"], parts[1].kwargs["slash_idx"]))
    for h, r in enumerate(ref):  # the index tensors the ops get hold exactly the chosen sets
        if r["qa"]:
            assert _sets(parts[0].kwargs["block_idx"])[0][h] == r["blocks"]
        else:
            assert {int(x) for x in parts[1].kwargs["vertical_idx"][0, h] if x >= 0} == r["vert"]
            assert {int(x) for x in parts[1].kwargs["slash_idx"][0, h] if x >= 0} == r["slash"]
    out = run_selections(parts, q, k, v, scale, backend="reference")
    assert rel_err(out, masked_attention_f64(q, k, v, mask, scale)) < 1e-10
    if tau == 0.0:
        assert not qa.any()
    if tau == 1.0:
        assert qa.all()


def test_flexprefill_options_validated():
    for bad in ({"gamma": 0.0}, {"gamma": 2.0}, {"tau": -1.0}, {"block_size": 0}):
        with pytest.raises(ValueError):
            FlexPrefill(**bad)


def test_xattention_chunking_does_not_change_the_mass(monkeypatch):
    q, k, _ = _qkv(333)
    whole = xa.antidiagonal_mass(q, k, 4, 16, 0.3)
    monkeypatch.setattr(xa, "_CHUNK_ELEMS", 4 * 84 * 8)  # 8 query groups (2 blocks) per chunk
    assert torch.allclose(xa.antidiagonal_mass(q, k, 4, 16, 0.3), whole, atol=1e-12)


@pytest.mark.parametrize("kernel", ["scores", "lastq"])
def test_xattention_fused_scores_path_matches_the_torch_path(monkeypatch, kernel):
    """The GPU paths (here under the Triton interpreter): scores by one matmul per head, then
    kernels.xattn's one-pass block mass; or float32 scores, then kernels.lastq's logsumexp and
    block sums) give the torch path's block mass, whole and chunked (also with bf16 scores, to
    their rounding), and the probe's densities."""
    monkeypatch.setattr(xa, "MASS_KERNEL", kernel)
    q, k, _ = _qkv(333)
    q, k = q.float(), k.float()
    want = xa.antidiagonal_mass(q, k, 4, 16, 0.3, fused=False)
    got = xa.antidiagonal_mass(q, k, 4, 16, 0.3, fused=True)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    if kernel != "lastq":  # bf16 inputs: bf16 scores (relative rounding 2^-9 of each logit)
        qb, kb = q.bfloat16(), k.bfloat16()
        want_b = xa.antidiagonal_mass(qb.double(), kb.double(), 4, 16, 0.3, fused=False)
        got_b = xa.antidiagonal_mass(qb, kb, 4, 16, 0.3, fused=True)
        assert (got_b.double() - want_b).abs().max() < 2e-3
    monkeypatch.setattr(xa, "_CHUNK_ELEMS", 4 * 84 * 8)
    assert torch.allclose(xa.antidiagonal_mass(q, k, 4, 16, 0.3, fused=True), want, atol=1e-5)
    p_want = xa.probe_density(q, k, 0.9, 4, 16, 0.3, samples=5, fused=False)
    p_got = xa.probe_density(q, k, 0.9, 4, 16, 0.3, samples=5, fused=True)
    assert torch.allclose(p_got, p_want, atol=1e-6)
    assert xa._use_fused(q, None) is False  # CPU float32: the torch path unless asked


@pytest.mark.parametrize("n,stride,bs,tau", [(200, 4, 32, 0.9), (128, 8, 32, [0.5, 0.8, 0.95, 1.0])])
def test_xattention_fused_estimate_matches_brute_force(n, stride, bs, tau):
    """The GPU estimate (kernels.xattn's block mass and row selection, Triton interpreter here)
    keeps the brute-force sets of blocks."""
    q, k, _ = _qkv(n)
    idx, mass = xa.estimate(q.float(), k.float(), tau, stride, bs, 8 ** -0.5, fused=True)
    kept, ref_mass = brute_xattention(q, k, tau, stride, bs, 8 ** -0.5)
    assert idx.dtype == torch.int64 and mass.dtype == torch.float32
    np.testing.assert_allclose(mass.numpy(), ref_mass, atol=1e-5)
    assert _sets(idx) == kept
    assert (idx[..., :-1] < idx[..., 1:]).logical_or(idx[..., 1:] < 0).all()  # ascending, -1 after


def test_xattention_select_blocks_matches_threshold_rows(monkeypatch):
    """kernels.xattn.select_blocks (bisection on the float bits, no sort) against the torch
    path of select_rows (threshold_rows + sink / diagonal + table_to_index): rows with ties
    (equal masses are kept in index order), zero masses, tau below the top block, one row; one
    and two launches; bad input refused."""
    from sparseinfer.kernels import xattn

    gen = torch.Generator().manual_seed(3)
    for nb in (1, 7, 40):
        m = torch.rand(2, 3, nb, nb, generator=gen) ** 4
        m = torch.tril(m)
        m[..., 1::3, :] = torch.tril(torch.ones(nb, nb))[1::3]  # all-equal rows: ties
        m[..., 2::5, 1::2] = 0.0  # zero masses are never kept (unless sink / diagonal)
        m = m / m.sum(-1, keepdim=True)
        taus = torch.tensor([0.05, 0.9, 0.97])
        want = xa.select_rows(m, taus)  # the torch path: threshold_rows, sink + diagonal, table_to_index
        got = xattn.select_blocks(m, taus)
        assert torch.equal(xa.select_rows(m, taus, fused=True), got)
        assert got.shape == want.shape and torch.equal(got, want), nb
        # the two-pass path (a counting launch sizes the output): the same indices
        monkeypatch.setattr(xattn, "ONE_PASS_BYTES", 0)
        assert torch.equal(xattn.select_blocks(m, taus), want)
        monkeypatch.undo()
        # tau = 1 keeps every block with mass, on both paths
        full = xattn.select_blocks(m, torch.ones(3))
        assert torch.equal(full, xa.select_rows(m, torch.ones(3)))
        assert _sets(full) == [[[{c for c in range(nb) if m[b, h, i, c] > 0 or c in (0, i)} for i in range(nb)]
                                for h in range(3)] for b in range(2)]
    with pytest.raises(ValueError, match="float32 mass"):
        xattn.select_blocks(m.double(), taus)
    with pytest.raises(ValueError, match="tau"):
        xattn.select_blocks(m, taus[:2])


def test_flexprefill_fused_last_query_sums_match_the_torch_path():
    """The GPU path of the last queries' sums (kernels.lastq under the Triton interpreter here)
    gives the torch path's key and diagonal masses and the same estimate."""
    from sparseinfer.patterns import flexprefill as fp
    from sparseinfer.patterns import vertical_slash as vs

    q, k, _ = _qkv(300)
    q, k = q.float(), k.float()
    v_want, s_want = vs.last_query_sums(q, k, 32, 0.3, fused=False)
    v_got, s_got = vs.last_query_sums(q, k, 32, 0.3, fused=True)
    assert torch.allclose(v_got, v_want, atol=1e-6) and torch.allclose(s_got, s_want, atol=1e-6)
    want = fp.estimate(q, k, 0.9, 0.1, 32, 0.3, fused=False)
    got = fp.estimate(q, k, 0.9, 0.1, 32, 0.3, fused=True)
    assert torch.allclose(got.js, want.js, atol=1e-5)
    for name in ("query_aware", "block_table", "vertical", "slash"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_table_to_index_and_row_cumsum_against_plain_references():
    """table_to_index (prefix-sum slots, no sort): each row's members ascending, -1 padded,
    truncated to kmax; row_cumsum's two-level scan equals a float64 cumsum."""
    g = torch.Generator().manual_seed(5)
    table = torch.rand(2, 3, 4, 37, generator=g) < 0.3
    table[0, 0, 0] = False  # an empty row
    table[1, 2, 3] = True  # a full row
    for kmax in (None, 5):
        idx = xa.table_to_index(table, kmax)
        width = int(table.sum(-1).max()) if kmax is None else kmax
        assert idx.shape == (2, 3, 4, width) and idx.dtype == torch.long
        for r, row in zip(table.reshape(-1, 37), idx.reshape(-1, width)):
            members = torch.nonzero(r).flatten()[:width].tolist()
            assert row.tolist() == members + [-1] * (width - len(members))
    x = torch.rand(3, 5, 64, generator=g, dtype=torch.float64).float()
    want = x.double().cumsum(-1)
    for chunk in (8, 16, 64):
        got = xa.row_cumsum(x, chunk=chunk, two_level=True)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
