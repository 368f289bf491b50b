"""Placements: where a model's tensors live, and the one writer that puts values there.

A placement is chosen once per load from the model (:func:`placement_for`): tensors in local
memory (CPU, a GPU, or ``meta`` to be materialised) or sharded as DTensors over ranks. It
checks what depends on where tensors go (a device, memory for a meta model, allocated
shards), tells the planner whether modules may load themselves there, gives the adapter its
view of a target, names the coordinator the ranks agree through, and makes the writer: the
only code that writes into the model, called only from commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .local import LocalPlacement
from .sharded import ShardedPlacement, is_sharded

__all__ = ["LocalPlacement", "ShardedPlacement", "is_sharded", "placement_for"]


def placement_for(
    model: nn.Module,
    state: Mapping[str, Any],
    device: str | torch.device | None,
    assign: bool = False,
) -> LocalPlacement | ShardedPlacement:
    """The placement of ``model``: sharded when any tensor is a ``DTensor``, else local
    (``device`` places a meta model, ``assign`` puts the checkpoint's tensors in place of the
    model's; both checked now, before anything is read)."""
    if is_sharded(model):  # DTensor parameters (FSDP2, tensor parallel): on every rank
        return ShardedPlacement(model, state, device, assign)
    return LocalPlacement(model, state, device, assign)
