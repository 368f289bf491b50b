"""Sharded checkpoints (``*.index.json``) and folders: which files make up one checkpoint.

An index maps each tensor name to the shard file holding it. The sharded source opens every
shard as a source of its own and hands each read to the shard that owns the key, so byte-offset
reads still go straight into the destination.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import Tensor

from .. import _json
from .._text import escape_control
from ..errors import CheckpointError
from .base import CheckpointSource
from .filebytes import file_kind
from .torchfile import SUFFIXES

__all__ = ["ShardedSource", "pick_in_folder", "pick_training_file", "read_index", "shard_path"]

# What a folder may hold, in order of preference: an index, then safetensors, then pickles.
_FOLDER_PATTERNS = (".safetensors.index.json", ".index.json", ".safetensors", *SUFFIXES)


class ShardedSource(CheckpointSource):
    """A sharded checkpoint described by ``*.index.json`` (``weight_map``: key -> file).

    ``open_shard`` opens one shard file as a source (the caller decides how: torch file or
    safetensors, trusted or not).
    """

    ordered = False  # save_pretrained writes the weight_map sorted by name

    def __init__(self, index: Path, open_shard: Callable[[Path], CheckpointSource]) -> None:
        super().__init__(str(index))
        items = _weight_map(index)
        self._owner: dict[str, CheckpointSource] = {}
        self._shards: dict[str, CheckpointSource] = {}
        try:
            for name, shard in items:
                src = self._shard(index, str(shard), name, open_shard)
                if name not in src.specs:
                    raise CheckpointError(
                        f"'{index}' maps '{escape_control(name)}' to '{escape_control(shard)}', "
                        "but that shard has no such tensor; the index and the shards do not "
                        "belong together"
                    )
                self._owner[name] = src
                self.specs[name] = src.specs[name]
                why = getattr(src, "unreadable", {}).get(name)
                if why:
                    self.unreadable[name] = why
                self.files[name] = src.files.get(name, src.description)
        except BaseException:
            self.close()
            raise
        for src in self._shards.values():
            self.notes.extend(src.notes)

    def _shard(
        self, index: Path, shard: str, name: str, open_shard: Callable[[Path], CheckpointSource]
    ) -> CheckpointSource:
        if shard not in self._shards:
            path = shard_path(index, shard, name)
            try:
                kind = file_kind(path)
            except CheckpointError as e:
                raise CheckpointError(
                    f"shard '{escape_control(shard)}' listed in '{index}' (for "
                    f"'{escape_control(name)}'): {e}; the index is malformed, download it again"
                ) from None
            if kind != "file":
                what = "does not exist" if kind == "missing" else "is not a regular file"
                raise CheckpointError(
                    f"shard '{escape_control(shard)}' listed in '{index}' (for "
                    f"'{escape_control(name)}') {what} in {index.parent}; download every shard "
                    "next to the index"
                )
            self._shards[shard] = open_shard(path)
        return self._shards[shard]

    def read(self, key: str) -> Tensor:
        return self._owner[key].read(key)

    def read_into(self, key: str, out: Tensor) -> None:
        self._owner[key].read_into(key, out)

    def read_region_into(self, key: str, offset: tuple[int, ...], out: Tensor) -> None:
        self._owner[key].read_region_into(key, offset, out)

    def resident(self, key: str) -> torch.device | None:
        return self._owner[key].resident(key)

    def mapped(self, key: str) -> Tensor | None:
        return self._owner[key].mapped(key)

    def shares(self, a: str, b: str) -> bool:
        owner = self._owner.get(a)
        return owner is not None and owner is self._owner.get(b) and owner.shares(a, b)

    def close(self) -> None:
        for src in self._shards.values():
            src.close()


# Files that training frameworks save beside the model weights (transformers Trainer,
# accelerate save_state, torch AMP): never the model, so never picked from a folder.
_TRAINING_STATE = re.compile(
    r"^(optimizer|scheduler|scaler|sampler|dl_state_dict)(_\d+)?\.(pt|bin)$"
    r"|^rng_state(_\d+)?\.pth$|^random_states_\d+\.pkl$|^custom_checkpoint_\d+\.pkl$"
    r"|^training_args\.bin$",
    re.IGNORECASE,
)


# Optimizer and scheduler state by the names trainers give their files: transformers' Trainer
# (optimizer.pt, scheduler.pt), accelerate (optimizer.bin, optimizer_1.bin, scheduler.bin).
# Lightning keeps both inside its *.ckpt files.
_STATE_FILES = {
    "optimizer": re.compile(r"^optimizer(_\d+)?\.(pt|bin)$", re.IGNORECASE),
    "scheduler": re.compile(r"^(lr_)?scheduler(_\d+)?\.(pt|bin)$", re.IGNORECASE),
}
_STATE_NAMES = {
    "optimizer": "optimizer.pt, optimizer.bin, optimizer_N.bin, *.ckpt",
    "scheduler": "scheduler.pt, scheduler.bin, scheduler_N.bin, *.ckpt",
}

# A shard of a sharded checkpoint, by the name transformers gives it.
_SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.", re.IGNORECASE)


def _indexed_shards(files: list[Path]) -> set[str]:
    """File names that an ``*.index.json`` in ``files`` lists as its shards."""
    out: set[str] = set()
    for p in files:
        if p.name.lower().endswith(".index.json"):
            try:
                out.update(str(v) for v in read_index(p)["weight_map"].values())
            except (CheckpointError, KeyError, TypeError, AttributeError):
                pass  # a broken index is reported when it is opened
    return out


def _stem(name: str) -> str:
    """The model a file holds, by name: ``pytorch_model.bin`` and ``model.safetensors`` agree."""
    name = name.lower().removesuffix(".index.json")
    changed = True
    while changed:
        changed = False
        for suffix in (".safetensors", *SUFFIXES):
            if name.endswith(suffix):
                name, changed = name[: -len(suffix)], True
    return "model" if name == "pytorch_model" else name


def read_index(index: Path) -> Any:
    """The JSON value of a sharded-checkpoint index, its size (200 MB at most) checked before
    it is read and its nesting before it is decoded; a :class:`CheckpointError` otherwise."""
    try:
        return _json.read_file(index, limit=_json.MAX_INDEX)
    except _json.JSONLimitError as e:
        raise CheckpointError(
            f"'{index}' is not a sharded-checkpoint index ({e}; an index is a JSON object "
            f"with a 'weight_map' of key -> shard file, {_json.MAX_INDEX // 1_000_000} MB at "
            "most); is it the right file?"
        ) from None
    except OSError as e:
        raise CheckpointError(
            f"cannot open sharded-checkpoint index '{index}': {e.strerror or e}"
        ) from None
    except ValueError as e:
        raise CheckpointError(
            f"'{index}' is not a sharded-checkpoint index (expected a JSON object with a "
            f"'weight_map' of key -> shard file): {type(e).__name__}: {e}"
        ) from None


def _weight_map(index: Path) -> list[tuple[str, str]]:
    """The index's ``weight_map`` as (key, shard file) pairs, every value checked for type."""
    try:
        items = list(read_index(index)["weight_map"].items())
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(
            f"'{index}' is not a sharded-checkpoint index (expected a JSON object with a "
            f"'weight_map' of key -> shard file): {type(e).__name__}: {e}"
        ) from None
    for name, shard in items:
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(
                f"'{index}' maps '{escape_control(name)}' to {shard!r}, which is not a shard "
                "file name; the index is malformed, download it again"
            )
    return items


