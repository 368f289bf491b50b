"""Models the command names: ``torchvision:NAME``, ``timm:NAME`` or ``module.path:factory``,
built without downloading weights."""

from __future__ import annotations

import argparse
import difflib
import importlib
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import SurgeryError, UsageError

__all__ = ["build", "build_model", "build_spec"]


def build_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """Build a model from ``torchvision:NAME``, ``timm:NAME`` or ``module.path:factory``.

    Never downloads weights. ``num_classes`` is passed on when given.

    Example:
        >>> model = build_model("torchvision:resnet18", num_classes=10)
    """
    kind, _, name = spec.partition(":")
    if not name:
        raise UsageError(
            f"unknown model spec {spec!r}: use torchvision:NAME, timm:NAME or module.path:factory"
        )
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if kind == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if name not in names:
            raise UsageError(_unknown(spec, name, names, "torchvision.models.list_models()"))
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if kind == "timm":
        import timm

        if not timm.is_model(name):
            raise UsageError(_unknown(spec, name, timm.list_models(), "timm.list_models()"))
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        module = importlib.import_module(kind)
    except ImportError as e:
        raise UsageError(
            f"unknown model spec {spec!r}: cannot import module '{kind}' ({e}); use "
            "torchvision:NAME, timm:NAME or module.path:factory"
        ) from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"unknown model spec {spec!r}: '{kind}' has no callable '{name}'")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned {_article(type(model).__name__)}, not an nn.Module")
    return model


def _article(word: str) -> str:
    """'an int', 'a dict': the article by the first letter (good enough for type names)."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _unknown(spec: str, name: str, names: Sequence[str], where: str) -> str:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown model {spec!r}.{hint} See {where} for the names."


def build(args: argparse.Namespace) -> nn.Module:
    return build_spec(args.model, args.num_classes)


def build_spec(spec: str, num_classes: int | None) -> nn.Module:
    try:
        return build_model(spec, num_classes)
    except SurgeryError:
        raise
    except Exception as e:  # a factory of the user's failing: no traceback, say what failed
        raise UsageError(f"building {spec} failed: {type(e).__name__}: {e}") from None
