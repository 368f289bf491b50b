"""read_checkpoint: every form, unwrapping, pickle safety, and clear errors on bad files."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

import surgery
from surgery import CheckpointError, UnsafeCheckpointError

from support import SmallCNN, assert_same_state, snapshot


@pytest.fixture()
def cnn_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return SmallCNN().state_dict()


def test_plain_state_dict_round_trip(tmp_path, cnn_sd):
    torch.save(cnn_sd, tmp_path / "a.pt")
    for mmap in (True, False):
        out = surgery.read_checkpoint(tmp_path / "a.pt", mmap=mmap)
        assert out.keys() == cnn_sd.keys()
        assert all(torch.equal(out[k], cnn_sd[k]) for k in cnn_sd)


def test_entry_picks_an_entry_and_dotted_nesting(tmp_path, cnn_sd):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in cnn_sd.items()}
    torch.save({"model": cnn_sd, "ema": ema, "extra": {"inner": ema}}, tmp_path / "c.pth")
    assert torch.equal(surgery.read_checkpoint(tmp_path / "c.pth")["fc.bias"], cnn_sd["fc.bias"])
    picked = surgery.read_checkpoint(tmp_path / "c.pth", entry="ema")
    assert torch.equal(picked["fc.bias"], ema["fc.bias"])
    nested = surgery.read_checkpoint(tmp_path / "c.pth", entry="extra.inner")
    assert torch.equal(nested["fc.bias"], ema["fc.bias"])
    with pytest.raises(CheckpointError, match=r"no entry 'emma'.*'model'.*'ema'"):
        surgery.read_checkpoint(tmp_path / "c.pth", entry="emma")


def test_ambiguous_tensor_dicts_ask_for_entry(tmp_path, cnn_sd):
    torch.save({"student": cnn_sd, "teacher": cnn_sd, "epoch": 3}, tmp_path / "kd.pth")
    with pytest.raises(CheckpointError) as e:
        surgery.read_checkpoint(tmp_path / "kd.pth")
    assert "'student'" in str(e.value) and "'teacher'" in str(e.value) and "entry=" in str(e.value)
    assert surgery.read_checkpoint(tmp_path / "kd.pth", entry="teacher").keys() == cnn_sd.keys()


def test_nested_wrappers_are_unwrapped(tmp_path, cnn_sd):
    torch.save({"model": {"module": cnn_sd}, "epoch": 1}, tmp_path / "n.pth")
    assert surgery.read_checkpoint(tmp_path / "n.pth").keys() == cnn_sd.keys()


def test_in_memory_module_and_mapping(cnn_sd):
    model = SmallCNN()
    assert surgery.read_checkpoint(model).keys() == model.state_dict().keys()
    assert surgery.read_checkpoint({"state_dict": cnn_sd}).keys() == cnn_sd.keys()


def test_folder_with_one_checkpoint_and_with_several(tmp_path, cnn_sd):
    save_file(cnn_sd, str(tmp_path / "model.safetensors"))
    torch.save(cnn_sd, tmp_path / "pytorch_model.bin")  # safetensors preferred
    assert surgery.read_checkpoint(tmp_path).keys() == cnn_sd.keys()
    other = tmp_path / "two"
    other.mkdir()
    torch.save(cnn_sd, other / "a.pth")
    torch.save(cnn_sd, other / "b.pth")
    with pytest.raises(CheckpointError, match=r"several checkpoints \(a.pth, b.pth\)"):
        surgery.read_checkpoint(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        surgery.read_checkpoint(tmp_path / "empty")


def test_missing_file_and_missing_shard(tmp_path, cnn_sd):
    with pytest.raises(CheckpointError, match="does not exist"):
        surgery.read_checkpoint(tmp_path / "nope.pth")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"fc.bias": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        surgery.read_checkpoint(index)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)


def _load_into_fresh_cnn(path, **kw):
    model = SmallCNN()
    snap = snapshot(model)
    with pytest.raises(CheckpointError) as e:
        surgery.load_partial(model, path, **kw)
    assert_same_state(model, snap)
    return str(e.value)


def test_pickled_model_refused_without_trust_pickle(tmp_path):
    net = Net()
    torch.save(net, tmp_path / "whole.pt")
    msg = _load_into_fresh_cnn(tmp_path / "whole.pt")
    assert "Net" in msg and "trust_pickle=True" in msg
    with pytest.raises(UnsafeCheckpointError):
        surgery.read_checkpoint(tmp_path / "whole.pt")
    sd = surgery.read_checkpoint(tmp_path / "whole.pt", trust_pickle=True)
    assert torch.equal(sd["fc.weight"], net.fc.weight)


def test_pickled_model_whose_class_is_gone(tmp_path, monkeypatch):
    ghost = types.ModuleType("ghost_models")

    class Ghost(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

    Ghost.__module__ = "ghost_models"
    Ghost.__qualname__ = "Ghost"
    ghost.Ghost = Ghost
    monkeypatch.setitem(sys.modules, "ghost_models", ghost)
    torch.save(Ghost(), tmp_path / "ghost.pt")
    del ghost.Ghost  # the classic "Can't get attribute 'Ghost'"
    msg = _load_into_fresh_cnn(tmp_path / "ghost.pt", trust_pickle=True)
    assert "Ghost" in msg and "import" in msg and "state_dict()" in msg
    monkeypatch.delitem(sys.modules, "ghost_models")  # the module itself missing
    msg = _load_into_fresh_cnn(tmp_path / "ghost.pt", trust_pickle=True)
    assert "ghost_models" in msg


def test_corrupt_and_truncated_files(tmp_path, cnn_sd):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint at all" * 10)
    assert "junk.pth" in _load_into_fresh_cnn(tmp_path / "junk.pth")

    torch.save(cnn_sd, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert "truncated" in _load_into_fresh_cnn(tmp_path / "cut.pth")

    save_file(cnn_sd, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    assert "cut.safetensors" in _load_into_fresh_cnn(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    assert "junk.safetensors" in _load_into_fresh_cnn(tmp_path / "junk.safetensors")


def test_non_tensor_values_are_named(tmp_path, cnn_sd):
    bad = dict(cnn_sd)
    bad["fc.bias"] = [0.0, 1.0]
    torch.save(bad, tmp_path / "bad.pth")
    msg = _load_into_fresh_cnn(tmp_path / "bad.pth")
    assert "'fc.bias' (list)" in msg
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta_only.pth")
    assert "no tensors" in _load_into_fresh_cnn(tmp_path / "meta_only.pth")


def test_unknown_source_type():
    with pytest.raises(CheckpointError, match="cannot read a checkpoint from a int"):
        surgery.read_checkpoint(3)
