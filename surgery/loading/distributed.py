"""Partial loads into sharded models: DTensor parameters from FSDP2 or tensor parallelism.

``load_partial`` sends a model here when any of its tensors is a ``DTensor``. It must then be
called on every rank of the default process group, with the same model and arguments. The
steps:

1. every rank plans from checkpoint metadata alone (global shapes, so the plan and the
   ``LoadReport`` are the same on every rank and count global parameters);
2. :func:`agree`: one ``all_gather_object`` of each rank's outcome before any write. If planning
   failed on any rank, or the ranks planned differently, every rank raises the same error and
   no rank has written anything;
3. :func:`apply_sharded` writes: from a DCP folder with one collective ``dcp.load`` of the
   model's own DTensors keyed by checkpoint names (each rank reads only its shards, DCP casts
   dtypes); from safetensors / torch files, each rank reads only the block of rows it owns
   where the file layout allows. Adapted tensors (``on_mismatch`` callables) are computed at
   full size during planning, then sharded with ``distribute_tensor``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..errors import DistributedError, UsageError
from ..sources import CheckpointSource
from ..sources.dcp import DCPSource

__all__ = [
    "agree",
    "apply_sharded",
    "global_view",
    "is_sharded",
    "model_class_name",
    "plan_fingerprint",
]

T = TypeVar("T")
Adapter = Callable[[str, Tensor, Tensor], Tensor | None]


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter or buffer of ``model`` is a ``DTensor`` (FSDP2, TP, ...).

    Example:
        >>> import torch
        >>> is_sharded(torch.nn.Linear(2, 2))
        False
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    dtensor = _dtensor_type()
    return any(isinstance(t, dtensor) for t in [*model.parameters(), *model.buffers()])


def model_class_name(model: nn.Module) -> str:
    """The model's class name, not the ``FSDP<Name>`` class ``fully_shard`` swaps in.

    Example:
        >>> model_class_name(torch.nn.Linear(2, 2))
        'Linear'
    """
    cls = type(model)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if issubclass(cls, FSDPModule):
            cls = next((c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule)), cls)
    return cls.__name__


def global_view(adapter: Adapter) -> Adapter:
    """Wrap an ``on_mismatch`` adapter so it sees a DTensor target as a full-size meta tensor.

    An adapter maps ``(name, checkpoint tensor, model tensor)`` to a tensor of the model's
    (global) shape. On a sharded model it gets a ``meta`` tensor with the global shape and
    dtype: enough to decide the output shape, and no collective during planning. Its result
    is sharded afterwards by :func:`apply_sharded`.
    """
    dtensor = _dtensor_type()

    def call(name: str, ckpt: Tensor, model: Tensor) -> Tensor | None:
        if dtensor is not None and isinstance(model, dtensor):
            model = torch.empty(model.shape, dtype=model.dtype, device="meta")
        return adapter(name, ckpt, model)

    return call


# --------------------------------------------------------------------------- agreement


def plan_fingerprint(entries: Iterable[Any], adapted: dict[str, Tensor]) -> str:
    """A digest of what a rank is about to write: its plan entries (``PlanEntry.to_dict``)
    and the shapes and dtypes of its adapted values. The source's path is left out, so ranks
    may read node-local copies.

    Example:
        >>> plan_fingerprint([], {}) == plan_fingerprint([], {})
        True
    """
    payload = {
        "entries": [e.to_dict() for e in entries],
        "adapted": {k: [list(v.shape), str(v.dtype)] for k, v in sorted(adapted.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def agree(
    plan: Callable[[], T],
    *,
    fingerprint: Callable[[T], str],
    summary: Callable[[T], str],
    abort: Callable[[T], None] = lambda _: None,
) -> T:
    """Run ``plan()`` on this rank, then check with every rank (one ``all_gather_object``).

    Returns this rank's result when every rank planned without error and the same
    ``fingerprint``. Otherwise every rank raises the same error: the planning error itself
    when all ranks failed alike, else a :class:`DistributedError` naming each failing rank and
    its error (or the ranks whose plans differ, with their ``summary``). ``abort`` releases a
    result that will not be used. A rank that dies outside ``plan()`` leaves the others
    waiting in the collective, as any collective does.
    """
    import torch.distributed as dist

    result: Any = None
    error: BaseException | None = None
    try:
        result = plan()
        mine: tuple = ("ok", fingerprint(result), summary(result))
    except Exception as e:
        error = e
        mine = ("error", type(e).__name__, str(e))
    world = dist.get_world_size()
    outcomes: list[Any] = [None] * world
    dist.all_gather_object(outcomes, mine)

    failed = {r: o for r, o in enumerate(outcomes) if o[0] == "error"}
    if failed:
        if error is not None and len(failed) == world and len(set(outcomes)) == 1:
            raise error  # the same error on every rank: raise it as it is
        if result is not None:
            abort(result)
        lines = [f"    rank {r}: {name}: {msg}" for r, (_, name, msg) in sorted(failed.items())]
        ranks = ", ".join(str(r) for r in sorted(failed))
        message = (
            f"load_partial failed on rank{'s' * (len(failed) > 1)} {ranks} of {world}, so no "
            "rank loaded anything:\n" + "\n".join(lines) + "\nFix the error above; every rank "
            "must be able to open the checkpoint and plan the same load."
        )
        if error is not None:
            raise DistributedError(message) from error
        raise DistributedError(message)

    prints = [o[1] for o in outcomes]
    if len(set(prints)) > 1:
        abort(result)
        groups: dict[str, list[int]] = {}
        for r, p in enumerate(prints):
            groups.setdefault(p, []).append(r)
        lines = [
            f"    rank{'s' * (len(rs) > 1)} {', '.join(map(str, rs))}: {outcomes[rs[0]][2]}"
            for rs in groups.values()
        ]
        raise DistributedError(
            f"load_partial planned different loads on different ranks ({len(groups)} "
            "versions), so no rank loaded anything:\n" + "\n".join(lines) + "\nEvery rank "
            "must hold the same model (FSDP / tensor-parallel shards of one model, not "
            "pipeline stages) and pass the same checkpoint and arguments."
        )
    return result


# --------------------------------------------------------------------------- writing


def check_materialised(state: dict[str, Tensor], model_name: str) -> None:
    """Refuse DTensors whose memory is not allocated yet (FSDP2 built on ``meta``)."""
    dtensor = _dtensor_type()
    pending = [
        k
        for k, t in state.items()
        if t.is_meta or (isinstance(t, dtensor) and t.to_local().is_meta)
    ]
    if pending:
        more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
        raise UsageError(
            f"{model_name} is sharded and still on the meta device ({', '.join(pending[:5])}"
            f"{more}). Allocate its shards first with model.to_empty(device=...), then call "
            "load_partial; tensors the checkpoint lacks need your own initialisation."
        )


@torch.no_grad()
def apply_sharded(
    source: CheckpointSource,
    state: dict[str, Tensor],
    loads: list[tuple[str, str]],
    adapted: dict[str, Tensor],
) -> None:
    """Write a plan agreed by :func:`agree` into the model's local shards. Collective: every
    rank calls it with the same ``loads`` and ``adapted`` (in the same order)."""
    if isinstance(source, DCPSource):
        # One collective dcp.load of the model's own tensors under their checkpoint names:
        # DCP reads each rank's shards straight into them and casts dtypes.
        if loads:
            source.load_many({ckey: state[mkey] for mkey, ckey in loads}, no_dist=False)
    else:
        for mkey, ckey in loads:
            _read_local(source, ckey, state[mkey])
    for mkey, value in adapted.items():
        _copy_full(state[mkey], value)


def _local_box(t: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(global offset, local shape) of this rank's shard when it is one box of the global
    tensor (Shard/Replicate placements); ``None`` for other layouts (strided shards, ...)."""
    from torch.distributed.tensor import Replicate, Shard

    if not all(type(p) is Shard or isinstance(p, Replicate) for p in t.placements):
        return None
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # a private helper; without it, take the full-tensor path
        return None
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(offset), tuple(shape)


def _read_local(source: CheckpointSource, ckey: str, target: Tensor) -> None:
    dtensor = _dtensor_type()
    if not isinstance(target, dtensor):
        source.read_into(ckey, target)  # a replicated plain tensor (FSDP2 keeps buffers whole)
        return
    local = target.to_local()
    box = _local_box(target)
    if box is not None and box[1] == tuple(local.shape):
        source.read_region_into(ckey, box[0], local)
        return
    # A layout whose shard is not one block: read the whole tensor, cut out this rank's part.
    from torch.distributed.tensor import distribute_tensor

    full = source.read(ckey).to(target.dtype)
    part = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
    local.copy_(part.to_local())


def _copy_full(target: Tensor, value: Tensor) -> None:
    """Copy a full-size ``value`` into ``target``; for a DTensor, rank 0's value is scattered
    (so an adapter that draws random numbers still gives one consistent tensor)."""
    dtensor = _dtensor_type()
    value = value.to(target.dtype)
    if not isinstance(target, dtensor):
        target.copy_(value)
        return
    from torch.distributed.tensor import distribute_tensor

    part = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=0)
    target.to_local().copy_(part.to_local())
