"""Adapted tensors: a checkpoint tensor of another shape, made to fit by ``on_mismatch``.

Planning marks such pairs ``adapt`` (see :mod:`.copies`). At prepare the adapter runs on each
(reading only its own checkpoint tensor): a failure, or a value of the wrong shape, is raised
before the first write; ``None`` declines (a mismatch after all). Its values become
:class:`Write` records the placement's writer copies into the model at commit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._table import format_shape
from ...errors import LoadError, SurgeryError
from ..entries import PlanEntry
from ..plan import Adapter
from .base import Handler, Job, Prepared, Write

__all__ = ["Adapted", "adapt_value", "adapter_notes"]


class Adapted(Handler):
    """``adapt`` entries: values made by the ``on_mismatch`` adapter."""

    name = "adapted"

    def owns(self, entry: PlanEntry) -> bool:
        return entry.action == "adapt" and entry.via is None and entry.conversion is None

    def prepare(self, job: Job) -> Prepared:
        """Run the adapter on every ``adapt`` entry, a layer's weight before its bias
        (safetensors files sort 'fc.bias' first): an adapter that initialises new rows needs
        the weight's fan-in before it sees the bias."""
        state, source, adapter = job.state, job.source, job.adapter
        name = job.checked.plan.on_mismatch
        values: dict[tuple[int, str], Tensor] = {}
        declined_ids: set[tuple[int, str]] = set()
        out = Prepared()
        # One checkpoint tensor adapted into several model tensors of one shape and dtype (a
        # PEFT modules_to_save copy and its original_module) is adapted once, so they agree.
        first: dict[tuple[str, tuple[int, ...], torch.dtype], tuple[int, str]] = {}
        adapt = sorted(
            (e for e in job.checked.plan.entries if self.owns(e) and not e.tied_to),
            key=lambda e: (str(e.model_key).rpartition(".")[0], -len(e.model_shape or ())),
        )
        for e in adapt:
            mkey, ckey = str(e.model_key), str(e.ckpt_key)
            target = state[mkey]
            k = (id(target), ckey)
            if k in declined_ids:
                out.declined.add(mkey)
                continue
            if k in values:
                continue
            same = first.setdefault((ckey, tuple(target.shape), target.dtype), k)
            if same != k:
                if same in declined_ids:
                    declined_ids.add(k)
                    out.declined.add(mkey)
                else:
                    values[k] = values[same]
                    out.writes.append(Write(mkey, target, ckey, values[k]))
                continue
            lent = source.mapped(ckey) if job.assign else None  # no read: the file's pages
            ckpt = source.read(ckey) if lent is None else lent
            value = adapt_value(adapter, e, ckpt, target, name)
            if value is None:
                declined_ids.add(k)
                out.declined.add(mkey)
                continue
            values[k] = value
            out.writes.append(Write(mkey, target, ckey, value))
        return out


def adapt_value(
    adapter: Adapter | None, e: PlanEntry, ckpt: Tensor, target: Tensor, name: str
) -> Tensor | None:
    """The adapter's value for one entry (``ckpt``: the checkpoint's tensor, or the converted
    one), checked; any failure as a ``LoadError``."""
    mkey = str(e.model_key)
    try:
        value = adapter(mkey, ckpt, target)  # type: ignore[misc]
    except SurgeryError:
        raise
    except Exception as ex:
        raise LoadError(
            f"on_mismatch adapter raised {type(ex).__name__} for '{mkey}' ({name}) "
            f"(checkpoint {format_shape(e.ckpt_shape)} into model "
            f"{format_shape(target.shape)}): {ex}. Nothing was loaded."
        ) from ex
    if value is None:
        return None
    if not isinstance(value, Tensor) or tuple(value.shape) != tuple(target.shape):
        got = format_shape(value.shape) if isinstance(value, Tensor) else repr(value)
        raise LoadError(
            f"on_mismatch adapter returned {got} for '{mkey}' ({name}), but the model "
            f"expects {format_shape(target.shape)}; return a tensor of that shape "
            "or None to skip it. Nothing was loaded."
        )
    return value.detach()


def adapter_notes(adapter: Adapter | None) -> list[str]:
    """Lines an adapter offers about what it did (``head_rows`` lists rows kept and new labels)."""
    notes = getattr(adapter, "notes", None)
    if not callable(notes):
        return []
    try:
        return [str(n) for n in notes()]
    except Exception:  # an adapter's report must never fail a load that succeeded
        return []
