"""Snapshots of a model's state, to check that a refused load left it bit-identical."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["assert_same_state", "snapshot"]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of every tensor of the model's state."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    """The model's state holds exactly the snapshot's keys and values (``torch.equal``)."""
    state = model.state_dict()
    assert state.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(state[k], v), f"{k} changed"
