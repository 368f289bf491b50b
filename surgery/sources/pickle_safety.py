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
    missing: list[Missing] = []
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


# A global the unpickler could not find: its module, its name, and why (the exception).
Missing = tuple[str, str, BaseException]


def _recording(missing: list[Missing]) -> type:
    """An ``Unpickler`` that notes the global it could not find, for the error message."""

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                return super().find_class(module, name)
            except (AttributeError, ImportError) as e:
                missing.append((module, name, e))
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


def _load_error(path: Path, e: Exception, missing: list[Missing]) -> CheckpointError:
    if missing or isinstance(e, (AttributeError, ImportError)):
        # A whole pickled model whose class cannot be found.
        names = list(dict.fromkeys(f"{m}.{n}" for m, n, _ in missing))
        found = {f"{m}.{n}": (m, n, why) for m, n, why in missing}
        advice = " ".join(_class_advice(*found[k]) for k in names)
        err = CheckpointError(
            f"'{path}' holds a pickled object whose class cannot be imported "
            f"({', '.join(names) or e}). Pickle stores only the class's module and name, and "
            f"loading imports them. {advice or _first_line(str(e))} Once it loads, re-save "
            "the weights once, so that loading them needs no class: "
            "torch.save(torch.load(path, weights_only=False).state_dict(), 'weights.pth')."
        )
        err.globals = names
        return err
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return CheckpointError(f"cannot open checkpoint '{path}': {e}")
    detail = _first_line(str(e)) or type(e).__name__
    return CheckpointError(
        f"cannot read torch checkpoint '{path}' ({detail}): the file is truncated or corrupt, "
        "or not a checkpoint; download or save it again."
    )


def _class_advice(module: str, name: str, why: BaseException) -> str:
    """How to make ``module.name`` importable, from the import error alone (nothing is
    imported to explain it)."""
    if module == "__main__":
        return (
            f"__main__.{name}: the script that saved the file defined {name} itself (as "
            f"__main__); define or import {name} in the script that loads it, before loading "
            f"(e.g. from train import {name}, where train.py holds it)."
        )
    gone = getattr(why, "name", None) if isinstance(why, ModuleNotFoundError) else None
    if gone is not None and gone != module and not module.startswith(gone + "."):
        return (
            f"Importing '{module}' (for {module}.{name}) needs the module '{gone}', which is "
            "not installed: install it (pip install ...) in this environment."
        )
    if isinstance(why, ImportError):
        path = module.replace(".", "/")
        return (
            f"Python cannot find the module '{module}' ({module}.{name}): it is a file "
            f"{path}.py (or a folder {path}/) under a folder on sys.path. Run from the folder "
            f"that holds {module.split('.')[0]}, add that folder with sys.path.insert(0, "
            "'/path/to/folder') or PYTHONPATH, or install the package that provides it."
        )
    return (
        f"The module '{module}' imports but has no class '{name}': it was renamed or moved "
        f"since the file was saved. Define it there again, or alias the new one before "
        f"loading: import {module}; {module}.{name} = NewName."
    )


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else ""
