"""Every error surgery raises derives from :class:`SurgeryError`.

Messages name the key, the file or both shapes, and say what to do next.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "KeyCollisionError",
    "LoadError",
    "OptimizerStateError",
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
    """The file holds pickled objects that ``weights_only=True`` refuses to load."""


class KeyCollisionError(SurgeryError):
    """Two checkpoint keys were renamed onto the same model key."""


class LoadError(SurgeryError):
    """``load_partial`` refused: strict failure, shape mismatch set to error, bad adapter."""


class OptimizerStateError(LoadError):
    """``restore_optimizer`` refused: parameter names cannot be trusted, a shape change set to
    error, a bad adapter. The optimizer is left unchanged."""


class UsageError(SurgeryError, ValueError):
    """Invalid arguments: an unknown ``bn`` mode or option key, or nothing left to optimize."""


class SelectorError(UsageError):
    """A selector (module or key name pattern, type, callable) matched nothing or was malformed."""
