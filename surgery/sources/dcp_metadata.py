"""A DCP folder's ``.metadata``, read without running code and checked before anything uses it.

``torch.distributed.checkpoint`` pickles its ``Metadata`` into ``.metadata`` and reads it back
with ``pickle.load``, so a hostile folder runs code the moment it is opened. Here the file goes
through surgery's restricted unpickler with an allow-list of exactly what ``dcp.save`` writes
(its metadata dataclasses, ``_StorageInfo``, ``torch.Size``, dtypes, layouts, the memory-format
enum, ``pathlib`` paths); the dataclasses are built as pickle builds them (``__new__``, then
their fields set; ``TensorProperties.__setstate__`` only assigns). Every field is then checked
and a fresh ``Metadata`` is built from the checked values alone: sizes are non-negative and
their byte counts fit in 63 bits, each tensor's chunks tile it exactly (no gap, no overlap,
inside its bounds), each chunk has a storage entry (file name, offset, length). Fields DCP's
loading does not need (``storage_meta``, the rest of ``planner_data``) are dropped after the
check. From ``planner_data`` only the object path of each entry is kept (``'model.fc.weight'``
-> ``('model', 'fc.weight')``) where it spells the entry's name, so a folder's nesting can be
unwrapped as a torch file's is.
"""

from __future__ import annotations

import functools
import math
import os
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from ..errors import CheckpointError, UnsafeCheckpointError
from .dcp_files import open_regular, transformed, unsafe_dcp
from .unpickler import global_names, restricted_loads

__all__ = ["DCPLayout", "read_dcp_metadata", "tiling_problem"]

# DCP metadata takes about 200 bytes a chunk: a gigabyte is five million chunks.
_MAX_METADATA = 1 << 30
_MAX_BYTES = (1 << 63) - 1  # a tensor's bytes must fit a signed 64-bit count
_MAX_DIMS = 64  # torch's limit on a tensor's dimensions
_MAX_PATH = 256  # levels of nesting kept from planner_data; deeper paths are not unwrapped


@dataclass
class DCPLayout:
    """A checked DCP folder's metadata: ``metadata`` (a fresh ``Metadata`` holding only
    checked values), ``others`` (non-tensor entries, never read) and ``unreadable`` (tensor
    name -> why surgery cannot read it, e.g. a compression transform)."""

    metadata: Any
    others: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    # entry name -> the path of keys it had in the saved object (DCP's planner_data), for the
    # entries whose path joins back to their name; empty when the folder does not say.
    paths: dict[str, tuple[str, ...]] = field(default_factory=dict)


def read_dcp_metadata(folder: Path) -> DCPLayout:
    """Read and check ``folder/.metadata`` (see the module docstring); raise a
    :class:`CheckpointError` naming the file and what is wrong, or an
    :class:`UnsafeCheckpointError` naming every global outside the allow-list.

    Example:
        >>> layout = read_dcp_metadata(Path("runs/step-1000"))  # doctest: +SKIP
        >>> layout.metadata.state_dict_metadata["fc.weight"].size  # doctest: +SKIP
        torch.Size([10, 512])
    """
    path = folder / ".metadata"
    try:
        with open_regular(path) as f:
            # Measured before reading: a sparse file may claim terabytes.
            too_big = os.fstat(f.fileno()).st_size > _MAX_METADATA
            data = b"" if too_big else f.read(_MAX_METADATA + 1)
    except OSError as e:
        raise CheckpointError(f"cannot open the DCP metadata '{path}': {e}") from None
    if too_big or len(data) > _MAX_METADATA:
        raise CheckpointError(
            f"DCP metadata '{path}' is over {_MAX_METADATA >> 20} MB, more than any checkpoint's "
            "(about 200 bytes a chunk); the file is corrupt or not DCP metadata"
        )
    allowed = _allowed()
    try:
        raw = restricted_loads(data, where=str(path), allowed=allowed, what="DCP metadata")
    except UnsafeCheckpointError:
        refused = [n for n in global_names(data) if n not in allowed]
        raise unsafe_dcp(f"'{path}'", refused) from None
    return _Checker(path).layout(raw.value)


# --------------------------------------------------------------------------- allow-list


