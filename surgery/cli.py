"""The ``surgery`` command: look inside a checkpoint, or dry-run loading it into a model.

    surgery inspect CKPT [--key K] [--depth D] [--json] [--allow-global MODULE.NAME]
    surgery diff CKPT --model SPEC [--num-classes N] [--remap REGEX=REPL] [--skip GLOB] [--json]
    surgery match SRC_SPEC DST_SPEC --input 1,3,224,224 [--rules] [--json]
    surgery convert CKPT -o OUT --model SPEC [--source SPEC --input 1,3,224,224 | --match]
                    [--remap REGEX=REPL] [--skip GLOB] [--allow-missing GLOB] [--drop REGEX]
                    [--layout model|checkpoint] [--max-shard-size 5GB] [--json]
    python -m surgery ...          (the same command)

``diff`` exits 0 when the load would pass ``strict=True`` (nothing missing, unexpected or
mismatched; skipped keys are fine), 1 otherwise, and 2
on bad input (missing or corrupt file, unknown model spec). Nothing is downloaded: models are
built with ``empty_init`` (no random init) and given untouched, unfilled memory, so tensors the
checkpoint lacks (a ViT's ``pos_embed``) are reported missing. The current directory is
importable, as with ``python -m``: ``--model mypkg.models:build_net`` and ``--import
mypkg.models`` work from the folder holding ``mypkg``.
Text from the checkpoint (key names, entry names) is printed with control characters escaped.
A refused pickle is explained from the names of the classes it holds: nothing is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import meta
from ._table import first_n, format_count, format_shape
from ._text import escape_control
from .errors import CheckpointError, SurgeryError, UnsafeCheckpointError, UsageError
from .load import load_partial
from .meta import empty_init
from .report import LoadReport
from .saving import save
from .sources import CheckpointSource, open_source

__all__ = ["build_model", "main"]


# --------------------------------------------------------------------------- model specs


def build_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """Build a model from ``torchvision:NAME``, ``timm:NAME`` or ``module.path:factory``.

    Never downloads weights. ``num_classes`` is passed on when given.

    Example:
        >>> model = build_model("torchvision:resnet18", num_classes=10)
    """
    kind, _, name = spec.partition(":")
    if not name:
        raise UsageError(
            f"unknown model spec {spec!r}: use torchvision:NAME, timm:NAME or module.path:factory"
        )
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if kind == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if name not in names:
            raise UsageError(_unknown(spec, name, names, "torchvision.models.list_models()"))
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if kind == "timm":
        import timm

        if not timm.is_model(name):
            raise UsageError(_unknown(spec, name, timm.list_models(), "timm.list_models()"))
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        module = importlib.import_module(kind)
    except ImportError as e:
        raise UsageError(
            f"unknown model spec {spec!r}: cannot import module '{kind}' ({e}); use "
            "torchvision:NAME, timm:NAME or module.path:factory"
        ) from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"unknown model spec {spec!r}: '{kind}' has no callable '{name}'")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned {_article(type(model).__name__)}, not an nn.Module")
    return model


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _article(word: str) -> str:
    """'an int', 'a dict': the article by the first letter (good enough for type names)."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _unknown(spec: str, name: str, names: Sequence[str], where: str) -> str:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown model {spec!r}.{hint} See {where} for the names."


# --------------------------------------------------------------------------- inspect


# Key parts beyond this depth stay joined in one node (a hostile key can have thousands).
_MAX_DEPTH = 64


def _tree(keys: dict[str, tuple[torch.Size, torch.dtype]]) -> dict:
    root: dict = {}
    for key, spec in keys.items():
        node = root
        parts = key.split(".")
        if len(parts) > _MAX_DEPTH:  # the tree is walked recursively: keep it shallow
            parts = [*parts[: _MAX_DEPTH - 1], ".".join(parts[_MAX_DEPTH - 1 :])]
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):  # a key that is also a prefix of others
                nxt = node[p] = {"": nxt}
            node = nxt
        if isinstance(node.get(parts[-1]), dict):
            node[parts[-1]][""] = spec
        else:
            node[parts[-1]] = spec
    return root


def _signature(node: Any) -> Any:
    if isinstance(node, dict):
        return tuple((k, _signature(v)) for k, v in node.items())
    return (tuple(node[0]), str(node[1]))


