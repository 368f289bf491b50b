"""Matching two models by structure, and checking a conversion by running both."""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .._table import format_shape
from ..errors import UsageError
from ..sources import CheckpointLike, read_checkpoint
from .align import Hints, align, find_layouts, hint_pairs, pair_entries
from .result import Difference, Layout, Match, MatchedKey
from .trace import Entry, checkpoint_entries, module_entries, run_eval, traced_entries

__all__ = ["match", "verify"]


def match(
    source: nn.Module | CheckpointLike,
    model: nn.Module,
    example_input: Any = None,
    *,
    hints: Hints | None = None,
) -> Match:
    """Pair the tensors of ``source`` and ``model`` by structure, whatever their names.

    ``source`` is the model the checkpoint came from (an ``nn.Module``; its weights are not
    needed, the meta device is fine), or the checkpoint alone (anything
    :func:`read_checkpoint` takes). ``example_input`` (a tensor, a tuple of positional or a
    dict of keyword arguments) is run through both models to record the order in which each
    layer first uses its tensors; the two sequences are aligned by edit distance over layer
    signatures (kind of layer, tensor shapes) and tensors are paired inside aligned layers.
    ``hints`` (``{source key or module: model key or module}`` or ``(regex, replacement)``
    rules) pin pairs and anchor the alignment. Without a source module (or without an input)
    the order is the registration order and confidences are low.

    Example:
        >>> import torch, torchvision, timm, surgery
        >>> with surgery.empty_init():
        ...     src = torchvision.models.resnet18()
        ...     dst = timm.create_model("resnet18")
        >>> m = surgery.match(src, dst, torch.zeros(1, 3, 32, 32))
        >>> len(m.pairs), m.unmatched_model
        (122, [])
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"match needs an nn.Module as the model, got {type(model).__name__}")
    sides = _sides(source, model, example_input)
    result = Match(
        source=sides.description,
        model=type(model).__name__,
        notes=sides.notes,
        model_shapes=sides.dst_shapes,
        source_shapes=sides.src_shapes,
    )
    pairs = _Pairs()
    hinted = hint_pairs(hints, sides.src, sides.dst)
    for s, d in hinted:
        if sides.src_shapes[s] != sides.dst_shapes[d]:
            raise UsageError(
                f"hint pairs source '{s}' {format_shape(sides.src_shapes[s])} with model '{d}' "
                f"{format_shape(sides.dst_shapes[d])}: the shapes differ, so it cannot load"
            )
        pairs.add(s, d, 1.0, "hint")
    where_a = {k: i for i, e in enumerate(sides.src) for k in e.keys}
    where_b = {k: j for j, e in enumerate(sides.dst) for k in e.keys}
    path = align(sides.src, sides.dst, {(where_a[s], where_b[d]) for s, d in hinted})
    _pair_aligned(sides, path, pairs)
    result.layouts += _pair_leftovers(sides, path, pairs)
    result.layouts += _transposed(sides, pairs)
    result.pairs = {
        d: MatchedKey(*pairs.by_model[d]) for d in sides.dst_shapes if d in pairs.by_model
    }
    result.unmatched_model = [k for k in sides.dst_shapes if k not in pairs.by_model]
    result.unmatched_source = [k for k in sides.src_shapes if k not in pairs.used]
    return result


@dataclass
class _Sides:
    """Both models as entry sequences, their shapes, and how far to trust the order."""

    src: list[Entry]
    dst: list[Entry]
    src_shapes: dict[str, tuple[int, ...]]
    dst_shapes: dict[str, tuple[int, ...]]
    description: str
    cap: float  # highest confidence the order allows
    mode: str  # said after each reason when the order is not a forward pass
    notes: list[str] = field(default_factory=list)


def _sides(source: Any, model: nn.Module, example_input: Any) -> _Sides:
    dst_reg, dst_state = module_entries(model)
    dst_shapes = {k: tuple(t.shape) for k, t in dst_state.items()}
    if not isinstance(source, nn.Module):
        state = read_checkpoint(source) if not isinstance(source, Mapping) else dict(source)
        src_shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, Tensor)}
        desc = f"'{source}'" if isinstance(source, str) else "checkpoint"
        return _Sides(
            checkpoint_entries(src_shapes),
            checkpoint_entries(dst_shapes),
            src_shapes,
            dst_shapes,
            desc,
            0.5,
            " (checkpoint only: registration order)",
            [
                "checkpoint only: layers aligned by registration order and name similarity; "
                "pass the source model and an example input for a structural match"
            ],
        )
    src_shapes = {k: tuple(t.shape) for k, t in source.state_dict(keep_vars=True).items()}
    desc = type(source).__name__
    if example_input is not None:
        src = traced_entries(source, example_input, "source")
        dst = traced_entries(model, example_input, "model")
        return _Sides(src, dst, src_shapes, dst_shapes, desc, 1.0, "")
    notes = ["no example input: layers aligned in registration order"]
    src = module_entries(source)[0]
    return _Sides(src, dst_reg, src_shapes, dst_shapes, desc, 0.7, " (registration order)", notes)


class _Pairs:
    """Pairs found so far: model key -> (source key, confidence, reason); first one wins."""

    def __init__(self) -> None:
        self.by_model: dict[str, tuple[str, float, str]] = {}
        self.used: set[str] = set()

    def add(self, skey: str, dkey: str, conf: float, reason: str) -> None:
        if dkey in self.by_model or skey in self.used:
            return
        self.by_model[dkey] = (skey, conf, reason)
        self.used.add(skey)


def _pair_aligned(sides: _Sides, path: list, pairs: _Pairs) -> None:
    """Pair the tensors inside each pair of aligned layers."""
    for a, b in path:
        if a is None or b is None:
            continue
        ea, eb = sides.src[a], sides.dst[b]
        for s, d, conf, reason in pair_entries(ea, eb):
            conf = min(conf, sides.cap)
            if ea.name == eb.name and s == d and sides.mode:
                conf = max(conf, 0.9)  # same names and shapes: as good as a name match
            if not (ea.traced and eb.traced):
                conf = min(conf, 0.6)
                reason += " (not used by forward)"
            pairs.add(s, d, conf, reason + sides.mode)


def _pair_leftovers(sides: _Sides, path: list, pairs: _Pairs) -> list[Layout]:
    """Leftovers: first between the same aligned neighbours, then anywhere, by unique shape;
    fused layouts (one tensor that is k others stacked) between aligned neighbours."""
    regions: list[tuple[list[str], list[str]]] = [([], [])]
    for a, b in path:
        if a is not None and b is not None:
            regions.append(([], []))
        if a is not None:
            regions[-1][0].extend(sides.src[a].keys)
        if b is not None:
            regions[-1][1].extend(sides.dst[b].keys)
    src_shape = {k: s for e in sides.src for k, s in e.shapes.items()}
    dst_shape = {k: s for e in sides.dst for k, s in e.shapes.items()}
    layouts: list[Layout] = []
    layout_src: set[str] = set()
    layout_dst: set[str] = set()
    passes = [(ra, rb, False) for ra, rb in regions] + [(list(src_shape), list(dst_shape), True)]
    for region_a, region_b, global_pass in passes:
        left_a = [k for k in region_a if k not in pairs.used and k not in layout_src]
        left_b = [k for k in region_b if k not in pairs.by_model and k not in layout_dst]
        if not left_a or not left_b:
            continue
        ca = Counter(src_shape[k] for k in left_a)
        cb = Counter(dst_shape[k] for k in left_b)
        for k in left_a:
            shape = src_shape[k]
            if ca[shape] == 1 and cb[shape] == 1:
                d = next(x for x in left_b if dst_shape[x] == shape)
                if global_pass:
                    why = "only unmatched tensor of this shape" + sides.mode
                    pairs.add(k, d, min(0.4, sides.cap), why)
                else:
                    why = "only tensor of this shape between aligned layers"
                    pairs.add(k, d, min(0.6, sides.cap), why)
        if not global_pass:
            lays, us, ud = find_layouts(
                [(k, src_shape[k]) for k in left_a if k not in pairs.used],
                [(k, dst_shape[k]) for k in left_b if k not in pairs.by_model],
            )
            layouts += lays
            layout_src |= us
            layout_dst |= ud
    return layouts


def _transposed(sides: _Sides, pairs: _Pairs) -> list[Layout]:
    """Transposed layouts (GPT-2 Conv1D ~ nn.Linear): matched, but need an adapter to load."""
    transposed_src = {k for e in sides.src for k in e.transposed}
    transposed_dst = {k for e in sides.dst for k in e.transposed}
    layouts: list[Layout] = []
    for dkey in sides.dst_shapes:
        if dkey not in pairs.by_model:
            continue
        skey, conf, reason = pairs.by_model[dkey]
        if (skey in transposed_src) != (dkey in transposed_dst):
            square = len(set(sides.dst_shapes[dkey])) == 1
            adapter = (
                "surgery.adapters.transposed (on the state dict: the shapes are square)"
                if square
                else "surgery.adapters.transpose_linear (as on_mismatch)"
            )
            layouts.append(Layout("transpose", (skey,), (dkey,), adapter))
            pairs.by_model[dkey] = (skey, conf, reason + ", transposed layout")
    return layouts


# --------------------------------------------------------------------------- verify


OutputSelector = str | int | Callable[[Any], Tensor] | None


def _select_output(out: Any, selector: OutputSelector, which: str) -> Tensor:
    if callable(selector):
        value = selector(out)
    elif selector is not None:
        try:
            value = out[selector]
        except (KeyError, IndexError, TypeError):
            value = getattr(out, selector, None) if isinstance(selector, str) else None
    else:
        value = _first_tensor(out)
    if not isinstance(value, Tensor):
        raise UsageError(
            f"the {which} output {type(out).__name__} has no tensor at {selector!r}; pass "
            "output= (a key, an index or a callable picking the tensor to compare)"
        )
    return value


def _first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):  # dicts and transformers' ModelOutput
        if isinstance(out.get("last_hidden_state"), Tensor):
            return out["last_hidden_state"]
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
    else:
        return None
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def verify(
    source: nn.Module,
    model: nn.Module,
    example_input: Any,
    *,
    output: OutputSelector = None,
    source_output: OutputSelector = None,
) -> Difference:
    """Run both models on ``example_input`` (eval mode, no gradients) and return the largest
    absolute difference between their outputs: a :class:`~surgery.matching.result.Difference`,
    a ``float`` that also says whether the comparison means anything.

    The compared tensor is the output itself, the first tensor of a tuple, or
    ``last_hidden_state`` of a dict / transformers ``ModelOutput`` (else its first tensor);
    ``output`` picks another (a key, an index or a callable) and ``source_output`` one for
    the source alone. Training flags are restored afterwards.

    An output holding one value in every element (a zero-initialised head, as torchvision's
    ViT has) does not depend on the weights before it: a ``UserWarning`` says so, and the
    result's ``informative`` is false (``constant`` names the side), its text says why.

    Example:
        >>> m = surgery.match(src, model, x)  # doctest: +SKIP
        >>> surgery.load_partial(model, src, remap=m.remap())  # doctest: +SKIP
        >>> surgery.verify(src, model, x) < 1e-5  # doctest: +SKIP
        True
    """
    for which, mod in (("source", source), ("model", model)):
        if not isinstance(mod, nn.Module):
            raise UsageError(f"verify needs an nn.Module as the {which}, got {type(mod).__name__}")
        meta = [k for k, t in mod.state_dict(keep_vars=True).items() if t.is_meta]
        if meta:
            raise UsageError(
                f"the {which} {type(mod).__name__} has tensors on the meta device (e.g. "
                f"'{meta[0]}'); load weights into it (load_partial) before verify"
            )
    a = _select_output(run_eval(source, example_input, None), source_output or output, "source")
    b = _select_output(run_eval(model, example_input, None), output, "model")
    if a.shape != b.shape:
        raise UsageError(
            f"outputs differ in shape: source {format_shape(a.shape)} vs model "
            f"{format_shape(b.shape)}; pass output= / source_output= to pick comparable tensors "
            "(e.g. a callable returning features before the head)"
        )
    if a.numel() == 0:
        return Difference(0.0)
    diff = (a.detach().double() - b.detach().double()).abs().max().item()
    constant = tuple(w for w, t in (("source", a), ("model", b)) if _constant(t))
    result = Difference(diff if not math.isnan(diff) else math.inf, constant)
    if constant:
        warnings.warn(f"verify: {result.note}", UserWarning, stacklevel=2)
    return result


def _constant(t: Tensor) -> bool:
    """Every element holds one value (more than one element: a lone scalar still varies
    with the weights)."""
    if t.numel() < 2:
        return False
    flat = t.detach().reshape(-1)
    return bool((flat == flat[0]).all())
