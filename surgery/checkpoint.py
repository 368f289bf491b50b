"""Reading checkpoints in every common form, lazily.

Everything here produces a *source*: the tensor names with their shapes and dtypes (read from
file headers, no tensor data touched) and a way to read one tensor at a time, straight into a
destination when the file layout allows it. ``read_checkpoint`` is the public face; the
loader uses the sources directly so that skipped tensors are never read.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError, UnsafeCheckpointError
from .hub import hub_file, is_hub_name

__all__ = ["CheckpointSource", "read_checkpoint"]

CheckpointLike = str | os.PathLike | Mapping[str, Any] | nn.Module

# Entries that training scripts use to hold the model's state dict, most obvious first.
# EMA weights are deliberately absent: they are picked with key="ema" (or its real name).
_CONTAINER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "model_state",
    "params",
    "weights",
)

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "U16": getattr(torch, "uint16", None),
    "U32": getattr(torch, "uint32", None),
    "U64": getattr(torch, "uint64", None),
}

# Linux caps a single read at just under 2 GiB.
_MAX_READ = 1 << 30


class CheckpointSource:
    """Tensor names with shapes/dtypes, readable one at a time.

    ``specs`` maps each key to ``(shape, dtype)`` without reading data. ``read(key)`` returns a
    tensor (possibly a lazy memory-mapped view); ``read_into(key, out)`` fills ``out`` (same
    shape, any dtype/device), reading the bytes straight into ``out`` when possible.
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self.specs: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self.notes: list[str] = []
        # key -> (file path, byte offset) for tensors stored contiguously in a plain file.
        self._offsets: dict[str, tuple[str, int]] = {}
        self._files: dict[str, Any] = {}
        # Where the state dict sat inside the file (e.g. ['state_dict']) and the other
        # top-level entries beside it (e.g. ['epoch', 'optimizer']).
        self.container: list[str] = []
        self.other_entries: list[str] = []
        # What a torch state dict holds beside tensors, for modules that load themselves:
        # non-tensor entries (a dynamically quantized Linear's packed weights and dtype, a
        # dict extra state) and the per-module versions torch keeps in ``_metadata``.
        self.extras: dict[str, Any] = {}
        self.metadata: dict[str, dict] | None = None

    def read(self, key: str) -> Tensor:
        raise NotImplementedError

    def read_into(self, key: str, out: Tensor) -> None:
        """Copy tensor ``key`` into ``out`` (which has its shape), holding at most one temp."""
        shape, dtype = self.specs[key]
        if out.numel() == 0:
            return
        loc = self._offsets.get(key)
        if loc is None:
            out.copy_(self.read(key))
            return
        direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
        buf = out if direct else torch.empty(shape, dtype=dtype)
        f = self._files.get(loc[0])
        if f is None:
            f = self._files[loc[0]] = open(loc[0], "rb", buffering=0)
        _read_into(f, loc[1], buf, self.description)
        if not direct:
            out.copy_(buf)

    def close(self) -> None:
        """Release file handles and mappings (tensors already read stay valid)."""
        while self._files:
            self._files.popitem()[1].close()


class _MemorySource(CheckpointSource):
    def __init__(self, state: Mapping[str, Any], description: str) -> None:
        super().__init__(description)
        tensors, self.extras, self.metadata = _split_state(state)
        self._tensors = tensors
        self.specs = {k: (t.shape, t.dtype) for k, t in tensors.items()}

    def read(self, key: str) -> Tensor:
        return self._tensors[key]


class _TorchFileSource(_MemorySource):
    """A ``torch.save`` file: unpickled lazily with ``mmap=True``, read by byte offset."""

    def __init__(self, path: Path, *, key: str | None, trust_pickle: bool, mmap: bool) -> None:
        obj, used_mmap, notes = _torch_load(path, trust_pickle=trust_pickle, mmap=mmap)
        state, container = _unwrap(obj, key, str(path))
        super().__init__(state, str(path) + _suffix(container))
        self.container = container
        self.other_entries = _others(obj, container)
        self.notes.extend(notes)
        if used_mmap:
            offsets = _storage_file_offsets(path, self._tensors)
            if offsets is None:
                self.notes.append(
                    f"{path.name}: could not map tensors to file offsets; copying through mmap"
                )
            else:
                self._offsets = {k: (str(path), off) for k, off in offsets.items()}