def _stats(node: Any) -> tuple[int, int]:
    if isinstance(node, dict):
        n = p = 0
        for v in node.values():
            a, b = _stats(v)
            n, p = n + a, p + b
        return n, p
    return 1, node[0].numel()


def _render(node: dict, depth: int, indent: str = "  ") -> list[str]:
    lines: list[str] = []
    items = list(node.items())
    i = 0
    while i < len(items):
        name, child = items[i]
        # Collapse a run of numbered siblings with identical structure: blocks.{0..11}.
        j = i
        if _is_index(name) and isinstance(child, dict):
            sig = _signature(child)
            while (
                j + 1 < len(items)
                and _is_index(items[j + 1][0])
                and isinstance(items[j + 1][1], dict)
                and _signature(items[j + 1][1]) == sig
            ):
                j += 1
        label = name if j == i else _run_label([int(k) for k, _ in items[i : j + 1]])
        if isinstance(child, dict):
            n, p = _stats(child)
            lines.append(f"{indent}{label}  [{n} tensor{'s' * (n != 1)}, {format_count(p)} params]")
            if depth > 1:
                lines += _render(child, depth - 1, indent + "  ")
        else:
            shape, dtype = child
            shown = label or "(itself)"
            lines.append(
                f"{indent}{shown}  {format_shape(shape)} {str(dtype).removeprefix('torch.')}"
            )
        i = j + 1
    return lines


def _is_index(name: str) -> bool:
    """A numbered sibling (``0``, ``12``): ASCII digits only, so ``²`` stays a plain name."""
    return name.isascii() and name.isdigit()


def _run_label(numbers: list[int]) -> str:
    lo, hi = min(numbers), max(numbers)
    span = f"{lo}..{hi}" if hi - lo + 1 == len(numbers) else ",".join(map(str, sorted(numbers)))
    return f"{{{span}}} ×{len(numbers)} identical"


def _inspect(source: CheckpointSource, depth: int) -> dict:
    specs = source.specs
    dtypes = Counter(str(d).removeprefix("torch.") for _, d in specs.values())
    numel = sum(s.numel() for s, _ in specs.values())
    nbytes = sum(s.numel() * d.itemsize for s, d in specs.values())
    return {
        "source": source.description,
        "nesting": source.container,
        "other_entries": source.other_entries,
        "tensors": len(specs),
        "elements": numel,
        "bytes": nbytes,
        "dtypes": dict(dtypes),
        "notes": source.notes,
        "keys": {
            k: {"shape": list(s), "dtype": str(d).removeprefix("torch.")}
            for k, (s, d) in specs.items()
        },
        "_tree": _render(_tree(specs), depth),
    }


def _open(args: argparse.Namespace) -> CheckpointSource:
    """The checkpoint the command names, read as its options say."""
    return open_source(
        args.checkpoint,
        entry=args.key,
        trust_pickle=args.trust_pickle,
        allow_globals=args.allow_globals,
    )


def _cmd_inspect(args: argparse.Namespace) -> int:
    source = _open(args)
    try:
        info = _inspect(source, args.depth)
    finally:
        source.close()
    tree = info.pop("_tree")
    if args.json:
        print(json.dumps(info, indent=2))  # ensure_ascii: control characters come out as \u001b
        return 0
    where = " -> ".join(repr(c) for c in info["nesting"]) or "top level"
    lines = [
        f"checkpoint: {args.checkpoint}",
        f"state dict: {where}"
        + (
            f" (other entries: {', '.join(info['other_entries'])})" if info["other_entries"] else ""
        ),
        f"tensors:    {info['tensors']}, {format_count(info['elements'])} elements, "
        f"{info['bytes'] / 2**20:.1f} MiB",
        "dtypes:     " + ", ".join(f"{d} ({n})" for d, n in info["dtypes"].items()),
        *(f"note:       {_cli_words(n)}" for n in info["notes"]),
        "keys:",
        *tree,
    ]
    # One name per line at most: escaped line by line, a name cannot start a line of its own.
    print("\n".join(escape_control(line) for line in lines))
    return 0


def _emit(text: str, file: Any = None) -> None:
    """Print text whose names from a file are escaped already (reports, messages): control
    characters escaped again, its own lines kept."""
    print(escape_control(text, keep="\n"), file=file or sys.stdout)


