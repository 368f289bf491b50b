"""The command's arguments, checked and parsed; the checkpoint they name; printing escaped text."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from .._text import escape_control
from ..adapters import adapt_shapes
from ..errors import UsageError
from ..sources import CheckpointSource, open_source

__all__ = [
    "count",
    "emit",
    "load_remap",
    "on_mismatch",
    "open_checkpoint",
    "parse_input_shape",
    "parse_remap",
    "positive_int",
    "regexes",
]


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def parse_remap(rules: list[str] | None) -> list[tuple[str, str | None]] | None:
    if not rules:
        return None
    out: list[tuple[str, str | None]] = []
    for rule in rules:
        if "=" not in rule:
            raise UsageError(
                f"--remap {rule!r} must look like REGEX=REPLACEMENT (e.g. '^backbone\\.=')"
            )
        pattern, repl = rule.split("=", 1)
        try:
            re.compile(pattern)
        except re.error as e:
            raise UsageError(f"--remap {rule!r}: {pattern!r} is not a valid regex ({e})") from None
        out.append((pattern, repl))
    return out


def load_remap(args: argparse.Namespace) -> list[tuple[str, str | None]] | None:
    """The ``remap=`` of --drop REGEX (dropped keys) then --remap REGEX=REPL rules."""
    remap: list[tuple[str, str | None]] = [(rx, None) for rx in regexes(args.drop, "--drop")]
    remap += parse_remap(args.remap) or []
    return remap or None


def on_mismatch(args: argparse.Namespace) -> Any:
    """``on_mismatch=`` for --on-mismatch: 'skip', 'error', or 'adapt' (surgery.adapt_shapes)."""
    return adapt_shapes if args.on_mismatch == "adapt" else args.on_mismatch


def parse_input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input {text!r} must be a shape like 1,3,224,224")
    return shape


def regexes(patterns: list[str] | None, flag: str) -> list[str]:
    for pattern in patterns or ():
        try:
            re.compile(pattern)
        except re.error as e:
            raise UsageError(f"{flag} {pattern!r} is not a valid regex ({e})") from None
    return list(patterns or ())


def open_checkpoint(args: argparse.Namespace) -> CheckpointSource:
    """The checkpoint the command names, read as its options say."""
    return open_source(
        args.checkpoint,
        entry=args.entry,
        trust_pickle=args.trust_pickle,
        allow_globals=args.allow_globals,
    )


def emit(text: str, file: Any = None) -> None:
    """Print text whose names from a file are escaped already (reports, messages): control
    characters escaped again, its own lines kept."""
    print(escape_control(text, keep="\n"), file=file or sys.stdout)
