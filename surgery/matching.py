"""Match by structure: pair the tensors of two models whose key names differ entirely.

Converting weights between libraries (torchvision -> timm, torchvision -> transformers, an old
codebase -> its rewrite) usually needs a hand-written regex table per pair of architectures.
:func:`match` derives it: it runs each model once on an example input (on the ``meta`` device
when the model is there, so no weights are needed), records the order in which every module
first uses its own parameters and buffers, gives each module a signature (type family and the
multiset of its tensor shapes), aligns the two sequences with an edit-distance alignment and
pairs the tensors inside aligned modules. The result, a :class:`Match`, is data, a table, a
``remap`` dict for :func:`load_partial` and a few regex ``rules`` to paste into a script.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._names import closest
from ._table import _Table, format_shape
from .checkpoint import CheckpointLike, read_checkpoint
from .errors import KeyCollisionError, SurgeryError, UsageError
from .keys.remap import apply_remap

__all__ = ["Layout", "Match", "MatchedKey", "match", "verify"]

HIGH = 0.75  # confidences at or above this are labelled 'high'
Hints = Mapping[str, str] | Sequence[tuple[str, str]]

# Alignment costs, in hundredths; structure decides, names only break ties.
_GAP = 100
_FAMILY = 30  # same shapes, different kind of layer (MultiheadAttention ~ Linear)
_FORBID = 10**6  # contradicts a hint
_ANCHOR = -(10**4)  # agrees with a hint
_NAME_SCALE = 10**4  # structural cost * scale + name cost (<= 10 per step)


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class MatchedKey:
    """Where one model tensor comes from: the source key, how sure the match is, and why."""

    source: str
    confidence: float
    reason: str

    @property
    def level(self) -> str:
        """``'high'`` (confidence >= 0.75) or ``'low'``."""
        return "high" if self.confidence >= HIGH else "low"


@dataclass(frozen=True)
class Layout:
    """Tensors that correspond but not 1-to-1 by name: a fused q/k/v, a transposed weight.

    ``kind`` is ``'split'`` (one source tensor holds several model tensors), ``'concat'`` (the
    reverse) or ``'transpose'``; ``adapter`` names the function in :mod:`surgery.adapters`
    that converts it.
    """

    kind: str
    source_keys: tuple[str, ...]
    model_keys: tuple[str, ...]
    adapter: str

    def __str__(self) -> str:
        return (
            f"{self.kind}: {', '.join(self.source_keys)} -> {', '.join(self.model_keys)} "
            f"(use {self.adapter})"
        )


@dataclass(repr=False)
class Match(_Table):
    """The result of :func:`match`: for each model key, its source key, confidence and reason.

    ``pairs`` maps model keys to :class:`MatchedKey`; ``unmatched_model`` and
    ``unmatched_source`` list what found no partner; ``layouts`` lists correspondences that are
    not 1-to-1 renames. ``remap()`` gives the dict to pass to ``load_partial(remap=...)`` and
    ``rules()`` the same mapping as a few regex rules.

    Example:
        >>> m = surgery.match(src, model, torch.randn(1, 3, 224, 224))  # doctest: +SKIP
        >>> print(m)  # doctest: +SKIP
        >>> surgery.load_partial(model, src, remap=m.remap())  # doctest: +SKIP
    """

    source: str
    model: str
    pairs: dict[str, MatchedKey] = field(default_factory=dict)
    unmatched_model: list[str] = field(default_factory=list)
    unmatched_source: list[str] = field(default_factory=list)
    layouts: list[Layout] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    source_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def complete(self) -> bool:
        """True when every model tensor has a source tensor."""
        return not self.unmatched_model

    def low(self) -> list[str]:
        """Model keys matched with low confidence (check these by hand)."""
        return [k for k, p in self.pairs.items() if p.level == "low"]

    def remap(self, *, min_confidence: float = 0.0) -> dict[str, str | None]:
        """``{source key: model key}`` for ``load_partial(model, ckpt, remap=...)``.

        Pairs below ``min_confidence`` are left out. Source keys without a partner that share
        a model key's name map to ``None`` (dropped), so nothing loads by name coincidence.
        """
        out: dict[str, str | None] = {}
        for mkey, p in self.pairs.items():
            if p.confidence >= min_confidence:
                out[p.source] = mkey
        for skey in self.source_shapes:
            if skey not in out and skey in self.model_shapes:
                out[skey] = None
        return out

    def rules(self, *, min_confidence: float = 0.0) -> list[tuple[str, str | None]]:
        """The mapping of :meth:`remap` as a short list of ``(regex, replacement)`` rules.

        Repeated patterns are written once with numbered groups
        (``^encoder\\.layers\\.encoder_layer_(\\d+)\\.ln_1\\.`` -> ``blocks.\\1.norm1.``);
        what does not compress gets an exact rule. The list is checked to rename every source
        key exactly as :meth:`remap` does when passed as ``load_partial(remap=...)``.
        """
        return _compress(self.remap(min_confidence=min_confidence), list(self.source_shapes))

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "model": self.model,
            "pairs": {
                k: {"source": p.source, "confidence": p.confidence, "reason": p.reason}
                for k, p in self.pairs.items()
            },
            "unmatched_model": list(self.unmatched_model),
            "unmatched_source": list(self.unmatched_source),
            "layouts": [
                {
                    "kind": lay.kind,
                    "source_keys": list(lay.source_keys),
                    "model_keys": list(lay.model_keys),
                    "adapter": lay.adapter,
                }
                for lay in self.layouts
            ],
            "notes": list(self.notes),
        }

    _header = ("model key", "shape", "source key", "confidence", "reason")
    _indent = ""

    def _rows(self) -> list[tuple[str, ...]]:
        rows = []
        for mkey, shape in self.model_shapes.items():
            p = self.pairs.get(mkey)
            if p is None:
                rows.append((mkey, format_shape(shape), "-", "-", "unmatched"))
            else:
                conf = f"{p.confidence:.2f} {p.level}"
                rows.append((mkey, format_shape(shape), p.source, conf, p.reason))
        return rows

    def _caption(self) -> str:
        n, low = len(self.pairs), len(self.low())
        matched = f"{n}/{len(self.model_shapes)} model tensors matched"
        unused = f"{len(self.unmatched_source)} of {len(self.source_shapes)} source tensors unused"
        return (
            f"match {self.source} -> {self.model}: {matched} ({n - low} high, {low} low "
            f"confidence); {unused}"
        )

    def _notes(self) -> list[str]:
        lines = []
        if self.unmatched_source:
            lines.append("source tensors without a partner:")
            lines += [f"  {k} {format_shape(self.source_shapes[k])}" for k in self.unmatched_source]
        if self.layouts:
            lines.append("not 1-to-1:")
            lines += [f"  {lay}" for lay in self.layouts]
        lines += [f"note: {n}" for n in self.notes]
        return lines


# --------------------------------------------------------------------------- entries


@dataclass
class _Entry:
    """One step of a model's sequence: a layer's own tensors, or one free parameter."""

    name: str  # module path, or the key of a free parameter
    kind: str  # class name shown in reasons
    family: str | None  # None: compare shapes only (checkpoint mode)
    keys: list[str]
    shapes: dict[str, tuple[int, ...]]  # canonical (Conv1D weights transposed)
    transposed: set[str] = field(default_factory=set)
    traced: bool = True

    def signature(self) -> tuple:
        return (self.family, tuple(sorted(self.shapes.values())))


def _family(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
        return "linear"
    if isinstance(mod, nn.MultiheadAttention):
        return "attention"
    if isinstance(mod, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    name = type(mod).__name__.lower()
    for word, fam in (("norm", "norm"), ("conv", "conv"), ("linear", "linear")):
        if word in name:
            return fam
    return None  # a container or custom module: each of its own tensors stands alone


def _module_entries(model: nn.Module) -> tuple[list[_Entry], dict[str, Tensor]]:
    """Entries in registration order, and every persistent state key -> its tensor."""
    state = model.state_dict(keep_vars=True)
    entries: list[_Entry] = []
    for mname, mod in model.named_modules(remove_duplicate=False):
        own = [
            (n, t)
            for n, t in [*mod._parameters.items(), *mod._buffers.items()]
            if t is not None and n not in mod._non_persistent_buffers_set
        ]
        own = [(n, t) for n, t in own if (f"{mname}.{n}" if mname else n) in state]
        if not own:
            continue
        fam = _family(mod)
        kind = type(mod).__name__
        if fam is None:
            for n, t in own:
                key = f"{mname}.{n}" if mname else n
                entries.append(_Entry(key, "parameter", "param", [key], {key: tuple(t.shape)}))
            continue
        keys, shapes, transposed = [], {}, set()
        for n, t in own:
            key = f"{mname}.{n}" if mname else n
            shape = tuple(t.shape)
            if kind == "Conv1D" and n == "weight" and len(shape) == 2:
                shape, _ = shape[::-1], transposed.add(key)
            keys.append(key)
            shapes[key] = shape
        entries.append(_Entry(mname or "(model)", kind, fam, keys, shapes, transposed))
    return entries, state


def _checkpoint_entries(shapes: Mapping[str, tuple[int, ...]]) -> list[_Entry]:
    """Keys grouped by their module path, in file (registration) order."""
    groups: dict[str, list[str]] = {}
    for key in shapes:
        groups.setdefault(key.rpartition(".")[0], []).append(key)
    return [
        _Entry(mod or "(model)", "?", None, keys, {k: tuple(shapes[k]) for k in keys})
        for mod, keys in groups.items()
    ]


class _FirstUse(TorchFunctionMode):
    """Records, in order, the first time each watched tensor is passed to a torch function.

    With ``to_meta`` every real tensor argument is replaced by a meta copy before the call,
    so a model whose parameters are on the meta device runs without memory or compute, and a
    real buffer is never modified.
    """

    def __init__(self, watched: set[int], to_meta: bool) -> None:
        super().__init__()
        self.watched = watched
        self.to_meta = to_meta
        self.order: dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        for t in _tensors((args, kwargs)):
            i = id(t)
            if i in self.watched and i not in self.order:
                self.order[i] = len(self.order)
        if self.to_meta:
            args, kwargs = _to_meta((args, kwargs))
        return func(*args, **kwargs)


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _to_meta(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj if obj.is_meta else obj.detach().to("meta")
    if isinstance(obj, tuple):
        return tuple(_to_meta(x) for x in obj)
    if isinstance(obj, list):
        return [_to_meta(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_meta(v) for k, v in obj.items()}
    return obj


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def _run_eval(model: nn.Module, example_input: Any, mode: TorchFunctionMode | None) -> Any:
    """Run the model in eval mode without gradients; training flags are restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if mode is None:
                return _call(model, example_input)
            with mode:
                return _call(model, example_input)
    finally:
        for m, flag in flags:
            m.training = flag


