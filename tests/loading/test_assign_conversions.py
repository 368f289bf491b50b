"""assign=True and the parallel copy path with transformers conversions: per-expert checkpoint
tensors read into regions of one stacked model tensor.

The oracle is transformers itself: ``from_pretrained`` of the folder ``save_pretrained`` wrote.
"""

from __future__ import annotations

import pytest
import torch

import surgery
from surgery.sources import parallel

pytest.importorskip("transformers")
pytest.importorskip("transformers.core_model_loading")  # transformers 5

from support import hf

NAMES = ["mixtral", "qwen2_moe", "vit"]


def _folder(tmp_path, name: str, shard: str | None):
    torch.manual_seed(0)
    src = hf.BUILDERS[name]()
    return src, hf.save_pretrained(src, tmp_path / name, shard)


def _fresh(name: str, meta: bool):
    torch.manual_seed(1)
    if meta:
        with surgery.empty_init():
            return hf.BUILDERS[name]()
    return hf.BUILDERS[name]()


def _assert_equal(model, oracle: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == oracle.keys()
    for k, v in oracle.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


@pytest.mark.parametrize("meta", [False, True], ids=["built", "empty_init"])
@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
@pytest.mark.parametrize("name", NAMES)
def test_assign_equals_from_pretrained(tmp_path, name, shard, meta):
    src, folder = _folder(tmp_path, name, shard)
    model = _fresh(name, meta)
    report = surgery.load_partial(model, folder, assign=True)
    assert report.ok and report.tensors_loaded == report.tensors_total, report
    _assert_equal(model, hf.from_pretrained(src, folder))
    stacked = [p for n, p in model.named_parameters() if n.endswith("experts.gate_up_proj")]
    for p in stacked:  # one new tensor per stacked parameter, each its own memory
        assert p.is_contiguous() and p.untyped_storage().nbytes() == p.nbytes


@pytest.mark.parametrize("meta", [False, True], ids=["built", "empty_init"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_parallel_regions_equal_serial_and_from_pretrained(tmp_path, monkeypatch, name, meta):
    src, folder = _folder(tmp_path, name, "20KB")
    oracle = hf.from_pretrained(src, folder)
    for threads in ("1", "4"):
        monkeypatch.setenv(parallel.ENV, threads)
        model = _fresh(name, meta)
        assert surgery.load_partial(model, folder).ok
        _assert_equal(model, oracle)