class _SafetensorsSource(CheckpointSource):
    """A ``.safetensors`` file: header parsed once, tensors read by offset or via ``safe_open``."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        from safetensors import SafetensorError, safe_open

        try:
            # safe_open validates the header and that the data covers every tensor.
            self._handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"cannot read safetensors file '{path}': {e}. The file is truncated or corrupt; "
                "download or save it again."
            ) from None
        header, data_start = _safetensors_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(
                    f"'{path}': tensor '{name}' has dtype {info['dtype']}, which this torch "
                    "cannot hold"
                )
            self.specs[name] = (torch.Size(info["shape"]), dtype)
            self._offsets[name] = (str(path), data_start + int(info["data_offsets"][0]))

    def read(self, key: str) -> Tensor:
        return self._handle.get_tensor(key)

    def close(self) -> None:
        self._handle = None
        super().close()


class _ShardedSource(CheckpointSource):
    """A sharded checkpoint described by ``*.index.json`` (``weight_map``: key -> file)."""

    def __init__(self, index: Path, *, trust_pickle: bool, mmap: bool) -> None:
        super().__init__(str(index))
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"'{index}' is not a sharded-checkpoint index (expected a JSON object with a "
                f"'weight_map' of key -> shard file): {e}"
            ) from None
        self._owner: dict[str, CheckpointSource] = {}
        shards: dict[str, CheckpointSource] = {}
        for name, shard in weight_map.items():
            if shard not in shards:
                shard_path = index.parent / shard
                if not shard_path.is_file():
                    raise CheckpointError(
                        f"shard '{shard}' listed in '{index}' (for '{name}') does not exist in "
                        f"{index.parent}; download every shard next to the index"
                    )
                shards[shard] = _open_file(
                    shard_path, key=None, trust_pickle=trust_pickle, mmap=mmap
                )
            src = shards[shard]
            if name not in src.specs:
                raise CheckpointError(
                    f"'{index}' maps '{name}' to '{shard}', but that shard has no such tensor; "
                    "the index and the shards do not belong together"
                )
            self._owner[name] = src
            self.specs[name] = src.specs[name]
            if name in src._offsets:
                self._offsets[name] = src._offsets[name]
        for src in shards.values():
            self.notes.extend(src.notes)
        self._shards = shards

    def read(self, key: str) -> Tensor:
        return self._owner[key].read(key)

    def close(self) -> None:
        for src in self._shards.values():
            src.close()
        super().close()


def open_source(
    src: CheckpointLike, *, key: str | None = None, trust_pickle: bool = False, mmap: bool = True
) -> CheckpointSource:
    """Open anything ``read_checkpoint`` accepts as a lazy :class:`CheckpointSource`."""
    if isinstance(src, CheckpointSource):
        return src
    if isinstance(src, nn.Module):
        sd = src.state_dict(keep_vars=False)
        return _MemorySource(sd, f"<{type(src).__name__} module>")
    if isinstance(src, Mapping):
        state, container = _unwrap(src, key, "<dict>")
        source = _MemorySource(state, "<dict>" + _suffix(container))
        source.container = container
        source.other_entries = _others(src, container)
        return source
    if isinstance(src, str) and is_hub_name(src) and not os.path.exists(src):
        # Hub names (hf-hub:, timm:, torchvision:) -> a cached local file; see surgery/hub.py.
        src = hub_file(src)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src).expanduser()
        if path.is_dir():
            path = _pick_in_folder(path)
        elif not path.exists():
            raise CheckpointError(f"checkpoint '{path}' does not exist")
        return _open_file(path, key=key, trust_pickle=trust_pickle, mmap=mmap)
    raise CheckpointError(
        f"cannot read a checkpoint from a {type(src).__name__}; pass a file path, a folder, "
        "a dict of tensors or an nn.Module"
    )


def read_checkpoint(
    src: CheckpointLike,
    *,
    key: str | None = None,
    trust_pickle: bool = False,
    mmap: bool = True,
) -> dict[str, Tensor]:
    """Read a checkpoint into a flat ``{name: tensor}`` state dict.

    Accepts ``.pt/.pth/.bin/.ckpt/.tar`` (``torch.load(weights_only=True)``), ``.safetensors``,
    a sharded ``*.index.json``, a folder holding one of these, a hub name
    (``hf-hub:org/name``, ``timm:NAME``, ``torchvision:WEIGHTS``; see :func:`hub_file`), a
    mapping or an ``nn.Module``.
    Training checkpoints are unwrapped (``state_dict``, ``model``, ``module``, ...); ``key``
    picks an entry explicitly (dotted for nesting, e.g. ``key="ema"``). Arbitrary pickled
    objects are refused unless ``trust_pickle=True``. With ``mmap=True`` tensors are lazy views
    of the file.

    Example:
        >>> sd = surgery.read_checkpoint("runs/last.ckpt", key="state_dict")  # doctest: +SKIP
    """
    source = open_source(src, key=key, trust_pickle=trust_pickle, mmap=mmap)
    return {k: source.read(k) for k in source.specs}


# --------------------------------------------------------------------------- files


def _open_file(path: Path, *, key: str | None, trust_pickle: bool, mmap: bool) -> CheckpointSource:
    name = path.name.lower()
    if name.endswith(".index.json"):
        if key is not None:
            raise CheckpointError(f"key={key!r} does not apply to the sharded checkpoint '{path}'")
        return _ShardedSource(path, trust_pickle=trust_pickle, mmap=mmap)
    kind = "safetensors" if name.endswith(".safetensors") else None
    if kind is None and not name.endswith(_TORCH_SUFFIXES):
        kind = _sniff(path)
    if kind == "safetensors":
        if key is not None:
            raise CheckpointError(
                f"key={key!r} does not apply to '{path}': a safetensors file is a flat tensor dict"
            )
        return _SafetensorsSource(path)
    return _TorchFileSource(path, key=key, trust_pickle=trust_pickle, mmap=mmap)


def _sniff(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint '{path}': {e}") from None
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "torch"


def _pick_in_folder(folder: Path) -> Path:
    """The one checkpoint in a folder: an index first, safetensors before pickles."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for pattern in (".safetensors.index.json", ".index.json", ".safetensors", *_TORCH_SUFFIXES):
        found = [p for p in files if p.name.lower().endswith(pattern)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise CheckpointError(
                f"folder '{folder}' holds several checkpoints ({names}); pass the file path"
            )
    raise CheckpointError(
        f"folder '{folder}' holds no checkpoint (looked for *.index.json, *.safetensors, "
        f"{', '.join('*' + s for s in _TORCH_SUFFIXES)})"
    )


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _torch_load(path: Path, *, trust_pickle: bool, mmap: bool) -> tuple[Any, bool, list[str]]:
    """``torch.load`` with clear errors; returns (object, mmap used, notes)."""
    notes: list[str] = []
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint '{path}': {e}") from None
    if magic == b"PK\x03\x04" and not is_zip:
        raise CheckpointError(
            f"cannot read torch checkpoint '{path}': it starts like a torch zip file but its "
            "directory at the end is missing, so the file is truncated; download or save it again."
        )
    if not is_zip and mmap:
        mmap = False
        notes.append(
            f"{path.name}: legacy (non-zip) torch format cannot be memory-mapped; loaded "
            "into memory. Re-save with torch.save to load it lazily."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except Exception as e:  # the unpickler raises anything on junk; classify it below
        raise _load_error(path, e, trust_pickle) from None
    return obj, mmap, notes


def _load_error(path: Path, e: Exception, trust_pickle: bool) -> CheckpointError:
    msg = str(e)
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in msg:
        # torch words every weights-only failure alike; only named globals mean "unsafe".
        names = _unsafe_globals(path, msg)
        if names:
            return _unsafe_error(path, names)
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", msg)
        msg = detail.group(1).strip() if detail else "not a pickle torch can read"
    if trust_pickle and isinstance(e, (AttributeError, ImportError)):
        # A whole pickled model whose class cannot be found.
        return CheckpointError(
            f"'{path}' holds a pickled object whose class cannot be imported ({e}). Pickle "
            "stores only the class's module and name: import or define that class (under the "
            "same module name) before loading, or re-save the checkpoint as a state dict with "
            "torch.save(model.state_dict(), path)."
        )
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return CheckpointError(f"cannot open checkpoint '{path}': {e}")
    detail = _first_line(msg) or type(e).__name__
    return CheckpointError(
        f"cannot read torch checkpoint '{path}' ({detail}): the file is truncated or corrupt, "
        "or not a checkpoint; download or save it again."
    )


def _unsafe_globals(path: Path, msg: str) -> list[str]:
    names = _UNSAFE_GLOBAL.findall(msg)
    getter = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if getter is not None and zipfile.is_zipfile(path):
        try:
            names = list(getter(str(path))) or names
        except Exception:
            pass
    return names


def _unsafe_error(path: Path, names: list[str]) -> UnsafeCheckpointError:
    what = ", ".join(names)
    return UnsafeCheckpointError(
        f"'{path}' contains pickled Python objects ({what}) that weights_only loading refuses: "
        "unpickling them can run arbitrary code. If you trust this file, pass "
        "trust_pickle=True; better, re-save it once as a plain state dict "
        "(torch.save(model.state_dict(), path)) or as safetensors."
    )


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else ""


# --------------------------------------------------------------------------- unwrapping


def _is_tensor_dict(obj: Any) -> bool:
    """A state dict: tensors and modules' extra states (keys ending ``_extra_state``), or
    what ``Module.state_dict()`` made (it keeps a ``_metadata`` of module versions) with
    other non-tensor entries (packed weights) among its tensors."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    if all(isinstance(v, Tensor) or str(k).endswith("_extra_state") for k, v in obj.items()):
        return any(isinstance(v, Tensor) for v in obj.values())
    return isinstance(getattr(obj, "_metadata", None), Mapping) and any(
        isinstance(v, Tensor) for v in obj.values()
    )


def _split_state(
    state: Mapping[str, Any],
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, dict] | None]:
    """Tensors, non-tensor entries, and torch's ``_metadata`` of a state dict."""
    tensors: dict[str, Tensor] = {}
    extras: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, Tensor):
            tensors[k] = v
        else:
            extras[k] = v
    metadata = getattr(state, "_metadata", None)
    return tensors, extras, dict(metadata) if isinstance(metadata, Mapping) else None


def _describe(v: Any) -> str:
    if isinstance(v, Mapping):
        return f"dict of {len(v)}"
    return type(v).__name__


def _suffix(container: list[str]) -> str:
    return "".join(f"[{p!r}]" for p in container)


def _others(obj: Any, container: list[str]) -> list[str]:
    if not container or not isinstance(obj, Mapping):
        return []
    return [str(k) for k in obj if str(k) != container[0]]


def _unwrap(obj: Any, key: str | None, where: str) -> tuple[Mapping[str, Any], list[str]]:
    """Find the state dict inside a loaded object; returns it and the entry path to it."""
    path: list[str] = []
    if key is not None:
        obj, path = _pick(obj, key, where)
    found, inner = _find_state_dict(obj, where, explicit=key is not None)
    path += inner
    return found, path


def _pick(obj: Any, key: str, where: str) -> tuple[Any, list[str]]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"key={key!r} given, but {where} holds a {_describe(obj)}, not a dict"
        )
    if key in obj:
        return obj[key], [key]
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in obj and isinstance(obj[head], Mapping):
            inner, path = _pick(obj[head], ".".join(parts[i:]), where)
            return inner, [head, *path]
    entries = ", ".join(f"'{k}' ({_describe(v)})" for k, v in list(obj.items())[:20])
    raise CheckpointError(f"{where} has no entry {key!r}; its entries are: {entries}")


