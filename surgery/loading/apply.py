"""Carry out a :class:`~surgery.plan.LoadPlan`: the only step that writes into a model.

The plan is checked against the model first. Adapters (``adapt`` entries) then run, reading
only their own checkpoint tensors; any failure is raised before the first write, so the model
is unchanged. Then meta modules are materialised and tensors stream one at a time from the
file straight into the model's memory (peak near one copy; skipped tensors are never read).
The :class:`~surgery.report.LoadReport` is derived from the plan and what apply did, here only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import _progress, meta
from .._sysmem import available_memory, format_bytes
from .._table import first_n_lines, format_shape
from ..errors import LoadError, SurgeryError, UsageError
from ..sources import CheckpointLike, CheckpointSource, open_source
from ..sources.dcp import DCPSource
from ..sources.memory import MemorySource
from . import distributed as _dist
from . import selfload as _selfload
from .plan import (
    WRITES,
    Adapter,
    LoadPlan,
    PlanEntry,
    copy_failure,
    copy_problems,
    dtype_name,
    gc_paused,
    meta_to_initialise,
    require_module,
    strict_failure,
    validate,
)
from .report import LoadReport, Mismatch

__all__ = ["apply_plan"]

_LIST = 12


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
    model (see :func:`empty_init`) on that device (default CPU), see :func:`check_device`.
    ``allow_globals`` admits pickled classes when the checkpoint is read (default: those the
    plan was made with; a plan read back from JSON has none).

    Example:
        >>> plan = surgery.plan_load(model, "resnet18.pth")  # doctest: +SKIP
        >>> report = surgery.apply_plan(model, plan)  # doctest: +SKIP
    """
    require_module(model, "apply_plan")
    if not isinstance(plan, LoadPlan):
        raise UsageError(
            f"apply_plan needs a LoadPlan (from surgery.plan_load or LoadPlan.from_dict), got "
            f"{type(plan).__name__}"
        )
    if on_mismatch is not None and (not callable(on_mismatch) or isinstance(on_mismatch, type)):
        raise UsageError(
            f"on_mismatch must be an adapter callable (name, ckpt, model) -> Tensor | None, "
            f"not {on_mismatch!r}"
        )
    if not isinstance(dry_run, bool):
        raise UsageError(f"dry_run must be True or False, not {dry_run!r}")
    _progress.check(progress)
    with gc_paused():
        state = model.state_dict(keep_vars=True)
        dev = check_device(state, device)
        checked = validate(plan, model, state, refuse_empty=not dry_run)
        if dry_run:
            return preview(checked, model, state)
        adapter = on_mismatch or plan.adapter
        n_adapt = sum(1 for e in checked.entries if e.action == "adapt")
        if n_adapt and adapter is None:
            raise UsageError(
                f"the plan adapts {n_adapt} tensor(s) with {plan.on_mismatch!r}, which a saved "
                f"plan does not hold; pass it again: apply(model, on_mismatch={plan.on_mismatch})"
            )
        if ckpt is None:
            ckpt = plan.checkpoint if plan.checkpoint is not None else plan.path
        if ckpt is None:
            raise UsageError(
                f"the plan for {plan.source} has no checkpoint to read (it was made from an "
                "in-memory dict or module and saved); pass ckpt= to apply"
            )
        allowed = plan.allow_globals if allow_globals is None else allow_globals

        def open_() -> CheckpointSource:
            return open_source(
                ckpt, entry=plan.entry, trust_pickle=plan.trust_pickle, allow_globals=allowed
            )

        if _dist.is_sharded(model):  # DTensor parameters: every rank applies the same plan
            return apply_sharded_plan(checked, model, state, open_, adapter)
        source = open_()
        try:
            return run(checked, model, state, source, adapter, progress, dev)
        finally:
            source.close()


# --------------------------------------------------------------------------- outcome


