"""Sharded models: DTensor parameters from FSDP2 ``fully_shard`` or tensor parallelism.

A load into such a model runs the same pipeline as any other, on every rank of the default
process group, with the same model and arguments: every rank plans from checkpoint metadata
alone (global shapes, so the plan and the ``LoadReport`` are the same on every rank and count
global parameters) and prepares; the collective coordinator (one ``all_gather_object``) checks
that every rank succeeded with the same plan before any rank writes. :class:`ShardedWriter`
then writes each rank's shards: from a source that reads DTensors itself (a DCP folder, one
collective ``dcp.load`` of the model's own DTensors keyed by checkpoint names: each rank reads
only its shards, DCP casts dtypes), else each rank reads only the block of rows it owns where
the file layout allows. Prepared values (``on_mismatch`` adapters, which see a full-size meta
target) are computed at full size, then sharded with ``distribute_tensor`` from rank 0's copy.
Modules that load themselves are refused while planning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..._args import model_class_name
from ...errors import UsageError
from ...sources import CheckpointSource
from ..check import CheckedPlan
from ..coordinators import CollectiveCoordinator
from ..handlers import Commit, Write
from ..plan import Adapter

__all__ = ["ShardedPlacement", "ShardedWriter", "global_view", "is_sharded"]


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


class ShardedPlacement:
    """A model whose tensors are DTensors: ranks agree through a collective before writing."""

    sharded = True

    def __init__(
        self, model: nn.Module, state: Mapping[str, Any], device: Any, assign: bool = False
    ) -> None:
        if assign:
            raise UsageError(
                f"assign=True puts whole checkpoint tensors in place of the model's; "
                f"{model_class_name(model)} is sharded (DTensor parameters), so each rank keeps "
                "only its shards. Leave assign out: every rank reads its shards straight into "
                "the memory they have."
            )
        if device is not None:
            raise UsageError(
                f"device={device!r} places a meta model's tensors; {type(model).__name__} is "
                "sharded and its shards are placed already. Leave device= out."
            )
        self.model = model
        self.coordinator = CollectiveCoordinator()

    def adapter(self, adapter: Adapter | None) -> Adapter | None:
        return global_view(adapter) if adapter is not None else None

    def check(self, state: Mapping[str, Any]) -> None:
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
                f"{model_class_name(self.model)} is sharded and still on the meta device "
                f"({', '.join(pending[:5])}{more}). Allocate its shards first with "
                "model.to_empty(device=...), then call load_partial; tensors the checkpoint "
                "lacks need your own initialisation."
            )

    def prepare(
        self, checked: CheckedPlan, writes: list[Write], source: CheckpointSource
    ) -> list[Write]:
        """Nothing more: the shards were checked before planning; the writes stay as they are."""
        return writes

    def writer(self, commit: Commit) -> ShardedWriter:
        return ShardedWriter(commit.source)


def global_view(adapter: Adapter) -> Adapter:
    """Wrap an ``on_mismatch`` adapter so it sees a DTensor target as a full-size meta tensor.

    An adapter maps ``(name, checkpoint tensor, model tensor)`` to a tensor of the model's
    (global) shape. On a sharded model it gets a ``meta`` tensor with the global shape and
    dtype: enough to decide the output shape, and no collective during planning. Its result
    is sharded afterwards by the writer.
    """
    dtensor = _dtensor_type()

    def call(name: str, ckpt: Tensor, model: Tensor) -> Tensor | None:
        if dtensor is not None and isinstance(model, dtensor):
            model = torch.empty(model.shape, dtype=model.dtype, device="meta")
        return adapter(name, ckpt, model)

    return call


class ShardedWriter:
    """Writes an agreed load into the model's local shards. Collective: every rank calls it
    with the same writes, in the same order."""

    def __init__(self, source: CheckpointSource) -> None:
        self.source = source

    def begin(self) -> None:
        """Nothing to materialise: the shards were allocated (checked before planning)."""

    @torch.no_grad()
    def write(self, writes: Sequence[Write]) -> None:
        source = self.source
        reads = {(w.key, w.ckpt_key): w.target for w in writes if w.value is None and not w.region}
        if reads and source.collective_reads:
            # One collective read of the model's own tensors under their checkpoint names:
            # the source reads each rank's shards straight into them and casts dtypes.
            source.read_many_into({ckey: t for (_, ckey), t in reads.items()}, collective=True)
        else:
            for (_, ckey), target in reads.items():
                _read_local(source, ckey, target)
        _write_regions(source, [w for w in writes if w.region is not None])
        for w in writes:
            if w.value is not None:
                _copy_full(w.target, w.value)

    def materialise(self, module: nn.Module) -> None:
        raise UsageError("modules that load themselves are not loaded into sharded models")


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


def _write_regions(source: CheckpointSource, writes: list[Write]) -> None:
    """Checkpoint tensors that fill regions of model tensors (experts of a stacked tensor):
    each rank reads only the part of each that falls in its own shard, nothing for the
    experts another rank holds. A shard that is not one block gets its full tensor built
    from every region, then cut (collective: every rank has the same writes)."""
    dtensor = _dtensor_type()
    whole: dict[int, tuple[Tensor, Tensor]] = {}  # id(target) -> (target, full-size value)
    for w in writes:
        target, region = w.target, w.region
        if region is None:
            continue
        if not isinstance(target, dtensor):
            source.read_into(w.ckpt_key, region.of(target))
            continue
        local = target.to_local()
        box = _local_box(target)
        if box is None or box[1] != tuple(local.shape):
            if id(target) not in whole:
                whole[id(target)] = (target, torch.empty(target.shape, dtype=target.dtype))
            source.read_into(w.ckpt_key, region.of(whole[id(target)][1]))
            continue
        offset, extent = region.box(target.shape)
        lo = [max(o, b) for o, b in zip(offset, box[0], strict=True)]
        hi = [min(o + n, b + m) for o, n, b, m in zip(offset, extent, *box, strict=True)]
        if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
            continue  # none of it on this rank
        part = local[tuple(slice(a - b, h - b) for a, h, b in zip(lo, hi, box[0], strict=True))]
        within = tuple(a - o for a, o in zip(lo[1:], offset[1:], strict=True))  # in the ckpt's
        source.read_region_into(w.ckpt_key, within, part.select(0, 0))
    for target, value in whole.values():
        _copy_full(target, value)


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
