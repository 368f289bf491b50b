"""Sharded checkpoints (``*.index.json``) and folders: which files make up one checkpoint.

An index maps each tensor name to the shard file holding it. The sharded source opens every
shard as a source of its own and hands each read to the shard that owns the key, so byte-offset
reads still go straight into the destination.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

from torch import Tensor

from ..errors import CheckpointError
from .base import CheckpointSource
from .torchfile import SUFFIXES

__all__ = ["ShardedSource", "pick_in_folder", "shard_path"]

# An index of a million keys is about 100 MB; anything larger is not an index.
_MAX_INDEX = 200_000_000

# What a folder may hold, in order of preference: an index, then safetensors, then pickles.
_FOLDER_PATTERNS = (".safetensors.index.json", ".index.json", ".safetensors", *SUFFIXES)


class ShardedSource(CheckpointSource):
    """A sharded checkpoint described by ``*.index.json`` (``weight_map``: key -> file).

    ``open_shard`` opens one shard file as a source (the caller decides how: torch file or
    safetensors, trusted or not).
    """

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
                        f"'{index}' maps '{name}' to '{shard}', but that shard has no such "
                        "tensor; the index and the shards do not belong together"
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
            if not path.is_file():
                raise CheckpointError(
                    f"shard '{shard}' listed in '{index}' (for '{name}') does not exist in "
                    f"{index.parent}; download every shard next to the index"
                )
            self._shards[shard] = open_shard(path)
        return self._shards[shard]

    def read(self, key: str) -> Tensor:
        return self._owner[key].read(key)

    def read_into(self, key: str, out: Tensor) -> None:
        self._owner[key].read_into(key, out)

    def read_region_into(self, key: str, offset: tuple[int, ...], out: Tensor) -> None:
        self._owner[key].read_region_into(key, offset, out)

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


# A shard of a sharded checkpoint, by the name transformers gives it.
_SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.", re.IGNORECASE)


def _indexed_shards(files: list[Path]) -> set[str]:
    """File names that an ``*.index.json`` in ``files`` lists as its shards."""
    out: set[str] = set()
    for p in files:
        if p.name.lower().endswith(".index.json"):
            try:
                out.update(str(v) for v in json.loads(p.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
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


def _weight_map(index: Path) -> list[tuple[str, str]]:
    """The index's ``weight_map`` as (key, shard file) pairs, every value checked for type."""
    try:
        with open(index, "rb") as f:
            raw = f.read(_MAX_INDEX + 1)
    except OSError as e:
        raise CheckpointError(f"cannot open sharded-checkpoint index '{index}': {e}") from None
    if len(raw) > _MAX_INDEX:
        raise CheckpointError(
            f"'{index}' is over {_MAX_INDEX // 1_000_000} MB, too big for a sharded-checkpoint "
            "index (a weight_map of key -> shard file); is it the right file?"
        )
    try:
        weight_map = json.loads(raw)["weight_map"]
        items = list(weight_map.items())
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise CheckpointError(
            f"'{index}' is not a sharded-checkpoint index (expected a JSON object with a "
            f"'weight_map' of key -> shard file): {type(e).__name__}: {e}"
        ) from None
    for name, shard in items:
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(
                f"'{index}' maps '{name}' to {shard!r}, which is not a shard file name; the "
                "index is malformed, download it again"
            )
    return items


def shard_path(index: Path, shard: str, name: str) -> Path:
    """The file ``shard`` named by ``index``, refused unless it lies inside the index's folder.

    The index's folder is the boundary: a name with ``..``, an absolute path or a symlink
    whose target lies outside both the folder and the folder the index itself resolves to
    (a hub cache links every file of a snapshot to its blob folder) is refused. Another index
    as a shard is refused too.
    """
    where = f"'{index}' maps '{name}' to '{shard}'"
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