def _traced_entries(model: nn.Module, example_input: Any, which: str) -> list[_Entry]:
    """Entries in the order the forward pass first uses them; unused ones follow."""
    entries, state = _module_entries(model)
    watched = {id(t) for t in state.values()}
    # On the meta device first: no compute, no buffer changes. A model with real weights whose
    # forward reads tensor values (data-dependent shapes, .item()) is run for real instead.
    has_meta = any(t.is_meta for t in state.values())
    error: Exception | None = None
    for to_meta in (True,) if has_meta else (True, False):
        mode = _FirstUse(watched, to_meta)
        try:
            _run_eval(model, example_input, mode)
            break
        except SurgeryError:
            raise
        except Exception as e:
            error = e
    else:
        assert error is not None
        raise UsageError(
            f"running the {which} {type(model).__name__} on the example input failed: "
            f"{type(error).__name__}: {error}. Pass an input the model accepts (a tensor, a "
            "tuple of positional arguments or a dict of keyword arguments)"
            + (
                "; the model is on the meta device: build it on CPU if its forward reads "
                "tensor values."
                if has_meta
                else "."
            )
        ) from None
    never = len(mode.order) + len(entries)

    def first(i_entry: tuple[int, _Entry]) -> tuple[int, int]:
        i, e = i_entry
        pos = min((mode.order.get(id(state[k]), never) for k in e.keys), default=never)
        e.traced = pos < never
        return (pos, i)

    return [e for _, e in sorted(enumerate(entries), key=first)]


