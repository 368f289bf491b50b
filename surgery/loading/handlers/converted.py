"""Converted tensors: model tensors a transformers conversion makes from checkpoint tensors.

The key mapping (:mod:`surgery.keys.conversions`) gathers the checkpoint names each
transformers ``WeightConverter`` of the model takes into one group per call (per-expert
``w1``/``w3`` into a stacked ``gate_up_proj``). Planning runs the converter's own ops on
``meta`` tensors shaped from the file's headers, so each tensor it makes has a shape and dtype
before a byte is read, and plans it as ``convert`` (``mismatch``, or ``adapt`` with an
adapter, when its shape differs from the model's; ``skip`` when ``skip=`` names it). An op
that fails on those shapes (tensors that do not fit together) is refused while planning.

At prepare, a group that only stacks experts (and joins the stacks), the common MoE layout,
becomes one write per checkpoint tensor into its block of the model tensor
(:mod:`.stacked`): read in place at commit like any plain copy, nothing held in between, and
on a sharded model only the experts a rank holds. Any other group is read and converted by
transformers' own ``WeightConverter.convert``; any failure, or a tensor that is not what was
planned, raises before the first write (transformers itself logs such failures and loads
the rest). Its values, cast to the model's dtype, are written by the placement's writer at
commit.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..._table import format_shape
from ..._tensors import dtype_name
from ...errors import Advice, Fix, LoadError
from ...keys.conversions import Conversions, Group, model_conversions
from ...sources import CheckpointSource
from ..entries import WRITES, Conversion, PlanEntry, compact, pair_action
from . import stacked
from .adapted import adapt_value
from .base import Claimed, Handler, Job, PlanContext, Prepared, Write

__all__ = ["Converted", "convert_group"]


class Converted(Handler):
    """Entries with a ``conversion``: tensors made by the model's transformers converters."""

    name = "converted"

    def plan(self, ctx: PlanContext, names: dict[str, str]) -> Claimed:
        if not ctx.groups:
            return Claimed(names)
        claimed = Claimed(names, at={}, writer={})
        for g in ctx.groups.values():
            for e in _plan_group(ctx, g):
                if e.action == "mismatch":
                    claimed.notes.append(_mismatch_note(e))
                if e.model_key is not None and e.action != "unexpected":
                    claimed.at[e.model_key] = len(claimed.entries)  # type: ignore[index]
                    if e.action in WRITES:
                        claimed.writer.setdefault(id(ctx.plain[e.model_key]), e)  # type: ignore[union-attr]
                claimed.entries.append(e)
        return claimed

    def owns(self, entry: PlanEntry) -> bool:
        return entry.conversion is not None and entry.action in ("convert", "adapt")

    def prepare(self, job: Job) -> Prepared:
        """Read and convert every group the plan loads; check each tensor against the plan."""
        groups: dict[tuple[str, tuple[str, ...]], list[PlanEntry]] = {}
        for e in job.checked.plan.entries:
            if self.owns(e) and not e.tied_to:
                groups.setdefault(e.conversion.group, []).append(e)  # type: ignore[union-attr]
        out = Prepared()
        if not groups:
            return out
        conv = job.checked.conversions if job.planned_here else None
        conv = conv or model_conversions(job.model)
        for entries in groups.values():
            c: Conversion = entries[0].conversion  # type: ignore[assignment]
            conv, converter = _converter(conv, c, job.source)
            blocks = None
            if all(e.action == "convert" for e in entries):
                shape = _shape(entries)
                blocks = stacked.regions(conv, converter, c.sources, job.source.specs, shape)
            if blocks is not None:  # read in place at commit, nothing held meanwhile
                for e in entries:
                    mkey = str(e.model_key)
                    out.writes += [Write(mkey, job.state[mkey], k, None, blocks[k]) for k in c.keys]
                continue
            mkeys = [str(e.model_key) for e in entries]
            made = convert_group(conv, converter, c.layer, c.sources, job.source.read, mkeys)
            for e in entries:
                _prepare_entry(job, e, made, out)
        return out


