"""LR scheduler state through a surgery: a new scheduler brought to the step an old one reached.

A scheduler's ``state_dict()`` mixes counters (``last_epoch``) with per-group lists
(``base_lrs``) that a surgery changes, so ``scheduler.load_state_dict`` of the old state would
bring back the old groups' learning rates. Here only the step is taken from the old state, and
the new scheduler computes every new group's lr at that step. The step comes from a file, so it
is checked (a whole number, at most 2**53) and reached in bounded time: schedulers whose lr is a
function of the step alone are set to it directly, others are replayed up to a million steps,
and beyond that set by their closed form (torch's ``_get_closed_form_lr``) or refused.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.optim import lr_scheduler as sched

from ._text import escape_control
from .errors import Advice, CheckpointError, Fix, SurgeryError, UsageError
from .sources.reading import load_training_state
from .sources.unwrap import find_entry

__all__ = ["restore_scheduler"]

# Entries of a training checkpoint that hold scheduler state, most common first.
_SCHEDULER_ENTRIES = (
    "lr_scheduler",
    "scheduler",
    "lr_schedulers",
    "lr_scheduler_state_dict",
    "scheduler_state_dict",
    "sched",
)
# Schedulers whose lr at step n is a function of n alone (``get_lr`` reads ``last_epoch`` and
# the base lrs, never the current lr): set to the step directly, as replaying would.
_STATELESS = (sched.LambdaLR, sched.OneCycleLR, sched.CyclicLR)
# Steps replayed at most (a few seconds); beyond, a closed form or a refusal.
_MAX_REPLAY = 1_000_000
# The largest step taken at all: a float holds every whole number up to 2**53.
_MAX_STEP = 2**53
_PLATEAU_COUNTERS = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch")


def restore_scheduler(
    scheduler: Any,
    old_state: Mapping[str, Any] | str | os.PathLike,
    *,
    entry: str | None = None,
    trust_pickle: bool = False,
    allow_globals: Iterable[Any] | None = None,
) -> int:
    """Bring a new LR scheduler to the step an old one had reached; returns that step.

    This keeps the new scheduler's groups and settings and brings it to the old
    ``last_epoch``, so every group's lr (and momentum) is what the schedule gives at that step
    for the *new* groups: ``LambdaLR`` (transformers' warm-up schedules), ``OneCycleLR`` and
    ``CyclicLR`` are set to it directly, others replay ``step()`` (up to a million steps, then
    their closed form where torch has one). ``ReduceLROnPlateau`` gets its counters
    (``best``, ``num_bad_epochs``, ``cooldown_counter``, ``last_epoch``) copied. Call it on a
    freshly built scheduler, after :func:`restore_optimizer`; ``old_state`` is a scheduler
    ``state_dict()``, a training checkpoint holding one (``lr_scheduler``, ``scheduler``,
    Lightning's ``lr_schedulers``...), its path, or a training folder (its ``scheduler.pt``,
    ``scheduler.bin`` or ``*.ckpt``), read as :func:`load_partial` reads files
    (``trust_pickle``, ``allow_globals``). On any error the scheduler and its optimizer's
    groups are unchanged.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=1.0)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
        >>> restore_scheduler(sched, {"last_epoch": 5, "_step_count": 6})
        5
        >>> round(opt.param_groups[0]["lr"], 6)
        0.01
    """
    plateau = isinstance(scheduler, sched.ReduceLROnPlateau)
    if not plateau and not (
        callable(getattr(scheduler, "step", None))
        and hasattr(scheduler, "last_epoch")
        and isinstance(getattr(scheduler, "optimizer", None), torch.optim.Optimizer)
    ):
        raise UsageError(
            "restore_scheduler needs a torch LR scheduler as scheduler=, got "
            f"{type(scheduler).__name__}"
        )
    sd, description = _read(old_state, entry, trust_pickle, allow_globals)
    target = _step(sd["last_epoch"], description)
    if plateau:
        _restore_plateau(scheduler, sd, description)
        return target
    current = int(scheduler.last_epoch)
    if current > target:
        raise UsageError(
            f"the new {type(scheduler).__name__} is already at step {current}, past the old "
            f"scheduler's {target}; build a fresh scheduler and call restore_scheduler first."
        )
    with _unchanged_on_error(scheduler):
        try:
            _advance(scheduler, current, target, description)
        except SurgeryError:
            raise
        except Exception as e:  # the schedule itself refuses the step (OneCycleLR's total)
            raise UsageError(
                f"the new {type(scheduler).__name__} cannot be brought to step {target} of "
                f"{description}: {type(e).__name__}: {e}. Build it for at least that many "
                "steps. The scheduler is unchanged."
            ) from None
    return target


def _read(
    old_state: Any, entry: str | None, trust_pickle: bool, allow_globals: Iterable[Any] | None
) -> tuple[Mapping, str]:
    """The old scheduler's state dict and a description of where it sat."""
    if isinstance(old_state, (str, os.PathLike)):
        obj, path = load_training_state(
            Path(old_state), "scheduler", trust_pickle=trust_pickle, allow_globals=allow_globals
        )
        where = str(path)
    elif isinstance(old_state, Mapping):
        obj, where = old_state, "<dict>"
    else:
        raise UsageError(
            f"restore_scheduler takes a scheduler state_dict(), a checkpoint dict or a path, "
            f"not a {type(old_state).__name__}"
        )
    if isinstance(obj, Mapping) and isinstance(obj.get("lr_schedulers"), (list, tuple)):
        # Lightning: a list of {'scheduler': state, ...} or of states
        listed = obj["lr_schedulers"]
        if len(listed) == 1 and isinstance(listed[0], Mapping) and "last_epoch" not in listed[0]:
            obj = {"lr_schedulers": [listed[0].get("scheduler", listed[0])]}
    sd, path_in = find_entry(
        obj,
        entry,
        _SCHEDULER_ENTRIES,
        lambda o: isinstance(o, Mapping) and "last_epoch" in o,
        "LR scheduler",
        where,
    )
    return sd, where + "".join(f"[{p!r}]" for p in path_in)