# --------------------------------------------------------------------------- alignment


def _tokens(name: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z]+|\d+", name.lower()))


def _struct_cost(a: _Entry, b: _Entry) -> int:
    sa, sb = a.signature(), b.signature()
    fam = 0 if (a.family is None or b.family is None or a.family == b.family) else _FAMILY
    if sa[1] == sb[1]:
        return fam
    ca, cb = Counter(sa[1]), Counter(sb[1])
    overlap = sum((ca & cb).values()) / max(len(sa[1]), len(sb[1]))
    return 100 + round(100 * (1 - overlap)) + fam


def _align(
    src: list[_Entry], dst: list[_Entry], anchors: set[tuple[int, int]]
) -> list[tuple[int | None, int | None]]:
    """Global alignment (edit distance) of the two entry sequences; cheapest path."""
    n, m = len(src), len(dst)
    anchored_a = {a for a, _ in anchors}
    anchored_b = {b for _, b in anchors}
    tok_a = [_tokens(e.name) for e in src]
    tok_b = [_tokens(e.name) for e in dst]
    sig_a = [e.signature() for e in src]
    sig_b = [e.signature() for e in dst]
    cache: dict[tuple, int] = {}
    gap = _GAP * _NAME_SCALE + 5
    prev = [j * gap for j in range(m + 1)]
    back = [bytes(m + 1)]
    for i in range(1, n + 1):
        cur = [i * gap] + [0] * m
        row = bytearray(m + 1)
        row[0] = 1
        a = i - 1
        for j in range(1, m + 1):
            b = j - 1
            key = (sig_a[a], sig_b[b])
            s = cache.get(key)
            if s is None:
                s = cache[key] = _struct_cost(src[a], dst[b])
            if (a, b) in anchors:
                s = _ANCHOR
            elif a in anchored_a or b in anchored_b:
                s = _FORBID
            if src[a].name == dst[b].name:
                nc = 0
            else:
                ta, tb = tok_a[a], tok_b[b]
                union = len(ta | tb)
                nc = 1 + round(9 * (1 - len(ta & tb) / union)) if union else 10
            best, how = prev[j - 1] + s * _NAME_SCALE + nc, 0
            up = prev[j] + gap
            if up < best:
                best, how = up, 1
            left = cur[j - 1] + gap
            if left < best:
                best, how = left, 2
            cur[j] = best
            row[j] = how
        back.append(bytes(row))
        prev = cur
    path: list[tuple[int | None, int | None]] = []
    i, j = n, m
    while i > 0 or j > 0:
        how = back[i][j] if i > 0 and j > 0 else (1 if i > 0 else 2)
        if how == 0:
            path.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif how == 1:
            path.append((i - 1, None))
            i -= 1
        else:
            path.append((None, j - 1))
            j -= 1
    path.reverse()
    return path


