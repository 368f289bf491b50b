"""Compatibility names: checkpoint reading lives in :mod:`surgery.sources`."""

from __future__ import annotations

from .sources import CheckpointLike, CheckpointSource, open_source, read_checkpoint

__all__ = ["CheckpointLike", "CheckpointSource", "open_source", "read_checkpoint"]
