"""Compatibility names: hub names resolve inside :mod:`surgery.sources` (``sources/hub.py``)."""

from __future__ import annotations

from .sources.hub import hub_file, is_hub_name

__all__ = ["hub_file", "is_hub_name"]
