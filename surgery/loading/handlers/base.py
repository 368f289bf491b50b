"""The contract every handler keeps, and the records that pass between the steps.

A handler is one kind of plan entry: plain tensor copies and ties, adapted tensors, modules
that load themselves, converters that read several checkpoint tensors into one.
The pipeline calls each handler at four points, always in this order:

1. :meth:`Handler.plan` while planning: claim checkpoint keys (``model key -> checkpoint
   key``) and plan them as entries; the keys not claimed go on to the next handler.
2. :meth:`Handler.owns`: which entries of a checked plan are the handler's.
3. :meth:`Handler.prepare` before anything is written: read and compute everything its
   entries need, raise on any problem. Its tensor writes come back as :class:`Write` records.
4. :meth:`Handler.commit`, after the placement's writer carried out every handler's
   :class:`Write` records: writes that are not tensor copies (a module's own loading).

Handlers never see a placement's type or a source's class: a writer and a source are used
through their protocols only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

from ...keys.conversions import Conversions, Group
from ...sources import CheckpointSource
from ..check import CheckedPlan
from ..entries import PlanEntry
from ..plan import Adapter
from ..units import Index, Rehearsal

__all__ = [
    "Claimed",
    "Commit",
    "Handler",
    "Job",
    "PlanContext",
    "Prepared",
    "Region",
    "Write",
    "Writer",
]


@dataclass(frozen=True)
class PlanContext:
    """What planning knows, computed once and shared by every handler.

    ``plain`` is ``state`` without the tensors of modules that load themselves; ``skipped``
    the model keys ``skip=`` names; ``adapter`` the ``on_mismatch`` callable (or ``None``);
    ``sharded``: the model's tensors are DTensors (a placement that cannot run a module's
    own loading); ``conversions``/``groups``: a transformers model's conversion mapping and
    the checkpoint names its converters gather (:mod:`surgery.keys.conversions`).
    """

    model: nn.Module
    model_name: str
    state: Mapping[str, Any]
    plain: Mapping[str, Tensor]
    source: CheckpointSource
    skipped: set[str]
    dropped: Sequence[str]
    adapter: Adapter | None
    units: Index
    sharded: bool
    tied: bool  # some tensor of ``plain`` sits under several keys
    conversions: Conversions | None = None  # a transformers model's conversion mapping
    groups: Mapping[str, Group] = field(default_factory=dict)  # names its converters gather

    @property
    def converted(self) -> set[str]:
        """Model keys a conversion group goes to (its handler plans them, skipped or not)."""
        return {k for g in self.groups.values() for ks in g.outputs.values() for k in ks}


@dataclass
class Claimed:
    """What a handler's :meth:`Handler.plan` returns: the names it left for the handlers after
    it (``model key -> checkpoint key``), its entries and notes. ``at``/``writer`` index its
    entries (model key -> position; id(model tensor) -> the entry writing it) for the check,
    when the handler built them anyway (the plain copies do)."""

    rest: dict[str, str]
    entries: list[PlanEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    at: dict[str, int] | None = None
    writer: dict[int, PlanEntry] | None = None
    rehearsals: dict[str, Rehearsal] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Region:
    """Where a checkpoint tensor lands inside a model tensor: row ``index`` of its first
    dimension, narrowed along ``dim`` of that row to ``[start, start + length)`` when ``dim``
    is set (one expert's ``w1`` in a stacked ``gate_up_proj``).

    Example:
        >>> import torch
        >>> Region(1, 0, 2, 2).of(torch.arange(12).reshape(2, 6)).tolist()
        [8, 9]
        >>> Region(1, 0, 2, 2).box((2, 6))
        ((1, 2), (1, 2))
    """

    index: int
    dim: int | None = None
    start: int = 0
    length: int = 0

    def of(self, t: Tensor) -> Tensor:
        """The view of ``t`` the region names (the checkpoint tensor's shape)."""
        row = t.select(0, self.index)
        return row if self.dim is None else row.narrow(self.dim, self.start, self.length)

    def box(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(offset, extent)`` of the region in a model tensor of ``shape``."""
        offset, extent = [self.index] + [0] * (len(shape) - 1), [1, *shape[1:]]
        if self.dim is not None:
            offset[self.dim + 1], extent[self.dim + 1] = self.start, self.length
        return tuple(offset), tuple(extent)


@dataclass(frozen=True, slots=True)
class Write:
    """One tensor write the placement's writer carries out at commit.

    ``target`` is the model's tensor (as ``state_dict(keep_vars=True)`` holds it); ``value``
    a prepared tensor of its shape (an adapter's output), or ``None`` to read ``ckpt_key``
    from the source straight into the target, or into its ``region`` when one is given.
    """

    key: str
    target: Tensor
    ckpt_key: str
    value: Tensor | None = None
    region: Region | None = None


@dataclass(frozen=True)
class Commit:
    """What a placement's writer is made for: the model's state, the open source, whether to
    show progress, the meta modules to initialise (``None``: nothing is on ``meta``) and
    whether each write's value is put in place of its target (``assign=True``) rather than
    copied into it."""

    state: Mapping[str, Any]
    source: CheckpointSource
    progress: bool | None
    initialise: tuple[list[nn.Module], list[str]] | None
    assign: bool = False


class Writer(Protocol):
    """What a placement's writer offers handlers at commit."""

    def write(self, writes: Sequence[Write]) -> None: ...

    def materialise(self, module: nn.Module) -> None: ...


@dataclass(frozen=True)
class Job:
    """One load at its prepare step: the checked plan, the open source, the model's state, the
    adapter (wrapped by the placement), whether the plan was made from this very source, and
    whether the load assigns (``assign=True``: checkpoint tensors may be taken as they lie in
    the file's mapping, :meth:`~surgery.sources.CheckpointSource.mapped`, instead of read)."""

    checked: CheckedPlan
    source: CheckpointSource
    model: nn.Module
    adapter: Adapter | None
    planned_here: bool
    assign: bool = False

    @property
    def state(self) -> Mapping[str, Any]:
        return self.checked.state


@dataclass
class Prepared:
    """A handler's prepared part of a load: its tensor writes, the model keys whose adapter
    declined (``None``: a mismatch after all), and whatever its commit needs."""

    writes: list[Write] = field(default_factory=list)
    declined: set[str] = field(default_factory=set)
    later: Any = None


class Handler:
    """Base class: claims nothing, owns nothing, prepares nothing."""

    name = "handler"

    def plan(self, ctx: PlanContext, names: dict[str, str]) -> Claimed:
        return Claimed(names)

    def owns(self, entry: PlanEntry) -> bool:
        return False

    def prepare(self, job: Job) -> Prepared:
        return Prepared()

    def commit(self, prepared: Prepared, writer: Writer) -> None:
        """Writes beyond :class:`Write` records (their writer has run already)."""