# --------------------------------------------------------------------------- diff


def _parse_remap(rules: list[str] | None) -> list[tuple[str, str | None]] | None:
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


def _build(args: argparse.Namespace) -> nn.Module:
    return _build_spec(args.model, args.num_classes)


def _build_spec(spec: str, num_classes: int | None) -> nn.Module:
    try:
        return build_model(spec, num_classes)
    except SurgeryError:
        raise
    except Exception as e:  # a factory of the user's failing: no traceback, say what failed
        raise UsageError(f"building {spec} failed: {type(e).__name__}: {e}") from None


def _cmd_diff(args: argparse.Namespace) -> int:
    remap = _parse_remap(args.remap)
    with empty_init():
        model = _build(args)
    # The meta model is a planning device here, not a result: give it untouched, unfilled
    # memory so the report says what loading into a real model would do (nothing is
    # "initialised" by the meta machinery, missing keys read as missing).
    meta.to_empty(model, device="cpu")  # as model.to_empty, keeping tied weights tied
    report = load_partial(
        model,
        args.checkpoint,
        entry=args.key,
        remap=remap,
        prefix=None if args.no_prefix else "auto",
        skip=args.skip,
        dry_run=True,
        trust_pickle=args.trust_pickle,
        allow_globals=args.allow_globals,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _emit(
            f"{report}\n"
            + (
                "ok: strict=True would load this checkpoint"
                if report.ok
                else f"not ok: {report.why_not_ok()}"
            )
        )
    return 0 if report.ok else 1


# --------------------------------------------------------------------------- match


def _parse_input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input {text!r} must be a shape like 1,3,224,224")
    return shape


def _cmd_match(args: argparse.Namespace) -> int:
    from .matching import match

    shape = _parse_input_shape(args.input)
    models = []
    for spec, n in ((args.source, args.source_num_classes), (args.model, args.num_classes)):
        with empty_init():
            models.append(_build_spec(spec, n))
    dtype = torch.long if args.input_dtype == "int64" else torch.float32
    example = torch.zeros(shape, dtype=dtype)
    result = match(models[0], models[1], example)
    result.source, result.model = args.source, args.model
    if args.json:
        info = result.to_dict()
        if args.rules:
            info["rules"] = [list(r) for r in result.rules()]
        print(json.dumps(info, indent=2))
    else:
        print(result)
        if args.rules:
            print("rules (pass as load_partial(model, ckpt, remap=rules)):")
            print("rules = [")
            for pattern, repl in result.rules():
                print(f"    ({_raw(pattern)}, {_raw(repl)}),")
            print("]")
    return 0 if result.complete else 1


def _raw(text: str | None) -> str:
    """A Python literal for a regex or replacement, raw when that reads better."""
    if text is None:
        return "None"
    if "\\" in text and "'" not in text and not text.endswith("\\"):
        return f"r'{text}'"
    return repr(text)


# --------------------------------------------------------------------------- convert


def _cmd_convert(args: argparse.Namespace) -> int:
    """Load CKPT into the model SPEC names (by names, or by structure with --match), print the
    report, and write the model's weights with ``surgery.save``; nothing is written when the
    load leaves gaps that --allow-missing, --skip or --drop do not name."""
    if args.input and not (args.match or args.source):
        raise UsageError("--input is the example input for --match; add --match (or --source)")
    with empty_init():  # planned on meta; loaded on meta too when the checkpoint fills it all
        model = _build(args)
    remap: list[tuple[str, str | None]] = [(rx, None) for rx in _regexes(args.drop, "--drop")]
    remap += _parse_remap(args.remap) or []
    matching = bool(args.match or args.source)
    if matching:
        remap += _structure_rules(args, model, remap)
    options: dict[str, Any] = dict(
        entry=args.key,
        remap=remap or None,
        prefix=None if args.no_prefix or matching else "auto",
        skip=args.skip,
        trust_pickle=args.trust_pickle,
        allow_globals=args.allow_globals,
    )
    report = load_partial(model, args.checkpoint, dry_run=True, **options)
    why = _convert_gaps(report, args.allow_missing)
    saved = None
    if not why:
        if report.not_loaded() or report.skipped:  # intended gaps keep the factory's init
            model = _build(args)
        report = load_partial(model, args.checkpoint, **options)
        saved = save(model, args.output, layout=args.layout, max_shard_size=args.max_shard_size)
    if args.json:
        info = {"report": report.to_dict(), "ok": saved is not None, "why_not_ok": why}
        print(json.dumps({**info, "saved": saved.to_dict() if saved else None}, indent=2))
    elif saved is None:
        _emit(f"{report}\nnot ok: {why}\nnothing written to '{args.output}'")
    else:
        _emit(f"{report}\n{saved}")
    return 0 if saved is not None else 1


def _regexes(patterns: list[str] | None, flag: str) -> list[str]:
    for pattern in patterns or ():
        try:
            re.compile(pattern)
        except re.error as e:
            raise UsageError(f"{flag} {pattern!r} is not a valid regex ({e})") from None
    return list(patterns or ())


def _structure_rules(
    args: argparse.Namespace, model: nn.Module, remap: list[tuple[str, str | None]]
) -> list[tuple[str, str | None]]:
    """The ``(regex, replacement)`` rules ``surgery.match`` finds from the checkpoint's names
    (after --drop/--remap) to the model's: from the source model run on the example input
    (--source), or from the checkpoint's names and shapes alone (read from its header)."""
    from ._keymap import apply_remap
    from .matching import match

    example = None
    if args.input:
        dtype = torch.long if args.input_dtype == "int64" else torch.float32
        example = torch.zeros(_parse_input_shape(args.input), dtype=dtype)
    source: nn.Module | dict[str, torch.Tensor]
    if args.source:
        with empty_init():
            source = _build_spec(args.source, args.source_num_classes)
    else:
        ckpt = _open(args)
        try:
            renamed, _, _ = apply_remap(ckpt.specs, remap or None)
            specs = {new: ckpt.specs[old] for new, old in renamed.items()}
        finally:
            ckpt.close()
        source = {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in specs.items()}
    return match(source, model, example).rules()


def _convert_gaps(report: LoadReport, allow_missing: list[str] | None) -> str:
    """Why the written weights would not be the checkpoint's (``""`` when they are): model
    tensors without a value that --allow-missing does not name, checkpoint tensors that land
    nowhere (--drop names those that should not)."""
    from ._select import match_keys

    parts = []
    unloaded = report.not_loaded()
    if unloaded and allow_missing:
        known = [*report.loaded, *unloaded, *report.skipped, *report.defaulted, *report.tied]
        allowed = match_keys(allow_missing, known, action="--allow-missing", owner=report.model)
        unloaded = [k for k in unloaded if k not in allowed]
    if unloaded:
        parts.append(
            f"{_count(len(unloaded), 'model tensor')} would get no value from the checkpoint "
            f"({first_n(unloaded, 3)}); pass --allow-missing GLOB (written with the model's "
            "init) or --skip GLOB if intended"
        )
    if report.unexpected:
        parts.append(
            f"{_count(len(report.unexpected), 'checkpoint tensor')} would not be written "
            f"({first_n(report.unexpected, 3)}); pass --drop '{_drop_regex(report.unexpected)}' "
            "if intended"
        )
    return escape_control("; ".join(parts))


def _drop_regex(keys: list[str]) -> str:
    """A --drop regex for ``keys``: their common parent module, else the keys themselves."""
    if len(keys) == 1:
        return f"^{re.escape(keys[0])}$"
    parents = [k.split(".")[:-1] for k in keys]
    common = next((i for i, ps in enumerate(zip(*parents, strict=False)) if len(set(ps)) > 1), None)
    parts = parents[0][: min(map(len, parents)) if common is None else common]
    if parts:
        return f"^{re.escape('.'.join(parts))}\\."
    return "^(" + "|".join(re.escape(k) for k in keys) + ")$"


# --------------------------------------------------------------------------- advice


# The library's advice names Python arguments; on the command line these are options.
_CLI_WORDS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"trust_pickle=True"), "--trust-pickle"),
    (
        re.compile(r"allow_globals=\[\.\.\.\] naming (them|it)"),
        "--allow-global MODULE.NAME for each",
    ),
    (re.compile(r"\bkey=(('[^']*'|\"[^\"]*\"))"), r"--key \1"),
    (re.compile(r"\bkey= "), "--key "),
    (re.compile(r"\bentry=(('[^']*'|\"[^\"]*\"))"), r"--key \1"),
    (re.compile(r"\bentry= "), "--key "),
    (re.compile(r"\bprefix=None\b"), "--no-prefix"),
    (re.compile(r" \(or prefix=\"auto\"\)"), ""),
    (re.compile(r"\bskip=\[\.\.\.\]"), "--skip GLOB"),
    (re.compile(r"\bskip=('[^']*')"), r"--skip \1"),
    (
        re.compile(r"""remap=\[\(r(['"])(.*?)\1, (['"])(.*?)\3\)\]"""),
        r"--remap '\2=\4'",
    ),
]


