"""The data files of a DCP folder: every chunk checked before the first read, then read.

``dcp.save`` writes each chunk of each tensor as a small ``torch.save`` zip (one pickle record
naming one storage, the storage's bytes stored uncompressed) at a byte range of a ``.distcp``
file; ``.metadata`` gives the file, offset and length. DCP's own reader opens those files by
whatever name the metadata gives and ``torch.load``s each range straight into the model, file
by file. Here, before the first byte of tensor data is read, every chunk a load needs is
checked: its file lies inside the folder (the rule of sharded indexes,
:func:`~surgery.sources.sharded.shard_path`) and is a regular file; the range lies inside
the file; the range is a torch zip whose records are stored (not compressed) and lie inside
it, whose pickle (restricted unpickler: one ``_rebuild_tensor_v2``/``v3`` over one storage)
describes the chunk the metadata plans (dtype, shape, exactly ``numel * itemsize`` bytes).
Only then are the storages' bytes read, straight into the destination when it is one
contiguous block of the chunk's dtype.

:class:`CheckedReader` is the ``FileSystemReader`` that ``dcp.load`` gets: it returns the
checked metadata (never unpickling ``.metadata`` again) and reads through :class:`DataFiles`.
"""

from __future__ import annotations

import os
import stat
import sys
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
from torch import Tensor

from ..errors import CheckpointError, UnsafeCheckpointError
from .base import contiguous_start
from .filebytes import OffsetReader
from .sharded import shard_path
from .torchzip import LOCAL_HEADER, TorchZip, ZipStructureError
from .unpickler import global_names, restricted_loads

__all__ = [
    "Blob",
    "Chunk",
    "DataFiles",
    "checked_reader",
    "open_regular",
    "transformed",
    "unsafe_dcp",
]

# A one-tensor torch.save zip has 5-8 records and a pickle of about 200 bytes.
_MAX_RECORDS = 64
_MAX_DIRECTORY = 64 * 1024
_MAX_PICKLE = 64 * 1024


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (a symlink to one counts), without
    ever blocking on a named pipe; ``OSError`` otherwise (``FileNotFoundError`` if missing)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"'{path}' is not a regular file (a directory, pipe or device)")
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def transformed(transforms: Iterable[str]) -> str:
    """Why a chunk stored through DCP stream transforms (compression, ...) is not read."""
    return (
        f"stored with DCP transforms ({', '.join(transforms)}) that surgery does not read; "
        "save it again without them"
    )


def unsafe_dcp(where: str, names: list[str]) -> UnsafeCheckpointError:
    """The refusal for a DCP file (``where``, quoted) naming globals ``dcp.save`` never writes."""
    listed = ", ".join(names) or "an unknown global"
    return UnsafeCheckpointError(
        f"{where} holds pickled Python objects ({listed}) that torch.distributed.checkpoint "
        "never writes there: unpickling them can run arbitrary code, so surgery refuses the "
        "folder. It was tampered with or not written by dcp.save; save the checkpoint again "
        "from a copy you trust."
    )


