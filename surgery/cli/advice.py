"""Errors worded for the command line: a library fix (``entry='ema'``) as this command's flag
(``--entry 'ema'``), a refused pickle explained from the class names it holds."""

from __future__ import annotations

import argparse

from .._text import escape_control
from ..errors import UNSET, CheckpointError, Fix, SurgeryError, UnsafeCheckpointError

__all__ = ["flag", "message"]


def flag(fix: Fix) -> str:
    """A fix the library words as a Python argument (``entry='ema'``), as this command's flag
    (``--entry 'ema'``); a fix no flag can give is shown as the library words it. Values come
    from files (key names in a pattern): control characters are escaped, so a key holding a
    newline cannot add a line to the message."""
    return escape_control(_flag(fix))


def _flag(fix: Fix) -> str:
    option, value = fix.option, fix.value
    if option in ("entry", "key"):
        return "--entry" if value is UNSET else f"--entry {value!r}"
    if option == "skip":
        if value is UNSET:
            return "--skip GLOB"
        keys = [value] if isinstance(value, str) else list(value)
        return " ".join("..." if k is ... else f"--skip {k!r}" for k in keys)
    if option == "remap" and value is UNSET:
        return "--remap"
    if option == "remap" and all(repl is not None for _, repl in value):
        return " ".join(f"--remap '{pattern}={repl}'" for pattern, repl in value)
    if option == "remap" and all(repl is None for _, repl in value):
        return " ".join(f"--drop '{pattern}'" for pattern, _ in value)
    if option == "on_mismatch":
        return f"--on-mismatch {value if value in ('skip', 'error') else 'adapt'}"
    if option == "prefix":
        return "--no-prefix" if value is None else ""  # "auto" is the default here
    if option == "trust_pickle":
        return "--trust-pickle"
    if option == "allow_globals" and value is not UNSET:
        return " ".join(f"--allow-global {name}" for name in value)
    if option == "allow_globals":
        return "--allow-global MODULE.NAME for each"
    return str(fix)


def _pickle_advice(names: list[str], *, refused: bool) -> str:
    """What a command-line user can do about the pickled classes a checkpoint names, worded
    from the names alone: nothing is imported to explain a refusal."""
    in_main = [n.removeprefix("__main__.") for n in names if n.startswith("__main__.")]
    elsewhere = [n for n in names if not n.startswith("__main__.")]
    parts = []
    if in_main:
        parts.append(
            f"The file was pickled by a script that defined {', '.join(in_main)} itself "
            f"(as __main__); {'with --trust-pickle, ' if refused else ''}pass --import MODULE "
            f"naming a module that defines {'it' if len(in_main) == 1 else 'them'} (run from "
            "the folder that holds it; a script is imported without running its "
            "`if __name__ == '__main__':` block)."
        )
    if elsewhere and not refused:
        parts.append(
            f"Cannot import {', '.join(elsewhere)}: run from the folder that holds "
            f"{elsewhere[0].split('.')[0]}, install it, or pass --import MODULE."
        )
    return " ".join(parts)


def message(e: SurgeryError, args: argparse.Namespace) -> str:
    message = e.render(flag)
    names = getattr(e, "globals", None)
    if not isinstance(e, CheckpointError) or not names:
        return message
    if isinstance(e, UnsafeCheckpointError):  # refused: say what --trust-pickle will need
        advice = _pickle_advice(names, refused=True)
        return message + ("\n" + advice if advice else "")
    # trusted, and classes are missing: the library's advice is Python's
    return (
        f"'{args.checkpoint}' holds a pickled model whose classes cannot be found: "
        f"{', '.join(names)}. {_pickle_advice(names, refused=False)} Once it loads, re-save "
        "the weights once as a plain state dict, which loads without --trust-pickle: "
        "torch.save(torch.load(path, weights_only=False).state_dict(), 'weights.pth')."
    )
