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
from .errors import (
    CheckpointError,
    DistributedError,
    KeyCollisionError,
    LoadError,
    OptimizerStateError,
    PrefixTieError,
    SaveError,
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
from .heads import Chain, HeadRows, chain, head_rows
from .loading.entries import Mismatch, PlanEntry
from .loading.pipeline import LoadPlan, apply_plan, load_partial, plan_load
from .loading.report import LoadReport
from .matching import Difference, Layout, Match, MatchedKey, match, verify
from .meta import empty_init
from .optim import GroupTable, add_param_groups, describe_groups, param_groups
from .optimizer_state import (
    OptimizerReport,
    optimizer_state,
    restore_optimizer,
    restore_scheduler,
)
from .saving import SaveReport, save
from .sources import read_checkpoint
from .sources.hub import hub_file

__version__ = "0.1.0"

__all__ = [
    "Chain",
    "CheckpointError",
    "Difference",
    "DistributedError",
    "FreezeSummary",
    "GroupTable",
    "HeadRows",
    "KeyCollisionError",
    "Layout",
    "LoadError",
    "LoadPlan",
    "LoadReport",
    "Match",
    "MatchedKey",
    "Mismatch",
    "OptimizerReport",
    "OptimizerStateError",
    "PlanEntry",
    "PrefixTieError",
    "SaveError",
    "SaveReport",
    "SelectorError",
    "SurgeryError",
    "TrainableSummary",
    "UnsafeCheckpointError",
    "UsageError",
    "__version__",
    "adapt_shapes",
    "add_param_groups",
    "apply_plan",
    "chain",
    "describe_groups",
    "empty_init",
    "freeze",
    "freeze_except",
    "head_rows",
    "hub_file",
    "load_partial",
    "match",
    "optimizer_state",
    "param_groups",
    "plan_load",
    "read_checkpoint",
    "restore_optimizer",
    "restore_scheduler",
    "save",
    "trainable_summary",
    "unfreeze",
    "verify",
]
