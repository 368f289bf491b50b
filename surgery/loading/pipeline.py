"""The loading pipeline: ``load_partial``, ``plan_load`` and ``apply_plan``, one sequence.

Every load runs the same fixed steps, as ``torch.distributed.checkpoint``'s loader does, on a
local model and on a sharded one alike:

1. place: the model's placement (:mod:`.placements`: local memory or DTensor shards), which
   names the coordinator of step 5;
2. open the source (:mod:`surgery.sources`; names, shapes and dtypes only);
3. plan (:mod:`.planner`) or take the given plan, and check it (:mod:`.check`): a
   :class:`~.check.CheckedPlan` carrying every fact the later steps need;
4. prepare (:mod:`.handlers`): everything that can fail, nothing written (the source checked,
   adapters run, modules that load themselves rehearsed, memory for a meta model checked);
5. agree (:mod:`.coordinators`): the identity for a local model, one collective exchange of
   plan fingerprints for a sharded one, so every rank fails alike or none writes;
6. commit: the placement's writer carries out every handler's writes, the only writes;
7. report (:mod:`.report`), derived from the plan and what commit did.

``dry_run`` stops after step 3 (a load that plans still agrees, so it fails alike).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .._args import require_module
from .._sysmem import gc_paused
from ..errors import LoadError, UsageError
from ..keys.remap import Remap
from ..keys.select import Selector
from ..sources import CheckpointLike, CheckpointSource
from .check import CheckedPlan, Initialise, check_plan, meta_to_initialise, strict_failure
from .coordinators import LocalCoordinator, Terms, plan_fingerprint
from .handlers import HANDLERS, Commit, Handler, Job, Prepared, Write, adapter_notes
from .options import LoadOptions, OnMismatch, load_options
from .placements import placement_for
from .plan import Adapter, PlanData
from .planner import make_plan
from .report import LoadReport, outcome_of, plan_html, report_of
from .verify import check_reads, verify_source

__all__ = ["LoadPlan", "apply_plan", "load_partial", "plan_load"]


@dataclass(repr=False)
class LoadPlan(PlanData):
    __doc__ = PlanData.__doc__

    def check(self, model: nn.Module) -> LoadPlan:
        """Validate the plan against ``model``; return the checked plan (this one unchanged).

        Raises what ``load_partial`` raises: ``LoadError`` for keys the model lacks, shapes
        that do not fit, ``strict`` failures, mismatches with ``on_mismatch="error"``, a plan
        that loads nothing, meta tensors nothing initialises; ``KeyCollisionError`` for a
        model key planned twice; ``UsageError`` for a malformed entry. The checked plan has
        one entry for every model key (keys left without one are ``missing``), ``load`` /
        ``cast`` and tie aliases re-derived from the model, and ``initialise`` exactly for
        missing keys on the ``meta`` device.

        Example:
            >>> plan.rename("classifier.weight", "fc.weight").check(model)  # doctest: +SKIP
        """
        require_module(model, "check")
        with gc_paused():
            state = model.state_dict(keep_vars=True)
            return check_plan(self, model, state, refuse_empty=True).plan  # type: ignore[return-value]

    def _repr_html_(self) -> str:
        """In a notebook: the table the load's report will show, and whether it is ok."""
        return plan_html(self)

    def apply(
        self, model: nn.Module, ckpt: CheckpointLike | None = None, **options: Any
    ) -> LoadReport:
        """Check the plan against ``model`` and carry it out: ``apply_plan(model, plan, ckpt,
        **options)``, with its options (``on_mismatch``, ``dry_run``, ``progress``, ``device``,
        ``allow_globals``, ``assign``); see :func:`surgery.apply_plan`.

        Example:
            >>> report = plan.apply(model)  # doctest: +SKIP
        """
        return apply_plan(model, self, ckpt, **options)


