"""Coordinators: how the ranks of a load agree before anyone writes.

A local load has one participant, so :class:`LocalCoordinator` agrees with itself: ``agree``
runs the step and returns its result (the identity). A sharded load runs on every rank of the
default process group: :class:`CollectiveCoordinator` runs the step on this rank, then checks
with every rank (one ``all_gather_object``) that all succeeded with the same plan; otherwise
every rank raises the same error, before any of them wrote. The pipeline is the same either
way: prepare, agree, commit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from torch import Tensor

from ..errors import DistributedError

__all__ = ["CollectiveCoordinator", "LocalCoordinator", "Terms", "plan_fingerprint"]

T = TypeVar("T")


@dataclass(frozen=True)
class Terms(Generic[T]):
    """How ranks compare a step's result: its ``fingerprint`` (equal on every rank that plans
    the same load), a ``summary`` for the message when they differ, and ``abort`` to release
    a result that will not be used."""

    fingerprint: Callable[[T], str]
    summary: Callable[[T], str]
    abort: Callable[[T], None] = lambda _: None


class LocalCoordinator:
    """One participant: its step's result is the agreement."""

    def agree(self, step: Callable[[], T], terms: Terms[T]) -> T:
        return step()


class CollectiveCoordinator:
    """Every rank of the default process group, agreeing with one ``all_gather_object``."""

    def agree(self, step: Callable[[], T], terms: Terms[T]) -> T:
        """Run ``step()`` on this rank, then check with every rank.

        Returns this rank's result when every rank succeeded with the same ``fingerprint``.
        Otherwise every rank raises the same error: the step's error itself when all ranks
        failed alike, else a :class:`DistributedError` naming each failing rank and its error
        (or the ranks whose plans differ, with their ``summary``). ``abort`` releases a
        result that will not be used. A rank that dies outside ``step()`` leaves the others
        waiting in the collective, as any collective does.
        """
        import torch.distributed as dist

        result: Any = None
        error: BaseException | None = None
        try:
            result = step()
            mine: tuple = ("ok", terms.fingerprint(result), terms.summary(result))
        except Exception as e:
            error = e
            mine = ("error", type(e).__name__, str(e))
        world = dist.get_world_size()
        outcomes: list[Any] = [None] * world
        dist.all_gather_object(outcomes, mine)
        failed = {r: o for r, o in enumerate(outcomes) if o[0] == "error"}
        if failed:
            if error is not None and len(failed) == world and len(set(outcomes)) == 1:
                raise error  # the same error on every rank: raise it as it is
            if result is not None:
                terms.abort(result)
            raise _failed(failed, world, error)
        prints = [o[1] for o in outcomes]
        if len(set(prints)) > 1:
            terms.abort(result)
            raise _differ(prints, outcomes)
        return result


def _failed(failed: Mapping[int, Any], world: int, error: BaseException | None) -> Exception:
    lines = [f"    rank {r}: {name}: {msg}" for r, (_, name, msg) in sorted(failed.items())]
    ranks = ", ".join(str(r) for r in sorted(failed))
    message = (
        f"load_partial failed on rank{'s' * (len(failed) > 1)} {ranks} of {world}, so no "
        "rank loaded anything:\n" + "\n".join(lines) + "\nFix the error above; every rank "
        "must be able to open the checkpoint and plan the same load."
    )
    err = DistributedError(message)
    if error is not None:
        err.__cause__ = error
    return err


def _differ(prints: list[str], outcomes: list[Any]) -> DistributedError:
    groups: dict[str, list[int]] = {}
    for r, p in enumerate(prints):
        groups.setdefault(p, []).append(r)
    lines = [
        f"    rank{'s' * (len(rs) > 1)} {', '.join(map(str, rs))}: {outcomes[rs[0]][2]}"
        for rs in groups.values()
    ]
    return DistributedError(
        f"load_partial planned different loads on different ranks ({len(groups)} "
        "versions), so no rank loaded anything:\n" + "\n".join(lines) + "\nEvery rank "
        "must hold the same model (FSDP / tensor-parallel shards of one model, not "
        "pipeline stages) and pass the same checkpoint and arguments."
    )


def plan_fingerprint(entries: Iterable[Any], values: Mapping[str, Tensor]) -> str:
    """A digest of what a rank is about to write: its plan entries (``PlanEntry.to_dict``)
    and the shapes and dtypes of its prepared values. The source's path is left out, so ranks
    may read node-local copies.

    Example:
        >>> plan_fingerprint([], {}) == plan_fingerprint([], {})
        True
    """
    payload = {
        "entries": [e.to_dict() for e in entries],
        "adapted": {k: [list(v.shape), str(v.dtype)] for k, v in sorted(values.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
