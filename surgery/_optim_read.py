"""The old optimizer state for :func:`surgery.restore_optimizer`: found, checked, named.

A file or a folder is read through ``sources`` (the checks every checkpoint gets, the file a
trainer names ``optimizer.pt``); the state is found in its checkpoint as loading finds the
weights (``sources.unwrap``); its structure is checked before anything uses it, so a hostile
file ends in a :class:`CheckpointError`; positional state gets a name for every parameter,
given, stored (``param_names``) or inferred from the weights beside it by shape.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from ._table import first_n_lines, format_shape
from ._text import escape_control
from .errors import Advice, CheckpointError, Fix, OptimizerStateError, UsageError
from .sources import read_checkpoint
from .sources.reading import load_training_state
from .sources.unwrap import describe, find_entry, is_optimizer_state

__all__ = ["FORMAT", "Names", "Old", "read_old"]

FORMAT = "surgery.optimizer_state"

# Entries of a training checkpoint that hold optimizer state, most common first.
_OPTIMIZER_ENTRIES = (
    "optimizer",
    "optimizer_state_dict",
    "optimizer_states",
    "optim",
    "opt",
    "optimizer_state",
)
# Float state-dict entries that are buffers whatever the model (BatchNorm statistics).
_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")
_LIST = 8  # items listed in error messages
_MAX_NESTING = 8  # levels of lists/dicts inside one parameter's state (LBFGS keeps lists)

Names = Sequence[str] | nn.Module | Mapping[str, Tensor] | str | os.PathLike


@dataclass
class Old:
    """The old optimizer state with a name for every parameter."""

    description: str
    form: str
    names: list[str]  # every parameter the old optimizer held, in its order
    state: dict[str, dict[str, Any]]  # name -> per-parameter state (non-empty ones)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # where known
    notes: list[str] = field(default_factory=list)


def read_old(
    old_state: Any,
    *,
    names: Names | None,
    entry: str | None,
    trust_pickle: bool,
    allow_globals: Iterable[Any] | None = None,
) -> Old:
    """The old state from what :func:`~surgery.restore_optimizer` was given, every parameter
    named; a :class:`CheckpointError` or :class:`OptimizerStateError` when that cannot be."""
    if isinstance(old_state, (str, os.PathLike)):
        obj, path = load_training_state(
            old_state, "optimizer", trust_pickle=trust_pickle, allow_globals=allow_globals
        )
        where = str(path)
    elif isinstance(old_state, Mapping):
        where, obj = "<dict>", old_state
    else:
        raise UsageError(
            "restore_optimizer takes the old state as a dict (optimizer.state_dict(), "
            "surgery.optimizer_state(...), a training checkpoint) or a checkpoint path, not a "
            f"{type(old_state).__name__}"
        )
    osd, path_in = find_entry(
        obj,
        entry,
        _OPTIMIZER_ENTRIES,
        lambda o: is_optimizer_state(o) or _is_flat_dcp(o),
        "optimizer",
        where,
    )
    description = where + "".join(f"[{p!r}]" for p in path_in)
    container = obj if path_in else None  # the checkpoint around it (model weights, maybe)
    if _is_flat_dcp(osd):
        osd = _unflatten(osd)
    _check_structure(osd, description)
    groups = list(osd["param_groups"])
    order = [k for g in groups for k in g.get("params", ())]
    state = osd["state"]
    if not order:  # a flattened DCP dict carries no group membership
        order = list(state)
    if all(isinstance(k, str) for k in order):
        form = "surgery name-keyed" if osd.get("format") == FORMAT else "name-keyed"
        old = Old(description, form, list(order), _nonempty(state))
        if form == "surgery name-keyed":
            old.shapes = _shapes(osd.get("shapes", {}), description)
        if names is not None:
            old.notes.append("names= ignored: the state names its parameters itself")
        return old
    if not all(isinstance(k, int) for k in order):
        raise CheckpointError(
            f"{description}: the optimizer's param_groups mix names and positions; it is not "
            "an optimizer state dict torch or surgery wrote"
        )
    return _name_positions(order, state, groups, names, container, description)


# --------------------------------------------------------------------------- structure


def _is_flat_dcp(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and k.startswith(("state.", "param_groups.")) for k in obj)
        and any(k.startswith("state.") for k in obj)
    )


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """DCP's ``flatten_optimizer_state_dict=True`` form back to ``{'state': {fqn: {...}}}``."""
    state: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        if k.startswith("state."):
            fqn, _, key = k[len("state.") :].rpartition(".")
            state.setdefault(fqn, {})[key] = v
    return {"state": state, "param_groups": []}


def _check_structure(osd: Mapping[str, Any], description: str) -> None:
    """Refuse what no optimizer writes, before anything reads it: groups that are not dicts,
    ``params`` / ``param_names`` that are not lists of positions / names, per-parameter
    states that are not dicts, tensors without data (meta) or not dense."""
    for gi, group in enumerate(osd["param_groups"]):
        where = f"param_groups[{gi}]"
        if not isinstance(group, Mapping):
            _malformed(description, f"{where} is a {describe(group)}, not a dict")
        params = group.get("params", ())
        if not isinstance(params, (list, tuple)) or not all(_is_key(p) for p in params):
            _malformed(
                description,
                f"{where}['params'] is {_short(params)}, not a list of "
                "parameter positions or names",
            )
        if "param_names" in group:
            pn = group["param_names"]
            if not isinstance(pn, (list, tuple)) or not all(isinstance(n, str) for n in pn):
                _malformed(
                    description, f"{where}['param_names'] is {_short(pn)}, not a list of names"
                )
            if len(pn) != len(params):
                _malformed(
                    description, f"{where} lists {len(params)} params but {len(pn)} param_names"
                )
    for key, st in osd["state"].items():
        if not _is_key(key):
            _malformed(
                description,
                f"its state has the key {_short(key)}, neither a parameter position nor a name",
            )
        if st is None:
            continue
        if not isinstance(st, Mapping):
            _malformed(
                description, f"the state of parameter {_short(key)} is {_short(st)}, not a dict"
            )
        for k, v in st.items():
            why = _bad_value(v, _MAX_NESTING)
            if not isinstance(k, str) or why:
                _malformed(
                    description,
                    f"the state of parameter {_short(key)} holds "
                    f"{_short(k)}: {why or 'not a name'}",
                )


