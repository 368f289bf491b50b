"""Compatibility names: ``load_partial`` lives in :mod:`surgery.loading`."""

from __future__ import annotations

from .loading.pipeline import load_partial

__all__ = ["load_partial"]
