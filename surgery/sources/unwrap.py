"""Finding the state dict inside a training checkpoint: pure functions on loaded objects.

Training scripts save ``{"state_dict": ..., "epoch": ..., "optimizer": ...}``, Lightning
``{"state_dict": ...}``, DDP wrappers ``{"model": {"module": ...}}``; ``unwrap`` finds the
tensor dict the way a person would, or names the entries and asks for ``entry=``. Nothing
here touches files, so every rule is testable on plain dicts.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .._table import first_n
from .._text import escape_control
from ..errors import Advice, CheckpointError, Fix

__all__ = [
    "CONTAINER_KEYS",
    "Unwrapped",
    "describe",
    "find_entry",
    "find_state_dict",
    "is_optimizer_state",
    "pick_entry",
    "unwrap",
]

# Entries that training scripts use to hold the model's state dict, most obvious first.
# EMA weights are deliberately absent: they are picked with entry="ema" (or its real name).
CONTAINER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "model_state",
    "params",
    "weights",
)

_OPTIMIZER_HINT = (
    "Pass the model's weights (model.state_dict(), or the checkpoint entry that holds them); "
    "optimizer state is restored with surgery.restore_optimizer."
)


@dataclass
class Unwrapped:
    """The state dict found in a loaded object, and where it sat.

    ``container`` is the entry path to it (``['model', 'module']``; empty at top level);
    ``other_entries`` are the top-level entries beside it (``['epoch', 'optimizer']``).
    ``tensors`` is the state dict as found: tensors, and what a module's ``state_dict()`` puts
    beside them (extra states, a quantized layer's packed weights, torch's ``_metadata``).
    """

    tensors: Mapping[str, Any]
    container: list[str] = field(default_factory=list)
    other_entries: list[str] = field(default_factory=list)

    @property
    def suffix(self) -> str:
        """The container path as subscripts, e.g. ``"['state_dict']"``, for descriptions."""
        return "".join(f"[{p!r}]" for p in self.container)


def unwrap(obj: Any, entry: str | None = None, where: str = "<dict>") -> Unwrapped:
    """Find the state dict inside ``obj`` (a loaded checkpoint); ``where`` names it in errors.

    ``entry`` picks a container entry explicitly (dotted for nesting: ``"extra.inner"``);
    without it the obvious container is found (see ``CONTAINER_KEYS``), one level of nesting
    included.

    Example:
        >>> import torch
        >>> ckpt = {"epoch": 3, "model": {"module": {"w": torch.ones(1)}}}
        >>> found = unwrap(ckpt)
        >>> list(found.tensors), found.container, found.other_entries
        (['w'], ['model', 'module'], ['epoch'])
    """
    value, path = obj, []
    if entry is not None:
        value, path = pick_entry(obj, entry, where)
        if not isinstance(value, (Mapping, nn.Module)):
            raise CheckpointError(
                f"entry {entry!r} of {where} holds {_value(value)}, not a state dict; pick the "
                f"entry that holds the model's tensors. Its entries are: {_listing(obj)}"
            )
    found, inner = find_state_dict(value, where, explicit=entry is not None)
    container = path + inner
    return Unwrapped(found, container, _others(obj, container))


def pick_entry(obj: Any, entry: str, where: str) -> tuple[Any, list[str]]:
    """The value at ``entry`` (an exact key first, else dotted nesting) and its key path.

    List items are named by their index (``"optimizer_states.1"``: Lightning keeps one state
    per optimizer in a list).

    Example:
        >>> pick_entry({"a": {"b.c": [1, 2]}}, "a.b.c.1", "<dict>")
        (2, ['a', 'b.c', '1'])
    """
    if not isinstance(obj, (Mapping, list, tuple)):
        raise CheckpointError(
            Advice(Fix("entry", entry), f" given, but {where} holds a {describe(obj)}, not a dict")
        )
    found = _walk(obj, entry)
    if found is None:
        listing = _listing(obj) if isinstance(obj, Mapping) else f"a {describe(obj)}"
        raise CheckpointError(f"{where} has no entry {entry!r}; its entries are: {listing}")
    return found


def _child(obj: Any, part: str) -> tuple[bool, Any]:
    """``obj[part]`` for a dict key or a list index, and whether there is one."""
    if isinstance(obj, Mapping):
        return (True, obj[part]) if part in obj else (False, None)
    if isinstance(obj, (list, tuple)) and part.isascii() and part.isdigit():
        i = int(part)
        return (True, obj[i]) if i < len(obj) else (False, None)
    return False, None


def _walk(obj: Any, entry: str) -> tuple[Any, list[str]] | None:
    ok, value = _child(obj, entry)
    if ok:
        return value, [entry]
    parts = entry.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        ok, inner = _child(obj, head)
        if ok and isinstance(inner, (Mapping, list, tuple)):
            found = _walk(inner, ".".join(parts[i:]))
            if found is not None:
                return found[0], [head, *found[1]]
    return None


def find_entry(
    obj: Any,
    entry: str | None,
    names: tuple[str, ...],
    is_it: Callable[[Any], bool],
    what: str,
    where: str,
) -> tuple[Any, list[str]]:
    """The ``what`` state (an optimizer's, a scheduler's) in a loaded checkpoint, and its path.

    ``entry`` names it (as in :func:`pick_entry`); else ``obj`` itself when ``is_it(obj)``;
    else the first of ``names`` that ``obj`` holds. A list of one such state (Lightning's
    ``optimizer_states``) gives its item; a longer list asks for ``entry=``.

    Example:
        >>> find_entry({"epoch": 3, "sched": {"last_epoch": 3}}, None, ("sched",),
        ...            lambda o: "last_epoch" in o, "LR scheduler", "<dict>")
        ({'last_epoch': 3}, ['sched'])
    """
    if entry is not None:
        found, path = pick_entry(obj, entry, where)
    elif is_it(obj):
        return obj, []
    elif isinstance(obj, Mapping) and (hits := [k for k in names if k in obj]):
        found, path = obj[hits[0]], [hits[0]]
    else:
        listing = _listing(obj) if isinstance(obj, Mapping) else f"a {describe(obj)}"
        raise CheckpointError(
            Advice(
                f"found no {what} state in {where} (looked for {', '.join(names)}); its "
                f"entries are: {listing}. Pass ",
                Fix("entry"),
                " to name the one that holds it.",
            )
        )
    suffix = "".join(f"[{p!r}]" for p in path)
    if isinstance(found, (list, tuple)):  # Lightning keeps a list, one per optimizer
        if len(found) != 1:
            raise CheckpointError(
                Advice(
                    f"{where}{suffix} holds {len(found)} {what} states; pick one with ",
                    Fix("entry", ".".join(path) + ".0"),
                    " (or .1, ...)",
                )
            )
        found, path, suffix = found[0], [*path, "0"], suffix + "['0']"
    if not is_it(found):
        raise CheckpointError(f"{where}{suffix} is a {describe(found)}, not a {what} state dict")
    return found, path


def find_state_dict(obj: Any, where: str, *, explicit: bool) -> tuple[Mapping, list[str]]:
    """The tensor dict in ``obj`` and the entry path to it; a clear error when there is none.

    ``explicit`` says the caller already picked an entry (no hint to pass ``entry=``). As in
    ``load_state_dict``, a dict of tensors may hold other values (``"version": 2``): they are
    kept beside the tensors and planned as unexpected keys. A dict is taken as it is when it
    holds tensors and no dicts (or, picked by ``entry=``, any tensor at all); otherwise its
    entries are searched for the state dict (see :func:`_candidates`).
    """
    if isinstance(obj, nn.Module):
        return obj.state_dict(), []
    if _is_tensor_dict(obj) or _is_flat(obj) or (explicit and _holds_tensors(obj)):
        return obj, []
    if is_optimizer_state(obj):
        raise CheckpointError(
            f"{where} is an optimizer state, not model weights. {_OPTIMIZER_HINT}"
        )
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{where} holds {_value(obj)}, not a state dict. Save the model's state_dict() instead."
        )
    if not obj:
        raise CheckpointError(f"{where} is empty: it holds no tensors")
    candidates = _candidates(obj)
    named = [k for k in CONTAINER_KEYS if k in candidates]
    if named:
        first = candidates[named[0]]
        others = [k for k in named[1:] if not _same_tensors(candidates[k][0], first[0])]
        if others:  # 'model' and 'state_dict' both holding weights: no order decides
            listing = ", ".join(f"'{k}' ({_n_tensors(candidates[k][0])} tensors)" for k in named)
            raise CheckpointError(
                Advice(
                    f"{where} holds several model state dicts: {listing}, each under a name "
                    "training scripts use for the weights. Pass ",
                    Fix("entry"),
                    " to choose one, e.g. ",
                    Fix("entry", named[0]),
                )
            )
        return first
    if not candidates:  # no clear state dict: the one dict of tensors beside plain values
        candidates = {str(k): (v, [str(k)]) for k, v in obj.items() if _is_flat(v)}
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if len(candidates) > 1:
        listing = ", ".join(f"'{k}' ({_n_tensors(v[0])} tensors)" for k, v in candidates.items())
        raise CheckpointError(
            Advice(
                f"{where} holds several tensor dicts: {listing}. None is the obvious model "
                "state; pass ",
                Fix("entry"),
                " to choose one, e.g. ",
                Fix("entry", next(iter(candidates))),
            )
        )
    bad = [(k, v) for k, v in obj.items() if not isinstance(v, Tensor)]
    if len(bad) < len(obj):
        listing = first_n([f"'{k}' ({describe(v)})" for k, v in bad], 10)
        raise CheckpointError(
            Advice(
                f"{where} mixes tensors with dicts and other values: {listing}, and none of "
                "its entries is a state dict. Pass ",
                Fix("entry"),
                " to pick the entry that holds the weights",
            )
        )
    if any(is_optimizer_state(v) for v in obj.values()):
        hint = f" It holds optimizer state but no model weights. {_OPTIMIZER_HINT}"
    else:
        hint = (
            ""
            if explicit
            else Advice(" Pass ", Fix("entry"), " to pick the entry that holds the weights.")
        )
    raise CheckpointError(
        Advice(f"found no tensors in {where}; its entries are: {_listing(obj)}.", hint)
    )


def is_optimizer_state(obj: Any) -> bool:
    """Whether ``obj`` looks like ``optimizer.state_dict()``: ``state`` and ``param_groups``.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        >>> is_optimizer_state(opt.state_dict()), is_optimizer_state({"w": torch.ones(1)})
        (True, False)
    """
    return (
        isinstance(obj, Mapping)
        and isinstance(obj.get("state"), Mapping)
        and isinstance(obj.get("param_groups"), (list, tuple))
    )


def describe(v: Any) -> str:
    """A few words for a checkpoint value in a message: ``dict of 3``, ``optimizer state``."""
    if is_optimizer_state(v):
        return "optimizer state"
    if isinstance(v, Mapping):
        return f"dict of {len(v)}"
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__} of {len(v)}"
    return type(v).__name__


def _value(v: Any) -> str:
    """``a float (0.71)`` for scalars and short strings, else ``a list``."""
    if isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= 40):
        return f"a {type(v).__name__} ({v!r})"
    return f"a {describe(v)}"


def _listing(obj: Mapping) -> str:
    shown = itertools.islice(obj.items(), 20)
    return ", ".join(f"'{escape_control(str(k))}' ({describe(v)})" for k, v in shown)


def _is_tensor_dict(obj: Any) -> bool:
    """A state dict: tensors and modules' extra states (keys ending ``_extra_state``), or
    what ``Module.state_dict()`` made (it keeps a ``_metadata`` of module versions) with
    other non-tensor entries (packed weights) among its tensors."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    if all(isinstance(v, Tensor) or str(k).endswith("_extra_state") for k, v in obj.items()):
        return any(isinstance(v, Tensor) for v in obj.values())
    return isinstance(getattr(obj, "_metadata", None), Mapping) and _holds_tensors(obj)


