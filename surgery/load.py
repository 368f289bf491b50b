"""``load_partial``: load what fits from a checkpoint into a changed model, and say what happened.

Two phases. Planning reads only names, shapes and dtypes (file headers), maps checkpoint keys
onto model keys and checks everything; any error is raised here, before the model is touched.
Writing then streams one tensor at a time from the file straight into the model's memory, so
the peak stays near one copy of the weights and skipped tensors are never read.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from . import meta
from ._keymap import Remap, apply_prefix, apply_remap, detect_prefix, prefix_hint
from ._names import compile_patterns, first_match
from ._table import format_shape
from .checkpoint import CheckpointLike, CheckpointSource, open_source
from .errors import LoadError, UsageError
from .report import LoadReport, Mismatch

__all__ = ["load_partial"]

Adapter = Callable[[str, Tensor, Tensor], Tensor | None]
OnMismatch = Literal["skip", "error"] | Adapter

_LIST = 12  # keys listed per category in an error message


@dataclass
class _Plan:
    state: dict[str, Tensor]  # the model's state_dict(keep_vars=True) at planning time
    loads: list[tuple[str, str]] = field(default_factory=list)  # (model key, checkpoint key)
    adapted: dict[str, Tensor] = field(default_factory=dict)  # model key -> value to copy
    init_modules: list[nn.Module] = field(default_factory=list)  # meta modules to reset


def load_partial(
    model: nn.Module,
    ckpt: CheckpointLike,
    *,
    key: str | None = None,
    remap: Remap | None = None,
    prefix: Literal["auto"] | None = "auto",
    skip: str | Iterable[str] | None = None,
    on_mismatch: OnMismatch = "skip",
    strict: bool = False,
    dry_run: bool = False,
    trust_pickle: bool = False,
) -> LoadReport:
    """Load every checkpoint tensor that fits ``model`` and report what happened.

    ``ckpt`` is anything :func:`read_checkpoint` takes. Keys are mapped by ``remap`` (dict of
    renames, list of ``(regex, replacement)`` rules, or a callable; ``None`` drops a key), then
    by the leading-prefix rewrite (``module.``, ``_orig_mod.``, ``backbone.``, ...) that matches
    the most keys (``prefix="auto"``; ``None`` turns it off). ``skip`` globs name model keys
    never to load. Shape mismatches are skipped and reported (``on_mismatch="skip"``), raise
    (``"error"``), or go to a callable ``(name, ckpt_tensor, model_tensor) -> Tensor | None``.
    Floating tensors are cast to the model's dtype. ``strict=True`` raises one error listing
    every missing, unexpected or mismatched key. Whatever error is raised, the model is left
    as it was; ``dry_run=True`` only plans. A model on the ``meta`` device (see
    :func:`empty_init`) is materialised on CPU.

    Example:
        >>> import torchvision, surgery
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> report = surgery.load_partial(model, "resnet18.pth")  # doctest: +SKIP
        >>> print(report)  # fc.weight, fc.bias reported as mismatched  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"load_partial needs an nn.Module, got {type(model).__name__}")
    if prefix not in ("auto", None):
        raise UsageError(f"prefix must be 'auto' or None, not {prefix!r}")
    if not (on_mismatch in ("skip", "error") or callable(on_mismatch)):
        raise UsageError(
            f"on_mismatch must be 'skip', 'error' or a callable (name, ckpt, model) -> Tensor, "
            f"not {on_mismatch!r}"
        )
    with _gc_paused():
        source = open_source(ckpt, key=key, trust_pickle=trust_pickle)
        try:
            plan, report = _plan(
                model,
                source,
                remap=remap,
                prefix=prefix,
                skip=skip,
                on_mismatch=on_mismatch,
                strict=strict,
                dry_run=dry_run,
            )
            if not dry_run:
                _write(model, source, plan)
        finally:
            source.close()
    return report


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: a load makes many short-lived acyclic objects, and
    on a model with tens of thousands of modules each full collection walks them all (it
    doubled the time to plan 100k keys). The previous state is restored."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------- planning


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _plan(
    model: nn.Module,
    source: CheckpointSource,
    *,
    remap: Remap | None,
    prefix: str | None,
    skip: str | Iterable[str] | None,
    on_mismatch: OnMismatch,
    strict: bool,
    dry_run: bool,
) -> tuple[_Plan, LoadReport]:
    model_name = type(model).__name__
    state = model.state_dict(keep_vars=True)
    report = LoadReport(source=source.description, model=model_name, dry_run=dry_run)
    report.notes.extend(source.notes)
    skip_rx = compile_patterns(skip)
    plan = _Plan(state)

    # 1. checkpoint key -> model key
    new_to_old, dropped, notes = apply_remap(source.specs, remap)
    report.notes.extend(notes)
    report.skipped.extend(dropped)
    if prefix == "auto":
        rewrite = detect_prefix(new_to_old, set(state))
        if rewrite is not None:
            new_to_old = apply_prefix(new_to_old, rewrite)
            report.prefix = rewrite
    report.renamed = {old: new for new, old in new_to_old.items() if new != old}

    # 2. classify every checkpoint tensor
    mismatch_errors: list[Mismatch] = []
    for mkey, ckey in new_to_old.items():
        target = state.get(mkey)
        if target is None:
            report.unexpected.append(mkey)
            continue
        if skip_rx and first_match(skip_rx, mkey) is not None:
            report.skipped.append(mkey)
            continue
        cshape, cdtype = source.specs[ckey]
        if cshape != target.shape:
            mm = Mismatch(mkey, tuple(cshape), tuple(target.shape))
            if on_mismatch == "skip":
                report.mismatched.append(mm)
            elif on_mismatch == "error":
                mismatch_errors.append(mm)
            else:
                value = on_mismatch(mkey, source.read(ckey), target)
                if value is None:
                    report.mismatched.append(mm)
                    continue
                if not isinstance(value, Tensor) or tuple(value.shape) != tuple(target.shape):
                    got = format_shape(value.shape) if isinstance(value, Tensor) else repr(value)
                    raise LoadError(
                        f"on_mismatch adapter returned {got} for '{mkey}', but the model "
                        f"expects {format_shape(target.shape)}; return a tensor of that shape "
                        "or None to skip it. Nothing was loaded."
                    )
                plan.adapted[mkey] = value.detach()
                report.adapted.append(mm)
            continue
        plan.loads.append((mkey, ckey))
        if cdtype != target.dtype:
            report.cast.append((mkey, _dtype_name(cdtype), _dtype_name(target.dtype)))
    if mismatch_errors:
        raise LoadError(
            f"size mismatch loading {source.description} into {model_name} "
            f"({len(mismatch_errors)} keys):\n"
            + "\n".join(f"    {m}" for m in mismatch_errors[:_LIST])
            + _more(mismatch_errors)
            + "\nNothing was loaded. Pass on_mismatch='skip' to load the rest, skip=[...] for "
            "a replaced head, or an adapter callable."
        )

    # 3. one pass over the model: keys that got nothing, counts (tied tensors count once)
    loaded_keys = [m for m, _ in plan.loads] + list(plan.adapted)
    report.loaded = loaded_keys
    loaded_ids = {id(state[k]) for k in loaded_keys}
    seen: set[int] = set()
    any_meta = False
    for mkey, t in state.items():
        tid = id(t)
        hit = tid in loaded_ids
        if not hit and mkey not in new_to_old:
            if skip_rx and first_match(skip_rx, mkey) is not None:
                report.skipped.append(mkey)
            elif mkey.endswith("num_batches_tracked"):
                report.defaulted.append(mkey)
            else:
                report.missing.append(mkey)
        if tid in seen:
            continue
        seen.add(tid)
        any_meta = any_meta or t.is_meta
        if isinstance(t, nn.Parameter):
            n = t.numel()
            report.tensors_total += 1
            report.params_total += n
            if hit:
                report.tensors_loaded += 1
                report.params_loaded += n
        else:
            report.buffers_total += 1
            report.buffers_loaded += hit

    # 5. refuse what cannot be right
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise LoadError(_strict_message(report, source, state, new_to_old, prefix))
    if not dry_run and not loaded_keys and source.specs:
        raise LoadError(
            f"0 of {len(source.specs)} checkpoint tensors match {model_name}. "
            + (
                prefix_hint(list(new_to_old), set(state))
                or "Check that the checkpoint is for this architecture."
            )
            + " Nothing was loaded."
        )
    if any_meta:
        plan.init_modules = _meta_modules_to_init(model, loaded_ids, report)
    return plan, report


