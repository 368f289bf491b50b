"""``torch.save`` files: checked, loaded lazily with ``mmap=True``, read by byte offset.

A torch zip file stores each storage as one uncompressed record. Loaded with ``mmap=True``,
every storage is a slice of one mapping of the file, so a tensor's byte offset in the file is
known, checked against the zip records, and ``read_into`` reads those bytes straight into the
destination. Anything doubtful falls back to copying through the mapping.
"""

from __future__ import annotations

import struct
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from .filebytes import OffsetReader
from .memory import MemorySource
from .pickle_safety import is_torchscript, torch_load
from .unwrap import unwrap

__all__ = ["SUFFIXES", "TorchFileSource", "load_object"]

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl")

_ZIP_MAGIC = b"PK\x03\x04"
# A pickle record (the structure: names, shapes, offsets) is about 100 bytes a tensor; a
# million tensors fit in 256 MB. A larger one is a zip bomb, not a checkpoint.
_MAX_PICKLE = 256 * 1024 * 1024
# Legacy (pre-1.6) torch files start with a pickled magic number: binary pickles open with
# the PROTO opcode, text pickles (pickle_protocol=0/1) with the number itself.
_LEGACY_STARTS = (b"\x80", b"L119547037146038801333356")


class TorchFileSource(MemorySource):
    """A ``torch.save`` file, unwrapped to its state dict; offset-backed where mmap allows."""

    def __init__(
        self, path: Path, *, entry: str | None = None, trust_pickle: bool = False, mmap: bool = True
    ) -> None:
        is_zip = _check_format(path, trust_pickle)
        notes = []
        facts = _zip_facts(path) if is_zip else None
        if not is_zip and mmap:
            mmap = False
            notes.append(
                f"{path.name}: legacy (non-zip) torch format cannot be memory-mapped; loaded "
                "into memory. Re-save with torch.save to load it lazily."
            )
        if is_zip and mmap and trust_pickle and is_torchscript(path):
            mmap = False  # torch.jit.load reads the archive into memory
            notes.append(f"{path.name}: TorchScript archive, loaded with torch.jit.load")
        obj = torch_load(path, trust_pickle=trust_pickle, mmap=mmap)
        found = unwrap(obj, entry, str(path))
        super().__init__(
            found.tensors,
            str(path) + found.suffix,
            container=found.container,
            other_entries=found.other_entries,
        )
        self.notes.extend(notes)
        # key -> byte offset in the file, for tensors stored contiguously.
        self._offsets: dict[str, int] = {}
        self._file = OffsetReader(str(path), self.description)
        if facts is not None and mmap:
            offsets = _storage_file_offsets(path, self._tensors, facts.records)
            if facts.byteorder != sys.byteorder:
                # torch swapped the bytes while loading; the file's raw bytes are not the values.
                self.notes.append(
                    f"{path.name}: saved {facts.byteorder}-endian; values are read through "
                    "torch's byte-swapped copy, not straight from the file"
                )
            elif offsets is None:
                self.notes.append(
                    f"{path.name}: could not map tensors to file offsets; copying through mmap"
                )
            else:
                self._offsets = offsets

    def _read_into(self, key: str, out: Tensor) -> None:
        offset = self._offsets.get(key)
        if offset is None:
            super()._read_into(key, out)
        else:
            shape, dtype = self.specs[key]
            self._file.read_into(offset, out, shape, dtype)

    def _read_run_into(self, key: str, start: int, out: Tensor) -> bool:
        offset = self._offsets.get(key)
        if offset is None:
            return False
        dtype = self.specs[key][1]
        self._file.read_into(offset + start * dtype.itemsize, out, out.shape, dtype)
        return True

    def close(self) -> None:
        self._file.close()


def load_object(path: Path, *, trust_pickle: bool = False, mmap: bool = True) -> Any:
    """The whole object a ``torch.save`` file holds (a training checkpoint, an optimizer or
    scheduler state), read with every check :class:`TorchFileSource` makes: the format, the
    zip structure, weights-only unpickling unless ``trust_pickle``.

    Example:
        >>> obj = load_object(Path("checkpoint-500/optimizer.pt"))  # doctest: +SKIP
        >>> sorted(obj)  # doctest: +SKIP
        ['param_groups', 'state']
    """
    is_zip = _check_format(path, trust_pickle)
    if is_zip:
        _zip_facts(path)
    return torch_load(path, trust_pickle=trust_pickle, mmap=mmap and is_zip)


