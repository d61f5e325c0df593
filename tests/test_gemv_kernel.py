"""Sparse decode GEMV kernels (sparseinfer.kernels.gemv) under the Triton interpreter, tiny
shapes, against float64 references."""
import pytest
import torch

from sparseinfer.kernels import gemv


# the one-row loop with weight rows loaded one step ahead (config entry 6 = 1, the GPU default);
# ROWS 32 over K = 45: two splits of 2 steps, the last step of the second past K; batches ignore the flag
PREFETCH_CFG = (16, 32, 32, 1, 1, 1)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", [None, PREFETCH_CFG])
def test_teal_gemv_matches_float64(m, dtype, config):
    g = torch.Generator().manual_seed(m)
    k, n = 45, 70  # not multiples of the blocks
    x = torch.randn(m, k, generator=g).to(dtype)
    wt = torch.randn(k, n, generator=g).to(dtype)
    t = torch.tensor(0.6)
    y = gemv.teal_gemv(x, wt, t) if config is None else gemv.teal_gemv_launch(x, wt, t, config)
    ref = gemv.teal_gemv_reference(x.double(), wt.double(), 0.6)
    assert y.dtype == dtype and y.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)
    assert (ref - x.double() @ wt.double()).abs().max() > 0.1  # the threshold changed the result


