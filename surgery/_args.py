"""Checks of the arguments every public function takes first: the model, the optimizer.

A wrong type there would otherwise surface as an ``AttributeError`` deep inside; these raise
one :class:`~surgery.UsageError` naming the function, the argument and what it got.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import UsageError

__all__ = ["require_module", "require_optimizer"]


def require_module(value: Any, fn: str, arg: str = "model") -> None:
    """Refuse ``value`` unless it is an ``nn.Module``.

    Example:
        >>> require_module(42, "freeze")
        Traceback (most recent call last):
        ...
        surgery.errors.UsageError: freeze needs an nn.Module as model, got int (42)
    """
    if not isinstance(value, nn.Module):
        raise UsageError(f"{fn} needs an nn.Module as {arg}, got {_got(value)}")


def require_optimizer(value: Any, fn: str, arg: str = "optimizer") -> None:
    """Refuse ``value`` unless it is a ``torch.optim.Optimizer``."""
    if not isinstance(value, torch.optim.Optimizer):
        raise UsageError(f"{fn} needs a torch.optim.Optimizer as {arg}, got {_got(value)}")


def _got(value: Any) -> str:
    shown = repr(value)
    name = type(value).__name__
    return f"{name} ({shown})" if len(shown) <= 40 else name