def _check_format(path: Path, trust_pickle: bool = False) -> bool:
    """Whether ``path`` is a torch zip file; refuses what is no torch file at all."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint '{path}': {e}") from None
    if is_zip:
        return True
    if head.startswith(_ZIP_MAGIC):
        raise CheckpointError(
            f"cannot read torch checkpoint '{path}': it starts like a torch zip file but its "
            "directory at the end is missing, so the file is truncated; download or save it again."
        )
    if head[257:262] == b"ustar":
        if trust_pickle:
            return False  # torch reads its oldest (tar) format, unpickling without limits
        raise CheckpointError(
            f"'{path}' is a torch checkpoint in the legacy tar format (torch < 0.4), which "
            "weights-only loading cannot read. If you trust the file, pass trust_pickle=True "
            "(it is unpickled without limits), then re-save it with torch.save."
        )
    if not head.startswith(_LEGACY_STARTS):
        raise CheckpointError(f"'{path}' is not a torch checkpoint: {_what_it_is(head[:64])}")
    return False


@dataclass
class _ZipFacts:
    records: dict[int, int]  # data offset -> size of every stored tensor record
    byteorder: str  # 'little' or 'big', as torch recorded it


def _zip_facts(path: Path) -> _ZipFacts:
    """Check a torch zip's structure before torch reads it: what zipfile refuses, a pickle
    record inflating beyond any real checkpoint's, stored records past the file's end."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            byteorder = "little"
            for info in infos:
                name = info.filename
                if name.endswith("/data.pkl") or name == "data.pkl":
                    if info.file_size > _MAX_PICKLE:
                        raise CheckpointError(
                            f"cannot read torch checkpoint '{path}': its pickle record "
                            f"'{name}' inflates to {info.file_size} bytes, more than any "
                            f"checkpoint's ({_MAX_PICKLE}); the file is corrupt or hostile"
                        )
                elif info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_PICKLE:
                    raise CheckpointError(
                        f"cannot read torch checkpoint '{path}': record '{name}' is compressed "
                        f"and inflates to {info.file_size} bytes; torch.save never compresses, "
                        "so the file is corrupt or hostile"
                    )
                elif info.compress_type == zipfile.ZIP_STORED and info.file_size > size:
                    raise CheckpointError(
                        f"cannot read torch checkpoint '{path}': record '{name}' claims "
                        f"{info.file_size} bytes, the file has {size}; it is truncated or corrupt"
                    )
                elif name.endswith("/byteorder") and info.file_size <= 16:
                    byteorder = zf.read(info).decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(
                    f"cannot read torch checkpoint '{path}': its byteorder record says "
                    f"{byteorder!r}, not 'little' or 'big'; the file is corrupt"
                )
        records = _zip_records(path, infos)
    except CheckpointError:
        raise
    except (
        OSError,
        EOFError,
        ValueError,
        NotImplementedError,
        RuntimeError,
        struct.error,
        zipfile.BadZipFile,
    ) as e:
        raise _bad_zip(path, e) from None
    return _ZipFacts(records, byteorder)


def _bad_zip(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot read torch checkpoint '{path}': its zip structure is broken "
        f"({type(e).__name__}: {e}); the file is truncated or corrupt, download or save it again."
    )


_RETRY = "If it should be one, the file is truncated or corrupt; download or save it again."


def _what_it_is(head: bytes) -> str:
    """What a file that is no torch file seems to hold, and what to do, from its first bytes."""
    if not head:
        return "the file is empty; download or save it again."
    if head.startswith(b"version https://git-lfs"):
        return (
            "it is a Git LFS pointer, a small text file standing for the weights; fetch the "
            "real file with git lfs pull."
        )
    text = head.decode("utf-8", "replace")[:-1]  # the last character may be cut in two
    if not all(c.isprintable() or c.isspace() for c in text):
        return f"it is neither a torch zip file nor a legacy torch pickle. {_RETRY}"
    if text.lstrip()[:1] in ("<", "{", "["):
        kind = "HTML or XML" if text.lstrip()[:1] == "<" else "JSON"
        return f"it holds {kind} text (an error page or a config file?), not tensors. {_RETRY}"
    shown = repr(text[:24]) + ("..." if len(text) > 24 else "")
    return f"it holds text ({shown}), not a file saved with torch.save. {_RETRY}"


def _zip_records(path: Path, infos: list[zipfile.ZipInfo]) -> dict[int, int]:
    """Data offset -> size of every stored (uncompressed) record of a torch zip file."""
    out: dict[int, int] = {}
    with open(path, "rb") as f:
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED or "/data/" not in info.filename:
                continue
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != _ZIP_MAGIC:
                continue
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            out[info.header_offset + 30 + name_len + extra_len] = info.file_size
    return out


def _storage_file_offsets(
    path: Path, tensors: Mapping[str, Tensor], records: Mapping[int, int]
) -> dict[str, int] | None:
    """Byte offset in the file of each (contiguous) tensor loaded with ``mmap=True``.

    ``torch.load(mmap=True)`` maps the whole file once and makes every storage a slice of that
    mapping at its record's offset. So ``storage.data_ptr() - base`` is the record offset for a
    single ``base``; it is found from one storage and then checked against every other one.
    A storage larger than its record (it would read the bytes after it) is refused. Any other
    doubt returns ``None`` and the caller copies through the mapping instead.
    """
    if not records or not tensors:
        return None
    storages: dict[int, int] = {}
    for t in tensors.values():
        if t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized:
            return None
        st = t.untyped_storage()
        if st.nbytes():
            storages[st.data_ptr()] = st.nbytes()
    if not storages:
        return None
    ptr0, size0 = max(storages.items(), key=lambda kv: kv[1])
    # Records of the same size first: the right one is almost always among them.
    order = sorted(records, key=lambda off: records[off] != size0)
    for rec_off in order:
        base = ptr0 - rec_off
        if all(p - base in records for p in storages):
            break
    else:
        return None
    for p, n in storages.items():
        if records[p - base] < n:
            raise CheckpointError(
                f"cannot read torch checkpoint '{path}': the record at byte {p - base} holds "
                f"{records[p - base]} bytes but its tensor needs {n}; the file is corrupt, "
                "download or save it again."
            )
    out: dict[str, int] = {}
    for k, t in tensors.items():
        if t.is_contiguous():
            out[k] = t.untyped_storage().data_ptr() - base + t.storage_offset() * t.element_size()
    return out
