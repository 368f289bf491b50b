"""``torch.save`` files: checked, loaded lazily with ``mmap=True``, read by byte offset.

A torch zip file stores each storage as one uncompressed record. Loaded with ``mmap=True``,
every storage is a slice of one mapping of the file, so a tensor's byte offset in the file is
known, checked against the zip records, and ``read_into`` reads those bytes straight into the
destination. Anything doubtful falls back to copying through the mapping.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError
from .filebytes import OffsetReader
from .memory import MemorySource
from .pickle_safety import is_torchscript, torch_load
from .unwrap import unwrap

__all__ = ["SUFFIXES", "TorchFileSource"]

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl")

_ZIP_MAGIC = b"PK\x03\x04"
# Legacy (pre-1.6) torch files start with a pickled magic number: binary pickles open with
# the PROTO opcode, text pickles (pickle_protocol=0/1) with the number itself.
_LEGACY_STARTS = (b"\x80", b"L119547037146038801333356")


class TorchFileSource(MemorySource):
    """A ``torch.save`` file, unwrapped to its state dict; offset-backed where mmap allows."""

    def __init__(
        self, path: Path, *, entry: str | None = None, trust_pickle: bool = False, mmap: bool = True
    ) -> None:
        is_zip = _check_format(path)
        notes = []
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
        if mmap:
            offsets = _storage_file_offsets(path, self._tensors)
            if offsets is None:
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

    def close(self) -> None:
        self._file.close()


def _check_format(path: Path) -> bool:
    """Whether ``path`` is a torch zip file; refuses what is no torch file at all."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
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
    if not head.startswith(_LEGACY_STARTS):
        raise CheckpointError(f"'{path}' is not a torch checkpoint: {_what_it_is(head)}")
    return False


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


def _zip_records(path: Path) -> dict[int, int]:
    """Data offset -> size of every stored (uncompressed) record of a torch zip file."""
    out: dict[int, int] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED or "/data/" not in info.filename:
                continue
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != _ZIP_MAGIC:
                continue
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            out[info.header_offset + 30 + name_len + extra_len] = info.file_size
    return out


def _storage_file_offsets(path: Path, tensors: Mapping[str, Tensor]) -> dict[str, int] | None:
    """Byte offset in the file of each (contiguous) tensor loaded with ``mmap=True``.

    ``torch.load(mmap=True)`` maps the whole file once and makes every storage a slice of that
    mapping at its record's offset. So ``storage.data_ptr() - base`` is the record offset for a
    single ``base``; it is found from one storage and then checked against every other one.
    Any doubt returns ``None`` and the caller copies through the mapping instead.
    """
    try:
        records = _zip_records(path)
    except (OSError, zipfile.BadZipFile, struct.error):
        return None
    if not records or not tensors:
        return None
    storages: dict[int, int] = {}
    for t in tensors.values():
        if t.device.type != "cpu" or t.layout != torch.strided:
            return None
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    ptr0, size0 = max(storages.items(), key=lambda kv: kv[1])
    for rec_off, rec_size in records.items():
        if rec_size != size0:
            continue
        base = ptr0 - rec_off
        if all(records.get(p - base) == n for p, n in storages.items()):
            break
    else:
        return None
    out: dict[str, int] = {}
    for k, t in tensors.items():
        if t.is_contiguous():
            out[k] = t.untyped_storage().data_ptr() - base + t.storage_offset() * t.element_size()
    return out