# --------------------------------------------------------------------------- pairing


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def _pair_entries(a: _Entry, b: _Entry) -> list[tuple[str, str, float, str]]:
    """Pair the tensors of two aligned entries by shape, then by name, then by order."""
    same_sig = a.signature()[1] == b.signature()[1]
    same_family = a.family is None or b.family is None or a.family == b.family
    by_shape_a: dict[tuple, list[str]] = defaultdict(list)
    by_shape_b: dict[tuple, list[str]] = defaultdict(list)
    for k in a.keys:
        by_shape_a[a.shapes[k]].append(k)
    for k in b.keys:
        by_shape_b[b.shapes[k]].append(k)
    if same_sig and same_family:
        base, reason = 1.0, "aligned module"
    elif same_sig:
        base, reason = 0.8, f"aligned module ({a.kind} ~ {b.kind})"
    else:
        base, reason = 0.6, "aligned module, other tensors differ"
    out = []
    for shape, ka in by_shape_a.items():
        kb = list(by_shape_b.get(shape, []))
        if not kb:
            continue
        rest_a = []
        for k in ka:  # same leaf name first (weight~weight, running_mean~running_mean)
            twin = next((x for x in kb if _leaf(x) == _leaf(k)), None)
            if twin is not None and len(ka) > 1:
                kb.remove(twin)
                out.append((k, twin, base, reason))
            else:
                rest_a.append(k)
        unique = len(ka) == 1
        for k, twin in zip(rest_a, kb, strict=False):
            conf = base if unique else min(base, 0.7)
            why = reason if unique else reason + ", repeated shape paired by order"
            out.append((k, twin, conf, why))
    return out