# --------------------------------------------------------------------------- public entry points


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
    assign: bool = False,
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
    the plan before any writes (see README "Sharded models" and surgery/loading/placements).

    ``assign=True`` puts the checkpoint's tensors in place of the model's, as
    ``load_state_dict(assign=True)`` does: one that needs no cast is taken as it lies in the
    file's private mapping or in memory, not copied, so parameters share pages with the file
    (never overwrite the file in place while the model lives); casts and adapters' values are
    new tensors. Parameters keep their class and ``requires_grad``, ties stay tied; they are
    new objects, so build optimizers after the load. It is still atomic. Made for
    :func:`empty_init` models; refused with ``device=``, for models on a GPU or sharded
    (docs/assign.md).

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
    opts = load_options(
        model,
        "load_partial",
        **dict(entry=entry, remap=remap, prefix=prefix, skip=skip, on_mismatch=on_mismatch),
        **dict(strict=strict, trust_pickle=trust_pickle, allow_globals=allow_globals),
        **dict(dry_run=dry_run, progress=progress, device=device, assign=assign),
    )
    return run(model, _Request(ckpt, opts, None, opts.adapter))


def plan_load(
    model: nn.Module,
    ckpt: CheckpointLike,
    *,
    entry: str | None = None,
    remap: Remap | None = None,
    prefix: Literal["auto"] | None = "auto",
    skip: Selector | Iterable[Selector] | None = None,
    on_mismatch: OnMismatch = "skip",
    strict: bool = False,
    trust_pickle: bool = False,
    allow_globals: Iterable[Any] | None = None,
) -> LoadPlan:
    """Plan loading ``ckpt`` into ``model`` without reading a tensor or touching the model.

    Takes the arguments of :func:`surgery.load_partial` (``entry`` picks the container entry
    holding the state dict, e.g. ``entry="state_dict_ema"``; ``allow_globals`` is kept on the
    plan for :meth:`LoadPlan.apply`, not saved by :meth:`LoadPlan.to_dict`) and raises what it
    raises (strict failures, key collisions, nothing matched, meta tensors nothing initialises, bad
    arguments). Only names, shapes and dtypes are read; adapters run at apply time. Review the
    plan (``print(plan)``), edit it, save it with ``json.dumps(plan.to_dict())``, then
    ``plan.apply(model)``.

    Example:
        >>> plan = surgery.plan_load(model, "resnet18.pth", skip="fc")  # doctest: +SKIP
        >>> plan.counts()  # doctest: +SKIP
        {'load': 120, 'skip': 2}
        >>> report = plan.apply(model)  # doctest: +SKIP
    """
    opts = load_options(
        model,
        "plan_load",
        **dict(entry=entry, remap=remap, prefix=prefix, skip=skip, on_mismatch=on_mismatch),
        **dict(strict=strict, trust_pickle=trust_pickle, allow_globals=allow_globals),
    )
    with gc_paused():
        source = opts.open(ckpt)
        try:
            state = model.state_dict(keep_vars=True)
            plan = _as_load_plan(make_plan(model, state, source, opts, HANDLERS, ckpt=ckpt).plan)
        finally:
            source.close()
    plan.allow_globals = tuple(allow_globals or ())
    return plan


