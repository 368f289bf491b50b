"""``save``: write a model's weights (or a state dict) as safetensors, atomically.

The files are what the hub expects: ``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json`` (``metadata.total_size``
and ``weight_map``) above ``max_shard_size``. Shards are laid out by ``huggingface_hub``'s
splitter (a small greedy split of the same rule when it is not installed) and written by
``safetensors.torch.save_file``. A tied tensor is stored once: the other names are dropped and
recorded in the metadata as ``{dropped name: kept name}``, as ``huggingface_hub``'s
``save_torch_state_dict`` records them. ``layout="checkpoint"`` writes a transformers model the
way its ``save_pretrained`` does, through transformers' own ``revert_weight_conversion``.

Everything is written into temporary files in the destination's folder, synced, then renamed
into place: a failure (or Ctrl-C) leaves no partial checkpoint, no temporary file, and an
existing checkpoint at the path as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._table import first_n, format_count
from ._text import escape_control
from .errors import SaveError, UsageError

__all__ = ["SaveReport", "save"]

Layout = Literal["model", "checkpoint"]

MAX_SHARD_SIZE = "5GB"  # huggingface_hub's default
_PATTERN = "model{suffix}.safetensors"
_INDEX = "model.safetensors.index.json"
# Files a save owns in a folder (replaced or removed by the next save), as huggingface_hub
# cleans them: the single file, numbered shards and the index.
_OWNED = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", re.IGNORECASE)
_RESERVED = {"total_size"}  # the index's own metadata key


@dataclass(frozen=True)
class SaveReport:
    """What :func:`save` wrote: the path, its files (shards, then the index), the tensors
    stored and their bytes, and ``tied`` (``{dropped name: kept name}``, model key names)."""

    path: str
    files: tuple[str, ...]
    tensors: int
    bytes: int
    layout: str
    tied: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "files": list(self.files),
            "tensors": self.tensors,
            "bytes": self.bytes,
            "layout": self.layout,
            "tied": dict(self.tied),
        }

    def __str__(self) -> str:
        shards = [f for f in self.files if not f.endswith(".json")]
        where = f"{len(shards)} shards + {_INDEX}" if len(shards) > 1 else ", ".join(self.files)
        text = (
            f"saved {self.tensors} tensors ({format_count(self.bytes)}B) to '{self.path}': {where}"
        )
        if self.tied:
            pairs = [f"{k} -> {v}" for k, v in self.tied.items()]
            text += f"; tied, stored once: {first_n(pairs, 3)}"
        return escape_control(text)


def save(
    model_or_state: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    layout: Layout = "model",
    metadata: Mapping[str, str] | None = None,
) -> SaveReport:
    """Write a model's weights (or a state dict) to ``path`` as safetensors, atomically.

    ``path`` is a folder (created if needed; files of other kinds in it, a ``config.json``,
    are kept) or a file ending in ``.safetensors`` (one file, no sharding). A folder gets
    ``model.safetensors``, or shards and ``model.safetensors.index.json`` when the tensors
    exceed ``max_shard_size`` (bytes, or ``"500MB"``, ``"5GB"``, ``"2GiB"``); a tensor larger
    than that gets a shard of its own. Tied tensors are stored once (a transformers model keeps
    the name its class does not tie, e.g. ``embed_tokens`` over ``lm_head``), the dropped names
    recorded in the metadata for ``layout="model"``; views are written as the values they
    show. ``metadata`` (strings only) goes into every file's ``__metadata__`` and the index,
    beside ``"format": "pt"``.

    ``layout="model"`` writes the model's own ``state_dict()`` names. ``layout="checkpoint"``
    writes a transformers model as its ``save_pretrained`` does: tied weights dropped, then
    transformers' ``revert_weight_conversion`` (stacked experts split back into
    ``experts.{i}.w1``, v5 renames undone), so older code and the hub read it. A model without
    conversions (any other model, transformers before 5) has one layout. The config is not
    written: ``model.config.save_pretrained(path)`` beside the weights makes the folder
    ``from_pretrained``-ready. Models on the meta device, sharded models (DTensor) and
    non-tensor entries are refused with the fix; nothing is written then.

    Example:
        >>> import torch, surgery, tempfile
        >>> out = tempfile.mkdtemp() + "/linear"
        >>> print(surgery.save(torch.nn.Linear(4, 2), out))  # doctest: +ELLIPSIS
        saved 2 tensors (40B) to '...linear': model.safetensors
    """
    if layout not in ("model", "checkpoint"):
        raise UsageError(f"layout must be 'model' or 'checkpoint', not {layout!r}")
    limit = _parse_size(max_shard_size)
    target = _target(path)
    state, tied = _collect(model_or_state, layout)
    records = tied if layout == "model" else {}
    meta = _check_metadata(metadata, records)
    shards = _split(state, limit)
    total = sum(t.nbytes for t in state.values())
    if target.suffix == ".safetensors" and not target.is_dir() and len(shards) > 1:
        raise UsageError(
            f"the tensors take {format_count(total)}B, over max_shard_size={max_shard_size!r}: "
            f"a single file '{target}' cannot shard. Save to a folder (a path without "
            "'.safetensors') or raise max_shard_size."
        )
    file_meta = {"format": "pt", **meta, **records}
    index = None
    if len(shards) > 1:
        weight_map = {k: name for name, keys in shards for k in keys}
        index = {"metadata": {"total_size": total, **meta, **records}, "weight_map": weight_map}

    def write(folder: Path) -> list[str]:
        names = []
        for name, keys in shards:
            _write_shard({k: state[k] for k in keys}, folder / name, file_meta)
            names.append(name)
        if index is not None:
            (folder / _INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
            names.append(_INDEX)
        return names

    try:
        files = _commit(target, write)
    except OSError as e:
        raise SaveError(
            f"cannot write '{target}': {e.strerror or e}. Nothing was written; a checkpoint "
            "already there is unchanged."
        ) from e
    return SaveReport(str(target), tuple(files), len(state), total, layout, dict(tied))


# --------------------------------------------------------------------------- what to write


def _collect(obj: Any, layout: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors to write, checked, one name per tied tensor, each its own bytes."""
    if isinstance(obj, nn.Module):
        owner, model = type(obj).__name__, obj
        state = dict(obj.state_dict())
    elif isinstance(obj, Mapping):
        owner, model, state = "the state dict", None, dict(obj)
    else:
        raise UsageError(
            f"save needs an nn.Module or a state dict (str -> Tensor), got {type(obj).__name__}"
        )
    if layout == "checkpoint" and model is None:
        raise UsageError(
            "layout='checkpoint' needs the model (its conversions come from its class), not a "
            "state dict: pass the model, or layout='model'"
        )
    _check_tensors(state, owner)
    convert = layout == "checkpoint" and _checkpoint_model(model)
    if convert:
        for k in getattr(model, "_keys_to_ignore_on_save", None) or ():  # as save_pretrained
            state.pop(k, None)
    discard = set(getattr(model, "all_tied_weights_keys", None) or ())
    state, tied = _unshare({k: v.detach() for k, v in state.items()}, discard)
    if convert:
        state, more = _unshare(_revert(model, state), ())  # experts split from one tensor
        tied |= more
    return state, tied


