"""``torch.save`` files as a source: read by surgery's own unpickler, tensors read by offset.

Without ``trust_pickle`` a file is read by :func:`~.torchformat.read_torch` (no ``torch.load``,
no code run). Each storage is a slice of one private mapping of the file, so every tensor's
byte offset in the file comes from the record its storage was built on, never from a guess;
``read_into`` reads those bytes straight into the destination, through positioned reads that
never touch the mapping (a file truncated during a load raises, it cannot crash the process).
Entries the weights do not need (a Lightning checkpoint's hyper-parameters, callbacks) may hold
objects of classes that are not allowed: they are skipped unread and said in the notes, while
such an object inside the state dict is refused, naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import Advice, CheckpointError, Fix, UsageError
from .allowlist import allowed_from
from .base import ReadOptions
from .filebytes import OffsetReader
from .memory import MemorySource
from .pickle_safety import trusted_load
from .torchformat import TorchObject, read_torch, sniff
from .torchglobals import ndarrays_to_tensors
from .unpickler import ALLOW_GLOBALS, refused_in, unsafe_error
from .unwrap import Unwrapped, unwrap

__all__ = ["SUFFIXES", "TorchFileSource", "load_object"]

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl")


class TorchFileSource(MemorySource):
    """A ``torch.save`` file (zip or legacy) or a raw pickle of arrays, unwrapped to its state
    dict; tensors located in the file are read from it by offset."""

    def __init__(self, path: Path, options: ReadOptions) -> None:
        loaded = _read(path, options.trust_pickle, options.mmap, options.allow_globals)
        found = _unwrap(loaded, options.entry, path)
        super().__init__(
            found.tensors,
            str(path) + found.suffix,
            container=found.container,
            other_entries=found.other_entries,
        )
        self.notes.extend(loaded.notes)
        self.notes.extend(_skipped(loaded, path, found.container))
        # key -> (byte offset of its first element in the file, its storage's byte span).
        self._offsets: dict[str, int] = {}
        self._file = OffsetReader(str(path), self.description)
        for k, t in self._tensors.items():
            offset = loaded.offset(t)
            if offset is not None:
                self._offsets[k] = offset

    def resident(self, key: str) -> torch.device | None:
        """``None`` for a tensor read from the file by offset; else in memory (CPU)."""
        return None if key in self._offsets else super().resident(key)

    def _read_into(self, key: str, out: Tensor) -> None:
        offset = self._offsets.get(key)
        if offset is None:
            super()._read_into(key, out)
            return
        t = self._tensors[key]
        if t.is_contiguous():
            self._file.read_into(offset, out, t.shape, t.dtype)
        else:  # the span it covers, read by position, then its strided view
            out.copy_(self._strided(key, t, offset))

    def _strided(self, key: str, t: Tensor, offset: int) -> Tensor:
        extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
        raw = self._file.read(offset, torch.Size([extent * t.element_size()]), torch.uint8)
        return raw.view(t.dtype).as_strided(t.shape, t.stride())

    def _read_run_into(self, key: str, start: int, out: Tensor) -> bool:
        offset = self._offsets.get(key)
        if offset is None or not self._tensors[key].is_contiguous():
            return False
        dtype = self.specs[key][1]
        self._file.read_into(offset + start * dtype.itemsize, out, out.shape, dtype)
        return True

    def close(self) -> None:
        self._file.close()


def load_object(
    path: Path,
    *,
    trust_pickle: bool = False,
    mmap: bool = True,
    allow_globals: Iterable[Any] | None = None,
    stub_refused: bool = False,
    window: tuple[int, int] | None = None,
) -> Any:
    """The whole object a ``torch.save`` file holds (a training checkpoint, an optimizer or
    scheduler state), read as :class:`TorchFileSource` reads it: surgery's restricted
    unpickler unless ``trust_pickle``, ``allow_globals`` admitting more classes for this read.
    ``window=(offset, length)`` reads the ``torch.save`` zip lying there inside a larger file
    (a ``torch.distributed.checkpoint`` ``.distcp`` blob; never with ``trust_pickle``).

    An object of a class outside the allow-list is refused (:class:`UnsafeCheckpointError`
    naming every such global), or with ``stub_refused=True`` left in place as an inert
    :class:`~.unpickler.Refused` stand-in: check the part you use with
    :func:`~.unpickler.refused_in`.

    Example:
        >>> obj = load_object(Path("checkpoint-500/optimizer.pt"))  # doctest: +SKIP
        >>> sorted(obj)  # doctest: +SKIP
        ['param_groups', 'state']
    """
    if window is None:
        loaded = _read(path, trust_pickle, mmap, allow_globals)
    elif trust_pickle:
        raise UsageError("load_object(window=...) reads with surgery's unpickler only")
    else:
        extra = allowed_from(allow_globals)
        loaded = read_torch(path, kind="zip", allowed=extra, mmap=mmap, window=window)
    if loaded.refused and not stub_refused:
        raise unsafe_error(str(path), loaded.refused)
    return loaded.value


def check_format(path: Path, trust_pickle: bool = False) -> str:
    """The kind of torch file ``path`` is (see :func:`~.torchformat.sniff`); refuses what is
    no torch file at all, naming what it seems to be."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint '{path}': {e}") from None
    kind = sniff(head)
    if kind == "tar" and not trust_pickle:
        raise CheckpointError(
            Advice(
                f"'{path}' is a torch checkpoint in the legacy tar format (torch < 0.4), which "
                "safe loading cannot read. If you trust the file, pass ",
                Fix("trust_pickle", True),
                " (it is unpickled without limits), then re-save it with torch.save.",
            )
        )
    if kind is None:
        raise CheckpointError(f"'{path}' is not a torch checkpoint: {_what_it_is(head[:64])}")
    return kind


