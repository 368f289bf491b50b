"""The ``surgery`` command's parser and entry point."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from .. import __version__
from ..errors import SurgeryError, UsageError
from .advice import message
from .commands import cmd_diff, cmd_match
from .convert import add_convert_parser, cmd_convert
from .inspect import cmd_inspect
from .options import emit, positive_int

__all__ = ["main"]


@contextlib.contextmanager
def _user_modules(imports: Sequence[str]) -> Iterator[None]:
    """The current directory importable (as under ``python -m``), then each --import module
    imported; classes they define stand in for ``__main__``'s where a pickle names those."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    main = sys.modules.get("__main__")
    aliased: list[str] = []
    try:
        for name in imports:
            try:
                module = importlib.import_module(name)
            except Exception as e:
                raise UsageError(
                    f"--import {name}: cannot import it ({type(e).__name__}: {e}); run from the "
                    "folder that holds it, or install it"
                ) from None
            for attr, obj in vars(module).items():
                if (
                    main is not None
                    and isinstance(obj, type)
                    and obj.__module__ == module.__name__
                    and not hasattr(main, attr)
                ):
                    setattr(main, attr, obj)
                    aliased.append(attr)
        yield
    finally:
        for attr in aliased:
            delattr(main, attr)
        if added:
            sys.path.remove(cwd)


def _version() -> str:
    return f"surgery {__version__} (torch {torch.__version__}, {Path(__file__).parent.parent})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="surgery",
        # Raw: `--version` prints its path on one line, however narrow the terminal.
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Look inside checkpoints, dry-run loading them, match models by structure.",
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("checkpoint", help="file, folder, or sharded *.index.json")
    common.add_argument("--key", help="entry holding the state dict, e.g. 'ema' (dotted nests)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow arbitrary pickled objects (only for files you trust)",
    )
    common.add_argument(
        "--allow-global",
        dest="allow_globals",
        action="append",
        default=[],
        metavar="MODULE.NAME",
        help="let safe loading read objects of this class (repeatable), for plain data you "
        "trust, e.g. omegaconf.dictconfig.DictConfig; nothing else in the file runs",
    )
    common.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (repeatable), so that classes a pickled checkpoint names "
        "resolve; classes it defines also stand in for a training script's __main__ classes",
    )
    pi = sub.add_parser("inspect", parents=[common], help="what a checkpoint holds")
    pi.add_argument(
        "--depth", type=positive_int, default=3, help="levels of the key tree to show (1 or more)"
    )
    loading = argparse.ArgumentParser(add_help=False)  # diff and convert load into a model
    loading.add_argument(
        "--model", required=True, help="torchvision:NAME, timm:NAME or module.path:factory"
    )
    loading.add_argument("--num-classes", type=positive_int, help="passed to the model factory")
    loading.add_argument(
        "--remap",
        action="append",
        metavar="REGEX=REPL",
        help="rename checkpoint keys (repeatable), e.g. '^backbone\\.='",
    )
    loading.add_argument(
        "--skip",
        action="append",
        metavar="GLOB",
        help="model keys not to load (repeatable), e.g. 'fc.*'",
    )
    loading.add_argument(
        "--drop",
        action="append",
        metavar="REGEX",
        help="checkpoint keys not to load (repeatable), e.g. '^fc\\.'",
    )
    loading.add_argument("--no-prefix", action="store_true", help="turn off prefix detection")
    loading.add_argument(
        "--on-mismatch",
        choices=["skip", "error", "adapt"],
        default="skip",
        help="a checkpoint tensor whose shape differs from the model's: skip it (default), "
        "fail, or adapt it with surgery.adapt_shapes (input channels, position grids)",
    )
    sub.add_parser("diff", parents=[common, loading], help="dry-run load into a model")
    pm = sub.add_parser(
        "match", help="pair the tensors of two models by structure (names may all differ)"
    )
    pm.add_argument("source", help="model the checkpoint is for: torchvision:NAME, timm:NAME, ...")
    pm.add_argument("model", help="model to load into: torchvision:NAME, timm:NAME, ...")
    pm.add_argument("--input", required=True, help="example input shape, e.g. 1,3,224,224")
    pm.add_argument("--input-dtype", choices=["float32", "int64"], default="float32")
    pm.add_argument("--num-classes", type=int, help="passed to the model's factory")
    pm.add_argument("--source-num-classes", type=int, help="passed to the source's factory")
    pm.add_argument("--rules", action="store_true", help="also print the regex rules")
    pm.add_argument("--json", action="store_true", help="machine-readable output")
    add_convert_parser(sub, [common, loading])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``surgery`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "inspect": cmd_inspect,
        "diff": cmd_diff,
        "match": cmd_match,
        "convert": cmd_convert,
    }
    try:
        with _user_modules(getattr(args, "imports", [])):
            return commands[args.command](args)
    except SurgeryError as e:
        emit(f"surgery {args.command}: error: {message(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
