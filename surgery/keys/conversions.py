"""transformers' own weight conversions (v5): a transformers model's renamings and converters.

transformers 5 keeps hub checkpoints in their published layout (one tensor per expert, the old
ViT names) and converts them while loading, by rules each model class declares:
``WeightRenaming`` rules rename a key, ``WeightConverter`` rules make one model tensor from
several checkpoint tensors (or several from one) through ops (``MergeModulelist``,
``Concatenate``, ``Chunk``, ...). :func:`model_conversions` takes those rules from the model
itself (``transformers.conversion_mapping.get_model_conversion_mapping``, never a copy of its
tables), and :func:`gather` applies transformers' own ``rename_source_key`` to checkpoint
names: a renamed name pairs with the model like any other, and the names a converter takes
are gathered into one :class:`Group` per model tensor, in the order transformers stacks them
(``dot_natural_key``: expert 10 after expert 9). The ops run in
:mod:`surgery.loading.handlers.converted`.

transformers is used only when it is already imported (a transformers model exists): nothing
is imported because a file names it. Without transformers 5, for a model that is not a
transformers model, or a model type with no rule that matches, nothing changes.
"""

from __future__ import annotations

import sys
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import LoadError
from .remap import collision

__all__ = ["Conversions", "Gathered", "Group", "conversion_note", "gather", "model_conversions"]


@dataclass(frozen=True)
class Conversions:
    """A transformers model's conversion mapping, split as transformers applies it.

    ``model`` is the ``PreTrainedModel`` (the one inside a PEFT wrapper), whose names the
    rules speak; ``renamings`` and ``converters`` are transformers' own rule objects, in the
    mapping's order; ``core`` is ``transformers.core_model_loading``.
    """

    owner: str
    model: nn.Module
    renamings: tuple[Any, ...]
    converters: tuple[Any, ...]
    core: Any = field(repr=False)

    def rename(self, name: str, targets: Container[str]) -> tuple[str, str | None]:
        """``name`` as transformers renames it, and the source pattern of the converter that
        takes it (``None``: a plain rename, or none).

        As ``from_pretrained`` does: every renaming, then at most one converter; a name that
        is already a model key (``targets``) and that the rules would rename away is kept.
        transformers' own ``base_model_prefix`` step is left out: surgery's prefix rewrite
        (reported, and off with ``prefix=None``) does that for every name, converted or not.
        """
        new, pattern = self.core.rename_source_key(name, self.renamings, self.converters)
        if new != name and new not in targets and name in targets:
            return name, None
        return new, pattern

    def rule_of(self, pattern: str) -> int:
        """The index of the (first) converter with source pattern ``pattern``."""
        return next(i for i, c in enumerate(self.converters) if pattern in c.source_patterns)

    def find(self, sources: Sequence[str], targets: Sequence[str], ops: Sequence[str]) -> Any:
        """The converter with these source and target patterns and ops (``None``: none)."""
        for c in self.converters:
            if (
                list(c.source_patterns) == list(sources)
                and list(c.target_patterns) == list(targets)
                and [repr(op) for op in c.operations] == list(ops)
            ):
                return c
        return None


@dataclass
class Group:
    """The checkpoint names one converter makes model tensors from.

    ``layer`` is transformers' name for the group: its first target, in the model's base
    names (what ``WeightConverter.convert`` is called with). ``sources`` maps each source
    pattern of the converter to its checkpoint names (original names, stacking order);
    ``outputs`` maps each tensor the converter makes (base names) to the model keys holding
    it (filled by :func:`surgery.keys.mapping.map_names`; several for a PEFT
    ``modules_to_save`` copy, none for a tensor the model lacks).
    """

    rule: int
    layer: str
    sources: dict[str, list[str]] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # checkpoint name -> name after remap

    @property
    def keys(self) -> list[str]:
        """Every checkpoint name of the group, pattern by pattern."""
        return [k for ks in self.sources.values() for k in ks]


