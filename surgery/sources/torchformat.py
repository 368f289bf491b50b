"""Reading ``torch.save`` files without ``torch.load``: zip, legacy and raw pickles.

Each format is read by surgery's restricted unpickler (:mod:`.unpickler`, with the allow-list of
:mod:`.torchglobals`); every storage the pickle names is checked against the file before it is
made, so nothing outside the file is ever mapped or read:

- **zip** (torch >= 1.6): the zip directory gives each record's data offset and size; the
  ``data.pkl`` record (at most 256 MB) is read into memory and unpickled; storage ``key`` is the
  stored record ``<archive>/data/<key>``, which must hold every byte of its tensors. The zip may
  lie at ``(offset, length)`` inside a larger file (a DCP ``.distcp`` blob).
- **legacy** (``_use_new_zipfile_serialization=False``, torch < 1.6): magic, protocol and
  system-info pickles, the main pickle, a pickled list of storage keys, then each storage as an
  8-byte element count and its raw bytes; the headers are walked (each checked against the file
  size) to find every storage's offset.
- **raw pickles** (detectron2's ``.pkl``): a plain pickle of numpy arrays, which become tensors.

With ``mmap=True`` every storage is a slice of one private mapping of the file
(``UntypedStorage.from_file``, as ``torch.load(mmap=True)`` does), and :meth:`TorchObject.offset`
gives a tensor's exact byte offset in the file from the storage it was built on. Otherwise (or
for a big-endian file, whose values are byte-swapped as torch does) storages are read into
memory.
"""

from __future__ import annotations

import gc
import io
import os
import pickle
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import Advice, CheckpointError, Fix, UnsafeCheckpointError
from .torchglobals import Storage, StorageType, allowed_globals, builders, ndarrays_to_tensors
from .torchzip import Record, TorchZip, ZipStructureError
from .unpickler import Refused, restricted_loads

__all__ = ["TorchObject", "is_torchscript", "read_torch", "sniff", "torchscript_error", "zip_names"]

_ZIP_MAGIC = b"PK\x03\x04"
_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001
_LEGACY_BINARY = b"\x8a\x0a" + _MAGIC_NUMBER.to_bytes(10, "little")  # LONG1 of the magic
_LEGACY_TEXT = b"L119547037146038801333356"
# A pickle record (the structure: names, shapes, offsets) is about 100 bytes a tensor; a
# million tensors fit in 256 MB. A larger one is a zip bomb, not a checkpoint.
MAX_PICKLE = 256 * 1024 * 1024
_MAX_DIRECTORY = 256 * 1024 * 1024  # a zip directory: about 100 bytes a record
# Raw pickles (detectron2 model-zoo files, a few hundred MB) are read whole into memory.
MAX_RAW_PICKLE = 2 * 1024**3
_FIRST_PREFIX = 4 * 1024 * 1024  # legacy pickles are read from a prefix that doubles


def sniff(head: bytes) -> str | None:
    """The kind of torch file ``head`` (its first 512 bytes) starts: ``zip``, ``legacy``,
    ``tar`` (torch < 0.4), ``pickle`` (a raw binary pickle) or ``None``."""
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if _LEGACY_BINARY in head[:32] or head.startswith(_LEGACY_TEXT):
        return "legacy"
    if head[257:262] == b"ustar":
        return "tar"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"  # a binary pickle that is no torch file (detectron2's .pkl)
    return None


@dataclass(frozen=True)
class _Record:
    offset: int  # of the data, in the file
    size: int
    stored: bool
    info: Record
    zip: TorchZip


@dataclass
class TorchObject:
    """What a torch file holds: ``value`` (the unpickled object), the ``refused`` globals read
    as stand-ins, ``kind`` and ``byteorder``; :meth:`offset` locates a tensor in the file."""

    value: Any
    refused: list[str]
    kind: str
    byteorder: str = "little"
    notes: list[str] = field(default_factory=list)
    _located: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)

    def offset(self, t: Tensor) -> int | None:
        """Byte offset in the file of ``t``'s first element, when ``t`` is a plain tensor on
        a storage sliced from the file's mapping; ``None`` otherwise (read it through ``t``)."""
        if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
            return None
        if t.is_conj() or t.is_neg() or type(t) not in (Tensor, torch.nn.Parameter):
            return None
        st = t.untyped_storage()
        found = self._located.get(st.data_ptr())
        if found is None or found[1] != st.nbytes() or not st.nbytes():
            return None
        return found[0] + t.storage_offset() * t.element_size()


