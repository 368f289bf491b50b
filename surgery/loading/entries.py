"""Plan entries: what happens to one model key, one checkpoint key, or a pair, as plain data.

Actions, one per entry:

==============  ============================================================================
``load``        the checkpoint tensor is copied into the model key (same shape and dtype)
``cast``        the same, with a dtype cast (e.g. float16 -> float32)
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

The decisions every step shares live here, once: :func:`copy_action` (load or cast),
:func:`pair_action` (and mismatch or adapt), :meth:`Mismatch.from_entry`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._table import format_shape
from ..errors import UsageError

__all__ = ["ACTIONS", "NO_VALUE", "WRITES", "Mismatch", "PlanEntry", "copy_action", "pair_action"]

ACTIONS = (
    "load",
    "cast",
    "adapt",
    "skip",
    "mismatch",
    "missing",
    "unexpected",
    "defaulted",
    "initialise",
    "adapter",
)
WRITES = frozenset({"load", "cast", "adapt"})  # actions that give a model key a value
NO_VALUE = frozenset({"missing", "defaulted", "initialise", "adapter"})

Shape = tuple[int, ...]


@dataclass(slots=True)
class PlanEntry:
    """One step of a load: what happens to one model key, one checkpoint key, or a pair.

    Shapes are tuples of ints and dtypes names such as ``"float32"``, so an entry is plain
    JSON-able data. ``reason`` is a short human note (``"dropped by remap"``). ``via`` is
    set on the entries of a module that loads itself: the name the checkpoint entry is
    handed to that module's loading under (before its own renaming); shapes are ``None``
    for non-tensor entries (packed weights, a dict extra state).
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

    @property
    def key(self) -> str:
        """The name to show: the model key, or the checkpoint key when there is none."""
        return self.model_key if self.model_key is not None else str(self.ckpt_key)

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
    if e.action in ("mismatch", "adapt"):
        return f"checkpoint {format_shape(e.ckpt_shape)} vs model {format_shape(e.model_shape)}"
    if e.action == "cast":
        return f"{e.ckpt_dtype} -> {e.model_dtype}"
    return ""
