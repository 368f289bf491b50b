"""Checking a plan against a model: a :class:`CheckedPlan` carrying every fact apply needs.

:func:`check_plan` normalises the entries (one per model key, tie aliases re-derived, keys
without a value refined by the model), refuses what cannot be right, and computes once what
the later steps need: the tensors the plan writes, the meta modules to initialise, the
modules that load themselves. Nothing is recomputed after it; the input plan and the
planner's index are never changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .._names import closest
from .._table import first_n, first_n_lines, format_shape
from .._tensors import dtype_name
from .._text import escape_control
from ..errors import Advice, Fix, KeyCollisionError, LoadError, UsageError
from ..keys import ties
from ..keys.peft import adapter_keys
from ..keys.prefix import prefix_hint
from .entries import ACTIONS, NO_VALUE, WRITES, Mismatch, PlanEntry, copy_action
from .plan import PlanData
from .units import Index, Rehearsal, find_units, plain_state, split_entries

__all__ = ["CheckedPlan", "Draft", "check_plan", "meta_to_initialise", "strict_failure"]

_LIST = 12  # keys listed per category in an error message

Initialise = tuple[list[nn.Module], list[str]]


@dataclass(frozen=True)
class Draft:
    """The planner's entries with their index (model key -> position, id(model tensor) ->
    the entry writing it): the check trusts and copies them instead of re-deriving both."""

    entries: list[PlanEntry]
    at: dict[str, int]
    writer: dict[int, PlanEntry]
    adapters: set[str] = field(default_factory=set)  # the model's PEFT adapter keys
    tied: bool = True  # some model tensor sits under several keys


@dataclass(frozen=True)
class CheckedPlan:
    """A plan checked against a model, and the facts the later steps use.

    ``written``: ids of the model tensors the plan gives a value; ``initialise``: the meta
    modules to reset and the keys they give a value (``None`` when nothing is on ``meta``);
    ``units``: the modules that load themselves; ``rehearsals``: their planning rehearsals
    (by prefix), reused at prepare when the same entries are fed from the same source;
    ``conversions``: a transformers model's conversion mapping planning used.
    """

    plan: PlanData
    model: nn.Module
    state: Mapping[str, Any]
    units: Index
    written: frozenset[int]
    initialise: Initialise | None
    rehearsals: Mapping[str, Rehearsal] = field(default_factory=dict)
    conversions: Any = None  # the model's transformers conversions, as planning found them

    @property
    def by_modules(self) -> set[str]:
        """Model keys their module's own loading gives a value."""
        return {
            e.model_key
            for e in self.plan.entries
            if e.via is not None and e.action in WRITES and e.model_key
        }


def check_plan(
    plan: PlanData,
    model: nn.Module,
    state: Mapping[str, Any],
    *,
    refuse_empty: bool,
    draft: Draft | None = None,
    units: Index | None = None,
) -> CheckedPlan:
    """Check ``plan`` against the model's current ``state``; the checked plan, or the error
    ``load_partial`` raises (keys the model lacks, misfits, strict, mismatches set to error,
    nothing loaded, meta tensors nothing initialises). ``draft`` is the planner's index of
    entries it has just classified against ``state``; without it (an edited or read-back
    plan) every entry is checked and refreshed. ``units`` when the caller found them."""
    if units is None:
        units = Index(find_units(model))
    plain = plain_state(state, units)
    if draft is not None:
        entries, at, writer = list(draft.entries), dict(draft.at), draft.writer
        mine: list[PlanEntry] = []
        prior: dict[str, str] = {}
        adapters: set[str] | None = draft.adapters
        tied = draft.tied
    else:
        entries, at, writer, mine, prior = _index_edited(plan, model, state, plain, units)
        adapters, tied = None, ties.has_ties(plain)
    _complete(
        entries,
        at,
        writer,
        plain,
        prior,
        lambda: adapters if adapters is not None else adapter_keys(model, plain),
        tied,
    )
    checked = dataclasses.replace(plan, entries=[e for e in entries if e is not None] + mine)
    written = written_ids(checked.entries, state)
    _refuse(checked, model, plain, written, refuse_empty)
    initialise = None
    if any(isinstance(t, Tensor) and t.is_meta for t in state.values()):
        initialise = meta_to_initialise(model, written)
    return CheckedPlan(checked, model, state, units, frozenset(written), initialise)


