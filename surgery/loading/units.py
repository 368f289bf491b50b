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

The planning and applying steps are :mod:`surgery.loading.handlers.selfloading`; this module
knows the units and runs their loading. Plan entries of a unit carry ``via``: the name the entry
is handed to the module under (before the module's own renaming). Torch's ``_metadata`` (module
versions) is passed on when the checkpoint has it; without it (safetensors) modules see no
version, as they would with ``model.load_state_dict(safetensors.torch.load_file(...))``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from .._tensors import Holders, dtype_name, holders, replace
from ..errors import Advice, Fix, LoadError
from ..sources import CheckpointSource
from .entries import PlanEntry

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
    materialise(private, lambda: holders(private))  # so the module's copies do something
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


def _tensors(module: nn.Module) -> list[Tensor]:
    return [
        t
        for m in module.modules()
        for t in [*m._parameters.values(), *m._buffers.values()]
        if t is not None
    ]


def materialise(module: nn.Module, owners: Callable[[], Holders]) -> None:
    """Give every ``meta`` tensor of ``module`` real (empty) memory in every module holding
    it; ``owners`` gives the holders (of the whole model, looked up only when needed)."""
    pending = [t for t in _tensors(module) if t.is_meta]
    if not pending:
        return
    where = owners()
    for t in pending:
        if id(t) in where:
            replace(t, torch.empty(t.shape, dtype=t.dtype), where.pop(id(t)))


# --------------------------------------------------------------------------- plan entries


def is_unit_entry(e: PlanEntry, index: Index) -> bool:
    return e.via is not None or (e.model_key is not None and index.unit_of(e.model_key) is not None)


def split_entries(
    entries: list[PlanEntry], index: Index, state: Mapping[str, Any]
) -> tuple[list[PlanEntry], list[PlanEntry], list[str]]:
    """An edited or read-back plan's entries: (surgery's own, the units', unknown model keys).

    Unit entries without ``via`` (from :meth:`LoadPlan.rename`, older plans) are handed over
    under their model key; unit keys with no entry are planned ``missing``.
    """
    plain: list[PlanEntry] = []
    mine: list[PlanEntry] = []
    unknown: list[str] = []
    planned: set[str] = set()
    for e in entries:
        if not is_unit_entry(e, index):
            plain.append(e)
            continue
        if e.via is None:
            e = dataclasses.replace(e, via=e.model_key)
        if index.unit_of(str(e.via)) is None or (
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