def _more(items: list) -> str:
    return f"\n    ... and {len(items) - _LIST} more" if len(items) > _LIST else ""


def _strict_message(
    report: LoadReport,
    source: CheckpointSource,
    state: dict[str, Tensor],
    new_to_old: dict[str, str],
    prefix: str | None,
) -> str:
    parts = [
        f"Error(s) loading {source.description} into {report.model} with strict=True "
        f"({len(report.missing)} missing, {len(report.unexpected)} unexpected, "
        f"{len(report.mismatched)} mismatched):"
    ]
    sections = (
        ("missing from checkpoint", report.missing),
        ("unexpected (not in model)", report.unexpected),
        ("size mismatch", report.mismatched),
    )
    for title, items in sections:
        if items:
            parts.append(f"  {title}:")
            parts += [f"    {item}" for item in items[:_LIST]]
            parts.append(_more(items).lstrip("\n"))  # "" (dropped below) when all are shown
    hint = prefix_hint(list(new_to_old), set(state)) if report.missing else ""
    if hint:
        parts.append(hint if prefix is None else hint.replace(' (or prefix="auto")', ""))
    parts.append(
        "Nothing was loaded. Use strict=False to load what fits, or skip=[...] for the keys "
        "you mean to leave out (e.g. skip='fc.*' for a replaced head)."
    )
    return "\n".join(p for p in parts if p)


