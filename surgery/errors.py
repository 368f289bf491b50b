"""Every error surgery raises derives from :class:`SurgeryError`.

Messages name the key, the file or both shapes, and say what to do next. The fix is data: a
:class:`Fix` (the option to pass and its value) inside an :class:`Advice` message. ``str()`` of
the error words it as a Python caller writes it (``entry='ema'``, ``skip=[...]``);
:meth:`SurgeryError.render` words it for another audience, e.g. the command line's flags
(``--entry 'ema'``, ``--skip GLOB``), without reading the text back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Advice",
    "CheckpointError",
    "DistributedError",
    "Fix",
    "KeyCollisionError",
    "LoadError",
    "OptimizerStateError",
    "PrefixTieError",
    "SaveError",
    "SelectorError",
    "SurgeryError",
    "UnsafeCheckpointError",
    "UsageError",
]


class _Unset:
    def __repr__(self) -> str:
        return "..."


UNSET: Any = _Unset()  # a Fix's value left for the user to choose: ``entry=``, ``skip=[...]``


@dataclass(frozen=True)
class Fix:
    """An option that fixes a problem: its name and value (:data:`UNSET`: for the user to
    choose). ``str()`` is the Python wording; ``shown`` overrides it where a message words it
    its own way (``allow_globals=[...] naming them``).

    Example:
        >>> str(Fix("entry", "ema")), str(Fix("skip")), str(Fix("entry"))
        ("entry='ema'", 'skip=[...]', 'entry=')
    """

    option: str
    value: Any = UNSET
    shown: str | None = None

    def __str__(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.value is UNSET:
            return f"{self.option}=[...]" if self.option in _LISTS else f"{self.option}="
        return f"{self.option}={self.value!r}"


_LISTS = frozenset({"skip", "remap", "allow_globals"})

Wording = Callable[[Fix], str]


class Advice(str):
    """Message text holding :class:`Fix` parts: as a ``str`` it is the Python wording;
    :meth:`render` words every fix another way. Concatenation keeps the parts.

    Example:
        >>> msg = Advice("Pass ", Fix("entry", "ema"), " to pick it.")
        >>> msg, msg.render(lambda f: f"--entry {f.value!r}")
        ("Pass entry='ema' to pick it.", "Pass --entry 'ema' to pick it.")
    """

    parts: tuple[str | Fix, ...]

    def __new__(cls, *parts: str | Fix) -> Advice:
        flat: list[str | Fix] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, Advice) else (p,))
        self = super().__new__(cls, "".join(str(p) for p in flat))
        self.parts = tuple(flat)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (Advice, self.parts)

    def __add__(self, other: str) -> Advice:  # type: ignore[override]
        return Advice(self, other) if isinstance(other, str) else NotImplemented

    def __radd__(self, other: str) -> Advice:
        return Advice(other, self) if isinstance(other, str) else NotImplemented

    @property
    def fixes(self) -> tuple[Fix, ...]:
        return tuple(p for p in self.parts if isinstance(p, Fix))

    def map_text(self, fn: Callable[[str], str]) -> Advice:
        """The same advice with ``fn`` applied to its plain text (e.g. escaping)."""
        return Advice(*(fn(p) if isinstance(p, str) else p for p in self.parts))

    def render(self, wording: Wording) -> str:
        return "".join(p if isinstance(p, str) else wording(p) for p in self.parts)


def render(text: str, wording: Wording) -> str:
    """``text`` with its fixes worded by ``wording`` (plain text as it is)."""
    return text.render(wording) if isinstance(text, Advice) else text


class SurgeryError(Exception):
    """Base class of every error raised by surgery.

    ``fixes`` holds the options its message suggests (:class:`Fix`); :meth:`render` words
    the message with them written another way (the command line's flags).
    """

    @property
    def fixes(self) -> tuple[Fix, ...]:
        message = self.args[0] if self.args else ""
        return message.fixes if isinstance(message, Advice) else ()

    def render(self, wording: Wording) -> str:
        """The message with each fix worded by ``wording``."""
        message = self.args[0] if self.args else ""
        return render(message, wording) if isinstance(message, str) else str(self)


class CheckpointError(SurgeryError):
    """A checkpoint could not be read: missing, corrupt, truncated or of an unknown layout."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled objects that safe loading refuses (classes outside the allow-list,
    TorchScript code, numpy object arrays); ``globals`` lists the class names where known."""

    globals: tuple[str, ...] | list[str] = ()


class LoadError(SurgeryError, RuntimeError):
    """A load or a plan was refused: strict failure, shape mismatch set to error, bad adapter,
    a plan that does not fit the model. A ``RuntimeError``, as torch's ``load_state_dict``
    raises, so code catching that keeps working."""


class KeyCollisionError(LoadError):
    """Two checkpoint keys map onto the same model key (after remap, prefix or plan edits)."""


class PrefixTieError(LoadError):
    """Several prefix rewrites match the model equally well (``encoder_q.``/``encoder_k.``,
    ``model.``/``model_ema.``); pass ``remap=`` to pick one or ``prefix=None``."""


class OptimizerStateError(LoadError):
    """``restore_optimizer`` refused: parameter names cannot be trusted, a shape change set to
    error, a bad adapter. The optimizer is left unchanged."""


class DistributedError(LoadError):
    """A load into a sharded model failed on some rank, or the ranks planned differently; raised
    alike on every rank, before any of them wrote."""


class UsageError(SurgeryError, ValueError):
    """Invalid arguments: an unknown ``bn`` mode or option key, or nothing left to optimize."""


class SelectorError(UsageError):
    """A selector (module or key name pattern, type, callable) matched nothing or was malformed."""


class SaveError(SurgeryError, OSError):
    """Writing a checkpoint failed (disk full, no permission, a path that is a file). Nothing was
    written: temporary files are removed and an existing checkpoint at the path is unchanged."""
