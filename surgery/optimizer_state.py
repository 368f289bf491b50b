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
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._keymap import Remap, apply_prefix, apply_remap, describe_prefix, detect_prefix
from ._select import match_keys
from ._table import _StatusTable, first_n_lines, format_shape, status_rows
from .checkpoint import read_checkpoint
from .errors import CheckpointError, OptimizerStateError, UsageError
from .report import Mismatch
from .sources.torchfile import load_object

__all__ = ["OptimizerReport", "optimizer_state", "restore_optimizer", "restore_scheduler"]

FORMAT = "surgery.optimizer_state"
_VERSION = 1

# Entries of a training checkpoint that hold optimizer / scheduler state, most common first.
_OPTIMIZER_ENTRIES = (
    "optimizer",
    "optimizer_state_dict",
    "optimizer_states",
    "optim",
    "opt",
    "optimizer_state",
)
_SCHEDULER_ENTRIES = (
    "lr_scheduler",
    "scheduler",
    "lr_schedulers",
    "lr_scheduler_state_dict",
    "scheduler_state_dict",
    "sched",
)
# Float state-dict entries that are buffers whatever the model (BatchNorm statistics).
_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")
_LIST = 8  # items listed per category in text and error messages

StateAdapter = Callable[[str, Tensor, Tensor], Tensor | None]
Names = Sequence[str] | nn.Module | Mapping[str, Tensor] | str | os.PathLike


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
    restored: list[str] = field(default_factory=list)
    adapted: list[Mismatch] = field(default_factory=list)
    reset: list[Mismatch] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    frozen: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    prefix: tuple[str, str] | None = None
    notes: list[str] = field(default_factory=list)
    tensors_total: int = 0
    step: float | None = None

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
        return (
            f"OptimizerReport: {self.source} ({self.form}) -> {self.optimizer} of "
            f"{self.model}\n  {self.summary()}"
        )

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
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(
            f"optimizer_state needs a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
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


@dataclass
class _Old:
    """The old optimizer state with a name for every parameter."""

    description: str
    form: str
    names: list[str]  # every parameter the old optimizer held, in its order
    state: dict[str, dict[str, Any]]  # name -> per-parameter state (non-empty ones)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # where known
    notes: list[str] = field(default_factory=list)


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
    one, dotted, list indices as numbers: ``"optimizer_states.1"``).

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
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(
            f"restore_optimizer needs a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise UsageError(f"restore_optimizer needs an nn.Module, got {type(model).__name__}")
    if prefix not in ("auto", None):
        raise UsageError(f"prefix must be 'auto' or None, not {prefix!r}")
    if not (on_mismatch in ("reset", "error") or callable(on_mismatch)):
        raise UsageError(
            "on_mismatch must be 'reset', 'error' or a callable (name, old_value, new_param) "
            f"-> Tensor | None, not {on_mismatch!r}"
        )
    old = _read_old(
        old_state, names=names, entry=entry, trust_pickle=trust_pickle, allow_globals=allow_globals
    )
    report = OptimizerReport(
        source=old.description,
        optimizer=type(optimizer).__name__,
        model=type(model).__name__,
        form=old.form,
    )
    report.notes.extend(old.notes)
    new_state = _plan(optimizer, model, old, report, remap, prefix, skip, on_mismatch)
    # The one write: what optimizer.load_state_dict ends with (torch's own defaults, such as
    # Adam turning a float `step` into a tensor, run here too).
    optimizer.__setstate__({"state": new_state})
    return report


def _plan(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    old: _Old,
    report: OptimizerReport,
    remap: Remap | None,
    prefix: str | None,
    skip: str | Iterable[str] | None,
    on_mismatch: Literal["reset", "error"] | StateAdapter,
) -> defaultdict[Tensor, dict[str, Any]]:
    params = dict(model.named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for n, p in params.items():
        aliases.setdefault(id(p), []).append(n)
    model_keys = set(params) | {n for n, _ in model.named_buffers(remove_duplicate=False)}

    new_to_old, removed, notes = apply_remap(old.names, remap)
    report.notes.extend(notes)
    if prefix == "auto":
        rewrite = detect_prefix(new_to_old, model_keys)
        if rewrite is not None:
            new_to_old = apply_prefix(new_to_old, rewrite)
            report.prefix = rewrite
    report.renamed = {o: n for n, o in new_to_old.items() if n != o}
    skipped = match_keys(skip, params, action="restore_optimizer skip", model=model)

    held: set[int] = set()
    new_state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
    refused: list[Mismatch] = []
    steps: list[float] = []
    for gi, group in enumerate(optimizer.param_groups):
        gname = str(group.get("name", gi))
        for p in group["params"]:
            held.add(id(p))
            report.tensors_total += 1
            names = aliases.get(id(p))
            if names is None:
                report.notes.append(
                    f"a parameter of shape {format_shape(p.shape)} in group '{gname}' is not in "
                    f"{report.model}; it starts fresh"
                )
                continue
            name = names[0]
            report.groups[name] = gname
            if name in skipped:
                report.skipped.append(name)
                continue
            oname = next((new_to_old[a] for a in names if a in new_to_old), None)
            st = old.state.get(oname) if oname is not None else None
            if not st:
                report.fresh.append(name)
                continue
            old_shape = old.shapes.get(oname)
            if old_shape is None:
                old_shape = _state_shape(st, p)
            if old_shape == tuple(p.shape):
                new_state[p] = {k: _place(k, v, p, group) for k, v in st.items()}
                report.restored.append(name)
                steps += [float(v) for k, v in st.items() if k == "step" and _is_scalar(v)]
                continue
            mm = Mismatch(name, old_shape, tuple(p.shape))
            if on_mismatch == "reset":
                report.reset.append(mm)
            elif on_mismatch == "error":
                refused.append(mm)
            else:
                adapted = _adapt(name, st, p, group, old_shape, on_mismatch)
                if adapted is None:
                    report.reset.append(mm)
                else:
                    new_state[p] = adapted
                    report.adapted.append(mm)
    if refused:
        raise OptimizerStateError(
            f"optimizer state of another shape restoring {old.description} into "
            f"{report.optimizer} of {report.model} ({len(refused)} parameters):\n"
            + "\n".join(
                first_n_lines(
                    [f"{m.key}: {m.shapes('vs', 'old', 'new')}" for m in refused],
                    _LIST,
                )
            )
            + "\nThe optimizer is unchanged. Pass on_mismatch='reset' to start these fresh, "
            "skip=[...] for a replaced head, or an adapter callable."
        )
    for new, oname in new_to_old.items():
        if not old.state.get(oname):
            continue
        p = params.get(new)
        if p is None:
            report.dropped.append(oname)
        elif id(p) not in held and new == aliases[id(p)][0]:
            why = "not in the optimizer" if p.requires_grad else "requires_grad=False"
            report.frozen[new] = why
    report.dropped += [o for o in removed if old.state.get(o)]
    if steps:
        report.step = max(steps)
    matched = [o for n, o in new_to_old.items() if n in params and old.state.get(o)]
    if old.state and not matched:
        hint = ""
        if report.dropped:
            hint = (
                f" Old names look like '{report.dropped[0]}', model names like "
                f"'{next(iter(params), '')}'; pass remap=."
            )
        raise OptimizerStateError(
            f"none of the {len(old.state)} old parameter states of {old.description} matches a "
            f"parameter of {report.optimizer} ({report.summary()}).{hint} The optimizer is "
            "unchanged."
        )
    return new_state


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


# --------------------------------------------------------------------------- reading


def _load_file(path: Path, trust_pickle: bool, allow_globals: Iterable[Any] | None) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    return load_object(path, trust_pickle=trust_pickle, allow_globals=allow_globals)


def _is_optimizer_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and isinstance(obj.get("state"), Mapping)
        and isinstance(obj.get("param_groups"), (list, tuple))
    )


def _is_flat_dcp(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and k.startswith(("state.", "param_groups.")) for k in obj)
        and any(k.startswith("state.") for k in obj)
    )


