"""Modules that load themselves: planned and applied through their own loading code.

``load_partial`` writes checkpoint tensors straight into the model. Some modules need more
than that from ``load_state_dict``: they override ``_load_from_state_dict`` (torchvision's
``MLPBlock`` renames old ViT keys, quantization observers resize their buffers, a dynamically
quantized ``Linear`` repacks its weights), save non-tensor state (``_save_to_state_dict``),
keep an extra state (``get_extra_state`` / ``set_extra_state``) or carry load pre/post hooks.

Such a module, with everything below it, is a *unit*: its checkpoint entries are handed to
the module's own loading exactly as ``load_state_dict`` would hand them over. To keep
"nothing written on error", that loading first runs on a private copy of the unit (a
*rehearsal*): at planning, to learn which checkpoint entries it takes, under which model
keys, and what it reports missing, unexpected or wrong; at apply, again, before the first
write. Only when every rehearsal succeeded does the real module load (the same entries, the
same code), after surgery's own writes. Planning reads the tensors of units (only those).

Plan entries of a unit carry ``via``: the name the entry is handed to the module under
(before the module's own renaming). Torch's ``_metadata`` (module versions) is passed on when
the checkpoint has it; without it (safetensors) modules see no version, as they would with
``model.load_state_dict(safetensors.torch.load_file(...))``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from .. import meta
from .._text import escape_control
from ..errors import Advice, CheckpointError, Fix, LoadError
from ..sources import CheckpointSource

_LIST = 12

# Overrides that only fill in what surgery plans itself (``num_batches_tracked`` of old
# checkpoints is planned ``defaulted``): those modules load like any other.
_PLAIN_LOADERS = frozenset({nn.Module._load_from_state_dict, _NormBase._load_from_state_dict})

_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<key>\S+): copying a param with shape "
    r"torch\.Size\(\[(?P<ckpt>[\d, ]*)\]\) from checkpoint, the shape in current model is "
    r"torch\.Size\(\[(?P<model>[\d, ]*)\]\)"
)


@dataclass
class Unit:
    """An outermost module that loads itself, at ``prefix`` (``"name."``, ``""`` for the root)."""

    prefix: str
    module: nn.Module
    why: str

    @property
    def name(self) -> str:
        return self.prefix[:-1] if self.prefix else "(the model)"

    def describe(self) -> str:
        return f"'{self.name}' ({type(self.module).__name__}, {self.why})"


def loads_itself(module: nn.Module) -> str | None:
    """Why ``load_state_dict`` does more for ``module`` than copy its tensors (or ``None``)."""
    why = _type_why(type(module))
    if why is None:
        if _own_hooks(module._load_state_dict_pre_hooks):
            return "a load_state_dict pre-hook"
        if _own_hooks(module._load_state_dict_post_hooks):
            return "a load_state_dict post-hook"
    return why


def _own_hooks(hooks: Mapping[int, Any]) -> bool:
    """Hooks other than FSDP2's: ``fully_shard`` adds a post-hook that re-registers the
    sharded parameters after ``load_state_dict``; surgery writes into those shards in place,
    so the parameters stay registered and the hook has nothing to do."""
    return any(
        not str(getattr(getattr(h, "hook", h), "__module__", "")).startswith(
            "torch.distributed.fsdp"
        )
        for h in hooks.values()
    )


_TYPE_WHY: weakref.WeakKeyDictionary[type, str | None] = weakref.WeakKeyDictionary()


def _type_why(t: type) -> str | None:
    try:
        return _TYPE_WHY[t]
    except KeyError:
        pass
    name = t.__name__
    why = None
    if t._load_from_state_dict not in _PLAIN_LOADERS:  # type: ignore[attr-defined]
        why = f"its own {name}._load_from_state_dict"
    elif t._save_to_state_dict is not nn.Module._save_to_state_dict:  # type: ignore[attr-defined]
        why = f"its own {name}._save_to_state_dict"
    elif t.get_extra_state is not nn.Module.get_extra_state:  # type: ignore[attr-defined]
        why = f"{name}.set_extra_state"
    _TYPE_WHY[t] = why
    return why


def find_units(model: nn.Module) -> list[Unit]:
    """The outermost modules of ``model`` that load themselves, in ``state_dict()`` order.

    One walk over the modules (a plain stack: ``named_modules()`` costs several times more
    on models with tens of thousands of modules).
    """
    units: list[Unit] = []
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        prefix, mod = stack.pop()
        why = loads_itself(mod)
        if why is not None:
            units.append(Unit(prefix, mod, why))
            continue
        children = mod._modules
        if children:
            stack.extend(
                (f"{prefix}{n}.", c) for n, c in reversed(children.items()) if c is not None
            )
    return units


class Index:
    """Which unit a model-side name belongs to (by its dotted module path)."""

    def __init__(self, units: list[Unit]) -> None:
        self.units = units
        self._by_prefix = {u.prefix: u for u in units}
        self._root = self._by_prefix.get("")

    def __bool__(self) -> bool:
        return bool(self.units)

    def unit_of(self, name: str) -> Unit | None:
        if self._root is not None:
            return self._root
        by = self._by_prefix
        i = name.find(".")
        while i != -1:
            u = by.get(name[: i + 1])
            if u is not None:
                return u
            i = name.find(".", i + 1)
        return None


def plain_state(state: Mapping[str, Any], index: Index) -> dict[str, Tensor]:
    """The model's tensors that surgery writes itself: not in a unit, tensors only."""
    if not index:
        return state  # type: ignore[return-value]
    return {k: v for k, v in state.items() if isinstance(v, Tensor) and index.unit_of(k) is None}


