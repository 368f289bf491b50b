"""The load plan: what loading a checkpoint into a model will do, as plain data.

:func:`plan_load` reads checkpoint names, shapes and dtypes (file headers, never tensor
bytes), maps checkpoint keys onto model keys and checks everything. The :class:`LoadPlan` it
returns holds one :class:`PlanEntry` per model key and per checkpoint key. It can be read,
edited (:meth:`LoadPlan.drop`, :meth:`LoadPlan.rename`), saved as JSON and applied later
(:meth:`LoadPlan.apply`, see :mod:`surgery.apply`). ``load_partial`` is
``plan_load(...).apply(model)``.

Actions, one per entry:

==============  ============================================================================
``load``        the checkpoint tensor is copied into the model key (same shape and dtype)
``cast``        the same, with a dtype cast (e.g. float16 -> float32)
``adapt``       shapes differ; the ``on_mismatch`` adapter makes the value at apply time
``skip``        left out on purpose: ``skip=`` matched the model key, ``remap`` dropped the
                checkpoint key (``model_key`` is ``None``), or :meth:`LoadPlan.drop`
``mismatch``    shapes differ and nothing adapts them: not loaded
``missing``     a model key the checkpoint has no tensor for: keeps its current value
``unexpected``  a checkpoint key the model has no tensor for (``model_key`` holds the name it
                was mapped to, if that differs from ``ckpt_key``)
``defaulted``   a missing ``num_batches_tracked`` counter: keeps its default, not an error
``initialise``  a missing key of a model on the ``meta`` device: its module's
                ``reset_parameters()`` gives it a value (counts as missing for ``strict``)
``adapter``     a PEFT adapter weight (``lora_A``, ``lora_B``, ...) of a model wrapped by
                ``peft.get_peft_model`` that the checkpoint does not hold: left as it is, not
                missing. Base weights are mapped through the wrapper's names
                (``base_model.model.``, ``.base_layer.``; a ``modules_to_save`` module gets the
                checkpoint tensor in its active copy and in ``original_module``)
==============  ============================================================================

Modules that load themselves (an own ``_load_from_state_dict``, load hooks, an extra state,
non-tensor state such as a dynamically quantized ``Linear``'s packed weights) get their
checkpoint entries through their own loading, as ``load_state_dict`` would give them;
their entries name in ``via`` the key they are handed over under. See
:mod:`surgery._selfload`: planning reads those modules' tensors (only those).

Tied parameters (one tensor under several model keys): the tensor is planned once, by the
first of its keys that the checkpoint gives a value (else the first that plans it at all);
its other keys are aliases with that entry's action and ``tied_to`` naming it. An alias
keeps its own checkpoint key when the checkpoint holds the same tensor under that name too
(one storage, as ``torch.save`` keeps a tied model). Two *different* checkpoint tensors for
one tied tensor are refused (``KeyCollisionError``, naming both and the ``skip=`` that picks
one): which one the model held would depend on the order of the keys. Apply writes each
tensor once; counts and the report's lists name each tensor once, ``report.loaded`` every
key that holds loaded values and ``report.tied`` the aliases. Alias entries are re-derived
from the model by :meth:`LoadPlan.check`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from .._args import require_module
from .._names import closest
from .._table import first_n, first_n_lines, format_shape, text_table
from .._text import escape_control
from ..errors import Advice, Fix, KeyCollisionError, LoadError, UsageError
from ..keys import peft as _peft
from ..keys import ties as _ties
from ..keys.prefix import apply_prefix, detect_prefix, prefix_hint
from ..keys.remap import Remap, apply_remap
from ..keys.select import Selector, match_keys
from ..sources import CheckpointLike, CheckpointSource, open_source
from . import selfload as _selfload
from .distributed import model_class_name
from .report import Mismatch

if TYPE_CHECKING:
    from .report import LoadReport

__all__ = ["ACTIONS", "LoadPlan", "PlanEntry", "plan_load"]

Adapter = Callable[[str, Tensor, Tensor], Tensor | None]
OnMismatch = Literal["skip", "error"] | Adapter

ACTIONS = (
    "load",
    "cast",
    "adapt",
    "skip",
    "mismatch",
    "missing",
    "unexpected",
    "defaulted",
    "initialise",
    "adapter",
)
WRITES = frozenset({"load", "cast", "adapt"})  # actions that give a model key a value
_NO_VALUE = frozenset({"missing", "defaulted", "initialise", "adapter"})
_FORMAT = 1  # version of the to_dict() layout

_LIST = 12  # keys listed per category in an error message


# --------------------------------------------------------------------------- data


@dataclass(slots=True)
class PlanEntry:
    """One step of a load: what happens to one model key, one checkpoint key, or a pair.

    Shapes are tuples of ints and dtypes names such as ``"float32"``, so an entry is plain
    JSON-able data. ``reason`` is a short human note (``"dropped by remap"``). ``via`` is
    set on the entries of a module that loads itself: the name the checkpoint entry is
    handed to that module's loading under (before its own renaming); shapes are ``None``
    for non-tensor entries (packed weights, a dict extra state).
    """

    action: str
    model_key: str | None
    ckpt_key: str | None
    model_shape: tuple[int, ...] | None = None
    ckpt_shape: tuple[int, ...] | None = None
    model_dtype: str | None = None
    ckpt_dtype: str | None = None
    reason: str = ""
    tied_to: str | None = None
    via: str | None = None  # handed to its module's own loading under this name

    @property
    def key(self) -> str:
        """The name to show: the model key, or the checkpoint key when there is none."""
        return self.model_key if self.model_key is not None else str(self.ckpt_key)

    def to_dict(self) -> dict:
        return {
            "action": self.action,
            "model_key": self.model_key,
            "ckpt_key": self.ckpt_key,
            "model_shape": None if self.model_shape is None else list(self.model_shape),
            "ckpt_shape": None if self.ckpt_shape is None else list(self.ckpt_shape),
            "model_dtype": self.model_dtype,
            "ckpt_dtype": self.ckpt_dtype,
            "reason": self.reason,
            "tied_to": self.tied_to,
            "via": self.via,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanEntry:
        if not isinstance(d, Mapping) or d.get("action") not in ACTIONS:
            raise UsageError(
                f"not a plan entry: {d!r}; each entry needs an 'action' among {', '.join(ACTIONS)}"
            )
        try:
            return cls(
                action=d["action"],
                model_key=_opt_str(d.get("model_key")),
                ckpt_key=_opt_str(d.get("ckpt_key")),
                model_shape=_opt_shape(d.get("model_shape")),
                ckpt_shape=_opt_shape(d.get("ckpt_shape")),
                model_dtype=_opt_str(d.get("model_dtype")),
                ckpt_dtype=_opt_str(d.get("ckpt_dtype")),
                reason=str(d.get("reason") or ""),
                tied_to=_opt_str(d.get("tied_to")),
                via=_opt_str(d.get("via")),
            )
        except (TypeError, ValueError) as e:
            raise UsageError(f"malformed plan entry {dict(d)!r}: {e}") from None


def _opt_str(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise TypeError(f"expected a string or null, got {v!r}")


def _opt_shape(v: Any) -> tuple[int, ...] | None:
    if v is None:
        return None
    if isinstance(v, (str, bytes)) or not all(isinstance(s, int) for s in v):
        raise TypeError(f"a shape is a list of ints, got {v!r}")
    return tuple(v)


@dataclass(repr=False)
class LoadPlan:
    """What loading a checkpoint into a model will do: the entries, and where they came from.

    Built by :func:`plan_load`; plain data you can read (``plan.entries``, :meth:`find`,
    :meth:`counts`, ``print(plan)``), edit (:meth:`drop`, :meth:`rename`, or change the
    ``entries`` list), save (:meth:`to_dict` / :meth:`from_dict`, JSON-safe) and apply
    (:meth:`apply`). Edits take effect in place and return the plan, so calls chain.

    ``source`` describes the checkpoint, ``path`` is its file (``None`` for an in-memory dict
    or module: pass ``ckpt=`` to :meth:`apply` after a JSON round trip), ``entry`` the
    container entry it was read from. ``prefix`` is the ``(strip, add)`` rewrite applied to
    checkpoint keys. ``strict`` and ``on_mismatch`` (``"skip"``, ``"error"`` or the adapter's
    name) are the options it was planned with. ``checkpoint`` and ``adapter`` hold the objects
    passed to :func:`plan_load`; they are not saved by :meth:`to_dict`.

    Example:
        >>> plan = surgery.plan_load(model, "resnet18.pth")  # doctest: +SKIP
        >>> plan.drop("layer1").rename("classifier.weight", "fc.weight")  # doctest: +SKIP
        >>> report = plan.apply(model)  # doctest: +SKIP
    """

    entries: list[PlanEntry] = field(default_factory=list)
    source: str = ""
    model: str = ""
    path: str | None = None
    entry: str | None = None
    prefix: tuple[str, str] | None = None
    auto_prefix: bool = True
    notes: list[str] = field(default_factory=list)
    strict: bool = False
    on_mismatch: str = "skip"
    trust_pickle: bool = False
    checkpoint: Any = field(default=None, compare=False)
    adapter: Adapter | None = field(default=None, compare=False)
    allow_globals: tuple[Any, ...] = field(default=(), compare=False)

    # ------------------------------------------------------------------ reading

    def __iter__(self) -> Iterator[PlanEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def counts(self) -> dict[str, int]:
        """Entries per action, in the order of :data:`ACTIONS` (actions with none left out).

        A tied tensor counts once: its aliases (``tied_to``) are not counted again.
        """
        n = dict.fromkeys(ACTIONS, 0)
        for e in self.entries:
            if not e.tied_to:
                n[e.action] = n.get(e.action, 0) + 1
        return {a: c for a, c in n.items() if c}

    def find(
        self, *selectors: Selector, action: str | Iterable[str] | None = None
    ) -> list[PlanEntry]:
        """Entries whose model or checkpoint key matches any selector, and/or with ``action``.

        Selectors are name patterns (``"fc.*"``, ``"layer1"``, ``"re:..."``), resolved as
        everywhere in surgery; one that matches no key raises ``SelectorError``.

        Example:
            >>> [e.model_key for e in plan.find(action="mismatch")]  # doctest: +SKIP
            ['fc.weight', 'fc.bias']
        """
        return [self.entries[i] for i in self._indices(selectors, action, "find")]

    def _indices(
        self, selectors: tuple[Selector, ...], action: str | Iterable[str] | None, verb: str
    ) -> list[int]:
        actions: set[str] | None = None
        if action is not None:
            actions = {action} if isinstance(action, str) else set(action)
            unknown = actions - set(ACTIONS)
            if unknown:
                raise UsageError(
                    f"{verb}: unknown action {sorted(unknown)}; actions are {', '.join(ACTIONS)}"
                )
        hit: set[str] | None = None
        if selectors:
            keys = {k for e in self.entries for k in (e.model_key, e.ckpt_key) if k is not None}
            hit = match_keys(list(selectors), keys, action=verb, owner=f"the plan for {self.model}")
        elif actions is None:
            raise UsageError(f"{verb} needs key patterns, action=..., or both")
        return [
            i
            for i, e in enumerate(self.entries)
            if (actions is None or e.action in actions)
            and (hit is None or e.model_key in hit or e.ckpt_key in hit)
        ]

    # ------------------------------------------------------------------ editing

    def drop(self, *selectors: Selector, action: str | Iterable[str] | None = None) -> LoadPlan:
        """Leave the matching entries out of the load: they become ``skip`` entries.

        The same as passing ``skip=`` (or a ``remap`` that drops a checkpoint key) when
        planning: nothing is read for them, and they no longer count against ``strict`` or
        ``report.ok``. ``action`` limits it to entries with that action (e.g.
        ``drop(action="unexpected")``). Returns the plan.

        Example:
            >>> plan.drop("layer1", action="load")  # doctest: +SKIP
        """
        for i in self._indices(selectors, action, "drop"):
            e = self.entries[i]
            if e.action == "skip":
                continue
            real_model_key = e.action != "unexpected"
            self.entries[i] = dataclasses.replace(
                e,
                action="skip",
                model_key=e.model_key if real_model_key else None,
                model_shape=e.model_shape if real_model_key else None,
                model_dtype=e.model_dtype if real_model_key else None,
                reason="dropped from the plan",
                tied_to=None,
            )
        return self

    def rename(self, ckpt_key: str, model_key: str) -> LoadPlan:
        """Load checkpoint key ``ckpt_key`` into ``model_key``: one entry replaces two.

        Typically turns an ``unexpected`` checkpoint key and a ``missing`` model key into a
        ``load`` (or ``cast``; ``mismatch`` / ``adapt`` when the shapes differ). Whatever
        either key was paired with before is left over: a model key that loses its tensor
        becomes ``missing``, a checkpoint key that loses its model key ``unexpected``.
        Returns the plan; :meth:`check` (run by :meth:`apply`) validates the result.

        Example:
            >>> plan.rename("classifier.weight", "fc.weight")  # doctest: +SKIP
        """
        if not isinstance(ckpt_key, str) or not isinstance(model_key, str):
            raise UsageError("rename(ckpt_key, model_key) takes two key names (strings)")
        ci = next(
            (i for i, e in enumerate(self.entries) if e.ckpt_key == ckpt_key and not e.tied_to),
            None,
        )
        if ci is None:
            ckpt_keys = [e.ckpt_key for e in self.entries if e.ckpt_key is not None]
            raise UsageError(_unknown("checkpoint", ckpt_key, ckpt_keys, self.source))
        mi = next(
            (
                i
                for i, e in enumerate(self.entries)
                if e.model_key == model_key and e.action != "unexpected"
            ),
            None,
        )
        if mi is None:
            model_keys = [e.model_key for e in self.entries if e.action != "unexpected"]
            raise UsageError(_unknown("model", model_key, model_keys, self.model))
        ce, me = self.entries[ci], self.entries[mi]
        if ci == mi:
            return self
        new = PlanEntry(
            _pair_action(
                ce.ckpt_shape, me.model_shape, ce.ckpt_dtype, me.model_dtype, self.on_mismatch
            ),
            model_key,
            ckpt_key,
            me.model_shape,
            ce.ckpt_shape,
            me.model_dtype,
            ce.ckpt_dtype,
            reason="renamed in the plan",
        )
        replaced: dict[int, PlanEntry | None] = {mi: new, ci: None}
        if ce.model_key is not None and ce.action != "unexpected":  # its model key loses it
            replaced[ci] = _no_value(ce)
        if me.ckpt_key is not None:  # the model key's old checkpoint tensor is left over
            leftover = PlanEntry(
                "unexpected",
                None,
                me.ckpt_key,
                ckpt_shape=me.ckpt_shape,
                ckpt_dtype=me.ckpt_dtype,
                reason="replaced by a rename in the plan",
            )
        else:
            leftover = None
        entries: list[PlanEntry] = []
        for i, e in enumerate(self.entries):
            if i in replaced:
                if replaced[i] is not None:
                    entries.append(replaced[i])  # type: ignore[arg-type]
                if i == mi and leftover is not None:
                    entries.append(leftover)
            elif e.tied_to in (ce.model_key, model_key):  # re-derived by check()
                entries.append(_no_value(e))
            else:
                entries.append(e)
        self.entries = entries
        return self

    # ------------------------------------------------------------------ checking, applying

    def check(self, model: nn.Module) -> LoadPlan:
        """Validate the plan against ``model``; return the checked plan (this one unchanged).

        Raises what ``load_partial`` raises: ``LoadError`` for keys the model lacks, shapes
        that do not fit, ``strict`` failures, mismatches with ``on_mismatch="error"``, a plan
        that loads nothing, meta tensors nothing initialises; ``KeyCollisionError`` for a
        model key planned twice; ``UsageError`` for a malformed entry. The checked plan has
        one entry for every model key (keys left without one are ``missing``), ``load`` /
        ``cast`` and tie aliases re-derived from the model, and ``initialise`` exactly for
        missing keys on the ``meta`` device.

        Example:
            >>> plan.rename("classifier.weight", "fc.weight").check(model)  # doctest: +SKIP
        """
        require_module(model, "check")
        with gc_paused():
            return validate(self, model, model.state_dict(keep_vars=True), refuse_empty=True)

    def apply(
        self,
        model: nn.Module,
        ckpt: CheckpointLike | None = None,
        *,
        on_mismatch: Adapter | None = None,
        dry_run: bool = False,
        progress: bool | None = None,
        device: str | torch.device | None = None,
        allow_globals: Iterable[Any] | None = None,
    ) -> LoadReport:
        """Check the plan against ``model`` and carry it out; see :func:`surgery.apply_plan`.

        Example:
            >>> report = plan.apply(model)  # doctest: +SKIP
        """
        from .apply import apply_plan

        return apply_plan(
            model,
            self,
            ckpt,
            on_mismatch=on_mismatch,
            dry_run=dry_run,
            progress=progress,
            device=device,
            allow_globals=allow_globals,
        )

    # ------------------------------------------------------------------ saving

    def to_dict(self) -> dict:
        """Plain Python types, ``json.dumps``-able; :meth:`from_dict` reads it back."""
        return {
            "format": _FORMAT,
            "source": self.source,
            "model": self.model,
            "path": self.path,
            "entry": self.entry,
            "prefix": list(self.prefix) if self.prefix else None,
            "auto_prefix": self.auto_prefix,
            "notes": list(self.notes),
            "strict": self.strict,
            "on_mismatch": self.on_mismatch,
            "trust_pickle": self.trust_pickle,
            "entries": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, trust_pickle: bool = False) -> LoadPlan:
        """A plan from :meth:`to_dict` output (e.g. read back from JSON).

        A plan file is data from wherever it came from: it cannot grant itself
        ``trust_pickle``. Pass ``trust_pickle=True`` here to unpickle the checkpoint it names.

        Example:
            >>> plan = surgery.LoadPlan.from_dict(json.load(open("plan.json")))  # doctest: +SKIP
        """
        if not isinstance(d, Mapping) or not isinstance(d.get("entries"), list):
            raise UsageError(
                "LoadPlan.from_dict needs the dict LoadPlan.to_dict() made (with an 'entries' "
                f"list), got {type(d).__name__}"
            )
        if d.get("format", _FORMAT) != _FORMAT:
            raise UsageError(
                f"plan format {d.get('format')!r} is not supported (this surgery reads {_FORMAT})"
            )
        prefix = d.get("prefix")
        if prefix is not None and not (
            isinstance(prefix, (list, tuple))
            and len(prefix) == 2
            and all(isinstance(p, str) for p in prefix)
        ):
            raise UsageError(f"plan 'prefix' must be null or two strings, got {prefix!r}")
        on_mismatch = d.get("on_mismatch", "skip")
        if not isinstance(on_mismatch, str):
            raise UsageError(f"plan 'on_mismatch' must be a string, got {on_mismatch!r}")
        try:
            return cls(
                entries=[PlanEntry.from_dict(e) for e in d["entries"]],
                source=str(d.get("source") or ""),
                model=str(d.get("model") or ""),
                path=_opt_str(d.get("path")),
                entry=_opt_str(d.get("entry")),
                prefix=(prefix[0], prefix[1]) if prefix else None,
                auto_prefix=bool(d.get("auto_prefix", True)),
                notes=[str(n) for n in d.get("notes") or []],
                strict=bool(d.get("strict", False)),
                on_mismatch=on_mismatch,
                trust_pickle=trust_pickle is True,
            )
        except TypeError as e:
            raise UsageError(f"malformed plan: {e}") from None

    # ------------------------------------------------------------------ rendering

    def __repr__(self) -> str:
        counts = ", ".join(f"{n} {a}" for a, n in self.counts().items())
        return f"<LoadPlan {self.source} -> {self.model}: {counts or 'empty'}>"

    def __str__(self) -> str:
        """Counts per action, then every entry that is not a plain ``load``."""
        from ..keys.prefix import describe_prefix

        counts = ", ".join(f"{n} {a}" for a, n in self.counts().items())
        parts = [
            escape_control(f"LoadPlan: {self.source} -> {self.model}"),
            f"  {counts or 'no entries'}",
        ]
        if self.prefix:
            parts.append(escape_control(f"  prefix: {describe_prefix(self.prefix)}"))
        rows = []
        for e in self.entries:
            if e.action == "load" and not e.tied_to and (e.via is None or e.via == e.model_key):
                continue  # plain loads are counted, not listed; a module's own renames are
            detail = e.reason or _detail(e)
            if e.model_key and e.ckpt_key and e.model_key != e.ckpt_key:
                detail = f"from '{e.ckpt_key}'" + (f"; {detail}" if detail else "")
            rows.append((e.action, e.key, detail))
        if rows:
            parts.append(text_table(("action", "key", "detail"), rows, indent="  "))
        parts.extend(escape_control(f"  note: {n}") for n in self.notes)
        return "\n".join(parts)


def _detail(e: PlanEntry) -> str:
    if e.action in ("mismatch", "adapt"):
        return f"checkpoint {format_shape(e.ckpt_shape)} vs model {format_shape(e.model_shape)}"
    if e.action == "cast":
        return f"{e.ckpt_dtype} -> {e.model_dtype}"
    return ""


def _unknown(side: str, key: str, keys: Iterable[str | None], where: str) -> str:
    near = closest(key, [k for k in keys if k is not None])
    hint = f" Closest: {', '.join(near)}." if near else ""
    return f"rename: {side} key '{key}' is not in the plan for {where}.{hint}"


def _pair_action(
    cshape: tuple[int, ...] | None,
    mshape: tuple[int, ...] | None,
    cdtype: str | None,
    mdtype: str | None,
    on_mismatch: str,
) -> str:
    if cshape != mshape:
        return "mismatch" if on_mismatch in ("skip", "error") else "adapt"
    return "load" if cdtype == mdtype else "cast"


def _no_value(e: PlanEntry) -> PlanEntry:
    """The entry a model key gets when it loses its checkpoint tensor (check() refines it)."""
    return PlanEntry(
        "missing",
        e.model_key,
        None,
        model_shape=e.model_shape,
        model_dtype=e.model_dtype,
        reason="not in checkpoint",
    )


# --------------------------------------------------------------------------- planning


def plan_load(
    model: nn.Module,
    ckpt: CheckpointLike,
    *,
    entry: str | None = None,
    remap: Remap | None = None,
    prefix: Literal["auto"] | None = "auto",
    skip: Selector | Iterable[Selector] | None = None,
    on_mismatch: OnMismatch = "skip",
    strict: bool = False,
    trust_pickle: bool = False,
    allow_globals: Iterable[Any] | None = None,
) -> LoadPlan:
    """Plan loading ``ckpt`` into ``model`` without reading a tensor or touching the model.

    Takes the arguments of :func:`surgery.load_partial` (``entry`` picks the container entry
    holding the state dict, e.g. ``entry="state_dict_ema"``; ``allow_globals`` is kept on the
    plan for :meth:`LoadPlan.apply`, not saved by :meth:`LoadPlan.to_dict`) and raises what it
    raises (strict failures, key collisions, nothing matched, meta tensors nothing initialises, bad
    arguments). Only names, shapes and dtypes are read; adapters run at apply time. Review the
    plan (``print(plan)``), edit it, save it with ``json.dumps(plan.to_dict())``, then
    ``plan.apply(model)``.

    Example:
        >>> plan = surgery.plan_load(model, "resnet18.pth", skip="fc")  # doctest: +SKIP
        >>> plan.counts()  # doctest: +SKIP
        {'load': 120, 'skip': 2}
        >>> report = plan.apply(model)  # doctest: +SKIP
    """
    check_args(model, entry, prefix, on_mismatch, strict, trust_pickle, "plan_load")
    with gc_paused():
        source = open_source(
            ckpt, entry=entry, trust_pickle=trust_pickle, allow_globals=allow_globals
        )
        try:
            plan = make_plan(
                model,
                source,
                ckpt=ckpt,
                entry=entry,
                remap=remap,
                prefix=prefix,
                skip=skip,
                on_mismatch=on_mismatch,
                strict=strict,
                trust_pickle=trust_pickle,
                refuse_empty=True,
            )
        finally:
            source.close()
    plan.allow_globals = tuple(allow_globals or ())
    return plan


def check_args(
    model: Any,
    entry: Any,
    prefix: Any,
    on_mismatch: Any,
    strict: Any,
    trust_pickle: Any,
    fn: str,
) -> None:
    """Every argument problem as a ``UsageError`` before any work (no bare TypeError later)."""
    require_module(model, fn)
    if entry is not None and not isinstance(entry, str):
        raise UsageError(
            f"entry must be the name of the checkpoint entry holding the state dict (e.g. "
            f"'state_dict_ema', dotted for nesting) or None, not {entry!r}"
        )
    if not (isinstance(prefix, str) and prefix == "auto") and prefix is not None:
        raise UsageError(f"prefix must be 'auto' or None, not {prefix!r}")
    if not (
        (isinstance(on_mismatch, str) and on_mismatch in ("skip", "error"))
        or (callable(on_mismatch) and not isinstance(on_mismatch, (str, type)))
    ):
        raise UsageError(
            f"on_mismatch must be 'skip', 'error' or a callable (name, ckpt, model) -> Tensor, "
            f"not {on_mismatch!r}"
        )
    for name, value in (("strict", strict), ("trust_pickle", trust_pickle)):
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be True or False, not {value!r}")


def _adapter_name(adapter: Adapter) -> str:
    return getattr(adapter, "__name__", None) or type(adapter).__name__


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


_CONV1D_NAMES = frozenset({"c_attn", "c_fc", "c_proj"})  # GPT-2's Conv1D layers


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


def make_plan(
    model: nn.Module,
    source: CheckpointSource,
    *,
    ckpt: Any,
    entry: str | None,
    remap: Remap | None,
    prefix: str | None,
    skip: Selector | Iterable[Selector] | None,
    on_mismatch: OnMismatch,
    strict: bool,
    trust_pickle: bool,
    refuse_empty: bool,
    state: dict[str, Tensor] | None = None,
) -> LoadPlan:
    """Classify every checkpoint key and model key, then :func:`validate` the result.

    ``state`` is ``model.state_dict(keep_vars=True)`` when the caller has it already.
    """
    model_name = model_class_name(model)  # not FSDP's FSDP<Name> wrapper class
    if state is None:
        state = model.state_dict(keep_vars=True)
    specs = source.specs
    skipped = match_keys(skip, state, action="skip", model=model, owner=model_name)
    adapter = on_mismatch if callable(on_mismatch) else None
    notes = list(source.notes)

    # 1. checkpoint key -> model key
    ckpt_names = [*specs, *source.extras] if source.extras else specs  # extras: not tensors
    new_to_old, dropped, remap_notes = apply_remap(ckpt_names, remap)
    notes.extend(remap_notes)
    rewrite = None
    view = _peft.peft_view(model, state)

    def ckpt_shape(ckey: str) -> tuple[int, ...] | None:
        spec = specs.get(ckey)
        return None if spec is None else tuple(spec[0])

    if view is not None:  # base weights into a PEFT-wrapped model: map through its names
        new_to_old, rewrite, through = _peft.map_keys(
            view, new_to_old, state, prefix == "auto", ckpt_shape
        )
        if through:
            notes.append(_peft.note(view, len({c for k, c in new_to_old.items() if k in state})))
        notes.extend(_peft.meta_note(view, state))
    elif prefix == "auto":
        mapping = new_to_old

        def fits(new: str, mkey: str) -> bool:
            t = state[mkey]
            return isinstance(t, Tensor) and ckpt_shape(mapping[new]) == tuple(t.shape)

        rewrite = detect_prefix(new_to_old, set(state), fits)
        if rewrite is not None:
            new_to_old = apply_prefix(new_to_old, rewrite)
    units = _selfload.Index(_selfload.find_units(model))
    unit_entries: list[PlanEntry] = []
    plain = state
    if units or source.extras:  # modules that load themselves take their keys first
        new_to_old, unit_entries, unit_notes = _selfload.plan_units(
            units, new_to_old, source, state, skipped, adapter is not None
        )
        notes.extend(unit_notes)
        plain = _selfload.plain_state(state, units)

    # 2. every checkpoint key: paired with a model key, unexpected, or dropped
    entries: list[PlanEntry] = []
    for ckey in dropped:
        if ckey not in specs:  # a non-tensor entry
            entries.append(PlanEntry("skip", None, ckey, reason="dropped by remap"))
            continue
        shape, dtype = specs[ckey]
        entries.append(
            PlanEntry(
                "skip", None, ckey, None, tuple(shape), None, dtype_name(dtype), "dropped by remap"
            )
        )
    writer: dict[int, PlanEntry] = {}  # id(model tensor) -> the entry that writes it
    at: dict[str, int] = {}  # model key -> index of its entry
    names = _DTYPE_NAMES
    for mkey, ckey in new_to_old.items():
        cshape, cdtype = specs[ckey]
        cshape_t = tuple(cshape)
        cdtype_s = names.get(cdtype) or dtype_name(cdtype)
        target = plain.get(mkey)
        if target is None:
            entries.append(
                PlanEntry("unexpected", mkey, ckey, None, cshape_t, None, cdtype_s, "not in model")
            )
            continue
        mdtype = names.get(target.dtype) or dtype_name(target.dtype)
        if cshape == target.shape:
            mshape = cshape_t
            action, reason = ("load" if cdtype_s == mdtype else "cast"), ""
        else:
            mshape = tuple(target.shape)
            action, reason = ("adapt" if adapter else "mismatch"), ""
        if skipped and mkey in skipped:
            action, reason = "skip", "skipped as asked"
        e = PlanEntry(action, mkey, ckey, mshape, cshape_t, mdtype, cdtype_s, reason)
        at[mkey] = len(entries)
        entries.append(e)
        if action in WRITES:
            writer.setdefault(id(target), e)

    # 3. model keys with no checkpoint key that skip= names (tie aliases and keys without a
    #    value are planned by validate(), as for any plan)
    if skipped:
        for mkey, t in plain.items():
            if mkey in skipped and mkey not in new_to_old and id(t) not in writer:
                at[mkey] = len(entries)
                entries.append(
                    PlanEntry(
                        "skip",
                        mkey,
                        None,
                        tuple(t.shape),
                        None,
                        dtype_name(t.dtype),
                        reason="skipped as asked",
                    )
                )

    if _ties.has_ties(plain):  # several checkpoint keys for one tied tensor: one carries it
        _ties.resolve(entries, plain, WRITES, source.shares, (source.description, model_name))
        writer = {
            id(plain[e.model_key]): e
            for e in reversed(entries)
            if e.action in WRITES and not e.tied_to and e.model_key in plain
        }
    entries.extend(unit_entries)
    notes.extend(_conv1d_note(model, entries))

    plan = LoadPlan(
        entries=entries,
        source=source.description,
        model=model_name,
        path=str(Path(ckpt).expanduser()) if isinstance(ckpt, (str, os.PathLike)) else None,
        entry=entry,
        prefix=rewrite,
        auto_prefix=prefix == "auto",
        notes=notes,
        strict=strict,
        on_mismatch=_adapter_name(adapter) if adapter else str(on_mismatch),
        trust_pickle=trust_pickle,
        checkpoint=ckpt,
        adapter=adapter,
    )
    checked = validate(
        plan,
        model,
        state,
        refuse_empty=refuse_empty,
        index=(entries, at, writer),
        adapters=set() if view is None else view.adapter,
        units=units,
    )
    problems = copy_problems(checked, source)
    if problems:
        raise LoadError(copy_failure(problems, source.description))
    return checked


def copy_problems(plan: LoadPlan, source: CheckpointSource) -> list[tuple[str, str]]:
    """(checkpoint key, why) for each tensor the plan writes that cannot be copied.

    A sparse, quantized, nested or meta tensor cannot fill a dense parameter, nor a complex one
    a real parameter; found here, before the first write, the load is refused whole.
    """
    out: list[tuple[str, str]] = []
    unreadable: Mapping[str, str] = getattr(source, "unreadable", {})
    for e in plan.entries:
        if e.action not in ("load", "cast") or e.ckpt_key is None or e.tied_to:
            continue
        why = unreadable.get(e.ckpt_key)
        if why is None and e.model_dtype is not None and e.ckpt_dtype is not None:
            if e.ckpt_dtype.startswith("complex") and not e.model_dtype.startswith("complex"):
                why = f"complex ({e.ckpt_dtype}) for a real {e.model_dtype} tensor"
        if why:
            out.append((e.ckpt_key, why))
    return out


def copy_failure(problems: list[tuple[str, str]], description: str) -> Advice:
    """The message refusing a plan whose copies cannot all happen."""
    lines = [f"    '{k}': {why}" for k, why in problems[:_LIST]]
    more = f"\n    ... and {len(problems) - _LIST} more" if len(problems) > _LIST else ""
    keys = [k for k, _ in problems[:3]]
    return Advice(
        f"{description} holds {len(problems)} tensor(s) the plan would load that cannot be "
        "copied into the model:\n" + "\n".join(lines) + more + "\nNothing was loaded. "
        "Leave them out (",
        Fix("skip", keys),
        ") or convert them in the file first (e.g. dequantize() or to_dense()).",
    )


# --------------------------------------------------------------------------- checking


def validate(
    plan: LoadPlan,
    model: nn.Module,
    state: dict[str, Tensor],
    *,
    refuse_empty: bool,
    index: tuple[list, dict[str, int], dict[int, PlanEntry]] | None = None,
    adapters: set[str] | None = None,
    units: _selfload.Index | None = None,
) -> LoadPlan:
    """Validate ``plan`` against the model's current state; return the normalised plan.

    ``index`` is ``(entries, model key -> position, id(tensor) -> writing entry)`` from
    :func:`make_plan`, which has just classified the entries against ``state``; without it
    every entry is checked and refreshed. ``adapters`` holds the model's PEFT adapter keys
    (found from the model when not given); ``units`` are the model's modules that load
    themselves, when the caller has found them already.
    """
    unknown: list[str] = []
    misfit: list[str] = []
    full_state = state
    if units is None:
        units = _selfload.Index(_selfload.find_units(model))
    mine: list[PlanEntry] = []  # entries of modules that load themselves
    if units:
        state = _selfload.plain_state(state, units)
    prior: dict[str, str] = {}  # alias model key -> its own checkpoint key, from the plan
    if index is not None:
        entries, at, writer = index
    else:
        todo = plan.entries
        if units or any(e.via is not None for e in todo):
            todo, mine, unknown = _selfload.split_entries(todo, units, full_state)
        entries, at, writer, more, misfit, prior = _index_edited(
            dataclasses.replace(plan, entries=todo), state
        )
        unknown += more
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
    # Every model key gets exactly one entry; keys without a value are refined by the model.
    # A tied tensor is planned once: its other keys are aliases (tied_to) of the entry that
    # writes it, else of the first entry that plans it (a mismatch, a skip, a missing key).
    owners = _owners(entries, state) if _ties.has_ties(state) else None
    any_meta = False
    for mkey, t in state.items():
        any_meta = any_meta or t.is_meta
        i = at.get(mkey)
        e = entries[i] if i is not None else None
        if e is not None and e.action not in _NO_VALUE:
            continue
        w = writer.get(id(t))
        if w is None and owners is not None:
            w = owners.get(id(t))
        if w is not None and w.model_key != mkey:
            own = prior.get(mkey) if w.action in WRITES else None
            new = _ties.alias(w, mkey, own)
        else:
            mshape, mdtype = tuple(t.shape), dtype_name(t.dtype)
            if adapters is None:
                adapters = _peft.adapter_keys(model, state)
            if mkey.endswith("num_batches_tracked"):
                action, reason = "defaulted", "counter left at its default"
            elif mkey in adapters and not t.is_meta:
                action, reason = "adapter", "PEFT adapter weight, left as it is"
            elif t.is_meta:
                action, reason = "initialise", "reset_parameters()"
            else:
                action, reason = "missing", "not in checkpoint"
            if e is not None and e.action == action and e.model_shape == mshape:
                if owners is not None:
                    owners.setdefault(id(t), e)
                continue
            new = PlanEntry(action, mkey, None, mshape, None, mdtype, reason=reason)
            if owners is not None:
                owners.setdefault(id(t), new)
        if i is None:
            at[mkey] = len(entries)
            entries.append(new)
        else:
            entries[i] = new
    checked = dataclasses.replace(plan, entries=[e for e in entries if e is not None] + mine)
    written = {
        id(t)
        for e in checked.entries
        if e.action in WRITES
        and e.model_key is not None
        and isinstance(t := full_state.get(e.model_key), Tensor)
    }

    # Refuse what cannot be right, in the order load_partial always has.
    mismatched = [e for e in checked.entries if e.action == "mismatch" and not e.tied_to]
    if mismatched and plan.on_mismatch == "error":
        items = [_mismatch(e) for e in mismatched]
        raise LoadError(
            Advice(
                f"size mismatch loading {plan.source} into {checked.model} ({len(items)} keys):\n"
                + "\n".join(first_n_lines(items, _LIST))
                + "\nNothing was loaded. Pass ",
                Fix("on_mismatch", "skip"),
                " to load the rest, ",
                Fix("skip"),
                " for a replaced head, or an adapter callable.",
            )
        )
    if plan.strict:
        message = strict_failure(checked, state)
        if message:
            raise LoadError(message)
    if refuse_empty and not written:
        n_ckpt = sum(1 for e in checked.entries if e.ckpt_key is not None and not e.tied_to)
        if n_ckpt:
            raise LoadError(
                f"0 of {n_ckpt} checkpoint tensors match {type(model).__name__}. "
                + (
                    prefix_hint(_mapped_names(checked), set(state))
                    or "Check that the checkpoint is for this architecture."
                )
                + " Nothing was loaded."
            )
    if any_meta or (
        units and any(isinstance(t, Tensor) and t.is_meta for t in full_state.values())
    ):
        meta_to_initialise(model, written)
    return checked


def _owners(entries: list[PlanEntry | None], state: Mapping[str, Tensor]) -> dict[int, PlanEntry]:
    """id(model tensor) -> the first entry (in the model's key order) that plans it with a
    value or a checkpoint tensor: what the tensor's other keys are aliases of."""
    out: dict[int, PlanEntry] = {}
    for e in sorted(
        (e for e in entries if e is not None and e.model_key in state and not e.tied_to),
        key=lambda e: e.action not in WRITES,
    ):
        if e.action not in _NO_VALUE and e.action != "unexpected" and e.via is None:
            out.setdefault(id(state[e.model_key]), e)  # type: ignore[index]
    return out


def _index_edited(
    plan: LoadPlan, state: dict[str, Tensor]
) -> tuple[
    list[PlanEntry | None],
    dict[str, int],
    dict[int, PlanEntry],
    list[str],
    list[str],
    dict[str, str],
]:
    """Index a plan that may have been edited or read back: check and refresh every entry.

    Also returns each alias's own checkpoint key (a tied checkpoint holding the tensor under
    the alias's name too), and refuses two different checkpoint keys writing one tied tensor.
    """
    entries: list[PlanEntry | None] = []
    at: dict[str, int] = {}  # model key -> index in entries
    writer: dict[int, PlanEntry] = {}
    unknown: list[str] = []
    misfit: list[str] = []
    ckpt_uses: dict[str, list[str]] = {}  # checkpoint key -> actions naming it
    prior: dict[str, str] = {}
    conflicts: list[list[PlanEntry]] = []
    for e in plan.entries:
        if not isinstance(e, PlanEntry) or e.action not in ACTIONS:
            raise UsageError(
                f"plan entry {e!r} is not a PlanEntry with an action among {', '.join(ACTIONS)}"
            )
        if e.ckpt_key is not None and not e.tied_to:
            ckpt_uses.setdefault(e.ckpt_key, []).append(e.action)
        if e.tied_to:  # aliases are re-derived from the model below
            if e.model_key is not None and e.ckpt_key is not None:
                prior[e.model_key] = e.ckpt_key
            continue
        if e.action == "unexpected" or (e.action == "skip" and e.model_key is None):
            if e.ckpt_key is None:
                raise UsageError(f"plan entry {e!r} names no checkpoint key")
            entries.append(e)
            continue
        mkey = e.model_key
        if mkey is None:
            raise UsageError(f"plan entry {e!r} ({e.action}) names no model key")
        t = state.get(mkey)
        if t is None:
            unknown.append(mkey)
            continue
        if mkey in at:
            first = entries[at[mkey]]
            raise KeyCollisionError(
                f"the plan has two entries for model key '{mkey}': {first.action} "
                f"(from {first.ckpt_key!r}) and {e.action} (from {e.ckpt_key!r}). Only one can "
                "give it a value: drop one with plan.drop() or edit plan.entries."
            )
        mshape, mdtype = tuple(t.shape), dtype_name(t.dtype)
        action = e.action
        if action in WRITES or action == "mismatch":
            if e.ckpt_key is None or e.ckpt_shape is None:
                raise UsageError(f"plan entry {e!r} ({action}) needs ckpt_key and ckpt_shape")
        if action in ("load", "cast"):
            if e.ckpt_shape != mshape:
                misfit.append(
                    f"{mkey}: checkpoint '{e.ckpt_key}' {format_shape(e.ckpt_shape)} vs "
                    f"model {format_shape(mshape)}"
                )
            action = "load" if e.ckpt_dtype == mdtype else "cast"
        if action != e.action or mshape != e.model_shape or mdtype != e.model_dtype:
            e = dataclasses.replace(e, action=action, model_shape=mshape, model_dtype=mdtype)
        at[mkey] = len(entries)
        entries.append(e)
        if action in WRITES:
            first = writer.setdefault(id(t), e)
            if first.ckpt_key != e.ckpt_key:
                conflicts.append([first, e])
    if conflicts:
        raise _ties.conflict_error(conflicts, plan.source, plan.model)
    shared = [k for k, acts in ckpt_uses.items() if len(acts) > 1 and not set(acts) <= WRITES]
    if shared:
        k = shared[0]
        raise KeyCollisionError(
            f"checkpoint key '{k}' appears in {len(ckpt_uses[k])} plan entries "
            f"({', '.join(ckpt_uses[k])}); a key that is skipped, mismatched or unexpected "
            "cannot also be loaded. Use plan.rename(ckpt_key, model_key), which keeps one."
        )

    return entries, at, writer, unknown, misfit, prior


def _mismatch(e: PlanEntry) -> Mismatch:
    return Mismatch(str(e.model_key), tuple(e.ckpt_shape or ()), tuple(e.model_shape or ()))


def _mapped_names(plan: LoadPlan) -> list[str]:
    """Checkpoint keys under the names they were mapped to (for prefix hints)."""
    return [
        e.model_key
        for e in plan.entries
        if e.ckpt_key is not None and e.model_key is not None and not e.tied_to
    ]


def strict_failure(
    plan: LoadPlan, state: Mapping[str, Tensor], declined: Iterable[str] = ()
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
        named(e, str(_mismatch(e)))
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
    sections = (
        ("missing from checkpoint", missing),
        ("unexpected (not in model)", unexpected),
        ("size mismatch", mismatched),
    )
    for title, items in sections:
        if items:
            parts.append(f"  {title}:")
            parts += first_n_lines(items, _LIST)
    hint = (
        prefix_hint(_mapped_names(plan), set(state), or_auto=not plan.auto_prefix)
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


def meta_to_initialise(model: nn.Module, written: set[int]) -> tuple[list[nn.Module], list[str]]:
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


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: a load makes many short-lived acyclic objects, and
    on a model with tens of thousands of modules each full collection walks them all (it
    doubled the time to plan 100k keys). The previous state is restored."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
