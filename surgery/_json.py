"""JSON from files surgery did not write, decoded within bounds.

Python's ``json`` reads a whole file, then recurses once per nesting level: a sparse 1 GB index
costs gigabytes before any size check, and ``[[[[...`` 100,000 deep raises ``RecursionError``.
Here the size is checked before reading (``stat``, then at most ``limit + 1`` bytes), the
nesting depth before decoding, and only standard JSON is accepted: ``NaN`` and ``Infinity``,
which Python writes and reads but the JSON standard (and Rust's ``serde_json``, which the
safetensors library uses) refuses, are refused too.
"""

from __future__ import annotations

import json
import math
import re
import stat
from pathlib import Path
from typing import Any

import torch

__all__ = ["MAX_DEPTH", "MAX_INDEX", "JSONLimitError", "decode", "read_file"]

# serde_json's recursion limit, so the safetensors library's: 127 levels are read, 128 refused.
MAX_DEPTH = 127

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# A sharded-checkpoint index of a million keys is about 100 MB; anything larger is not one.
MAX_INDEX = 200_000_000

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_CHUNK = 1 << 22  # brackets counted at a time


class JSONLimitError(ValueError):
    """A JSON text or file refused by a bound (size, nesting) or as non-standard JSON."""


def _constant(name: str) -> Any:
    raise JSONLimitError(f"{name} is not a JSON value (the JSON standard has no NaN or Infinity)")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise JSONLimitError(f"{text} is beyond any 64-bit float")
    return value


def decode(raw: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(raw)``, refusing nesting deeper than ``max_depth`` and NaN/Infinity.

    Raises ``ValueError`` (``json.JSONDecodeError``, ``UnicodeDecodeError`` or
    :class:`JSONLimitError`) saying what is wrong.

    Example:
        >>> decode(b'{"weight_map": {"w": "model.safetensors"}}')
        {'weight_map': {'w': 'model.safetensors'}}
        >>> decode(b"[" * 200 + b"]" * 200)
        Traceback (most recent call last):
        ...
        surgery._json.JSONLimitError: nested deeper than 127 levels
    """
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    # Fewer brackets than levels cannot nest too deep; brackets inside strings are cut out
    # only when counting them in made the text look too deep.
    if data.count(b"[") + data.count(b"{") > max_depth and _too_deep(data, max_depth):
        if _too_deep(_STRING.sub(b"", data), max_depth):
            raise JSONLimitError(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(data, parse_constant=_constant, parse_float=_float)
    except RecursionError:  # malformed deep nesting that the bracket count could not pair
        raise JSONLimitError(f"nested deeper than {max_depth} levels") from None


def _too_deep(data: bytes, max_depth: int) -> bool:
    """Whether the brackets of ``data`` nest deeper than ``max_depth``: the running count of
    openers less closers, vectorised in chunks (no recursion, linear time, bounded memory).
    It is exact up to the first bracket that closes the wrong kind, where ``json.loads``
    stops anyway."""
    brackets = data.translate(None, _NOT_BRACKETS)
    depth = 0
    for start in range(0, len(brackets), _CHUNK):
        chunk = torch.frombuffer(bytearray(brackets[start : start + _CHUNK]), dtype=torch.uint8)
        opens = (chunk == ord("[")) | (chunk == ord("{"))
        running = torch.cumsum(opens.to(torch.int64) * 2 - 1, 0) + depth
        if int(running.max()) > max_depth:
            return True
        depth = int(running[-1])
    return False


def read_file(path: Path, *, limit: int, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in file ``path``, which must be a regular file of at most ``limit``
    bytes; checked before anything is read. Raises ``OSError`` when it cannot be read and
    ``ValueError`` (:class:`JSONLimitError` for a bound) when it is no JSON within bounds.

    Example:
        >>> read_file(Path("model.safetensors.index.json"), limit=200_000_000)  # doctest: +SKIP
        {'metadata': {...}, 'weight_map': {...}}
    """
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise JSONLimitError("not a regular file")
    if info.st_size > limit:
        raise JSONLimitError(f"{info.st_size} bytes, over the {limit} bytes allowed")
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:  # it grew since
        raise JSONLimitError(f"over the {limit} bytes allowed")
    return decode(raw, max_depth=max_depth)
