"""Classifier heads by label: keep the rows of the classes a new head shares with the old one.

``head_rows(old_labels, new_labels)`` is an ``on_mismatch`` adapter for ``load_partial``. For a
classifier weight or bias whose first dimension is the number of classes, it copies the row of
every label present in both lists to the label's new position and initialises the rows of new
labels like a freshly built layer would. It records what it did (``summary``, ``notes()``) so
a caller can print it. ``chain`` combines it with other adapters (e.g. ``adapt_shapes``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._table import first_n
from .errors import LoadError, UsageError

__all__ = ["Chain", "HeadRows", "chain", "head_rows"]

Adapter = Callable[[str, Tensor, Tensor], Tensor | None]
Labels = Iterable[Hashable] | str | os.PathLike

_SHOW = 10  # labels listed per note

# A fresh layer of the head's kind, by weight dimensions: its reset_parameters() is the
# default init of the new rows (kaiming_uniform(a=sqrt(5)) weight, uniform(+-1/sqrt(fan_in)) bias).
_LAYERS: dict[int, type[nn.Module]] = {2: nn.Linear, 3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


def head_rows(
    old_labels: Labels,
    new_labels: Labels,
    *,
    init: Literal["default", "mean"] = "default",
    model: nn.Module | None = None,
) -> HeadRows:
    """An ``on_mismatch`` adapter that keeps classifier rows by label.

    A mismatched tensor whose first dimension is ``len(old_labels)`` in the checkpoint and
    ``len(new_labels)`` in the model (other dimensions equal) is taken as a head weight or
    bias: the row of each label in both lists is copied to its new position; the rows of new
    labels are initialised as the layer's ``reset_parameters`` would (``init="default"``: the
    rows of a fresh ``nn.Linear``/``nn.ConvNd`` of the new size, drawn from torch's global RNG),
    or to the mean of the old rows (``init="mean"``). Anything else returns ``None`` (skipped,
    or handled by the next adapter of a :func:`chain`). The model tensor's values are never
    read, so meta-device models (:func:`empty_init`) work.

    Labels are any hashables; ``old_labels``/``new_labels`` may also be the path of a text file
    with one label a line (blank lines ignored). Lists of equal length give equal shapes, which
    are not a mismatch: the adapter only runs when the class count changes.

    A bias is initialised with its weight's fan-in; ``load_partial`` hands a layer's weight to
    adapters before its bias, whatever the file's order. Only when the checkpoint's weight is
    absent or fits already does the bias need ``model=`` to look the layer's shape up; without
    it that case raises :class:`LoadError`.

    After a load, ``adapter.summary`` maps each head tensor to what was kept and initialised;
    ``adapter.notes()`` (and ``str(adapter)``) says it in words, and the load report carries
    those lines among its notes.

    Example:
        >>> import torch, surgery
        >>> old = torch.nn.Linear(4, 3)
        >>> new = torch.nn.Linear(4, 4)
        >>> rows = surgery.head_rows(["cat", "dog", "fox"], ["dog", "cat", "owl", "fox"])
        >>> report = surgery.load_partial(new, old, on_mismatch=rows)
        >>> torch.equal(new.weight[0], old.weight[1]), torch.equal(new.weight[3], old.weight[2])
        (True, True)
        >>> print(rows.notes()[0])
        weight: kept 3 of 4 rows by label (checkpoint had 3); initialised 1 (default): 'owl'
    """
    return HeadRows(old_labels, new_labels, init=init, model=model)


class HeadRows:
    """The adapter :func:`head_rows` returns: a callable ``(name, ckpt, model) -> Tensor | None``.

    ``summary`` maps each adapted tensor name to ``{"kept": int, "rows": (old, new),
    "new_labels": [...], "dropped": int, "init": str}``.
    """

    def __init__(
        self,
        old_labels: Labels,
        new_labels: Labels,
        *,
        init: Literal["default", "mean"] = "default",
        model: nn.Module | None = None,
    ) -> None:
        if init not in ("default", "mean"):
            raise UsageError(f"head_rows init must be 'default' or 'mean', not {init!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise UsageError(f"head_rows model= must be an nn.Module, not {type(model).__name__}")
        self.old_labels = _labels(old_labels, "old_labels")
        self.new_labels = _labels(new_labels, "new_labels")
        self.init = init
        self._model = model
        old_pos = {label: i for i, label in enumerate(self.old_labels)}
        pairs = [(i, old_pos[lb]) for i, lb in enumerate(self.new_labels) if lb in old_pos]
        self._new_idx = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        self._old_idx = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        self._init_idx = torch.tensor(
            [i for i, lb in enumerate(self.new_labels) if lb not in old_pos], dtype=torch.long
        )
        self.summary: dict[str, dict[str, Any]] = {}
        # layer prefix -> (fresh layer, names already served from it)
        self._fresh: dict[str, tuple[nn.Module, set[str]]] = {}

    @property
    def added(self) -> list[Hashable]:
        """Labels of ``new_labels`` absent from ``old_labels`` (their rows are initialised)."""
        return [self.new_labels[i] for i in self._init_idx.tolist()]

    def __call__(self, name: str, ckpt: Tensor, model: Tensor) -> Tensor | None:
        n_old, n_new = len(self.old_labels), len(self.new_labels)
        if (
            ckpt.ndim != model.ndim
            or ckpt.ndim == 0
            or ckpt.shape[0] != n_old
            or model.shape[0] != n_new
            or ckpt.shape[1:] != model.shape[1:]
        ):
            return None
        out = torch.empty(model.shape, dtype=model.dtype)  # model values are never read
        if len(self._new_idx):
            out[self._new_idx] = ckpt[self._old_idx].to(out.dtype)
        if len(self._init_idx):
            if self.init == "mean":
                fill = ckpt.float().mean(0, keepdim=True)
            else:
                fill = self._fresh_rows(name, model.shape)[self._init_idx]
            out[self._init_idx] = fill.to(out.dtype)
        self.summary[name] = {
            "kept": len(self._new_idx),
            "rows": (n_old, n_new),
            "new_labels": self.added,
            "dropped": n_old - len(self._new_idx),
            "init": self.init,
        }
        return out

    def _fresh_rows(self, name: str, shape: torch.Size) -> Tensor:
        """This tensor as a fresh layer of the new size holds it after ``reset_parameters``."""
        prefix = name.rpartition(".")[0]
        entry = self._fresh.get(prefix)
        if entry is None or name in entry[1]:  # a new layer, or a second load: draw again
            weight_shape = shape if len(shape) >= 2 else self._weight_shape(name, prefix)
            entry = self._fresh[prefix] = (_fresh_layer(weight_shape), set())
        layer, served = entry
        served.add(name)
        return (layer.weight if len(shape) >= 2 else layer.bias).detach()

    def _weight_shape(self, name: str, prefix: str) -> torch.Size:
        """The weight shape of a bias's layer: from ``model=``, else an error saying so."""
        weight = None
        if self._model is not None:
            try:
                weight = self._model.get_submodule(prefix).get_parameter("weight")
            except AttributeError:
                weight = None
        if weight is None or weight.ndim not in _LAYERS:
            where = "" if self._model is None else f" (model= has no weight at '{prefix}')"
            raise LoadError(
                f"head_rows cannot initialise the new rows of '{name}' like reset_parameters: "
                f"a bias needs its layer's fan-in, and the checkpoint gave '{name}' before the "
                f"weight of '{prefix or name}'{where}. Pass model=<the model being loaded> to "
                "head_rows, or init='mean'. Nothing was loaded."
            )
        return weight.shape

    def notes(self) -> list[str]:
        """One line per head tensor: rows kept, rows initialised and the new labels."""
        lines = []
        for name, s in self.summary.items():
            n_old, n_new = s["rows"]
            new = s["new_labels"]
            shown = first_n([repr(lb) for lb in new], _SHOW)
            lines.append(
                f"{name}: kept {s['kept']} of {n_new} rows by label (checkpoint had {n_old}); "
                f"initialised {len(new)} ({s['init']})" + (f": {shown}" if new else "")
            )
        if self.summary and not len(self._new_idx):
            lines.append(
                "head_rows: no label is in both lists; check they use the same form "
                f"(old like {self.old_labels[0]!r}, new like {self.new_labels[0]!r})"
            )
        return lines

    def __str__(self) -> str:
        head = (
            f"head_rows: {len(self.old_labels)} -> {len(self.new_labels)} labels, "
            f"{len(self._new_idx)} shared, {len(self._init_idx)} new ({self.init} init)"
        )
        notes = self.notes() or ["no head tensor adapted yet"]
        return "\n".join([head, *(f"  {n}" for n in notes)])

    def __repr__(self) -> str:
        return (
            f"HeadRows({len(self.old_labels)} -> {len(self.new_labels)} labels, init={self.init!r})"
        )