# --------------------------------------------------------------------------- rehearsal


@dataclass
class Rehearsal:
    """What a unit's own loading did on a private copy. Names are relative to the unit."""

    unit: Unit
    fed: dict[str, str]  # name handed over -> checkpoint key
    copy: nn.Module
    took: dict[str, str] = field(default_factory=dict)  # model key -> name it was copied from
    made: set[str] = field(default_factory=set)  # model keys given a value nobody handed over
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def feed(unit: Unit, fed: Mapping[str, str], source: CheckpointSource) -> OrderedDict[str, Any]:
    """The state dict a unit's loading receives: ``fed`` (unit-relative name -> checkpoint
    key) read from ``source``, with the checkpoint's ``_metadata`` made unit-relative."""
    sd: OrderedDict[str, Any] = OrderedDict()
    for rel, ckey in fed.items():
        sd[rel] = source.extras[ckey] if ckey in source.extras else source.read(ckey)
    metadata = _unit_metadata(unit, fed, source.metadata)
    if metadata is not None:
        sd._metadata = metadata  # type: ignore[attr-defined]
    return sd


def _unit_metadata(
    unit: Unit, fed: Mapping[str, str], metadata: Mapping[str, dict] | None
) -> dict[str, dict] | None:
    if metadata is None:
        return None
    cprefix = None
    for rel, ckey in fed.items():  # the checkpoint's name for the unit's module
        if ckey.endswith(rel):
            cprefix = ckey[: len(ckey) - len(rel)]
            break
    if cprefix is None:
        return None
    out: dict[str, dict] = {}
    for mk, v in metadata.items():
        full = f"{mk}." if mk else ""
        if full.startswith(cprefix):
            out[full[len(cprefix) :].removesuffix(".")] = dict(v)
    return out


