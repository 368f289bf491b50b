"""What :func:`~surgery.match` found, as data and as a table: :class:`Match` and its parts."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._table import _Table, format_shape
from .rules import compress

__all__ = ["HIGH", "Difference", "Layout", "Match", "MatchedKey"]

HIGH = 0.75  # confidences at or above this are labelled 'high'


class Difference(float):
    """What :func:`~surgery.verify` returns: the largest absolute difference, a ``float`` that
    compares, formats and serialises as one, and says whether the comparison means anything.

    ``constant`` names the sides (``"source"``, ``"model"``) whose output holds one value in
    every element (a zero-initialised head, as torchvision's ViT has): such an output does not
    depend on the weights before it, so a small difference proves nothing. ``informative`` is
    false then, and ``str()`` / ``repr()`` say so after the number.

    Example:
        >>> d = Difference(0.0, ("source", "model"))
        >>> d == 0.0, d.informative
        (True, False)
        >>> Difference(1e-7) < 1e-5, repr(Difference(0.5))
        (True, '0.5')
    """

    constant: tuple[str, ...]

    def __new__(cls, value: float, constant: tuple[str, ...] = ()) -> Difference:
        self = super().__new__(cls, value)
        self.constant = tuple(constant)
        return self

    @property
    def informative(self) -> bool:
        """False when an output was constant: the difference says nothing about the weights."""
        return not self.constant

    @property
    def note(self) -> str:
        """Why the difference is not informative (``""`` when it is)."""
        if not self.constant:
            return ""
        which = (
            "both outputs are constant"
            if len(self.constant) == 2
            else f"the {self.constant[0]}'s output is constant"
        )
        return (
            f"{which}: one value in every element, so the comparison says nothing about the "
            "weights before them. Compare outputs that depend on them, e.g. the features before "
            "a zero-initialised head: replace both heads with nn.Identity(), or pick a tensor "
            "of the output with output="
        )

    def __repr__(self) -> str:
        number = float.__repr__(self)
        return f"{number} ({self.note})" if self.constant else number

    __str__ = __repr__

    def __reduce__(self) -> tuple:
        return (Difference, (float(self), self.constant))


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
        return compress(self.remap(min_confidence=min_confidence), list(self.source_shapes))

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
