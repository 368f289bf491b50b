"""Compatibility names: applying a plan lives in :mod:`surgery.loading`."""

from __future__ import annotations

from .loading.pipeline import apply_plan

__all__ = ["apply_plan"]