def _hint_pairs(
    hints: Hints | None,
    src_entries: list[_Entry],
    dst_entries: list[_Entry],
) -> list[tuple[str, str]]:
    """(source key, model key) pairs from hints: tensor keys, module names or regex rules."""
    if not hints:
        return []
    src_keys = {k: e for e in src_entries for k in e.keys}
    dst_keys = {k: e for e in dst_entries for k in e.keys}
    src_mods = {e.name: e for e in src_entries}
    dst_mods = {e.name: e for e in dst_entries}
    out: list[tuple[str, str]] = []
    if isinstance(hints, Mapping):
        for s, d in hints.items():
            if s in src_keys and d in dst_keys:
                out.append((s, d))
            elif s in src_mods and d in dst_mods:
                out += [(x, y) for x, y, _, _ in _pair_entries(src_mods[s], dst_mods[d])]
            else:
                if s not in src_keys and s not in src_mods:
                    bad, side, names = s, "source", [*src_keys, *src_mods]
                else:
                    bad, side, names = d, "model", [*dst_keys, *dst_mods]
                near = closest(bad, names)
                raise UsageError(
                    f"hint {s!r} -> {d!r}: {bad!r} is not a tensor key or module of the {side}"
                    + (f"; closest: {', '.join(near)}" if near else "")
                    + ". Hints pair two tensor keys or two modules that own tensors."
                )
        return out
    if isinstance(hints, Sequence) and not isinstance(hints, str):
        for rule in hints:
            if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
                raise UsageError(
                    f"hint {rule!r} is not a (regex, replacement) pair; pass e.g. "
                    "hints=[(r'^features\\.', 'backbone.')] or a dict of key pairs"
                )
            try:
                rx = re.compile(rule[0])
            except re.error as e:
                raise UsageError(f"hint rule {rule[0]!r} is not a valid regex: {e}") from None
            hits = [(k, rx.sub(rule[1], k)) for k in src_keys if rx.search(k)]
            hits = [(k, d) for k, d in hits if d in dst_keys]
            if not hits:
                raise UsageError(
                    f"hint rule {rule[0]!r} -> {rule[1]!r} turns no source key into a model key"
                    f"; source keys look like {next(iter(src_keys), '-')!r}, model keys like "
                    f"{next(iter(dst_keys), '-')!r}"
                )
            out += hits
        return out
    raise UsageError(
        f"hints must be a dict {{source key: model key}} or a list of (regex, replacement) "
        f"rules, not {type(hints).__name__}"
    )


