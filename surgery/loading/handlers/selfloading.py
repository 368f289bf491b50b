"""Modules that load themselves (see :mod:`surgery.loading.units`), as a handler.

Planning hands each unit the checkpoint entries under its name and rehearses its own loading
on a private copy to learn which it takes, under which model keys; their entries carry
``via``. Non-tensor checkpoint values no unit takes are ``unexpected``. A sharded model's
units are refused here, before any rank agrees or writes: their loading cannot run on
DTensors. At prepare every unit the checked plan feeds is rehearsed before the first write
(a rehearsal of the same entries at planning is reused); at commit the real modules load.
"""

from __future__ import annotations

from torch import Tensor

from ..._tensors import dtype_name
from ..._text import escape_control
from ...errors import Advice, CheckpointError, Fix, LoadError, UsageError
from ...sources import CheckpointSource
from ..entries import WRITES, PlanEntry, copy_action
from ..units import Rehearsal, Unit, feed, refuse, rehearse, size_mismatches
from .base import Claimed, Handler, Job, PlanContext, Prepared, Writer

__all__ = ["SelfLoading"]

_LIST = 12

Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]


class SelfLoading(Handler):
    """Entries with ``via``: handed to a module's own loading."""

    name = "self-loading"

    def plan(self, ctx: PlanContext, names: dict[str, str]) -> Claimed:
        if not (ctx.units or ctx.source.extras):
            return Claimed(names)
        rest, fed_by, entries = _route(ctx, names)
        fed_names = [u.prefix + rel for u in ctx.units.units for rel in fed_by[u.prefix]]
        if ctx.sharded and fed_names:
            raise UsageError(
                f"{ctx.model_name} is sharded and has modules that load themselves "
                f"({', '.join(fed_names[:5])}); surgery cannot load those into DTensors"
            )
        keys_by: dict[str, list[str]] = {u.prefix: [] for u in ctx.units.units}
        for k in ctx.state:
            u = ctx.units.unit_of(k) if ctx.units else None
            if u is not None:
                keys_by[u.prefix].append(k)
        claimed = Claimed(rest, entries)
        adapted_away: list[str] = []
        for u in ctx.units.units:
            fed = fed_by[u.prefix]
            r = rehearse(u, fed, ctx.source) if fed else None
            if r is not None:
                r.copy = None  # type: ignore[assignment]  # only the verdict is kept
                claimed.rehearsals[u.prefix] = r
            mism, other = size_mismatches(r) if r is not None else ({}, [])
            if other:
                raise refuse(u, other, "loading it on a private copy")
            claimed.entries += _unit_entries(ctx, u, fed, r, mism, keys_by[u.prefix])
            if ctx.adapter is not None:
                adapted_away += [k for k in keys_by[u.prefix] if k[len(u.prefix) :] in mism]
        if adapted_away:
            claimed.notes.append(
                f"{len(adapted_away)} mismatched tensor(s) of modules that load themselves were "
                "not adapted (the adapter runs on surgery's own writes only): "
                + ", ".join(adapted_away[:_LIST])
            )
        return claimed

    def owns(self, entry: PlanEntry) -> bool:
        return entry.via is not None

    def prepare(self, job: Job) -> Prepared:
        """Rehearse every unit the checked plan feeds; refuse on any error, or when a planned
        key would get no value."""
        index = job.checked.units
        fed_by: dict[str, dict[str, str]] = {}
        planned: dict[str, list[str]] = {}
        for e in job.checked.plan.entries:
            if e.via is None or e.action not in WRITES:
                continue
            u = index.unit_of(e.via)
            if u is None:
                continue  # refused by the check
            if e.ckpt_key is not None:
                fed_by.setdefault(u.prefix, {})[e.via[len(u.prefix) :]] = e.ckpt_key
            if e.model_key is not None:
                planned.setdefault(u.prefix, []).append(e.model_key[len(u.prefix) :])
        out: list[Rehearsal] = []
        for u in index.units:
            fed = fed_by.get(u.prefix)
            if fed:
                out.append(_rehearsed(job, u, fed, planned.get(u.prefix, [])))
        return Prepared(later=(job.source, out))

    def commit(self, prepared: Prepared, writer: Writer) -> None:
        """Load every rehearsed unit for real: the same entries through the same code."""
        if prepared.later is None:
            return
        source, rehearsals = prepared.later
        for r in rehearsals:
            mod = r.unit.module
            writer.materialise(mod)
            try:
                mod.load_state_dict(feed(r.unit, r.fed, source), strict=False)
            except Exception as ex:  # the rehearsal succeeded: this is the module's own doing
                raise LoadError(
                    f"{r.unit.describe()} loaded on a private copy but raised "
                    f"{type(ex).__name__} on the model itself: {ex}. The model is partly "
                    "loaded; rebuild it before trying again."
                ) from ex