@pytest.mark.parametrize("m, config", [(2, None), (1, PREFETCH_CFG)])
def test_teal_gemv_skips_dropped_rows(m, config):
    """Rows of dropped channels (|x| <= t for every row of x) are never read: NaN there stays out."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, 40, generator=g)
    x[:, ::3] = 0.01  # dropped in every row
    wt = torch.randn(40, 33, generator=g)
    wt[::3] = float("nan")
    y = gemv.teal_gemv_launch(x, wt, torch.tensor(0.05), config)
    assert torch.isfinite(y).all()
    ref = gemv.teal_gemv_reference(x.double(), torch.nan_to_num(wt.double()), 0.05)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)


def test_teal_gemv_per_row_masks():
    """A channel kept by one row only: its weights are read, the other row still drops it."""
    x = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    wt = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = gemv.teal_gemv(x, wt, torch.tensor(0.5))
    torch.testing.assert_close(y, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_teal_gemv_bad_input():
    x = torch.randn(1, 8)
    with pytest.raises(ValueError, match="contiguous rows"):
        gemv.teal_gemv_launch(x, torch.randn(6, 8).t(), torch.tensor(0.0))
    with pytest.raises(ValueError, match="input channels"):
        gemv.teal_gemv_launch(x, torch.randn(9, 6), torch.tensor(0.0))
    with pytest.raises(ValueError, match="one-element"):
        gemv.teal_gemv_launch(x, torch.randn(8, 6), torch.zeros(2))
    with pytest.raises(ValueError, match=r"num_stages\[, prefetch\]\), got \(16, 32, 32, 1\)"):
        gemv.teal_gemv_launch(x, torch.randn(8, 6), torch.tensor(0.0), (16, 32, 32, 1))


@pytest.mark.parametrize("m, dtype, config", [(1, torch.float32, None), (3, torch.float32, None), (5, torch.float32, None),
                                              (1, torch.float16, None), (3, torch.float16, None), (5, torch.float16, None),
                                              (1, torch.float32, ((8, 32, 32, 1, 1, 1), PREFETCH_CFG)),
                                              (1, torch.float16, ((16, 32, 16, 1, 1, 1), (16, 32, 64, 1, 1, 1)))])
def test_teal_mlp_matches_float64(m, dtype, config):
    """The fused TEAL SwiGLU MLP (gate+up in one launch, SiLU(gate)*up computed inside down's)
    against the float64 reference; odd sizes, several K splits and unrolled iterations (prefetch
    configs: 4 steps per split, and one step per split)."""
    g = torch.Generator().manual_seed(10 + m)
    hid, inter = 37, 150
    x = torch.randn(m, hid, generator=g).to(dtype)
    wg, wu = (torch.randn(hid, inter, generator=g) * 0.3).to(dtype), (torch.randn(hid, inter, generator=g) * 0.3).to(dtype)
    wd = (torch.randn(inter, hid, generator=g) * 0.3).to(dtype)
    t_in, t_down = torch.tensor(0.5), torch.tensor(0.2)
    y = gemv.teal_mlp(x, wg, wu, wd, t_in, t_down) if config is None else \
        gemv.teal_mlp_launch(x, wg, wu, wd, t_in, t_down, config)
    ref = gemv.teal_mlp_reference(x.double(), wg.double(), wu.double(), wd.double(), 0.5, 0.2)
    assert y.dtype == dtype and y.shape == (m, hid)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)
    dense_h = gemv.teal_mlp_reference(x.double(), wg.double(), wu.double(), wd.double(), 0.5, 0.0)
    assert (ref - dense_h).abs().max() > 0.05  # the down threshold changed the result


def test_default_rows_fits_small_weights_only():
    """The default configs' ROWS: Llama-3-8B's launches keep the tuned values (>= 2 programs per SM on
    132 SMs already), small weights get more K splits, and ROWS stays a multiple of BLOCK_K."""
    sms = 132
    for key in ("cuda", "cuda batch"):
        for (k, n), cfg in (((4096, 14336), gemv.TEAL_MLP_CONFIG[key]), ((14336, 4096), gemv.TEAL_DOWN_CONFIG[key])):
            bk, bn, rows = cfg[:3]
            assert gemv.default_rows(k, n, bk, bn, rows, sms) == rows
    # SmolLM2-135M's MLP (576 -> 1536 -> 576) with the 8B defaults: down had one K split, 9 programs
    bk, bn, rows = gemv.TEAL_DOWN_CONFIG["cuda"][:3]
    r = gemv.default_rows(1536, 576, bk, bn, rows, sms)
    assert r < rows and r % bk == 0 and -(-1536 // r) * -(-576 // bn) > 9
    assert gemv.default_rows(4096, 4096, 64, 64, 2048, sms) == 512  # o_proj: the rule as before (8 splits)
    assert gemv.default_rows(14336, 64, 64, 64, 1792, sms) == 448  # 1792 -> 896 -> 448, never 224 (not x 64)


def test_teal_mlp_skips_dropped_neurons():
    """A neuron whose SiLU(gate)*up is 0 for every row is dropped: its down_proj row (NaN) is never read."""
    g = torch.Generator().manual_seed(4)
    hid, inter = 24, 40
    x = torch.randn(2, hid, generator=g)
    wg, wu, wd = torch.randn(hid, inter, generator=g), torch.randn(hid, inter, generator=g), torch.randn(inter, hid, generator=g)
    wu[:, ::4] = 0.0  # up = 0 -> h = 0 on these neurons
    wd[::4] = float("nan")
    y = gemv.teal_mlp(x, wg, wu, wd, torch.tensor(0.0), torch.tensor(0.0))
    assert torch.isfinite(y).all()
    ref = gemv.teal_mlp_reference(x.double(), wg.double(), wu.double(), torch.nan_to_num(wd.double()), 0.0, 0.0)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)


def test_teal_mlp_bad_input():
    x = torch.randn(1, 8)
    wg = torch.randn(8, 12)
    with pytest.raises(ValueError, match="differs from wg_t"):
        gemv.teal_mlp_launch(x, wg, torch.randn(8, 10), torch.randn(12, 8), torch.tensor(0.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="map back to H = 8"):
        gemv.teal_mlp_launch(x, wg, wg, torch.randn(12, 9), torch.tensor(0.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="K = 12"):
        gemv.teal_mlp_launch(x, wg, wg, torch.randn(11, 8), torch.tensor(0.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="one-element"):
        gemv.teal_mlp_launch(x, wg, wg, torch.randn(12, 8), torch.tensor(0.0), torch.zeros(3))


@pytest.mark.parametrize("m", [1, 3])
def test_dejavu_gateup_matches_float64(m):
    g = torch.Generator().manual_seed(m)
    h, i = 37, 50
    x = torch.randn(m, h, generator=g)
    wg, wu = torch.randn(i, h, generator=g), torch.randn(i, h, generator=g)
    mask = torch.rand(m, i, generator=g) < 0.4
    out = gemv.dejavu_gateup(x, wg, wu, mask)
    ref = gemv.dejavu_gateup_reference(x.double(), wg.double(), wu.double(), mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    assert (out[~mask] == 0).all()


def test_dejavu_gateup_skips_unselected_neurons():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, generator=g)
    wg, wu = torch.randn(30, 24, generator=g), torch.randn(30, 24, generator=g)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, 5:12] = True
    wg[12:] = float("nan")
    out = gemv.dejavu_gateup(x, wg, wu, mask)
    assert torch.isfinite(out).all()
    ref = gemv.dejavu_gateup_reference(x.double(), torch.nan_to_num(wg.double()), wu.double(), mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("h,i,kn", [(37, 50, 23), (64, 96, 96), (20, 40, 1)])
def test_dejavu_mlp_rows_matches_float64(h, i, kn):
    """The listed-neurons MLP (unsorted list, sizes not multiples of the blocks) against the
    float64 SwiGLU MLP with every other neuron zeroed."""
    g = torch.Generator().manual_seed(h + kn)
    x = torch.randn(1, h, generator=g)
    wg, wu, wd_t = (torch.randn(i, h, generator=g) for _ in range(3))
    idx = torch.randperm(i, generator=g)[:kn]
    out = gemv.dejavu_mlp_rows(x, wg, wu, wd_t, idx)
    mask = torch.zeros(1, i, dtype=torch.bool)
    mask[0, idx] = True
    ref = gemv.dejavu_gateup_reference(x.double(), wg.double(), wu.double(), mask) @ wd_t.double()
    assert out.shape == (1, h)
    torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-4)


def test_dejavu_mlp_rows_reads_only_listed_rows():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 24, generator=g)
    wg, wu, wd_t = (torch.randn(30, 24, generator=g) for _ in range(3))
    idx = torch.tensor([3, 17, 0, 9], dtype=torch.int32)
    keep = torch.zeros(30, dtype=torch.bool)
    keep[idx.long()] = True
    ref = gemv.dejavu_mlp_rows(x, wg, wu, wd_t, idx)
    for w in (wg, wu, wd_t):
        w[~keep] = float("nan")
    out = gemv.dejavu_mlp_rows(x, wg, wu, wd_t, idx)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)


def test_dejavu_mlp_rows_rejects_bad_input():
    x, w = torch.randn(1, 8), torch.randn(12, 8)
    with pytest.raises(ValueError, match="one row"):
        gemv.dejavu_mlp_rows_launch(torch.randn(2, 8), w, w, w, torch.arange(3))
    with pytest.raises(ValueError, match=r"wd_t \[I, 8\] row-major"):
        gemv.dejavu_mlp_rows_launch(x, w, w, torch.randn(8, 12).t(), torch.arange(3))
    with pytest.raises(ValueError, match="idx"):
        gemv.dejavu_mlp_rows_launch(x, w, w, w, torch.arange(3.0))


def test_model_level_helpers_match_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 32, generator=g)  # [B, T, H]
    w = torch.randn(48, 32, generator=g)  # nn.Linear layout [out, in]
    w_cm = w.t().contiguous().t()  # stored column-major, same values
    bias = torch.randn(48, generator=g)
    y = gemv.teal_linear(x, w_cm, torch.tensor(0.7), bias)
    xd = x.double()
    ref = torch.where(xd.abs() > 0.7, xd, 0.0) @ w.double().T + bias.double()
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)
    wg, wu, wd = torch.randn(40, 32, generator=g), torch.randn(40, 32, generator=g), torch.randn(32, 40, generator=g)
    idx = torch.stack([torch.randperm(40, generator=g)[:12] for _ in range(2)]).reshape(2, 1, 12)
    out = gemv.dejavu_mlp(x, wg, wu, wd.t().contiguous().t(), idx)
    mask = torch.zeros(2, 1, 40, dtype=torch.float64).scatter_(-1, idx, 1.0)
    hd = torch.nn.functional.silu(xd @ wg.double().T) * (xd @ wu.double().T) * mask
    torch.testing.assert_close(out.double(), hd @ wd.double().T, atol=1e-4, rtol=1e-4)


def test_custom_ops_register_fake_shapes():
    """The ops are torch custom ops with fake implementations (what torch.compile traces)."""
    x, wt = torch.randn(3, 16), torch.randn(16, 24)
    torch.library.opcheck(torch.ops.sparseinfer.teal_gemv.default, (x, wt, torch.tensor(0.3)),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.sparseinfer.teal_mlp.default,
                          (x, wt, wt, torch.randn(24, 16), torch.tensor(0.3), torch.tensor(0.1)),
                          test_utils=("test_schema", "test_faketensor"))
    wg, wu = torch.randn(20, 16), torch.randn(20, 16)
    torch.library.opcheck(torch.ops.sparseinfer.dejavu_gateup.default, (x, wg, wu, torch.rand(3, 20) < 0.5),
                          test_utils=("test_schema", "test_faketensor"))


def test_dynamo_traces_the_ops_without_graph_breaks():
    """fullgraph=True: torch.compile captures the model-level helpers whole (aot_eager backend,
    so no C++ compile on the CPU; the ops run the interpreted kernels)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 16, generator=g).t().contiguous().t()
    wg, wu, wd = torch.randn(20, 16, generator=g), torch.randn(20, 16, generator=g), torch.randn(16, 20, generator=g)
    wd = wd.t().contiguous().t()
    t = torch.tensor(0.4)

    def step(x, idx):
        return gemv.teal_linear(x, w, t), gemv.dejavu_mlp(x, wg, wu, wd, idx)

    x = torch.randn(1, 1, 16, generator=g)
    idx = torch.randperm(20, generator=g)[:8].reshape(1, 1, 8)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(x, idx)
    want = step(x, idx)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_teal_fused_finish_counters_reset_and_match_two_launch_path(monkeypatch):
    """The split sums done by the last split program of each output block (atomic counters)
    equal the two-launch path, the counters are back at zero after every launch, and a
    repeated call (counters reused) gives the same result."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 70, generator=g)
    wg, wu = torch.randn(70, 130, generator=g) * 0.3, torch.randn(70, 130, generator=g) * 0.3
    wd = torch.randn(130, 70, generator=g) * 0.3
    t_in, t_down = torch.tensor(0.3), torch.tensor(0.1)
    fused = [gemv.teal_mlp_launch(x, wg, wu, wd, t_in, t_down) for _ in range(2)]
    assert int(gemv._counters(x.device, 1).abs().sum()) == 0
    monkeypatch.setattr(gemv, "FUSED_FINISH", False)
    two = gemv.teal_mlp_launch(x, wg, wu, wd, t_in, t_down)
    torch.testing.assert_close(fused[0], two, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1], fused[0], atol=0, rtol=0)
    ref = gemv.teal_mlp_reference(x.double(), wg.double(), wu.double(), wd.double(), 0.3, 0.1)
    torch.testing.assert_close(fused[0].double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_teal_compact_rows_path_matches_float64(sparsity):
    """One-row calls with the kept channels compacted into a list first (compact=True): the
    fused MLP and a single projection against the float64 reference, all kept / half / none."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 70, generator=g)
    wg, wu = torch.randn(70, 130, generator=g) * 0.3, torch.randn(70, 130, generator=g) * 0.3
    wd = torch.randn(130, 70, generator=g) * 0.3
    t_in = torch.quantile(x.abs(), sparsity) if 0 < sparsity < 1 else torch.tensor(-1.0 if sparsity == 0 else 1e9)
    t_down = torch.tensor(0.1)
    y = gemv.teal_mlp_launch(x, wg, wu, wd, t_in, t_down, compact=True)
    ref = gemv.teal_mlp_reference(x.double(), wg.double(), wu.double(), wd.double(), float(t_in), 0.1)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)
    y1 = gemv.teal_gemv_launch(x, wg, t_in, compact=True)
    torch.testing.assert_close(y1.double(), gemv.teal_gemv_reference(x.double(), wg.double(), float(t_in)),
                               atol=1e-4, rtol=1e-4)