class _File:
    """The file being read: positioned reads checked against its size, one lazy mapping."""

    def __init__(self, path: Path, where: str, mmap: bool) -> None:
        self.path, self.where, self.mmap = path, where, mmap
        self.f = open(path, "rb")  # closed by read_torch
        self.size = os.fstat(self.f.fileno()).st_size
        self._base: torch.UntypedStorage | None = None
        self.located: dict[int, tuple[int, int]] = {}

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise CheckpointError(
                f"cannot read torch checkpoint '{self.where}': {n} bytes at byte {offset} lie "
                f"past its end ({self.size} bytes); the file is truncated or corrupt"
            )
        self.f.seek(offset)
        data = self.f.read(n)
        if len(data) != n:
            raise CheckpointError(
                f"'{self.where}' ended early at byte {offset + len(data)}: the file was "
                "truncated or changed while it was read"
            )
        return data

    def storage(self, offset: int, nbytes: int, swap: torch.dtype | None) -> torch.UntypedStorage:
        """``nbytes`` at ``offset`` (checked inside the file): a slice of the mapping, or a copy
        in memory (byte-swapped by ``swap``'s size when given)."""
        if offset < 0 or offset + nbytes > self.size:
            raise CheckpointError(
                f"cannot read torch checkpoint '{self.where}': a storage of {nbytes} bytes at "
                f"byte {offset} lies past its end ({self.size} bytes); it is truncated or corrupt"
            )
        if self.mmap and swap is None and nbytes:
            if self._base is None:
                self._base = torch.UntypedStorage.from_file(str(self.path), False, self.size)
            st = self._base[offset : offset + nbytes]
            self.located[st.data_ptr()] = (offset, nbytes)
            return st
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self.f.seek(offset)
            if self.f.readinto(memoryview(buf.numpy())) != nbytes:
                raise CheckpointError(f"'{self.where}' ended early while reading a storage")
        st = buf.untyped_storage()
        if swap is not None and swap.itemsize > 1:
            st.byteswap(swap)
        return st


def read_torch(
    path: Path,
    *,
    where: str | None = None,
    kind: str,
    allowed: Mapping[str, Any] | None = None,
    mmap: bool = True,
    window: tuple[int, int] | None = None,
) -> TorchObject:
    """Read the torch file ``path`` of ``kind`` (see :func:`sniff`) with the restricted
    unpickler; ``allowed`` adds a user's ``allow_globals``. ``window=(offset, length)`` reads
    a torch zip lying there inside a larger file. Refused globals become stand-ins, listed in
    ``refused``: the caller refuses them where it uses them.

    Example:
        >>> obj = read_torch(Path("model.pth"), kind="zip")  # doctest: +SKIP
        >>> sorted(obj.value), obj.offset(obj.value["fc.weight"])  # doctest: +SKIP
    """
    where = where or str(path)
    try:
        file = _File(path, where, mmap)
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint '{where}': {e}") from None
    names = allowed_globals(allowed)
    collecting = gc.isenabled()
    gc.disable()  # unpickling makes many acyclic objects; collections would halve the speed
    try:
        if kind == "zip":
            start, length = window if window is not None else (0, file.size)
            if start < 0 or length < 0 or start + length > file.size:
                raise CheckpointError(
                    f"cannot read '{where}': the zip at bytes {start}..{start + length} lies "
                    f"outside the file ({file.size} bytes)"
                )
            out = _read_zip(file, start, length, names)
        elif kind == "legacy":
            out = _read_legacy(file, names)
        elif kind == "pickle":
            out = _read_raw(file, names)
        else:
            raise CheckpointError(f"'{where}' is not a torch file surgery reads ({kind})")
    finally:
        file.f.close()
        if collecting:
            gc.enable()
    out._located = file.located
    return out


# --------------------------------------------------------------------------- zip