def _cli_words(message: str) -> str:
    for pattern, repl in _CLI_WORDS:
        message = pattern.sub(repl, message)
    return message


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


def _message(e: SurgeryError, args: argparse.Namespace) -> str:
    message = _cli_words(str(e))
    names = getattr(e, "globals", None)
    if not isinstance(e, CheckpointError) or not names:
        return message
    if isinstance(e, UnsafeCheckpointError):  # refused: say what --trust-pickle will need
        advice = _pickle_advice(names, refused=True)
        return message + ("\n" + advice if advice else "")
    # trusted, and classes are missing: the library's advice is Python's
    return (
        f"'{args.checkpoint}' holds a pickled model whose classes cannot be found: "
        f"{', '.join(names)}. {_pickle_advice(names, refused=False)} Better, re-save it once "
        "as a plain state dict: torch.save(model.state_dict(), path)."
    )


# --------------------------------------------------------------------------- entry point


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _version() -> str:
    from . import __version__

    return f"surgery {__version__} (torch {torch.__version__}, {Path(__file__).parent})"


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
        "--depth", type=_positive_int, default=3, help="levels of the key tree to show (1 or more)"
    )
    loading = argparse.ArgumentParser(add_help=False)  # diff and convert load into a model
    loading.add_argument(
        "--model", required=True, help="torchvision:NAME, timm:NAME or module.path:factory"
    )
    loading.add_argument("--num-classes", type=_positive_int, help="passed to the model factory")
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
    loading.add_argument("--no-prefix", action="store_true", help="turn off prefix detection")
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
    _convert_parser(sub, [common, loading])
    return p