def rehearse(unit: Unit, fed: dict[str, str], source: CheckpointSource) -> Rehearsal:
    """Run ``unit``'s own loading on a private copy; the real module is not touched.

    Exceptions raised by the module's code become ``LoadError``; torch's own error messages
    (size mismatches, ...) are collected in ``errors`` for the caller to judge.
    """
    try:
        private = copy.deepcopy(unit.module)
    except Exception as ex:
        raise LoadError(
            Advice(
                f"{unit.describe()} loads itself, and surgery could not make a private copy of "
                f"it to check that loading before writing (copy.deepcopy raised "
                f"{type(ex).__name__}: {ex}). Nothing was loaded. Leave it out with ",
                Fix("skip", unit.name),
                " and load it with its own load_state_dict.",
            )
        ) from ex
    pending = [t for t in _tensors(private) if t.is_meta]
    if pending:  # real memory, so that the module's copies (and its reads) do something
        owners = meta.holders(private)
        for t in pending:
            if id(t) in owners:
                meta.replace(t, torch.empty(t.shape, dtype=t.dtype), owners.pop(id(t)))
    seen: dict[str, Any] = {}  # model key -> the object it was copied from
    lists: dict[str, list[str]] = {}

    def track(module, sd, prefix, _meta, _strict, missing, unexpected, errors) -> None:  # type: ignore[no-untyped-def]
        # Registered last, so it sees the dict after the module's own renaming.
        lists.update(missing=missing, unexpected=unexpected, errors=errors)
        names = [n for n, t in module._parameters.items() if t is not None]
        names += [
            n
            for n, t in module._buffers.items()
            if t is not None and n not in module._non_persistent_buffers_set
        ]
        if type(module).get_extra_state is not nn.Module.get_extra_state:
            names.append("_extra_state")
        for n in names:
            k = prefix + n
            if k in sd:
                seen[k] = sd[k]

    for m in private.modules():
        m.register_load_state_dict_pre_hook(track)
    sd = feed(unit, fed, source)
    by_id = {id(v): rel for rel, v in sd.items()}
    result = Rehearsal(unit, dict(fed), private)
    try:
        incompatible = private.load_state_dict(sd, strict=False)
        result.missing = list(incompatible.missing_keys)
        result.unexpected = list(incompatible.unexpected_keys)
    except RuntimeError as ex:
        if "errors" not in lists or not lists["errors"]:
            raise _raised(unit, ex) from ex
        result.missing = list(lists["missing"])
        result.unexpected = list(lists["unexpected"])
        result.errors = [str(e) for e in lists["errors"]]
    except Exception as ex:
        raise _raised(unit, ex) from ex
    missing = set(result.missing)
    for k in private.state_dict(keep_vars=True):
        if k in missing:
            continue
        src = seen.get(k)
        rel = by_id.get(id(src)) if src is not None else None
        if rel is None and k in fed:
            rel = k  # taken by the module's own code under its own name
        if rel is not None:
            result.took[k] = rel
        else:
            result.made.add(k)
    return result


def _raised(unit: Unit, ex: BaseException) -> LoadError:
    return LoadError(
        Advice(
            f"{unit.describe()} loads itself, and its loading raised {type(ex).__name__}: "
            f"{ex}. Nothing was loaded. Check that the checkpoint was saved from this kind of "
            "module (torch.save(model.state_dict()) keeps the module versions it needs), or "
            "leave it out with ",
            Fix("skip", unit.name),
            ".",
        )
    )