def _zip_records(file: _File, start: int, length: int) -> dict[str, _Record]:
    """Every record of the zip at ``start`` (the one torch-zip reader, :mod:`.torchzip`):
    name -> data offset in the file, size, stored."""
    try:
        z = TorchZip(lambda at, n: file.read(start + at, n), length, max_directory=_MAX_DIRECTORY)
        out: dict[str, _Record] = {}
        for name, rec in z.records.items():
            offset = start + z.data_start(rec)
            size = rec.size if rec.stored else rec.csize
            if offset + size > start + length:
                raise CheckpointError(
                    f"cannot read torch checkpoint '{file.where}': record '{name}' claims "
                    f"{size} bytes at byte {offset}, past the end of the file; it is truncated "
                    "or corrupt"
                )
            out[name] = _Record(offset, rec.size, rec.stored, rec, z)
    except ZipStructureError as e:
        raise _bad_zip(file.where, e) from None
    return out


def zip_names(path: Path) -> list[str]:
    """The record names of a torch zip (for telling TorchScript archives apart); raises
    :class:`CheckpointError` for a broken zip."""
    file = _File(path, str(path), mmap=False)
    try:
        return list(_zip_records(file, 0, file.size))
    finally:
        file.f.close()


def is_torchscript(names: list[str]) -> bool:
    """Whether zip record ``names`` are a TorchScript archive's (``torch.jit.save``)."""
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def torchscript_error(where: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        Advice(
            f"'{where}' is a TorchScript archive (saved with torch.jit.save): a compiled module "
            "with its code, not a plain state dict. Loading it runs that module's TorchScript "
            "code, so safe loading refuses it. If you trust this file, pass ",
            Fix("trust_pickle", True),
            " (it is then read with torch.jit.load), or take the weights yourself with "
            "torch.jit.load(path).state_dict().",
        )
    )


def _bad_zip(where: str, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot read torch checkpoint '{where}': its zip structure is broken "
        f"({type(e).__name__}: {e}); the file is truncated or corrupt, download or save it again."
    )


def _record_bytes(file: _File, rec: _Record, limit: int) -> bytes:
    """A record's bytes, at most ``limit`` (a compressed one inflated, never beyond it)."""
    if rec.size > limit:
        raise CheckpointError(
            f"cannot read torch checkpoint '{file.where}': its record '{rec.info.name}' "
            f"inflates to {rec.size} bytes, more than any checkpoint's ({limit}); the file "
            "is corrupt or hostile"
        )
    if rec.stored:
        return file.read(rec.offset, rec.size)
    try:
        data = rec.zip.inflate(rec.info, limit)
    except ZipStructureError as e:
        raise _bad_zip(file.where, e) from None
    if len(data) != rec.size:
        raise _bad_zip(file.where, ValueError(f"record '{rec.info.name}' inflates wrong"))
    return data


