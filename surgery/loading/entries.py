"""Plan entries: what happens to one model key, one checkpoint key, or a pair, as plain data.

Actions, one per entry:

==============  ============================================================================
``load``        the checkpoint tensor is copied into the model key (same shape and dtype)
``cast``        the same, with a dtype cast (e.g. float16 -> float32)
``convert``     made from several checkpoint tensors (or a part of one) by the model's
                transformers conversion (``conversion`` says how), cast to the model's dtype
``adapt``       shapes differ; the ``on_mismatch`` adapter makes the value at apply time
``skip``        left out on purpose: ``skip=`` matched the model key, ``remap`` dropped the
                checkpoint key (``model_key`` is ``None``), or :meth:`LoadPlan.drop`
``mismatch``    shapes differ and nothing adapts them: not loaded
``missing``     a model key the checkpoint has no tensor for: keeps its current value
``unexpected``  a checkpoint key the model has no tensor for (``model_key`` holds the name it
                was mapped to, if that differs from ``ckpt_key``)
``defaulted``   a missing ``num_batches_tracked`` counter: keeps its default, not an error
``initialise``  a missing key of a model on the ``meta`` device: its module's
                ``reset_parameters()`` gives it a value (counts as missing for ``strict``)
``adapter``     a PEFT adapter weight (``lora_A``, ``lora_B``, ...) of a model wrapped by
                ``peft.get_peft_model`` that the checkpoint does not hold: left as it is
==============  ============================================================================

Entries of converted tensors (``convert``, and ``adapt``/``mismatch``/``skip`` of such a
tensor) have no ``ckpt_key``: their :class:`Conversion` names the checkpoint keys, and
``ckpt_shape``/``ckpt_dtype`` describe the converted tensor (planned from the file's headers).

The decisions every step shares live here, once: :func:`copy_action` (load or cast),
:func:`pair_action` (and mismatch or adapt), :meth:`Mismatch.from_entry`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._table import format_shape
from ..errors import UsageError

__all__ = [
    "ACTIONS",
    "NO_VALUE",
    "WRITES",
    "Conversion",
    "Mismatch",
    "PlanEntry",
    "copy_action",
    "pair_action",
]

ACTIONS = (
    "load",
    "cast",
    "convert",
    "adapt",
    "skip",
    "mismatch",
    "missing",
    "unexpected",
    "defaulted",
    "initialise",
    "adapter",
)
WRITES = frozenset({"load", "cast", "convert", "adapt"})  # actions that give a model key a value
NO_VALUE = frozenset({"missing", "defaulted", "initialise", "adapter"})

Shape = tuple[int, ...]

# How an op of transformers reads in a plan line, by its class name.
_OP_WORDS = {
    "MergeModulelist": "merged",
    "SplitModulelist": "split",
    "Concatenate": "concatenated",
    "Chunk": "chunked",
    "Split": "split",
    "Transpose": "transposed",
    "Interleave": "interleaved",
    "PermuteForRope": "permuted for RoPE",
}


@dataclass(frozen=True, slots=True)
class Conversion:
    """How a converted tensor is made: the transformers converter (its source and target
    patterns and ops, as ``repr`` gives them), the checkpoint keys per source pattern in
    stacking order, ``layer`` (transformers' name for the group: its first target, in the
    base model's names) and ``output`` (the name of this entry's tensor among the group's).

    Entries made by one converter call share everything but ``output``.
    """

    sources: tuple[tuple[str, tuple[str, ...]], ...]
    targets: tuple[str, ...]
    ops: tuple[str, ...]
    layer: str
    output: str

    @property
    def keys(self) -> list[str]:
        """Every checkpoint key read, pattern by pattern."""
        return [k for _, ks in self.sources for k in ks]

    @property
    def group(self) -> tuple[str, tuple[str, ...]]:
        """What entries of one converter call share."""
        return self.layer, tuple(p for p, _ in self.sources)

    def describe(self) -> str:
        """``'m.experts.{0..3}.w1/w3.weight (merged, concatenated)'``: the keys in short."""
        words = [_OP_WORDS.get(op.split("(")[0], op.split("(")[0]) for op in self.ops]
        return f"{compact(self.keys)} ({', '.join(words)})"

    def to_dict(self) -> dict:
        return {
            "ckpt_keys": {p: list(ks) for p, ks in self.sources},
            "targets": list(self.targets),
            "ops": list(self.ops),
            "layer": self.layer,
            "output": self.output,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Conversion:
        if not isinstance(d, Mapping) or not isinstance(d.get("ckpt_keys"), Mapping):
            raise TypeError(f"a conversion is a dict with 'ckpt_keys', got {d!r}")
        sources = tuple((str(p), tuple(_strs(ks))) for p, ks in d["ckpt_keys"].items())
        return cls(
            sources,
            tuple(_strs(d.get("targets") or ())),
            tuple(_strs(d.get("ops") or ())),
            str(d.get("layer") or ""),
            str(d.get("output") or ""),
        )


def _strs(v: Any) -> list[str]:
    if isinstance(v, (str, bytes)) or not all(isinstance(s, str) for s in v):
        raise TypeError(f"expected a list of strings, got {v!r}")
    return list(v)


def compact(keys: Iterable[str]) -> str:
    """Dotted keys in one pattern: the parts that vary in braces.

    Example:
        >>> compact(["e.0.w1.weight", "e.1.w1.weight", "e.0.w3.weight", "e.1.w3.weight"])
        'e.{0..1}.w1/w3.weight'
        >>> compact(["a.weight"])
        'a.weight'
    """
    keys = list(keys)
    split = [k.split(".") for k in keys]
    if not keys or len({len(p) for p in split}) != 1:
        return f"{keys[0] if keys else ''} ... ({len(keys)} keys)"
    columns = [list(dict.fromkeys(col)) for col in zip(*split, strict=True)]
    if len(set(keys)) != _product(len(c) for c in columns):  # not a full grid of names
        return f"{keys[0]} ... ({len(keys)} keys)"
    return ".".join(_column(c) for c in columns)


def _product(ns: Iterable[int]) -> int:
    out = 1
    for n in ns:
        out *= n
    return out


def _column(values: list[str]) -> str:
    if len(values) == 1:
        return values[0]
    if all(v.isdigit() for v in values):
        nums = sorted(int(v) for v in values)
        if nums == list(range(nums[0], nums[-1] + 1)):
            return f"{{{nums[0]}..{nums[-1]}}}"
        return "{" + ",".join(map(str, nums)) + "}"
    return "/".join(values)


@dataclass(slots=True)
class PlanEntry:
    """One step of a load: what happens to one model key, one checkpoint key, or a pair.

    Shapes are tuples of ints and dtypes names such as ``"float32"``, so an entry is plain
    JSON-able data. ``reason`` is a short human note (``"dropped by remap"``). ``via`` is
    set on the entries of a module that loads itself: the name the checkpoint entry is
    handed to that module's loading under (before its own renaming); shapes are ``None``
    for non-tensor entries (packed weights, a dict extra state). ``conversion`` is set on
    the entries of tensors made by a transformers conversion (see :class:`Conversion`).
    """

    action: str
    model_key: str | None
    ckpt_key: str | None
    model_shape: Shape | None = None
    ckpt_shape: Shape | None = None
    model_dtype: str | None = None
    ckpt_dtype: str | None = None
    reason: str = ""
    tied_to: str | None = None
    via: str | None = None  # handed to its module's own loading under this name
    conversion: Conversion | None = None  # how a converted tensor is made

    @property
    def key(self) -> str:
        """The name to show: the model key, or the checkpoint key when there is none."""
        return self.model_key if self.model_key is not None else str(self.ckpt_key)

    @property
    def ckpt_keys(self) -> list[str]:
        """Every checkpoint key the entry reads or names (its conversion's, or ``ckpt_key``)."""
        if self.conversion is not None:
            return self.conversion.keys
        return [] if self.ckpt_key is None else [self.ckpt_key]

    def to_dict(self) -> dict:
        return {
            "action": self.action,
            "model_key": self.model_key,
            "ckpt_key": self.ckpt_key,
            "model_shape": None if self.model_shape is None else list(self.model_shape),
            "ckpt_shape": None if self.ckpt_shape is None else list(self.ckpt_shape),
            "model_dtype": self.model_dtype,
            "ckpt_dtype": self.ckpt_dtype,
            "reason": self.reason,
            "tied_to": self.tied_to,
            "via": self.via,
            "conversion": None if self.conversion is None else self.conversion.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanEntry:
        if not isinstance(d, Mapping) or d.get("action") not in ACTIONS:
            raise UsageError(
                f"not a plan entry: {d!r}; each entry needs an 'action' among {', '.join(ACTIONS)}"
            )
        try:
            return cls(
                action=d["action"],
                model_key=opt_str(d.get("model_key")),
                ckpt_key=opt_str(d.get("ckpt_key")),
                model_shape=_opt_shape(d.get("model_shape")),
                ckpt_shape=_opt_shape(d.get("ckpt_shape")),
                model_dtype=opt_str(d.get("model_dtype")),
                ckpt_dtype=opt_str(d.get("ckpt_dtype")),
                reason=str(d.get("reason") or ""),
                tied_to=opt_str(d.get("tied_to")),
                via=opt_str(d.get("via")),
                conversion=None
                if d.get("conversion") is None
                else Conversion.from_dict(d["conversion"]),
            )
        except (TypeError, ValueError) as e:
            raise UsageError(f"malformed plan entry {dict(d)!r}: {e}") from None


def opt_str(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise TypeError(f"expected a string or null, got {v!r}")


def _opt_shape(v: Any) -> Shape | None:
    if v is None:
        return None
    if isinstance(v, (str, bytes)) or not all(isinstance(s, int) for s in v):
        raise TypeError(f"a shape is a list of ints, got {v!r}")
    return tuple(v)


@dataclass(frozen=True)
class Mismatch:
    """A checkpoint tensor whose shape differs from the model's."""

    key: str
    checkpoint_shape: Shape
    model_shape: Shape

    @classmethod
    def from_entry(cls, e: PlanEntry) -> Mismatch:
        """The mismatch an ``adapt`` or ``mismatch`` entry describes."""
        return cls(str(e.model_key), tuple(e.ckpt_shape or ()), tuple(e.model_shape or ()))

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "checkpoint_shape": list(self.checkpoint_shape),
            "model_shape": list(self.model_shape),
        }

    def shapes(self, sep: str = "vs", old: str = "checkpoint", new: str = "model") -> str:
        """``'checkpoint (1000, 512) vs model (10, 512)'``; the words can be changed."""
        return (
            f"{old} {format_shape(self.checkpoint_shape)} {sep} {new} "
            f"{format_shape(self.model_shape)}"
        )

    def __str__(self) -> str:
        return f"{self.key}: {self.shapes()}"


def copy_action(ckpt_dtype: str | None, model_dtype: str | None) -> str:
    """``load`` when the dtypes agree (or the checkpoint's is not known), else ``cast``."""
    return "load" if ckpt_dtype is None or ckpt_dtype == model_dtype else "cast"


def pair_action(
    ckpt_shape: Shape | None,
    model_shape: Shape | None,
    ckpt_dtype: str | None,
    model_dtype: str | None,
    adapts: bool,
) -> str:
    """What a checkpoint tensor paired with a model key does: ``load``/``cast`` when the
    shapes agree, else ``adapt`` (an adapter is given) or ``mismatch``."""
    if ckpt_shape != model_shape:
        return "adapt" if adapts else "mismatch"
    return copy_action(ckpt_dtype, model_dtype)


def no_value(e: PlanEntry) -> PlanEntry:
    """The entry a model key gets when it loses its checkpoint tensor (check() refines it)."""
    return PlanEntry(
        "missing",
        e.model_key,
        None,
        model_shape=e.model_shape,
        model_dtype=e.model_dtype,
        reason="not in checkpoint",
    )


def detail(e: PlanEntry) -> str:
    """The detail a plan listing shows for an entry without a reason."""
    if e.conversion is not None:
        text = f"<- {e.conversion.describe()}"
        if e.action in ("mismatch", "adapt"):
            return f"{text}: {format_shape(e.ckpt_shape)} vs model {format_shape(e.model_shape)}"
        if e.ckpt_dtype is not None and e.ckpt_dtype != e.model_dtype:
            return f"{text}, {e.ckpt_dtype} -> {e.model_dtype}"
        return text
    if e.action in ("mismatch", "adapt"):
        return f"checkpoint {format_shape(e.ckpt_shape)} vs model {format_shape(e.model_shape)}"
    if e.action == "cast":
        return f"{e.ckpt_dtype} -> {e.model_dtype}"
    return ""