def _holds_tensors(obj: Any) -> bool:
    """A dict with at least one tensor among its values."""
    return isinstance(obj, Mapping) and any(isinstance(v, Tensor) for v in obj.values())


def _is_flat(obj: Any) -> bool:
    """Tensors beside plain values (``"version": 2``), no dict or module among them: a state
    dict as ``load_state_dict`` takes it (the other values are unexpected keys), never a
    container of one."""
    return _holds_tensors(obj) and not any(
        isinstance(v, (Mapping, nn.Module)) for v in obj.values()
    )


def _mostly_tensors(obj: Any) -> bool:
    """A flat dict whose tensors outnumber its other values (a state dict with a stray
    ``version``), not a training record with a tensor in it (``{"best_acc": tensor(0.7),
    "epoch": 3, "arch": "resnet18"}``)."""
    if not _is_flat(obj):
        return False
    n = sum(isinstance(v, Tensor) for v in obj.values())
    return 2 * n > len(obj)


def _n_tensors(obj: Mapping) -> int:
    return sum(isinstance(v, Tensor) for v in obj.values())


def _same_tensors(a: Mapping, b: Mapping) -> bool:
    """The same keys holding the same tensors (one dict saved under two names)."""
    if a is b:
        return True
    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if x is y:
            continue
        if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
            return False
        if (
            x.shape != y.shape
            or x.dtype != y.dtype
            or x.device != y.device
            or x.stride() != y.stride()
            or x.data_ptr() != y.data_ptr()
        ):
            return False
    return True


