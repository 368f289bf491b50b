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

from .errors import (
    CheckpointError,
    KeyCollisionError,
    LoadError,
    SelectorError,
    SurgeryError,
    UnsafeCheckpointError,
)

# --- loading (issue 2 / 5) ---
# (filled in by the loader modules)

# --- freezing and parameter groups (issue 3) ---
# (filled in by freeze.py / optim.py)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "KeyCollisionError",
    "LoadError",
    "SelectorError",
    "SurgeryError",
    "UnsafeCheckpointError",
    "__version__",
]