@functools.cache
def _allowed() -> dict[str, Any]:
    from torch.distributed.checkpoint import filesystem as fs
    from torch.distributed.checkpoint import metadata as md

    mem_format = md._MEM_FORMAT_ENCODING

    def encoding(value: Any) -> Any:  # an enum member by value: one argument, nothing else
        return mem_format(value)

    names: dict[str, Any] = {
        f"torch.distributed.checkpoint.metadata.{c.__name__}": c
        for c in (
            md.Metadata,
            md.TensorStorageMetadata,
            md.BytesStorageMetadata,
            md.ChunkStorageMetadata,
            md.TensorProperties,
            md.MetadataIndex,
            md.StorageMeta,
        )
    }
    names.update(
        {
            "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING": encoding,
            "torch.distributed.checkpoint.filesystem._StorageInfo": fs._StorageInfo,
            # torch < 2.4 pickled the properties under their old home; same fields, same state.
            "torch.distributed._shard.sharded_tensor.metadata.TensorProperties": (
                md.TensorProperties
            ),
            "torch.distributed._shard.sharded_tensor.metadata.MEM_FORMAT_ENCODING": encoding,
            "torch.Size": torch.Size,
            "torch.serialization._get_layout": _LAYOUTS.__getitem__,
            # StorageMeta.checkpoint_id: kept as a pure path (no file system access), dropped.
            "pathlib.PosixPath": PurePosixPath,
            "pathlib.PurePosixPath": PurePosixPath,
            "pathlib.WindowsPath": PureWindowsPath,
            "pathlib.PureWindowsPath": PureWindowsPath,
        }
    )
    names.update({f"torch.{n}": v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})
    return names


_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


# --------------------------------------------------------------------------- checks