@dataclass(frozen=True)
class Blob:
    """Where one checked chunk's values lie: its storage's ``nbytes`` at byte ``offset`` of
    ``path``, viewed as ``dtype`` with ``size``/``stride``/``storage_offset``."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int

    @property
    def contiguous(self) -> bool:
        return self.storage_offset == 0 and self.stride == _contiguous_strides(self.size)


class Chunk(NamedTuple):
    """One chunk a load needs: tensor name, file, byte range, and what the metadata plans."""

    name: str
    file: str
    start: int
    length: int
    dtype: torch.dtype
    sizes: tuple[int, ...]


class DataFiles:
    """The ``.distcp`` files of one DCP folder, each opened once, each chunk checked once.

    Example:
        >>> files = DataFiles(Path("runs/step-1000"))  # doctest: +SKIP
        >>> chunk = Chunk("fc.bias", "__0_0.distcp", 0, 1577, torch.float32, (10,))
        >>> blob = files.check([chunk])[0]  # doctest: +SKIP
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[str, tuple[Path, BinaryIO]] = {}
        self._failed: dict[str, str] = {}  # file -> why it cannot be opened
        self._blobs: dict[Chunk, Blob] = {}
        self._readers: dict[Path, OffsetReader] = {}

    def check(self, chunks: Iterable[Chunk]) -> list[Blob]:
        """The blob of each chunk, every one checked (files re-measured) before this returns;
        one :class:`CheckpointError` listing every problem otherwise."""
        out: list[Blob] = []
        problems: dict[str, None] = {}
        sizes: dict[str, int] = {}
        for c in chunks:
            try:
                out.append(self._blob(c, sizes))
            except UnsafeCheckpointError:
                raise
            except CheckpointError as e:
                problems[str(e)] = None
        if problems:
            lines = list(problems)
            more = f"\n    ... and {len(lines) - 10} more" if len(lines) > 10 else ""
            raise CheckpointError(
                f"the DCP checkpoint '{self.folder}' cannot be read in full "
                f"({len(lines)} problem{'s' * (len(lines) > 1)}):\n"
                + "\n".join(f"    {line}" for line in lines[:10])
                + more
                + "\nNothing was loaded. The folder is incomplete or corrupt: copy every file "
                "the save wrote (each rank's __<rank>_<n>.distcp beside .metadata) into it, or "
                "save the checkpoint again."
            )
        return out

    def read(self, blob: Blob, offsets: Any, lengths: Any, target: Tensor) -> None:
        """Copy the block (``offsets``, ``lengths``) of a checked chunk into ``target``: a
        block that is one run of the stored bytes (the whole chunk, a range of rows) is read
        straight into ``target`` where its memory allows; any other is cut from the chunk."""
        if tuple(target.shape) != tuple(lengths):
            raise CheckpointError(
                f"'{blob.path}': DCP asked for a block of shape {list(lengths)} into a tensor "
                f"of shape {list(target.shape)}; the metadata does not fit the model"
            )
        reader = self._readers.get(blob.path)
        if reader is None:
            reader = self._readers[blob.path] = OffsetReader(str(blob.path), str(blob.path))
        start = contiguous_start(blob.size, tuple(offsets), tuple(lengths))
        if blob.contiguous and start is not None:  # one run of bytes: only those are read
            at = blob.offset + start * blob.dtype.itemsize
            reader.read_into(at, target, torch.Size(lengths), blob.dtype)
            return
        numel = torch.Size([blob.nbytes // blob.dtype.itemsize])
        view = reader.read(blob.offset, numel, blob.dtype)
        view = view.as_strided(blob.size, blob.stride, blob.storage_offset)
        for d, (o, n) in enumerate(zip(offsets, lengths, strict=True)):
            view = view.narrow(d, o, n)
        target.copy_(view)

    def close(self) -> None:
        for _, f in self._files.values():
            f.close()
        for r in self._readers.values():
            r.close()
        self._files.clear()
        self._readers.clear()

    def _blob(self, c: Chunk, sizes: dict[str, int]) -> Blob:
        path, f = self._open(c)
        if c.file not in sizes:
            sizes[c.file] = os.fstat(f.fileno()).st_size
        if sizes[c.file] < c.start + c.length:
            raise CheckpointError(
                f"'{c.file}' has {sizes[c.file]} bytes, but '{c.name}' is stored at bytes "
                f"{c.start}-{c.start + c.length}: the file is truncated"
            )
        blob = self._blobs.get(c)
        if blob is None:
            blob = self._blobs[c] = _blob_layout(f, path, c)
        return blob

    def _open(self, c: Chunk) -> tuple[Path, BinaryIO]:
        if c.file in self._failed:
            raise CheckpointError(self._failed[c.file])
        if c.file not in self._files:
            try:
                path = shard_path(self.folder / ".metadata", c.file, c.name)
                self._files[c.file] = (path, open_regular(path))
            except CheckpointError as e:
                self._failed[c.file] = str(e)
                raise
            except OSError as e:
                what = (
                    "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read: {e}"
                )
                self._failed[c.file] = f"'{c.file}' (holding '{c.name}') {what}"
                raise CheckpointError(self._failed[c.file]) from None
        return self._files[c.file]


# --------------------------------------------------------------------------- one chunk's zip


def _blob_layout(f: BinaryIO, path: Path, c: Chunk) -> Blob:
    """Check the torch zip at bytes ``c.start``..``c.start + c.length`` of ``f`` and where its
    storage lies: the one function that decodes a DCP chunk (no tensor data is read here).

    For the lead: this is where surgery's own torch-zip reader (restricted unpickler, branch
    ``unpickle``) can take over; the checks of records and sizes stay as they are.
    """
    z = _ChunkZip(f, c)
    rebuilt = z.tensor(path)
    if rebuilt.dtype != c.dtype or rebuilt.size != c.sizes:
        raise z.bad(
            f"it holds a {list(rebuilt.size)} {rebuilt.dtype} tensor, the metadata plans "
            f"{list(c.sizes)} {c.dtype}"
        )
    storage = f"{z.prefix}data/{rebuilt.storage.key}"
    if storage not in z.records:
        raise z.bad(f"its pickle names storage '{rebuilt.storage.key}', which it does not hold")
    expect = _numel(c.sizes) * c.dtype.itemsize
    at, n = z.record(storage, expect)
    if n != expect or rebuilt.storage.nbytes != expect:
        raise z.bad(f"its storage holds {n} bytes, the metadata plans {expect}")
    last = rebuilt.storage_offset + sum(
        (s - 1) * st for s, st in zip(rebuilt.size, rebuilt.stride, strict=True)
    )
    if _numel(rebuilt.size) and last >= expect // c.dtype.itemsize:
        raise z.bad("its tensor reaches past its storage")
    return Blob(
        path, c.start + at, n, c.dtype, rebuilt.size, rebuilt.stride, rebuilt.storage_offset
    )


class _ChunkZip:
    """One chunk's torch zip inside its data file, read by the one torch-zip reader
    (:class:`~.torchzip.TorchZip`) with small reads bounded by the chunk; its directory
    checked on opening (every record stored, inside the chunk)."""

    def __init__(self, f: BinaryIO, c: Chunk) -> None:
        self.f, self.c = f, c
        self.span = f"bytes {c.start}-{c.start + c.length} ('{c.name}')"
        try:
            self.zip = TorchZip(
                self._raw, c.length, max_records=_MAX_RECORDS, max_directory=_MAX_DIRECTORY
            )
        except ZipStructureError as e:
            raise self.bad(f"its zip directory is broken ({e})") from None
        self.records, self.directory = self.zip.records, self.zip.directory
        pickles = [n for n in self.records if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise self.bad(f"it holds {len(pickles)} pickle records, not one torch.save record")
        self.prefix = pickles[0][: -len("data.pkl")]
        for name, rec in self.records.items():
            if not rec.stored or rec.csize != rec.size:
                raise self.bad(
                    f"record '{name}' is compressed or encrypted; dcp.save stores records as "
                    "they are"
                )
            if rec.header + LOCAL_HEADER + len(name.encode()) + rec.size > self.directory:
                raise self.bad(
                    f"record '{name}' claims {rec.size} bytes, more than the chunk holds"
                )

    def bad(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"'{self.c.file}' {self.span}: {what}; the chunk is corrupt or not DCP data"
        )

    def _raw(self, at: int, n: int) -> bytes:
        self.f.seek(self.c.start + at)
        return self.f.read(n)

    def read(self, at: int, n: int) -> bytes:
        try:
            return self.zip.read(at, n)
        except ZipStructureError as e:
            raise self.bad(str(e)) from None

    def record(self, name: str, limit: int) -> tuple[int, int]:
        """(offset in the chunk, size) of record ``name``'s data, checked against its header."""
        rec = self.records[name]
        if rec.size > limit:
            raise self.bad(f"record '{name}' holds {rec.size} bytes, more than {limit}")
        try:
            start = self.zip.data_start(rec)
        except ZipStructureError:
            raise self.bad(
                f"record '{name}' has no local header where the directory says"
            ) from None
        if start + rec.size > self.directory:
            raise self.bad(f"record '{name}' runs past the chunk's zip directory")
        return start, rec.size

    def tensor(self, path: Path) -> _Rebuilt:
        """What the chunk's pickle says: one tensor over one storage (nothing is built)."""
        if self.prefix + "byteorder" in self.records:
            order = self.read(*self.record(self.prefix + "byteorder", 16))
            if order.decode("ascii", "replace") != sys.byteorder:
                raise self.bad(
                    f"it was saved {order.decode('ascii', 'replace')}-endian; surgery reads DCP "
                    f"chunks of this machine's byte order ({sys.byteorder}) only"
                )
        data = self.read(*self.record(self.prefix + "data.pkl", _MAX_PICKLE))
        try:
            rebuilt = restricted_loads(
                data,
                where=f"{self.c.file} {self.span}",
                allowed=_TENSOR_GLOBALS,
                persistent_load=_storage,
                what="the DCP chunk",
            ).value
        except UnsafeCheckpointError:
            refused = [n for n in global_names(data) if n not in _TENSOR_GLOBALS]
            raise unsafe_dcp(f"'{path}' {self.span}", refused) from None
        if not isinstance(rebuilt, _Rebuilt):
            raise self.bad(f"its pickle holds a {type(rebuilt).__name__}, not one tensor")
        return rebuilt


# --------------------------------------------------------------------------- one chunk's pickle


class _StorageType(NamedTuple):
    dtype: torch.dtype


class _Storage(NamedTuple):
    key: str
    nbytes: int
    dtype: torch.dtype


class _Rebuilt(NamedTuple):
    storage: _Storage
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def _storage(pid: Any) -> _Storage:
    """A torch.save persistent id ``('storage', type, key, location, numel)``, checked."""
    if not (
        isinstance(pid, tuple)
        and len(pid) == 5
        and pid[0] == "storage"
        and isinstance(pid[1], _StorageType)
        and isinstance(pid[2], str)
        and type(pid[4]) is int
        and pid[4] >= 0
    ):
        raise ValueError(f"persistent id {pid!r} is not a torch storage")
    return _Storage(pid[2], pid[4] * pid[1].dtype.itemsize, pid[1].dtype)


def _rebuild(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> _Rebuilt:
    """``torch._utils._rebuild_tensor_v2``'s arguments, recorded and checked, nothing built."""
    return _rebuilt(storage, storage_offset, size, stride, None)


def _rebuild_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    grad: Any,
    hooks: Any,
    dtype: Any,
    *rest: Any,
) -> _Rebuilt:
    """``torch._utils._rebuild_tensor_v3`` (new dtypes, an untyped storage): as ``_rebuild``."""
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"_rebuild_tensor_v3 names dtype {dtype!r}")
    return _rebuilt(storage, storage_offset, size, stride, dtype)


def _rebuilt(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any) -> _Rebuilt:
    dims = (size, stride)
    if (
        not isinstance(storage, _Storage)
        or type(offset) is not int
        or offset < 0
        or not all(isinstance(d, tuple) and all(type(v) is int and v >= 0 for v in d) for d in dims)
        or len(size) != len(stride)
    ):
        raise ValueError("the tensor's storage, offset, size or stride is malformed")
    return _Rebuilt(storage, offset, size, stride, dtype or storage.dtype)


def _tensor_globals() -> dict[str, Any]:
    out: dict[str, Any] = {
        "torch._utils._rebuild_tensor_v2": _rebuild,
        "torch._utils._rebuild_tensor_v3": _rebuild_v3,
        "collections.OrderedDict": OrderedDict,
        "torch.storage.UntypedStorage": _StorageType(torch.uint8),
    }
    out.update({f"torch.{n}": _StorageType(d) for d, n in _legacy_storages().items()})
    out.update({f"torch.{n}": v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})
    return out


def _legacy_storages() -> dict[torch.dtype, str]:
    from torch.storage import _dtype_to_storage_type_map

    return dict(_dtype_to_storage_type_map())


_TENSOR_GLOBALS = _tensor_globals()


def _numel(size: tuple[int, ...]) -> int:
    n = 1
    for s in size:
        n *= s
    return n


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    step = 1
    for s in reversed(size):
        out.append(step)
        step *= max(s, 1)
    return tuple(reversed(out))


# --------------------------------------------------------------------------- DCP's reader


def checked_reader(folder: Path, metadata: Any, files: DataFiles) -> Any:
    """A ``FileSystemReader`` for ``dcp.load`` that never unpickles ``.metadata`` (it returns
    ``metadata``, already checked) and reads tensors through ``files``: every chunk of a read
    plan is checked before the first one is read; non-tensor items and transforms are refused.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.futures import Future

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return metadata

        def read_data(self, plan: Any, planner: Any) -> Future[None]:
            chunks = []
            for req in plan.items:
                if req.type != LoadItemType.TENSOR:
                    raise CheckpointError(
                        f"DCP planned to read '{req.storage_index.fqn}' of '{folder}' as a "
                        "pickled object; surgery reads tensors only"
                    )
                chunks.append(chunk_of(metadata, req.storage_index))
            blobs = files.check(chunks)
            for req, blob in zip(plan.items, blobs, strict=True):
                target = planner.resolve_tensor(req).detach()
                files.read(blob, req.storage_offsets, req.lengths, target)
                planner.commit_tensor(req, target)
            done: Future[None] = Future()
            done.set_result(None)
            return done

    return CheckedReader(str(folder))


def chunk_of(metadata: Any, index: Any) -> Chunk:
    """The chunk ``index`` (a ``MetadataIndex``) names in checked ``metadata``."""
    entry = metadata.state_dict_metadata.get(index.fqn)
    info = metadata.storage_data.get(index)
    chunks = getattr(entry, "chunks", None) or []
    offsets = tuple(index.offset or ())
    hint = index.index if isinstance(index.index, int) and 0 <= index.index < len(chunks) else 0
    if chunks and tuple(chunks[hint].offsets) == offsets:
        found = [chunks[hint]]
    else:
        found = [c for c in chunks if tuple(c.offsets) == offsets]
    if info is None or not found:
        raise CheckpointError(
            f"DCP planned a read of '{index.fqn}' that its metadata does not hold"
        )
    if info.transform_descriptors:
        raise CheckpointError(f"'{index.fqn}' is {transformed(info.transform_descriptors)}")
    return Chunk(
        index.fqn,
        info.relative_path,
        info.offset,
        info.length,
        entry.properties.dtype,
        tuple(found[0].sizes),
    )