def _describe(v: Any) -> str:
    if isinstance(v, Mapping):
        return f"dict of {len(v)}"
    if isinstance(v, (list, tuple)):
        return f"list of {len(v)}"
    return type(v).__name__


def _entries(obj: Mapping) -> str:
    return ", ".join(f"'{k}' ({_describe(v)})" for k, v in list(obj.items())[:20])


def _pick(obj: Any, entry: str, where: str) -> tuple[Any, list[str]]:
    path: list[str] = []
    for part in entry.split("."):
        if isinstance(obj, Mapping) and part in obj:
            obj = obj[part]
        elif isinstance(obj, (list, tuple)) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            listing = _entries(obj) if isinstance(obj, Mapping) else _describe(obj)
            raise CheckpointError(f"{where} has no entry {entry!r} (at {part!r}: {listing})")
        path.append(part)
    return obj, path


def _find(
    obj: Any,
    entry: str | None,
    entries: tuple[str, ...],
    is_it: Callable[[Any], bool],
    what: str,
    where: str,
) -> tuple[Any, list[str]]:
    """The ``what`` state inside a checkpoint object, and the entry path to it."""
    if entry is not None:
        found, path = _pick(obj, entry, where)
    elif is_it(obj):
        return obj, []
    elif isinstance(obj, Mapping) and (hits := [k for k in entries if k in obj]):
        found, path = obj[hits[0]], [hits[0]]
    else:
        listing = _entries(obj) if isinstance(obj, Mapping) else f"a {_describe(obj)}"
        raise CheckpointError(
            f"found no {what} state in {where} (looked for {', '.join(entries)}); its entries "
            f"are: {listing}. Pass entry= to name the one that holds it."
        )
    if isinstance(found, (list, tuple)):  # Lightning keeps a list, one per optimizer
        if len(found) != 1:
            raise CheckpointError(
                f"{where}[{path[-1]!r}] holds {len(found)} {what} states; pick one with "
                f"entry='{'.'.join(path)}.0' (or .1, ...)"
            )
        found, path = found[0], [*path, "0"]
    if not is_it(found):
        raise CheckpointError(
            f"{where}{_suffix(path)} is a {_describe(found)}, not a {what} state dict"
        )
    return found, path