def test_pdl_switch_and_launch_keywords(monkeypatch):
    """Our kernels follow torch.compile's PDL switch unless SPARSEINFER_PDL says otherwise; launch
    options only for CUDA tensors of a Hopper+ GPU (none on a CPU, on or off)."""
    from sparseinfer.kernels import pdl

    assert not pdl.enabled_from({})
    assert pdl.enabled_from({"TORCHINDUCTOR_ENABLE_PDL": "1"})
    assert not pdl.enabled_from({"TORCHINDUCTOR_ENABLE_PDL": "1", "SPARSEINFER_PDL": "0"})
    assert pdl.enabled_from({"TORCHINDUCTOR_ENABLE_PDL": "0", "SPARSEINFER_PDL": "1"})
    for on in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", on)
        assert pdl.kwargs(torch.zeros(1)) == {"PDL": False}
    # Deja Vu's switches (their own, on by default): their level where PDL exists, 0 on a CPU
    from sparseinfer.kernels import gemv, predict

    assert pdl.DEJAVU_ROWS is True and pdl.DEJAVU_SELECT == 2
    assert pdl.level(torch.zeros(1), 2) == 0 and gemv._rows_pdl(torch.zeros(1), True) is False
    assert predict._pdl(torch.zeros(1), None) == (0, {})


