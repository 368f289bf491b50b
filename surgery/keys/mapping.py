"""The one name-mapping pipeline: user renames, then the PEFT namespace or a prefix rewrite.

Loading maps checkpoint keys onto model keys with it, :func:`surgery.restore_optimizer` maps
old parameter names onto the model's, and :func:`surgery.match` reads its regex hints with
the same rules (:func:`~surgery.keys.remap.compile_rules`). The steps, in order:

1. ``remap`` (:func:`~surgery.keys.remap.apply_remap`): a dict, ``(regex, replacement)`` rules
   or a callable; ``None`` drops a name;
2. a model wrapped by PEFT (:mod:`surgery.keys.peft`): names mapped through the wrapper's
   names where that pairs more tensors, else
3. ``prefix="auto"`` (:mod:`surgery.keys.prefix`): the ``(strip, add)`` rewrite that pairs
   the most names (pairs whose shapes agree, when shapes are known).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from . import peft as _peft
from .prefix import apply_prefix, detect_prefix
from .remap import Remap, apply_remap

__all__ = ["KeyMap", "map_names"]


@dataclass
class KeyMap:
    """Names mapped: ``new_to_old`` (mapped name -> original name, in the original order),
    the names ``remap`` dropped, the prefix rewrite taken and notes on what was done."""

    new_to_old: dict[str, str]
    dropped: list[str] = field(default_factory=list)
    rewrite: tuple[str, str] | None = None
    notes: list[str] = field(default_factory=list)


def map_names(
    names: Iterable[str],
    targets: Mapping[str, Any] | Collection[str],
    *,
    remap: Remap | None = None,
    auto_prefix: bool = True,
    shape_of: Callable[[str], tuple[int, ...] | None] | None = None,
    view: _peft.PeftView | None = None,
) -> KeyMap:
    """Map ``names`` onto ``targets`` (a model's keys, or its state dict when ``shape_of``
    or ``view`` is given): remap, then the PEFT wrapper's names (``view``) or the prefix
    rewrite. ``shape_of(name)`` gives an original name's shape (``None``: not a tensor), so
    a rewrite scores only pairs whose shapes agree.

    Example:
        >>> m = map_names(["module.fc.weight"], {"fc.weight"})
        >>> m.new_to_old, m.rewrite
        ({'fc.weight': 'module.fc.weight'}, ('module.', ''))
    """
    new_to_old, dropped, notes = apply_remap(names, remap)
    out = KeyMap(new_to_old, dropped, None, notes)
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
    return out
