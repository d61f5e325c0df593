"""MMInference patterns: grid estimation on planted structure, boundary types, exactness."""
import pytest
import torch

from masks import masked_attention_f64, rel_err
from sparseinfer import ops
from sparseinfer.patterns import grid
from sparseinfer.patterns.mm import MMInferenceLayer, ModalityContext, last_positions, query_scores
from sparseinfer.synthetic_video import video_qkv
from test_mm_ops import mm_mask


@pytest.mark.parametrize("strides", [(256, 128, 64, 32), (96, 48, 192, 160)])
def test_grid_recovers_planted_stride_and_phase(strides):
    """Strides that are multiples / divisors of each other are all candidates; every head's
    (stride, phase) is recovered exactly, for three random phase draws."""
    n = 4096
    for seed in range(3):
        q, k, _, mod, st, ph = video_qkv(1, 8, 4, n, 64, strides[0], strides=strides, seed=seed)
        pos, valid = last_positions(mod, "2", n, 64, "cpu")  # the last video queries
        col, _ = query_scores(q, k, pos[:, None], valid[:, None], 64 ** -0.5)
        col = col[:, 0]
        keys = torch.arange(n)
        km = (keys >= 30) & (keys < int(pos.min()) - 256) & (mod[0] == 2)
        cand = grid.candidate_strides(n, strides[0])
        assert {32, 48, 64, 96, 128, 160, 192, 256} <= set(cand)
        s, p, _ = grid.estimate_grid(col, cand, km)
        want_s = st.repeat_interleave(2)
        want_p = ph.repeat_interleave(2)
        assert s[0].tolist() == want_s.tolist() and p[0].tolist() == want_p.tolist(), (seed, s, p, st, ph)