def _read_zip(file: _File, start: int, length: int, names: Mapping[str, Any]) -> TorchObject:
    records = _zip_records(file, start, length)
    if not records:
        raise CheckpointError(f"'{file.where}' is an empty zip, not a torch checkpoint")
    if is_torchscript(list(records)):
        raise torchscript_error(file.where)
    prefix = next(iter(records)).split("/", 1)[0] + "/"  # torch names the archive so
    pkl = records.get(prefix + "data.pkl")
    if pkl is None:
        raise CheckpointError(
            f"'{file.where}' is a zip file without the '{prefix}data.pkl' record torch.save "
            "writes; it is not a torch checkpoint (or it is truncated)"
        )
    order = records.get(prefix + "byteorder")
    byteorder = "little"
    if order is not None:
        byteorder = _record_bytes(file, order, 16).decode("ascii", "replace")
        if byteorder not in ("little", "big"):
            raise CheckpointError(
                f"cannot read torch checkpoint '{file.where}': its byteorder record says "
                f"{byteorder!r}, not 'little' or 'big'; the file is corrupt"
            )
    data = _record_bytes(file, pkl, MAX_PICKLE)
    swap = byteorder != "little"
    storages: dict[str, Storage] = {}

    def storage(pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) != 5 or _text(pid[0]) != "storage":
            raise _bad_pid(pid)
        _, stype, key, _, numel = pid
        if isinstance(stype, Refused):
            return stype
        key = _text(key)
        if not isinstance(stype, StorageType) or key is None or not _count(numel):
            raise _bad_pid(pid)
        if key not in storages:
            rec = records.get(f"{prefix}data/{key}")
            if rec is None:
                raise CheckpointError(
                    f"cannot read torch checkpoint '{file.where}': its storage record "
                    f"'{prefix}data/{key}' is missing; the file is truncated or corrupt"
                )
            nbytes = numel * stype.dtype.itemsize
            if nbytes > rec.size:
                raise CheckpointError(
                    f"cannot read torch checkpoint '{file.where}': the record "
                    f"'{rec.info.name}' holds {rec.size} bytes but its storage needs "
                    f"{nbytes}; the file is corrupt, download or save it again."
                )
            if rec.stored:
                untyped = file.storage(rec.offset, nbytes, stype.dtype if swap else None)
            else:  # torch.save never compresses; someone re-zipped it: inflate in memory
                raw = bytearray(_record_bytes(file, rec, MAX_PICKLE)[:nbytes])
                untyped = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage()
                if swap and stype.dtype.itemsize > 1:
                    untyped.byteswap(stype.dtype)
            storages[key] = Storage(untyped, stype.dtype)
        return storages[key]

    got = _unpickle(data, file.where, names, storage, "utf-8")
    notes = []
    if swap:
        notes.append(
            f"{Path(file.where).name}: saved big-endian; values were byte-swapped in memory "
            "(as torch does), not read straight from the file"
        )
    return TorchObject(got.value, got.refused, "zip", byteorder, notes)


def _unpickle(
    data: Any, where: str, names: Mapping[str, Any], load: Callable | None, encoding: str
) -> Any:
    return restricted_loads(
        data,
        where=where,
        allowed=names,
        persistent_load=load,
        stub_refused=True,
        builders=builders(),
        encoding=encoding,
    )


def _text(x: Any) -> str | None:
    if isinstance(x, bytes):
        try:
            return x.decode("ascii")
        except UnicodeDecodeError:
            return None
    return x if isinstance(x, str) else None


def _count(n: Any) -> bool:
    return type(n) is int and 0 <= n < 1 << 60


def _bad_pid(pid: Any) -> Exception:
    return pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:100]}")


# --------------------------------------------------------------------------- legacy


def _read_legacy(file: _File, names: Mapping[str, Any]) -> TorchObject:
    limit = min(file.size, MAX_PICKLE)
    prefix = min(limit, _FIRST_PREFIX)
    while True:
        head = file.read(0, prefix)
        try:
            return _parse_legacy(file, head, names)
        except CheckpointError:
            if prefix >= limit:
                raise
            prefix = min(limit, prefix * 2)  # the pickles may run past the prefix read


