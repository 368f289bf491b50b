"""The source protocol: what every checkpoint reader offers the loader.

A *source* knows its tensor names with shapes and dtypes (``specs``, from file headers, no
tensor data touched) and reads one tensor at a time: ``read(key)`` returns it,
``read_into(key, out)`` fills a destination, straight from the file when the layout allows.
The loader plans on ``specs`` alone, so tensors it skips are never read.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .parallel import read_all

__all__ = ["CheckpointLike", "CheckpointSource", "ReadOptions"]

CheckpointLike = str | os.PathLike | Mapping[str, Any] | nn.Module


@dataclass(frozen=True)
class ReadOptions:
    """How a file is read: the container ``entry`` holding the state dict, ``trust_pickle``
    (``torch.load`` runs the file's code), ``mmap`` (tensors as lazy views of the file) and
    the user's ``allow_globals``; checked once, handed to each reader."""

    entry: str | None = None
    trust_pickle: bool = False
    mmap: bool = True
    allow_globals: Iterable[Any] | None = None


class CheckpointSource:
    """Tensor names with shapes/dtypes, readable one at a time or many at once.

    ``specs`` maps each key to ``(shape, dtype)`` without reading data. ``read(key)`` returns a
    tensor (possibly a lazy memory-mapped view); ``read_into(key, out)`` fills ``out`` (same
    shape, any dtype/device) holding at most one temporary; ``close()`` releases files
    (tensors already read stay valid). Data attributes say where the tensors came from:
    ``description`` (file or object), ``files`` (key -> the file it is read from, where that is
    not ``description``: a sharded checkpoint's shards), ``notes``, ``container`` (the entries
    the state dict sat under, e.g. ``['state_dict']``) and ``other_entries`` (the top-level
    entries beside it); ``extras`` and ``metadata`` hold what a state dict keeps beside tensors
    (extra states, packed weights; torch's per-module versions).

    Capabilities, so that nothing above the sources asks what class a source is:

    - ``read_many_into(targets)`` fills many destinations at once: a few threads reading
      several at a time (:mod:`.parallel`), or a DCP folder's one ``dcp.load``; with
      ``collective=True`` (where ``collective_reads``) it is one collective call every rank
      makes, each filling its own shards of DTensor destinations;
    - ``mapped(key)``: the tensor as it already lies in memory or in the file's mapping,
      sharing its bytes (what ``load_partial(..., assign=True)`` puts into the model);
    - ``read_region_into(key, offset, out)`` fills ``out`` with one block of the tensor (a
      rank's shard of a sharded model);
    - ``resident(key)``: the device a tensor already lies on in memory (``None``: read from a
      file), so a writer copies device to device instead of staging through the host;
    - ``shares(a, b)``: whether two keys are one tensor of the checkpoint (a tied model saved
      with ``torch.save``), from how it is stored;
    - ``check_reads(keys)``: everything those reads need is there, checked before a write;
    - ``unreadable``: keys that cannot be copied into a dense tensor, and why;
    - ``ordered``: whether ``specs`` keeps the order the tensors were saved in.

    A subclass implements ``read``; one that can fill ``out`` without a temporary (bytes at a
    known file offset) overrides the hooks ``_read_into`` and ``_read_run_into``, which must be
    safe to call from several threads at once. A source that wraps others delegates to their
    public ``read``/``read_into``/``read_region_into``/``mapped``.

    Example:
        >>> import torch
        >>> from surgery.sources import open_source
        >>> src = open_source({"w": torch.ones(2)})
        >>> src.specs
        {'w': (torch.Size([2]), torch.float32)}
        >>> out = torch.zeros(2, dtype=torch.float16)
        >>> src.read_into("w", out); out
        tensor([1., 1.], dtype=torch.float16)
    """

    collective_reads = False  # read_many_into(collective=True) fills DTensors, rank by rank
    # ``specs`` is in the order the tensors were saved (a state dict's: the model's). False
    # where the format keeps no such order: a safetensors header (writers sort it by dtype and
    # name), an index's weight_map (sorted by transformers' save_pretrained).
    ordered = True

    def __init__(self, description: str) -> None:
        self.description = description
        self.specs: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self.files: dict[str, str] = {}
        self.notes: list[str] = []
        self.unreadable: dict[str, str] = {}
        self.container: list[str] = []
        self.other_entries: list[str] = []
        # What a torch state dict holds beside tensors, for modules that load themselves:
        # non-tensor entries (a dynamically quantized Linear's packed weights and dtype, a
        # dict extra state) and the per-module versions torch keeps in ``_metadata``.
        self.extras: dict[str, Any] = {}
        self.metadata: dict[str, dict] | None = None

    def read(self, key: str) -> Tensor:
        """Tensor ``key`` (a lazy view of the file where the format allows)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement read()")

    def read_into(self, key: str, out: Tensor) -> None:
        """Copy tensor ``key`` into ``out`` (which has its shape), holding at most one temp."""
        if out.numel() == 0:
            return
        self._read_into(key, out)

    def _read_into(self, key: str, out: Tensor) -> None:
        out.copy_(self.read(key))

    def read_many_into(
        self,
        targets: Mapping[str, Tensor],
        *,
        collective: bool = False,
        on_read: Callable[[str], None] | None = None,
    ) -> None:
        """Fill ``targets[key]`` with tensor ``key`` for every key, several at once (the
        largest first, on the threads of :func:`~.parallel.read_threads`), and call
        ``on_read(key)`` in the calling thread as each is done (a source reading all in one
        pass calls it for each at the end). The first failing read is raised after the reads
        running beside it finished; no new one starts. ``collective=True`` only where
        :attr:`collective_reads`: a call every rank makes with the same keys, each filling
        its own shards."""
        if collective and not self.collective_reads:
            raise NotImplementedError(f"{type(self).__name__} reads no DTensors collectively")
        self._read_many_into(targets, collective, on_read or (lambda key: None))

    def _read_many_into(
        self, targets: Mapping[str, Tensor], collective: bool, on_read: Callable[[str], None]
    ) -> None:
        """The hook a source that reads many keys in one pass overrides."""
        read_all(list(targets.items()), self.read_into, on_read)

    def mapped(self, key: str) -> Tensor | None:
        """Tensor ``key`` as it lies in memory or in the file's (private, copy-on-write)
        mapping, sharing those bytes instead of copying them, in its stored shape and dtype;
        ``None`` when this source can only copy it (then read it into new memory). Nothing is
        read: the pages are touched when the tensor is first used."""
        return None

    def resident(self, key: str) -> torch.device | None:
        """The device tensor ``key`` already lies on in memory; ``None`` when it is read from
        a file (a writer then stages it on its way to a GPU)."""
        return None

    def check_reads(self, keys: Iterable[str]) -> None:
        """Raise a ``CheckpointError`` now if any tensor in ``keys`` could not be read in full
        later (a DCP folder's data files: missing, truncated, outside the folder). The loader
        calls it before its first write. Sources whose files were checked when opened have
        nothing left to check."""

    def read_region_into(self, key: str, offset: tuple[int, ...], out: Tensor) -> None:
        """Copy the block of tensor ``key`` that starts at ``offset`` and has ``out``'s shape.

        Used for sharded models (surgery/distributed.py): a rank reads only its shard. A block
        that is one contiguous run of the stored tensor (a range of rows, as ``Shard(0)``
        owns) is read straight from the file where the source knows its byte offset (the
        hook ``_read_run_into``); any other block is cut from ``read(key)``.
        """
        shape, _ = self.specs[key]
        if out.numel() == 0:
            return
        if tuple(out.shape) == tuple(shape):
            self.read_into(key, out)
            return
        start = contiguous_start(tuple(shape), tuple(offset), tuple(out.shape))
        if start is not None and self._read_run_into(key, start, out):
            return
        box = tuple(slice(o, o + n) for o, n in zip(offset, out.shape, strict=True))
        out.copy_(self.read(key)[box])

    def shares(self, a: str, b: str) -> bool:
        """Whether keys ``a`` and ``b`` are one tensor of the checkpoint: the same bytes with
        the same shape, strides and dtype (a tied model saved with ``torch.save``), known from
        how the checkpoint stores them, never by comparing values. ``False`` when unknown."""
        return a == b

    def data_files(self) -> dict[str, int]:
        """Tensors per data file, by file name in name order, for a checkpoint read from
        several files (a sharded index, a DCP folder: a tensor split over files counts in
        each); empty for one file. From headers alone, nothing read.

        Example:
            >>> open_source("runs/hf").data_files()  # doctest: +SKIP
            {'model-00001-of-00002.safetensors': 180, 'model-00002-of-00002.safetensors': 111}
        """
        counts = Counter(os.path.basename(f) for f in self.files.values())
        return dict(sorted(counts.items())) if len(counts) > 1 else {}

    def _read_run_into(self, key: str, start: int, out: Tensor) -> bool:
        """Fill ``out`` from the elements of ``key`` stored from element ``start`` on, when
        the source can read them directly; ``False`` when it cannot."""
        return False

    def close(self) -> None:
        """Release file handles and mappings (tensors already read stay valid)."""


def contiguous_start(
    shape: tuple[int, ...], offset: tuple[int, ...], size: tuple[int, ...]
) -> int | None:
    """Element index where block (``offset``, ``size``) of a row-major ``shape`` starts, when
    the block is one contiguous run (dims after the first partial one are whole, dims before
    it have extent 1); ``None`` otherwise.

    Example:
        >>> contiguous_start((4, 3), (2, 0), (2, 3))
        6
        >>> contiguous_start((4, 3), (0, 1), (4, 2)) is None
        True
    """
    partial = [d for d in range(len(shape)) if size[d] != shape[d]]
    if partial:
        first = partial[0]
        if any(size[d] != shape[d] for d in range(first + 1, len(shape))):
            return None
        if any(size[d] != 1 for d in range(first)):
            return None
    start, stride = 0, 1
    for d in reversed(range(len(shape))):
        start += offset[d] * stride
        stride *= shape[d]
    return start