def _find_layouts(
    src_left: list[tuple[str, tuple[int, ...]]],
    dst_left: list[tuple[str, tuple[int, ...]]],
) -> tuple[list[Layout], set[str], set[str]]:
    """One tensor that is k others stacked on dim 0 (fused q/k/v), in either direction."""
    layouts: list[Layout] = []
    used_s: set[str] = set()
    used_d: set[str] = set()

    def kind(key: str) -> str:
        return "bias" if "bias" in _leaf(key) else "weight"

    for one, many, direction in ((src_left, dst_left, "split"), (dst_left, src_left, "concat")):
        for key, shape in one:
            if not shape or key in used_s | used_d:
                continue
            for k in (3, 2):
                if shape[0] % k:
                    continue
                part = (shape[0] // k, *shape[1:])
                cands = [
                    x
                    for x, s in many
                    if s == part and kind(x) == kind(key) and x not in used_s | used_d
                ]
                if len(cands) == k:
                    if direction == "split":
                        lay = Layout("split", (key,), tuple(cands), "surgery.adapters.split_fused")
                        used_s.add(key)
                        used_d.update(cands)
                    else:
                        lay = Layout(
                            "concat", tuple(cands), (key,), "surgery.adapters.concat_fused"
                        )
                        used_d.add(key)
                        used_s.update(cands)
                    layouts.append(lay)
                    break
    return layouts, used_s, used_d


# --------------------------------------------------------------------------- match


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
    notes: list[str] = []
    dst_entries_reg, dst_state = _module_entries(model)
    model_shapes = {k: tuple(t.shape) for k, t in dst_state.items()}
    if isinstance(source, nn.Module):
        src_state = source.state_dict(keep_vars=True)
        source_shapes = {k: tuple(t.shape) for k, t in src_state.items()}
        src_desc = type(source).__name__
        if example_input is not None:
            src_entries = _traced_entries(source, example_input, "source")
            dst_entries = _traced_entries(model, example_input, "model")
            cap, mode = 1.0, ""
        else:
            src_entries, _ = _module_entries(source)
            dst_entries = dst_entries_reg
            cap, mode = 0.7, " (registration order)"
            notes.append("no example input: layers aligned in registration order")
    else:
        state = read_checkpoint(source) if not isinstance(source, Mapping) else dict(source)
        source_shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, Tensor)}
        src_desc = f"'{source}'" if isinstance(source, str) else "checkpoint"
        src_entries = _checkpoint_entries(source_shapes)
        dst_entries = _checkpoint_entries(model_shapes)
        cap, mode = 0.5, " (checkpoint only: registration order)"
        notes.append(
            "checkpoint only: layers aligned by registration order and name similarity; pass "
            "the source model and an example input for a structural match"
        )

    result = Match(
        source=src_desc,
        model=type(model).__name__,
        notes=notes,
        model_shapes=model_shapes,
        source_shapes=source_shapes,
    )
    pairs: dict[str, tuple[str, float, str]] = {}  # model key -> (source key, conf, reason)
    used_src: set[str] = set()

    def add(skey: str, dkey: str, conf: float, reason: str) -> None:
        if dkey in pairs or skey in used_src:
            return
        pairs[dkey] = (skey, conf, reason)
        used_src.add(skey)

    hinted = _hint_pairs(hints, src_entries, dst_entries)
    for s, d in hinted:
        if source_shapes[s] != model_shapes[d]:
            raise UsageError(
                f"hint pairs source '{s}' {format_shape(source_shapes[s])} with model '{d}' "
                f"{format_shape(model_shapes[d])}: the shapes differ, so it cannot load"
            )
        add(s, d, 1.0, "hint")
    where_a = {k: i for i, e in enumerate(src_entries) for k in e.keys}
    where_b = {k: j for j, e in enumerate(dst_entries) for k in e.keys}
    anchors = {(where_a[s], where_b[d]) for s, d in hinted}

    path = _align(src_entries, dst_entries, anchors)
    for a, b in path:
        if a is None or b is None:
            continue
        ea, eb = src_entries[a], dst_entries[b]
        for s, d, conf, reason in _pair_entries(ea, eb):
            conf = min(conf, cap)
            if ea.name == eb.name and s == d and mode:
                conf = max(conf, 0.9)  # same names and shapes: as good as a name match
            if not (ea.traced and eb.traced):
                conf = min(conf, 0.6)
                reason += " (not used by forward)"
            add(s, d, conf, reason + mode)

    # Leftovers: first between the same aligned neighbours, then anywhere, by unique shape.
    regions: list[tuple[list[str], list[str]]] = [([], [])]
    for a, b in path:
        if a is not None and b is not None:
            regions.append(([], []))
        if a is not None:
            regions[-1][0].extend(src_entries[a].keys)
        if b is not None:
            regions[-1][1].extend(dst_entries[b].keys)
    src_shape = {k: s for e in src_entries for k, s in e.shapes.items()}
    dst_shape = {k: s for e in dst_entries for k, s in e.shapes.items()}
    layout_src: set[str] = set()
    layout_dst: set[str] = set()
    passes = [(ra, rb, False) for ra, rb in regions] + [(list(src_shape), list(dst_shape), True)]
    for region_a, region_b, global_pass in passes:
        left_a = [k for k in region_a if k not in used_src and k not in layout_src]
        left_b = [k for k in region_b if k not in pairs and k not in layout_dst]
        if not left_a or not left_b:
            continue
        ca = Counter(src_shape[k] for k in left_a)
        cb = Counter(dst_shape[k] for k in left_b)
        for k in left_a:
            shape = src_shape[k]
            if ca[shape] == 1 and cb[shape] == 1:
                d = next(x for x in left_b if dst_shape[x] == shape)
                if global_pass:
                    add(k, d, min(0.4, cap), "only unmatched tensor of this shape" + mode)
                else:
                    add(k, d, min(0.6, cap), "only tensor of this shape between aligned layers")
        if not global_pass:
            lays, us, ud = _find_layouts(
                [(k, src_shape[k]) for k in left_a if k not in used_src],
                [(k, dst_shape[k]) for k in left_b if k not in pairs],
            )
            result.layouts += lays
            layout_src |= us
            layout_dst |= ud

    # Transposed layouts (GPT-2 Conv1D ~ nn.Linear): matched, but need an adapter to load.
    transposed_src = {k for e in src_entries for k in e.transposed}
    transposed_dst = {k for e in dst_entries for k in e.transposed}
    for dkey in model_shapes:
        if dkey not in pairs:
            continue
        skey, conf, reason = pairs[dkey]
        if (skey in transposed_src) != (dkey in transposed_dst):
            square = len(set(model_shapes[dkey])) == 1
            adapter = (
                "surgery.adapters.transposed (on the state dict: the shapes are square)"
                if square
                else "surgery.adapters.transpose_linear (as on_mismatch)"
            )
            result.layouts.append(Layout("transpose", (skey,), (dkey,), adapter))
            pairs[dkey] = (skey, conf, reason + ", transposed layout")

    result.pairs = {d: MatchedKey(*pairs[d]) for d in model_shapes if d in pairs}
    result.unmatched_model = [k for k in model_shapes if k not in pairs]
    result.unmatched_source = [k for k in source_shapes if k not in used_src]
    return result


