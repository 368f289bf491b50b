"""``load_partial``: load what fits from a checkpoint into a changed model, and say what happened.

``load_partial(model, ckpt, ...)`` is ``plan_load(model, ckpt, ...).apply(model)``: planning
(:mod:`surgery.plan`) reads only names, shapes and dtypes and raises every refusal before the
model is touched; applying (:mod:`surgery.apply`) runs adapters, then streams one tensor at a
time from the file straight into the model's memory. The checkpoint is opened once for both.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from .. import _progress
from ..errors import UsageError
from ..keys.remap import Remap
from ..keys.select import Selector
from ..sources import CheckpointLike, CheckpointSource, open_source
from .apply import apply_sharded_plan, check_device, preview, run
from .distributed import agree, is_sharded, plan_fingerprint
from .plan import LoadPlan, OnMismatch, check_args, gc_paused, make_plan
from .report import LoadReport

__all__ = ["load_partial"]


def load_partial(
    model: nn.Module,
    ckpt: CheckpointLike,
    *,
    strict: bool = False,
    dry_run: bool = False,
    entry: str | None = None,
    remap: Remap | None = None,
    prefix: Literal["auto"] | None = "auto",
    skip: Selector | Iterable[Selector] | None = None,
    trust_pickle: bool = False,
    allow_globals: Iterable[Any] | None = None,
    on_mismatch: OnMismatch = "skip",
    key: str | None = None,
    progress: bool | None = None,
    device: str | torch.device | None = None,
) -> LoadReport:
    """Load every checkpoint tensor that fits ``model`` and report what happened.

    ``ckpt`` is anything :func:`read_checkpoint` takes; ``entry`` picks the container entry
    holding the state dict (e.g. ``entry="state_dict_ema"``; ``key=`` is its deprecated old
    name). Pickles are read without running code (see :func:`read_checkpoint`):
    ``allow_globals=[cls, "module.Name"]`` admits more classes for this load, and
    ``trust_pickle=True`` loads with ``torch.load(weights_only=False)`` (files you trust only).
    Keys are mapped by ``remap`` (dict of renames, list of ``(regex, replacement)``
    rules, or a callable; ``None`` drops a key), then by the leading-prefix rewrite
    (``module.``, ``_orig_mod.``, ``backbone.``, ...) that matches the most keys
    (``prefix="auto"``; ``None`` turns it off). ``skip`` selects model keys never to load
    (globs like ``"fc.*"``, ``"re:..."``, module types such as ``nn.Linear``, callables
    ``(name, module) -> bool``); one that matches nothing is an error. Shape mismatches are
    skipped and reported (``on_mismatch="skip"``), raise (``"error"``), or go to a callable
    ``(name, ckpt_tensor, model_tensor) -> Tensor | None``. Floating tensors are cast to the
    model's dtype. ``strict=True`` raises one error listing every missing, unexpected or
    mismatched key. Whatever error is raised, the model is left as it was; ``dry_run=True``
    only plans (adapters are not run). Tensors load onto the model's device, whatever device
    the checkpoint was saved from. A model on the ``meta`` device (see :func:`empty_init`) is
    materialised on ``device`` (default CPU; ``"cuda"`` reads through pinned memory straight
    into GPU memory); ``device`` on a model already placed elsewhere is refused. A model
    wrapped by ``peft.get_peft_model`` gets the base weights under the wrapper's names; its
    adapter weights are left as they are (``report.adapter``). ``progress`` shows a tqdm bar
    of the bytes read (one per shard): ``None`` on a terminal when the load reads over about
    1 GB, ``True`` always, ``False`` never. To review or edit the plan first, use :func:`plan_load`.
    A sharded model (``DTensor`` parameters from FSDP2 ``fully_shard`` or tensor parallelism)
    is loaded shard by shard: call it on every rank with the same arguments; the ranks agree on
    the plan before any writes (see README "Sharded models" and surgery/distributed.py).

    Example:
        >>> import torchvision, surgery
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> report = surgery.load_partial(model, "resnet18.pth")  # doctest: +SKIP
        >>> print(report)  # fc.weight, fc.bias reported as mismatched  # doctest: +SKIP
    """
    if key is not None:
        warnings.warn(
            "load_partial(key=...) is renamed entry=...; key= will be removed in a future release",
            DeprecationWarning,
            stacklevel=2,
        )
        if entry is not None:
            raise UsageError("pass entry= only (key= is its deprecated old name), not both")
        entry = key
    check_args(model, entry, prefix, on_mismatch, strict, trust_pickle, "load_partial")
    if not isinstance(dry_run, bool):
        raise UsageError(f"dry_run must be True or False, not {dry_run!r}")
    _progress.check(progress)
    if is_sharded(model):  # DTensor parameters (FSDP2, tensor parallel): on every rank
        if device is not None:
            raise UsageError(
                f"device={device!r} places a meta model's tensors; {type(model).__name__} is "
                "sharded and its shards are placed already. Leave device= out."
            )
        return _load_sharded(
            model,
            ckpt,
            dry_run=dry_run,
            allow_globals=allow_globals,
            **dict(entry=entry, remap=remap, prefix=prefix, skip=skip),
            **dict(on_mismatch=on_mismatch, strict=strict, trust_pickle=trust_pickle),
        )
    with gc_paused():
        source = open_source(
            ckpt, entry=entry, trust_pickle=trust_pickle, allow_globals=allow_globals
        )
        try:
            state = model.state_dict(keep_vars=True)
            dev = check_device(state, device)
            plan = make_plan(
                model,
                source,
                ckpt=ckpt,
                refuse_empty=not dry_run,
                state=state,
                **dict(entry=entry, remap=remap, prefix=prefix, skip=skip),
                **dict(on_mismatch=on_mismatch, strict=strict, trust_pickle=trust_pickle),
            )
            # The plan was checked against this model a moment ago: apply it as it is.
            if dry_run:
                return preview(plan, model, state)
            return run(plan, model, state, source, plan.adapter, progress, dev)
        finally:
            source.close()


def _load_sharded(
    model: nn.Module,
    ckpt: CheckpointLike,
    *,
    dry_run: bool,
    allow_globals: Iterable[Any] | None,
    **options: Any,
) -> LoadReport:
    """``load_partial`` on a sharded model: every rank plans from metadata (global shapes),
    the ranks agree before any write, then each reads its own shards (surgery/distributed.py).
    """
    state = model.state_dict(keep_vars=True)
    entry, trust_pickle = options["entry"], options["trust_pickle"]

    def open_() -> CheckpointSource:
        return open_source(
            ckpt, entry=entry, trust_pickle=trust_pickle, allow_globals=allow_globals
        )

    def make(source: CheckpointSource) -> LoadPlan:
        return make_plan(model, source, ckpt=ckpt, refuse_empty=not dry_run, state=state, **options)

    with gc_paused():
        if dry_run:  # plan on every rank and agree, so a dry run fails alike everywhere

            def plan_only() -> LoadPlan:
                source = open_()
                try:
                    return make(source)
                finally:
                    source.close()

            plan = agree(
                plan_only,
                fingerprint=lambda p: plan_fingerprint(p.entries, {}),
                summary=lambda p: str(p.counts()),
            )
            return preview(plan, model, state)
    adapter = options["on_mismatch"] if callable(options["on_mismatch"]) else None
    return apply_sharded_plan(None, model, state, open_, adapter, make)  # type: ignore[arg-type]