def _check_tensors(state: dict[str, Any], owner: str) -> None:
    """Refuse what safetensors cannot hold, or what holds no values, naming the keys."""
    if not state:
        raise UsageError(f"nothing to save: {owner} has no tensors")
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        DTensor = ()  # type: ignore[assignment,misc]
    bad: dict[str, list[str]] = defaultdict(list)
    for k, v in state.items():
        if not isinstance(k, str) or k == "__metadata__":
            bad["name"].append(repr(k))
        elif not isinstance(v, Tensor):
            bad["other"].append(f"{k} ({type(v).__name__})")
        elif isinstance(v, DTensor):
            bad["dtensor"].append(k)
        elif v.is_meta:
            bad["meta"].append(k)
        elif v.layout != torch.strided or v.is_quantized:
            bad["layout"].append(f"{k} ({v.layout}{', quantized' if v.is_quantized else ''})")
    if not bad:
        return
    problems = {
        "name": "names safetensors cannot store (not a string, or '__metadata__')",
        "other": "entries that are not tensors; safetensors stores tensors only: drop them "
        "from the state dict (or save them apart)",
        "dtensor": "sharded DTensors (FSDP2, tensor parallel); save writes from one process "
        "and does not gather: on every rank call torch.distributed.checkpoint.state_dict."
        "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, "
        "cpu_offload=True)) and pass the result to surgery.save on rank 0",
        "meta": "tensors on the meta device: nothing to save. Load weights first "
        "(surgery.load_partial materialises a model built under empty_init)",
        "layout": "sparse or quantized tensors: call .to_dense() / .dequantize() first",
    }
    lines = [f"{first_n(keys, 4)}: {len(keys)} {problems[kind]}" for kind, keys in bad.items()]
    raise UsageError(escape_control(f"cannot save {owner}: " + "; ".join(lines)))


