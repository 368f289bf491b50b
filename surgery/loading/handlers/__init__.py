"""Handlers: each kind of plan entry, with the same small contract (see :mod:`.base`).

:data:`HANDLERS` lists them in the order they claim names while planning: modules that load
themselves take the names under them first, adapted tensors claim nothing while planning (the
plain copies plan ``adapt`` for shapes that differ when an adapter is given), plain copies and
ties take what is left. Tensors a transformers model's converters make from several checkpoint
tensors (:mod:`.converted`) are planned from the groups the key mapping gathered, before the
plain copies.
"""

from __future__ import annotations

from .adapted import Adapted, adapter_notes
from .base import Claimed, Commit, Handler, Job, PlanContext, Prepared, Region, Write, Writer
from .converted import Converted
from .copies import Copies
from .selfloading import SelfLoading

__all__ = [
    "HANDLERS",
    "Adapted",
    "Claimed",
    "Commit",
    "Converted",
    "Copies",
    "Handler",
    "Job",
    "PlanContext",
    "Prepared",
    "Region",
    "SelfLoading",
    "Write",
    "Writer",
    "adapter_notes",
]

HANDLERS: tuple[Handler, ...] = (SelfLoading(), Adapted(), Converted(), Copies())