@dataclass
class Outcome:
    """What apply did (or, for a dry run, would do): the facts a report adds to its plan."""

    loaded: list[str] = field(default_factory=list)  # model keys given a value, ties included
    declined: set[str] = field(default_factory=set)  # adapt entries whose adapter said None
    notes: list[str] = field(default_factory=list)  # what the adapter said it did
    initialised: list[str] = field(default_factory=list)
    # LoadReport's count fields by name: tensors_/params_/buffers_ + loaded/total
    counts: Counter[str] = field(default_factory=Counter)


def _outcome(
    state: Mapping[str, Tensor],
    written: set[int],
    initialised: list[str],
    declined: set[str],
    written_keys: set[str] = frozenset(),  # type: ignore[assignment]
) -> Outcome:
    """``written_keys`` names keys given a value by their module's own loading (an extra
    state, a quantized module's packed weights): not tensors of the model, or not the same
    object on every ``state_dict()`` call. Only tensors are counted."""
    out = Outcome(declined=declined, initialised=initialised)
    counts = out.counts
    seen: set[int] = set()
    for mkey, t in state.items():
        tid = id(t)
        hit = tid in written or mkey in written_keys
        if hit:
            out.loaded.append(mkey)
        if tid in seen or not isinstance(t, Tensor):
            continue
        seen.add(tid)
        if isinstance(t, nn.Parameter):
            n = t.numel()
            counts["tensors_total"] += 1
            counts["params_total"] += n
            if hit:
                counts["tensors_loaded"] += 1
                counts["params_loaded"] += n
        else:
            counts["buffers_total"] += 1
            counts["buffers_loaded"] += hit
    return out


def _written(plan: LoadPlan, state: Mapping[str, Tensor], declined: set[str]) -> set[int]:
    return {
        id(state[e.model_key])  # type: ignore[index]
        for e in plan.entries
        if e.action in WRITES and e.model_key not in declined and e.model_key is not None
    }


def _by_modules(plan: LoadPlan) -> set[str]:
    """Model keys that their module's own loading gives a value."""
    return {
        e.model_key
        for e in plan.entries
        if e.via is not None and e.action in WRITES and e.model_key
    }


def _any_meta(state: Mapping[str, Tensor]) -> bool:
    return any(isinstance(t, Tensor) and t.is_meta for t in state.values())


def preview(plan: LoadPlan, model: nn.Module, state: Mapping[str, Tensor]) -> LoadReport:
    """The report of a checked plan, without applying it (``dry_run``)."""
    written = _written(plan, state, set())
    initialised: list[str] = []
    if _any_meta(state):
        initialised = meta_to_initialise(model, written)[1]
    outcome = _outcome(state, written, initialised, set(), _by_modules(plan))
    return report_of(plan, outcome, dry_run=True)


def report_of(plan: LoadPlan, outcome: Outcome, *, dry_run: bool) -> LoadReport:
    """The one place a :class:`LoadReport` is assembled: from a plan and its outcome."""
    report = LoadReport(
        source=plan.source,
        model=plan.model,
        prefix=plan.prefix,
        notes=[*plan.notes, *outcome.notes],
        loaded=outcome.loaded,
        initialised=outcome.initialised,
        dry_run=dry_run,
        **outcome.counts,
    )
    for e in plan.entries:
        a = e.action
        if e.tied_to:  # a tied tensor is reported once, by the key that carries it
            if e.model_key is not None:
                report.tied[e.model_key] = e.tied_to
            continue
        if e.ckpt_key is not None and e.model_key is not None and e.ckpt_key != e.model_key:
            report.renamed[e.ckpt_key] = e.model_key
        if a == "load":
            continue
        if a == "cast":
            report.cast.append((e.model_key, e.ckpt_dtype, e.model_dtype))  # type: ignore[arg-type]
        elif a in ("adapt", "mismatch"):
            m = Mismatch(str(e.model_key), tuple(e.ckpt_shape or ()), tuple(e.model_shape or ()))
            if a == "adapt" and e.model_key not in outcome.declined:
                report.adapted.append(m)
            else:
                report.mismatched.append(m)
        elif a == "skip":
            report.skipped.append(e.key)
        elif a in ("missing", "initialise"):
            report.missing.append(e.key)
        elif a == "unexpected":
            report.unexpected.append(e.key)
        elif a == "defaulted":
            report.defaulted.append(e.key)
        elif a == "adapter":
            report.adapter.append(e.key)
    return report


