"""A load's options, checked once and bundled into one frozen object.

Every step reads the options from one :class:`LoadOptions` instead of a dozen arguments
threaded through. Every argument problem is a ``UsageError`` before any work. A new option
(``assign=True``, for instance) is one field here and one check.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .. import _progress
from .._args import require_module
from ..errors import UsageError
from ..keys.remap import Remap
from ..keys.select import Selector
from ..sources import CheckpointLike, CheckpointSource, open_source
from .plan import Adapter

__all__ = ["LoadOptions", "OnMismatch", "check_args"]

OnMismatch = Literal["skip", "error"] | Adapter


@dataclass(frozen=True)
class LoadOptions:
    """The options of one load (see :func:`surgery.load_partial` for each)."""

    entry: str | None = None
    remap: Remap | None = None
    prefix: Literal["auto"] | None = "auto"
    skip: Selector | Iterable[Selector] | None = None
    on_mismatch: OnMismatch = "skip"
    strict: bool = False
    trust_pickle: bool = False
    allow_globals: Iterable[Any] | None = None
    dry_run: bool = False
    progress: bool | None = None
    device: str | torch.device | None = None
    assign: bool = False

    @property
    def adapter(self) -> Adapter | None:
        """The ``on_mismatch`` callable, or ``None`` for ``"skip"`` / ``"error"``."""
        return self.on_mismatch if callable(self.on_mismatch) else None

    def open(self, ckpt: CheckpointLike) -> CheckpointSource:
        """``ckpt`` opened as a source the way these options read it."""
        return open_source(
            ckpt, entry=self.entry, trust_pickle=self.trust_pickle, allow_globals=self.allow_globals
        )


def load_options(model: Any, fn: str, **options: Any) -> LoadOptions:
    """``options`` checked (as :func:`check_args` and the loading flags) and bundled."""
    check_args(
        model,
        options.get("entry"),
        options.get("prefix", "auto"),
        options.get("on_mismatch", "skip"),
        options.get("strict", False),
        options.get("trust_pickle", False),
        fn,
    )
    for flag in ("dry_run", "assign"):
        if not isinstance(options.get(flag, False), bool):
            raise UsageError(f"{flag} must be True or False, not {options[flag]!r}")
    _progress.check(options.get("progress"))
    return LoadOptions(**options)


def check_args(
    model: Any,
    entry: Any,
    prefix: Any,
    on_mismatch: Any,
    strict: Any,
    trust_pickle: Any,
    fn: str,
) -> None:
    """Every argument problem as a ``UsageError`` before any work (no bare TypeError later)."""
    require_module(model, fn)
    if entry is not None and not isinstance(entry, str):
        raise UsageError(
            f"entry must be the name of the checkpoint entry holding the state dict (e.g. "
            f"'state_dict_ema', dotted for nesting) or None, not {entry!r}"
        )
    if not (isinstance(prefix, str) and prefix == "auto") and prefix is not None:
        raise UsageError(f"prefix must be 'auto' or None, not {prefix!r}")
    if not (
        (isinstance(on_mismatch, str) and on_mismatch in ("skip", "error"))
        or (callable(on_mismatch) and not isinstance(on_mismatch, (str, type)))
    ):
        raise UsageError(
            f"on_mismatch must be 'skip', 'error' or a callable (name, ckpt, model) -> Tensor, "
            f"not {on_mismatch!r}"
        )
    for name, value in (("strict", strict), ("trust_pickle", trust_pickle)):
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be True or False, not {value!r}")


def adapter_name(adapter: Adapter) -> str:
    return getattr(adapter, "__name__", None) or type(adapter).__name__
