"""Following one ``load_partial(model, "ckpt.pth")``: each fact of the load is computed once.

The pipeline finds the model's self-loading units, its PEFT view, the copies the source cannot
give, the written set, the meta modules to initialise and each unit's rehearsal once, in the
step that owns it, and hands them down in the checked plan; nothing recomputes them. Every
module of ``surgery`` that holds one of these functions gets a counting wrapper (a function
imported by name into two modules is counted in both), then one load runs.

Oracle for the values: plain ``torch.load`` + ``load_state_dict`` of the same file.
"""

from __future__ import annotations

import collections
import functools
import sys

import pytest
import torch
from torch import nn

import surgery
from surgery.keys import peft
from surgery.loading import check, units, verify

from support import Renaming, SmallCNN

COUNTED = {
    "find_units": units.find_units,
    "peft_view": peft.peft_view,
    "copy_problems": verify.copy_problems,
    "written_ids": check.written_ids,
    "meta_to_initialise": check.meta_to_initialise,
    "rehearse": units.rehearse,
    "open_source": surgery.sources.open_source,
}


@pytest.fixture()
def calls(monkeypatch) -> collections.Counter:
    """How often each function of ``COUNTED`` runs, wherever it is called from."""
    counter: collections.Counter = collections.Counter()

    def counting(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            counter[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    patched = 0
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("surgery"):
            continue
        for name, fn in COUNTED.items():
            if getattr(module, name, None) is fn:
                monkeypatch.setattr(module, name, counting(name, fn))
                patched += 1
    assert patched >= len(COUNTED)
    return counter


class WithUnit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.part = Renaming()  # loads itself: renames its old keys
        self.head = nn.Linear(2, 4)


def _oracle(model_cls, path) -> dict[str, torch.Tensor]:
    model = model_cls()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.state_dict()


def _assert_equal_states(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_plain_load_computes_each_fact_once(tmp_path, calls):
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pth"
    torch.save(SmallCNN().state_dict(), path)
    model = SmallCNN()
    report = surgery.load_partial(model, str(path))
    assert report.ok
    _assert_equal_states(model.state_dict(), _oracle(SmallCNN, path))
    assert calls == {
        "open_source": 1,
        "find_units": 1,
        "peft_view": 1,
        "copy_problems": 1,
        "written_ids": 1,
    }


def test_a_meta_model_finds_what_to_initialise_once(tmp_path, calls):
    torch.manual_seed(0)
    saved = SmallCNN()
    state = {k: v for k, v in saved.state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    with surgery.empty_init():
        model = SmallCNN()
    report = surgery.load_partial(model, str(path))
    assert sorted(report.initialised) == ["fc.bias", "fc.weight"]
    for k, v in state.items():  # oracle: the saved tensors themselves
        assert torch.equal(model.state_dict()[k], v), k
    assert not any(t.is_meta for t in model.state_dict().values())
    assert calls["meta_to_initialise"] == 1
    assert calls["find_units"] == calls["peft_view"] == calls["written_ids"] == 1


def test_a_self_loading_unit_is_rehearsed_once(tmp_path, calls):
    torch.manual_seed(0)
    saved = WithUnit()
    sd = {k.replace("part.lin.", "part.old."): v for k, v in saved.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    model = WithUnit()
    report = surgery.load_partial(model, str(path))
    assert report.ok
    _assert_equal_states(model.state_dict(), saved.state_dict())  # oracle: load_state_dict
    want = WithUnit()
    want.load_state_dict(torch.load(path, weights_only=True))
    _assert_equal_states(model.state_dict(), want.state_dict())
    assert calls["rehearse"] == 1
    assert calls["find_units"] == calls["peft_view"] == calls["written_ids"] == 1
