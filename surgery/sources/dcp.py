"""A ``torch.distributed.checkpoint`` (DCP) directory as a checkpoint source.

The plan comes from the directory's ``.metadata`` file alone (names, global shapes, dtypes; no
tensor data), read without running code and checked (sources/dcp_metadata.py). ``read`` loads
one full tensor in this process with ``dcp.load(no_dist=True)``; sharded models do not go
through it: surgery/distributed.py hands the model's own DTensors to one collective
``dcp.load``, so each rank reads only its shards. Either way DCP reads through
:func:`~surgery.sources.dcp_files.checked_reader`: the checked metadata, and every chunk's file
and bytes checked before the first read (sources/dcp_files.py). :meth:`DCPSource.check_reads`
runs those checks for a whole plan before the loader writes anything.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import Advice, CheckpointError, Fix, SurgeryError
from .base import CheckpointSource
from .dcp_files import Chunk, DataFiles, checked_reader, chunk_of
from .dcp_metadata import read_dcp_metadata
from .unwrap import unwrap

__all__ = ["DCPSource", "is_dcp_dir"]

# Top-level entries of a DCP training checkpoint that never hold the model's weights; when every
# entry beside one model-like entry (``model``, ``state_dict``, ...) is one of these, the loader
# unwraps that entry as it unwraps ``{'model': sd, 'optimizer': ...}`` in a torch file.
_TRAINING_STATE = frozenset(
    {
        "optim",
        "optimizer",
        "optimizers",
        "optimizer_state",
        "lr_scheduler",
        "scheduler",
        "schedulers",
        "dataloader",
        "data_loader",
        "train_state",
        "trainer",
        "epoch",
        "step",
        "rng",
        "rng_state",
        "extra_state",
    }
)
_MODEL_ENTRIES = ("model", "state_dict", "model_state_dict", "module", "app", "net", "network")


def is_dcp_dir(path: Path) -> bool:
    """True for a folder written by ``torch.distributed.checkpoint.save`` (it has ``.metadata``)."""
    return path.is_dir() and (path / ".metadata").is_file()


class DCPSource(CheckpointSource):
    """A DCP checkpoint folder: specs from its checked ``.metadata`` (never ``pickle.load``).

    Tensor entries (``TensorStorageMetadata``) become specs with their global shape and dtype;
    non-tensor entries (pickled objects such as ``optimizer.param_groups``) are left out with a
    note and never read. ``entry`` picks the entry holding the model (``entry="model"`` keeps
    ``model.*`` and strips the prefix); without it a lone model-like entry beside training
    state is picked automatically.

    Example:
        >>> src = DCPSource(Path("runs/step-1000"))  # doctest: +SKIP
        >>> src.specs["model.fc.weight"]  # doctest: +SKIP
        (torch.Size([10, 512]), torch.float32)
    """

    def __init__(self, path: Path, *, entry: str | None = None) -> None:
        super().__init__(str(path))
        self.path = path
        self._layout = read_dcp_metadata(path)
        self._files = DataFiles(path)
        skipped = set(self._layout.others)
        tensors: dict[str, tuple[torch.Size, torch.dtype]] = {
            name: (md.size, md.properties.dtype)
            for name, md in self._layout.metadata.state_dict_metadata.items()
            if name not in skipped
        }
        others = list(self._layout.others)
        # Full checkpoint name of each spec key (they differ once a container is unwrapped).
        self._names: dict[str, str] = {}
        container = self._container(tensors, others, entry)
        if not container:
            self.specs = tensors
            self._names = {k: k for k in tensors}
        else:
            lead = ".".join(container) + "."
            self.specs = {k[len(lead) :]: v for k, v in tensors.items() if k.startswith(lead)}
            self._names = {k[len(lead) :]: k for k in tensors if k.startswith(lead)}
            if not self.specs:
                tops = sorted({k.split(".", 1)[0] for k in tensors})
                raise CheckpointError(
                    Advice(
                        f"DCP checkpoint '{path}' has no tensors under {lead[:-1]!r}; its "
                        f"top-level entries are: {', '.join(tops)}. Pass ",
                        Fix("entry"),
                        " with one of them.",
                    )
                )
            self.container = container
            self.description += "".join(f"[{p!r}]" for p in container)
            self.other_entries = sorted(
                {k.split(".", 1)[0] for k in [*tensors, *others] if not k.startswith(lead)}
            )
            others = [k for k in others if k.startswith(lead)]
        for key, name in self._names.items():
            if name in self._layout.unreadable:
                self.unreadable[key] = self._layout.unreadable[name]
        if others:
            shown = ", ".join(others[:5]) + (
                f" and {len(others) - 5} more" if len(others) > 5 else ""
            )
            self.notes.append(
                f"{path.name}: {len(others)} non-tensor DCP entries left out ({shown})"
            )

    def _container(
        self,
        tensors: dict[str, tuple[torch.Size, torch.dtype]],
        others: list[str],
        entry: str | None,
    ) -> list[str]:
        """The entry path to the state dict. ``entry`` names it (every tensor under that name,
        the prefix stripped, optimizer state too); without it, it is found by the rules a
        torch file's nesting is unwrapped by (:func:`~surgery.sources.unwrap.unwrap`), on a
        skeleton of the saved object rebuilt from each entry's path: tensors become
        placeholders of their shape and dtype that hold no memory, non-tensor entries stay
        unread. Without paths (a folder saved by another planner), a lone model-like entry
        beside training state is picked."""
        if entry is not None:  # every entry under that name, its prefix stripped
            return [entry]
        paths = self._layout.paths
        if not paths or any(name not in paths for name in tensors):
            found = _auto_container(tensors)
            return [found] if found else []
        skeleton: dict[str, Any] = {}
        for name in [*tensors, *others]:
            *outer, last = paths.get(name, (name,))
            node = skeleton
            for part in outer:
                inner = node.setdefault(part, {})
                if not isinstance(inner, dict):  # a value and a container under one name
                    return []
                node = inner
            if name in tensors:
                node[last] = _placeholder(*tensors[name])
            else:
                node[last] = _NOT_READ
        return unwrap(skeleton, None, str(self.path)).container

    def checkpoint_name(self, key: str) -> str:
        """The name ``key`` has inside the DCP checkpoint (with its container prefix)."""
        return self._names[key]

    def check_reads(self, keys: Iterable[str]) -> None:
        """Check every chunk of these tensors before the first read: its file is inside the
        folder, a regular file, long enough, its bytes a stored torch zip of the planned
        chunk. One :class:`CheckpointError` lists every problem."""
        self._files.check(self._chunks(keys))

    def _chunks(self, keys: Iterable[str]) -> list[Chunk]:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        md = self._layout.metadata
        return [
            chunk_of(md, MetadataIndex(name, c.offsets, i))
            for name in dict.fromkeys(self._names[k] for k in keys)
            for i, c in enumerate(md.state_dict_metadata[name].chunks)
        ]

    def data_files(self) -> dict[str, int]:
        """Tensors per ``.distcp`` file of this entry, from the metadata (each rank writes
        its own file, so a sharded tensor counts in every file holding a chunk of it)."""
        names = set(self._names.values())
        held: dict[str, set[str]] = {}
        for index, info in self._layout.metadata.storage_data.items():
            if index.fqn in names:
                held.setdefault(Path(info.relative_path).name, set()).add(index.fqn)
        counts = {f: len(held[f]) for f in sorted(held)}
        return counts if len(counts) > 1 else {}

    def close(self) -> None:
        self._files.close()

    def read(self, key: str) -> Tensor:
        shape, dtype = self.specs[key]
        out = torch.empty(shape, dtype=dtype)
        self.read_into(key, out)
        return out

    def _read_into(self, key: str, out: Tensor) -> None:
        """Load tensor ``key`` into ``out`` in this process only (no collective)."""
        self.load_many({key: out}, no_dist=True)

    collective_reads = True

    def _read_many_into(
        self, targets: Mapping[str, Tensor], collective: bool, on_read: Callable[[str], None]
    ) -> None:
        """Every key in one ``dcp.load`` (per-key loads would each re-plan and re-open the
        folder); ``collective=True`` is a collective ``dcp.load``: every rank calls it with
        the same keys, DTensor destinations get only this rank's shards."""
        if targets:
            self.load_many(targets, no_dist=not collective)
        for key in targets:
            on_read(key)

    def load_many(self, targets: Mapping[str, Tensor], *, no_dist: bool) -> None:
        """``dcp.load`` of ``{spec key: destination}`` in one pass; DTensor destinations get
        only this rank's shards. With ``no_dist=False`` it is a collective: call it on every
        rank with the same keys. DCP's ``CheckpointException`` becomes a ``CheckpointError``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint.api import CheckpointException

        sd = {self._names[k]: t for k, t in targets.items()}
        try:
            with warnings.catch_warnings():
                # dcp.load warns that it "assumes a single process" whenever no_dist is set.
                warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
                dcp.load(
                    sd,
                    storage_reader=checked_reader(self.path, self._layout.metadata, self._files),
                    planner=DefaultLoadPlanner(),
                    no_dist=no_dist,
                )
        except CheckpointException as e:  # a BaseException: never let it escape
            same = _same_error(e)
            if same is not None:  # surgery's own check failed alike on every failing rank
                raise same from None
            raise CheckpointError(_describe_failure(self.description, list(sd), e)) from None
        except Exception as e:
            raise CheckpointError(
                f"reading {_some(list(sd))} from the DCP checkpoint '{self.description}' failed "
                f"({type(e).__name__}: {e}); the folder is incomplete or corrupt. Nothing "
                "more was read."
            ) from None


_NOT_READ = "<a non-tensor DCP entry, not read>"


def _placeholder(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """A tensor of ``shape`` and ``dtype`` holding no memory: one element, expanded, with a
    storage of its own (two entries are never taken for one dict saved twice); on ``meta``
    for dtypes that cannot be allocated so (quantized)."""
    try:
        return torch.empty((), dtype=dtype).expand(shape)
    except (RuntimeError, TypeError):
        return torch.empty(shape, dtype=dtype, device="meta")


def _auto_container(tensors: dict[str, tuple[torch.Size, torch.dtype]]) -> str | None:
    tops = {k.split(".", 1)[0] for k in tensors if "." in k}
    if len(tops) < 2 or any("." not in k for k in tensors):
        return None
    model = [t for t in _MODEL_ENTRIES if t in tops]
    if len(model) == 1 and tops - {model[0]} <= _TRAINING_STATE:
        return model[0]
    return None


def _same_error(e: BaseException) -> SurgeryError | None:
    """The one SurgeryError every failing rank raised (the first rank's), if they agree."""
    failures = getattr(e, "failures", {}) or {}
    errors = [pair[0] if isinstance(pair, tuple) else pair for _, pair in sorted(failures.items())]
    if errors and all(isinstance(x, SurgeryError) for x in errors):
        if len({(type(x), str(x)) for x in errors}) == 1:
            return errors[0]
    return None


def _some(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _describe_failure(description: str, keys: list[str], e: BaseException) -> str:
    failures = getattr(e, "failures", {}) or {}
    per_rank = []
    for rank, pair in sorted(failures.items()):
        exc = pair[0] if isinstance(pair, tuple) else pair
        per_rank.append(f"    rank {rank}: {type(exc).__name__}: {str(exc).strip()[:300]}")
    return (
        f"torch.distributed.checkpoint failed loading {len(keys)} tensors ({_some(keys)}) from "
        f"'{description}':\n"
        + ("\n".join(per_rank) or f"    {e}")
        + "\nThe folder is incomplete or corrupt, or was written for other shapes; check it "
        "with `surgery inspect`."
    )