def _convert_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    pc = sub.add_parser(
        "convert",
        parents=parents,
        help="load a checkpoint into a model (by names or by structure) and write its weights",
    )
    pc.add_argument(
        "-o", "--output", required=True, help="folder to write (or a file ending in .safetensors)"
    )
    pc.add_argument(
        "--allow-missing",
        action="append",
        metavar="GLOB",
        help="model keys that may get no value (written with the model's init), e.g. 'head.*'",
    )
    pc.add_argument(
        "--drop",
        action="append",
        metavar="REGEX",
        help="checkpoint keys not to convert (repeatable), e.g. '^fc\\.'",
    )
    pc.add_argument(
        "--match",
        action="store_true",
        help="pair tensors by structure (as `surgery match`) instead of by name; --remap "
        "rules run first, into the source model's names",
    )
    pc.add_argument(
        "--source",
        metavar="SPEC",
        help="the model CKPT was saved from, for --match (implies it); without it the "
        "checkpoint's names and shapes alone are matched (low confidence)",
    )
    pc.add_argument("--source-num-classes", type=_positive_int, help="passed to its factory")
    pc.add_argument("--input", help="example input shape for --match, e.g. 1,3,224,224")
    pc.add_argument("--input-dtype", choices=["float32", "int64"], default="float32")
    pc.add_argument(
        "--layout",
        choices=["model", "checkpoint"],
        default="model",
        help="'checkpoint' writes a transformers model as save_pretrained does",
    )
    pc.add_argument(
        "--max-shard-size", default="5GB", help="shard above this size (e.g. 500MB, 5GB)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``surgery`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "inspect": _cmd_inspect,
        "diff": _cmd_diff,
        "match": _cmd_match,
        "convert": _cmd_convert,
    }
    try:
        with _user_modules(getattr(args, "imports", [])):
            return commands[args.command](args)
    except SurgeryError as e:
        _emit(f"surgery {args.command}: error: {_message(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