# gathered-rows loop (teal_rows_kernel): (ROWS, U, W, warps, stages); K / N not multiples of ROWS / W
ROWS_CFGS = [(16, 1, 32, 1, 2), (32, 2, 64, 1, 1), (16, 4, 16, 2, 3)]


def _rows_zeroed():
    """The per-device sums and counters the gathered-rows launches leave behind (all must be zero)."""
    acc = [b for k, b in gemv._ACC.items() if k[0] == "cpu"]
    cnt = [b for k, b in gemv._COUNTERS.items() if k[0] == "cpu"]
    return all(float(b.abs().max()) == 0 for b in acc + cnt)


@pytest.mark.parametrize("config", ROWS_CFGS + [None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("two", [False, True])
def test_teal_rows_matches_float64(config, dtype, two):
    g = torch.Generator().manual_seed(len(str(config)) + two)
    k, n = 45, 70
    x = torch.randn(1, k, generator=g).to(dtype)
    wt = torch.randn(k, n, generator=g).to(dtype)
    wt2 = torch.randn(k, n, generator=g).to(dtype) if two else None
    y = gemv.teal_rows_launch(x, wt, wt2, torch.tensor(0.6), config)
    ref = gemv.teal_gemv_reference(x.double(), wt.double(), 0.6)
    if two:
        ref = torch.nn.functional.silu(ref) * gemv.teal_gemv_reference(x.double(), wt2.double(), 0.6)
    assert y.dtype == dtype and y.shape == (1, n)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
    assert (gemv.teal_gemv_reference(x.double(), wt.double(), -1.0)
            - gemv.teal_gemv_reference(x.double(), wt.double(), 0.6)).abs().max() > 0.1  # the threshold mattered
    assert _rows_zeroed()  # the next launch starts from zero sums and counters


@pytest.mark.parametrize("t, kept", [(-1.0, "all"), (1e9, "none")])
def test_teal_rows_keeps_all_or_nothing(t, kept):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 50, generator=g)
    wt = torch.randn(50, 40, generator=g)
    y = gemv.teal_rows_launch(x, wt, None, torch.tensor(t), (16, 2, 32, 1, 2))
    ref = x.double() @ wt.double() if kept == "all" else torch.zeros(1, 40, dtype=torch.float64)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)
    assert _rows_zeroed()


