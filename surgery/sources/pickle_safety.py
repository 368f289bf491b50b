"""``torch.load`` with ``weights_only`` and a clear word for each way unpickling fails.

Pickles can run arbitrary code, so torch files are loaded with ``weights_only=True`` unless the
caller passes ``trust_pickle=True``. torch words every refusal alike; this module tells a file
holding pickled Python objects (named, with the fix) from a corrupt file, and a whole pickled
model whose class is gone from both.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UnsafeCheckpointError

__all__ = ["SAFE_GLOBALS", "is_torchscript", "torch_load"]

# Globals weights-only loading accepts beyond torch's own, for this load only (a context, not
# a process-wide registration). Each is plain data that runs no code when unpickled:
# - argparse.Namespace: timm's train.py saves its arguments as ``args``; timm's own loader
#   allows it the same way. Unpickling sets attributes on an empty Namespace, nothing more.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def torch_load(path: Path, *, trust_pickle: bool, mmap: bool) -> Any:
    """``torch.load(path)`` on CPU, weights-only unless ``trust_pickle``; failures classified.

    Raises :class:`UnsafeCheckpointError` naming the pickled globals weights-only loading
    refused, or :class:`CheckpointError` saying whether the file is corrupt or a pickled
    object's class cannot be imported.
    """
    if is_torchscript(path):
        if not trust_pickle:
            raise _torchscript_error(path)
        try:
            with warnings.catch_warnings():  # asked for explicitly: no deprecation notice
                warnings.filterwarnings("ignore", r".*torch\.jit\.load.*", DeprecationWarning)
                warnings.filterwarnings("ignore", r".*torch\.jit\.load.*", FutureWarning)
                return torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # a custom op or class this torch lacks, or a broken archive
            raise CheckpointError(
                f"'{path}' is a TorchScript archive that torch.jit.load could not load "
                f"({_first_line(str(e)) or type(e).__name__}). Load it where the module's "
                "custom ops and classes are available and save its state_dict()."
            ) from None
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols 4/5; a failure is explained below instead.
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            if trust_pickle:
                return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # the unpickler raises anything on junk; classify it below
        _forget_pending_sparse()
        raise _load_error(path, e, trust_pickle) from None


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``): a zip with ``code/``.

    Example:
        >>> is_torchscript(Path("model.pt"))  # doctest: +SKIP
        True
    """
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") or "/code/__torch__/" in n for n in names)


def _torchscript_error(path: Path) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"'{path}' is a TorchScript archive (saved with torch.jit.save): a compiled module with "
        "its code, not a plain state dict. Loading it runs that module's TorchScript code, so "
        "weights-only loading refuses it. If you trust this file, pass trust_pickle=True (it "
        "is then read with torch.jit.load), or take the weights yourself with "
        "torch.jit.load(path).state_dict()."
    )


def _forget_pending_sparse() -> None:
    """Drop the sparse tensors a failed load queued for validation in torch's module state.

    torch checks sparse tensors after unpickling; a load that fails midway leaves them queued
    (views of a file mapping), and the next load would touch them, even after that file changed.
    """
    pending = getattr(torch._utils, "_sparse_tensors_to_validate", None)
    if isinstance(pending, list):
        pending.clear()


def _load_error(path: Path, e: Exception, trust_pickle: bool) -> CheckpointError:
    msg = str(e)
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in msg:
        # torch words every weights-only failure alike; only named globals mean "unsafe".
        names = _unsafe_globals(path, msg)
        if names:
            return _unsafe_error(path, names)
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", msg)
        msg = detail.group(1).strip() if detail else "not a pickle torch can read"
    protocol = _pickle_protocol(path)
    if not trust_pickle and protocol >= 4 and "Unsupported operand" in msg:
        return CheckpointError(
            f"'{path}' was saved with pickle protocol {protocol}, which torch's weights-only "
            "loader cannot read. If you trust the file, pass trust_pickle=True (it is then "
            "unpickled without limits) and re-save it with torch.save's default protocol or as "
            "safetensors."
        )
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


def _pickle_protocol(path: Path) -> int:
    """The pickle protocol of a torch file's data pickle (0 when unknown)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return 0
                with zf.open(name) as f:
                    head = f.read(2)
        else:
            with open(path, "rb") as f:
                head = f.read(2)
    except Exception:  # a broken file has no protocol to report
        return 0
    return head[1] if len(head) == 2 and head[0] == 0x80 else 0


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
