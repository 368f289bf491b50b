"""The load plan as data: entries you can read, edit, save as JSON and read back.

:class:`PlanData` holds one :class:`~surgery.loading.entries.PlanEntry` per model key and per
checkpoint key (see there for the actions), and where they came from. It is what the planner
builds and what :class:`~surgery.loading.pipeline.LoadPlan` (the public class, which adds
``check`` and ``apply``) is. Nothing here touches a model or a file.

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

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .._names import closest
from .._table import text_table
from .._text import escape_control
from ..errors import UsageError
from ..keys.prefix import describe_prefix
from ..keys.select import Selector, match_keys
from .entries import ACTIONS, PlanEntry, detail, no_value, opt_str, pair_action

__all__ = ["Adapter", "PlanData"]

Adapter = Callable[[str, Tensor, Tensor], Tensor | None]
FORMAT = 1  # version of the to_dict() layout


@dataclass(repr=False)
class PlanData:
    """What loading a checkpoint into a model will do: the entries, and where they came from.

    Built by :func:`~surgery.plan_load` (as a :class:`~surgery.LoadPlan`); plain data you can
    read (``plan.entries``, :meth:`find`, :meth:`counts`, ``print(plan)``), edit (:meth:`drop`,
    :meth:`rename`, or change the ``entries`` list), save (:meth:`to_dict` / :meth:`from_dict`,
    JSON-safe) and apply (:meth:`apply`). Edits take effect in place and return the plan, so
    calls chain.

    ``source`` describes the checkpoint, ``path`` is its file (``None`` for an in-memory dict or
    module: pass ``ckpt=`` to :meth:`apply` after a JSON round trip), ``entry`` the container
    entry it was read from. ``prefix`` is the ``(strip, add)`` rewrite applied to checkpoint
    keys. ``strict`` and ``on_mismatch`` (``"skip"``, ``"error"`` or the adapter's name) are the
    options it was planned with. ``checkpoint`` and ``adapter`` hold the objects passed to
    :func:`plan_load`; they are not saved by :meth:`to_dict`.

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
            keys = {k for e in self.entries for k in (e.model_key, *e.ckpt_keys) if k is not None}
            hit = match_keys(list(selectors), keys, action=verb, owner=f"the plan for {self.model}")
        elif actions is None:
            raise UsageError(f"{verb} needs key patterns, action=..., or both")
        return [
            i
            for i, e in enumerate(self.entries)
            if (actions is None or e.action in actions)
            and (hit is None or e.model_key in hit or any(k in hit for k in e.ckpt_keys))
        ]

    # ------------------------------------------------------------------ editing

    def drop(self, *selectors: Selector, action: str | Iterable[str] | None = None) -> PlanData:
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
            # an unexpected converted tensor keeps its name: it has no checkpoint key of its own
            real_model_key = e.action != "unexpected" or e.ckpt_key is None
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

    def rename(self, ckpt_key: str, model_key: str) -> PlanData:
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
            raise UsageError(self._not_a_checkpoint_key(ckpt_key))
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
            pair_action(
                ce.ckpt_shape,
                me.model_shape,
                ce.ckpt_dtype,
                me.model_dtype,
                self.on_mismatch not in ("skip", "error"),
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
            replaced[ci] = no_value(ce)
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
                entries.append(no_value(e))
            else:
                entries.append(e)
        self.entries = entries
        return self

    def _not_a_checkpoint_key(self, ckpt_key: str) -> str:
        """Why ``rename`` cannot take ``ckpt_key``: one of a converted tensor's sources, or
        not in the plan (with the closest keys)."""
        made = next((e for e in self.entries if ckpt_key in e.ckpt_keys), None)
        if made is not None:
            return (
                f"rename: checkpoint key '{ckpt_key}' is one of the tensors converted into "
                f"'{made.key}' by transformers' conversion; it cannot load on its own. "
                f"Leave that tensor out with plan.drop('{made.key}')."
            )
        ckpt_keys = [e.ckpt_key for e in self.entries if e.ckpt_key is not None]
        return _unknown("checkpoint", ckpt_key, ckpt_keys, self.source)

    # ------------------------------------------------------------------ saving

    def to_dict(self) -> dict:
        """Plain Python types, ``json.dumps``-able; :meth:`from_dict` reads it back."""
        return {
            "format": FORMAT,
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
    def from_dict(cls, d: Mapping[str, Any], *, trust_pickle: bool = False) -> PlanData:
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
        if d.get("format", FORMAT) != FORMAT:
            raise UsageError(
                f"plan format {d.get('format')!r} is not supported (this surgery reads {FORMAT})"
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
                path=opt_str(d.get("path")),
                entry=opt_str(d.get("entry")),
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
            why = e.reason or detail(e)
            if e.model_key and e.ckpt_key and e.model_key != e.ckpt_key:
                why = f"from '{e.ckpt_key}'" + (f"; {why}" if why else "")
            rows.append((e.action, e.key, why))
        if rows:
            parts.append(text_table(("action", "key", "detail"), rows, indent="  "))
        parts.extend(escape_control(f"  note: {n}") for n in self.notes)
        return "\n".join(parts)


def _unknown(side: str, key: str, keys: Iterable[str | None], where: str) -> str:
    near = closest(key, [k for k in keys if k is not None])
    hint = f" Closest: {', '.join(near)}." if near else ""
    return f"rename: {side} key '{key}' is not in the plan for {where}.{hint}"
