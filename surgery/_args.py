"""Checks of the arguments every public function takes first: the model, the optimizer.

A wrong type there would otherwise surface as an ``AttributeError`` deep inside; these raise
one :class:`~surgery.UsageError` naming the function, the argument and what it got.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .errors import UsageError

__all__ = ["model_class_name", "require_module", "require_optimizer", "written_model"]


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


def model_class_name(model: nn.Module) -> str:
    """The model's class name, not the ``FSDP<Name>`` class ``fully_shard`` swaps in.

    Example:
        >>> model_class_name(torch.nn.Linear(2, 2))
        'Linear'
    """
    cls = type(model)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if issubclass(cls, FSDPModule):
            cls = next((c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule)), cls)
    return cls.__name__


def written_model(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``model._orig_mod``), else ``model``: the model
    as the user wrote it, whose names carry no ``_orig_mod.``. Its parameters and submodules
    are the wrapper's own, so freezing or grouping them acts on the compiled model too.

    Example:
        >>> inner = torch.nn.Linear(2, 2)
        >>> written_model(torch.compile(inner)) is inner, written_model(inner) is inner
        (True, True)
    """
    # torch.compile's wrapper class lives in torch._dynamo (slow to import): a model can only
    # be one once that module is loaded
    frames = sys.modules.get("torch._dynamo.eval_frame")
    while frames is not None and isinstance(model, frames.OptimizedModule):
        model = model._orig_mod
    return model