def apply_plan(
    model: nn.Module,
    plan: LoadPlan,
    ckpt: CheckpointLike | None = None,
    *,
    on_mismatch: Adapter | None = None,
    dry_run: bool = False,
    progress: bool | None = None,
    device: str | torch.device | None = None,
    allow_globals: Iterable[Any] | None = None,
    assign: bool = False,
) -> LoadReport:
    """Check ``plan`` against ``model``, load what it says, and report what happened.

    ``ckpt`` defaults to what the plan was made from (the object passed to ``plan_load``, or
    ``plan.path`` for a plan read back from JSON). ``on_mismatch`` is the adapter for
    ``adapt`` entries, needed when the plan came from JSON. Whatever error is raised (the plan
    does not fit, an adapter fails or returns a wrong shape, the checkpoint changed since
    planning), the model is left as it was. ``dry_run=True`` checks and reports without
    reading a tensor (adapters are not run: ``adapt`` entries are reported as adapted).
    ``progress`` shows a tqdm bar of the bytes read, one per shard: ``None`` on a terminal
    for loads over about 1 GB, ``True`` always, ``False`` never. Tensors load onto the
    model's device whatever device the checkpoint was saved from; ``device`` places a meta
    model (see :func:`empty_init`) on that device (default CPU).
    ``allow_globals`` admits pickled classes when the checkpoint is read (default: those the
    plan was made with; a plan read back from JSON has none). ``assign=True`` puts the
    checkpoint's tensors in place of the model's, sharing the file's pages where no cast is
    needed (see :func:`surgery.load_partial`).

    Example:
        >>> plan = surgery.plan_load(model, "resnet18.pth")  # doctest: +SKIP
        >>> report = surgery.apply_plan(model, plan)  # doctest: +SKIP
    """
    require_module(model, "apply_plan")
    if not isinstance(plan, PlanData):
        raise UsageError(
            f"apply_plan needs a LoadPlan (from surgery.plan_load or LoadPlan.from_dict), got "
            f"{type(plan).__name__}"
        )
    if on_mismatch is not None and (not callable(on_mismatch) or isinstance(on_mismatch, type)):
        raise UsageError(
            f"on_mismatch must be an adapter callable (name, ckpt, model) -> Tensor | None, "
            f"not {on_mismatch!r}"
        )
    opts = load_options(
        model,
        "apply_plan",
        entry=plan.entry,
        trust_pickle=plan.trust_pickle,
        allow_globals=plan.allow_globals if allow_globals is None else allow_globals,
        **dict(dry_run=dry_run, progress=progress, device=device, assign=assign),
    )
    ckpt = (
        ckpt if ckpt is not None else plan.checkpoint if plan.checkpoint is not None else plan.path
    )
    return run(model, _Request(ckpt, opts, plan, on_mismatch or plan.adapter))


# --------------------------------------------------------------------------- the sequence


@dataclass(frozen=True)
class _Request:
    """One load: what to read and how, the plan to apply (``None``: plan it here) and the
    adapter for its ``adapt`` entries."""

    ckpt: Any
    opts: LoadOptions
    plan: PlanData | None
    adapter: Adapter | None


@dataclass
class _Ready:
    """A load prepared on this rank: its source (``None`` for a dry run of a given plan),
    checked plan, each handler's prepared part, the tensor writes as the placement will carry
    them out, what to initialise, adapters' declines."""

    source: CheckpointSource | None
    checked: CheckedPlan
    parts: list[Prepared] = field(default_factory=list)
    initialise: Initialise | None = None
    declined: set[str] = field(default_factory=set)
    writes: list[Write] = field(default_factory=list)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def run(model: nn.Module, request: _Request, handlers: Sequence[Handler] = HANDLERS) -> LoadReport:
    """Place, prepare (open, plan or check, prepare), agree, commit, report."""
    opts = request.opts
    with gc_paused():
        state = model.state_dict(keep_vars=True)
        placement = placement_for(model, state, opts.device, opts.assign)
        agreeing = not (opts.dry_run and request.plan is not None)  # a pure check: no source
        coordinator = placement.coordinator if agreeing else LocalCoordinator()
        ready = coordinator.agree(
            lambda: _prepare(model, state, placement, request, handlers),
            Terms(_fingerprint, lambda r: str(r.checked.plan.counts()), _Ready.close),
        )
        try:
            if not opts.dry_run:
                commit = Commit(state, ready.source, opts.progress, ready.initialise, opts.assign)
                writer = placement.writer(commit)
                writer.begin()
                writer.write(ready.writes)
                for h, part in zip(handlers, ready.parts, strict=True):
                    h.commit(part, writer)
        finally:
            ready.close()
    checked = ready.checked
    written = checked.written - {id(state[k]) for k in ready.declined}
    initialised = ready.initialise[1] if ready.initialise is not None else []
    outcome = outcome_of(state, written, initialised, ready.declined, checked.by_modules)
    if not opts.dry_run:
        outcome.notes = adapter_notes(request.adapter)
    return report_of(checked.plan, outcome, dry_run=opts.dry_run)


