"""The values you asked for, or an error (issue 19): non-tensor values in a state dict, tied
parameters, PEFT-wrapped models, and counts that agree with themselves.

Every value is compared with an oracle: plain ``torch.load`` + the entry +
``load_state_dict(strict=False)`` on the same checkpoint.
"""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import SmallCNN, assert_same_state, snapshot
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery import LoadError
from surgery._keymap import detect_prefix

# --------------------------------------------------------------------------- non-tensor values


def _with_version(kind: str) -> dict:
    """SmallCNN's state dict with one non-tensor value, as a plain dict or an OrderedDict."""
    torch.manual_seed(0)
    sd = SmallCNN().state_dict()  # an OrderedDict keeping torch's _metadata
    if kind == "dict":
        sd = dict(sd)
    elif kind == "OrderedDict":
        sd = collections.OrderedDict(sd)  # no _metadata
    sd["version"] = 2
    return sd


def _oracle(sd: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """What torch's load_state_dict(strict=False) puts in a fresh model, and its unexpected keys."""
    torch.manual_seed(1)
    model = SmallCNN()
    result = model.load_state_dict(sd, strict=False)
    return model.state_dict(), list(result.unexpected_keys)


@pytest.mark.parametrize("kind", ["dict", "OrderedDict", "state_dict"])
@pytest.mark.parametrize("where", ["memory", "zip", "legacy"])
@pytest.mark.parametrize("entry", [None, "state_dict", "flat"])
def test_non_tensor_value_in_a_state_dict_is_an_unexpected_key(tmp_path, kind, where, entry):
    sd = _with_version(kind)
    ckpt: object = sd if entry == "flat" else {"state_dict": sd, "epoch": 3}
    if where != "memory":
        path = tmp_path / "ckpt.pth"
        torch.save(ckpt, path, _use_new_zipfile_serialization=where == "zip")
        ckpt = path
    expected, unexpected = _oracle(sd)
    torch.manual_seed(1)
    model = SmallCNN()
    entry_arg = None if entry == "flat" else entry
    plan = surgery.plan_load(model, ckpt, entry=entry_arg)
    assert [e.key for e in plan.find(action="unexpected")] == unexpected == ["version"]
    report = plan.apply(model)
    assert report.unexpected == unexpected and not report.ok  # strict=True would refuse
    assert report.tensors_loaded == report.tensors_total
    for k, v in expected.items():
        assert torch.equal(model.state_dict()[k], v), k
    fresh = SmallCNN()
    before = snapshot(fresh)
    with pytest.raises(LoadError, match="version"):
        surgery.load_partial(fresh, ckpt, entry=entry_arg, strict=True)
    assert_same_state(fresh, before)


def test_training_statistics_beside_the_weights_are_not_a_second_model():
    """A dict of statistics holding one tensor is not taken for a state dict beside 'student'."""
    sd = SmallCNN().state_dict()
    ckpt = {"student": sd, "stats": {"best_acc": torch.tensor(0.7), "epoch": 3, "arch": "cnn"}}
    model = SmallCNN()
    report = surgery.load_partial(model, ckpt)
    assert report.source == "<dict>['student']" and report.ok
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


# --------------------------------------------------------------------------- prefixes and PEFT


class TwoLayer(nn.Module):
    """fc1 and head of different shapes: a LoRA on fc1 makes their wrapped names differ."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(x)))


def test_prefix_readings_count_only_pairs_whose_shapes_agree():
    ckpt = {"fc1.weight": (16, 8), "fc1.bias": (16,)}
    model = {"m.fc1.weight": (16, 8), "m.fc1.bias": (16,), "m.head.weight": (3, 16)}
    model["m.head.bias"] = (3,)
    # By names alone, "add m." and "fc1. -> m.head." pair two keys each: a tie.
    with pytest.raises(surgery.PrefixTieError):
        detect_prefix(ckpt, set(model))
    assert detect_prefix(ckpt, set(model), lambda c, m: ckpt[c] == model[m]) == ("", "m.")


@pytest.mark.parametrize("form", ["dict", "safetensors", "pth"])
def test_base_checkpoint_into_a_peft_model_with_one_lora_layer(tmp_path, form):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    sd = TwoLayer().state_dict()
    ckpt: object = sd
    if form == "safetensors":
        ckpt = tmp_path / "base.safetensors"
        save_file(sd, ckpt)
    elif form == "pth":
        ckpt = tmp_path / "base.pth"
        torch.save(sd, ckpt)
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(TwoLayer(), peft.LoraConfig(target_modules=["fc1"], r=2))
    lora = {k: v.clone() for k, v in wrapped.state_dict().items() if "lora_" in k}
    report = surgery.load_partial(wrapped, ckpt, strict=True)
    assert report.ok and sorted(report.adapter) == sorted(lora)
    # Oracle: plain torch into the unwrapped base model; the wrapper with its adapters
    # disabled computes the same function, and the LoRA weights are left as they were.
    oracle = TwoLayer()
    oracle.load_state_dict(sd)
    x = torch.randn(5, 8)
    with wrapped.disable_adapter():
        assert torch.equal(wrapped(x), oracle(x))
    state = wrapped.state_dict()
    assert all(torch.equal(state[k], v) for k, v in lora.items())
    assert torch.equal(state["base_model.model.fc1.base_layer.weight"], sd["fc1.weight"])
    assert torch.equal(state["base_model.model.head.weight"], sd["head.weight"])
