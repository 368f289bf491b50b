"""Model tensors by identity: where each is held, replacing it in every holder, dtype names.

A parameter tied to another sits in several modules' ``_parameters``; materialising or
replacing it must reach every holder, or the model comes out untied.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Holders", "dtype_name", "holders", "replace"]

Holders = dict[int, list[tuple[nn.Module, str, bool]]]

_DTYPE_NAMES: dict[torch.dtype, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    """``'float32'`` for ``torch.float32`` (cached: planning names 100k dtypes).

    Example:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def holders(model: nn.Module) -> Holders:
    """id(tensor) -> every (module, attribute, is_parameter) holding it (ties included)."""
    out: Holders = {}
    for mod in model.modules():
        for name, t in mod._parameters.items():
            if t is not None:
                out.setdefault(id(t), []).append((mod, name, True))
        for name, t in mod._buffers.items():
            if t is not None:
                out.setdefault(id(t), []).append((mod, name, False))
    return out


def replace(old: Tensor, new: Tensor, where: list[tuple[nn.Module, str, bool]]) -> Tensor:
    """Put ``new`` in place of ``old`` in every holder; parameters stay parameters."""
    if isinstance(old, nn.Parameter):
        try:
            new = type(old)(new, requires_grad=old.requires_grad)
        except TypeError:
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        new.__dict__.update(old.__dict__)
    for mod, name, is_param in where:
        (mod._parameters if is_param else mod._buffers)[name] = new
    return new
