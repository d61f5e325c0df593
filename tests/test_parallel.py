"""Tensor parallelism: the patched model sharded over 2 ranks (torchrun, gloo, CPU) gives the
single-process patched logits, for dense, every sparse method and a KV policy."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparseinfer
from sparseinfer import parallel
from sparseinfer.patterns.minference import MInferenceLayer
from tp_cases import cases, mixed_config, run_cases

HERE = Path(__file__).parent


def tiny_llama(tmp_path: Path) -> Path:
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def torchrun(nproc: int, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           str(HERE / "tp_worker.py"), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # a hung group: kill torchrun and its workers, not torchrun alone
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-4000:]


def test_sharded_patched_logits_equal_single_process(tmp_path):
    model_dir = tiny_llama(tmp_path)
    torchrun(2, str(model_dir), str(tmp_path / "tp.pt"))
    sharded = torch.load(tmp_path / "tp.pt")
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    single = run_cases(model, sparseinfer)
    assert set(sharded) == set(single) == set(cases(model.config)) | {"raas_generate"}
    for name in cases(model.config):
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-4, atol=1e-4, msg=name)
    # the sparse methods really are sparse here (else the comparison above proves little)
    assert (single["vertical_slash"] - single["dense"]).abs().max() > 1e-3
    assert (single["minference"] - single["dense"]).abs().max() > 1e-3
    assert torch.equal(sharded["raas_generate"], single["raas_generate"])


class _Mesh:
    """Stands in for a 1-D 'tp' DeviceMesh."""

    def __init__(self, rank):
        self.rank, self.mesh_dim_names = rank, ("tp",)

    def __getitem__(self, name):
        return self

    def get_local_rank(self):
        return self.rank


class _Sharded(torch.nn.Module):
    def __init__(self, config, rank, size):
        super().__init__()
        self.config, self.tp_size, self._device_mesh = config, size, _Mesh(rank)


def test_head_shard_maps_query_heads_and_kv_groups():
    cfg = LlamaConfig(num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=1)
    sh = parallel.head_shard(_Sharded(cfg, 1, 4))
    assert (sh.q, sh.kv) == (range(8, 16), range(2, 4))
    # query heads 8..15 are exactly the query heads of KV heads 2..3
    assert {h // (32 // 8) for h in sh.q} == set(sh.kv)
    assert parallel.head_shard(torch.nn.Module()) is None


def test_minference_config_is_sliced_to_the_rank_heads():
    cfg = LlamaConfig(num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=2)
    full = mixed_config(cfg)["layers"][1]
    layer = MInferenceLayer(full).shard(parallel.head_shard(_Sharded(cfg, 1, 2)))
    assert layer.heads == full[4:8]


def test_unshardable_head_counts_are_a_clear_error():
    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=1)
    with pytest.raises(ValueError, match="divisible by 2.*9 query / 3 KV"):
        parallel.head_shard(_Sharded(cfg, 0, 2))


def test_mminference_heads_are_sliced_to_the_rank_heads():
    from sparseinfer.patterns.mm import MMInferenceLayer

    cfg = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1, hidden_size=64)
    heads = [{"boundary": "none", "intra": {"all": {"pattern": "vertical_slash", "vertical": 4 + h, "slash": 8}}}
             for h in range(4)]
    layer = MMInferenceLayer(heads)
    local = layer.shard(parallel.head_shard(_Sharded(cfg, 1, 2)))
    assert local.heads == heads[2:4] and local.context is layer.context


def test_contextual_sparsity_under_tensor_parallelism_is_a_clear_error():
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    model._tp_size, model._device_mesh = 2, _Mesh(0)
    with pytest.raises(ValueError, match="tensor parallelism"):
        sparseinfer.patch(model, "dense", mlp="teal")
    assert not hasattr(model, "_sparseinfer_patch")