def _prepare(
    model: nn.Module,
    state: dict[str, Any],
    placement: Any,
    request: _Request,
    handlers: Sequence[Handler],
) -> _Ready:
    """Everything that can fail, on this rank, before anything is written."""
    opts, plan = request.opts, request.plan
    placement.check(state)
    if plan is not None:  # a given plan is checked before its source is opened
        checked = check_plan(plan, model, state, refuse_empty=not opts.dry_run)
        if opts.dry_run:
            return _Ready(None, checked, initialise=checked.initialise)
        _require_inputs(checked.plan, request)
    source = opts.open(request.ckpt)
    try:
        if plan is None:
            checked = make_plan(
                model, state, source, opts, handlers, ckpt=request.ckpt, sharded=placement.sharded
            )
            checked = dataclasses.replace(checked, plan=_as_load_plan(checked.plan))
            if opts.dry_run:
                return _Ready(source, checked, initialise=checked.initialise)
            check_reads(checked.plan.entries, source)
        else:
            verify_source(checked.plan.entries, source)
        return _prepared(checked, source, placement, request, handlers)
    except BaseException:
        source.close()
        raise


def _prepared(
    checked: CheckedPlan,
    source: CheckpointSource,
    placement: Any,
    request: _Request,
    handlers: Sequence[Handler],
) -> _Ready:
    """Each handler's prepared part, then what declines change: strict, meta to initialise."""
    adapter = placement.adapter(request.adapter)
    job = Job(checked, source, checked.model, adapter, request.plan is None, request.opts.assign)
    ready = _Ready(source, checked, [h.prepare(job) for h in handlers], checked.initialise)
    ready.declined = {k for p in ready.parts for k in p.declined}
    if ready.declined:
        if checked.plan.strict:
            raise LoadError(strict_failure(checked.plan, checked.state, ready.declined))
        if checked.initialise is not None:  # a declined meta tensor needs its module's init
            gone = {id(checked.state[k]) for k in ready.declined}
            ready.initialise = meta_to_initialise(checked.model, checked.written - gone)
    ready.writes = placement.prepare(checked, [w for p in ready.parts for w in p.writes], source)
    return ready


def _require_inputs(plan: PlanData, request: _Request) -> None:
    """A saved plan holds neither its adapter nor an in-memory checkpoint: both are asked for."""
    n_adapt = sum(1 for e in plan.entries if e.action == "adapt")
    if n_adapt and request.adapter is None:
        raise UsageError(
            f"the plan adapts {n_adapt} tensor(s) with {plan.on_mismatch!r}, which a saved "
            f"plan does not hold; pass it again: apply(model, on_mismatch={plan.on_mismatch})"
        )
    if request.ckpt is None:
        raise UsageError(
            f"the plan for {plan.source} has no checkpoint to read (it was made from an "
            "in-memory dict or module and saved); pass ckpt= to apply"
        )


def _fingerprint(ready: _Ready) -> str:
    """What this rank is about to write: the plan's entries and its prepared values."""
    values = {w.key: w.value for w in ready.writes if w.value is not None}
    return plan_fingerprint(ready.checked.plan.entries, values)  # type: ignore[arg-type]


def _as_load_plan(plan: PlanData) -> LoadPlan:
    """The public class of a plan the planner built."""
    if isinstance(plan, LoadPlan):
        return plan
    return LoadPlan(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(PlanData)})