class _Checker:
    """Checks the unpickled objects field by field and builds fresh DCP objects from them."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def bad(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"DCP metadata '{self.path}' is malformed: {what}. The folder is corrupt or was "
            "not written by torch.distributed.checkpoint; save the checkpoint again."
        )

    def layout(self, obj: Any) -> DCPLayout:
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            Metadata,
            StorageMeta,
            TensorStorageMetadata,
        )

        if type(obj) is not Metadata:
            raise self.bad(f"it holds a {type(obj).__name__}, not DCP Metadata")
        entries = getattr(obj, "state_dict_metadata", None)
        if not isinstance(entries, dict):
            raise self.bad("state_dict_metadata is not a dict")
        storage = self.storage(getattr(obj, "storage_data", None))
        out = DCPLayout(metadata=None)
        metadata: dict[str, Any] = {}
        storage_data: dict[Any, Any] = {}
        for name, entry in entries.items():
            if not isinstance(name, str):
                raise self.bad(f"entry name {name!r} is not a string")
            if type(entry) is BytesStorageMetadata:
                metadata[name] = BytesStorageMetadata()
                out.others.append(name)
            elif type(entry) is TensorStorageMetadata:
                metadata[name], why = self.tensor(name, entry, storage, storage_data)
                if why:
                    out.unreadable[name] = why
            else:
                raise self.bad(f"entry '{name}' is a {type(entry).__name__}")
        out.paths = _paths(getattr(obj, "planner_data", None), metadata)
        version = getattr(obj, "version", None)
        out.metadata = Metadata(
            metadata,
            storage_data=storage_data,
            storage_meta=StorageMeta(),
            version=version if isinstance(version, str) else None,
        )
        return out

    def storage(self, data: Any) -> dict[tuple[str, tuple[int, ...]], tuple[str, int, int, Any]]:
        """``storage_data`` as (name, chunk offsets) -> (file, offset, length, transforms)."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import MetadataIndex

        if not isinstance(data, dict):
            raise self.bad("storage_data is not a dict")
        out = {}
        for index, info in data.items():
            if type(index) is not MetadataIndex or not isinstance(index.fqn, str):
                raise self.bad(f"storage_data key {index!r} is not a MetadataIndex")
            if type(info) is not _StorageInfo:
                raise self.bad(f"storage_data['{index.fqn}'] is a {type(info).__name__}")
            where = index.fqn
            offsets = () if index.offset is None else self.dims(index.offset, where, "offset")
            rel = getattr(info, "relative_path", None)
            start = getattr(info, "offset", None)
            length = getattr(info, "length", None)
            transforms = getattr(info, "transform_descriptors", None)
            if not isinstance(rel, str):
                raise self.bad(f"the storage entry of '{where}' names no file ({rel!r})")
            self.count(start, where, "storage offset")
            self.count(length, where, "storage length")
            if transforms is not None and (
                not isinstance(transforms, (list, tuple))
                or not all(isinstance(t, str) for t in transforms)
            ):
                raise self.bad(f"the storage entry of '{where}': transforms {transforms!r}")
            out[(index.fqn, offsets)] = (rel, start, length, transforms or None)
        return out

    def tensor(
        self,
        name: str,
        entry: Any,
        storage: Mapping[tuple[str, tuple[int, ...]], tuple[str, int, int, Any]],
        storage_data: dict[Any, Any],
    ) -> tuple[Any, str | None]:
        """A fresh ``TensorStorageMetadata`` for ``entry`` (its storage entries added to
        ``storage_data``), and why surgery cannot read it (``None`` when it can)."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            MetadataIndex,
            TensorProperties,
            TensorStorageMetadata,
        )

        props = getattr(entry, "properties", None)
        dtype = getattr(props, "dtype", None)
        if type(props) is not TensorProperties or not isinstance(dtype, torch.dtype):
            raise self.bad(f"'{name}' has no dtype")
        size = self.dims(getattr(entry, "size", None), name, "size")
        if math.prod(size) * dtype.itemsize > _MAX_BYTES:
            raise self.bad(f"'{name}' has size {list(size)}, more bytes than any tensor can hold")
        raw_chunks = getattr(entry, "chunks", None)
        if not isinstance(raw_chunks, list):
            raise self.bad(f"'{name}' has no list of chunks")
        chunks: list[tuple[torch.Size, torch.Size]] = []
        for c in raw_chunks:
            if type(c) is not ChunkStorageMetadata:
                raise self.bad(f"a chunk of '{name}' is a {type(c).__name__}")
            offsets = self.dims(getattr(c, "offsets", None), name, "chunk offsets")
            chunks.append((offsets, self.dims(getattr(c, "sizes", None), name, "chunk sizes")))
        problem = tiling_problem(size, chunks)
        if problem:
            raise self.bad(f"the chunks of '{name}' {problem}")
        why = None
        for i, (offsets, _) in enumerate(chunks):
            found = storage.get((name, offsets))
            if found is None:
                raise self.bad(f"the chunk of '{name}' at {list(offsets)} has no storage entry")
            rel, start, length, transforms = found
            if transforms:
                why = transformed(transforms)
            info = _StorageInfo(rel, start, length, transform_descriptors=transforms)
            storage_data[MetadataIndex(name, offsets, i)] = info
        fresh = TensorStorageMetadata(
            TensorProperties(dtype=dtype), size, [ChunkStorageMetadata(o, s) for o, s in chunks]
        )
        return fresh, why

    def dims(self, value: Any, name: str, what: str) -> torch.Size:
        """``value`` as a checked ``torch.Size`` of counts (``what`` of entry ``name``)."""
        if type(value) is torch.Size and len(value) <= _MAX_DIMS:  # its items are ints
            if not value or (min(value) >= 0 and max(value) <= _MAX_BYTES):
                return value
        elif isinstance(value, (tuple, list)) and len(value) <= _MAX_DIMS:
            return torch.Size([self.count(v, name, what) for v in value])
        raise self.bad(f"'{name}': {what} {_short(value)} is not a list of counts")

    def count(self, value: Any, name: str, what: str) -> int:
        if type(value) is not int or not 0 <= value <= _MAX_BYTES:
            raise self.bad(f"'{name}': {what} {_short(value)} is not a count")
        return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- tiling


def tiling_problem(
    size: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]
) -> str | None:
    """``None`` when the boxes ``chunks`` ((offsets, sizes) pairs) tile a tensor of ``size``
    exactly, else what is wrong, worded to follow "the chunks of 'name' ...".

    Each box must lie inside the tensor; then the boxes tile it exactly when their volumes add
    up to its element count and no two overlap. Overlaps are found on the grid of all box
    edges (one scatter-add per box corner, then a cumulative sum per dimension) when that grid
    is small, as it is for every layout DTensor placements give; else by a sweep along the
    dimension the boxes span least of.

    Example:
        >>> tiling_problem((4, 2), [((0, 0), (2, 2)), ((2, 0), (2, 2))]) is None
        True
        >>> tiling_problem((4, 2), [((0, 0), (2, 2))])
        'cover 4 of its 8 elements: part of the tensor has no stored values'
    """
    boxes = []
    volume = 0
    for offsets, sizes in chunks:
        if len(offsets) != len(size) or len(sizes) != len(size):
            return f"include one of {len(sizes)} dimensions for a tensor of {len(size)}"
        if any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
            return f"include one at {list(offsets)} of size {list(sizes)}, outside {list(size)}"
        n = math.prod(sizes)
        if n:
            volume += n
            boxes.append((offsets, sizes))
    numel = math.prod(size)
    if volume < numel:
        return f"cover {volume} of its {numel} elements: part of the tensor has no stored values"
    pair = _overlap(boxes, len(size)) if volume > numel or len(boxes) > 1 else None
    if pair is None and volume > numel:  # cannot happen for boxes inside the bounds
        return f"hold {volume} elements for a tensor of {numel}"
    if pair is not None:
        (o1, s1), (o2, s2) = pair
        return (
            f"overlap: the one at {list(o1)} of size {list(s1)} and the one at {list(o2)} of "
            f"size {list(s2)} both store some elements"
        )
    return None


_Box = tuple[tuple[int, ...], tuple[int, ...]]


def _overlap(boxes: list[_Box], ndim: int) -> tuple[_Box, _Box] | None:
    """Two boxes that share an element, or ``None``."""
    if ndim == 0:
        return (boxes[0], boxes[1]) if len(boxes) > 1 else None
    edges = [
        sorted({o[d] for o, _ in boxes} | {o[d] + s[d] for o, s in boxes}) for d in range(ndim)
    ]
    cells = math.prod(len(e) - 1 for e in edges)
    if ndim <= 6 and cells <= 16 * len(boxes) + 4096:
        return _overlap_on_grid(boxes, edges)
    return _overlap_by_sweep(boxes, ndim)


def _overlap_on_grid(boxes: list[_Box], edges: list[list[int]]) -> tuple[_Box, _Box] | None:
    ndim = len(edges)
    lo = torch.tensor([[bisect_left(edges[d], o[d]) for d in range(ndim)] for o, _ in boxes])
    hi = torch.tensor([[bisect_left(edges[d], o[d] + s[d]) for d in range(ndim)] for o, s in boxes])
    counts = torch.zeros([len(e) for e in edges], dtype=torch.int64)
    for corner in range(1 << ndim):
        bits = [(corner >> d) & 1 for d in range(ndim)]
        index = tuple((hi if b else lo)[:, d] for d, b in enumerate(bits))
        sign = -1 if sum(bits) % 2 else 1
        counts.index_put_(index, torch.full((len(boxes),), sign), accumulate=True)
    for d in range(ndim):
        counts = counts.cumsum(d)
    over = (counts > 1).nonzero()
    if not len(over):
        return None
    cell = over[0].tolist()
    inside = [
        b
        for b, (low, high) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True))
        if all(low[d] <= cell[d] < high[d] for d in range(ndim))
    ]
    return boxes[inside[0]], boxes[inside[1]]


def _overlap_by_sweep(boxes: list[_Box], ndim: int) -> tuple[_Box, _Box] | None:
    # Sweep along the dimension boxes span least of (rows for row blocks, columns for column
    # blocks): few boxes are open at once, so each is compared with few others.
    ends = [max(o[d] + s[d] for o, s in boxes) for d in range(ndim)]
    dim = min(range(ndim), key=lambda d: sum(s[d] for _, s in boxes) / ends[d])
    active: list[_Box] = []
    for box in sorted(boxes, key=lambda b: b[0][dim]):
        start = box[0][dim]
        active = [a for a in active if a[0][dim] + a[1][dim] > start]
        for other in active:
            if all(
                box[0][d] < other[0][d] + other[1][d] and other[0][d] < box[0][d] + box[1][d]
                for d in range(ndim)
            ):
                return other, box
        active.append(box)
    return None


def _paths(planner_data: Any, entries: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Each entry's object path from ``planner_data`` (DCP's flattening map), kept only when
    it is a tuple of names and list positions that joins back to the entry's own name; any
    other value says nothing about nesting and is ignored (it is never used to read)."""
    if not isinstance(planner_data, dict):
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for name in entries:
        path = planner_data.get(name)
        if not isinstance(path, tuple) or not path or len(path) > _MAX_PATH:
            continue
        if not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path):
            continue
        parts = tuple(str(p) for p in path)
        if ".".join(parts) == name:
            out[name] = parts
    return out