def _query_groups(n: int, seed: int):
    """q [2, 4, n, 16], k [2, 2, n, 16] and two groups of 4 estimating queries per batch row
    (pos [2, 2, 4], valid [2, 2, 4]: one padded query), positions spread over n."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 4, n, 16, generator=g), torch.randn(2, 2, n, 16, generator=g)
    base = torch.tensor([[[88, 89, 94, 99], [11, 33, 34, 66]], [[3, 4, 5, 6], [0, 55, 77, 97]]])
    pos = (base * (n - 1)) // 99
    valid = torch.tensor([[[True] * 4, [True] * 4], [[True] * 4, [False, True, True, True]]])
    return q, k, pos, valid


def test_query_scores_match_float64_softmax():
    """Column and diagonal sums of several query groups (one with padding) against float64
    softmax rows summed by the definition: col[j] = sum_t p[t, j], diag[o] = sum_t p[t, pos_t - o]."""
    q, k, pos, valid = _query_groups(90, seed=0)
    b, hq, n = q.shape[0], q.shape[1], q.shape[2]
    col, diag = query_scores(q, k, pos, valid, 0.3)
    kk = k.double().repeat_interleave(2, 1)
    for bi in range(b):
        for gi in range(2):
            want_c = torch.zeros(hq, n, dtype=torch.float64)
            want_d = torch.zeros(hq, n, dtype=torch.float64)
            for t in range(4):
                i = int(pos[bi, gi, t])
                if not valid[bi, gi, t]:
                    continue
                pr = torch.softmax((q[bi, :, i].double()[:, None, :] @ kk[bi, :, : i + 1].transpose(-1, -2))[:, 0] * 0.3, -1)
                want_c[:, : i + 1] += pr
                want_d[:, : i + 1] += pr.flip(-1)  # offset o = i - j
            assert torch.allclose(col[bi, gi].double(), want_c, atol=1e-5)
            assert torch.allclose(diag[bi, gi].double(), want_d, atol=1e-5)


def test_grid_lines():
    lines = grid.grid_lines(torch.tensor([[5, 7]]), torch.tensor([[2, 0]]), 20, 4)
    assert lines.shape == (1, 2, 5)
    assert lines[0, 0].tolist() == [2, 7, 12, 17, -1] and lines[0, 1].tolist() == [0, 7, 14, -1, -1]


def test_last_positions_per_modality():
    mod = torch.tensor([[0, 2, 2, 0, 2, 0, 0], [2, 2, 2, 2, 2, 2, 0]])
    pos, valid = last_positions(mod, "2", 7, 4, "cpu")
    assert pos[1].tolist() == [2, 3, 4, 5] and valid[1].all()
    assert pos[0][valid[0]].tolist() == [1, 2, 4] and valid[0].sum() == 3


HEADS = [
    {"boundary": "none", "intra": {"all": {"pattern": "vertical_slash", "vertical": 20, "slash": 70}}},
    {"boundary": "k", "intra": {"all": {"pattern": "vertical_slash", "vertical": {"text": 5, "video": 12}, "slash": 70}}},
    {"boundary": "q", "intra": {"text": {"pattern": "ashape", "sink": 10, "window": 40},
                                "video": {"pattern": "grid", "sink": 4, "window": 30},
                                "image": {"pattern": "vertical_slash", "vertical": 9, "slash": 66}}},
    {"boundary": "2d", "intra": {"all": {"pattern": "vertical_slash", "vertical": {"video": 10, "image": 3}, "slash": 65},
                                 "video": {"pattern": "grid", "sink": 4, "window": 30, "horizontal_lines": False}}},
    {"boundary": "none", "intra": {"all": {"pattern": "grid", "sink": 4, "window": 30}}},
    {"boundary": "k", "intra": {"all": {"pattern": "grid", "sink": 4, "window": 30, "vertical_lines": False}}},
    {"boundary": "none", "intra": {"all": {"pattern": "ashape", "sink": 4, "window": 30}}},
    {"boundary": "2d", "intra": {"all": {"pattern": "grid", "sink": 4, "window": 30}}},
]


def test_every_boundary_and_intra_pattern_is_exact():
    n, b = 600, 2
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(b, 8, n, 32, generator=g), torch.randn(b, 4, n, 32, generator=g), torch.randn(b, 4, n, 32, generator=g)
    mod = torch.zeros(b, n, dtype=torch.long)
    mod[:, 100:450] = 2
    mod[0, 470:520] = 1
    mod[1, 300:330] = 1
    layer = MMInferenceLayer(HEADS, ModalityContext(mod, 48), strides=(16, 32, 48, 64, 96))
    (sel,) = layer.select(q, k, 32 ** -0.5)
    kw = sel.kwargs
    mask = mm_mask(n, mod, kw["vertical_idx"], kw["slash_idx"], kw["dense_rows"])
    assert torch.allclose(sel.density.double(), mask.double().sum((-1, -2)) / (n * (n + 1) / 2), atol=1e-6)
    assert (sel.density < 0.5).all()
    out = ops.mm_attention(q, k, v, **kw, scale=32 ** -0.5, backend="reference")
    assert rel_err(out, masked_attention_f64(q, k, v, mask, 32 ** -0.5)) < 1e-5
    vi, rows = kw["vertical_idx"], kw["dense_rows"]
    # K-boundary head 1: 5 text and 12 video verticals besides the 30 forced sink keys
    for a in range(3):
        cols = {int(x) for x in vi[0, 1, a] if x >= 30}
        assert sum(int(mod[0, c]) == 0 for c in cols) == 5 and sum(int(mod[0, c]) == 2 for c in cols) == 12
    # 2D head 7: grid lines confined to vision keys; Q-boundary head 2 (grid for video only):
    # its horizontal lines are video rows
    assert all(int(mod[0, int(c)]) != 0 for c in vi[0, 7, 2] if c >= 4)
    assert (rows[0, 2] >= 0).sum() > 3 and all(int(mod[0, int(r)]) == 2 for r in rows[0, 2] if r >= 0)
    # head 5 has no vertical lines: only its 4 sink keys
    assert {int(x) for x in vi[0, 5].flatten() if x >= 0} == {0, 1, 2, 3}
    # A-shape head 6 keeps no dense rows
    assert (rows[:, 6] < 0).all()


@pytest.mark.parametrize("window", [None, 2048])
def test_q_boundary_grid_finds_planted_lines_from_video_queries(window, monkeypatch):
    """The last queries are text (the question): a text-estimated grid misses the video lines,
    the Q-boundary video slot (estimated from the last video queries) finds them exactly; also
    when the fold sees only a window of keys (GRID_WINDOW; phases mapped back to positions)."""
    if window:
        from sparseinfer.patterns import mm as mm_mod

        monkeypatch.setattr(mm_mod, "GRID_WINDOW", window)
    n, frame = 4096, 128
    q, k, _, mod, st, ph = video_qkv(1, 4, 2, n, 64, frame, seed=3)
    head_q = {"boundary": "q", "intra": {"all": {"pattern": "ashape", "sink": 4, "window": 64},
                                         "video": {"pattern": "grid", "sink": 4, "window": 64}}}
    head_n = {"boundary": "none", "intra": {"all": {"pattern": "grid", "sink": 4, "window": 64}}}
    (sel,) = MMInferenceLayer([head_q, head_q, head_n, head_n], ModalityContext(mod, frame)).select(q, k, 0.125)
    rows = sel.kwargs["dense_rows"]
    pos = torch.arange(n)
    for h in range(2):
        want = pos[(mod[0] == 2) & (pos % frame == int(ph[0]))]
        assert sorted(int(r) for r in rows[0, h] if r >= 0) == want.tolist()
        assert set(want.tolist()) <= set(sel.kwargs["vertical_idx"][0, h, 2].tolist())
    got_n = sorted(int(r) for r in rows[0, 2] if r >= 0)
    assert got_n != pos[pos % frame == int(ph[1])].tolist()


def test_permuted_dense_tile_formulation_round_trips():
    """MMInference's formulation: permute q/k/v so modality runs are contiguous and grid lines
    come last, compute with causality by *original* positions, un-permute. It gives exactly the
    output of `ops.mm_attention` (which gathers instead of permuting) for the same cells."""
    n, b = 300, 1
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(b, 4, n, 16, generator=g), torch.randn(b, 2, n, 16, generator=g), torch.randn(b, 2, n, 16, generator=g)
    mod = torch.zeros(b, n, dtype=torch.long)
    mod[:, 40:250] = 2
    head = {"boundary": "q", "intra": {"all": {"pattern": "vertical_slash", "vertical": 8, "slash": 70},
                                       "video": {"pattern": "grid", "sink": 4, "window": 20}}}
    (sel,) = MMInferenceLayer([head] * 4, ModalityContext(mod, 32), strides=(16, 32)).select(q, k, 0.25)
    kw = sel.kwargs
    mask = mm_mask(n, mod, kw["vertical_idx"], kw["slash_idx"], kw["dense_rows"])  # [B, H, n, n] original order
    lines = kw["dense_rows"]
    perm = grid.permutation(mod, lines)  # [B, H, n]
    inv = torch.argsort(perm, -1)
    assert torch.equal(perm.gather(-1, inv), torch.arange(n).expand(b, 4, n))
    for hh in range(4):
        p = perm[0, hh]
        # lines are last, and each modality's other tokens form one run in original order
        nl = int((lines[0, hh] >= 0).sum())
        assert set(p[n - nl:].tolist()) == {int(x) for x in lines[0, hh] if x >= 0}
        m_sorted = mod[0, p[: n - nl]]
        assert torch.equal(m_sorted, m_sorted.sort().values)
        # permuted computation, mask indexed by original positions
        gk = hh // 2
        out_p = masked_attention_f64(q[:, hh:hh + 1, p], k[:, gk:gk + 1, p], v[:, gk:gk + 1, p],
                                     mask[:, hh:hh + 1][:, :, p][:, :, :, p], 0.25)
        out = out_p[:, :, inv[0, hh]]
        ref = ops.mm_attention(q, k, v, **kw, scale=0.25, backend="reference")[:, hh:hh + 1]
        assert rel_err(ref, out) < 1e-6


def test_fused_lastq_sums_kernel_matches_torch_path():
    """The fused column / diagonal sums kernel (interpreter) equals the torch path of
    `query_scores` (softmax, weighted sums, gather), incl. padded (invalid) queries."""
    from sparseinfer.kernels.lastq import query_sums

    q, k, pos, valid = _query_groups(300, seed=1)
    want_c, want_d = query_scores(q, k, pos, valid, 0.3)
    got_c, got_d = query_sums(q, k, pos.view(2, 8), valid.view(2, 8).float(), 2, 0.3)
    assert torch.allclose(got_c, want_c, atol=1e-5) and torch.allclose(got_d, want_d, atol=1e-5)


def test_vertical_slash_last_query_sums_kernel_matches_torch_path():
    """The fused path vertical-slash estimation takes on CUDA (`query_sums`, here through the
    interpreter) against the torch path (softmax, column sums, skewed diagonal sums), GQA."""
    from sparseinfer.kernels.lastq import query_sums
    from sparseinfer.patterns import vertical_slash as vs

    g = torch.Generator().manual_seed(2)
    b, hq, hkv, n, d, L = 2, 4, 1, 260, 16, 8
    q, k = torch.randn(b, hq, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    p = vs.last_query_probs(q, k, L, 0.25)
    pos = torch.arange(n - L, n).expand(b, L)
    col, diag = query_sums(q, k, pos, torch.ones(b, L), 1, 0.25)
    assert torch.allclose(col[:, 0], p.sum(-2), atol=1e-5) and torch.allclose(diag[:, 0], vs.diagonal_sums(p), atol=1e-5)
