"""Every error surgery raises derives from :class:`SurgeryError`.

Messages name the key, the file or both shapes, and say what to do next.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DistributedError",
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


class SurgeryError(Exception):
    """Base class of every error raised by surgery."""


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
