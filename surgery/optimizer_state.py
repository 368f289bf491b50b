"""Optimizer state that follows its parameters by name through a surgery.

PyTorch keys optimizer state by position, so a new head, frozen layers, regrouped parameters or
a ``module.`` prefix break ``optimizer.load_state_dict`` (or, worse, load moments onto the wrong
parameters). Here every old state is first given its parameter's *name*, the names go through
the same ``remap``/prefix rules as :func:`load_partial`, and each parameter of the new optimizer
gets the state of the parameter it now is, whatever group it sits in. Everything is checked
before the optimizer is touched.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._args import require_module, require_optimizer
from ._optim_read import FORMAT, Names, Old, read_old
from ._table import _StatusTable, first_n_lines, format_shape, status_rows
from ._text import escape_control
from .errors import Advice, Fix, OptimizerStateError, UsageError
from .keys.mapping import KeyMap, map_names
from .keys.prefix import describe_prefix
from .keys.remap import Remap
from .keys.select import match_keys
from .loading.report import Mismatch
from .scheduler_state import restore_scheduler

__all__ = ["OptimizerReport", "optimizer_state", "restore_optimizer", "restore_scheduler"]

_VERSION = 1
_LIST = 8  # items listed per category in text and error messages

StateAdapter = Callable[[str, Tensor, Tensor], Tensor | None]


# --------------------------------------------------------------------------- report


@dataclass
class OptimizerReport(_StatusTable):
    """What :func:`restore_optimizer` did to each parameter's optimizer state.

    Names are the new model's parameter names. ``restored``: old state moved over as it was;
    ``adapted``: old state of another shape turned into the new shape by ``on_mismatch``;
    ``reset``: old state of another shape, left fresh; ``fresh``: in the optimizer with no
    old state (a new head, a layer that was frozen before); ``skipped``: left fresh as asked;
    ``frozen``: old state for a model parameter the optimizer does not hold (frozen now), not
    restored (name -> why); ``dropped``: old state whose parameter is gone from the model.

    Example:
        >>> report = surgery.restore_optimizer(opt, model, "runs/last.pth")  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """

    source: str = ""
    optimizer: str = ""
    model: str = ""
    form: str = ""
    tensors_total: int = 0
    restored: list[str] = field(default_factory=list)
    adapted: list[Mismatch] = field(default_factory=list)
    reset: list[Mismatch] = field(default_factory=list)
    step: float | None = None
    fresh: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    frozen: dict[str, str] = field(default_factory=dict)
    prefix: tuple[str, str] | None = None
    dropped: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no old state was reset for a shape change."""
        return not self.reset

    def to_dict(self) -> dict:
        """Everything in plain Python types (JSON-serialisable)."""
        out = asdict(self)
        out["adapted"] = [m.to_dict() for m in self.adapted]
        out["reset"] = [m.to_dict() for m in self.reset]
        out["prefix"] = list(self.prefix) if self.prefix else None
        out["ok"] = self.ok
        return out

    def summary(self) -> str:
        """One line: ``restored 60/62 parameter states (step 40), 2 fresh, ...``."""
        s = f"restored {len(self.restored)}/{self.tensors_total} parameter states"
        if self.step is not None:
            s += f" (step {self.step:g})"
        for what, items in (
            ("adapted", self.adapted),
            ("reset", self.reset),
            ("fresh", self.fresh),
            ("skipped", self.skipped),
            ("frozen", self.frozen),
            ("dropped", self.dropped),
        ):
            if items:
                s += f", {len(items)} {what}"
        return s

    _header = ("status", "parameter", "detail")
    _text_limit = _LIST

    def _status_rows(self, limit: int | None) -> list[tuple[str, str, str]]:
        rows: list[tuple[str, str, str]] = []

        def add(status: str, items: list[tuple[str, str]]) -> None:
            rows.extend(status_rows(status, items, limit))

        if self.prefix:
            rows.append(
                ("prefix", "", f"{describe_prefix(self.prefix)} ({len(self.renamed)} names)")
            )
        add("reset", [(m.key, m.shapes("vs", "old", "new")) for m in self.reset])
        add("adapted", [(m.key, m.shapes("->", "old", "new")) for m in self.adapted])
        add("fresh", [(k, f"no old state, group '{self.groups.get(k, '')}'") for k in self.fresh])
        add("skipped", [(k, "left fresh as asked") for k in self.skipped])
        add("frozen", [(k, f"old state not restored: {self.frozen[k]}") for k in self.frozen])
        add("dropped", [(k, "no such parameter in the model") for k in self.dropped])
        if limit is None:
            add("restored", [(k, f"group '{self.groups.get(k, '')}'") for k in self.restored])
        return rows

    def _caption(self) -> str:
        return "\n".join(self._caption_lines())

    def _caption_lines(self) -> list[str]:
        return [
            f"OptimizerReport: {self.source} ({self.form}) -> {self.optimizer} of {self.model}",
            f"  {self.summary()}",
        ]

    def _html_caption(self) -> str:
        return f"{self.source} -> {self.optimizer} of {self.model}: {self.summary()}"

    def __repr__(self) -> str:
        return f"<OptimizerReport {self.summary()}; ok={self.ok}>"