def _meta_modules_to_init(
    model: nn.Module, loaded_ids: set[int], report: LoadReport
) -> list[nn.Module]:
    """Modules with meta tensors the checkpoint does not fill; checked before any write."""
    modules: list[nn.Module] = []
    no_reset: list[str] = []
    for mname, mod in model.named_modules():
        pending = [
            (n, t, n in mod._non_persistent_buffers_set)
            for n, t in [*mod._parameters.items(), *mod._buffers.items()]
            if t is not None and t.is_meta and id(t) not in loaded_ids
        ]
        if not pending:
            continue
        full = [f"{mname}.{n}" if mname else n for n, _, _ in pending]
        if not callable(getattr(mod, "reset_parameters", None)):
            no_reset += [f"{k} ({type(mod).__name__})" for k in full]
            continue
        modules.append(mod)
        report.initialised += [
            k for k, (_, _, nonpersistent) in zip(full, pending, strict=True) if not nonpersistent
        ]
    if no_reset:
        raise LoadError(
            f"{report.model} is on the meta device and these tensors get no value: "
            + ", ".join(no_reset[:_LIST])
            + (f" and {len(no_reset) - _LIST} more" if len(no_reset) > _LIST else "")
            + ". They are not in the checkpoint and their module has no reset_parameters() "
            "to initialise them. Build the model with surgery.empty_init() (keeps buffers "
            "real) or on CPU, or load a checkpoint that has them. Nothing was loaded."
        )
    return modules


# --------------------------------------------------------------------------- writing


@torch.no_grad()
def _write(model: nn.Module, source: CheckpointSource, plan: _Plan) -> None:
    state = plan.state
    owners = meta.holders(model) if any(t.is_meta for t in state.values()) else {}
    replaced: dict[int, Tensor] = {}

    def current(t: Tensor) -> Tensor:
        return replaced.get(id(t), t)

    # Modules with tensors the checkpoint lacks: materialise (zeros) and reset them first, so
    # the loads below land on real memory and are not overwritten by the reset.
    for mod in plan.init_modules:
        for t in [*mod._parameters.values(), *mod._buffers.values()]:
            if t is not None and t.is_meta and id(t) not in replaced:
                new = torch.zeros(t.shape, dtype=t.dtype)
                replaced[id(t)] = meta.replace(t, new, owners[id(t)])
        mod.reset_parameters()

    for mkey, ckey in plan.loads:
        target = current(state[mkey])
        if target.is_meta:
            new = torch.empty(target.shape, dtype=target.dtype)
            source.read_into(ckey, new)
            replaced[id(state[mkey])] = meta.replace(target, new, owners[id(state[mkey])])
        else:
            source.read_into(ckey, target)
    for mkey, value in plan.adapted.items():
        target = current(state[mkey])
        if target.is_meta:
            new = torch.empty(target.shape, dtype=target.dtype)
            new.copy_(value)
            replaced[id(state[mkey])] = meta.replace(target, new, owners[id(state[mkey])])
        else:
            target.copy_(value)