def test_teal_rows_reads_only_kept_rows():
    """Rows of dropped channels are never read: NaN there stays out."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 40, generator=g)
    x[:, ::3] = 0.01
    wt = torch.randn(40, 33, generator=g)
    wt[::3] = float("nan")
    y = gemv.teal_rows_launch(x, wt, None, torch.tensor(0.05), (16, 1, 16, 1, 2))
    assert torch.isfinite(y).all()
    wt[::3] = 0
    torch.testing.assert_close(y.double(), gemv.teal_gemv_reference(x.double(), wt.double(), 0.05), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", [None, ((16, 1, 32, 1, 2), (32, 2, 16, 1, 1)), ((32, 2, 128, 1, 1), (16, 1, 64, 2, 2))])
def test_teal_rows_mlp_matches_float64(config):
    """Two launches, the hidden state SiLU(gate) * up kept in fp32 between them (float32 inputs: the
    reference's h in x's dtype is the same); twice in a row (the gate / up sums are zeroed for the next)."""
    g = torch.Generator().manual_seed(3)
    h, i = 37, 75
    x = torch.randn(1, h, generator=g)
    wg_t, wu_t, wd_t = torch.randn(h, i, generator=g), torch.randn(h, i, generator=g), torch.randn(i, h, generator=g)
    tin = torch.tensor(0.5)
    hid = gemv.teal_mlp_reference(x.double(), wg_t.double(), wu_t.double(), torch.eye(i, dtype=torch.float64), tin, -1.0)
    s = hid.abs().flatten().sort().values
    td = ((s[i // 2] + s[i // 2 + 1]) / 2).float()  # halfway between two |h|: no channel sits on the threshold
    ref = gemv.teal_mlp_reference(x.double(), wg_t.double(), wu_t.double(), wd_t.double(), tin, td)
    for _ in range(2):
        y = gemv.teal_rows_mlp_launch(x, wg_t, wu_t, wd_t, tin, td, config)
        torch.testing.assert_close(y.double(), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)
        assert _rows_zeroed()


def test_teal_rows_bad_input():
    x, wt = torch.randn(1, 20), torch.randn(20, 8)
    with pytest.raises(ValueError, match="one row only"):
        gemv.teal_rows_launch(torch.randn(2, 20), wt, None, torch.tensor(0.1))
    with pytest.raises(ValueError, match="K = 20"):
        gemv.teal_rows_launch(x, torch.randn(21, 8), None, torch.tensor(0.1))
    with pytest.raises(ValueError, match="differs from wt"):
        gemv.teal_rows_launch(x, wt, torch.randn(20, 9), torch.tensor(0.1))
    with pytest.raises(ValueError, match="ROWS, U, W"):
        gemv.teal_rows_launch(x, wt, None, torch.tensor(0.1), (16, 1, 32))
    with pytest.raises(ValueError, match="one-element threshold"):
        gemv.teal_rows_launch(x, wt, None, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="map back to H"):
        gemv.teal_rows_mlp_launch(x, torch.randn(20, 30), torch.randn(20, 30), torch.randn(30, 21), torch.tensor(0.1),
                                  torch.tensor(0.1))
    with pytest.raises(ValueError, match="two \\(ROWS"):
        gemv.teal_rows_mlp_launch(x, torch.randn(20, 30), torch.randn(20, 30), torch.randn(30, 20), torch.tensor(0.1),
                                  torch.tensor(0.1), ((16, 1, 32, 1, 2),))
