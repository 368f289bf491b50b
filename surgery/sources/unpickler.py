"""The one restricted unpickler: every pickle surgery reads without ``trust_pickle`` goes here.

A pickle is a small program; its ``GLOBAL`` opcodes import any module and call any function. This
unpickler resolves globals only from an allow-list the caller passes (a name -> object mapping;
it never imports anything a file names) and runs the opcodes that act on objects under rules of
its own, so a hostile file can neither run code nor change an object it did not create:

- ``REDUCE``/``NEWOBJ``/``INST``/``OBJ`` call only objects of the allow-list (and stand-ins);
- ``BUILD`` sets state only on instances of the allow-list's classes, or through a ``builders``
  hook the caller passes for a type (never on a class or a function);
- ``SETITEM(S)``/``APPEND(S)``/``ADDITEMS`` fill only dicts, lists and sets (and instances of
  the allow-list's classes); extension codes (``EXT1/2/4``) are refused;
- lengths are checked against the input before anything is allocated, and keys that would
  nest too deeply to hash (a crash in CPython) are refused.

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
import io
import pickle
import pickletools
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import Advice, CheckpointError, Fix, UnsafeCheckpointError, UsageError

# The fix for refused classes, as the messages word it.
ALLOW_GLOBALS = Fix("allow_globals", shown="allow_globals=[...] naming them")

__all__ = [
    "PLAIN_GLOBALS",
    "Forbidden",
    "Refused",
    "Unpickled",
    "global_names",
    "refused_in",
    "restricted_loads",
    "unsafe_error",
]

# Tuples and frozensets nested deeper than this are refused as dict keys or set items: CPython
# hashes them recursively without a depth guard, so a deep enough one crashes the process.
_MAX_KEY_DEPTH = 64


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``; latin-1 only, so a file
    cannot make the codec registry import an encoding module by naming it."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _bytearray(data: Any = b"", *args: Any) -> bytearray:
    """``bytearray`` from bytes (or latin-1 text) only: ``bytearray(10**12)`` would allocate
    whatever a file asks for."""
    if isinstance(data, str):
        return bytearray(_latin1_encode(data, *args))
    if args or not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("bytearray is only rebuilt from bytes")
    return bytearray(data)


# Plain data that runs no code when unpickled; callers add their own names to it.
PLAIN_GLOBALS: Mapping[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": _bytearray,
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

    def add(self, value: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<not read: {self.global_name}>"


@dataclass
class Unpickled:
    """What :func:`restricted_loads` returns: the value, every refused global's name, and the
    input position just after the pickle (where a following pickle starts)."""

    value: Any
    refused: list[str] = field(default_factory=list)
    end: int = 0


Builder = Callable[[Any, Any], None]


class _Unpickler(pickle._Unpickler):  # the Python implementation: its opcodes can be replaced
    dispatch: ClassVar[dict[int, Callable]] = dict(pickle._Unpickler.dispatch)

    def __init__(
        self,
        file: Any,
        size: int,
        allowed: Mapping[str, Any],
        persistent_load: Callable[[Any], Any] | None,
        stub_refused: bool,
        builders: Mapping[type, Builder],
        encoding: str,
    ) -> None:
        super().__init__(file, encoding=encoding)
        self._size = size
        self._allowed = allowed
        self._callable_ids = {id(v) for v in allowed.values() if callable(v)}
        self._classes = tuple({v for v in allowed.values() if isinstance(v, type)})
        # Constructors that hash their arguments (dict, set subclasses): keys checked first.
        self._hashing = {id(v) for v in self._classes if issubclass(v, (dict, set, frozenset))}
        self._builders = builders
        self._persistent = persistent_load
        self._stub = stub_refused
        self.refused: list[str] = []
        self._stubs: dict[str, type] = {}

    def load(self) -> Any:
        """Run the opcodes. The input is in memory (or a file read by position), so frames
        are only announced sizes: reads go straight to it, not through an unframer."""
        self.read, self.readline = self._file_read, self._file_readline
        self.readinto = None
        self.metastack = []
        self.stack = []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch = self.read, self.dispatch
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                dispatch[key[0]](self)
        except pickle._Stop as stop:
            return stop.value

    def load_frame(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self._size:
            raise pickle.UnpicklingError(f"a frame of {n} bytes, more than the pickle holds")

    dispatch[pickle.FRAME[0]] = load_frame

    # ------------------------------------------------------------------ globals

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

    def _refuse_extension(self) -> None:
        raise pickle.UnpicklingError("extension codes (EXT1/2/4) are not allowed")

    dispatch[pickle.EXT1[0]] = _refuse_extension
    dispatch[pickle.EXT2[0]] = _refuse_extension
    dispatch[pickle.EXT4[0]] = _refuse_extension

    # ------------------------------------------------------------------ calls

    def _callable(self, func: Any) -> None:
        if id(func) in self._callable_ids or _is_stub(func):
            return
        raise pickle.UnpicklingError(f"the pickle calls {_name(func)}, which is not allowed")

    def _call(self, func: Any, args: Any) -> Any:
        if id(func) not in self._callable_ids and not _is_stub(func):
            self._callable(func)
        if type(args) is not tuple:
            raise pickle.UnpicklingError("call arguments are not a tuple")
        if id(func) in self._hashing:
            _check_keys(args)
        return func(*args)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._new(cls, args, {})

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._new(cls, args, kwargs)

    def _new(self, cls: Any, args: Any, kwargs: Any) -> None:
        self._callable(cls)
        if not isinstance(cls, type) or not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise pickle.UnpicklingError("NEWOBJ needs an allowed class and an argument tuple")
        self.append(cls.__new__(cls, *args, **kwargs))

    def _instantiate(self, klass: Any, args: list) -> None:
        self.append(self._call(klass, tuple(args)))

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    # ------------------------------------------------------------------ state

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Refused):
            return
        for klass in type(inst).__mro__:
            builder = self._builders.get(klass)
            if builder is not None:
                builder(inst, state)
                return
        if isinstance(inst, type) or type(inst) not in self._classes:
            raise pickle.UnpicklingError(f"the pickle sets the state of {_name(type(inst))}")
        self.stack.append(state)
        super().load_build()  # pops the state again

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._fill(dict)[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._fill(dict)
        for i in range(0, len(items) - 1, 2):
            _check_key(items[i])
            target[items[i]] = items[i + 1]

    def load_append(self) -> None:
        value = self.stack.pop()
        self._fill(list).append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._fill(list).extend(items)

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self._fill(set)
        for item in items:
            _check_key(item)
            target.add(item)

    def _fill(self, kind: type) -> Any:
        """The object on the stack that SETITEM/APPEND/ADDITEMS add to: a ``kind``, a
        stand-in, or an instance of an allowed class."""
        target = self.stack[-1]
        if isinstance(target, (kind, Refused)) or (
            type(target) in self._classes and not isinstance(target, type)
        ):
            return target
        raise pickle.UnpicklingError(f"the pickle adds items to {_name(type(target))}")

    def load_dict(self) -> None:
        for key in self.stack[::2]:  # the items since the last MARK: key, value, ...
            _check_key(key)
        super().load_dict()

    def load_frozenset(self) -> None:
        for item in self.stack:
            _check_key(item)
        super().load_frozenset()

    def _checked_setitem(self) -> None:
        _check_key(self.stack[-2])
        self.load_setitem()

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.SETITEM[0]] = _checked_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    # ------------------------------------------------------------------ sizes

    def load_bytearray8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self._size:
            raise pickle.UnpicklingError(f"BYTEARRAY8 of {n} bytes, more than the pickle holds")
        data = self.read(n)
        if len(data) != n:
            raise pickle.UnpicklingError("pickle exhausted inside BYTEARRAY8")
        self.append(bytearray(data))

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def _is_stub(obj: Any) -> bool:
    return isinstance(obj, Refused) or (isinstance(obj, type) and issubclass(obj, Refused))


def _name(obj: Any) -> str:
    """``module.Name`` of a class or function; the repr of anything else (a marker)."""
    if isinstance(obj, type) or hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    return repr(obj)[:80]


def _check_key(key: Any) -> None:
    """Refuse a dict key or set item nested too deeply to hash safely."""
    if type(key) in (str, int, bytes):
        return
    todo = [(key, 0)]
    while todo:
        x, depth = todo.pop()
        if isinstance(x, (tuple, frozenset)):
            if depth >= _MAX_KEY_DEPTH:
                raise pickle.UnpicklingError("a dict key or set item nests too deeply")
            todo.extend((y, depth + 1) for y in x)


def _check_keys(items: Iterable[Any]) -> None:
    for x in items:
        if isinstance(x, (list, tuple)) and not isinstance(x, (str, bytes)):
            for y in x:
                _check_key(y)
        _check_key(x)


def _canonical(module: str, name: str) -> str:
    """``module.name``, Python 2 names (protocols 0-2) mapped as pickle's fix_imports does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