# --------------------------------------------------------------------------- rules


def _repl_escape(text: str) -> str:
    return text.replace("\\", "\\\\")


def _group_ref(n: int, following: str) -> str:
    return f"\\g<{n}>" if following[:1].isdigit() else f"\\{n}"


def _candidate_rules(renames: dict[str, str], order: list[str]) -> list[tuple[str, str, list[str]]]:
    """(pattern, replacement, source keys it is meant for), in source-key order."""
    groups: dict[tuple, list[tuple[tuple[str, ...], tuple[str, ...], str]]] = {}
    for s in order:
        if s not in renames:
            continue
        d = renames[s]
        ss, ds = s.split("."), d.split(".")
        k = 0
        while k < min(len(ss) - 1, len(ds)) and ss[-1 - k] == ds[-1 - k]:
            k += 1
        head_s = ".".join(ss[: len(ss) - k])
        head_d = ".".join(ds[: len(ds) - k])
        ps, pd = re.split(r"(\d+)", head_s), re.split(r"(\d+)", head_d)
        template = ("prefix" if k else "full", tuple(ps[0::2]), tuple(pd[0::2]))
        groups.setdefault(template, []).append((tuple(ps[1::2]), tuple(pd[1::2]), s))
    rules: list[tuple[str, str, list[str], int]] = []
    for (how, lit_s, lit_d), members in groups.items():
        n_s, n_d = len(lit_s) - 1, len(lit_d) - 1
        assign: dict[int, int] = {}  # source slot -> model slot
        for a in range(n_s):
            if len({m[0][a] for m in members}) < 2:
                continue  # one value only: keep it literal
            for b in range(n_d):
                if b not in assign.values() and all(m[0][a] == m[1][b] for m in members):
                    assign[a] = b
                    break
        sub: dict[tuple, list[str]] = {}
        for vs, vd, key in members:
            lits = (
                tuple(v for a, v in enumerate(vs) if a not in assign),
                tuple(v for b, v in enumerate(vd) if b not in assign.values()),
            )
            sub.setdefault(lits, []).append(key)
        for (fixed_s, fixed_d), keys in sub.items():
            it_s, it_d = iter(fixed_s), iter(fixed_d)
            group_of = {}
            pat = "^" + re.escape(lit_s[0])
            for a in range(n_s):
                if a in assign:
                    group_of[assign[a]] = len(group_of) + 1
                    pat += r"(\d+)"
                else:
                    pat += re.escape(next(it_s))
                pat += re.escape(lit_s[a + 1])
            rep = _repl_escape(lit_d[0])
            for b in range(n_d):
                if b in group_of:
                    rep += _group_ref(group_of[b], lit_d[b + 1])
                else:
                    rep += next(it_d)
                rep += _repl_escape(lit_d[b + 1])
            if how == "prefix":
                pat += r"\."
                rep += "." if rep else ""
            else:
                pat += "$"
            rules.append((pat, rep, keys, order.index(keys[0])))
    rules.sort(key=lambda r: r[3])
    return [(p, r, keys) for p, r, keys, _ in rules]


