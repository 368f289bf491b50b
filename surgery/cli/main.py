"""The ``surgery`` command's parser and entry point."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

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


class _Parser(argparse.ArgumentParser):
    """argparse with a "did you mean" for a misspelt option (``--skp`` -> ``--skip``), which
    argparse before Python 3.14 lacks (and 3.14's ``suggest_on_error`` covers choices only).
    The hint is added in :meth:`error`, so every refusal gets it: an unknown option, and a
    required one missing because it was misspelt."""

    _given: list[str]

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        super().error(message + _did_you_mean(self, getattr(self, "_given", [])))


def _did_you_mean(parser: argparse.ArgumentParser, given: list[str]) -> str:
    """``'; --skp: did you mean --skip?'`` for each unknown option in ``given`` that is close
    to one the command takes (the subcommand's, for the top-level parser)."""
    known = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            command = next((a for a in given if a in action.choices), None)
            if command is not None:
                sub = action.choices[command]
                known |= set(sub._option_string_actions)
                given = getattr(sub, "_given", given)
    hints = []
    for arg in given:
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        if not name.startswith("-") or name in known or parser._negative_number_matcher.match(name):
            continue
        if sum(1 for k in known if k.startswith(name)) == 1:
            continue  # an abbreviation argparse accepts
        near = difflib.get_close_matches(name, [k for k in known if k.startswith("--")], n=1)
        if near:
            hints.append(f"{name}: did you mean {near[0]}?")
    return f" ({'; '.join(dict.fromkeys(hints))})" if hints else ""


class _Deprecated(argparse.Action):
    """An old spelling of an option: stores into the new one's ``dest`` and says so on stderr."""

    def __init__(self, *args: Any, new: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        print(f"surgery: {option} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _version() -> str:
    return f"surgery {__version__} (torch {torch.__version__}, {Path(__file__).parent.parent})"


def _reading() -> argparse.ArgumentParser:
    """The options of every command that reads a checkpoint (a parent parser)."""
    common = _Parser(add_help=False)
    common.add_argument("checkpoint", help="file, folder, or sharded *.index.json")
    common.add_argument("--entry", help="entry holding the state dict, e.g. 'ema' (dotted nests)")
    common.add_argument(  # its old name, as load_partial(key=) was
        "--key", dest="entry", action=_Deprecated, new="--entry", help=argparse.SUPPRESS
    )
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
    return common


def _loading() -> argparse.ArgumentParser:
    """The options of the commands that load into a model, diff and convert (a parent)."""
    loading = _Parser(add_help=False)
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
    return loading


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="surgery",
        # Raw: `--version` prints its path on one line, however narrow the terminal.
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Look inside checkpoints, dry-run loading them, match models by structure.",
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)
    common, loading = _reading(), _loading()
    pi = sub.add_parser("inspect", parents=[common], help="what a checkpoint holds")
    pi.add_argument(
        "--depth", type=positive_int, default=3, help="levels of the key tree to show (1 or more)"
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
    except BrokenPipeError:
        # The reader stopped early (`surgery inspect x | head`): end quietly, as `cat` does.
        # Python flushes stdout again at exit, so point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
