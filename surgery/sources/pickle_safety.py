"""Trusted loading: the one place surgery lets a pickle run code, only with ``trust_pickle=True``.

Without ``trust_pickle`` every torch file and pickle is read by surgery's own restricted
unpickler (:mod:`.torchformat`). With it, a file is loaded as its own library would:
``torch.load(weights_only=False)``, ``torch.jit.load`` for TorchScript archives, ``pickle.load``
for a raw pickle. Failures are classified here: a pickled object whose class cannot be imported
is named (the names are kept on the error as ``globals``), anything else is a corrupt file.
"""

from __future__ import annotations

import pickle
import types
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .torchformat import is_torchscript, zip_names

__all__ = ["trusted_load"]


def trusted_load(path: Path, kind: str, *, mmap: bool) -> Any:
    """What ``path`` (a torch file of ``kind``, see :func:`~.torchformat.sniff`) holds, loaded
    with its code run: the caller passed ``trust_pickle=True``.

    Example:
        >>> model = trusted_load(Path("whole_model.pt"), "zip", mmap=True)  # doctest: +SKIP
    """
    if kind == "zip" and is_torchscript(zip_names(path)):
        return _jit_load(path)
    missing: list[str] = []
    try:
        if kind == "pickle":
            with open(path, "rb") as f:
                return _recording(missing)(f, encoding="latin1").load()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            return torch.load(
                path,
                map_location="cpu",
                weights_only=False,
                mmap=mmap and kind == "zip",
                pickle_module=types.SimpleNamespace(
                    __name__="pickle", Unpickler=_recording(missing), load=pickle.load
                ),
            )
    except Exception as e:  # the unpickler raises anything on junk; classify it below
        raise _load_error(path, e, missing) from None


def _recording(missing: list[str]) -> type:
    """An ``Unpickler`` that notes the global it could not find, for the error message."""

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                return super().find_class(module, name)
            except (AttributeError, ImportError):
                missing.append(f"{module}.{name}")
                raise

    return Recording


def _jit_load(path: Path) -> Any:
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


def _load_error(path: Path, e: Exception, missing: list[str]) -> CheckpointError:
    if missing or isinstance(e, (AttributeError, ImportError)):
        # A whole pickled model whose class cannot be found.
        err = CheckpointError(
            f"'{path}' holds a pickled object whose class cannot be imported "
            f"({', '.join(missing) or e}). Pickle stores only the class's module and name: "
            "import or define that class (under the same module name) before loading, or "
            "re-save the checkpoint as a state dict with torch.save(model.state_dict(), path)."
        )
        err.globals = list(dict.fromkeys(missing))
        return err
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return CheckpointError(f"cannot open checkpoint '{path}': {e}")
    detail = _first_line(str(e)) or type(e).__name__
    return CheckpointError(
        f"cannot read torch checkpoint '{path}' ({detail}): the file is truncated or corrupt, "
        "or not a checkpoint; download or save it again."
    )


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else ""