def _step(value: Any, description: str) -> int:
    """``last_epoch`` as a step count: a whole number from 0 to 2**53, else refused."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        step = -1
    elif isinstance(value, numbers.Integral):
        step = int(value)
    elif math.isfinite(value) and float(value).is_integer():
        step = int(value)
    else:
        step = -1
    if not 0 <= step <= _MAX_STEP:
        shown = escape_control(repr(value))
        raise CheckpointError(
            Advice(
                f"{description}: last_epoch is {shown[:60]}, not a step count (a whole number "
                "from 0 to 2**53); the scheduler state is corrupt or hostile. Pass ",
                Fix("entry"),
                " if another entry holds it, or save the scheduler's state_dict() again.",
            )
        )
    return step


def _restore_plateau(scheduler: Any, sd: Mapping, description: str) -> None:
    """ReduceLROnPlateau's counters, each checked before any is set."""
    values: dict[str, Any] = {}
    for k in _PLATEAU_COUNTERS:
        if k not in sd:
            continue
        v = sd[k]
        if k == "best":
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)
            v = float(v) if ok else v
        else:
            ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 0
            v = int(v) if ok else v
        if not ok:
            raise CheckpointError(
                f"{description}: ReduceLROnPlateau's {k} is {escape_control(repr(v))[:60]}, not "
                f"{'a number' if k == 'best' else 'a count'}; the scheduler state is corrupt or "
                "hostile. Save the scheduler's state_dict() again."
            )
        values[k] = v
    for k, v in values.items():
        setattr(scheduler, k, v)


def _advance(scheduler: Any, current: int, target: int, description: str) -> None:
    """Step ``scheduler`` from ``current`` to ``target``, in bounded time."""
    steps = target - current
    if steps == 0:
        return
    with warnings.catch_warnings():
        # Bringing the schedule forward: no optimizer step is due, and the epoch argument of
        # step() is torch's (deprecated but kept) way to its closed form.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        warnings.filterwarnings("ignore", message=r"The epoch parameter in `scheduler.step\(\)`")
        if type(scheduler) in _STATELESS:
            _set_counters(scheduler, target - 1, steps - 1)
            scheduler.step()
        elif steps <= _MAX_REPLAY:
            for _ in range(steps):
                scheduler.step()
        elif hasattr(scheduler, "_get_closed_form_lr"):
            _set_counters(scheduler, current, steps - 1)
            scheduler.step(target)
        else:
            raise UsageError(
                f"{description} is at step {target:,}; bringing a new "
                f"{type(scheduler).__name__} there means replaying {steps:,} steps, more than "
                f"the {_MAX_REPLAY:,} surgery replays, and it has no closed form. Use a "
                "scheduler with one (StepLR, CosineAnnealingLR, LambdaLR, ...), or set it "
                "yourself with scheduler.load_state_dict(). The scheduler is unchanged."
            )


def _set_counters(scheduler: Any, last_epoch: int, more_steps: int) -> None:
    """Set ``last_epoch`` and count ``more_steps`` more calls of ``step()``, through the
    scheduler's own ``state_dict`` / ``load_state_dict``."""
    state = scheduler.state_dict()
    state["last_epoch"] = last_epoch
    state["_step_count"] = int(state.get("_step_count", 1)) + more_steps
    scheduler.load_state_dict(state)


@contextmanager
def _unchanged_on_error(scheduler: Any) -> Iterator[None]:
    """On an exception, put the scheduler and its optimizer's group settings back."""
    saved = copy.deepcopy(scheduler.state_dict())
    groups = scheduler.optimizer.param_groups
    settings = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in groups]
    try:
        yield
    except BaseException:
        scheduler.load_state_dict(saved)
        for g, kept in zip(groups, settings, strict=True):
            for k in [k for k in g if k != "params" and k not in kept]:
                del g[k]
            g.update(kept)
        raise