def written_ids(entries: Iterable[PlanEntry], state: Mapping[str, Any]) -> set[int]:
    """ids of the model tensors ``entries`` give a value."""
    return {
        id(t)
        for e in entries
        if e.action in WRITES
        and e.model_key is not None
        and isinstance(t := state.get(e.model_key), Tensor)
    }


def _complete(
    entries: list[PlanEntry | None],
    at: dict[str, int],
    writer: Mapping[int, PlanEntry],
    state: Mapping[str, Tensor],
    prior: Mapping[str, str],
    adapters: Any,
    tied: bool,
) -> None:
    """Give every model key exactly one entry (in ``entries``, a copy the check owns); keys
    without a value are refined by the model. A tied tensor is planned once: its other keys
    are aliases (tied_to) of the entry that writes it, else of the first entry that plans it
    (a mismatch, a skip, a missing key)."""
    owners = _owners(entries, state) if tied else None
    known: set[str] | None = None
    for mkey, t in state.items():
        i = at.get(mkey)
        e = entries[i] if i is not None else None
        if e is not None and e.action not in NO_VALUE:
            continue
        w = writer.get(id(t))
        if w is None and owners is not None:
            w = owners.get(id(t))
        if w is not None and w.model_key != mkey:
            own = prior.get(mkey) if w.action in WRITES else None
            new = ties.alias(w, mkey, own)
        else:
            if known is None:
                known = adapters()
            new = _no_value_entry(mkey, t, known)
            if e is not None and e.action == new.action and e.model_shape == new.model_shape:
                if owners is not None:
                    owners.setdefault(id(t), e)
                continue
            if owners is not None:
                owners.setdefault(id(t), new)
        if i is None:
            at[mkey] = len(entries)
            entries.append(new)
        else:
            entries[i] = new


def _no_value_entry(mkey: str, t: Tensor, adapters: set[str]) -> PlanEntry:
    """The entry of a model key the checkpoint gives no value."""
    if mkey.endswith("num_batches_tracked"):
        action, reason = "defaulted", "counter left at its default"
    elif mkey in adapters and not t.is_meta:
        action, reason = "adapter", "PEFT adapter weight, left as it is"
    elif t.is_meta:
        action, reason = "initialise", "reset_parameters()"
    else:
        action, reason = "missing", "not in checkpoint"
    return PlanEntry(action, mkey, None, tuple(t.shape), None, dtype_name(t.dtype), reason=reason)


def _refuse(
    checked: PlanData,
    model: nn.Module,
    state: Mapping[str, Tensor],
    written: set[int],
    refuse_empty: bool,
) -> None:
    """Refuse what cannot be right, in the order load_partial always has."""
    mismatched = [e for e in checked.entries if e.action == "mismatch" and not e.tied_to]
    if mismatched and checked.on_mismatch == "error":
        items = [Mismatch.from_entry(e) for e in mismatched]
        raise LoadError(
            Advice(
                f"size mismatch loading {checked.source} into {checked.model} ({len(items)} "
                "keys):\n" + "\n".join(first_n_lines(items, _LIST)) + "\nNothing was loaded. Pass ",
                Fix("on_mismatch", "skip"),
                " to load the rest, ",
                Fix("skip"),
                " for a replaced head, or an adapter callable.",
            )
        )
    if checked.strict:
        message = strict_failure(checked, state)
        if message:
            raise LoadError(message)
    if refuse_empty and not written:
        n_ckpt = sum(1 for e in checked.entries if e.ckpt_key is not None and not e.tied_to)
        if n_ckpt:
            hint = prefix_hint(_mapped_names(checked), set(state), shapes=_shapes(checked, state))
            other = _other_shapes(checked) if "shapes differ" not in hint else ""
            raise LoadError(
                f"0 of {n_ckpt} checkpoint tensors match {type(model).__name__}. "
                + (" ".join(h for h in (hint, other) if h) if hint or other else _ARCH)
                + " Nothing was loaded."
            )


_ARCH = "Check that the checkpoint is for this architecture."


