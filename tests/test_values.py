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

import surgery
from surgery import LoadError

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
