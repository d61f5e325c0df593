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


def test_mm_rejects_bad_modality():
    q, k, v, mod, vi, si, dr = _case(2)
    with pytest.raises(ValueError, match="modality: expected ids in"):
        ops.mm_attention(q, k, v, mod + 2, vi, si, dr, backend="reference")
    with pytest.raises(ValueError, match="modality: expected shape"):
        ops.mm_attention(q, k, v, mod[:, :10], vi, si, dr, backend="reference")
    with pytest.raises(ValueError, match="slash_idx: expected shape"):
        ops.mm_attention(q, k, v, mod, vi, si[:, :, :2], dr, backend="reference")