def _shapes(plan: PlanData, state: Mapping[str, Tensor]) -> Any:
    """(checkpoint shape, model shape) of a checkpoint key (by its mapped name) and a model
    key, for hints naming keys whose names line up but whose shapes do not."""
    ckpt = {e.model_key: e.ckpt_shape for e in plan.entries if e.ckpt_key is not None}

    def shapes(key: str, model_key: str) -> tuple[Any, Any] | None:
        t = state.get(model_key)
        if ckpt.get(key) is None or not isinstance(t, Tensor):
            return None
        return ckpt[key], tuple(t.shape)

    return shapes


def _other_shapes(plan: PlanData) -> str:
    """Why checkpoint tensors whose names are model keys loaded nothing: their shapes."""
    mismatched = [e for e in plan.entries if e.action == "mismatch" and not e.tied_to]
    if not mismatched:
        return ""
    first = Mismatch.from_entry(mismatched[0])
    example = escape_control(f"'{first.key}': {first.shapes()}")
    return Advice(
        f"The names match, the shapes differ: {len(mismatched)} checkpoint tensors have a "
        f"model key's name but another shape (e.g. {example}), so "
        f"the checkpoint is for another size or configuration of {plan.model}. Build the "
        "model with the checkpoint's sizes, or pass ",
        Fix("on_mismatch", "adapt", shown="on_mismatch=surgery.adapt_shapes"),
        " (or an adapter of your own, (name, ckpt, model) -> Tensor) to reshape them.",
    )


def _owners(entries: list[PlanEntry | None], state: Mapping[str, Tensor]) -> dict[int, PlanEntry]:
    """id(model tensor) -> the first entry (in the model's key order) that plans it with a
    value or a checkpoint tensor: what the tensor's other keys are aliases of."""
    out: dict[int, PlanEntry] = {}
    for e in sorted(
        (e for e in entries if e is not None and e.model_key in state and not e.tied_to),
        key=lambda e: e.action not in WRITES,
    ):
        if e.action not in NO_VALUE and e.action != "unexpected" and e.via is None:
            out.setdefault(id(state[e.model_key]), e)  # type: ignore[index]
    return out


def _index_edited(
    plan: PlanData,
    model: nn.Module,
    state: Mapping[str, Any],
    plain: Mapping[str, Tensor],
    units: Index,
) -> tuple[list[PlanEntry | None], dict[str, int], dict[int, PlanEntry], list, dict[str, str]]:
    """Index a plan that may have been edited or read back: check and refresh every entry.

    Returns its entries (surgery's own, then the units'), their index, and each alias's own
    checkpoint key (a tied checkpoint holding the tensor under the alias's name too); refuses
    model keys the model lacks, misfits, and two checkpoint keys writing one tied tensor.
    """
    todo, mine, unknown = plan.entries, [], []
    if units or any(e.via is not None for e in todo):
        todo, mine, unknown = split_entries(todo, units, state)
    entries: list[PlanEntry | None] = []
    at: dict[str, int] = {}
    writer: dict[int, PlanEntry] = {}
    misfit: list[str] = []
    uses: dict[str, list[str]] = {}  # checkpoint key -> actions naming it
    prior: dict[str, str] = {}
    conflicts: list[list[PlanEntry]] = []
    groups: set[tuple[str, tuple[str, ...]]] = set()  # a conversion's keys count once
    for e in todo:
        c = getattr(e, "conversion", None)
        if c is not None and not e.tied_to and c.group not in groups:
            groups.add(c.group)
            for k in c.keys:
                uses.setdefault(k, []).append("convert")
        e = _refreshed(e, plain, at, entries, uses, prior, unknown, misfit)
        if e is None:
            continue
        if e.model_key is not None and e.action != "unexpected" and e.model_key in plain:
            at[e.model_key] = len(entries)
            if e.action in WRITES:
                first = writer.setdefault(id(plain[e.model_key]), e)
                if first.ckpt_key != e.ckpt_key:
                    conflicts.append([first, e])
        entries.append(e)
    if conflicts:
        raise ties.conflict_error(conflicts, plan.source, plan.model)
    _refuse_edited(plan, model, plain, unknown, misfit, uses)
    return entries, at, writer, mine, prior


