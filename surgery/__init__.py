"""surgery: transfer-learning model surgery for PyTorch.

Load what fits from a pretrained checkpoint into a changed model and report exactly what
happened, then freeze layers and build optimizer parameter groups correctly.

Example:
    >>> import surgery, torchvision
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> report = surgery.load_partial(model, "resnet18_imagenet.pth")  # doctest: +SKIP
    >>> print(report)  # doctest: +SKIP
"""

from __future__ import annotations

from .adapters import adapt_shapes
from .checkpoint import read_checkpoint
from .errors import (
    CheckpointError,
    KeyCollisionError,
    LoadError,
    SelectorError,
    SurgeryError,
    UnsafeCheckpointError,
    UsageError,
)
from .freeze import (
    FreezeSummary,
    TrainableSummary,
    freeze,
    freeze_except,
    trainable_summary,
    unfreeze,
)
from .load import load_partial
from .match import Layout, Match, MatchedKey, match, verify
from .meta import empty_init
from .optim import GroupTable, describe_groups, param_groups
from .report import LoadReport, Mismatch

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "FreezeSummary",
    "GroupTable",
    "KeyCollisionError",
    "Layout",
    "LoadError",
    "LoadReport",
    "Match",
    "MatchedKey",
    "Mismatch",
    "SelectorError",
    "SurgeryError",
    "TrainableSummary",
    "UnsafeCheckpointError",
    "UsageError",
    "__version__",
    "adapt_shapes",
    "describe_groups",
    "empty_init",
    "freeze",
    "freeze_except",
    "load_partial",
    "match",
    "param_groups",
    "read_checkpoint",
    "trainable_summary",
    "unfreeze",
    "verify",
]