def chain(*adapters: Adapter) -> Chain:
    """Combine ``on_mismatch`` adapters: each mismatch goes to them in turn; the first
    non-``None`` result wins (``None`` from all of them: skipped).

    Example:
        >>> import surgery
        >>> from surgery.adapters import adapt_shapes
        >>> adapter = surgery.chain(surgery.head_rows(range(1000), range(10)), adapt_shapes)
        >>> surgery.load_partial(model, "resnet18.pth", on_mismatch=adapter)  # doctest: +SKIP
    """
    return Chain(*adapters)


class Chain:
    """The adapter :func:`chain` returns; ``notes()`` gathers its members' notes."""

    def __init__(self, *adapters: Adapter) -> None:
        if not adapters:
            raise UsageError("chain needs at least one adapter")
        for a in adapters:
            if not callable(a):
                raise UsageError(
                    f"chain takes callables (name, ckpt, model) -> Tensor | None, not {a!r}"
                )
        self.adapters = adapters

    def __call__(self, name: str, ckpt: Tensor, model: Tensor) -> Tensor | None:
        for adapter in self.adapters:
            value = adapter(name, ckpt, model)
            if value is not None:
                return value
        return None

    @property
    def summary(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for a in self.adapters:
            out.update(getattr(a, "summary", None) or {})
        return out

    def notes(self) -> list[str]:
        return [n for a in self.adapters if callable(getattr(a, "notes", None)) for n in a.notes()]

    def __str__(self) -> str:
        return "\n".join(self.notes())

    def __repr__(self) -> str:
        names = ", ".join(getattr(a, "__name__", None) or repr(a) for a in self.adapters)
        return f"chain({names})"


# --------------------------------------------------------------------------- helpers


def _labels(labels: Labels, what: str) -> list[Hashable]:
    """A list of unique hashable labels, from an iterable or a text file (one a line)."""
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(
                f"head_rows {what}: cannot read label file '{path}' ({e.strerror or e}); pass a "
                "list of labels or the path of a text file with one label a line"
            ) from None
        out: list[Hashable] = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        try:
            out = list(labels)
        except TypeError:
            raise UsageError(
                f"head_rows {what} must be a list of labels or a file path, not "
                f"{type(labels).__name__}"
            ) from None
    if not out:
        raise UsageError(f"head_rows {what} is empty")
    seen: dict[Hashable, int] = {}
    for i, label in enumerate(out):
        try:
            first = seen.setdefault(label, i)
        except TypeError:
            raise UsageError(
                f"head_rows {what}[{i}] = {label!r} is not hashable; use str or int labels"
            ) from None
        if first != i:
            raise UsageError(
                f"head_rows {what} holds {label!r} twice (positions {first} and {i}); each "
                "label names one row"
            )
    return out


def _fresh_layer(weight_shape: torch.Size) -> nn.Module:
    """A CPU layer with this weight shape, initialised by its own ``reset_parameters``."""
    kind = _LAYERS.get(len(weight_shape))
    if kind is None:
        raise LoadError(
            f"head_rows has no default init for a {len(weight_shape)}-d head weight "
            f"{tuple(weight_shape)}; pass init='mean'. Nothing was loaded."
        )
    out_features, in_features = weight_shape[0], weight_shape[1]
    kernel = tuple(weight_shape[2:])
    args = (in_features, out_features, kernel) if kernel else (in_features, out_features)
    # skip_init builds on meta then allocates on CPU: no RNG draw until reset_parameters, and
    # correct inside empty_init() or a torch.device("meta") block too.
    layer = torch.nn.utils.skip_init(kind, *args, device="cpu")
    with torch.no_grad():
        layer.reset_parameters()
    return layer
