"""Plain copies and ties: a checkpoint tensor read straight into the model tensor of its name.

Planning pairs every name left by the handlers before it with the model key of that name:
``load``/``cast`` when the shapes agree, ``adapt``/``mismatch`` when they differ, ``skip`` for
keys ``skip=`` names, ``unexpected`` for names the model lacks; a tied tensor paired with
several checkpoint keys is carried by one of them (:mod:`surgery.keys.ties`). At prepare it
turns its ``load``/``cast`` entries into one :class:`Write` per model tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..._tensors import dtype_name
from ...keys import ties
from ..entries import WRITES, PlanEntry, pair_action
from .base import Claimed, Handler, Job, PlanContext, Prepared, Write

__all__ = ["Copies"]


class Copies(Handler):
    """``load`` and ``cast`` entries (``adapt``/``mismatch`` are planned here too)."""

    name = "copies"

    def plan(self, ctx: PlanContext, names: dict[str, str]) -> Claimed:
        specs = ctx.source.specs
        entries = [_dropped(k, specs) for k in ctx.dropped]
        writer: dict[int, PlanEntry] = {}  # id(model tensor) -> the entry that writes it
        at: dict[str, int] = {}  # model key -> index of its entry
        plain, skipped, adapts = ctx.plain, ctx.skipped, ctx.adapter is not None
        for mkey, ckey in names.items():
            cshape, cdtype = specs[ckey]
            cshape_t, cdtype_s = tuple(cshape), dtype_name(cdtype)
            target = plain.get(mkey)
            if target is None:
                entries.append(
                    PlanEntry(
                        "unexpected", mkey, ckey, None, cshape_t, None, cdtype_s, "not in model"
                    )
                )
                continue
            mdtype = dtype_name(target.dtype)
            mshape = cshape_t if cshape == target.shape else tuple(target.shape)
            action = pair_action(cshape_t, mshape, cdtype_s, mdtype, adapts)
            reason = ""
            if skipped and mkey in skipped:
                action, reason = "skip", "skipped as asked"
            e = PlanEntry(action, mkey, ckey, mshape, cshape_t, mdtype, cdtype_s, reason)
            at[mkey] = len(entries)
            entries.append(e)
            if action in WRITES:
                writer.setdefault(id(target), e)
        if skipped:  # model keys skip= names that no checkpoint key was paired with
            converted = ctx.converted  # planned by the converted tensors' handler
            for mkey, t in plain.items():
                if mkey in skipped and mkey not in names and id(t) not in writer:
                    if mkey in converted:
                        continue
                    at[mkey] = len(entries)
                    entries.append(_skipped(mkey, t))
        if ctx.tied:  # several checkpoint keys for one tied tensor: one carries it
            where = (ctx.source.description, ctx.model_name)
            ties.resolve(entries, plain, WRITES, ctx.source.shares, where)
            writer = {
                id(plain[e.model_key]): e
                for e in reversed(entries)
                if e.action in WRITES and not e.tied_to and e.model_key in plain
            }
        return Claimed({}, entries, at=at, writer=writer)

    def owns(self, entry: PlanEntry) -> bool:
        return entry.action in ("load", "cast") and entry.via is None

    def prepare(self, job: Job) -> Prepared:
        """One write per (model tensor, checkpoint key): a tied tensor is written once."""
        state = job.state
        writes: list[Write] = []
        done: set[tuple[int, str]] = set()
        for e in job.checked.plan.entries:
            if e.tied_to or not self.owns(e):
                continue  # tied_to: an alias, written through the key that carries it
            target = state[e.model_key]  # type: ignore[index]
            k = (id(target), str(e.ckpt_key))
            if k not in done:
                done.add(k)
                writes.append(Write(str(e.model_key), target, str(e.ckpt_key)))
        return Prepared(writes)


def _dropped(ckey: str, specs: Mapping[str, tuple[torch.Size, torch.dtype]]) -> PlanEntry:
    if ckey not in specs:  # a non-tensor entry
        return PlanEntry("skip", None, ckey, reason="dropped by remap")
    shape, dtype = specs[ckey]
    return PlanEntry(
        "skip", None, ckey, None, tuple(shape), None, dtype_name(dtype), "dropped by remap"
    )


def _skipped(mkey: str, t: Tensor) -> PlanEntry:
    return PlanEntry(
        "skip", mkey, None, tuple(t.shape), None, dtype_name(t.dtype), reason="skipped as asked"
    )
