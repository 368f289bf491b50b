"""Refused loads leave the model bit-identical: the checks that hostile-input tests, the fuzz
tests and the atheris harness (``tests/fuzz/``) share."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import pytest
from torch import nn

import surgery
from surgery import cli
from surgery.errors import SurgeryError

from .state import assert_same_state, snapshot

__all__ = ["OUTSIDE", "assert_load_refused", "check_entry_points"]

# The value tests put in files outside a checkpoint's folder: a tensor holding it was read there.
OUTSIDE = 7


def assert_load_refused(
    model: nn.Module,
    ckpt: object,
    match: str | None = None,
    error: type[SurgeryError] = SurgeryError,
    **kwargs: object,
) -> SurgeryError:
    """``load_partial(model, ckpt, **kwargs)`` raises ``error`` matching ``match`` and leaves
    every tensor of ``model`` bit-identical; the error, for more checks."""
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        surgery.load_partial(model, ckpt, **kwargs)
    assert_same_state(model, before)
    return info.value


def check_entry_points(path: Path, model: nn.Module) -> None:
    """``read_checkpoint``, ``load_partial`` into ``model`` and ``surgery inspect`` on
    ``path``: each succeeds or raises a ``SurgeryError`` (inspect exits 0 or 2), a refused
    load leaves ``model`` bit-identical, and no tensor read holds :data:`OUTSIDE`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(SurgeryError):
            sd = surgery.read_checkpoint(path)
            assert not any(bool((t == OUTSIDE).any()) for t in sd.values()), (
                "values read from outside the checkpoint's folder"
            )
        before = snapshot(model)
        try:
            surgery.load_partial(model, path, strict=False)
        except SurgeryError:
            assert_same_state(model, before)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["inspect", str(path)])
        assert code in (0, 2), f"surgery inspect exited {code}: {err.getvalue()}"