def model_conversions(model: nn.Module) -> Conversions | None:
    """The conversion mapping of ``model`` when it is a transformers (>= 5) model, or wraps
    one with PEFT; ``None`` otherwise, or when transformers is not imported.

    Example:
        >>> import torch
        >>> model_conversions(torch.nn.Linear(2, 2)) is None
        True
    """
    core = sys.modules.get("transformers.core_model_loading")
    tables = sys.modules.get("transformers.conversion_mapping")
    utils = sys.modules.get("transformers.modeling_utils")
    if core is None or tables is None or utils is None:
        return None
    kind = getattr(utils, "PreTrainedModel", None)
    mapping = getattr(tables, "get_model_conversion_mapping", None)
    needed = ("rename_source_key", "dot_natural_key", "WeightRenaming", "WeightConverter")
    if kind is None or mapping is None or not all(hasattr(core, n) for n in needed):
        return None
    owner = _transformers_model(model, kind)
    if owner is None:
        return None
    try:
        transforms = list(mapping(owner))
    except Exception as e:  # transformers itself cannot say how this model loads
        raise LoadError(
            f"transformers could not give the conversion mapping of {type(owner).__name__} "
            f"({type(e).__name__}: {e}); from_pretrained would fail the same way. Nothing "
            "was loaded."
        ) from e
    renamings = tuple(t for t in transforms if isinstance(t, core.WeightRenaming))
    converters = tuple(t for t in transforms if isinstance(t, core.WeightConverter))
    if not (renamings or converters):
        return None
    return Conversions(type(owner).__name__, owner, renamings, converters, core)


def _transformers_model(model: nn.Module, kind: type) -> nn.Module | None:
    """``model`` when it is a transformers model, the one a PEFT wrapper holds, or ``None``."""
    if isinstance(model, kind):
        return model
    if not hasattr(model, "peft_config"):
        return None
    get_base = getattr(model, "get_base_model", None)  # PeftModel
    base = get_base() if callable(get_base) else model._modules.get("model")  # a tuner model
    return base if isinstance(base, kind) else None


@dataclass
class Gathered:
    """Names after transformers' rules: plain names (``new -> original``, in the original
    order), converter groups by layer, and how many plain names a renaming changed."""

    new_to_old: dict[str, str]
    groups: dict[str, Group]
    renamed: int = 0


def conversion_note(owner: str, renamed: int, groups: Mapping[str, Group]) -> list[str]:
    """The plan note saying what the model's transformers conversion mapping did."""
    if not (renamed or groups):
        return []
    parts = [f"{renamed} checkpoint tensors renamed"] if renamed else []
    if groups:
        n_in = sum(len(g.keys) for g in groups.values())
        n_out = sum(len(ks) for g in groups.values() for ks in g.outputs.values())
        parts.append(f"{n_in} converted into {n_out} model tensors")
    return [f"{' and '.join(parts)} by {owner}'s transformers conversion mapping"]


def gather(conv: Conversions, new_to_old: Mapping[str, str], targets: Container[str]) -> Gathered:
    """Apply ``conv``'s rules to the names of ``new_to_old`` (names after the user's remap ->
    checkpoint names), for a model whose (base) keys are ``targets``.

    A name a renaming changes pairs under its new name; two names that end up as one are a
    collision, refused as a remap's. A name a converter takes joins the :class:`Group` of
    the model tensor it goes into (``outputs`` predicted from the converter's targets).
    """
    out = Gathered({}, {})
    for name, old in new_to_old.items():
        new, pattern = conv.rename(name, targets)
        if pattern is None:
            if new in out.new_to_old:
                raise collision(out.new_to_old[new], old, new, "transformers' renaming")
            out.new_to_old[new] = old
            out.renamed += new != name
            continue
        rule = conv.rule_of(pattern)
        g = out.groups.get(new)
        if g is None:
            g = out.groups[new] = Group(rule, new)
            first, *rest = conv.converters[rule].target_patterns
            g.outputs = {new: [], **{new.replace(first, t): [] for t in rest}}
        elif g.rule != rule:
            raise collision(g.keys[0], old, new, "transformers' conversion")
        g.sources.setdefault(pattern, []).append(old)
        g.names[old] = name
    for g in out.groups.values():
        clash = next((o for o in g.outputs if o in out.new_to_old), None)
        if clash is not None:  # the model's layout and the checkpoint's, both in one file
            raise collision(out.new_to_old[clash], g.keys[0], clash, "transformers' conversion")
        g.sources = {p: _ordered(conv, g, g.sources[p]) for p in _patterns(conv, g)}
    return out


def _patterns(conv: Conversions, g: Group) -> list[str]:
    """The group's source patterns in the converter's order (the order ``Concatenate`` uses)."""
    return [p for p in conv.converters[g.rule].source_patterns if p in g.sources]


def _ordered(conv: Conversions, g: Group, keys: list[str]) -> list[str]:
    """Checkpoint names in transformers' stacking order (of their names after remap)."""
    natural = conv.core.dot_natural_key
    return sorted(keys, key=lambda k: natural(g.names[k]))