def _route(
    ctx: PlanContext, names: dict[str, str]
) -> tuple[dict[str, str], dict[str, dict[str, str]], list[PlanEntry]]:
    """Names under a unit go to it (``fed_by``: prefix -> name handed over -> checkpoint key);
    non-tensor values outside every unit are ``unexpected``; the rest go on."""
    source, index, skipped = ctx.source, ctx.units, ctx.skipped
    rest: dict[str, str] = {}
    entries: list[PlanEntry] = []
    fed_by: dict[str, dict[str, str]] = {u.prefix: {} for u in index.units}
    misplaced: list[str] = []  # non-tensor values under the name of a model tensor
    for name, ckey in names.items():
        u = index.unit_of(name) if index else None
        if u is not None:
            fed_by[u.prefix][name[len(u.prefix) :]] = ckey
        elif ckey in source.extras:
            what = type(source.extras[ckey]).__name__
            if isinstance(ctx.state.get(name), Tensor) and not (skipped and name in skipped):
                misplaced.append(f"'{escape_control(ckey)}' ({what})")
                continue
            reason = f"not a tensor ({what}); no module of the model loads it itself"
            entries.append(PlanEntry("unexpected", name, ckey, reason=reason))
        else:
            rest[name] = ckey
    if misplaced:  # as load_state_dict refuses them: "expected torch.Tensor ... but received"
        raise CheckpointError(
            Advice(
                f"{source.description} holds values that are not tensors where the model has "
                f"tensors: {', '.join(misplaced[:_LIST])}. The file is not a state dict for "
                "this model, or it is corrupt; leave them out with ",
                Fix("skip"),
                " if that is intended. Nothing was loaded.",
            )
        )
    return rest, fed_by, entries


def _unit_entries(
    ctx: PlanContext,
    u: Unit,
    fed: dict[str, str],
    r: Rehearsal | None,
    mism: Shapes,
    keys: list[str],
) -> list[PlanEntry]:
    """The entries of one unit: its model keys as its loading fills them, then the
    checkpoint entries it was handed and did not take under a model key."""
    p = u.prefix
    entries = [_model_entry(ctx, u, k, fed, r, mism) for k in keys]
    taken: set[str] = set(r.took.values()) if r is not None else set()
    for rel, ckey in fed.items():
        if rel in taken:
            continue
        cshape, cdtype = _spec(ctx.source, ckey)
        if r is not None and rel in r.unexpected:
            action, key, reason = "unexpected", p + rel, f"not taken by {u.name}"
        else:  # consumed by the module's own code (renamed away, packed, ...)
            action, key, reason = "load", None, f"taken by {u.why}"
        entries.append(
            PlanEntry(action, key, ckey, None, cshape, None, cdtype, reason, via=p + rel)
        )
    return entries


def _model_entry(
    ctx: PlanContext,
    u: Unit,
    k: str,
    fed: dict[str, str],
    r: Rehearsal | None,
    mism: Shapes,
) -> PlanEntry:
    """The entry of model key ``k`` of unit ``u``, as its rehearsed loading fills it."""
    p, via = u.prefix, f"via {u.why}"
    rel, t = k[len(p) :], ctx.state[k]
    mshape, mdtype = (
        (tuple(t.shape), dtype_name(t.dtype)) if isinstance(t, Tensor) else (None, None)
    )
    if r is not None and rel in r.took:
        src = r.took[rel]
        ckey = fed[src]
        cshape, cdtype = _spec(ctx.source, ckey)
        if rel in mism:
            action, reason = "mismatch", via
            cshape, mshape = mism[rel]
        elif ctx.skipped and k in ctx.skipped:
            action, reason = "skip", "skipped as asked"
        else:
            action, reason = copy_action(cdtype, mdtype), via
        return PlanEntry(action, k, ckey, mshape, cshape, mdtype, cdtype, reason, via=p + src)
    if r is not None and rel in r.made:
        return PlanEntry("load", k, None, mshape, None, mdtype, reason=f"set by {u.why}", via=k)
    if k.endswith("num_batches_tracked"):
        action, reason = "defaulted", "counter left at its default"
    elif isinstance(t, Tensor) and t.is_meta:
        action, reason = "initialise", "reset_parameters()"
    else:
        action, reason = "missing", "not in checkpoint"
    return PlanEntry(action, k, None, mshape, None, mdtype, reason, via=k)


def _spec(source: CheckpointSource, ckey: str) -> tuple[tuple[int, ...] | None, str | None]:
    s = source.specs.get(ckey)
    return (tuple(s[0]), dtype_name(s[1])) if s is not None else (None, None)


def _rehearsed(job: Job, u: Unit, fed: dict[str, str], planned: list[str]) -> Rehearsal:
    """The unit's rehearsal for ``fed``: planning's, when this load planned the same entries
    from this source, else a new one; refused on any error or a planned key left empty."""
    r = job.checked.rehearsals.get(u.prefix) if job.planned_here else None
    if r is None or r.fed != fed or r.errors:
        r = rehearse(u, fed, job.source)
        r.copy = None  # type: ignore[assignment]  # only the verdict is kept
    if r.errors:
        raise refuse(u, r.errors, "loading it on a private copy before writing")
    lost = [u.prefix + k for k in planned if k not in r.took and k not in r.made]
    if lost:
        raise LoadError(
            f"{u.describe()} loads itself, and its loading no longer gives "
            f"{', '.join(lost[:_LIST])} a value as the plan says. Nothing was loaded. Plan "
            "again with surgery.plan_load()."
        )
    return r
