"""Optimizer parameter groups as a table: name, tensors, parameters, lr and weight decay.

:func:`describe_groups` reads the groups of an optimizer (or the list :func:`param_groups`
builds) without touching them; :mod:`surgery.optim` re-exports both names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._table import _Table, format_count
from .errors import UsageError

__all__ = ["GroupRow", "GroupTable", "describe_groups"]


@dataclass
class GroupRow:
    name: str
    tensors: int
    params: int
    lr: float | None
    weight_decay: float | None


@dataclass(repr=False)
class GroupTable(_Table):
    """What :func:`describe_groups` returns: one row per group, printable and notebook-friendly."""

    rows: list[GroupRow]
    notes: list[str] = field(default_factory=list)

    _header = ("group", "tensors", "params", "lr", "weight decay")
    _numeric = (1, 2, 3, 4)

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    def _rows(self) -> list[list[object]]:
        def num(x: float | None) -> str:
            return "default" if x is None else f"{x:.4g}"

        return [
            [r.name, r.tensors, format_count(r.params), num(r.lr), num(r.weight_decay)]
            for r in self.rows
        ]

    def _caption(self) -> str:
        tensors = sum(r.tensors for r in self.rows)
        return (
            f"{len(self.rows)} parameter groups, {tensors} tensors, "
            f"{format_count(self.total_params)} params"
        )

    def _notes(self) -> list[str]:
        return [f"note: {n}" for n in self.notes]


def _checked_groups(groups: object) -> list[Mapping[str, Any]]:
    """``groups`` as a list of dicts whose ``params`` are tensors, else a UsageError."""
    listed = list(groups) if isinstance(groups, (list, tuple)) else None
    for g in listed or ():
        params = g.get("params") if isinstance(g, Mapping) else None
        if isinstance(params, torch.Tensor):
            continue
        if not isinstance(params, (list, tuple)) or not all(
            isinstance(p, torch.Tensor) for p in params
        ):
            listed = None
            break
    if listed is None:
        raise UsageError(
            "describe_groups needs an optimizer or a list of parameter groups (dicts whose "
            f"'params' are tensors, as param_groups() returns) as groups, got "
            f"{type(groups).__name__}"
        )
    return listed


def describe_groups(groups: Sequence[Mapping[str, Any]] | torch.optim.Optimizer) -> GroupTable:
    """A table of group name, tensors, params, lr and weight decay, for groups or an optimizer.

    Notes flag frozen parameters inside a group and a parameter held by two groups.

    Example:
        >>> import torchvision
        >>> from surgery import param_groups
        >>> groups = param_groups(torchvision.models.resnet18(), lr=0.1, weight_decay=1e-4)
        >>> print(describe_groups(groups))  # doctest: +NORMALIZE_WHITESPACE
        2 parameter groups, 62 tensors, 11.7M params
          group             tensors  params  lr   weight decay
          ----------------  -------  ------  ---  ------------
          default           21       11.7M   0.1  0.0001
          default no_decay  41       10.6K   0.1  0
    """
    if isinstance(groups, torch.optim.Optimizer):
        groups = groups.param_groups
    rows, notes = [], []
    owner: dict[int, str] = {}
    for i, g in enumerate(_checked_groups(groups)):
        name = str(g.get("name", f"group {i}"))
        params = g["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        rows.append(
            GroupRow(
                name,
                len(params),
                sum(p.numel() for p in params),
                g.get("lr"),
                g.get("weight_decay"),
            )
        )
        frozen = sum(1 for p in params if not p.requires_grad)
        if frozen:
            notes.append(f"group {name!r} holds {frozen} frozen tensor(s) (requires_grad=False).")
        for p in params:
            if id(p) in owner and owner[id(p)] != name:
                notes.append(f"a parameter is in both group {owner[id(p)]!r} and {name!r}.")
            owner.setdefault(id(p), name)
    return GroupTable(rows, list(dict.fromkeys(notes)))
