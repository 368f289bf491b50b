"""Classifier heads by label: keep the rows of the classes a new head shares with the old one.

``head_rows(old_labels, new_labels)`` is an ``on_mismatch`` adapter for ``load_partial``. For a
classifier weight or bias whose first dimension is the number of classes, it copies the row of
every label present in both lists to the label's new position and initialises the rows of new
labels with the distribution a freshly built layer gives them. It records what it did
(``summary``, ``notes()``) so a caller can print it. ``chain`` combines it with other adapters
(e.g. ``adapt_shapes``).

Memory: the output tensor is the only allocation of the head's size. Kept rows are copied from
the checkpoint tensor into it run by run (a bounded buffer for scattered rows); new rows are
drawn on a tensor of just those rows. The adapter keeps no tensor from a load, only the counts
and labels its notes say.
"""

from __future__ import annotations

import math
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

# Head weights with a default init: nn.Linear (2-d) and nn.Conv1d/2d/3d (3- to 5-d), whose
# reset_parameters() draw kaiming_uniform(a=sqrt(5)) weights and uniform(+-1/sqrt(fan_in)) biases.
_WEIGHT_DIMS = range(2, 6)
_MAX_RUNS = 256  # kept rows in at most this many runs of consecutive rows: one copy per run
_CHUNK_BYTES = 16 << 20  # else gathered through a buffer of this size


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
    labels are initialised with the distribution the layer's ``reset_parameters`` gives them
    (``init="default"``), or to the mean of the old rows (``init="mean"``). Anything else
    returns ``None`` (skipped, or handled by the next adapter of a :func:`chain`). The model
    tensor's values are never read, so meta-device models (:func:`empty_init`) work.

    ``init="default"`` treats a 2-d weight as an ``nn.Linear``'s and a 3- to 5-d one as an
    ``nn.ConvNd``'s, whatever the layer (an ``nn.Embedding`` too). Only the ``k`` new rows are
    drawn, from torch's global RNG: a weight's with ``nn.init.kaiming_uniform_(a=math.sqrt(5))``
    on a float32 tensor of those rows, a bias's ``uniform_(-1/sqrt(fan_in), 1/sqrt(fan_in))``
    with its weight's fan-in, then cast to the model's dtype. The bounds depend only on the
    dimensions after the first, so the rows have the full layer's distribution; as numbers they
    are the rows of a fresh layer with ``k`` outputs (``nn.Linear(in_features, k)``) built at
    that point, not those of a fresh full-size layer (drawing that would cost a whole layer).
    The checkpoint's rows are copied exactly.

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
        self._fan_in: dict[str, int] = {}  # layer prefix -> fan-in of the weight adapted there

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
        fill = None
        if len(self._init_idx):  # first, so a failure allocates nothing of the head's size
            fill = _mean_row(ckpt) if self.init == "mean" else self._new_rows(name, model.shape)
        # model values are never read: only its shape and dtype (a meta tensor is fine)
        out = torch.empty(model.shape, dtype=model.dtype, device=ckpt.device)
        if len(self._new_idx):
            _copy_rows(out, self._new_idx, ckpt, self._old_idx)
        if fill is not None:
            out[self._init_idx.to(out.device)] = fill.to(out.device, out.dtype)
        self.summary[name] = {
            "kept": len(self._new_idx),
            "rows": (n_old, n_new),
            "new_labels": self.added,
            "dropped": n_old - len(self._new_idx),
            "init": self.init,
        }
        return out

    def _new_rows(self, name: str, shape: torch.Size) -> Tensor:
        """The new rows alone, drawn with the bounds ``reset_parameters`` gives the full layer."""
        rows = (len(self._init_idx), *shape[1:])
        prefix = name.rpartition(".")[0]
        if len(shape) >= 2:
            if len(shape) not in _WEIGHT_DIMS:
                raise LoadError(
                    f"head_rows has no default init for a {len(shape)}-d head weight "
                    f"{tuple(shape)} ('{name}'); pass init='mean'. Nothing was loaded."
                )
            self._fan_in[prefix] = math.prod(shape[1:])
            out = torch.empty(rows, dtype=torch.float32)
            with torch.no_grad():  # fan_in (dims after the first) is the full layer's
                return nn.init.kaiming_uniform_(out, a=math.sqrt(5))
        fan_in = self._fan_in.get(prefix)
        if fan_in is None:
            fan_in = math.prod(self._weight_shape(name, prefix)[1:])
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        return torch.empty(rows, dtype=torch.float32).uniform_(-bound, bound)

    def _weight_shape(self, name: str, prefix: str) -> torch.Size:
        """The weight shape of a bias's layer: from ``model=``, else an error saying so."""
        weight = None
        if self._model is not None:
            try:
                weight = self._model.get_submodule(prefix).get_parameter("weight")
            except AttributeError:
                weight = None
        if weight is None or weight.ndim not in _WEIGHT_DIMS:
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


def _copy_rows(out: Tensor, dst: Tensor, src: Tensor, src_idx: Tensor) -> None:
    """``out[dst] = src[src_idx]`` without a temporary of the head's size: one ``copy_`` per run
    of consecutive rows (a vocabulary kept in place is one run), else a gather through a buffer
    of at most ``_CHUNK_BYTES``."""
    step = (dst.diff() != 1) | (src_idx.diff() != 1)
    if int(step.sum()) < _MAX_RUNS:
        starts = [0, *(step.nonzero().flatten() + 1).tolist()]
        for a, b in zip(starts, [*starts[1:], len(dst)], strict=True):
            d, s = int(dst[a]), int(src_idx[a])
            out[d : d + b - a].copy_(src[s : s + b - a])
        return
    row_bytes = max(1, src[0].numel() * max(src.element_size(), out.element_size()))
    chunk = max(1, _CHUNK_BYTES // row_bytes)
    dst, src_idx = dst.to(out.device), src_idx.to(src.device)
    for a in range(0, len(dst), chunk):
        rows = src.index_select(0, src_idx[a : a + chunk]).to(out.device, out.dtype)
        out.index_copy_(0, dst[a : a + chunk], rows)


def _mean_row(t: Tensor) -> Tensor:
    """The mean of ``t``'s rows as a float32 ``(1, ...)`` tensor, summed in chunks so that a
    bf16 or float16 checkpoint tensor is not first copied whole into float32."""
    if t.dtype == torch.float32:
        return t.mean(0, keepdim=True)
    total = torch.zeros((1, *t.shape[1:]), dtype=torch.float32, device=t.device)
    row_bytes = max(1, t[0].numel() * 4) if len(t) else 1
    chunk = max(1, _CHUNK_BYTES // row_bytes)
    for a in range(0, len(t), chunk):
        total += t[a : a + chunk].sum(0, keepdim=True, dtype=torch.float32)
    return total / len(t)
