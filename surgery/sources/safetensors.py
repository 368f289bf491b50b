"""``.safetensors`` files: the header parsed and checked once, tensors read by byte offset.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
``data_offsets``) and the tensor bytes back to back. The header gives every offset, so no
tensor is read until asked for, and ``read_into`` reads straight into the destination.
``mapped`` gives a tensor as a slice of one private mapping of the file (what
``torch.load(mmap=True)`` and ``safetensors.safe_open`` give): no byte is read or copied.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from .. import _json
from .._text import escape_control
from ..errors import CheckpointError
from .base import CheckpointSource
from .filebytes import OffsetReader

__all__ = ["SafetensorsSource", "looks_like_safetensors"]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "U16": getattr(torch, "uint16", None),
    "U32": getattr(torch, "uint32", None),
    "U64": getattr(torch, "uint64", None),
}

# The safetensors library refuses headers above 100 MB; so does this reader.
_MAX_HEADER = 100_000_000
# torch sizes and strides are signed 64-bit: a shape whose extents multiply past that overflows.
_MAX_NUMEL = 2**62
# The format's integers are unsigned 64-bit.
_MAX_UINT = 2**64


class SafetensorsSource(CheckpointSource):
    """A ``.safetensors`` file: specs from its header, every tensor read by offset."""

    ordered = False  # writers sort the header by dtype and name: the model's order is lost

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        specs, offsets = _parse(path)
        self.specs = specs
        self._offsets = offsets
        self._file = OffsetReader(str(path), self.description)
        self._path = path
        self._map: torch.UntypedStorage | None = None

    def read(self, key: str) -> Tensor:
        shape, dtype = self.specs[key]
        return self._file.read(self._offsets[key], shape, dtype)

    def _read_into(self, key: str, out: Tensor) -> None:
        shape, dtype = self.specs[key]
        self._file.read_into(self._offsets[key], out, shape, dtype)

    def _read_run_into(self, key: str, start: int, out: Tensor) -> bool:
        dtype = self.specs[key][1]
        self._file.read_into(self._offsets[key] + start * dtype.itemsize, out, out.shape, dtype)
        return True

    def mapped(self, key: str) -> Tensor:
        """Tensor ``key`` on a slice of the file's private mapping (copy-on-write: writing to
        it never changes the file), mapped once for every tensor."""
        shape, dtype = self.specs[key]
        nbytes = math.prod(shape) * dtype.itemsize
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        if self._map is None:
            self._map = self._mapping()
        begin = self._offsets[key]
        return torch.empty(0, dtype=dtype).set_(self._map[begin : begin + nbytes], 0, shape)

    def _mapping(self) -> torch.UntypedStorage:
        """The whole file mapped privately, once its size is what the header said: pages of a
        mapping past the end of a file that shrank would crash the process when touched."""
        need = max(self._offsets[k] + math.prod(s) * d.itemsize for k, (s, d) in self.specs.items())
        try:
            size = os.stat(self._path).st_size
            if size != need:
                raise CheckpointError(
                    f"'{self._path}' changed since it was opened ({size} bytes, its header says "
                    f"{need}); load again once it is written in full"
                )
            return torch.UntypedStorage.from_file(str(self._path), False, size)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot map '{self._path}': {e}") from None

    def close(self) -> None:
        self._file.close()
        self._map = None  # tensors already mapped keep their slices alive


def looks_like_safetensors(head: bytes) -> bool:
    """Whether a file's first 9 bytes look like safetensors (a length, then a JSON object)."""
    return len(head) >= 9 and head[8:9] == b"{"


def _parse(path: Path) -> tuple[dict[str, tuple[torch.Size, torch.dtype]], dict[str, int]]:
    """Specs and absolute byte offsets from the header, checked as the format requires.

    Every tensor's byte span must match its shape and dtype, and the spans must tile the data
    section exactly: a file cut short or padded fails here, before anything is loaded.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or n > _MAX_HEADER or 8 + n > size:
                _corrupt(path, f"its header length field says {n} bytes, the file has {size}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint '{path}': {e}") from None
    try:
        header = _json.decode(raw)
    except ValueError as e:
        _corrupt(path, f"its header is not JSON the format allows ({e})")
    if not isinstance(header, dict):
        _corrupt(path, "its header is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    specs: dict[str, tuple[torch.Size, torch.dtype]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not _is_text(name):
            _corrupt(path, f"a tensor name holds an unpaired surrogate ({_short(name)})")
        if name == "__metadata__":
            _check_metadata(path, info)
            continue
        shape, dtype, begin, end = _entry(path, name, info)
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            _corrupt(
                path,
                f"tensor '{_short(name)}' spans {end - begin} bytes but its shape "
                f"{tuple(shape)} and dtype {info['dtype']} need {nbytes}",
            )
        specs[name] = (torch.Size(shape), dtype)
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            _corrupt(path, f"tensor '{_short(name)}' starts at data byte {begin}, expected {pos}")
        pos = end
    if pos != data_len:
        what = "truncated" if pos > data_len else "longer than its header says"
        _corrupt(path, f"the tensors need {pos} data bytes, the file holds {data_len} ({what})")
    return specs, {name: data_start + begin for begin, _, name in spans}


def _entry(path: Path, name: str, info: Any) -> tuple[list[int], torch.dtype, int, int]:
    """One tensor's header entry, as the format defines it: ``dtype`` a string, ``shape`` a
    list of unsigned 64-bit integers, ``data_offsets`` two of them (what the safetensors
    library refuses, from floats and booleans to a list as a dtype, is refused here too)."""
    if not isinstance(info, dict):
        _corrupt(path, f"tensor '{_short(name)}' has a malformed header entry {_short(info)}")
    shape, offsets, code = info.get("shape"), info.get("data_offsets"), info.get("dtype")
    if (
        not isinstance(code, str)
        or not _is_uint_list(shape)
        or not _is_uint_list(offsets)
        or len(offsets) != 2
        or offsets[1] < offsets[0]
    ):
        _corrupt(path, f"tensor '{_short(name)}' has a malformed header entry {_short(info)}")
    if math.prod(max(d, 1) for d in shape) >= _MAX_NUMEL:
        _corrupt(
            path, f"tensor '{_short(name)}' has shape {_short(shape)}, too large for any tensor"
        )
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise CheckpointError(
            f"'{path}': tensor '{_short(name)}' has dtype {_short(code)}, which this torch "
            "cannot hold"
        )
    return shape, dtype, offsets[0], offsets[1]


def _is_uint_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(x) is int and 0 <= x < _MAX_UINT for x in value)


def _is_text(value: str) -> bool:
    """A string JSON can hold as UTF-8 (no unpaired surrogate from a ``\\ud800`` escape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_metadata(path: Path, meta: Any) -> None:
    """``__metadata__``: absent, null, or a map of strings to strings, as the format says."""
    if meta is None:
        return
    if not isinstance(meta, dict) or not all(
        isinstance(v, str) and _is_text(k) and _is_text(v) for k, v in meta.items()
    ):
        _corrupt(
            path,
            f"its __metadata__ is {_short(meta)}; the format allows only a map of strings to "
            "strings",
        )


def _short(value: Any) -> str:
    text = escape_control(value if isinstance(value, str) else repr(value))
    return text if len(text) <= 200 else text[:200] + "..."


def _corrupt(path: Path, detail: str) -> NoReturn:
    raise CheckpointError(
        f"cannot read safetensors file '{path}': {detail}. The file is truncated or corrupt; "
        "download or save it again."
    )
