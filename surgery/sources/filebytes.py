"""Reading a tensor's bytes at a known file offset straight into its destination.

Both torch zip files and safetensors store each tensor contiguously, so once its offset is
known a load is one positioned read into the destination's memory: no temporary, no second
copy. Reads are ``preadv`` at an offset (no shared file position), so several threads read
one file at once (:mod:`.parallel`). A tensor stored in another dtype is read in pieces of a
few MB and cast piece by piece, never through a full-size temporary. The file's mapping is
never touched: a file truncated during a load makes a read fail, it cannot crash the process.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import threading
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .._sysmem import available_memory, format_bytes
from ..errors import Advice, CheckpointError, Fix

__all__ = ["OffsetReader", "file_kind"]

# Linux caps a single read at just under 2 GiB.
_MAX_READ = 1 << 30
# A new tensor this large or larger is checked against the memory available before allocating.
_CHECK_FROM = 1 << 26
# A tensor stored in another dtype is read and cast in pieces of this many bytes.
_CAST_PIECE = 1 << 22


class OffsetReader:
    """One file, opened on first use, read by byte offset into tensors."""

    def __init__(self, path: str, description: str) -> None:
        self.path = path
        self.description = description
        self._file: Any = None
        self._lock = threading.Lock()

    def read(self, offset: int, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """A new CPU tensor holding the bytes at ``offset``; refused, before allocating, when
        it needs more memory than is available (a sparse file can claim terabytes)."""
        need = math.prod(shape) * dtype.itemsize
        if need >= _CHECK_FROM:
            free = available_memory()
            if free is not None and need > free:
                raise CheckpointError(
                    Advice(
                        f"'{self.description}' holds a tensor of {format_bytes(need)} (shape "
                        f"{tuple(shape)}) at byte {offset}, more than the {format_bytes(free)} "
                        "of memory available; nothing was allocated. Skip it (",
                        Fix("skip"),
                        ") or read the file on a machine with more memory; a file claiming more "
                        "than it can hold is corrupt or hostile.",
                    )
                )
        out = torch.empty(shape, dtype=dtype)
        if out.numel():
            _readinto_at(self._handle(), offset, out, self.description)
        return out

    def read_into(self, offset: int, out: Tensor, shape: torch.Size, dtype: torch.dtype) -> None:
        """Fill ``out`` from the bytes at ``offset`` (stored as ``shape``/``dtype``).

        A contiguous CPU ``out`` of the stored dtype receives the bytes directly, one of
        another dtype piece by piece through a small buffer; any other (another device,
        non-contiguous) goes through one temporary. Safe to call from several threads.
        """
        if out.device.type == "cpu" and out.is_contiguous():
            if out.dtype == dtype:
                _readinto_at(self._handle(), offset, out, self.description)
            else:
                self._read_cast(offset, out, dtype)
        else:
            out.copy_(self.read(offset, shape, dtype))

    def _read_cast(self, offset: int, out: Tensor, dtype: torch.dtype) -> None:
        """Fill contiguous ``out`` from elements stored as ``dtype``, a few MB at a time."""
        flat, n = out.detach().view(-1), out.numel()
        step = max(1, _CAST_PIECE // dtype.itemsize)
        buf = torch.empty(min(step, n), dtype=dtype)
        f = self._handle()
        for i in range(0, n, step):
            piece = buf[: min(step, n - i)]
            _readinto_at(f, offset + i * dtype.itemsize, piece, self.description)
            flat[i : i + piece.numel()].copy_(piece)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _handle(self) -> Any:
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "rb", buffering=0)
            return self._file


def file_kind(path: Path) -> Literal["file", "dir", "missing", "other"]:
    """What ``path`` is, following symlinks: a regular file, a folder, nothing (or a dangling
    link), or something else (a device, a pipe, a socket). A name the OS refuses (too long, a
    loop of links) raises :class:`CheckpointError` naming it.

    Example:
        >>> file_kind(Path("/")), file_kind(Path("/no/such/file"))
        ('dir', 'missing')
    """
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "missing"
        raise CheckpointError(
            f"cannot open '{path}': {e.strerror or e}; pass the path of a checkpoint file or folder"
        ) from None
    except ValueError:  # a NUL in the name
        raise CheckpointError(f"cannot open {str(path)!r}: the name holds a NUL byte") from None
    if stat.S_ISREG(mode):
        return "file"
    return "dir" if stat.S_ISDIR(mode) else "other"


def _readinto_at(f: Any, offset: int, out: Tensor, description: str) -> None:
    """Read ``out.nbytes`` bytes at ``offset`` of raw file ``f`` straight into ``out``'s memory
    (positioned reads: no shared file position, so threads may read one file at once)."""
    view = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
    total = len(view)
    fd = f.fileno()
    done = 0
    while done < total:
        n = os.preadv(fd, [view[done : min(total, done + _MAX_READ)]], offset + done)
        if not n:
            raise CheckpointError(
                f"'{description}' ended early while reading a tensor at byte {offset + done}: "
                "the file was truncated or changed during the load"
            )
        done += n
