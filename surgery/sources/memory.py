"""Sources over tensors already in memory: a state dict, a training checkpoint dict, a module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .base import CheckpointSource
from .unwrap import unwrap

__all__ = ["MemorySource", "from_mapping", "from_module"]


class MemorySource(CheckpointSource):
    """A flat ``{name: tensor}`` dict served as a source; ``read`` returns the tensor itself.

    Non-tensor entries a module's ``state_dict()`` holds (extra states, packed weights) go to
    ``extras`` and torch's per-module versions to ``metadata``, for modules that load
    themselves.
    """

    def __init__(
        self,
        state: Mapping[str, Any],
        description: str,
        *,
        container: Sequence[str] = (),
        other_entries: Sequence[str] = (),
    ) -> None:
        super().__init__(description)
        for k, v in state.items():
            if not isinstance(k, str):
                what = "a tensor" if isinstance(v, Tensor) else f"a {type(v).__name__}"
                raise CheckpointError(
                    f"{description} has {what} under the key {k!r}, a {type(k).__name__}: "
                    "state dict keys are strings. The file is not a state dict; convert it "
                    "with {str(k): v for k, v in sd.items()} if you trust it."
                )
        tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
        if len(tensors) < len(state):
            # Non-tensor values: a module's own state (handed to it) or unexpected keys.
            self.extras = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
        metadata = getattr(state, "_metadata", None)
        self.metadata = dict(metadata) if isinstance(metadata, Mapping) else None
        self._tensors = tensors
        for k, t in tensors.items():
            shape, why = _spec(t)
            self.specs[k] = (shape, t.dtype)
            if why:
                self.unreadable[k] = why
        self.container = list(container)
        self.other_entries = list(other_entries)

    def read(self, key: str) -> Tensor:
        return self._tensors[key]

    def resident(self, key: str) -> torch.device | None:
        """The device of the tensor itself: it is in memory already."""
        return self._tensors[key].device

    def mapped(self, key: str) -> Tensor | None:
        """The tensor itself (for a torch file read with its mapping, a slice of it), as
        ``load_state_dict(assign=True)`` takes it; ``None`` for one that is not dense."""
        return None if key in self.unreadable else self._tensors[key].detach()

    def shares(self, a: str, b: str) -> bool:
        x, y = self._tensors.get(a), self._tensors.get(b)
        if x is None or y is None:
            return False
        if x is y:
            return True
        if (x.shape, x.dtype, x.layout, x.device) != (y.shape, y.dtype, y.layout, y.device):
            return False
        if x.layout != torch.strided or x.is_meta or x.is_quantized or x.is_nested:
            return False
        if x.numel() == 0:
            return True
        return (
            x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() != 0
            and x.storage_offset() == y.storage_offset()
            and x.stride() == y.stride()
        )


def _spec(t: Tensor) -> tuple[torch.Size, str]:
    """A tensor's shape, and why it cannot be copied into a dense tensor ('' when it can)."""
    if t.is_nested:
        return torch.Size([t.size(0)]), "a nested tensor"
    if t.layout != torch.strided:
        return t.shape, f"a {str(t.layout).removeprefix('torch.')} tensor"
    if t.is_quantized:
        return t.shape, f"a quantized tensor ({str(t.dtype).removeprefix('torch.')})"
    if t.is_meta:
        return t.shape, "a meta tensor (the file holds no data for it)"
    return t.shape, ""


def from_mapping(obj: Mapping, *, entry: str | None = None) -> MemorySource:
    """A source over a state dict or a training-checkpoint dict (unwrapped as a file would be)."""
    found = unwrap(obj, entry, "<dict>")
    return MemorySource(
        found.tensors,
        "<dict>" + found.suffix,
        container=found.container,
        other_entries=found.other_entries,
    )


def from_module(module: nn.Module) -> MemorySource:
    """A source over ``module.state_dict()`` (tensors shared, not copied)."""
    return MemorySource(module.state_dict(keep_vars=False), f"<{type(module).__name__} module>")