# --------------------------------------------------------------------------- saving


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """The optimizer's state keyed by the model's parameter names, to save beside the weights.

    Unlike ``optimizer.state_dict()`` (keyed by position) it needs no guessing to restore after
    a surgery: :func:`restore_optimizer` reads it back. It holds ``state`` (name -> per-parameter
    state), ``param_groups`` (hyper-parameters, ``params`` as names) and ``shapes``. Tensors
    are the optimizer's own (as with ``state_dict()``); ``torch.save`` it, e.g. in a training
    checkpoint under ``"optimizer"``.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sorted(optimizer_state(opt, model)["param_groups"][0]["params"])
        ['bias', 'weight']
    """
    require_optimizer(optimizer, "optimizer_state")
    name_of = _param_names(model)
    unnamed = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in name_of]
    if unnamed:
        shapes = ", ".join(format_shape(p.shape) for p in unnamed[:_LIST])
        raise UsageError(
            f"{len(unnamed)} parameter(s) of the optimizer are not parameters of "
            f"{type(model).__name__} (shapes {shapes}); pass the model that owns every "
            "parameter the optimizer holds."
        )
    state: dict[str, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    shapes: dict[str, list[int]] = {}
    for g in optimizer.param_groups:
        names = [name_of[id(p)] for p in g["params"]]
        groups.append(
            {**{k: v for k, v in g.items() if k not in ("params", "param_names")}, "params": names}
        )
        for name, p in zip(names, g["params"], strict=True):
            shapes[name] = list(p.shape)
            if optimizer.state.get(p):
                state[name] = dict(optimizer.state[p])
    return {
        "format": FORMAT,
        "version": _VERSION,
        "state": state,
        "param_groups": groups,
        "shapes": shapes,
    }


# --------------------------------------------------------------------------- restoring


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    old_state: Mapping[str, Any] | str | os.PathLike,
    *,
    names: Names | None = None,
    remap: Remap | None = None,
    prefix: Literal["auto"] | None = "auto",
    skip: str | Iterable[str] | None = None,
    on_mismatch: Literal["reset", "error"] | StateAdapter = "reset",
    entry: str | None = None,
    trust_pickle: bool = False,
    allow_globals: Iterable[Any] | None = None,
) -> OptimizerReport:
    """Give each parameter of a new optimizer the old state of the parameter it was.

    ``old_state``: ``optimizer.state_dict()`` (positional, with or without ``param_names``), a
    ``torch.distributed.checkpoint`` ``get_optimizer_state_dict`` output (FQN-keyed, nested or
    flattened), :func:`optimizer_state` output, or a training checkpoint (path or dict) holding
    one under ``optimizer``, ``optimizer_states`` (Lightning), ``optim``... (``entry=`` picks
    one, dotted, list indices as numbers: ``"optimizer_states.1"``). A training folder gives
    the file its trainer names (``optimizer.pt``, accelerate's ``optimizer.bin``, Lightning's
    ``*.ckpt``). Files are read with the checks weights get, and the state's structure is
    checked before anything uses it.

    Positional state needs the old parameter names: ``names=`` gives them (a list in the
    optimizer's order, the old model, or its weights), else they are inferred from the model
    weights of the same checkpoint (the ``AdamW(model.parameters())`` case); every moment's
    shape is checked against its inferred parameter and an assignment that cannot be trusted
    is refused. Names then go through ``remap`` and the ``prefix="auto"`` rewrite exactly as in
    :func:`load_partial`.

    Each parameter's state (moments, momentum buffers, ``step``) moves to the new optimizer's
    parameter of that name, whatever its group; the new groups' hyper-parameters are kept.
    Parameters with no old state (or matched by ``skip``, e.g. a re-initialised head whose
    shape did not change) start fresh. Old state of another shape is reset (``"reset"``),
    refused (``"error"``) or passed per state tensor to ``on_mismatch(name, old_value,
    new_param) -> Tensor | None`` (``None`` resets that parameter). The optimizer's whole
    state is replaced, only after every check passed: on any error it is unchanged. A path is
    read as :func:`load_partial` reads it (``trust_pickle``, ``allow_globals``).

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10)  # doctest: +SKIP
        >>> surgery.load_partial(model, "runs/last.pth")  # doctest: +SKIP
        >>> opt = torch.optim.AdamW(surgery.param_groups(model, lr=1e-3))  # doctest: +SKIP
        >>> print(surgery.restore_optimizer(opt, model, "runs/last.pth"))  # doctest: +SKIP
    """
    require_optimizer(optimizer, "restore_optimizer")
    require_module(model, "restore_optimizer")
    if prefix not in ("auto", None):
        raise UsageError(f"prefix must be 'auto' or None, not {prefix!r}")
    if not (on_mismatch in ("reset", "error") or callable(on_mismatch)):
        raise UsageError(
            "on_mismatch must be 'reset', 'error' or a callable (name, old_value, new_param) "
            f"-> Tensor | None, not {on_mismatch!r}"
        )
    old = read_old(
        old_state, names=names, entry=entry, trust_pickle=trust_pickle, allow_globals=allow_globals
    )
    plan = _plan(optimizer, model, old, remap, prefix, skip, on_mismatch)
    report = _report(plan, optimizer, model, old)
    _refuse(plan, report, old)
    # The one write: what optimizer.load_state_dict ends with (torch's own defaults, such as
    # Adam turning a float `step` into a tensor, run here too).
    optimizer.__setstate__({"state": plan.new_state})
    return report