# --------------------------------------------------------------------------- applying


def run(
    plan: LoadPlan,
    model: nn.Module,
    state: dict[str, Tensor],
    source: CheckpointSource,
    adapter: Adapter | None,
    progress: bool | None = None,
    device: torch.device | None = None,
) -> LoadReport:
    """Apply a checked plan: verify the source, run adapters, then write. Errors come first.

    ``progress`` shows a bar of the bytes read (see :mod:`surgery._progress`); ``device``
    (from :func:`check_device`) is where a meta model is materialised (``None``: CPU)."""
    _verify_source(plan, source)
    values, declined = _run_adapters(plan, state, source, adapter)
    if plan.strict and declined:
        raise LoadError(strict_failure(plan, state, declined))
    # Modules that load themselves: their own loading, rehearsed on private copies.
    rehearsed = _selfload.rehearse_plan(plan, _selfload.Index(_selfload.find_units(model)), source)
    written = _written(plan, state, declined)
    init_modules: list[nn.Module] = []
    initialised: list[str] = []
    if _any_meta(state):
        init_modules, initialised = meta_to_initialise(model, written)
        _check_memory(model, state)
    outcome = _outcome(state, written, initialised, declined, _by_modules(plan))
    outcome.notes = _adapter_notes(adapter)
    _write(model, plan, state, source, values, init_modules, progress, device)
    _selfload.commit(model, rehearsed, source)
    return report_of(plan, outcome, dry_run=False)


def apply_sharded_plan(
    plan: LoadPlan,
    model: nn.Module,
    state: dict[str, Tensor],
    open_: Callable[[], CheckpointSource],
    adapter: Adapter | None,
    make: Callable[[CheckpointSource], LoadPlan] | None = None,
) -> LoadReport:
    """Apply a plan to a sharded model (DTensor parameters); collective, see
    surgery/distributed.py. Every rank opens the source (``open_``), plans (``make``, or
    takes ``plan`` as it is), verifies it and runs adapters on full tensors; one
    :func:`~surgery.distributed.agree` then checks that every rank succeeded with the same
    plan before any rank writes. Each rank then reads only its own shards."""
    model_name = _dist.model_class_name(model)
    wrapped = _dist.global_view(adapter) if adapter is not None else None

    def prepare() -> tuple[CheckpointSource, LoadPlan, dict[str, Tensor], set[str]]:
        _dist.check_materialised(state, model_name)
        source = open_()
        try:
            checked = make(source) if make is not None else plan
            _verify_source(checked, source)
            values, declined = _run_adapters(checked, state, source, wrapped)
            if checked.strict and declined:
                raise LoadError(strict_failure(checked, state, declined))
        except BaseException:
            source.close()
            raise
        adapted: dict[str, Tensor] = {}
        for e in checked.entries:
            k = (id(state[str(e.model_key)]), str(e.ckpt_key)) if e.model_key else None
            if e.action == "adapt" and k in values:
                adapted[str(e.model_key)] = values[k]
        return source, checked, adapted, declined

    with gc_paused():
        source, checked, adapted, declined = _dist.agree(
            prepare,
            fingerprint=lambda r: _dist.plan_fingerprint(r[1].entries, r[2]),
            summary=lambda r: str(r[1].counts()),
            abort=lambda r: r[0].close(),
        )
        try:
            via = [e.key for e in checked.entries if e.via is not None and e.action in WRITES]
            if via:
                raise UsageError(
                    f"{model_name} is sharded and has modules that load themselves "
                    f"({', '.join(via[:5])}); surgery cannot load those into DTensors"
                )
            loads = [
                (str(e.model_key), str(e.ckpt_key))
                for e in checked.entries
                if e.action in ("load", "cast") and not e.tied_to
            ]
            loads = list(dict.fromkeys(loads))
            _dist.apply_sharded(source, state, loads, adapted)
        finally:
            source.close()
    written = _written(checked, state, declined)
    outcome = _outcome(state, written, [], declined, _by_modules(checked))
    outcome.notes = _adapter_notes(adapter)
    return report_of(checked, outcome, dry_run=False)


