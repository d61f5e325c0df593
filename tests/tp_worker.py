"""Run by `torchrun --nproc-per-node W tests/tp_worker.py MODEL_DIR OUT.pt [GGUF_FILE]` (from
tests/test_parallel.py): loads MODEL_DIR sharded with tp_plan="auto" (gloo on the CPU), runs the
cases of `tp_cases.CASES` patched, and rank 0 saves {case name: logits or generated ids} to OUT.pt."""
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
import sparseinfer  # noqa: E402
from tp_cases import run_cases  # noqa: E402


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    kwargs = {"gguf_file": sys.argv[3]} if len(sys.argv) > 3 else {}
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32, **kwargs)
    results = run_cases(model, sparseinfer)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
