"""GPU == interpreter for the bisection selections (kernels.raas.raas_select, kernels.topk):
    python benchmarks/gpu_check_select.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sparseinfer.kernels.raas import raas_select  # noqa: E402
from sparseinfer.kernels.topk import topk_indices, topk_mask  # noqa: E402

g = torch.Generator().manual_seed(0)
for s_ in (7, 64, 300):
    b = torch.randn(2, 8, s_, generator=g)
    b[..., ::5] = float("-inf")
    ts = torch.zeros(2, 8, s_)
    step = torch.tensor(40)
    cpu = raas_select(b.clone(), ts.clone(), step, 3, 5)
    gpu = raas_select(b.cuda(), ts.cuda(), step.cuda(), 3, 5).cpu()
    print("raas_select S", s_, "cpu == gpu:", torch.equal(cpu, gpu))
for dt in (torch.bfloat16, torch.float32):
    sc = torch.randn(3, 14336, generator=g).to(dt)
    c, gg = topk_indices(sc, 7168), topk_indices(sc.cuda(), 7168).cpu()
    m = topk_mask(sc.cuda(), 7168).cpu()
    print("topk", dt, "cpu == gpu:", torch.equal(c, gg),
          "mask ok:", torch.equal(m, torch.zeros_like(m).scatter_(1, c.long(), True)))