def _check_memory(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Refuse, before the first write, to materialise meta tensors that do not fit in memory."""
    sizes: dict[int, int] = {}
    for t in state.values():
        if t.is_meta:
            sizes[id(t)] = t.numel() * t.element_size()
    need = sum(sizes.values())
    free = available_memory()
    if free is not None and need > free:
        raise LoadError(
            f"materialising {type(model).__name__} from the meta device needs "
            f"{format_bytes(need)} of memory, only {format_bytes(free)} is available. Nothing "
            "was loaded. Load a part of it (skip=...), a smaller dtype (model.to(torch.float16) "
            "before loading), or on a machine with more memory."
        )


def _adapter_notes(adapter: Adapter | None) -> list[str]:
    """Lines an adapter offers about what it did (``head_rows`` lists rows kept and new labels)."""
    notes = getattr(adapter, "notes", None)
    if not callable(notes):
        return []
    try:
        return [str(n) for n in notes()]
    except Exception:  # an adapter's report must never fail a load that succeeded
        return []


def _verify_source(plan: LoadPlan, source: CheckpointSource) -> None:
    """Every tensor the plan reads is in the checkpoint with the planned shape and dtype."""
    specs = source.specs
    bad: list[str] = []
    carriers = {e.model_key: e for e in plan.entries if e.action in WRITES and not e.tied_to}
    for e in plan.entries:
        if e.action not in WRITES or (e.via is not None and e.ckpt_key is None):
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
    if not bad:
        problems = copy_problems(plan, source)
        if problems:
            raise LoadError(copy_failure(problems, source.description))
        # Every file the writes will read is there in full (DCP folders: each chunk's file).
        source.check_reads(
            str(e.ckpt_key) for e in plan.entries if e.action in WRITES and e.ckpt_key in specs
        )
    if bad:
        raise LoadError(
            f"{source.description} does not hold what the plan reads ({len(bad)} tensors):\n"
            + "\n".join(first_n_lines(bad, _LIST))
            + "\nNothing was loaded. Pass the checkpoint the plan was made from (ckpt=...), "
            "or plan again with surgery.plan_load()."
        )


def _run_adapters(
    plan: LoadPlan,
    state: dict[str, Tensor],
    source: CheckpointSource,
    adapter: Adapter | None,
) -> tuple[dict[tuple[int, str], Tensor], set[str]]:
    """Adapted values by (id(model tensor), checkpoint key), and the model keys declined."""
    values: dict[tuple[int, str], Tensor] = {}
    declined_ids: set[tuple[int, str]] = set()
    declined: set[str] = set()
    # One checkpoint tensor adapted into several model tensors of one shape and dtype (a PEFT
    # modules_to_save copy and its original_module) is adapted once, so the copies agree.
    first: dict[tuple[str, tuple[int, ...], torch.dtype], tuple[int, str]] = {}
    name = plan.on_mismatch
    # A layer's weight before its bias (safetensors files sort 'fc.bias' first): an adapter
    # that initialises new rows needs the weight's fan-in before it sees the bias.
    adapt = sorted(
        (e for e in plan.entries if e.action == "adapt" and not e.tied_to),
        key=lambda e: (str(e.model_key).rpartition(".")[0], -len(e.model_shape or ())),
    )
    for e in adapt:
        mkey, ckey = str(e.model_key), str(e.ckpt_key)
        target = state[mkey]
        k = (id(target), ckey)
        if k in declined_ids:
            declined.add(mkey)
            continue
        if k in values:
            continue
        same = first.setdefault((ckey, tuple(target.shape), target.dtype), k)
        if same != k:
            if same in declined_ids:
                declined_ids.add(k)
                declined.add(mkey)
            else:
                values[k] = values[same]
            continue
        try:
            value = adapter(mkey, source.read(ckey), target)  # type: ignore[misc]
        except SurgeryError:
            raise
        except Exception as ex:
            raise LoadError(
                f"on_mismatch adapter raised {type(ex).__name__} for '{mkey}' ({name}) "
                f"(checkpoint {format_shape(e.ckpt_shape)} into model "
                f"{format_shape(target.shape)}): {ex}. Nothing was loaded."
            ) from ex
        if value is None:
            declined_ids.add(k)
            declined.add(mkey)
            continue
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(target.shape):
            got = format_shape(value.shape) if isinstance(value, Tensor) else repr(value)
            raise LoadError(
                f"on_mismatch adapter returned {got} for '{mkey}' ({name}), but the model "
                f"expects {format_shape(target.shape)}; return a tensor of that shape "
                "or None to skip it. Nothing was loaded."
            )
        values[k] = value.detach()
    return values, declined


@torch.no_grad()
def _write(
    model: nn.Module,
    plan: LoadPlan,
    state: dict[str, Tensor],
    source: CheckpointSource,
    adapted: dict[tuple[int, str], Tensor],
    init_modules: list[nn.Module],
    progress: bool | None = None,
    device: torch.device | None = None,
) -> None:
    owners = meta.holders(model) if _any_meta(state) else {}
    replaced: dict[int, Tensor] = {}
    dev = device or torch.device("cpu")

    def current(t: Tensor) -> Tensor:
        return replaced.get(id(t), t)

    # A meta model placed on a device: its real tensors (buffers computed in __init__, kept on
    # CPU by empty_init) join it there, before anything is loaded into them.
    if owners and device is not None:
        for where in owners.values():
            mod, name, is_param = where[0]
            t = (mod._parameters if is_param else mod._buffers)[name]
            if not t.is_meta and t.device != dev:
                replaced[id(t)] = meta.replace(t, t.to(dev), where)

    # Modules with tensors the checkpoint lacks: materialise (zeros) and reset them first, so
    # the loads below land on real memory and are not overwritten by the reset.
    for mod in init_modules:
        for t in [*mod._parameters.values(), *mod._buffers.values()]:
            if t is not None and t.is_meta and id(t) not in replaced:
                new = torch.zeros(t.shape, dtype=t.dtype, device=dev)
                replaced[id(t)] = meta.replace(t, new, owners[id(t)])
        mod.reset_parameters()

    # What to write, once per (tensor, checkpoint key) (a tied tensor is written once), grouped
    # by the file it is read from so a sharded checkpoint is read shard by shard.
    todo: list[tuple[PlanEntry, Tensor, str, str, int]] = []
    done: set[tuple[int, str]] = set()
    files: dict[str, int] = {}  # file -> bytes read from it, in reading order
    for e in plan.entries:
        if e.action not in WRITES or e.via is not None or e.tied_to:  # via: its module's own
            continue  # loading; tied_to: an alias, written through the key that carries it
        orig = state[e.model_key]  # type: ignore[index]
        ckey = str(e.ckpt_key)
        k = (id(orig), ckey)
        if k in done or (e.action == "adapt" and k not in adapted):  # declined by the adapter
            continue
        done.add(k)
        shape, dtype = source.specs[ckey]
        nbytes = shape.numel() * dtype.itemsize
        file = source.files.get(ckey, source.description)
        files[file] = files.get(file, 0) + nbytes
        todo.append((e, orig, ckey, file, nbytes))
    if len(files) > 1:
        order = {f: i for i, f in enumerate(files)}
        todo.sort(key=lambda item: order[item[3]])

    if isinstance(source, DCPSource):
        # A DCP folder: one dcp.load for every tensor already in real memory (per-key loads
        # would each re-plan and re-open the folder).
        batch: dict[str, Tensor] = {}
        for e, orig, ckey, _, _ in todo:
            if e.action != "adapt" and not current(orig).is_meta and not current(orig).is_cuda:
                batch.setdefault(ckey, current(orig))
        batched = [t for t in todo if batch.get(t[2]) is current(t[1])]
        todo = [t for t in todo if batch.get(t[2]) is not current(t[1])]
    staging = _Staging()
    with _progress.Bars(files, progress) as bars:
        try:
            if isinstance(source, DCPSource):
                source.read_many_into(batch)
                for _, _, _, file, nbytes in batched:
                    bars.update(file, nbytes)
            for e, orig, ckey, file, nbytes in todo:
                target = current(orig)
                fresh = target.is_meta
                if fresh:
                    target = torch.empty(target.shape, dtype=target.dtype, device=dev)
                if e.action == "adapt":
                    target.copy_(adapted[(id(orig), ckey)])
                elif target.is_cuda and not _in_device_memory(source, ckey):
                    staging.read_into(source, ckey, target)
                else:
                    source.read_into(ckey, target)
                if fresh:
                    replaced[id(orig)] = meta.replace(current(orig), target, owners[id(orig)])
                bars.update(file, nbytes)
        finally:
            staging.finish()


def _in_device_memory(source: CheckpointSource, key: str) -> bool:
    """An in-memory source's tensor already on a GPU: copied device to device, not staged."""
    return isinstance(source, MemorySource) and source.read(key).device.type != "cpu"


def check_device(
    state: Mapping[str, Tensor], device: str | torch.device | None
) -> torch.device | None:
    """The device a meta model is materialised on, checked before anything is written.

    ``None`` keeps today's rule: tensors load onto the device the model's tensors are on
    (a meta model's on CPU). A device places a meta model's tensors there; a model that is not
    on ``meta`` and has tensors on another device is refused rather than moved.
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as ex:
        raise UsageError(
            f"device={device!r} is not a torch device; pass 'cpu', 'cuda', 'cuda:1', ..."
        ) from ex
    if dev.type == "meta":
        raise UsageError(
            "device='meta' would load nothing; build the model under surgery.empty_init() and "
            "pass the device to put it on (device='cpu' or 'cuda')"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device={device!r}, but torch.cuda.is_available() is False here; pass "
                "device='cpu' or leave it out"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    tensors = [t for t in state.values() if isinstance(t, Tensor)]
    if not any(t.is_meta for t in tensors):
        elsewhere = sorted({str(t.device) for t in tensors if t.device != dev})
        if elsewhere:
            raise UsageError(
                f"the model already lives on {', '.join(elsewhere)}; device= only places a meta "
                f"model's tensors (built under surgery.empty_init()). Leave device= out to "
                f"load onto the model's device, or move it first with model.to('{dev}')."
            )
    return dev


class _Staging:
    """Reads into CUDA memory through page-locked (pinned) CPU buffers.

    The file is read into a pinned buffer, then copied with ``non_blocking=True``, so reading
    the next tensor overlaps copying this one. Two buffers alternate; each is reused only
    after the copy out of it has finished (a CUDA event). ``pin=False`` (tests without a GPU)
    uses ordinary memory and the same bookkeeping.
    """

    def __init__(self, pin: bool = True) -> None:
        self._pin = pin
        self._buffers: list[Tensor | None] = [None, None]
        self._events: list[object | None] = [None, None]
        self._turn = 0

    def read_into(self, source: CheckpointSource, key: str, out: Tensor) -> None:
        i, self._turn = self._turn, self._turn ^ 1
        self._wait(i)
        nbytes = out.numel() * out.element_size()
        buf = self._buffers[i]
        if buf is None or buf.numel() < nbytes:
            self._buffers[i] = None  # free the smaller buffer before taking a larger one
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self._pin)
            self._buffers[i] = buf
        staged = buf[:nbytes].view(out.dtype).view(out.shape)
        source.read_into(key, staged)
        out.copy_(staged, non_blocking=self._pin)
        if out.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(out.device))
            self._events[i] = event

    def _wait(self, i: int) -> None:
        event = self._events[i]
        if event is not None:
            event.synchronize()  # type: ignore[attr-defined]
            self._events[i] = None

    def finish(self) -> None:
        """Wait for every copy still in flight, so the model's tensors are ready."""
        for i in range(len(self._events)):
            self._wait(i)
