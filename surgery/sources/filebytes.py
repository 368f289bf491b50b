"""Reading a tensor's bytes at a known file offset straight into its destination.

Both torch zip files and safetensors store each tensor contiguously, so once its offset is
known a load is one ``readinto`` into the destination's memory: no temporary, no second copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError

__all__ = ["OffsetReader"]

# Linux caps a single read at just under 2 GiB.
_MAX_READ = 1 << 30


class OffsetReader:
    """One file, opened on first use, read by byte offset into tensors."""

    def __init__(self, path: str, description: str) -> None:
        self.path = path
        self.description = description
        self._file: Any = None

    def read(self, offset: int, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """A new CPU tensor holding the bytes at ``offset``."""
        out = torch.empty(shape, dtype=dtype)
        if out.numel():
            _readinto_at(self._handle(), offset, out, self.description)
        return out

    def read_into(self, offset: int, out: Tensor, shape: torch.Size, dtype: torch.dtype) -> None:
        """Fill ``out`` from the bytes at ``offset`` (stored as ``shape``/``dtype``).

        A contiguous CPU ``out`` of the stored dtype receives the bytes directly; any other
        (another dtype or device, non-contiguous) goes through one temporary.
        """
        direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
        if direct:
            _readinto_at(self._handle(), offset, out, self.description)
        else:
            out.copy_(self.read(offset, shape, dtype))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _handle(self) -> Any:
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)
        return self._file


def _readinto_at(f: Any, offset: int, out: Tensor, description: str) -> None:
    """Read ``out.nbytes`` bytes at ``offset`` of raw file ``f`` straight into ``out``'s memory."""
    view = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
    total = len(view)
    f.seek(offset)
    done = 0
    while done < total:
        n = f.readinto(view[done : min(total, done + _MAX_READ)])
        if not n:
            raise CheckpointError(
                f"'{description}' ended early while reading a tensor at byte {offset + done}: "
                "the file was truncated or changed during the load"
            )
        done += n
