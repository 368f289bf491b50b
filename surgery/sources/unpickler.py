"""The one restricted unpickler: every pickle surgery reads without ``trust_pickle`` goes here.

A pickle is a small program; its ``GLOBAL`` opcodes import any module and call any function. This
unpickler resolves globals only from an allow-list the caller passes (a name -> object mapping;
it never imports anything a file names), and reads from a size-checked ``bytes`` object, so a
hostile file can neither run code nor make it read or allocate more than the file holds.

A global outside the allow-list is refused. With ``stub_refused=True`` it becomes an inert
stand-in instead (a subclass of :class:`Refused` that accepts its arguments and state and does
nothing with them), so entries that are not needed for the weights (a Lightning checkpoint's
hyper-parameters, callbacks) can be skipped unread while the weights load; the caller checks
that what it uses holds no stand-in (:func:`refused_in`). Every global the file names is
recorded either way, for the error message.

Example:
    >>> import pickle, collections
    >>> data = pickle.dumps(collections.OrderedDict(a=1))
    >>> restricted_loads(data, where="x.pkl", allowed=PLAIN_GLOBALS).value["a"]
    1
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import importlib
import io
import pickle
import pickletools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError, UnsafeCheckpointError, UsageError

__all__ = [
    "PLAIN_GLOBALS",
    "Refused",
    "Unpickled",
    "allowed_from",
    "global_names",
    "refused_in",
    "restricted_loads",
]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``; latin-1 only, so a file
    cannot make the codec registry import an encoding module by naming it."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


# Plain data that runs no code when unpickled; callers add their own names to it.
PLAIN_GLOBALS: Mapping[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": bytearray,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "_codecs.encode": _latin1_encode,
}


class Refused:
    """Stand-in for an object of a global the allow-list refused: it takes any arguments,
    state, items and calls, keeps none of them, and runs no code of the refused class."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Refused:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Refused:
        return type(self)()

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<not read: {self.global_name}>"


@dataclass
class Unpickled:
    """What :func:`restricted_loads` returns: the value and every refused global's name."""

    value: Any
    refused: list[str] = field(default_factory=list)


class _Unpickler(pickle.Unpickler):
    def __init__(
        self,
        data: bytes,
        allowed: Mapping[str, Any],
        persistent_load: Callable[[Any], Any] | None,
        stub_refused: bool,
    ) -> None:
        super().__init__(io.BytesIO(data))
        self._allowed = allowed
        self._persistent = persistent_load
        self._stub = stub_refused
        self.refused: list[str] = []
        self._stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = _canonical(module, name)
        if full in self._allowed:
            return self._allowed[full]
        if full not in self.refused:
            self.refused.append(full)
        if not self._stub:
            raise _RefusedGlobal(full)
        if full not in self._stubs:
            self._stubs[full] = type(name, (Refused,), {"global_name": full})
        return self._stubs[full]

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError("persistent ids are not expected in this pickle")
        return self._persistent(pid)


