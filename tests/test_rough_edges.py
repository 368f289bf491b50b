"""The rough edges a newcomer hit (issue 24), each reproduced and checked against an oracle:
plain torch for values, the message a user needs for text."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torchvision
from torch import nn

import surgery

# --------------------------------------------------------------------------- verify


def _tiny_vit() -> torchvision.models.VisionTransformer:
    # torchvision's ViT zero-initialises its head: every output is 0 whatever the body holds
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16
    )


def test_verify_flags_outputs_that_carry_no_information():
    torch.manual_seed(0)
    src, model = _tiny_vit(), _tiny_vit()  # the model's body never loaded the source's
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = src.eval()(x), model.eval()(x)
    assert torch.equal(a, torch.zeros(2, 1000)) and torch.equal(b, a)  # the oracle: all zeros
    with pytest.warns(UserWarning, match="both outputs are constant") as caught:
        d = surgery.verify(src, model, x)
    assert len(caught) == 1
    assert d == 0.0 and isinstance(d, float)  # compares as the old float did
    assert not d.informative and d.constant == ("source", "model")
    assert "outputs are constant" in repr(d) and "says nothing" in str(d)
    assert f"{d:.1e}" == "0.0e+00"  # a format spec still formats the number
    assert pickle.loads(pickle.dumps(d)) == d and not pickle.loads(pickle.dumps(d)).informative
    # features before the head do depend on the body: compared there, the models differ
    src.heads, model.heads = nn.Identity(), nn.Identity()
    with torch.no_grad():
        want = (src(x).double() - model(x).double()).abs().max().item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = surgery.verify(src, model, x)
    assert d == pytest.approx(want) and d > 0.01 and d.informative and d.constant == ()
    assert repr(d) == repr(float(d))


def test_verify_one_constant_side_is_named():
    torch.manual_seed(0)
    src = nn.Linear(4, 3)
    model = nn.Linear(4, 3)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    x = torch.randn(5, 4)
    with torch.no_grad():
        want = src(x).abs().max().item()
    with pytest.warns(UserWarning, match="the model's output is constant"):
        d = surgery.verify(src, model, x)
    assert d == pytest.approx(want) and d.constant == ("model",)