def _refreshed(
    e: Any,
    state: Mapping[str, Tensor],
    at: Mapping[str, int],
    entries: list[PlanEntry | None],
    uses: dict[str, list[str]],
    prior: dict[str, str],
    unknown: list[str],
    misfit: list[str],
) -> PlanEntry | None:
    """One entry of an edited plan against the model: refreshed (shapes, dtypes, load or
    cast), or ``None`` for an alias (re-derived) or a key the model lacks (``unknown``)."""
    if not isinstance(e, PlanEntry) or e.action not in ACTIONS:
        raise UsageError(
            f"plan entry {e!r} is not a PlanEntry with an action among {', '.join(ACTIONS)}"
        )
    if e.ckpt_key is not None and not e.tied_to:
        uses.setdefault(e.ckpt_key, []).append(e.action)
    if e.tied_to:  # aliases are re-derived from the model
        if e.model_key is not None and e.ckpt_key is not None:
            prior[e.model_key] = e.ckpt_key
        return None
    if e.action == "unexpected" or (e.action == "skip" and e.model_key is None):
        if e.ckpt_key is None and e.conversion is None:
            raise UsageError(f"plan entry {e!r} names no checkpoint key")
        return e
    mkey = e.model_key
    if mkey is None:
        raise UsageError(f"plan entry {e!r} ({e.action}) names no model key")
    t = state.get(mkey)
    if t is None:
        unknown.append(mkey)
        return None
    if mkey in at:
        first = entries[at[mkey]]
        raise KeyCollisionError(
            f"the plan has two entries for model key '{mkey}': {first.action} "  # type: ignore[union-attr]
            f"(from {first.ckpt_key!r}) and {e.action} (from {e.ckpt_key!r}). Only one can "  # type: ignore[union-attr]
            "give it a value: drop one with plan.drop() or edit plan.entries."
        )
    mshape, mdtype, action = tuple(t.shape), dtype_name(t.dtype), e.action
    if action in WRITES or action == "mismatch":
        if (e.ckpt_key is None and e.conversion is None) or e.ckpt_shape is None:
            raise UsageError(f"plan entry {e!r} ({action}) needs ckpt_key and ckpt_shape")
    if action in ("load", "cast", "convert") and (action == "convert") != (
        e.conversion is not None
    ):
        raise UsageError(f"plan entry {e!r}: a 'convert' entry, and only one, has a conversion")
    if action in ("load", "cast", "convert"):
        if e.ckpt_shape != mshape:
            misfit.append(
                f"{mkey}: checkpoint '{e.ckpt_key}' {format_shape(e.ckpt_shape)} vs "
                f"model {format_shape(mshape)}"
            )
        action = action if action == "convert" else copy_action(e.ckpt_dtype, mdtype)
    if action != e.action or mshape != e.model_shape or mdtype != e.model_dtype:
        e = dataclasses.replace(e, action=action, model_shape=mshape, model_dtype=mdtype)
    return e


def _refuse_edited(
    plan: PlanData,
    model: nn.Module,
    state: Mapping[str, Tensor],
    unknown: list[str],
    misfit: list[str],
    uses: Mapping[str, list[str]],
) -> None:
    shared = [k for k, acts in uses.items() if len(acts) > 1 and not set(acts) <= WRITES]
    if shared:
        k = shared[0]
        raise KeyCollisionError(
            f"checkpoint key '{k}' appears in {len(uses[k])} plan entries "
            f"({', '.join(uses[k])}); a key that is skipped, mismatched or unexpected "
            "cannot also be loaded. Use plan.rename(ckpt_key, model_key), which keeps one."
        )
    if unknown:
        near = closest(unknown[0], state)
        raise LoadError(
            f"the plan names {len(unknown)} model key(s) {plan.model or 'the plan'} has but "
            f"{type(model).__name__} does not: "
            + first_n(unknown, _LIST)
            + (f". Closest model keys: {', '.join(near)}" if near else "")
            + ". Was the plan made for another model? Plan again with surgery.plan_load()."
        )
    if misfit:
        raise LoadError(
            f"the plan loads {len(misfit)} checkpoint tensor(s) into {type(model).__name__} "
            "keys of another shape:\n"
            + "\n".join(first_n_lines(misfit, _LIST))
            + "\nNothing was loaded. Mark them 'mismatch' or drop them (plan.drop(...)), or "
            "plan again with surgery.plan_load()."
        )


