"""The classes a user admits for one read (``allow_globals=[cls, "module.Name"]``).

A string imports the module the *user* named, never one a file names: the allow-list is the
user's, checked and resolved before any file is opened.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from ..errors import Advice, Fix, UsageError

__all__ = ["allowed_from"]


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
        Advice(
            Fix("allow_globals", (spec,), shown=f"allow_globals=[{spec!r}]"),
            ": no such class; give MODULE.NAME of a class Python can import (its module "
            "installed or on PYTHONPATH), or pass the class itself",
        )
    )
