"""GPU check of index.row_split (the rows kernels) against the torch path on the CPU: sorted int32 /
int64 rows, unordered rows with repeats, and block_sparse_density from both. Prints one line per case;
exit status 1 on a mismatch."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparseinfer import index as sidx  # noqa: E402
from sparseinfer.kernels import attention as katt  # noqa: E402
from sparseinfer.patterns.block_sparse import block_sparse_density  # noqa: E402


def main():
    g = torch.Generator().manual_seed(0)
    bad = 0
    for b, h, nb, k in ((1, 32, 2048, 100), (2, 3, 37, 9)):
        idx = torch.randint(-1, nb, (b, h, nb, k), generator=g)
        srt = torch.sort(torch.where(idx >= 0, idx, 1 << 30), -1).values
        srt = torch.where(srt == 1 << 30, -1, srt)
        dup = torch.zeros_like(srt, dtype=torch.bool)
        dup[..., 1:] = srt[..., 1:] == srt[..., :-1]
        srt = torch.sort(torch.where(dup | (srt < 0), 1 << 30, srt), -1).values
        srt = torch.where(srt == 1 << 30, -1, srt)
        for name, x, s in (("unordered", idx, False), ("sorted int64", srt, True), ("sorted int32", srt.int(), True)):
            katt.FLAGS["BS_LISTS"] = "auto"
            want = sidx.row_split(x, s)
            got = sidx.row_split(x.cuda(), s)
            ok = all(torch.equal(w, v.cpu()) for w, v in zip(want, got))
            d_ok = torch.allclose(block_sparse_density(nb * 64, x, 64, s), block_sparse_density(nb * 64, x.cuda(), 64, s).cpu())
            print(f"{b}x{h}x{nb}x{k} {name}: row_split equal {ok}, density equal {d_ok}", flush=True)
            bad += not (ok and d_ok)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