def _simulate(rules: list[tuple[str, str | None]], keys: list[str]) -> dict[str, str | None] | None:
    """What load_partial's remap does to each key; None when two keys collide."""
    try:
        new_to_old, dropped, _ = apply_remap(keys, rules)
    except KeyCollisionError:
        return None
    out: dict[str, str | None] = {old: new for new, old in new_to_old.items()}
    out.update(dict.fromkeys(dropped))
    return out


def _compress(
    mapping: dict[str, str | None], source_keys: list[str]
) -> list[tuple[str, str | None]]:
    want = {k: mapping.get(k, k) for k in source_keys}
    drops: list[tuple[str, str | None]] = [
        ("^" + re.escape(k) + "$", None) for k in source_keys if want[k] is None
    ]
    renames = {k: v for k, v in want.items() if v is not None and v != k}
    cands = _candidate_rules(renames, source_keys)
    for _ in range(len(cands) + 1):
        rules = drops + [(p, r) for p, r, _ in cands]
        got = _simulate(rules, source_keys)
        if got == want:
            return rules
        wrong = set(source_keys) if got is None else {k for k in source_keys if got[k] != want[k]}
        # Replace every generalised rule that touched a wrong key by exact ones.
        fixed: list[tuple[str, str, list[str]]] = []
        changed = False
        for p, r, keys in cands:
            rx = re.compile(p)
            hit = any(rx.search(k) for k in wrong) or bool(wrong & set(keys))
            exact = len(keys) == 1 and p == "^" + re.escape(keys[0]) + "$"
            if hit and not exact:
                fixed += [("^" + re.escape(k) + "$", _repl_escape(renames[k]), [k]) for k in keys]
                changed = True
            else:
                fixed.append((p, r, keys))
        cands = fixed
        if not changed:
            break
    # Exact rules that still chain into each other (a rename cycle): tag every key first so
    # no rule can match another rule's output.
    tag = "__src__."
    rules = [("^", tag), *[("^" + re.escape(tag) + p[1:], r) for p, r in drops]]
    rules += [("^" + re.escape(tag + s) + "$", _repl_escape(d)) for s, d in renames.items()]
    rules.append(("^" + re.escape(tag), ""))
    return rules


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
) -> float:
    """Run both models on ``example_input`` (eval mode, no gradients) and return the largest
    absolute difference between their outputs.

    The compared tensor is the output itself, the first tensor of a tuple, or
    ``last_hidden_state`` of a dict / transformers ``ModelOutput`` (else its first tensor);
    ``output`` picks another (a key, an index or a callable) and ``source_output`` one for
    the source alone. Training flags are restored afterwards.

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
    a = _select_output(_run_eval(source, example_input, None), source_output or output, "source")
    b = _select_output(_run_eval(model, example_input, None), output, "model")
    if a.shape != b.shape:
        raise UsageError(
            f"outputs differ in shape: source {format_shape(a.shape)} vs model "
            f"{format_shape(b.shape)}; pass output= / source_output= to pick comparable tensors "
            "(e.g. a callable returning features before the head)"
        )
    if a.numel() == 0:
        return 0.0
    diff = (a.detach().double() - b.detach().double()).abs().max().item()
    return float(diff) if not math.isnan(diff) else math.inf
