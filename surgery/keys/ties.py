"""Tied parameters: one model tensor under several keys (an LM head sharing its embedding).

A tied tensor takes its value from one checkpoint tensor. When the checkpoint holds that
tensor under several of the names (one storage, as ``torch.save`` keeps a tied model's state
dict), the other names are planned as aliases (``tied_to``) of the key that carries it. Two
different checkpoint tensors for one tied tensor are a conflict, refused while planning:
which one the model held would depend on the order of the keys. transformers likewise
refuses to tie weights a checkpoint holds with different values.

Plan entries are handled as the dataclasses they are (``dataclasses.replace``): this module
sits below :mod:`surgery.plan` and never imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from torch import Tensor

from ..errors import Advice, Fix, KeyCollisionError

__all__ = ["alias", "conflict_error", "has_ties", "resolve"]


def has_ties(state: Mapping[str, Any]) -> bool:
    """Whether any tensor of the model sits under more than one key."""
    ids = {id(t) for t in state.values() if isinstance(t, Tensor)}
    return len(ids) < sum(isinstance(t, Tensor) for t in state.values())


def alias(carrier: Any, model_key: str, ckpt_key: str | None = None) -> Any:
    """The entry of ``model_key``, tied to ``carrier``'s key: the same action and shapes.

    ``ckpt_key`` is the alias's own checkpoint key when the checkpoint holds the carrier's
    tensor under that name too; by default the carrier's.
    """
    return dataclasses.replace(
        carrier,
        model_key=model_key,
        ckpt_key=carrier.ckpt_key if ckpt_key is None else ckpt_key,
        reason=f"tied to '{carrier.model_key}'",
        tied_to=carrier.model_key,
        via=None,
    )


def resolve(
    entries: list[Any],
    state: Mapping[str, Any],
    writes: Collection[str],
    shares: Callable[[str, str], bool],
    where: tuple[str, str],
) -> None:
    """Plan every tied tensor that several checkpoint keys were paired with, in place.

    Of the entries that write one tensor, the one whose model key comes first in the model
    carries it; each other one whose checkpoint tensor ``shares`` the carrier's becomes its
    alias, any other raises :func:`conflict_error`. An entry that writes nothing (skipped as
    asked, a mismatched shape) stays as it is, its reason naming the carrier; where nothing
    writes the tensor, one checkpoint tensor skipped or mismatched is listed once. ``where`` is
    ``(source description, model name)`` for the message.
    """
    order = {k: i for i, k in enumerate(state)}
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(entries):
        if e.via is not None or e.tied_to or e.action == "unexpected":
            continue
        if e.ckpt_key is None and e.action != "skip":
            continue
        t = state.get(e.model_key) if e.model_key is not None else None
        if isinstance(t, Tensor):
            groups.setdefault(id(t), []).append(i)
    conflicts: list[list[Any]] = []
    for idxs in groups.values():
        if len(idxs) < 2:
            continue
        writing = sorted(
            (i for i in idxs if entries[i].action in writes),
            key=lambda i: order[entries[i].model_key],
        )
        if not writing:  # nothing lands: one checkpoint tensor is listed once, not per key
            _listed_once(entries, sorted(idxs, key=lambda i: order[entries[i].model_key]), shares)
            continue
        carrier = entries[writing[0]]
        clash = [carrier]
        for i in idxs:
            e = entries[i]
            if i == writing[0]:
                continue
            if e.ckpt_key is None:
                continue
            if e.action not in writes:
                entries[i] = dataclasses.replace(
                    e, reason=f"{e.reason or e.action}; tied to '{carrier.model_key}', which loads"
                )
            elif e.ckpt_key == carrier.ckpt_key or shares(carrier.ckpt_key, e.ckpt_key):
                entries[i] = alias(carrier, e.model_key, e.ckpt_key)
            else:
                clash.append(e)
        if len(clash) > 1:
            conflicts.append(clash)
    if conflicts:
        raise conflict_error(conflicts, *where)


def _listed_once(entries: list[Any], idxs: list[int], shares: Callable[[str, str], bool]) -> None:
    """Entries of one tied tensor that nothing writes: those with the same action and the
    same checkpoint tensor (a tied checkpoint), or a skip without one, are aliases of the
    first, so the tensor is listed once."""
    firsts: list[Any] = []
    for i in idxs:
        e = entries[i]
        same = next(
            (
                f
                for f in firsts
                if f.action == e.action
                and (
                    e.ckpt_key is None
                    or (f.ckpt_key is not None and shares(f.ckpt_key, e.ckpt_key))
                )
            ),
            None,
        )
        if same is None:
            firsts.append(e)
        else:
            entries[i] = alias(same, e.model_key, e.ckpt_key)


def conflict_error(
    conflicts: Sequence[Sequence[Any]], source: str, model: str
) -> KeyCollisionError:
    """The refusal of different checkpoint tensors for one tied tensor, with the fix."""
    lines = []
    for clash in conflicts[:12]:
        tied = " = ".join(str(e.model_key) for e in clash)
        ckpt = " and ".join(f"'{e.ckpt_key}'" for e in clash)
        lines.append(f"    {tied}: checkpoint {ckpt} are {len(clash)} different tensors")
    more = f"\n    ... and {len(conflicts) - 12} more" if len(conflicts) > 12 else ""
    keep, other = conflicts[0][0], conflicts[0][1]
    return KeyCollisionError(
        Advice(
            f"{source} holds different tensors for {len(conflicts)} tied parameter(s) of "
            f"{model} (one tensor under several model keys); the order of its keys would "
            "decide which one the model holds:\n" + "\n".join(lines) + more,
            "\nNothing was loaded. Pick the one to keep: ",
            Fix("skip", other.model_key),
            f" loads '{keep.ckpt_key}' into both, ",
            Fix("skip", keep.model_key),
            f" loads '{other.ckpt_key}' (if they hold the same values, either does). To load "
            "both, untie the model first (e.g. tie_word_embeddings=False).",
        )
    )