def _canonical(module: str, name: str) -> str:
    """``module.name``, Python 2 names (protocols 0-2) mapped as pickle's fix_imports does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


class _RefusedGlobal(Exception):
    pass


def restricted_loads(
    data: bytes,
    *,
    where: str,
    allowed: Mapping[str, Any],
    persistent_load: Callable[[Any], Any] | None = None,
    stub_refused: bool = False,
    what: str = "checkpoint",
) -> Unpickled:
    """Unpickle ``data`` resolving globals only from ``allowed``; ``where`` names the file.

    ``persistent_load`` resolves persistent ids (torch storages). Refused globals raise
    :class:`UnsafeCheckpointError` naming every global the pickle names, or, with
    ``stub_refused=True``, become :class:`Refused` stand-ins listed in the result. A pickle
    that is broken in any way raises :class:`CheckpointError`. Errors that are already a
    ``SurgeryError`` (raised by ``persistent_load`` or an allowed callable) pass through.
    """
    unpickler = _Unpickler(data, allowed, persistent_load, stub_refused)
    try:
        value = unpickler.load()
    except _RefusedGlobal:
        raise unsafe_error(where, global_names(data) or unpickler.refused, what=what) from None
    except (CheckpointError, UsageError):
        raise
    except RecursionError:
        raise CheckpointError(
            f"cannot read {what} '{where}': its pickle nests too deeply; the file is corrupt "
            "or hostile"
        ) from None
    except Exception as e:  # a broken pickle raises anything (EOFError, TypeError, ...)
        raise CheckpointError(
            f"cannot read {what} '{where}': its pickle is truncated or corrupt "
            f"({type(e).__name__}: {str(e)[:200]}); download or save it again"
        ) from None
    return Unpickled(value, unpickler.refused)


def unsafe_error(where: str, names: Iterable[str], *, what: str = "checkpoint") -> Exception:
    """The refusal for a pickle naming globals outside the allow-list: every name, then the
    ways out (``allow_globals=``, a re-save, and last ``trust_pickle=True``)."""
    listed = ", ".join(dict.fromkeys(names)) or "an unknown global"
    return UnsafeCheckpointError(
        f"{what} '{where}' contains pickled Python objects ({listed}) that safe loading "
        "refuses: unpickling them can run arbitrary code. If they are plain data you trust, "
        "pass allow_globals=[...] naming them; better, re-save the weights as a plain state "
        "dict (torch.save(model.state_dict(), path)) or as safetensors. Only if you trust the "
        "whole file, pass trust_pickle=True."
    )


def global_names(data: bytes) -> list[str]:
    """Every global a pickle names, in order, found by reading its opcodes (nothing runs).

    ``STACK_GLOBAL`` takes its module and name from the two strings pushed before it (memo
    references followed); a pickle too broken to scan gives the names found up to the break.

    Example:
        >>> import pickle, collections
        >>> global_names(pickle.dumps(collections.OrderedDict(), protocol=4))
        ['collections.OrderedDict']
    """
    names: list[str] = []
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(_canonical(*str(arg).split(" ", 1)))
                stack.append(None)
            elif op.name == "STACK_GLOBAL":
                mod, name = stack[-2:] if len(stack) >= 2 else (None, None)
                known = isinstance(mod, str) and isinstance(name, str)
                names.append(_canonical(mod, name) if known else "<computed global>")
                del stack[-2:]
                stack.append(None)
            elif isinstance(arg, str) and "UNICODE" in op.name:
                stack.append(arg)
            elif op.name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1] if stack else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg))
            elif op.name not in ("PROTO", "FRAME", "STOP", "MARK"):
                stack.append(None)
    except Exception:  # a truncated pickle: report what was found
        pass
    return list(dict.fromkeys(names))


def refused_in(obj: Any, limit: int = 1_000_000) -> list[str]:
    """Names of the refused globals whose stand-ins sit anywhere inside ``obj`` (dicts, lists,
    tuples, sets walked without recursion, each object once; at most ``limit`` visited)."""
    found: list[str] = []
    seen: set[int] = set()
    todo = [obj]
    while todo and len(seen) < limit:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, Refused):
            found.append(x.global_name)
        elif isinstance(x, Mapping):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            todo.extend(x)
        elif isinstance(x, type) and issubclass(x, Refused):
            found.append(x.global_name)
    return list(dict.fromkeys(found))


def allowed_from(allow_globals: Iterable[Any] | None) -> dict[str, Any]:
    """The allow-list entries for a user's ``allow_globals=[...]``: classes or functions, or
    ``"module.Name"`` strings. A string imports the module the *user* named (never one a file
    names); anything that is not found is a :class:`UsageError`.

    Example:
        >>> import argparse
        >>> sorted(allowed_from([argparse.Namespace, "collections.Counter"]))
        ['argparse.Namespace', 'collections.Counter']
    """
    out: dict[str, Any] = {}
    if allow_globals is None:
        return out
    if isinstance(allow_globals, (str, bytes)) or not isinstance(allow_globals, Iterable):
        raise UsageError(
            f"allow_globals must be a list of classes or 'module.Name' strings, not "
            f"{allow_globals!r}"
        )
    for g in allow_globals:
        if isinstance(g, str):
            out[g] = _resolve(g)
        elif callable(g) and hasattr(g, "__module__") and hasattr(g, "__qualname__"):
            out[f"{g.__module__}.{g.__qualname__}"] = g
        else:
            raise UsageError(
                f"allow_globals entry {g!r} is neither a class/function nor a 'module.Name' string"
            )
    return out


def _resolve(spec: str) -> Any:
    parts = spec.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise UsageError(
        f"allow_globals names {spec!r}, which cannot be found; give 'package.module.Name' of an "
        "installed class (or pass the class itself)"
    )
