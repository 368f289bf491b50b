"""The source protocol: what every checkpoint reader offers the loader.

A *source* knows its tensor names with shapes and dtypes (``specs``, from file headers, no
tensor data touched) and reads one tensor at a time: ``read(key)`` returns it,
``read_into(key, out)`` fills a destination, straight from the file when the layout allows.
The loader plans on ``specs`` alone, so tensors it skips are never read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CheckpointLike", "CheckpointSource"]

CheckpointLike = str | os.PathLike | Mapping[str, Any] | nn.Module


class CheckpointSource:
    """Tensor names with shapes/dtypes, readable one at a time.

    ``specs`` maps each key to ``(shape, dtype)`` without reading data. ``read(key)`` returns a
    tensor (possibly a lazy memory-mapped view); ``read_into(key, out)`` fills ``out`` (same
    shape, any dtype/device) holding at most one temporary; ``close()`` releases files
    (tensors already read stay valid). Data attributes say where the tensors came from:
    ``description`` (file or object), ``files`` (key -> the file it is read from, where that is
    not ``description``: a sharded checkpoint's shards), ``notes``, ``container`` (the entries
    the state dict sat under, e.g. ``['state_dict']``) and ``other_entries`` (the top-level
    entries beside it); ``extras`` and ``metadata`` hold what a state dict keeps beside tensors
    (extra states, packed weights; torch's per-module versions).

    A subclass implements ``read``; one that can fill ``out`` without a temporary (bytes at a
    known file offset) overrides the hook ``_read_into``. A source that wraps others delegates
    to their public ``read``/``read_into``.

    Example:
        >>> import torch
        >>> from surgery.sources import open_source
        >>> src = open_source({"w": torch.ones(2)})
        >>> src.specs
        {'w': (torch.Size([2]), torch.float32)}
        >>> out = torch.zeros(2, dtype=torch.float16)
        >>> src.read_into("w", out); out
        tensor([1., 1.], dtype=torch.float16)
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self.specs: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self.files: dict[str, str] = {}
        self.notes: list[str] = []
        self.unreadable: dict[str, str] = {}
        self.container: list[str] = []
        self.other_entries: list[str] = []
        # What a torch state dict holds beside tensors, for modules that load themselves:
        # non-tensor entries (a dynamically quantized Linear's packed weights and dtype, a
        # dict extra state) and the per-module versions torch keeps in ``_metadata``.
        self.extras: dict[str, Any] = {}
        self.metadata: dict[str, dict] | None = None

    def read(self, key: str) -> Tensor:
        """Tensor ``key`` (a lazy view of the file where the format allows)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement read()")

    def read_into(self, key: str, out: Tensor) -> None:
        """Copy tensor ``key`` into ``out`` (which has its shape), holding at most one temp."""
        if out.numel() == 0:
            return
        self._read_into(key, out)

    def _read_into(self, key: str, out: Tensor) -> None:
        out.copy_(self.read(key))

    def close(self) -> None:
        """Release file handles and mappings (tensors already read stay valid)."""