def _plan_group(ctx: PlanContext, g: Group) -> list[PlanEntry]:
    """The entries of one group: one per model key its tensors go to (``unexpected`` for a
    tensor the model lacks), shapes from the converter's ops run on ``meta`` tensors."""
    conv: Conversions = ctx.conversions
    converter = conv.converters[g.rule]
    sources = tuple((p, tuple(ks)) for p, ks in g.sources.items())
    ops = tuple(repr(op) for op in converter.operations)
    targets = tuple(converter.target_patterns)
    mkeys = [k for ks in g.outputs.values() for k in ks]
    if mkeys and ctx.skipped and all(k in ctx.skipped for k in mkeys):  # nothing to convert
        return [
            _skipped(ctx, k, Conversion(sources, targets, ops, g.layer, o))
            for o, ks in g.outputs.items()
            for k in ks
        ]
    meta = functools.partial(_meta, ctx.source.specs)
    made = convert_group(conv, converter, g.layer, sources, meta, mkeys)
    if set(made) != set(g.outputs):
        raise LoadError(
            Advice(
                f"{conv.owner}'s transformers converter for '{g.layer}' makes "
                f"{', '.join(sorted(made))}, not the tensors {', '.join(sorted(g.outputs))} "
                "its patterns name, so surgery cannot tell where they go. Nothing was loaded. "
                "Load this checkpoint with from_pretrained, or leave these tensors out with ",
                Fix("skip", mkeys),
                ".",
            )
        )
    entries = []
    for o, mkeys in g.outputs.items():
        c = Conversion(sources, targets, ops, g.layer, o)
        shape, dtype = tuple(made[o].shape), dtype_name(made[o].dtype)
        if not mkeys:
            entries.append(PlanEntry("unexpected", o, None, None, shape, None, dtype, conversion=c))
        for mkey in mkeys:
            entries.append(_entry(ctx, mkey, shape, dtype, c))
    return entries


def _entry(
    ctx: PlanContext, mkey: str, shape: tuple[int, ...], dtype: str, c: Conversion
) -> PlanEntry:
    """The entry of model key ``mkey``, given the converted tensor's shape and dtype."""
    t = ctx.plain.get(mkey)
    if t is None:  # under a module that loads itself: its own loading cannot take it
        raise LoadError(
            Advice(
                f"'{mkey}' of {ctx.model_name} is made by a transformers conversion, but its "
                "module loads itself (its own _load_from_state_dict or hooks); surgery cannot "
                "hand it a converted tensor. Nothing was loaded. Leave it out with ",
                Fix("skip", [mkey]),
                ".",
            )
        )
    mshape, mdtype = tuple(t.shape), dtype_name(t.dtype)
    action = pair_action(shape, mshape, dtype, mdtype, ctx.adapter is not None)
    action, reason = ("convert" if action in ("load", "cast") else action), ""
    if ctx.skipped and mkey in ctx.skipped:
        action, reason = "skip", "skipped as asked"
    return PlanEntry(action, mkey, None, mshape, shape, mdtype, dtype, reason, conversion=c)


def _skipped(ctx: PlanContext, mkey: str, c: Conversion) -> PlanEntry:
    """A converted tensor ``skip=`` names: none of its sources is read, not even planned."""
    t = ctx.state[mkey]
    shape, dtype = tuple(t.shape), dtype_name(t.dtype)
    return PlanEntry(
        "skip", mkey, None, shape, None, dtype, reason="skipped as asked", conversion=c
    )


def _mismatch_note(e: PlanEntry) -> str:
    """Why a converted tensor does not fit: what it was made from, both shapes."""
    c: Conversion = e.conversion  # type: ignore[assignment]
    return (
        f"'{e.model_key}' converted from {c.describe()} would be {format_shape(e.ckpt_shape)}, "
        f"the model's is {format_shape(e.model_shape)} (a checkpoint of another configuration: "
        "another number of experts, other sizes); not loaded"
    )