def _suffix(path: list[str]) -> str:
    return "".join(f"[{p!r}]" for p in path)


def _read_old(
    old_state: Any,
    *,
    names: Names | None,
    entry: str | None,
    trust_pickle: bool,
    allow_globals: Iterable[Any] | None = None,
) -> _Old:
    if isinstance(old_state, (str, os.PathLike)):
        path = Path(old_state).expanduser()
        where = str(path)
        obj = _load_file(path, trust_pickle, allow_globals)
    elif isinstance(old_state, Mapping):
        where, obj = "<dict>", old_state
    else:
        raise UsageError(
            "restore_optimizer takes the old state as a dict (optimizer.state_dict(), "
            "surgery.optimizer_state(...), a training checkpoint) or a checkpoint path, not a "
            f"{type(old_state).__name__}"
        )
    osd, path = _find(
        obj,
        entry,
        _OPTIMIZER_ENTRIES,
        lambda o: _is_optimizer_dict(o) or _is_flat_dcp(o),
        "optimizer",
        where,
    )
    description = where + _suffix(path)
    container = obj if path else None  # the checkpoint around it (model weights, maybe)
    if _is_flat_dcp(osd):
        osd = _unflatten(osd)
    groups = list(osd["param_groups"])
    order = [k for g in groups for k in g.get("params", ())]
    state = osd["state"]
    if not order:  # a flattened DCP dict carries no group membership
        order = list(state)
    if all(isinstance(k, str) for k in order):
        form = "surgery name-keyed" if osd.get("format") == FORMAT else "name-keyed"
        old = _Old(description, form, list(order), _nonempty(state))
        if form == "surgery name-keyed":
            old.shapes = {k: tuple(v) for k, v in osd.get("shapes", {}).items()}
        if names is not None:
            old.notes.append("names= ignored: the state names its parameters itself")
        return old
    if not all(isinstance(k, int) for k in order):
        raise CheckpointError(
            f"{description}: the optimizer's param_groups mix names and positions; it is not "
            "an optimizer state dict torch or surgery wrote"
        )
    return _name_positions(order, state, groups, names, container, description)


def _nonempty(state: Mapping) -> dict[str, dict[str, Any]]:
    return {str(k): dict(v) for k, v in state.items() if v}


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """DCP's ``flatten_optimizer_state_dict=True`` form back to ``{'state': {fqn: {...}}}``."""
    state: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        if k.startswith("state."):
            fqn, _, key = k[len("state.") :].rpartition(".")
            state.setdefault(fqn, {})[key] = v
    return {"state": state, "param_groups": []}