def shard_path(index: Path, shard: str, name: str) -> Path:
    """The file ``shard`` named by ``index``, refused unless it lies inside the index's folder.

    The index's folder is the boundary: a name with ``..``, an absolute path or a symlink
    whose target lies outside both the folder and the folder the index itself resolves to
    (a hub cache links every file of a snapshot to its blob folder) is refused. Another index
    as a shard is refused too.
    """
    where = f"'{index}' maps '{escape_control(name)}' to '{escape_control(shard)}'"
    pure = PurePosixPath(shard.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(shard).drive or ".." in pure.parts or "\0" in shard:
        raise CheckpointError(
            f"{where}, a path outside the index's folder {index.parent}; surgery reads shards "
            "only from the folder of their index. Move the shards next to the index."
        )
    if shard.lower().endswith(".index.json"):
        raise CheckpointError(
            f"{where}, which is an index itself, not a shard; the index is malformed"
        )
    path = index.parent / pure
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return path  # missing or a dangling link: the caller says it does not exist
    allowed = (index.parent.resolve(), index.resolve().parent)
    if not any(real.is_relative_to(a) for a in allowed):
        raise CheckpointError(
            f"{where}, a symlink to '{real}' outside the index's folder {index.parent}; "
            "surgery does not follow links a checkpoint names out of its folder. Copy the "
            "shard into the folder if you trust it."
        )
    return path


def pick_in_folder(folder: Path) -> Path:
    """The one checkpoint in a folder: an index first, safetensors before pickles.

    Training state saved beside the weights (``optimizer.pt``, ``scheduler.pt``,
    ``rng_state.pth``, ``training_args.bin``, accelerate's ``optimizer.bin`` and
    ``random_states_0.pkl``) and shards named by an index are set aside, so a transformers
    ``Trainer`` or accelerate ``save_state`` folder gives its ``model.safetensors`` /
    ``pytorch_model.bin`` (or index). One model in several formats (``model.safetensors``
    beside ``pytorch_model.bin``) gives the preferred format; files of different names
    (Lightning's ``last.ckpt`` beside ``epoch=3-step=40.ckpt``) raise, naming each: which one
    is meant cannot be guessed.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file())
    state = [p for p in files if _TRAINING_STATE.match(p.name)]
    files = [p for p in files if p not in state]
    shards = _indexed_shards(files)
    found = [
        p
        for p in files
        if p.name not in shards
        and not _SHARD_NAME.search(p.name)
        and p.name.lower().endswith(_FOLDER_PATTERNS)
    ]
    stems = {_stem(p.name) for p in found}
    if len(stems) > 1:
        names = ", ".join(p.name for p in found)
        last = [p for p in found if p.name.lower().startswith("last.")]
        why = (
            f" '{last[0].name}' is the latest save, the others are the best or periodic ones."
            if last
            else ""
        )
        raise CheckpointError(
            f"folder '{folder}' holds several checkpoints ({names}) and none is obviously "
            f"the one to load.{why} Pass the file path, e.g. '{folder / (last or found)[0].name}'"
        )
    for pattern in _FOLDER_PATTERNS:  # one model, perhaps in several formats: the best one
        for p in found:
            if p.name.lower().endswith(pattern):
                return p
    if state:
        names = ", ".join(p.name for p in state)
        raise CheckpointError(
            f"folder '{folder}' holds training state ({names}) but no model weights (looked "
            "for model.safetensors, pytorch_model.bin, *.index.json, *.safetensors, "
            f"{', '.join('*' + s for s in SUFFIXES)}). Save the model beside it "
            "(trainer.save_model, accelerator.save_model) or pass the weights file"
        )
    raise CheckpointError(
        f"folder '{folder}' holds no checkpoint (looked for *.index.json, *.safetensors, "
        f"{', '.join('*' + s for s in SUFFIXES)})"
    )


def pick_training_file(folder: Path, what: str) -> Path:
    """The file holding the ``what`` (``"optimizer"`` or ``"scheduler"``) state in a folder.

    Picked by name, as :func:`pick_in_folder` picks the weights: a transformers ``Trainer``
    folder's ``optimizer.pt`` / ``scheduler.pt``, accelerate's ``optimizer.bin`` /
    ``scheduler.bin`` (``optimizer_1.bin``... for more), Lightning's ``*.ckpt`` (which hold
    ``optimizer_states`` and ``lr_schedulers``). Several candidates raise, naming each; with
    none, the folder's one checkpoint (a training checkpoint holding an ``optimizer`` entry)
    when it is a torch file.

    Example:
        >>> pick_training_file(Path("out/checkpoint-500"), "optimizer")  # doctest: +SKIP
        PosixPath('out/checkpoint-500/optimizer.pt')
    """
    files = sorted(p for p in folder.iterdir() if p.is_file())
    found = [
        p for p in files if _STATE_FILES[what].match(p.name) or p.name.lower().endswith(".ckpt")
    ]
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(escape_control(p.name) for p in found)
        last = [p for p in found if p.name.lower().startswith("last.")]
        why = f" '{last[0].name}' is the latest save." if last else ""
        raise CheckpointError(
            f"folder '{folder}' holds several files that may hold the {what} state ({names})."
            f"{why} Pass the file path, e.g. '{folder / (last or found)[0].name}'"
        )
    try:
        weights = pick_in_folder(folder)
    except CheckpointError:
        weights = None
    if weights is not None and weights.name.lower().endswith(SUFFIXES):
        return weights
    listing = ", ".join(escape_control(p.name) for p in files[:20]) or "nothing"
    raise CheckpointError(
        f"folder '{folder}' holds no {what} state (looked for {_STATE_NAMES[what]}, or one "
        f"training checkpoint); it holds {listing}. Pass the file that holds it."
    )