def _meta(specs: Mapping[str, tuple[torch.Size, torch.dtype]], key: str) -> Tensor:
    shape, dtype = specs[key]
    return torch.empty(shape, dtype=dtype, device="meta")


def convert_group(
    conv: Conversions,
    converter: Any,
    layer: str,
    sources: tuple[tuple[str, tuple[str, ...]], ...],
    load: Callable[[str], Tensor],
    model_keys: list[str],
) -> dict[str, Tensor]:
    """Run transformers' ``converter`` on one group: ``load(key)`` gives each checkpoint
    tensor (a ``meta`` tensor while planning). Returns each tensor it makes by name (base
    names); any failure is a ``LoadError`` naming the group, the ops and the fix (skipping
    ``model_keys``, the model keys the group goes to)."""
    c = copy.deepcopy(converter)  # as from_pretrained does: one converter per call
    for pattern, keys in sources:
        for k in keys:
            c.add_tensor(layer, k, pattern, functools.partial(load, k))
    try:
        made = c.convert(layer, model=conv.model, config=getattr(conv.model, "config", None))
    except LoadError:
        raise
    except Exception as e:
        keys = [k for _, ks in sources for k in ks]
        raise LoadError(
            Advice(
                f"transformers' conversion {list(converter.operations)} failed for '{layer}' "
                f"of {conv.owner} ({type(e).__name__}: {e}). Its {len(keys)} checkpoint "
                f"tensors ({compact(keys)}) do not fit together as the model's layout needs. "
                "Nothing was loaded. Leave them out with ",
                Fix("skip", model_keys or [layer]),
                ", or fix the checkpoint.",
            )
        ) from e
    return {k: v[0] if isinstance(v, list) else v for k, v in made.items()}


def _converter(
    conv: Conversions | None, c: Conversion, source: CheckpointSource
) -> tuple[Conversions, Any]:
    """The model's mapping and its converter for ``c`` (a plan read back names it by patterns
    and ops), once every checkpoint key it reads is known to be in ``source``."""
    converter = conv.find([p for p, _ in c.sources], c.targets, c.ops) if conv else None
    if conv is None or converter is None:
        raise LoadError(
            f"the plan converts '{c.layer}' with a transformers converter {list(c.ops)} that "
            "the model does not declare (another model, or another transformers version). "
            "Nothing was loaded. Plan again with surgery.plan_load()."
        )
    missing = [k for k in c.keys if k not in source.specs]
    if missing:
        raise LoadError(
            f"{source.description} does not hold what the plan converts into '{c.layer}': "
            f"{', '.join(missing[:5])} not in the checkpoint. Nothing was loaded. Pass the "
            "checkpoint the plan was made from (ckpt=...), or plan again."
        )
    return conv, converter


def _shape(entries: list[PlanEntry]) -> tuple[int, ...]:
    """The one shape the group's entries are planned to have (``()`` when they differ)."""
    shapes = {tuple(e.ckpt_shape or ()) for e in entries}
    return shapes.pop() if len(shapes) == 1 else ()


def _prepare_entry(job: Job, e: PlanEntry, made: Mapping[str, Tensor], out: Prepared) -> None:
    """One converted tensor checked against the plan, adapted if planned so, as a write."""
    c: Conversion = e.conversion  # type: ignore[assignment]
    mkey = str(e.model_key)
    value = made.get(c.output)
    if value is None or tuple(value.shape) != e.ckpt_shape:
        got = "nothing" if value is None else format_shape(value.shape)
        raise LoadError(
            f"converting '{c.layer}' gave {got} for '{mkey}', the plan says "
            f"{format_shape(e.ckpt_shape)}. Nothing was loaded. Plan again with "
            "surgery.plan_load() (the checkpoint changed since planning)."
        )
    target = job.state[mkey]
    if e.action == "adapt":
        adapted = adapt_value(job.adapter, e, value, target, job.checked.plan.on_mismatch)
        if adapted is None:
            out.declined.add(mkey)
            return
        value = adapted
    out.writes.append(Write(mkey, target, c.keys[0], value.detach().to(dtype=target.dtype)))