def _unshare(
    state: dict[str, Tensor], discard: Collection[str]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Each tied tensor under one name (not one in ``discard`` where there is a choice, else
    the first), every other tensor contiguous in bytes no other tensor shares.

    Returns the tensors to write and ``{dropped name: kept name}``. Names of the same view of
    one storage (same offset, shape, strides and dtype) are a tie; a tensor overlapping
    another differently (a transposed alias, a slice) is copied; disjoint views (experts
    split from one stacked tensor) are written as they are.
    """
    by_storage: dict[tuple, list[str]] = defaultdict(list)
    for k, t in state.items():
        if t.numel():
            by_storage[(t.device, t.untyped_storage().data_ptr())].append(k)
    out = dict(state)
    tied: dict[str, str] = {}
    for keys in by_storage.values():
        if len(keys) < 2:
            continue
        views: dict[tuple, list[str]] = defaultdict(list)
        for k in keys:
            t = state[k]
            views[(t.data_ptr(), t.dtype, tuple(t.shape), t.stride())].append(k)
        kept = []
        for names in views.values():
            keep = next((n for n in names if n not in discard), names[0])
            tied.update({n: keep for n in names if n != keep})
            kept.append(keep)
        end = -1
        for (lo, hi), k in sorted((_span(state[k]), k) for k in kept):
            if lo < end:
                out[k] = state[k].clone(memory_format=torch.contiguous_format)
            end = max(end, hi)
    return {k: t.contiguous() for k, t in out.items() if k not in tied}, tied


def _span(t: Tensor) -> tuple[int, int]:
    """The bytes a strided tensor reaches: [first, last + 1)."""
    lo = t.data_ptr()
    reach = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True) if n > 0)
    return lo, lo + (reach + 1) * t.element_size()


def _checkpoint_model(model: nn.Module | None) -> bool:
    """Whether ``layout="checkpoint"`` converts ``model``: a transformers ``PreTrainedModel``
    at the root. One held deeper (a PEFT wrapper, a custom model around a backbone) is
    refused: which part is "the checkpoint" is the caller's to say."""
    tr = sys.modules.get("transformers")  # not imported: no transformers model exists
    base = getattr(tr, "PreTrainedModel", None) if tr is not None else None
    if model is None or base is None:
        return False
    if isinstance(model, base):
        return True
    inner = next((n for n, m in model.named_modules() if n and isinstance(m, base)), None)
    if inner is not None:
        raise UsageError(
            f"layout='checkpoint' writes a transformers model as its save_pretrained does; "
            f"{type(model).__name__} is not one but holds one at '{inner}'. Save that module "
            "(e.g. model.get_base_model() of a PEFT model, after merge_and_unload()) with "
            "layout='checkpoint', or the whole model with layout='model'."
        )
    return False


def _revert(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers' own reverse conversion (v5); before v5 checkpoints hold model names."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    try:
        return dict(revert_weight_conversion(model, state))
    except Exception as e:  # an op without a reverse (quantized, TP): say which layout works
        raise UsageError(
            f"transformers cannot write {type(model).__name__} in its checkpoint layout "
            f"({type(e).__name__}: {e}); save with layout='model' (the model's own names)"
        ) from e


# --------------------------------------------------------------------------- options


def _parse_size(value: Any) -> int:
    """Bytes from an int or a string like ``"500MB"``, ``"5GB"``, ``"2GiB"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        n = int(float(m[1]) * _UNITS[(m[2] or "").upper()])
    else:
        raise UsageError(
            f"max_shard_size must be a number of bytes or a size like '500MB' or '5GB', "
            f"not {value!r}"
        )
    if n < 1:
        raise UsageError(f"max_shard_size must be at least 1 byte, not {value!r}")
    return n


def _check_metadata(metadata: Any, records: Mapping[str, str]) -> dict[str, str]:
    """User metadata: text to text (a safetensors header holds strings only)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise UsageError(f"metadata must be a dict of str -> str, not {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise UsageError(
                escape_control(
                    f"metadata[{k!r}] is {type(v).__name__}: safetensors metadata holds strings "
                    "only (keys and values); pass str(value) or json.dumps(value)"
                )
            )
    clash = sorted({*metadata} & ({*_RESERVED} | {*records}))
    if clash or metadata.get("format", "pt") != "pt":
        what = f"{clash[0]!r} is written by save itself" if clash else "'format' must be 'pt'"
        raise UsageError(
            escape_control(
                f"metadata key {what} (the index's size, a tie record, or the format "
                "transformers checks); use another key"
            )
        )
    return dict(metadata)


# --------------------------------------------------------------------------- layout on disk


def _split(state: dict[str, Tensor], limit: int) -> list[tuple[str, list[str]]]:
    """``(file name, keys)`` per shard, in the hub's layout and names."""
    try:
        from huggingface_hub import split_state_dict_into_shards_factory
    except ImportError:
        groups = _greedy(state, limit)
    else:
        split = split_state_dict_into_shards_factory(
            state,
            get_storage_size=lambda t: t.nbytes,  # each tensor's own bytes: views are unshared
            filename_pattern=_PATTERN,
            max_shard_size=limit,
        )
        return [(name, list(keys)) for name, keys in split.filename_to_tensors.items()]
    n = len(groups)
    if n == 1:
        return [(_PATTERN.format(suffix=""), groups[0])]
    return [(_PATTERN.format(suffix=f"-{i:05d}-of-{n:05d}"), g) for i, g in enumerate(groups, 1)]


def _greedy(state: dict[str, Tensor], limit: int) -> list[list[str]]:
    """The hub's rule without the hub: keys in order, a new shard when the next tensor would
    pass ``limit``; a tensor above ``limit`` alone in its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for k, t in state.items():
        if t.nbytes > limit:
            shards.append([k])
            continue
        if current and size + t.nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(k)
        size += t.nbytes
    return [*shards, current] if current else shards


def _write_shard(tensors: dict[str, Tensor], file: Path, metadata: dict[str, str]) -> None:
    from safetensors import torch as st

    try:
        st.save_file(tensors, file, metadata=metadata)
    except OSError:
        raise
    except Exception as e:  # a dtype safetensors lacks, a header too large
        raise UsageError(f"safetensors cannot write {file.name}: {type(e).__name__}: {e}") from e


def _target(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    target = Path(path)
    if target.exists() and not target.is_dir() and target.suffix != ".safetensors":
        raise UsageError(
            f"'{target}' is a file: pass a folder to save into, or a path ending in .safetensors"
        )
    return target


def _commit(target: Path, write: Callable[[Path], list[str]]) -> list[str]:
    """Write into temporary files beside ``target``, sync them, then rename them into place.

    A single ``.safetensors`` file replaces the old one in one rename. A new folder is built
    whole and renamed to ``target``. In an existing folder, the new files are built in a
    hidden folder inside it; the old checkpoint's files (single file, shards, index) are
    moved aside and the new ones moved in, index last, and the old ones are put back if a
    rename fails. Files of other kinds in the folder are left alone.
    """
    if target.suffix == ".safetensors" and not target.is_dir():
        return _commit_file(target, write)
    if target.is_dir():
        stage = Path(tempfile.mkdtemp(prefix=".surgery-save-", suffix=".tmp", dir=target))
        try:
            names = _staged(write, stage)
            _swap(stage, target, names)
            return names
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    created = _make_parents(target.parent)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            names = _staged(write, stage)
            os.rename(stage, target)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        _fsync_dir(target.parent)
        return names
    except BaseException:
        _remove_dirs(created)
        raise


def _commit_file(target: Path, write: Callable[[Path], list[str]]) -> list[str]:
    """One file: built in a temporary folder beside ``target``, then renamed over it."""
    created = _make_parents(target.parent)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            (name,) = _staged(write, stage)
            os.replace(stage / name, target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        _fsync_dir(target.parent)
        return [target.name]
    except BaseException:
        _remove_dirs(created)
        raise


def _staged(write: Callable[[Path], list[str]], stage: Path) -> list[str]:
    names = write(stage)
    for name in names:
        _fsync(stage / name)
    _fsync_dir(stage)
    return names


def _swap(stage: Path, target: Path, names: list[str]) -> None:
    """Replace the checkpoint files in ``target`` by ``names`` from ``stage``; undo on error."""
    old = sorted(n for n in os.listdir(target) if _OWNED.fullmatch(n))
    old.sort(key=lambda n: not n.endswith(".json"))  # the old index is moved aside first
    aside = stage / ".replaced"
    aside.mkdir()
    moved: list[str] = []
    placed: list[str] = []
    try:
        for n in old:
            os.rename(target / n, aside / n)
            moved.append(n)
        for n in names:  # the index, last of names, lands last
            os.rename(stage / n, target / n)
            placed.append(n)
        _fsync_dir(target)
    except BaseException:
        for n in reversed(placed):
            _quietly(os.rename, target / n, stage / n)
        for n in reversed(moved):
            _quietly(os.rename, aside / n, target / n)
        raise


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; returns those created, deepest first."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_dirs(created: list[Path]) -> None:
    for d in created:  # deepest first; each is empty unless someone else wrote there
        _quietly(os.rmdir, d)


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except OSError:
        pass


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (POSIX; Windows cannot open a folder to sync it)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
