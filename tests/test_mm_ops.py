"""mm_attention (MMInference's op): reference and Triton kernel against float64 dense masks."""
import pytest
import torch

from masks import masked_attention_f64, rel_err, vertical_slash_mask
from sparseinfer import ops
from sparseinfer.ops.mm import mm_density


def mm_mask(n, modality, vertical, slash, dense_rows):
    """bool [B, H, n, n] built from the definition, row by row: query i of modality a uses
    slot a's vertical-slash rule; a dense row sees every causal key."""
    b, h, slots = vertical.shape[:3]
    per = [vertical_slash_mask(n, vertical[:, :, a], slash[:, :, a]) for a in range(slots)]
    out = torch.zeros(b, h, n, n, dtype=torch.bool)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for bi in range(b):
        for hi in range(h):
            drows = {int(r) for r in dense_rows[bi, hi].tolist() if r >= 0} if dense_rows is not None else set()
            for i in range(n):
                out[bi, hi, i] = causal[i] if i in drows else per[int(modality[bi, i])][bi, hi, i]
    return out


def _case(seed, b=2, hq=4, hkv=2, n=150, d=32, slots=3, nv=9, ns=6, nd=5):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h in (hq, hkv, hkv))
    # runs of modalities: text, video, text, image ...
    modality = torch.zeros(b, n, dtype=torch.long)
    modality[:, 20:90] = 2
    modality[0, 110:130] = 1
    modality[1, 95:150] = 1
    vi = torch.randint(-1, n, (b, hq, slots, nv), generator=g)
    si = torch.randint(-1, n // 3, (b, hq, slots, ns), generator=g)
    dr = torch.randint(-1, n, (b, hq, nd), generator=g)
    return q, k, v, modality, vi, si, dr


@pytest.mark.parametrize("with_rows", [True, False])
def test_mm_reference_matches_f64_mask(with_rows):
    q, k, v, mod, vi, si, dr = _case(0)
    dr = dr if with_rows else None
    mask = mm_mask(150, mod, vi, si, dr)
    want = masked_attention_f64(q, k, v, mask)
    got = ops.mm_attention(q.double(), k.double(), v.double(), mod, vi, si, dr, backend="reference")
    assert rel_err(got, want) < 1e-12
    dens = mm_density(150, mod, vi, si, dr)
    assert torch.allclose(dens.double(), mask.double().sum((-1, -2)) / (150 * 151 / 2), atol=1e-6)


def test_mm_triton_interpreter_matches_f64_mask():
    # blocks of 64 rows: the boundaries at 20, 90, 95, 110, 130 fall inside blocks
    q, k, v, mod, vi, si, dr = _case(1)
    mask = mm_mask(150, mod, vi, si, dr)
    want = masked_attention_f64(q, k, v, mask)
    got = ops.mm_attention(q, k, v, mod, vi, si, dr, backend="triton")
    assert rel_err(got, want) < 1e-5
    # the slots hint (what the pattern passes): only present modalities are launched
    got = ops.mm_attention(q, k, v, mod, vi, si, dr, backend="triton", slots=[0, 1, 2])
    assert rel_err(got, want) < 1e-5
    with pytest.raises(ValueError, match=r"slots: modality holds ids \[1\]"):
        ops.mm_attention(q, k, v, mod, vi, si, dr, backend="triton", slots=[0, 2])


def test_mm_rejects_bad_modality():
    q, k, v, mod, vi, si, dr = _case(2)
    with pytest.raises(ValueError, match="modality: expected ids in"):
        ops.mm_attention(q, k, v, mod + 2, vi, si, dr, backend="reference")
    with pytest.raises(ValueError, match="modality: expected shape"):
        ops.mm_attention(q, k, v, mod[:, :10], vi, si, dr, backend="reference")
    with pytest.raises(ValueError, match="slash_idx: expected shape"):
        ops.mm_attention(q, k, v, mod, vi, si[:, :, :2], dr, backend="reference")


@pytest.mark.parametrize("d,hq,hkv", [(32, 4, 2), (64, 4, 1)])
def test_kernel_gathered_query_rows_match_f64_mask(d, hq, hkv):
    """Query-side indirection: the kernel reads its rows from a permuted list (padding -1,
    duplicates across tiles allowed), causality and bands by original positions; ranges and
    columns (no slash map) against the float64 mask; rows outside the list keep `out`."""
    from sparseinfer.index import SparseIndex
    from sparseinfer.kernels import attention as ka

    g = torch.Generator().manual_seed(3)
    b, n, bm = 2, 150, 64
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h in (hq, hkv, hkv))
    # per (b, h) a different permuted subset of rows, 100 of them, then padding to 2 tiles
    rows = torch.stack([torch.stack([torch.randperm(n, generator=g)[:100] for _ in range(hq)]) for _ in range(b)])
    q_rows = torch.nn.functional.pad(rows, (0, 2 * bm - 100), value=-1).to(torch.int32)
    # two bands on keys < 90 (local window and a far band) + gathered columns >= 90
    ranges = torch.tensor([[0, 90, 0, 7, 1], [0, 90, 40, 55, 1]], dtype=torch.int32).view(1, 1, 1, 2, 5)
    cols = torch.stack([torch.stack([torch.randperm(60, generator=g)[:9].sort().values + 90 for _ in range(hq)])
                        for _ in range(b)]).to(torch.int32)
    idx = SparseIndex(n=n, block_m=bm, ranges=ranges, range_count=torch.full((1, 1, 2), 2, dtype=torch.int32),
                      columns=cols, column_count=torch.full((b, hq, 2), 9, dtype=torch.int32))
    sentinel = torch.full_like(q, 7.0)
    got = ka.run_index(q, k, v, idx, d ** -0.5, 64, 4, 1, q_rows=q_rows, out=sentinel)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    off = i - j
    band = (j < 90) & (((off >= 0) & (off <= 7)) | ((off >= 40) & (off <= 55)))
    mask = band.expand(b, hq, n, n).clone()
    for bi in range(b):
        for hi in range(hq):
            c = cols[bi, hi].long()
            mask[bi, hi][:, c] |= c[None, :] <= torch.arange(n)[:, None]
    want = masked_attention_f64(q, k, v, mask)
    listed = torch.zeros(b, hq, n, dtype=torch.bool)
    listed.scatter_(2, rows, True)
    assert rel_err(got[listed], want[listed]) < 1e-5
    assert bool((got[~listed] == 7.0).all())
    with pytest.raises(ValueError, match="q_rows: expected int32"):
        ka.run_index(q, k, v, idx, d ** -0.5, 64, 4, 1, q_rows=q_rows[..., :100])