def _mapped_names(plan: PlanData) -> list[str]:
    """Checkpoint keys under the names they were mapped to (for prefix hints)."""
    return [
        e.model_key
        for e in plan.entries
        if e.ckpt_key is not None and e.model_key is not None and not e.tied_to
    ]


def strict_failure(
    plan: PlanData, state: Mapping[str, Tensor], declined: Iterable[str] = ()
) -> str:
    """The ``strict=True`` error message for ``plan`` (``""`` when strict is satisfied).

    ``declined`` names ``adapt`` entries whose adapter returned ``None`` (mismatches after all).
    """
    declined = set(declined)
    tied: dict[str, list[str]] = {}  # a tied tensor is listed once, with its other keys
    for e in plan.entries:
        if e.tied_to and e.model_key is not None:
            tied.setdefault(e.tied_to, []).append(e.model_key)
    entries = [e for e in plan.entries if not e.tied_to]

    def named(e: PlanEntry, text: str) -> str:
        aliases = tied.get(e.key)
        return f"{text} (tied: {', '.join(aliases)})" if aliases else text

    missing = [named(e, e.key) for e in entries if e.action in ("missing", "initialise")]
    unexpected = [e.key for e in entries if e.action == "unexpected"]
    mismatched = [
        named(e, str(Mismatch.from_entry(e)))
        for e in entries
        if e.action == "mismatch" or (e.action == "adapt" and e.model_key in declined)
    ]
    if not (missing or unexpected or mismatched):
        return ""
    parts = [
        f"Error(s) loading {plan.source} into {plan.model} with strict=True "
        f"({len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(mismatched)} mismatched):"
    ]
    for title, items in (
        ("missing from checkpoint", missing),
        ("unexpected (not in model)", unexpected),
        ("size mismatch", mismatched),
    ):
        if items:
            parts.append(f"  {title}:")
            parts += first_n_lines(items, _LIST)
    hint = (
        prefix_hint(
            _mapped_names(plan),
            set(state),
            or_auto=not plan.auto_prefix,
            shapes=_shapes(plan, state),
        )
        if missing
        else ""
    )
    return Advice(
        "\n".join(p for p in parts if p),
        *(("\n", hint) if hint else ()),
        "\nNothing was loaded. Use ",
        Fix("strict", False),
        " to load what fits, or ",
        Fix("skip"),
        " for the keys you mean to leave out (e.g. ",
        Fix("skip", "fc.*"),
        " for a replaced head).",
    )


def meta_to_initialise(model: nn.Module, written: set[int] | frozenset[int]) -> Initialise:
    """Modules holding ``meta`` tensors that nothing writes, and those tensors' keys.

    Raises ``LoadError`` (before any write) when such a module has no ``reset_parameters()``.
    """
    modules: list[nn.Module] = []
    keys: list[str] = []
    no_reset: list[str] = []
    seen: set[int] = set()  # a tied tensor is listed once, under its first key
    for mname, mod in model.named_modules():
        pending = [
            (n, n in mod._non_persistent_buffers_set, id(t))
            for n, t in [*mod._parameters.items(), *mod._buffers.items()]
            if t is not None and t.is_meta and id(t) not in written
        ]
        if not pending:
            continue
        full = [f"{mname}.{n}" if mname else n for n, _, _ in pending]
        if not callable(getattr(mod, "reset_parameters", None)):
            no_reset += [f"{k} ({type(mod).__name__})" for k in full]
            continue
        modules.append(mod)
        for k, (_, nonpersistent, tid) in zip(full, pending, strict=True):
            if not nonpersistent and tid not in seen:
                keys.append(k)
            seen.add(tid)
    if no_reset:
        raise LoadError(
            f"{type(model).__name__} is on the meta device and these tensors get no value: "
            + first_n(no_reset, _LIST)
            + ". They are not in the checkpoint and their module has no reset_parameters() "
            "to initialise them. Build the model with surgery.empty_init() (keeps buffers "
            "real) or on CPU, or load a checkpoint that has them. Nothing was loaded."
        )
    return modules, keys
