"""Checkpoint sources: every common checkpoint form, read lazily, one concern per module.

- ``base``: the source protocol (``specs``, ``read``, ``read_into``, ``close``).
- ``reading``: ``open_source`` / ``read_checkpoint``, picking a reader for a file.
- ``torchfile``: ``torch.save`` files and raw pickles as a source, tensors read by byte offset.
- ``torchformat``: reading the zip, legacy and raw-pickle layouts without ``torch.load``.
- ``torchglobals``: what their pickles may name (tensors rebuilt with every bound checked).
- ``unpickler``: the one restricted unpickler (an allow-list; nothing a file names runs).
- ``safetensors``: ``.safetensors`` files, header parsed once.
- ``sharded``: ``*.index.json`` and folders.
- ``dcp``: ``torch.distributed.checkpoint`` folders, planned from ``.metadata``.
- ``dcp_metadata``: a DCP ``.metadata`` unpickled with an allow-list and checked field by field.
- ``dcp_files``: a DCP folder's data files, every chunk checked before the first read.
- ``memory``: in-memory dicts and modules.
- ``unwrap``: finding the state dict in a training checkpoint (pure functions).
- ``pickle_safety``: the trusted path (``trust_pickle=True``): ``torch.load``, classified.
- ``filebytes``: reading bytes at an offset straight into a tensor.
"""

from __future__ import annotations

from .base import CheckpointLike, CheckpointSource
from .reading import open_source, read_checkpoint

__all__ = ["CheckpointLike", "CheckpointSource", "open_source", "read_checkpoint"]
