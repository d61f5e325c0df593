"""Compile the Gluon kernel for sm_90 on a machine without a GPU (run as a script by test_gluon.py).

A stand-in driver reports an sm_90 target, so launching on CPU tensors compiles (triton's CPU wheel
ships ptxas) and stops before running. Prints one JSON object per index kind: shared memory, local
memory (spills), registers at launch, warps, and which Hopper instructions the PTX holds.
"""
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import jit as tjit  # noqa: E402


class _Sm90:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def main() -> int:
    tjit.driver.set_active(_Sm90())
    from sparseinfer import index as _index
    from sparseinfer.kernels import gluon as kg

    compiled = []
    run = tjit.JITFunction.run

    def warm(self, *a, grid, warmup, **kw):  # compile only
        k = run(self, *a, grid=grid, warmup=True, **kw)
        compiled.append(k)
        return k

    tjit.JITFunction.run = warm
    torch.manual_seed(0)
    b, h, hk, d, n = 1, 8, 2, 128, 1024
    q = torch.randn(b, h, n, d, dtype=torch.bfloat16)
    k = torch.randn(b, hk, n, d, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    nb = n // 64
    blocks = (torch.rand(b, h, nb, 8) * (torch.arange(nb).view(1, 1, nb, 1) + 1)).long()
    lse = torch.empty(b, h, n, dtype=torch.float32)
    vert = torch.randint(0, n, (b, h, 40))
    slash = torch.cat([torch.arange(300), torch.randint(0, n, (20,))]).expand(b, h, 320)
    # vertical-slash's second launch: relative tiles, edges, ranges with holes (runs 10 apart), columns,
    # merged with the band launch's rows
    holey = torch.cat([slash, torch.arange(600, 700, 10).expand(b, h, 10)], -1)
    vs_idx, vs_band = _index.from_vertical_slash(vert, holey, n, 64, block_n=64, band_block_m=128, band_min=16,
                                                 max_tiled=64)
    prior = (torch.empty_like(q), lse, vs_band.range_count[..., 0])
    vs_narrow = _index.from_vertical_slash(vert, holey, n, 64, block_n=64, band_block_m=128, band_min=16,
                                           max_tiled=64, narrow_n=32)[0]
    cases = {"tiles": (_index.from_block_sparse(blocks, 64, n, 64, 64), 64, {}),
             "ranges": (_index.from_ashape(n, 128, 512, b, h, 128, q.device), 128, {"lse_out": lse}),
             # vertical-slash's band launch with the columns of its heads
             "ranges+columns": (_index.band_index(slash, n, 128, 16, vertical_idx=vert), 128, {"lse_out": lse}),
             "vs": (vs_idx, 64, {"prior": prior}),
             # edges at most 32 keys wide as 32-key tiles
             "vs+narrow": (vs_narrow, 64, {"prior": prior}),
             # the band launch's rows loaded in the epilogue (a prior TMA cannot read) and no look-ahead
             "vs+prior-loads": (vs_idx, 64, {"prior": prior, "prior_tma": False, "overlap": True})}
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    out = {}
    for kind, (idx, bn, kw) in cases.items():
        kind_, why = kg.index_kind(idx, d, bn)
        assert kind_ == kind.split("+")[0], (kind, why)
        compiled.clear()
        kg.run(q, k, v, idx, d ** -0.5, block_n=bn, check=False, **{**kg.CONFIGS[kind_], **kw})
        ck = compiled[-1]
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sparseinfer_sm90_{kind}_{os.getpid()}.cubin")
        with open(path, "wb") as fh:
            fh.write(ck.asm["cubin"])
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
        ptx = ck.asm["ptx"]
        # ptxas's own verdict on the wgmma pipeline (C7511: wgmma serialized, e.g. for want of registers)
        ptx_path = path[:-6] + ".ptx"
        with open(ptx_path, "w") as fh:
            fh.write(ptx)
        info = subprocess.run([os.path.join(bindir, "ptxas"), "-arch=sm_90a", "-v", ptx_path, "-o", path],
                              capture_output=True, text=True, check=True).stderr
        os.remove(ptx_path)
        os.remove(path)
        out[kind] = {"shared": ck.metadata.shared, "warps": ck.metadata.num_warps,
                     "regs": int(re.search(r"REG:(\d+)", res).group(1)),
                     "local": int(re.search(r"LOCAL:(\d+)", res).group(1)),
                     "setmaxnreg": "setmaxnreg" in ptx, "wgmma": "wgmma.mma_async" in ptx,
                     "tma": "cp.async.bulk.tensor" in ptx, "mbarrier": "mbarrier.try_wait" in ptx,
                     "tma_copies": ptx.count("cp.async.bulk.tensor"),
                     "wgmma_serialized": "C7511" in info}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
