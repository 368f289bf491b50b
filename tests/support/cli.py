"""Running the ``surgery`` command in-process, its exit status and output captured."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from surgery.cli import main

__all__ = ["CliResult", "run_cli"]


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> CliResult:
    """``surgery ARGV...`` through :func:`surgery.cli.main`: its exit status (argparse's
    ``SystemExit`` included) with what it printed to stdout and stderr."""
    capsys.readouterr()  # what came before is not this command's
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse: --help, --version, refused arguments
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)
