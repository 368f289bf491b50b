"""The one name-mapping pipeline: user renames, then the PEFT namespace or a prefix rewrite.

Loading maps checkpoint keys onto model keys with it, :func:`surgery.restore_optimizer` maps
old parameter names onto the model's, and :func:`surgery.match` reads its regex hints with
the same rules (:func:`~surgery.keys.remap.compile_rules`). The steps, in order:

1. ``remap`` (:func:`~surgery.keys.remap.apply_remap`): a dict, ``(regex, replacement)`` rules
   or a callable; ``None`` drops a name;
2. a transformers model's own conversion mapping (:mod:`surgery.keys.conversions`), in the
   base model's names: renamed names, and the names a converter gathers into one tensor;
3. a model wrapped by PEFT (:mod:`surgery.keys.peft`): names mapped through the wrapper's
   names where that pairs more tensors, else
4. ``prefix="auto"`` (:mod:`surgery.keys.prefix`): the ``(strip, add)`` rewrite that pairs
   the most names (pairs whose shapes agree, when shapes are known).

The tensors a converter makes (step 2) are named through steps 3 and 4 like every other name.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from . import peft as _peft
from .conversions import Conversions, Group, conversion_note, gather
from .prefix import apply_prefix, detect_prefix
from .remap import Remap, apply_remap, collision

__all__ = ["KeyMap", "map_names"]


@dataclass
class KeyMap:
    """Names mapped: ``new_to_old`` (mapped name -> original name, in the original order),
    the names ``remap`` dropped, the prefix rewrite taken and notes on what was done.
    ``groups``: the names a transformers converter gathers, by layer, each output named by
    the model keys that hold it (only groups with at least one)."""

    new_to_old: dict[str, str]
    dropped: list[str] = field(default_factory=list)
    rewrite: tuple[str, str] | None = None
    notes: list[str] = field(default_factory=list)
    groups: dict[str, Group] = field(default_factory=dict)


def map_names(
    names: Iterable[str],
    targets: Mapping[str, Any] | Collection[str],
    *,
    remap: Remap | None = None,
    auto_prefix: bool = True,
    shape_of: Callable[[str], tuple[int, ...] | None] | None = None,
    view: _peft.PeftView | None = None,
    conversions: Conversions | None = None,
) -> KeyMap:
    """Map ``names`` onto ``targets`` (a model's keys, or its state dict when ``shape_of``
    or ``view`` is given): remap, then a transformers model's ``conversions``, then the PEFT
    wrapper's names (``view``) or the prefix rewrite. ``shape_of(name)`` gives an original
    name's shape (``None``: not a tensor), so a rewrite scores only pairs whose shapes agree.

    Example:
        >>> m = map_names(["module.fc.weight"], {"fc.weight"})
        >>> m.new_to_old, m.rewrite
        ({'fc.weight': 'module.fc.weight'}, ('module.', ''))
    """
    new_to_old, dropped, notes = apply_remap(names, remap)
    groups: dict[str, Group] = {}
    renamed = 0
    if conversions is not None:
        base = view.base if view is not None else targets
        gathered = gather(conversions, new_to_old, base)  # type: ignore[arg-type]
        new_to_old, groups, renamed = gathered.new_to_old, gathered.groups, gathered.renamed
    out = KeyMap(new_to_old, dropped, None, notes)
    through = False  # named through the PEFT wrapper's base names
    if view is not None and isinstance(targets, Mapping) and shape_of is not None:
        out.new_to_old, out.rewrite, through = _peft.map_keys(
            view, new_to_old, targets, auto_prefix, shape_of
        )
        if through:
            n = len({c for k, c in out.new_to_old.items() if k in targets})
            out.notes.append(_peft.note(view, n))
        out.notes.extend(_peft.meta_note(view, targets))
    elif auto_prefix:
        fits = None
        if shape_of is not None and isinstance(targets, Mapping):

            def fits(new: str, target: str) -> bool:
                t = targets[target]
                return isinstance(t, Tensor) and shape_of(new_to_old[new]) == tuple(t.shape)

        out.rewrite = detect_prefix(new_to_old, set(targets), fits)
        if out.rewrite is not None:
            out.new_to_old = apply_prefix(new_to_old, out.rewrite)
    if groups:
        _place(out, groups, targets, view if through else None)
    if conversions is not None:
        out.notes.extend(conversion_note(conversions.owner, renamed, out.groups))
    return out


def _place(
    out: KeyMap, groups: dict[str, Group], targets: Any, view: _peft.PeftView | None
) -> None:
    """Name each group's outputs as every other name was named (the prefix rewrite, the PEFT
    wrapper's names); a group none of whose outputs is a model tensor is given back as the
    plain names it holds, which then pair as they are (as ``unexpected``, mostly)."""

    def named(name: str) -> list[str]:
        if out.rewrite is not None:
            name = apply_prefix({name: name}, out.rewrite).popitem()[0]
        return list(view.base.get(name, (name,))) if view is not None else [name]

    for layer, g in groups.items():
        for o in g.outputs:
            g.outputs[o] = [k for k in named(o) if k in targets]
        if any(g.outputs.values()):
            out.groups[layer] = g
            continue
        for old in g.keys:
            for new in named(g.names[old])[:1]:
                if new in out.new_to_old:
                    raise collision(out.new_to_old[new], old, new, "transformers' conversion")
                out.new_to_old[new] = old
