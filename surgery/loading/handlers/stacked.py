"""Stacked experts read in place: the common mixture-of-experts conversion without a copy.

Most MoE checkpoints (Mixtral, Qwen2-MoE, DeepSeek, OLMoE, ...) hold one tensor per expert,
and transformers stacks them with ``MergeModulelist(dim=0)``, then for ``w1``/``w3`` pairs
joins the stacks with ``Concatenate(dim)``. The result is a layout: expert ``i`` of source
pattern ``p`` is a fixed block of the model's tensor. :func:`regions` gives each checkpoint
tensor its block (a :class:`~.base.Region`), from the file's headers alone, so the writer
reads every expert straight into its place at commit: nothing is held between prepare and
commit, peak memory is the model itself, and a sharded model's rank reads only the experts
its shard holds.

That the blocks are where transformers' own ops put them is checked once per kind of
converter, on small tensors, against transformers' ``convert``; any other converter, or one
that disagrees, takes the general path (the ops run at prepare).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...keys.conversions import Conversions
from .base import Region

__all__ = ["regions"]

Sources = Sequence[tuple[str, Sequence[str]]]
_AGREES: dict[tuple[Any, ...], bool] = {}  # kind of converter -> transformers agrees


def regions(
    conv: Conversions,
    converter: Any,
    sources: Sources,
    specs: Mapping[str, tuple[torch.Size, torch.dtype]],
    shape: tuple[int, ...],
) -> dict[str, Region] | None:
    """Each checkpoint key's block of the one tensor of ``shape`` the converter makes, or
    ``None`` when the converter is not a plain stack (and concatenation) of equal tensors."""
    layout = _layout(conv, converter, len(sources))
    if layout is None:
        return None
    shapes = [{tuple(specs[k][0]) for k in keys} for _, keys in sources]
    if any(len(s) != 1 for s in shapes):
        return None
    out = _blocks(
        layout, [(keys, next(iter(s))) for (_, keys), s in zip(sources, shapes, strict=True)]
    )
    if out is None or _shape_of(out, [s for ss in shapes for s in ss]) != shape:
        return None
    kind = (*layout, len(sources), len(shape))
    if kind not in _AGREES:
        _AGREES[kind] = _agrees(conv, converter, layout, len(sources), len(shape))
    return out if _AGREES[kind] else None


def _layout(conv: Conversions, converter: Any, n_sources: int) -> tuple[str, int] | None:
    """``("stack", 0)`` for ``[MergeModulelist(0)]`` of one pattern, ``("cat", d)`` for
    ``[MergeModulelist(0), Concatenate(d)]`` (``d`` of the stacked tensor); else ``None``."""
    core, ops = conv.core, list(converter.operations)
    if len(converter.target_patterns) != 1 or not ops:
        return None
    if type(ops[0]) is not core.MergeModulelist or ops[0].dim != 0:
        return None
    if len(ops) == 1:
        return ("stack", 0) if n_sources == 1 else None
    if len(ops) == 2 and type(ops[1]) is core.Concatenate and isinstance(ops[1].dim, int):
        return "cat", ops[1].dim
    return None


def _blocks(
    layout: tuple[str, int], groups: list[tuple[Sequence[str], tuple[int, ...]]]
) -> dict[str, Region] | None:
    """The region of each key: ``groups`` holds each source pattern's keys (stacking order)
    and their one shape."""
    how, dim = layout
    ndim = len(groups[0][1]) + 1
    if how == "cat":
        if not -ndim <= dim < ndim:
            return None
        dim %= ndim
        if not _tile(groups, dim):
            return None
    out: dict[str, Region] = {}
    offset = 0
    for keys, shape in groups:
        for i, k in enumerate(keys):
            if how == "stack":
                out[k] = Region(i)
            elif dim == 0:
                out[k] = Region(offset + i)
            else:
                out[k] = Region(i, dim - 1, offset, shape[dim - 1])
        if how == "cat":
            offset += len(keys) if dim == 0 else shape[dim - 1]
    return out


def _tile(groups: list[tuple[Sequence[str], tuple[int, ...]]], dim: int) -> bool:
    """Whether the stacks of ``groups`` join along ``dim`` into one block with no gap: as
    many experts each and equal shapes, but along ``dim`` (of the stacked tensor)."""
    if len({len(s) for _, s in groups}) != 1:
        return False
    if dim == 0:
        return len({s for _, s in groups}) == 1
    rest = {(len(keys), s[: dim - 1] + s[dim:]) for keys, s in groups}
    return len(rest) == 1


def _shape_of(blocks: Mapping[str, Region], shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape the blocks tile, if they tile one (``()`` when they cannot)."""
    if len({len(s) for s in shapes}) != 1:
        return ()
    rows = max(r.index for r in blocks.values()) + 1
    inner = list(shapes[0])
    narrowed = [r for r in blocks.values() if r.dim is not None]
    if narrowed:
        d = narrowed[0].dim
        inner[d] = max(r.start + r.length for r in narrowed)  # type: ignore[index]
    return (rows, *inner)


def _agrees(conv: Conversions, converter: Any, layout: tuple[str, int], n: int, ndim: int) -> bool:
    """Whether transformers' own ops put small distinct tensors where the blocks say."""
    shape = tuple(range(2, ndim + 1))  # (2, 3, ...): every dimension told apart
    sources = [(p, [f"{p}#{i}" for i in range(2)]) for p in converter.source_patterns[:n]]
    numel = torch.Size(shape).numel()
    values = {  # every element of every tensor a different number
        k: torch.arange(numel, dtype=torch.float32).reshape(shape).add((2 * j + i) * numel)
        for j, (_, keys) in enumerate(sources)
        for i, k in enumerate(keys)
    }
    blocks = _blocks(layout, [(keys, shape) for _, keys in sources])
    if blocks is None:
        return False
    c = copy.deepcopy(converter)
    layer = converter.target_patterns[0]
    for p, keys in sources:
        for k in keys:
            c.add_tensor(layer, k, p, values[k])
    try:
        made = c.convert(layer, model=conv.model, config=getattr(conv.model, "config", None))
        (theirs,) = [v[0] if isinstance(v, list) else v for v in made.values()]
    except Exception:
        return False
    ours = torch.full(_shape_of(blocks, [shape]), float("nan"))
    for k, r in blocks.items():
        r.of(ours).copy_(values[k])
    return isinstance(theirs, Tensor) and theirs.shape == ours.shape and torch.equal(theirs, ours)
