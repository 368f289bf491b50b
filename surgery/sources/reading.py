"""Opening anything that holds a checkpoint as a source: the public entry points."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import Advice, CheckpointError, Fix, UsageError
from .allowlist import allowed_from
from .base import CheckpointLike, CheckpointSource, ReadOptions
from .dcp import DCPSource, is_dcp_dir
from .filebytes import file_kind
from .hub import hub_file, is_hub_name
from .memory import from_mapping, from_module
from .safetensors import SafetensorsSource, looks_like_safetensors
from .sharded import ShardedSource, pick_in_folder, pick_training_file
from .torchfile import SUFFIXES, TorchFileSource, load_object

__all__ = ["load_training_state", "open_file", "open_source", "read_checkpoint", "resolve_entry"]


def open_source(
    src: CheckpointLike | CheckpointSource,
    *,
    entry: str | None = None,
    trust_pickle: bool = False,
    mmap: bool = True,
    key: str | None = None,
    allow_globals: Iterable[Any] | None = None,
) -> CheckpointSource:
    """Open anything :func:`read_checkpoint` accepts as a lazy :class:`CheckpointSource`.

    Only names, shapes and dtypes are read here; tensors are read one at a time later. Call
    ``close()`` when done (tensors already read stay valid). ``key=`` is the old name of
    ``entry=`` and warns. ``allow_globals`` as in :func:`read_checkpoint`.

    Example:
        >>> src = open_source("runs/last.ckpt", entry="state_dict_ema")  # doctest: +SKIP
        >>> sorted(src.specs)[:2], src.container, src.other_entries  # doctest: +SKIP
    """
    entry = resolve_entry(entry, key)
    allowed_from(allow_globals)  # a bad entry is a UsageError whatever the checkpoint
    if isinstance(src, CheckpointSource):
        return src
    if isinstance(src, nn.Module):
        return from_module(src)
    if isinstance(src, Mapping):
        return from_mapping(src, entry=entry)
    if isinstance(src, str) and is_hub_name(src) and not os.path.exists(src):
        # Hub names (hf-hub:, timm:, torchvision:) -> a cached local file; see surgery/hub.py.
        src = hub_file(src)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src).expanduser()
        kind = file_kind(path)
        # A torch.distributed.checkpoint folder (or its .metadata file): see sources/dcp.py.
        if path.name == ".metadata" and kind == "file":
            path, kind = path.parent, "dir"
        if kind == "dir" and is_dcp_dir(path):
            return DCPSource(path, entry=entry)
        if kind == "dir":
            path = pick_in_folder(path)
        elif kind == "missing":
            raise CheckpointError(f"checkpoint '{path}' does not exist")
        return open_file(path, ReadOptions(entry, trust_pickle, mmap, allow_globals))
    raise CheckpointError(
        f"cannot read a checkpoint from a {type(src).__name__}; pass a file path, a folder, "
        "a dict of tensors or an nn.Module"
    )


def read_checkpoint(
    src: CheckpointLike,
    *,
    entry: str | None = None,
    trust_pickle: bool = False,
    mmap: bool = True,
    key: str | None = None,
    allow_globals: Iterable[Any] | None = None,
) -> dict[str, Tensor]:
    """Read a checkpoint into a flat ``{name: tensor}`` state dict.

    Accepts ``.pt/.pth/.bin/.ckpt/.tar`` files ``torch.save`` wrote (zip or legacy format,
    any pickle protocol) and raw ``.pkl`` pickles of numpy arrays (detectron2), ``.safetensors``,
    a sharded ``*.index.json``, a folder holding one of these, a ``torch.distributed.checkpoint``
    (DCP) folder, a hub name
    (``hf-hub:org/name``, ``timm:NAME``, ``torchvision:WEIGHTS``; see :func:`surgery.hub_file`),
    a mapping or an ``nn.Module``.
    Training checkpoints are unwrapped (``state_dict``, ``model``, ``module``, ...); ``entry``
    picks the container entry explicitly (dotted for nesting, e.g. ``entry="ema"``; ``key=``
    is its deprecated old name). Pickles are read by surgery's own restricted unpickler,
    which runs no code: it admits tensors and plain data, ``allow_globals=[cls, "mod.Name"]``
    admits more classes for this read (as ``torch.serialization.safe_globals`` does), and
    entries the weights do not need that hold other objects are skipped unread (said in the
    notes). ``trust_pickle=True`` loads with ``torch.load(weights_only=False)`` instead,
    running whatever the file holds: only for files you trust. With ``mmap=True`` tensors of
    torch files are lazy views of the file.

    Example:
        >>> sd = surgery.read_checkpoint("runs/last.ckpt", entry="state_dict")  # doctest: +SKIP
    """
    entry = resolve_entry(entry, key)
    source = open_source(
        src, entry=entry, trust_pickle=trust_pickle, mmap=mmap, allow_globals=allow_globals
    )
    try:
        return {k: source.read(k) for k in source.specs}
    finally:
        if source is not src:
            source.close()


def open_file(path: Path, options: ReadOptions) -> CheckpointSource:
    """Open one checkpoint file by its kind: index, safetensors (by name or content), torch.

    Only regular files are read (a symlink to one counts).
    """
    _require_file(path)
    entry = options.entry
    name = path.name.lower()
    if name.endswith(".index.json"):
        if entry is not None:
            raise CheckpointError(
                Advice(Fix("entry", entry), f" does not apply to the sharded checkpoint '{path}'")
            )
        shards = dataclasses.replace(options, entry=None)
        return ShardedSource(path, lambda shard: open_file(shard, shards))
    if name.endswith(".safetensors") or (not name.endswith(SUFFIXES) and _sniff_safetensors(path)):
        if entry is not None:
            raise CheckpointError(
                Advice(
                    Fix("entry", entry),
                    f" does not apply to '{path}': a safetensors file is a flat tensor dict",
                )
            )
        return SafetensorsSource(path)
    return TorchFileSource(path, options)


def load_training_state(
    src: str | os.PathLike,
    what: str,
    *,
    trust_pickle: bool = False,
    allow_globals: Iterable[Any] | None = None,
) -> tuple[Any, Path]:
    """The object a file of ``what`` (``"optimizer"`` or ``"scheduler"``) state holds, and
    that file; a folder gives the file trainers name for it (see
    :func:`~surgery.sources.sharded.pick_training_file`). The file is read with every check
    :class:`TorchFileSource` makes (:func:`~surgery.sources.torchfile.load_object`).

    Example:
        >>> obj, path = load_training_state("out/checkpoint-500", "optimizer")  # doctest: +SKIP
        >>> path.name, sorted(obj)  # doctest: +SKIP
        ('optimizer.pt', ['param_groups', 'state'])
    """
    path = Path(src).expanduser()
    if file_kind(path) == "dir":
        path = pick_training_file(path, what)
    _require_file(path)
    return load_object(path, trust_pickle=trust_pickle, allow_globals=allow_globals), path


def _require_file(path: Path) -> None:
    """Only regular files are read (a symlink to one counts): a device such as ``/dev/zero``
    or a named pipe would never end or never answer."""
    kind = file_kind(path)
    if kind != "file":
        what = "does not exist" if kind == "missing" else "is not a regular file"
        raise CheckpointError(
            f"checkpoint '{path}' {what}; pass a checkpoint file or a folder holding one"
        )


def resolve_entry(entry: str | None, key: str | None, *, stacklevel: int = 3) -> str | None:
    """``entry``, or the deprecated ``key`` with a ``DeprecationWarning``; both is an error.

    ``stacklevel`` points the warning at the caller of the public function (3: the caller of
    the function that calls this).
    """
    if key is None:
        return entry
    if entry is not None:
        raise UsageError(
            f"pass entry= only: key= is its deprecated old name (got entry={entry!r}, key={key!r})"
        )
    warnings.warn(
        "key= is renamed entry= (it names the checkpoint's container entry, e.g. "
        f"entry={key!r}); key= will be removed in the next release",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return key


def _sniff_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint '{path}': {e}") from None
    return looks_like_safetensors(head)
