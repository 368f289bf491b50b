"""``surgery diff`` (a dry-run load into a model) and ``surgery match`` (two models paired by
structure)."""

from __future__ import annotations

import argparse
import json

import torch

from .. import meta
from ..errors import render
from ..loading.pipeline import load_partial
from ..matching import match
from ..meta import empty_init
from .advice import flag
from .models import build, build_spec
from .options import emit, load_remap, on_mismatch, parse_input_shape

__all__ = ["cmd_diff", "cmd_match"]


def cmd_diff(args: argparse.Namespace) -> int:
    remap = load_remap(args)
    with empty_init():
        model = build(args)
    # The meta model is a planning device here, not a result: give it untouched, unfilled
    # memory so the report says what loading into a real model would do (nothing is
    # "initialised" by the meta machinery, missing keys read as missing).
    meta.to_empty(model, device="cpu")  # as model.to_empty, keeping tied weights tied
    report = load_partial(
        model,
        args.checkpoint,
        entry=args.entry,
        remap=remap,
        prefix=None if args.no_prefix else "auto",
        skip=args.skip,
        on_mismatch=on_mismatch(args),
        dry_run=True,
        trust_pickle=args.trust_pickle,
        allow_globals=args.allow_globals,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        emit(
            f"{report}\n"
            + (
                "ok: strict=True would load this checkpoint"
                if report.ok
                else f"not ok: {render(report.why_not_ok(), flag)}"
            )
        )
    return 0 if report.ok else 1


def cmd_match(args: argparse.Namespace) -> int:
    shape = parse_input_shape(args.input)
    models = []
    for spec, n in ((args.source, args.source_num_classes), (args.model, args.num_classes)):
        with empty_init():
            models.append(build_spec(spec, n))
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
