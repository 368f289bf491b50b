"""Models on the ``meta`` device: build them without memory or init cost, materialise on load."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ._tensors import holders, replace

__all__ = ["empty_init"]


@contextlib.contextmanager
def empty_init(*, include_buffers: bool = False) -> Iterator[None]:
    """Build models whose parameters live on the ``meta`` device: no memory, no init time.

    Buffers stay real (on CPU) by default, because many modules compute buffers in
    ``__init__`` (position indices, masks) that no checkpoint holds. ``load_partial`` then
    materialises the model: loaded tensors are read straight into fresh memory, the rest are
    initialised by their module's ``reset_parameters()``. Not thread-safe: it patches
    ``nn.Module.register_parameter`` while the block runs.

    Example:
        >>> with surgery.empty_init():  # doctest: +SKIP
        ...     model = timm.create_model("vit_large_patch16_224", num_classes=10)
        >>> surgery.load_partial(model, "vit_large.safetensors")  # doctest: +SKIP
    """
    if include_buffers:
        with torch.device("meta"):
            yield
        return
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            meta = param.to("meta")
            new = type(param)(meta, requires_grad=param.requires_grad)
            new.__dict__.update(param.__dict__)
            module._parameters[name] = new

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def to_empty(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """``model.to_empty(device=...)`` that keeps tied tensors tied.

    ``Module.to_empty`` gives each holder of a tied parameter its own fresh tensor, so an LM
    head tied to its embedding comes out untied. Here each ``meta`` tensor gets one fresh,
    unfilled tensor, put in every place that held it.
    """
    for where in holders(model).values():
        mod, name, is_param = where[0]
        t = (mod._parameters if is_param else mod._buffers)[name]
        if t is not None and t.is_meta:
            replace(t, torch.empty_like(t, device=device), where)
    return model