def _name_positions(
    order: list[int],
    state: Mapping[int, Any],
    groups: list[Mapping[str, Any]],
    names: Names | None,
    container: Any,
    description: str,
) -> _Old:
    """Names for a positional state: given, stored as ``param_names``, or inferred."""
    by_pos = [dict(state.get(i) or {}) for i in order]
    n = len(order)
    shapes: dict[str, tuple[int, ...]] = {}
    if names is not None and isinstance(names, Sequence) and not isinstance(names, str):
        given = [str(x) for x in names]
        if len(given) != n:
            raise OptimizerStateError(
                f"names= lists {len(given)} names, but {description} holds {n} parameters "
                "(in its param_groups' order); give one name per parameter."
            )
        form, found, notes = "positional, names given", given, []
    elif names is None and groups and all("param_names" in g for g in groups):
        found = [str(x) for g in groups for x in g["param_names"]]
        if len(found) != n:
            raise CheckpointError(f"{description}: its param_names do not line up with its params")
        form, notes = "positional with param_names", []
    else:
        if names is not None:
            candidates, what = _candidates(names), "names="
        elif container is not None:
            try:
                candidates = _candidates(container)
            except CheckpointError as e:
                raise OptimizerStateError(
                    f"{description} is positional (plain optimizer.state_dict()) and the model "
                    f"weights beside it cannot be read to name its parameters: {e}. Pass names= "
                    "(the old parameter names in the optimizer's order, or the old model)."
                ) from None
            what = description.rsplit("[", 1)[0] + "'s model weights"
        else:
            raise OptimizerStateError(
                f"{description} is a positional optimizer state (plain optimizer.state_dict()) "
                "with no parameter names. Pass names= (the old parameter names in the "
                "optimizer's order, the old model, or its weights), or the whole training "
                "checkpoint that holds the weights too; save with surgery.optimizer_state() "
                "next time."
            )
        found, notes = _align(by_pos, candidates, what, description)
        shapes = {name: candidates_shape for name, candidates_shape in candidates}
        form = "positional, names from " + ("names=" if names is not None else "the checkpoint")
    old = _Old(
        description,
        form,
        found,
        {name: st for name, st in zip(found, by_pos, strict=True) if st},
        {k: v for k, v in shapes.items() if k in set(found)},
        notes,
    )
    return old