@dataclass
class _StatePlan:
    """What restoring will do, decided before anything is reported or written: the names
    mapped (:func:`surgery.keys.mapping.map_names`, as loading maps keys), each held
    parameter's fate (``kinds``: name -> restored / adapted / reset / fresh / skipped /
    refused), the new state, and what the old state holds that the optimizer does not."""

    mapped: KeyMap
    new_state: defaultdict[Tensor, dict[str, Any]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    kinds: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    mismatches: dict[str, Mismatch] = field(default_factory=dict)
    unnamed: list[str] = field(default_factory=list)  # notes: held, not in the model
    frozen: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    held: int = 0
    matched: bool = False
    params: dict[str, Tensor] = field(default_factory=dict)


def _plan(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    old: Old,
    remap: Remap | None,
    prefix: str | None,
    skip: str | Iterable[str] | None,
    on_mismatch: Literal["reset", "error"] | StateAdapter,
) -> _StatePlan:
    params = dict(model.named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for n, p in params.items():
        aliases.setdefault(id(p), []).append(n)
    model_keys = set(params) | {n for n, _ in model.named_buffers(remove_duplicate=False)}
    plan = _StatePlan(map_names(old.names, model_keys, remap=remap, auto_prefix=prefix == "auto"))
    plan.params = params
    skipped = match_keys(skip, params, action="restore_optimizer skip", model=model)
    held: set[int] = set()
    for gi, group in enumerate(optimizer.param_groups):
        gname = str(group.get("name", gi))
        for p in group["params"]:
            held.add(id(p))
            plan.held += 1
            names = aliases.get(id(p))
            if names is None:
                plan.unnamed.append(
                    f"a parameter of shape {format_shape(p.shape)} in group '{gname}' is not in "
                    f"{type(model).__name__}; it starts fresh"
                )
                continue
            plan.groups[names[0]] = gname
            _decide(plan, names, p, group, old, skipped, on_mismatch)
    _leftovers(plan, old, aliases, held)
    return plan


def _decide(
    plan: _StatePlan,
    names: list[str],
    p: Tensor,
    group: Mapping[str, Any],
    old: Old,
    skipped: set[str],
    on_mismatch: Literal["reset", "error"] | StateAdapter,
) -> None:
    """The fate of one held parameter (first of its ``names``) and its new state."""
    name, new_to_old = names[0], plan.mapped.new_to_old
    if name in skipped:
        plan.kinds[name] = "skipped"
        return
    oname = next((new_to_old[a] for a in names if a in new_to_old), None)
    st = old.state.get(oname) if oname is not None else None
    if not st:
        plan.kinds[name] = "fresh"
        return
    old_shape = old.shapes.get(oname)  # type: ignore[arg-type]
    if old_shape is None:
        old_shape = _state_shape(st, p)
    if old_shape == tuple(p.shape):
        plan.new_state[p] = {k: _place(k, v, p, group) for k, v in st.items()}
        plan.kinds[name] = "restored"
        plan.steps += [float(v) for k, v in st.items() if k == "step" and _is_scalar(v)]
        return
    plan.mismatches[name] = Mismatch(name, old_shape, tuple(p.shape))
    if on_mismatch in ("reset", "error"):
        plan.kinds[name] = "reset" if on_mismatch == "reset" else "refused"
        return
    adapted = _adapt(name, st, p, group, old_shape, on_mismatch)  # type: ignore[arg-type]
    if adapted is None:
        plan.kinds[name] = "reset"
    else:
        plan.new_state[p] = adapted
        plan.kinds[name] = "adapted"


def _leftovers(plan: _StatePlan, old: Old, aliases: dict[int, list[str]], held: set[int]) -> None:
    """Old state the optimizer does not take: for a parameter it does not hold (frozen), or
    for no parameter of the model (dropped)."""
    for new, oname in plan.mapped.new_to_old.items():
        if not old.state.get(oname):
            continue
        p = plan.params.get(new)
        if p is None:
            plan.dropped.append(oname)
        elif id(p) not in held and new == aliases[id(p)][0]:
            plan.frozen[new] = "not in the optimizer" if p.requires_grad else "requires_grad=False"
    plan.dropped += [o for o in plan.mapped.dropped if old.state.get(o)]
    plan.matched = any(
        n in plan.params and old.state.get(o) for n, o in plan.mapped.new_to_old.items()
    )


def _report(
    plan: _StatePlan, optimizer: torch.optim.Optimizer, model: nn.Module, old: Old
) -> OptimizerReport:
    """The report of a plan, derived from it (the one place it is filled)."""
    mapped = plan.mapped
    report = OptimizerReport(
        source=old.description,
        optimizer=type(optimizer).__name__,
        model=type(model).__name__,
        form=old.form,
        prefix=mapped.rewrite,
        renamed={o: n for n, o in mapped.new_to_old.items() if n != o},
        groups=dict(plan.groups),
        frozen=dict(plan.frozen),
        dropped=list(plan.dropped),
        notes=[*old.notes, *mapped.notes, *plan.unnamed],
        tensors_total=plan.held,
        step=max(plan.steps) if plan.steps else None,
    )
    lists = {"restored": report.restored, "fresh": report.fresh, "skipped": report.skipped}
    for name, kind in plan.kinds.items():
        if kind in lists:
            lists[kind].append(name)
        elif kind == "adapted":
            report.adapted.append(plan.mismatches[name])
        elif kind == "reset":
            report.reset.append(plan.mismatches[name])
    return report


def _refuse(plan: _StatePlan, report: OptimizerReport, old: Old) -> None:
    """Refuse, before the optimizer is touched: shapes that changed with
    ``on_mismatch="error"``, and old state that matches no parameter at all."""
    refused = [plan.mismatches[n] for n, kind in plan.kinds.items() if kind == "refused"]
    if refused:
        lines = [f"{m.key}: {m.shapes('vs', 'old', 'new')}" for m in refused]
        raise OptimizerStateError(
            Advice(
                f"optimizer state of another shape restoring {old.description} into "
                f"{report.optimizer} of {report.model} ({len(refused)} parameters):\n"
                + "\n".join(first_n_lines(lines, _LIST))
                + "\nThe optimizer is unchanged. Pass ",
                Fix("on_mismatch", "reset"),
                " to start these fresh, ",
                Fix("skip"),
                " for a replaced head, or an adapter callable.",
            )
        )
    if old.state and not plan.matched:
        hint = ""
        if report.dropped:
            hint = (
                f" Old names look like '{escape_control(report.dropped[0])}', model names like "
                f"'{next(iter(plan.params), '')}'; pass remap=."
            )
        raise OptimizerStateError(
            f"none of the {len(old.state)} old parameter states of {old.description} matches a "
            f"parameter of {report.optimizer} ({report.summary()}).{hint} The optimizer is "
            "unchanged."
        )


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, Tensor) and v.ndim == 0)