def _candidates(obj: Mapping) -> dict[str, tuple[Mapping, list[str]]]:
    """Entries leading to a state dict, one level of nesting included: {'model': {'module': sd}}.

    An entry named like a weights container (``CONTAINER_KEYS``) qualifies with any tensor in
    it; another one when it is a state dict (see :func:`_is_tensor_dict`) or mostly tensors,
    so a dict of training statistics beside the weights is not taken for a second model.
    """
    out: dict[str, tuple[Mapping, list[str]]] = {}
    for k, v in obj.items():
        if isinstance(v, nn.Module):
            out[str(k)] = (v.state_dict(), [str(k)])
        elif _is_tensor_dict(v) or _mostly_tensors(v) or (k in CONTAINER_KEYS and _is_flat(v)):
            out[str(k)] = (v, [str(k)])
        elif isinstance(v, Mapping) and not _holds_tensors(v):
            for k2 in CONTAINER_KEYS:
                inner = v.get(k2)
                if _is_tensor_dict(inner) or _is_flat(inner):
                    out[str(k)] = (inner, [str(k), k2])
                    break
    return out


def _others(obj: Any, container: list[str]) -> list[str]:
    if not container or not isinstance(obj, Mapping):
        return []
    return [str(k) for k in obj if str(k) != container[0]]