def _candidates(weights: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the tensors that can be parameters, in state-dict order.

    An ``nn.Module`` gives its parameters exactly. A state dict gives its floating tensors, less
    BatchNorm statistics and the second name of tied tensors; other float buffers may remain,
    which the shape check and the alignment take care of.
    """
    if isinstance(weights, nn.Module):
        return [(n, tuple(p.shape)) for n, p in weights.named_parameters()]
    sd = read_checkpoint(weights)
    out: list[tuple[str, tuple[int, ...]]] = []
    seen: set[tuple] = set()
    for k, t in sd.items():
        if not (t.is_floating_point() or t.is_complex()):
            continue
        if k.rpartition(".")[2] in _BUFFER_NAMES:
            continue
        try:
            ident = (
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                t.stride(),
            )
        except (RuntimeError, NotImplementedError):
            ident = None
        if ident is not None and ident[0] != 0:
            if ident in seen:
                continue
            seen.add(ident)
        out.append((k, tuple(t.shape)))
    return out


def _fits(st: Mapping[str, Any], shape: tuple[int, ...]) -> bool:
    """Whether a parameter of ``shape`` can own state ``st``: every per-element tensor has its
    shape, or (factored second moments, as in Adafactor) its rank with some dimensions 1."""
    for v in st.values():
        if isinstance(v, Tensor) and v.ndim > 0:
            vs = tuple(v.shape)
            if vs != shape and not (
                len(vs) == len(shape) and all(a in (b, 1) for a, b in zip(vs, shape, strict=True))
            ):
                return False
    return True


def _state_desc(st: Mapping[str, Any]) -> str:
    shown = [f"{k} {format_shape(v.shape)}" for k, v in st.items() if isinstance(v, Tensor)]
    return ", ".join(shown[:3]) or "no tensors"


def _align(
    by_pos: list[dict[str, Any]],
    candidates: list[tuple[str, tuple[int, ...]]],
    what: str,
    description: str,
) -> tuple[list[str], list[str]]:
    """Assign the optimizer's positions to candidate parameters, in order, checking shapes.

    With as many candidates as positions the assignment is the identity; with more, the
    order-preserving assignment whose shapes fit must be unique. Anything else is refused.
    """
    n, m = len(by_pos), len(candidates)
    if m < n:
        raise OptimizerStateError(
            f"{description} holds {n} parameters, but {what} has only {m} tensors that can be "
            "parameters; they are not the weights this optimizer trained. Pass names= with the "
            "old parameter names in the optimizer's order."
        )
    if m == n:
        bad = [
            (i, c)
            for i, (st, c) in enumerate(zip(by_pos, candidates, strict=True))
            if not _fits(st, c[1])
        ]
        if bad:
            lines = first_n_lines(
                [
                    f"position {i}: {_state_desc(by_pos[i])} vs '{name}' {format_shape(shape)}"
                    for i, (name, shape) in bad
                ],
                _LIST,
            )
            raise OptimizerStateError(
                f"cannot name the parameters of the positional optimizer state {description} "
                f"from {what}: in order, {len(bad)} of its {n} states have shapes that "
                f"contradict the parameter they would belong to:\n"
                + "\n".join(lines)
                + "\nThe optimizer was not built from these weights' parameters in order (or "
                "from other weights). Pass names= with the old parameter names in the "
                "optimizer's order. The optimizer is unchanged."
            )
        return [c[0] for c in candidates], []
    # ways[i][j]: assignments of positions i.. to candidates i+j.. (j: candidates skipped so
    # far, at most m - n), capped at 2 since only uniqueness matters.
    slack = m - n
    ways = [[0] * (slack + 1) for _ in range(n + 1)]
    ways[n] = [1] * (slack + 1)
    for i in range(n - 1, -1, -1):
        row, nxt = ways[i], ways[i + 1]
        for j in range(slack, -1, -1):
            total = nxt[j] if _fits(by_pos[i], candidates[i + j][1]) else 0
            if j < slack:
                total += row[j + 1]
            row[j] = min(total, 2)
    if ways[0][0] == 0:
        raise OptimizerStateError(
            f"cannot name the parameters of the positional optimizer state {description} "
            f"from {what}: no choice of {n} of its {m} parameter-like tensors, in order, has "
            "the shapes of the optimizer's states. Pass names= with the old parameter names "
            "in the optimizer's order. The optimizer is unchanged."
        )
    if ways[0][0] > 1:
        raise OptimizerStateError(
            f"cannot name the parameters of the positional optimizer state {description} "
            f"from {what}: its {n} states fit {m} parameter-like tensors in more than one way "
            "(the optimizer held a subset of the parameters, or float buffers share their "
            "shapes). Pass names= with the old parameter names in the optimizer's order. The "
            "optimizer is unchanged."
        )
    found: list[str] = []
    j = 0
    for i in range(n):
        while not (_fits(by_pos[i], candidates[i + j][1]) and ways[i + 1][j]):
            j += 1
        found.append(candidates[i + j][0])
    note = (
        f"old parameter names inferred from {what}: {n} of {m} parameter-like tensors, the only "
        "choice in order whose shapes fit"
    )
    return found, [note]


# --------------------------------------------------------------------------- schedulers


def restore_scheduler(
    scheduler: Any,
    old_state: Mapping[str, Any] | str | os.PathLike,
    *,
    entry: str | None = None,
    trust_pickle: bool = False,
    allow_globals: Iterable[Any] | None = None,
) -> int:
    """Bring a new LR scheduler to the step an old one had reached; returns that step.

    A scheduler's ``state_dict()`` mixes counters (``last_epoch``) with per-group lists
    (``base_lrs``) that a surgery changes. This keeps the new scheduler's groups and settings
    and replays ``step()`` up to the old ``last_epoch``, so every group's lr (and momentum) is
    what the schedule gives at that step for the *new* groups. ``ReduceLROnPlateau`` gets its
    counters (``best``, ``num_bad_epochs``, ``cooldown_counter``, ``last_epoch``) copied. Call
    it on a freshly built scheduler, after :func:`restore_optimizer`; ``old_state`` is a
    scheduler ``state_dict()`` or a training checkpoint holding one (``lr_scheduler``,
    ``scheduler``, Lightning's ``lr_schedulers``...).

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=1.0)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
        >>> restore_scheduler(sched, {"last_epoch": 5, "_step_count": 6})
        5
        >>> round(opt.param_groups[0]["lr"], 6)
        0.01
    """
    if isinstance(old_state, (str, os.PathLike)):
        path = Path(old_state).expanduser()
        obj, where = _load_file(path, trust_pickle, allow_globals), str(path)
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
    sd, _ = _find(
        obj,
        entry,
        _SCHEDULER_ENTRIES,
        lambda o: isinstance(o, Mapping) and "last_epoch" in o,
        "LR scheduler",
        where,
    )
    target = int(sd["last_epoch"])
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        for k in ("best", "num_bad_epochs", "cooldown_counter", "last_epoch"):
            if k in sd:
                setattr(scheduler, k, sd[k])
        return target
    if not callable(getattr(scheduler, "step", None)) or not hasattr(scheduler, "last_epoch"):
        raise UsageError(
            f"restore_scheduler needs a torch LR scheduler, got {type(scheduler).__name__}"
        )
    current = int(scheduler.last_epoch)
    if current > target:
        raise UsageError(
            f"the new {type(scheduler).__name__} is already at step {current}, past the old "
            f"scheduler's {target}; build a fresh scheduler and call restore_scheduler first."
        )
    with warnings.catch_warnings():
        # Replaying the schedule, no optimizer step is due.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        for _ in range(target - current):
            scheduler.step()
    return target
