"""Checkpoints as people have them, written by the real libraries (issue 10).

Ties the planner must not break silently (two encoders in one file), and the folders and
files that transformers, accelerate, Lightning, timm and TorchScript write.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SmallCNN, assert_same_state, snapshot
from safetensors.torch import save_file

import surgery
from surgery import PrefixTieError


def _moco(seed: int = 0) -> tuple[dict[str, torch.Tensor], SmallCNN, SmallCNN]:
    """A MoCo-style checkpoint: a query and a key encoder of the same architecture, DDP-wrapped."""
    torch.manual_seed(seed)
    q, k = SmallCNN(), SmallCNN()
    sd = {f"module.encoder_q.{n}": t for n, t in q.state_dict().items()}
    sd.update({f"module.encoder_k.{n}": t for n, t in k.state_dict().items()})
    sd["module.queue"] = torch.randn(16, 8)
    return sd, q, k


def test_two_equally_good_prefixes_refuse_in_pth_and_safetensors(tmp_path):
    sd, q, k = _moco()
    torch.save(sd, tmp_path / "moco.pth")
    save_file(sd, tmp_path / "moco.safetensors")  # sorted keys: encoder_k comes first here
    model = SmallCNN()
    before = snapshot(model)
    for name in ("moco.pth", "moco.safetensors"):
        with pytest.raises(PrefixTieError) as err:
            surgery.load_partial(model, tmp_path / name)
        msg = str(err.value)
        assert "module.encoder_q." in msg and "module.encoder_k." in msg
        assert 'remap=[(r"^module\\.encoder_q\\.", "")]' in msg
        assert "prefix=None" in msg
        assert_same_state(model, before)
    # The remap the message offers picks each encoder, whatever the file's key order.
    for name in ("moco.pth", "moco.safetensors"):
        for which, src in (("q", q), ("k", k)):
            model = SmallCNN()
            surgery.load_partial(
                model, tmp_path / name, remap=[(rf"^module\.encoder_{which}\.", "")]
            )
            assert_same_state(model, snapshot(src))


def test_model_and_ema_prefixes_of_different_length_tie():
    torch.manual_seed(1)
    live, ema = SmallCNN(), SmallCNN()
    sd = {f"model.{n}": t for n, t in live.state_dict().items()}
    sd.update({f"model_ema.{n}": t for n, t in ema.state_dict().items()})
    model = SmallCNN()
    before = snapshot(model)
    with pytest.raises(PrefixTieError, match=r"'model\.'.*\n.*'model_ema\.'"):
        surgery.load_partial(model, sd)
    assert_same_state(model, before)
    surgery.load_partial(model, sd, remap=[(r"^model_ema\.", "")])
    assert_same_state(model, snapshot(ema))


def test_equivalent_rewrites_are_no_tie():
    # 'net.body.' -> 'body.' and 'net.' -> '' pair the same keys: one reading, no error.
    torch.manual_seed(2)
    src = torch.nn.Sequential()
    src.add_module("body", SmallCNN())
    sd = {f"net.{n}": t for n, t in src.state_dict().items()}
    model = torch.nn.Sequential()
    model.add_module("body", SmallCNN())
    report = surgery.load_partial(model, sd)
    assert len(report.loaded) == len(sd)
    assert_same_state(model, snapshot(src))
