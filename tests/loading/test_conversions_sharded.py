"""A transformers MoE checkpoint into a model sharded by FSDP2 (2 CPU ranks, gloo): the
converted expert stacks land in every rank's shards, equal to ``from_pretrained`` of the same
folder (computed in the test's own process, the oracle), each rank reading only the experts
its shard holds; a group that cannot be converted fails on every rank alike, before any rank
writes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import surgery
from surgery.sources.safetensors import SafetensorsSource

from support import spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")
pytest.importorskip("transformers")
pytest.importorskip("transformers.core_model_loading")  # transformers 5

from support import hf  # noqa: E402  (needs transformers)

TIMEOUT_S = 150


def _full(model) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def _sharded_mixtral(mesh):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(1)
    model = hf.tiny_mixtral()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _record_reads() -> list[str]:
    """The checkpoint keys this process reads from safetensors files, from now on."""
    read: list[str] = []
    for name in ("read", "_read_into", "_read_run_into"):
        real = getattr(SafetensorsSource, name)

        def spy(self, key, *args, _real=real, **kwargs):
            read.append(key)
            return _real(self, key, *args, **kwargs)

        setattr(SafetensorsSource, name, spy)
    return read


def case_fsdp_mixtral(rank: int, world: int, tmp: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    oracle = torch.load(tmp / "oracle.pt")
    model = _sharded_mixtral(mesh)
    experts = model.state_dict()["model.layers.0.mlp.experts.gate_up_proj"]
    assert experts.to_local().shape == (4 // world, 128, 32)  # each rank holds its experts
    read = _record_reads()
    report = surgery.load_partial(model, tmp / "folder")
    assert report.ok and report.tensors_loaded == 21 and len(report.converted) == 4
    mine = {2 * rank, 2 * rank + 1}  # Shard(0) of 4 experts on 2 ranks
    experts = {int(k.split(".")[5]) for k in read if ".experts." in k}
    assert experts == mine, f"rank {rank} read experts {sorted(experts)}"
    state = _full(model)
    assert state.keys() == oracle.keys()
    for k, v in oracle.items():
        assert torch.equal(state[k], v), f"rank {rank}: {k}"
    # an expert that does not fit: every rank refuses alike, nobody writes
    fresh = _sharded_mixtral(mesh)
    before = _full(fresh)
    with pytest.raises(surgery.LoadError, match="experts.gate_up_proj") as err:
        surgery.load_partial(fresh, tmp / "broken")
    assert not isinstance(err.value, surgery.DistributedError)  # the same error on each rank
    after = _full(fresh)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.distributed
def test_fsdp_two_ranks_mixtral(tmp_path, monkeypatch):
    torch.manual_seed(0)
    src = hf.tiny_mixtral()
    folder = hf.save_pretrained(src, tmp_path / "folder", "20KB")
    torch.save(hf.from_pretrained(src, folder), tmp_path / "oracle.pt")
    broken = hf.save_pretrained(src, tmp_path / "broken")
    tensors = load_file(broken / "model.safetensors")
    key = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    tensors[key] = tensors[key][:10].clone()
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    spawn(case_fsdp_mixtral, 2, tmp_path, monkeypatch, TIMEOUT_S)
