"""``surgery convert``: load a checkpoint into a model (by names, or by structure) and write the
model's weights with ``surgery.save``; nothing is written when the load leaves gaps the
command was not told about."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

import torch
from torch import nn

from .._table import first_n
from .._text import escape_control
from ..errors import UsageError
from ..keys.remap import apply_remap
from ..keys.select import match_keys
from ..loading.pipeline import load_partial
from ..loading.report import LoadReport
from ..matching import match
from ..meta import empty_init
from ..saving import save
from .models import build, build_spec
from .options import (
    count,
    emit,
    load_remap,
    on_mismatch,
    open_checkpoint,
    parse_input_shape,
    positive_int,
)

__all__ = ["add_convert_parser", "cmd_convert"]


def cmd_convert(args: argparse.Namespace) -> int:
    """Load CKPT into the model SPEC names (by names, or by structure with --match), print the
    report, and write the model's weights with ``surgery.save``; nothing is written when the
    load leaves gaps that --allow-missing, --skip or --drop do not name."""
    if args.input and not (args.match or args.source):
        raise UsageError("--input is the example input for --match; add --match (or --source)")
    with empty_init():  # planned on meta; loaded on meta too when the checkpoint fills it all
        model = build(args)
    remap = load_remap(args) or []
    matching = bool(args.match or args.source)
    if matching:
        remap += _structure_rules(args, model, remap)
    options: dict[str, Any] = dict(
        entry=args.entry,
        remap=remap or None,
        prefix=None if args.no_prefix or matching else "auto",
        skip=args.skip,
        on_mismatch=on_mismatch(args),
        trust_pickle=args.trust_pickle,
        allow_globals=args.allow_globals,
    )
    report = load_partial(model, args.checkpoint, dry_run=True, **options)
    why = _convert_gaps(report, args.allow_missing)
    saved = None
    if not why:
        if report.not_loaded() or report.skipped:  # intended gaps keep the factory's init
            model = build(args)
        report = load_partial(model, args.checkpoint, **options)
        saved = save(model, args.output, layout=args.layout, max_shard_size=args.max_shard_size)
    if args.json:
        info = {"report": report.to_dict(), "ok": saved is not None, "why_not_ok": why}
        print(json.dumps({**info, "saved": saved.to_dict() if saved else None}, indent=2))
    elif saved is None:
        emit(f"{report}\nnot ok: {why}\nnothing written to '{args.output}'")
    else:
        emit(f"{report}\n{saved}")
    return 0 if saved is not None else 1


def _structure_rules(
    args: argparse.Namespace, model: nn.Module, remap: list[tuple[str, str | None]]
) -> list[tuple[str, str | None]]:
    """The ``(regex, replacement)`` rules ``surgery.match`` finds from the checkpoint's names
    (after --drop/--remap) to the model's: from the source model run on the example input
    (--source), or from the checkpoint's names and shapes alone (read from its header)."""
    example = None
    if args.input:
        dtype = torch.long if args.input_dtype == "int64" else torch.float32
        example = torch.zeros(parse_input_shape(args.input), dtype=dtype)
    source: nn.Module | dict[str, torch.Tensor]
    if args.source:
        with empty_init():
            source = build_spec(args.source, args.source_num_classes)
    else:
        ckpt = open_checkpoint(args)
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
    parts = []
    unloaded = report.not_loaded()
    if unloaded and allow_missing:
        known = [*report.loaded, *unloaded, *report.skipped, *report.defaulted, *report.tied]
        allowed = match_keys(allow_missing, known, action="--allow-missing", owner=report.model)
        unloaded = [k for k in unloaded if k not in allowed]
    if unloaded:
        parts.append(
            f"{count(len(unloaded), 'model tensor')} would get no value from the checkpoint "
            f"({first_n(unloaded, 3)}); pass --allow-missing GLOB (written with the model's "
            "init) or --skip GLOB if intended"
        )
    if report.unexpected:
        parts.append(
            f"{count(len(report.unexpected), 'checkpoint tensor')} would not be written "
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


def add_convert_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
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
    pc.add_argument("--source-num-classes", type=positive_int, help="passed to its factory")
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
