"""Compatibility names: the load plan lives in :mod:`surgery.loading`."""

from __future__ import annotations

from .loading.entries import ACTIONS, PlanEntry
from .loading.pipeline import LoadPlan, plan_load

__all__ = ["ACTIONS", "LoadPlan", "PlanEntry", "plan_load"]