def _find_state_dict(obj: Any, where: str, *, explicit: bool) -> tuple[Mapping, list[str]]:
    if isinstance(obj, nn.Module):
        return obj.state_dict(), []
    if _is_tensor_dict(obj):
        return obj, []
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{where} holds a {_describe(obj)}, not a state dict. Save the model's "
            "state_dict() instead."
        )
    if not obj:
        raise CheckpointError(f"{where} is empty: it holds no tensors")
    # Entries leading to a state dict, one level of nesting included ({'model': {'module': sd}}).
    candidates: dict[str, tuple[Mapping, list[str]]] = {}
    for k, v in obj.items():
        if isinstance(v, nn.Module):
            candidates[str(k)] = (v.state_dict(), [str(k)])
        elif _is_tensor_dict(v):
            candidates[str(k)] = (v, [str(k)])
        elif isinstance(v, Mapping) and not any(isinstance(x, Tensor) for x in v.values()):
            for k2 in _CONTAINER_KEYS:
                if _is_tensor_dict(v.get(k2)):
                    candidates[str(k)] = (v[k2], [str(k), k2])
                    break
    for k in _CONTAINER_KEYS:
        if k in candidates:
            return candidates[k]
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if len(candidates) > 1:
        listing = ", ".join(f"'{k}' ({len(v[0])} tensors)" for k, v in candidates.items())
        raise CheckpointError(
            f"{where} holds several tensor dicts: {listing}. None is the obvious model state; "
            f"pass key= to choose one, e.g. key={next(iter(candidates))!r}"
        )
    bad = [(k, v) for k, v in obj.items() if not isinstance(v, Tensor)]
    if len(bad) < len(obj):
        listing = ", ".join(f"'{k}' ({_describe(v)})" for k, v in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise CheckpointError(
            f"{where} mixes tensors with non-tensor values: {listing}{more}. A state dict holds "
            "only tensors; remove those entries or pass key= to pick the tensor dict"
        )
    entries = ", ".join(f"'{k}' ({_describe(v)})" for k, v in list(obj.items())[:20])
    hint = "" if explicit else " Pass key= to pick the entry that holds the weights."
    raise CheckpointError(f"found no tensors in {where}; its entries are: {entries}.{hint}")


# --------------------------------------------------------------------------- byte offsets


def _zip_records(path: Path) -> dict[int, int]:
    """Data offset -> size of every stored (uncompressed) record of a torch zip file."""
    out: dict[int, int] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED or "/data/" not in info.filename:
                continue
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
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


def _read_into(f: Any, offset: int, out: Tensor, description: str) -> None:
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