def _read(
    path: Path, trust_pickle: bool, mmap: bool, allow_globals: Iterable[Any] | None
) -> TorchObject:
    extra = allowed_from(allow_globals)
    kind = check_format(path, trust_pickle)
    if trust_pickle:
        value = trusted_load(path, kind, mmap=mmap)
        return TorchObject(ndarrays_to_tensors(value) if kind == "pickle" else value, [], kind)
    with warnings.catch_warnings():
        # torch.from_numpy on a read-only array, TypedStorage for quantized tensors
        warnings.simplefilter("ignore", UserWarning)
        return read_torch(path, kind=kind, allowed=extra, mmap=mmap)


def _unwrap(loaded: TorchObject, entry: str | None, path: Path) -> Unwrapped:
    """The state dict inside the file; a refusal naming the globals when the state dict is, or
    holds, an object surgery did not read."""
    try:
        found = unwrap(loaded.value, entry, str(path))
    except CheckpointError:
        if loaded.refused:
            raise unsafe_error(str(path), loaded.refused) from None
        raise
    if loaded.refused:
        inside = refused_in(found.tensors)
        if inside:
            raise unsafe_error(str(path) + found.suffix, inside)
    return found


def _skipped(loaded: TorchObject, path: Path, container: list[str]) -> list[str]:
    """The note for entries skipped unread because they hold objects of refused classes: the
    entries beside the state dict, at each level of the path to it (dotted)."""
    if not loaded.refused:
        return []
    entries, node, prefix = [], loaded.value, ""
    for part in [*container, None]:
        if not isinstance(node, Mapping):
            break
        entries += [prefix + str(k) for k, v in node.items() if k != part and refused_in(v)]
        if part is None:
            break
        node, prefix = node[part], f"{prefix}{part}."
    return [
        Advice(
            f"{path.name}: not read: {', '.join(repr(e) for e in entries) or 'some entries'} "
            f"(pickled {', '.join(loaded.refused)}; not needed for the weights). To read them "
            "too, pass ",
            ALLOW_GLOBALS,
            ".",
        )
    ]


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
