"""Shared builders for the tests: models, checkpoints in every form, spawned ranks, the
command line. Fixtures built on them live in ``tests/conftest.py``; tests import these
(``from support import SmallCNN``), never ``conftest``."""

from __future__ import annotations

from .checkpoints import FORMS, PREFIXES, save_as, save_dcp
from .cli import CliResult, run_cli
from .models import Renaming, SmallCNN, Tied, resnet18_state
from .ranks import spawn
from .state import assert_same_state, snapshot

__all__ = [
    "FORMS",
    "PREFIXES",
    "CliResult",
    "Renaming",
    "SmallCNN",
    "Tied",
    "assert_same_state",
    "resnet18_state",
    "run_cli",
    "save_as",
    "save_dcp",
    "snapshot",
    "spawn",
]
