"""Planning: from a source's names, shapes and dtypes to a checked plan, no tensor read.

:func:`make_plan` runs one fixed sequence. The checkpoint's names go through the one
name-mapping pipeline (:func:`surgery.keys.mapping.map_names`); then each handler claims the
names it owns and plans them (modules that load themselves first, plain copies and ties take
what is left); then the plan is checked against the model (:func:`.check.check_plan`) and its
copies against the source (:func:`.verify.copy_problems`). The facts found on the way (the
model's PEFT view, its self-loading modules, their rehearsals) are computed once and handed on.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .._args import model_class_name
from ..errors import LoadError
from ..keys import ties
from ..keys.conversions import model_conversions
from ..keys.mapping import map_names
from ..keys.peft import peft_view
from ..keys.select import match_keys
from ..sources import CheckpointSource
from .check import CheckedPlan, Draft, check_plan
from .entries import PlanEntry
from .handlers import Claimed, Handler, PlanContext
from .options import LoadOptions, adapter_name
from .plan import PlanData
from .units import Index, find_units, plain_state
from .verify import copy_failure, copy_problems

__all__ = ["make_plan"]

_CONV1D_NAMES = frozenset({"c_attn", "c_fc", "c_proj"})  # GPT-2's Conv1D layers


def make_plan(
    model: nn.Module,
    state: Mapping[str, Any],
    source: CheckpointSource,
    opts: LoadOptions,
    handlers: Sequence[Handler],
    *,
    ckpt: Any,
    sharded: bool = False,
) -> CheckedPlan:
    """Classify every checkpoint key and model key, check the result against ``model``.

    ``handlers`` claim names in their order; ``sharded`` says the model's tensors are
    DTensors (what a handler cannot load there is refused now, before any agreement).
    """
    model_name = model_class_name(model)  # not FSDP's FSDP<Name> wrapper class
    specs = source.specs
    view = peft_view(model, state)
    conversions = model_conversions(model)
    mapped = map_names(
        [*specs, *source.extras] if source.extras else specs,
        state,
        remap=opts.remap,
        auto_prefix=opts.prefix == "auto",
        shape_of=lambda ckey: tuple(specs[ckey][0]) if ckey in specs else None,
        view=view,
        conversions=conversions,
    )
    units = Index(find_units(model))
    plain = plain_state(state, units)
    ctx = PlanContext(
        model=model,
        model_name=model_name,
        state=state,
        plain=plain,
        source=source,
        skipped=match_keys(opts.skip, state, action="skip", model=model, owner=model_name),
        dropped=mapped.dropped,
        adapter=opts.adapter,
        units=units,
        sharded=sharded,
        tied=ties.has_ties(plain),
        conversions=conversions,
        groups=mapped.groups,
    )
    claims = _claims(ctx, mapped.new_to_old, handlers)
    entries = [e for c in claims for e in c.entries]
    at, writer = _index(claims)
    notes = [*source.notes, *mapped.notes, *(n for c in reversed(claims) for n in c.notes)]
    notes.extend(_conv1d_note(model, entries))
    plan = PlanData(
        entries=entries,
        source=source.description,
        model=model_name,
        path=str(Path(ckpt).expanduser()) if isinstance(ckpt, (str, os.PathLike)) else None,
        entry=opts.entry,
        prefix=mapped.rewrite,
        auto_prefix=opts.prefix == "auto",
        notes=notes,
        strict=opts.strict,
        on_mismatch=adapter_name(opts.adapter) if opts.adapter else str(opts.on_mismatch),
        trust_pickle=opts.trust_pickle,
        checkpoint=ckpt,
        adapter=opts.adapter,
    )
    adapters = set() if view is None else view.adapter
    draft = Draft(entries, at, writer, adapters, ctx.tied)
    checked = check_plan(
        plan, model, state, refuse_empty=not opts.dry_run, draft=draft, units=units
    )
    problems = copy_problems(checked.plan.entries, source)
    if problems:
        raise LoadError(copy_failure(problems, source.description))
    rehearsals = {p: r for c in claims for p, r in c.rehearsals.items()}
    return dataclasses.replace(checked, rehearsals=rehearsals, conversions=conversions)


def _claims(ctx: PlanContext, names: dict[str, str], handlers: Sequence[Handler]) -> list[Claimed]:
    """Each handler's claim, in the order their entries are listed: the last to claim (the
    plain copies, which take what is left, and whose index the check uses) first."""
    claims: list[Claimed] = []
    for h in handlers:
        claimed = h.plan(ctx, names)
        names = claimed.rest
        claims.append(claimed)
    return claims[::-1]


def _index(claims: list[Claimed]) -> tuple[dict[str, int], dict[int, PlanEntry]]:
    """The claims' indexes of their entries (model key -> position in the joined entries,
    id(model tensor) -> the entry writing it), for the check: the plain copies' index, and
    those of the handlers that built one, shifted to where their entries land."""
    at: dict[str, int] = {}
    writer: dict[int, PlanEntry] = {}
    offset = 0
    for c in claims:
        if c.at is not None:
            at.update({k: i + offset for k, i in c.at.items()} if offset else c.at)
        if c.writer is not None:
            for tid, e in c.writer.items():
                writer.setdefault(tid, e)
        offset += len(c.entries)
    return at, writer


def _conv1d_note(model: nn.Module, entries: list[PlanEntry]) -> list[str]:
    """A note when square weights named like GPT-2's ``Conv1D`` load into ``nn.Linear``.

    ``Conv1D`` stores ``(in, out)``, ``nn.Linear`` ``(out, in)``: a square weight fits either
    way, so no shape check catches it. Said, not refused: the names are only a hint.
    """
    square = []
    for e in entries:
        if e.action not in ("load", "cast") or e.model_key is None or e.ckpt_key is None:
            continue
        if e.tied_to:
            continue
        parts = e.ckpt_key.split(".")
        shape = e.ckpt_shape or ()
        if len(parts) < 2 or parts[-1] != "weight" or parts[-2] not in _CONV1D_NAMES:
            continue
        if len(shape) != 2 or shape[0] != shape[1]:
            continue
        try:
            module = model.get_submodule(e.model_key.rpartition(".")[0])
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            square.append(e.ckpt_key)
    if not square:
        return []
    shown = ", ".join(square[:3]) + (f" and {len(square) - 3} more" if len(square) > 3 else "")
    return [
        f"{len(square)} square weight(s) named like GPT-2's Conv1D ({shown}) loaded into "
        "nn.Linear as they are. Conv1D stores (in, out) and Linear (out, in), so if they come "
        "from Conv1D they are transposed: load surgery.adapters.transposed(state, keys) "
        "instead (and pass on_mismatch=surgery.adapters.transpose_linear for the non-square "
        "ones)."
    ]