def size_mismatches(
    r: Rehearsal,
) -> tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...]]], list[str]]:
    """Torch's size-mismatch errors as model key -> (checkpoint shape, model shape); the rest."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    other: list[str] = []
    for msg in r.errors:
        m = _SIZE_MISMATCH.match(msg)
        if m is None:
            other.append(msg)
        else:
            shapes[m["key"]] = (_shape(m["ckpt"]), _shape(m["model"]))
    return shapes, other


def _shape(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def refuse(unit: Unit, errors: list[str], when: str) -> LoadError:
    lines = [f"    {e}" for e in errors[:_LIST]]
    if len(errors) > _LIST:
        lines.append(f"    ... and {len(errors) - _LIST} more")
    return LoadError(
        Advice(
            f"{unit.describe()} loads itself, and {when} it reported {len(errors)} error(s):\n"
            + "\n".join(lines)
            + "\nNothing was loaded. Leave it out with ",
            Fix("skip", unit.name),
            ", or plan again with surgery.plan_load() if the checkpoint changed.",
        )
    )


# --------------------------------------------------------------------------- writing


def _tensors(module: nn.Module) -> list[Tensor]:
    return [
        t
        for m in module.modules()
        for t in [*m._parameters.values(), *m._buffers.values()]
        if t is not None
    ]


@torch.no_grad()
def commit(model: nn.Module, rehearsals: list[Rehearsal], source: CheckpointSource) -> None:
    """Load every rehearsed unit for real: the same entries through the same code.

    Meta tensors of a unit are first given real (empty) memory in every module holding
    them, as surgery's own writes do, so that the module's copies land somewhere.
    """
    owners: dict[int, list[tuple[nn.Module, str, bool]]] | None = None
    for r in rehearsals:
        mod = r.unit.module
        pending = [t for t in _tensors(mod) if t.is_meta]
        if pending:
            owners = owners if owners is not None else meta.holders(model)
            for t in pending:
                if id(t) in owners:
                    meta.replace(t, torch.empty(t.shape, dtype=t.dtype), owners.pop(id(t)))
        try:
            mod.load_state_dict(feed(r.unit, r.fed, source), strict=False)
        except Exception as ex:  # the rehearsal succeeded: this is the module's own doing
            raise LoadError(
                f"{r.unit.describe()} loaded on a private copy but raised {type(ex).__name__} "
                f"on the model itself: {ex}. The model is partly loaded; rebuild it before "
                "trying again."
            ) from ex


# --------------------------------------------------------------------------- planning


def plan_units(
    index: Index,
    new_to_old: dict[str, str],
    source: CheckpointSource,
    state: Mapping[str, Any],
    skipped: set[str] | None,
    adapter: bool,
) -> tuple[dict[str, str], list, list[str]]:
    """Plan every unit: returns the names left for surgery's own planning, the units'
    entries, and notes. Checkpoint entries that are not tensors and belong to no unit are
    planned ``unexpected``."""
    from .plan import PlanEntry, dtype_name

    rest: dict[str, str] = {}
    entries: list[PlanEntry] = []
    notes: list[str] = []
    fed_by: dict[str, dict[str, str]] = {u.prefix: {} for u in index.units}
    misplaced: list[str] = []  # non-tensor values under the name of a model tensor
    for name, ckey in new_to_old.items():
        u = index.unit_of(name) if index else None
        if u is not None:
            fed_by[u.prefix][name[len(u.prefix) :]] = ckey
        elif ckey in source.extras:
            what = type(source.extras[ckey]).__name__
            if isinstance(state.get(name), Tensor) and not (skipped and name in skipped):
                misplaced.append(f"'{escape_control(ckey)}' ({what})")
                continue
            entries.append(
                PlanEntry(
                    "unexpected",
                    name,
                    ckey,
                    reason=f"not a tensor ({what}); no module of the model loads it itself",
                )
            )
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
    keys_by: dict[str, list[str]] = {u.prefix: [] for u in index.units}
    for k in state:
        u = index.unit_of(k) if index else None
        if u is not None:
            keys_by[u.prefix].append(k)

    def spec(ckey: str) -> tuple[tuple[int, ...] | None, str | None]:
        s = source.specs.get(ckey)
        return (tuple(s[0]), dtype_name(s[1])) if s is not None else (None, None)

    adapted_away: list[str] = []
    for u in index.units:
        p = u.prefix
        fed = fed_by[p]
        r = rehearse(u, fed, source) if fed else None
        mism: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        if r is not None:
            mism, other = size_mismatches(r)
            if other:
                raise refuse(u, other, "loading it on a private copy")
        taken: set[str] = set(r.took.values()) if r is not None else set()
        via = f"via {u.why}"
        for k in keys_by[p]:
            rel = k[len(p) :]
            t = state[k]
            mshape, mdtype = (
                (tuple(t.shape), dtype_name(t.dtype)) if isinstance(t, Tensor) else (None, None)
            )
            if r is not None and rel in r.took:
                src = r.took[rel]
                ckey = fed[src]
                cshape, cdtype = spec(ckey)
                if rel in mism:
                    action, reason = "mismatch", via
                    cshape, mshape = mism[rel]
                    if adapter:
                        adapted_away.append(k)
                elif skipped and k in skipped:
                    action, reason = "skip", "skipped as asked"
                else:
                    action = "cast" if cdtype is not None and cdtype != mdtype else "load"
                    reason = via
                entries.append(
                    PlanEntry(action, k, ckey, mshape, cshape, mdtype, cdtype, reason, via=p + src)
                )
            elif r is not None and rel in r.made:
                entries.append(
                    PlanEntry(
                        "load", k, None, mshape, None, mdtype, reason=f"set by {u.why}", via=k
                    )
                )
            else:
                if k.endswith("num_batches_tracked"):
                    action, reason = "defaulted", "counter left at its default"
                elif isinstance(t, Tensor) and t.is_meta:
                    action, reason = "initialise", "reset_parameters()"
                else:
                    action, reason = "missing", "not in checkpoint"
                entries.append(PlanEntry(action, k, None, mshape, None, mdtype, reason, via=k))
        for rel, ckey in fed.items():
            if rel in taken:
                continue
            cshape, cdtype = spec(ckey)
            if r is not None and rel in r.unexpected:
                action, key, reason = "unexpected", p + rel, f"not taken by {u.name}"
            else:  # consumed by the module's own code (renamed away, packed, ...)
                action, key, reason = "load", None, f"taken by {u.why}"
            entries.append(
                PlanEntry(action, key, ckey, None, cshape, None, cdtype, reason, via=p + rel)
            )
    if adapted_away:
        notes.append(
            f"{len(adapted_away)} mismatched tensor(s) of modules that load themselves were not "
            "adapted (the adapter runs on surgery's own writes only): "
            + ", ".join(adapted_away[:_LIST])
        )
    return rest, entries, notes


def is_unit_entry(e: Any, index: Index) -> bool:
    return e.via is not None or (e.model_key is not None and index.unit_of(e.model_key) is not None)


def split_entries(
    entries: list, index: Index, state: Mapping[str, Any]
) -> tuple[list, list, list[str]]:
    """An edited or read-back plan's entries: (surgery's own, the units', unknown model keys).

    Unit entries without ``via`` (from :meth:`LoadPlan.rename`, older plans) are handed over
    under their model key; unit keys with no entry are planned ``missing``.
    """
    from .plan import PlanEntry, dtype_name

    plain: list = []
    mine: list = []
    unknown: list[str] = []
    planned: set[str] = set()
    for e in entries:
        if not is_unit_entry(e, index):
            plain.append(e)
            continue
        if e.via is None:
            e = dataclasses.replace(e, via=e.model_key)
        if index.unit_of(e.via) is None or (
            e.model_key is not None and e.action != "unexpected" and e.model_key not in state
        ):
            unknown.append(e.key)
            continue
        if e.model_key is not None:
            planned.add(e.model_key)
        mine.append(e)
    for k, t in state.items():
        if k in planned or index.unit_of(k) is None:
            continue
        shape, dtype = (
            (tuple(t.shape), dtype_name(t.dtype)) if isinstance(t, Tensor) else (None, None)
        )
        mine.append(PlanEntry("missing", k, None, shape, None, dtype, "not in checkpoint", via=k))
    return plain, mine, unknown


def rehearse_plan(plan: Any, index: Index, source: CheckpointSource) -> list[Rehearsal]:
    """Rehearse every unit the checked ``plan`` feeds, before the first write; refuse on any
    error, or when a planned key would get no value."""
    from .plan import WRITES

    fed_by: dict[str, dict[str, str]] = {}
    planned: dict[str, list[str]] = {}
    for e in plan.entries:
        if e.via is None or e.action not in WRITES:
            continue
        u = index.unit_of(e.via)
        if u is None:
            continue  # checked by validate
        if e.ckpt_key is not None:
            fed_by.setdefault(u.prefix, {})[e.via[len(u.prefix) :]] = e.ckpt_key
        if e.model_key is not None:
            planned.setdefault(u.prefix, []).append(e.model_key[len(u.prefix) :])
    out: list[Rehearsal] = []
    for u in index.units:
        fed = fed_by.get(u.prefix)
        if not fed:
            continue
        r = rehearse(u, fed, source)
        if r.errors:
            raise refuse(u, r.errors, "loading it on a private copy before writing")
        lost = [
            u.prefix + k for k in planned.get(u.prefix, []) if k not in r.took and k not in r.made
        ]
        if lost:
            raise LoadError(
                f"{u.describe()} loads itself, and its loading no longer gives "
                f"{', '.join(lost[:_LIST])} a value as the plan says. Nothing was loaded. Plan "
                "again with surgery.plan_load()."
            )
        r.copy = None  # type: ignore[assignment]  # only the verdict is kept
        out.append(r)
    return out