def _parse_legacy(file: _File, head: bytes, names: Mapping[str, Any]) -> TorchObject:
    where = file.where
    buf = io.BytesIO(head)
    header = [restricted_loads(buf, where=where, allowed={}).value for _ in range(3)]
    magic, protocol, sys_info = header
    if magic != _MAGIC_NUMBER or protocol != _PROTOCOL_VERSION:
        raise CheckpointError(
            f"cannot read torch checkpoint '{where}': its header ({magic!r}, {protocol!r}) is "
            "not a legacy torch file's; the file is corrupt"
        )
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise CheckpointError(
            f"'{where}' is a legacy torch file saved on a big-endian machine; load it there "
            "with torch.load and re-save it with torch.save"
        )
    main = buf.tell()
    # Pass 1: where the main pickle ends and which storages it names (nothing is built).
    pids: dict[str, tuple[torch.dtype, int]] = {}

    def note(pid: Any) -> None:
        if isinstance(pid, tuple) and len(pid) == 6 and _text(pid[0]) == "storage":
            if isinstance(pid[1], StorageType) and _text(pid[2]) is not None and _count(pid[4]):
                pids.setdefault(_text(pid[2]), (pid[1].dtype, pid[4]))  # type: ignore[arg-type]

    markers = {k: v for k, v in names.items() if isinstance(v, StorageType)}
    restricted_loads(buf, where=where, allowed=markers, persistent_load=note, stub_refused=True)
    end = buf.tell()
    keys = restricted_loads(buf, where=where, allowed={}).value
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError(
            f"cannot read torch checkpoint '{where}': its storage list is corrupt"
        )
    offsets = _legacy_offsets(file, buf.tell(), keys, pids)
    # Pass 2: the object, its storages sliced from where pass 1 found them.
    roots: dict[str, Storage] = {}
    views: dict[str, Storage] = {}

    def storage(pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or _text(pid[0]) not in ("storage", "module"):
            raise _bad_pid(pid)
        if _text(pid[0]) == "module" or isinstance(pid[1], Refused):
            if len(pid) > 1 and isinstance(pid[1], Refused):
                return pid[1]
            raise _bad_pid(pid)
        if len(pid) != 6 or _text(pid[2]) not in offsets:
            raise _bad_pid(pid)
        key, view = pid[2], pid[5]
        if key not in roots:
            dtype, n = pids[key]
            roots[key] = Storage(file.storage(offsets[key], n * dtype.itemsize, None), dtype)
        root = roots[key]
        if view is None:
            return root
        return _legacy_view(file, root, view, views)

    buf.seek(main)
    got = _unpickle(buf, where, names, storage, "utf-8")
    if buf.tell() != end:
        raise CheckpointError(f"cannot read torch checkpoint '{where}': its pickle is corrupt")
    return TorchObject(got.value, got.refused, "legacy")


def _legacy_offsets(
    file: _File, pos: int, keys: list[str], pids: Mapping[str, tuple[torch.dtype, int]]
) -> dict[str, int]:
    """Each storage's data offset, from the 8-byte counts that precede the data."""
    if set(keys) != set(pids) or len(keys) != len(set(keys)):
        raise CheckpointError(
            f"cannot read torch checkpoint '{file.where}': its storage list does not match the "
            "storages its pickle names; the file is corrupt"
        )
    out: dict[str, int] = {}
    for key in keys:
        dtype, numel = pids[key]
        (count,) = struct.unpack("<q", file.read(pos, 8))
        if count != numel:
            raise CheckpointError(
                f"cannot read torch checkpoint '{file.where}': storage {key!r} holds {count} "
                f"elements where its pickle says {numel}; the file is corrupt"
            )
        out[key] = pos + 8
        pos += 8 + numel * dtype.itemsize
        if pos > file.size:
            raise CheckpointError(
                f"cannot read torch checkpoint '{file.where}': storage {key!r} runs past the "
                f"end of the file ({file.size} bytes); it is truncated"
            )
    return out


def _legacy_view(file: _File, root: Storage, view: Any, views: dict[str, Storage]) -> Storage:
    """A view of a root storage (very old files): a slice of it, located in the file too."""
    if not isinstance(view, tuple) or len(view) != 3:
        raise _bad_pid(view)
    key, offset, size = view
    if key not in views:
        item = root.dtype.itemsize
        if not (_count(offset) and _count(size)) or (offset + size) * item > root.untyped.nbytes():
            raise _bad_pid(view)
        untyped = root.untyped[offset * item : (offset + size) * item]
        at = file.located.get(root.untyped.data_ptr())
        if at is not None and untyped.nbytes():
            file.located[untyped.data_ptr()] = (at[0] + offset * item, untyped.nbytes())
        views[key] = Storage(untyped, root.dtype)
    return views[key]


# --------------------------------------------------------------------------- raw pickles


def _read_raw(file: _File, names: Mapping[str, Any]) -> TorchObject:
    if file.size > MAX_RAW_PICKLE:
        raise CheckpointError(
            Advice(
                f"'{file.where}' is a raw pickle of {file.size} bytes, more than surgery reads "
                f"into memory ({MAX_RAW_PICKLE}); if you trust it, pass ",
                Fix("trust_pickle", True),
            )
        )
    got = _unpickle(file.read(0, file.size), file.where, names, None, "latin1")
    return TorchObject(ndarrays_to_tensors(got.value), got.refused, "pickle")