def _is_key(k: Any) -> bool:
    return isinstance(k, (int, str)) and not isinstance(k, bool)


def _bad_value(v: Any, depth: int) -> str:
    """Why ``v`` cannot be optimizer state ('' when it can)."""
    if isinstance(v, Tensor):
        if v.is_meta:
            return "a meta tensor (no data)"
        if v.layout != torch.strided or v.is_quantized or v.is_nested:
            return f"a {str(v.layout).removeprefix('torch.')} tensor, not a dense one"
        return ""
    if isinstance(v, (list, tuple, Mapping)):
        if depth <= 0:
            return "nested too deep"
        items = v.values() if isinstance(v, Mapping) else v
        return next((w for w in (_bad_value(x, depth - 1) for x in items) if w), "")
    return ""


def _short(v: Any) -> str:
    if isinstance(v, (Mapping, list, tuple)) or hasattr(v, "shape"):
        return f"a {describe(v)}"
    text = escape_control(repr(v))
    return text if len(text) <= 60 else text[:60] + "..."


def _malformed(description: str, why: str) -> NoReturn:
    raise CheckpointError(
        Advice(
            f"{description} is not an optimizer state torch or surgery wrote: {why}. The file "
            "is corrupt or hostile; save the optimizer state again (optimizer.state_dict() or "
            "surgery.optimizer_state()), or pass ",
            Fix("entry"),
            " if another entry holds it.",
        )
    )


def _nonempty(state: Mapping) -> dict[str, dict[str, Any]]:
    return {str(k): dict(v) for k, v in state.items() if v}


def _shapes(shapes: Any, description: str) -> dict[str, tuple[int, ...]]:
    ok = isinstance(shapes, Mapping) and all(
        isinstance(v, (list, tuple)) and all(_is_key(d) and isinstance(d, int) for d in v)
        for v in shapes.values()
    )
    if not ok:
        _malformed(description, "its 'shapes' is not a dict of name -> list of sizes")
    return {str(k): tuple(v) for k, v in shapes.items()}


# --------------------------------------------------------------------------- positions


def _name_positions(
    order: list[int],
    state: Mapping[int, Any],
    groups: list[Mapping[str, Any]],
    names: Names | None,
    container: Any,
    description: str,
) -> Old:
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
                "checkpoint that holds the weights too; save with "
                "surgery.optimizer_state() next time."
            )
        found, notes = _align(by_pos, candidates, what, description)
        shapes = dict(candidates)
        form = "positional, names from " + ("names=" if names is not None else "the checkpoint")
    kept = set(found)
    return Old(
        description,
        form,
        found,
        {name: st for name, st in zip(found, by_pos, strict=True) if st},
        {k: v for k, v in shapes.items() if k in kept},
        notes,
    )


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
        if not _param_like(k, t.dtype):
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


def _param_like(name: str, dtype: torch.dtype) -> bool:
    return (dtype.is_floating_point or dtype.is_complex) and (
        name.rpartition(".")[2] not in _BUFFER_NAMES
    )


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
    first = _embed(by_pos, candidates, reverse=False)
    if first is None:
        raise OptimizerStateError(
            f"cannot name the parameters of the positional optimizer state {description} "
            f"from {what}: no choice of {n} of its {m} parameter-like tensors, in order, has "
            "the shapes of the optimizer's states. Pass names= with the old parameter names "
            "in the optimizer's order. The optimizer is unchanged."
        )
    if _embed(by_pos, candidates, reverse=True) != first:
        raise OptimizerStateError(
            f"cannot name the parameters of the positional optimizer state {description} "
            f"from {what}: its {n} states fit {m} parameter-like tensors in more than one way "
            "(the optimizer held a subset of the parameters, or float buffers share their "
            "shapes). Pass names= with the old parameter names in the optimizer's order. The "
            "optimizer is unchanged."
        )
    note = (
        f"old parameter names inferred from {what}: {n} of {m} parameter-like tensors, the only "
        "choice in order whose shapes fit"
    )
    return [candidates[j][0] for j in first], [note]


def _embed(
    by_pos: list[dict[str, Any]], candidates: list[tuple[str, tuple[int, ...]]], *, reverse: bool
) -> list[int] | None:
    """The earliest (or, ``reverse``, the latest) in-order choice of a candidate per position
    whose shape fits, as candidate indices; ``None`` when there is none.

    Greedy is exact here: the earliest choice puts every position at or before where any
    valid choice puts it, the latest at or after, so a valid choice is unique exactly when
    the two agree. Each candidate is looked at once: O(n + m) shape checks, not O(n * m).
    """
    n, m = len(by_pos), len(candidates)
    out = [0] * n
    positions = range(n - 1, -1, -1) if reverse else range(n)
    j = m - 1 if reverse else 0
    step = -1 if reverse else 1
    for i in positions:
        while 0 <= j < m and not _fits(by_pos[i], candidates[j][1]):
            j += step
        if not 0 <= j < m:
            return None
        out[i] = j
        j += step
    return out