class _RefusedGlobal(Exception):
    pass


class Forbidden(pickle.UnpicklingError):
    """Raised by an allowed callable whose arguments are unsafe rather than corrupt (a numpy
    array of objects): :func:`restricted_loads` turns it into an ``UnsafeCheckpointError``.
    The message completes "<file> ...", e.g. "holds numpy arrays of dtype object"."""


def restricted_loads(
    data: Any,
    *,
    where: str,
    allowed: Mapping[str, Any],
    persistent_load: Callable[[Any], Any] | None = None,
    stub_refused: bool = False,
    what: str = "checkpoint",
    builders: Mapping[type, Builder] | None = None,
    encoding: str = "ASCII",
) -> Unpickled:
    """Unpickle ``data`` resolving globals only from ``allowed``; ``where`` names the file.

    ``data`` is bytes, or a seekable binary file (an ``mmap``) positioned at the pickle: the
    pickle is read from there and :attr:`Unpickled.end` says where it ended. Every object of
    ``allowed`` may be called with arguments from the file; put non-callable markers in it for
    classes that must not be (``torch.Tensor(10**12)`` allocates). ``builders`` maps a type to
    ``fn(instance, state)``, the only way ``BUILD`` sets state on instances of types outside
    ``allowed`` (numpy arrays, say), after checking it. ``encoding`` decodes Python 2 strings.

    ``persistent_load`` resolves persistent ids (torch storages). Refused globals raise
    :class:`UnsafeCheckpointError` naming every global the pickle names, or, with
    ``stub_refused=True``, become :class:`Refused` stand-ins listed in the result. A pickle
    that is broken in any way raises :class:`CheckpointError`. Errors that are already a
    ``SurgeryError`` (raised by ``persistent_load`` or an allowed callable) pass through.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        file: Any = io.BytesIO(data)
        size = len(data)
    else:
        file = data
        start = data.tell()
        size = data.seek(0, io.SEEK_END) - start
        data.seek(start)
    unpickler = _Unpickler(
        file, size, allowed, persistent_load, stub_refused, builders or {}, encoding
    )
    try:
        value = unpickler.load()
    except _RefusedGlobal:
        scanned = global_names(data) if isinstance(data, (bytes, bytearray)) else []
        raise unsafe_error(where, scanned or unpickler.refused, what=what) from None
    except Forbidden as e:
        raise UnsafeCheckpointError(
            Advice(
                f"{what} '{where}' {e}. Only if you trust the whole file, pass ",
                Fix("trust_pickle", True),
                ".",
            )
        ) from None
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
    return Unpickled(value, unpickler.refused, file.tell())


def unsafe_error(where: str, names: Iterable[str], *, what: str = "checkpoint") -> Exception:
    """The refusal for a pickle naming globals outside the allow-list: every name, then the
    ways out (``allow_globals=``, a re-save, and last ``trust_pickle=True``). The names are
    kept on the error as ``globals`` (the command line words its advice from them)."""
    names = list(dict.fromkeys(names))
    listed = ", ".join(names) or "an unknown global"
    err = UnsafeCheckpointError(
        Advice(
            f"{what} '{where}' contains pickled Python objects ({listed}) that safe loading "
            "refuses: unpickling them can run arbitrary code. If they are plain data you "
            "trust, pass ",
            ALLOW_GLOBALS,
            "; better, re-save the weights as a plain state dict (torch.save(model."
            "state_dict(), path)) or as safetensors. Only if you trust the whole file, pass ",
            Fix("trust_pickle", True),
            ".",
        )
    )
    err.globals = names
    return err


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
            if op.name in ("GLOBAL", "INST"):
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
