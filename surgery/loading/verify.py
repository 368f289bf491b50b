"""Checking a plan against its source: every tensor it reads is there, as planned, copyable.

Run before the first write: :func:`copy_problems` when planning (a sparse, quantized, nested,
meta or complex tensor cannot fill a dense real parameter), :func:`verify_source` when a plan
made elsewhere (edited, read back from JSON) is applied to a source.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .._table import first_n_lines, format_shape
from .._tensors import dtype_name
from ..errors import Advice, Fix, LoadError
from ..sources import CheckpointSource
from .entries import WRITES, PlanEntry

__all__ = ["copy_failure", "copy_problems", "verify_source"]

_LIST = 12


def copy_problems(entries: Iterable[PlanEntry], source: CheckpointSource) -> list[tuple[str, str]]:
    """(checkpoint key, why) for each tensor the entries write that cannot be copied.

    A sparse, quantized, nested or meta tensor cannot fill a dense parameter, nor a complex one
    a real parameter; found here, before the first write, the load is refused whole.
    """
    out: list[tuple[str, str]] = []
    unreadable: Mapping[str, str] = source.unreadable
    for e in entries:
        if e.conversion is not None and e.action in WRITES and not e.tied_to:
            out += [(k, unreadable[k]) for k in e.conversion.keys if k in unreadable]
            continue
        if e.action not in ("load", "cast") or e.ckpt_key is None or e.tied_to:
            continue
        why = unreadable.get(e.ckpt_key)
        if why is None and e.model_dtype is not None and e.ckpt_dtype is not None:
            if e.ckpt_dtype.startswith("complex") and not e.model_dtype.startswith("complex"):
                why = f"complex ({e.ckpt_dtype}) for a real {e.model_dtype} tensor"
        if why:
            out.append((e.ckpt_key, why))
    return out


def copy_failure(problems: list[tuple[str, str]], description: str) -> Advice:
    """The message refusing a plan whose copies cannot all happen."""
    lines = [f"    '{k}': {why}" for k, why in problems[:_LIST]]
    more = f"\n    ... and {len(problems) - _LIST} more" if len(problems) > _LIST else ""
    return Advice(
        f"{description} holds {len(problems)} tensor(s) the plan would load that cannot be "
        "copied into the model:\n" + "\n".join(lines) + more + "\nNothing was loaded. "
        "Leave them out (",
        Fix("skip", [k for k, _ in problems[:3]]),
        ") or convert them in the file first (e.g. dequantize() or to_dense()).",
    )


def verify_source(entries: list[PlanEntry], source: CheckpointSource) -> None:
    """Every tensor the entries read is in the checkpoint with the planned shape and dtype,
    can be copied, and (DCP folders: each chunk's file) can be read in full."""
    bad = _not_as_planned(entries, source)
    if not bad:
        problems = copy_problems(entries, source)
        if problems:
            raise LoadError(copy_failure(problems, source.description))
        check_reads(entries, source)
        return
    raise LoadError(
        f"{source.description} does not hold what the plan reads ({len(bad)} tensors):\n"
        + "\n".join(first_n_lines(bad, _LIST))
        + "\nNothing was loaded. Pass the checkpoint the plan was made from (ckpt=...), "
        "or plan again with surgery.plan_load()."
    )


def check_reads(entries: Iterable[PlanEntry], source: CheckpointSource) -> None:
    """Every file the writes will read is there in full (the source's own check)."""
    specs = source.specs
    source.check_reads(k for e in entries if e.action in WRITES for k in e.ckpt_keys if k in specs)


def _not_as_planned(entries: list[PlanEntry], source: CheckpointSource) -> list[str]:
    specs = source.specs
    bad: list[str] = []
    carriers = {e.model_key: e for e in entries if e.action in WRITES and not e.tied_to}
    for e in entries:
        if e.action not in WRITES or (e.via is not None and e.ckpt_key is None):
            continue
        if e.conversion is not None:  # the shapes are checked when the tensors are converted
            bad += [f"'{k}': not in the checkpoint" for k in e.conversion.keys if k not in specs]
            continue
        carrier = carriers.get(e.tied_to) if e.tied_to else None
        if carrier is not None and carrier.ckpt_key != e.ckpt_key:  # a tied checkpoint
            if e.ckpt_key not in specs:
                bad.append(f"'{e.ckpt_key}': not in the checkpoint")
            elif not source.shares(str(carrier.ckpt_key), str(e.ckpt_key)):
                bad.append(
                    f"'{e.ckpt_key}': planned as the same tensor as '{carrier.ckpt_key}' (tied), "
                    "the checkpoint holds two different tensors"
                )
            continue
        spec = specs.get(e.ckpt_key)  # type: ignore[arg-type]
        if spec is None and e.via is not None and e.ckpt_key in source.extras:
            continue  # a non-tensor entry, handed to its module's own loading
        if spec is None:
            bad.append(f"'{e.ckpt_key}': not in the checkpoint")
        elif tuple(spec[0]) != e.ckpt_shape or dtype_name(spec[1]) != e.ckpt_dtype:
            bad.append(
                f"'{e.ckpt_key}': planned {format_shape(e.ckpt_shape)} {e.ckpt_dtype}, "
                f"checkpoint has {format_shape(spec[0])} {dtype_name(spec[1])}"
            )
    return bad
