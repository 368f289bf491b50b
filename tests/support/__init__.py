"""Shared builders for the tests: models, checkpoints in every form, spawned ranks, the
command line. Fixtures built on them live in ``tests/conftest.py``; tests import these
(``from support import SmallCNN``), never ``conftest``."""

from __future__ import annotations

from .checkpoints import FORMS, PREFIXES, save_as, save_dcp
from .cli import CliResult, run_cli
from .models import Renaming, SmallCNN, Tied, resnet18_state
from .ranks import spawn
from .refusals import OUTSIDE, assert_load_refused, check_entry_points
from .state import assert_same_state, snapshot

__all__ = [
    "FORMS",
    "OUTSIDE",
    "PREFIXES",
    "CliResult",
    "Renaming",
    "SmallCNN",
    "Tied",
    "assert_load_refused",
    "assert_same_state",
    "check_entry_points",
    "resnet18_state",
    "run_cli",
    "save_as",
    "save_dcp",
    "snapshot",
    "spawn",
]