def _state_shape(st: Mapping[str, Any], p: Tensor) -> tuple[int, ...]:
    """The old parameter's shape as its state shows it: ``p``'s when every per-element tensor
    has it (the Adam/SGD case), else the first tensor shape that differs."""
    for v in st.values():
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape != p.shape:
            return tuple(v.shape)
    return tuple(p.shape)


def _place(key: str, value: Any, p: Tensor, group: Mapping[str, Any]) -> Any:
    """A copy of ``value`` where torch's ``load_state_dict`` would put it: per-parameter
    tensors in the parameter's dtype and device; ``step`` as saved (on the parameter's device
    in float32 for fused or capturable optimizers)."""
    if not isinstance(value, Tensor):
        return value
    if key == "step":
        if group.get("capturable") or group.get("fused"):
            return value.to(dtype=torch.float32, device=p.device, copy=True)
        return value.clone()
    if p.is_floating_point():
        return value.to(dtype=p.dtype, device=p.device, copy=True)
    return value.to(device=p.device, copy=True)


def _adapt(
    name: str,
    st: Mapping[str, Any],
    p: Tensor,
    group: Mapping[str, Any],
    old_shape: tuple[int, ...],
    adapter: StateAdapter,
) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    for k, v in st.items():
        if not isinstance(v, Tensor) or v.ndim == 0:
            out[k] = _place(k, v, p, group)
            continue
        value = adapter(name, v, p)
        if value is None:
            return None
        want = tuple(p.shape) if tuple(v.shape) == old_shape else None
        if not isinstance(value, Tensor) or (want is not None and tuple(value.shape) != want):
            got = format_shape(value.shape) if isinstance(value, Tensor) else repr(value)
            raise OptimizerStateError(
                f"on_mismatch adapter returned {got} for '{name}' state '{k}', but the "
                f"parameter is {format_shape(p.shape)}; return a tensor of that shape or None "
                "to reset it. The optimizer is unchanged."
            )
        out[k] = _place(k, value.detach(), p, group)
    return out


def _param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first name (tied parameters once)."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"expected an nn.Module, got {type(model).__name__}")
    return {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
