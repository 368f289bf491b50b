"""Compatibility names: the load report lives in :mod:`surgery.loading`."""

from __future__ import annotations

from .loading.report import LoadReport, Mismatch

__all__ = ["LoadReport", "Mismatch"]
