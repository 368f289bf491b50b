"""``assign=True``: the model takes the checkpoint's tensors themselves instead of copies.

As ``module.load_state_dict(state, assign=True)`` does, each loaded tensor is put in place of
the model's: a parameter becomes a new parameter of the same class, ``requires_grad`` and
attributes around the checkpoint's tensor, in every module holding it (a tied pair keeps one
tensor), a buffer is replaced alike. A tensor that needs no cast is taken as it lies: a slice of
the file's private, copy-on-write mapping (safetensors and torch zip files, as
``torch.load(mmap=True)`` and ``safetensors.safe_open`` give it) or the in-memory tensor itself;
nothing is read, its pages are touched when the model first uses them. Any other (a cast, an
adapter's value, a tensor on another device, a source that can only copy) is read or made into
new memory. All of it happens at prepare; commit only puts the tensors in place, so a load that
fails leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..._args import model_class_name
from ...errors import UsageError
from ...sources import CheckpointSource
from ..handlers import Write

__all__ = ["assigned", "check_assign", "taken_as_is"]


def check_assign(model: nn.Module, state: Mapping[str, Any], device: Any) -> None:
    """Refuse ``assign=True`` where the model cannot take tensors as they lie in CPU memory:
    a ``device=`` to move them to, or a model whose tensors live on another device."""
    if device is not None and _device_type(device) not in ("cpu", None):
        raise UsageError(
            f"assign=True puts the checkpoint's tensors into the model where they lie (CPU "
            f"memory, the file's mapping); device={str(device)!r} would copy them. Load with "
            "assign=True, then move the model (model.to(...)), or leave assign out to read "
            "straight into device memory."
        )
    elsewhere = sorted(
        {
            str(t.device)
            for t in state.values()
            if isinstance(t, Tensor) and not t.is_meta and t.device.type != "cpu"
        }
    )
    if elsewhere:
        raise UsageError(
            f"{model_class_name(model)} lives on {', '.join(elsewhere)}, and assign=True would "
            "put CPU tensors (the file's mapping) in place of its tensors. Leave assign out to "
            "copy into its memory there, or build it under surgery.empty_init(), load with "
            "assign=True, then move it (model.to(...))."
        )


def _device_type(device: Any) -> str | None:
    """``'cuda'`` for ``'cuda:1'``; ``None`` for what is no device (refused by its own check)."""
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        return None


def taken_as_is(writes: Sequence[Write], source: CheckpointSource) -> dict[int, Tensor]:
    """Position in ``writes`` -> the source's own tensor, for the writes that need no copy:
    no prepared value, the source lends it (:meth:`~surgery.sources.CheckpointSource.mapped`)
    in CPU memory, in the target's dtype."""
    out: dict[int, Tensor] = {}
    for i, w in enumerate(writes):
        if w.value is not None or w.region is not None:
            continue
        t = source.mapped(w.ckpt_key)
        if (
            t is not None
            and t.device.type == "cpu"
            and t.dtype == w.target.dtype
            and t.layout == torch.strided
            and not _self_overlapping(t)
        ):
            out[i] = t
    return out


def assigned(
    writes: Sequence[Write], source: CheckpointSource, taken: Mapping[int, Tensor]
) -> list[Write]:
    """``writes``, each with the tensor it puts into the model: ``taken`` as it is, a prepared
    value in the target's dtype on CPU (converted when it is not), else new memory the source
    reads into now (several at once). No two of them share memory. The writes into regions of
    one target (a converter's stacked experts) become one write of one new tensor."""
    out: list[Write] = []
    reads: list[tuple[str, Tensor]] = []
    whole: dict[int, Tensor] = {}  # id(target) -> its new tensor, for writes into regions
    for i, w in enumerate(writes):
        if w.region is not None:
            if id(w.target) not in whole:
                whole[id(w.target)] = torch.empty(w.target.shape, dtype=w.target.dtype)
                out.append(Write(w.key, w.target, w.ckpt_key, whole[id(w.target)]))
            reads.append((w.ckpt_key, w.region.of(whole[id(w.target)])))
            continue
        if i in taken:
            value = taken[i]
        elif w.value is not None:
            value = _own(w.value, w.target)
        else:
            value = torch.empty(w.target.shape, dtype=w.target.dtype)
            reads.append((w.ckpt_key, value))
        out.append(Write(w.key, w.target, w.ckpt_key, value))
    for batch in _batches(reads):
        source.read_many_into(batch)
    # Two targets never share memory (a checkpoint storing two keys in one storage, an
    # adapter's value given to two targets): the later gets a copy.
    for i in _overlapping({i: w.value for i, w in enumerate(out) if w.value is not None}):
        w = out[i]
        out[i] = Write(w.key, w.target, w.ckpt_key, w.value.clone())  # type: ignore[union-attr]
    return out


def _own(value: Tensor, target: Tensor) -> Tensor:
    """A prepared value as the model will hold it: on CPU, in the target's dtype, no element
    shared by two indices (an ``expand``ed value could not be trained in place)."""
    v = value.detach()
    if v.dtype != target.dtype or v.device.type != "cpu":
        v = v.to(device="cpu", dtype=target.dtype)
    if _self_overlapping(v):
        v = v.contiguous()
    return v


def _self_overlapping(t: Tensor) -> bool:
    return any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride(), strict=True))


def _overlapping(values: Mapping[int, Tensor]) -> list[int]:
    """Positions whose tensor shares bytes with the tensor of an earlier position (views of
    one storage, compared within each storage; storages of their own never overlap)."""
    by_storage: dict[int, list[tuple[int, int, int]]] = {}
    later: list[int] = []
    for i in sorted(values):
        t = values[i]
        if not t.numel():
            continue
        extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
        begin = t.data_ptr()
        end = begin + extent * t.element_size()
        kept = by_storage.setdefault(t.untyped_storage().data_ptr(), [])
        if any(begin < e and b < end for b, e, _ in kept):
            later.append(i)
        else:
            kept.append((begin, end, i))
    return later


def _batches(reads: list[tuple[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Reads grouped so that no batch names a checkpoint key twice (one key read into two
    targets that are not tied)."""
    batches: list[dict[str, Tensor]] = []
    for key, out in reads:
        for batch in batches:
            if key not in batch:
                batch[key] = out
                break
        else:
            batches.append({key: out})
    return batches
