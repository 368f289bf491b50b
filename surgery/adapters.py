"""Ready-made ``on_mismatch`` adapters, built on timm's own weight-adaptation helpers.

Pass one to ``load_partial(..., on_mismatch=adapt_shapes)``: mismatched tensors it knows how to
adapt are adapted (and reported under ``adapted``); the rest are skipped as usual.
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["adapt_shapes"]


def adapt_shapes(name: str, ckpt: Tensor, model: Tensor) -> Tensor | None:
    """Adapt the two mismatches fine-tuning meets most; ``None`` (skip) for anything else.

    - Conv weights whose input channels differ (``(O, 3, k, k)`` into ``(O, 1, k, k)``, or more
      channels): timm's ``adapt_input_conv`` sums or repeats the pretrained channels.
    - ViT absolute position embeddings ``(1, prefix + h*w, D)`` for another square grid (a new
      image or patch size): timm's ``resample_abs_pos_embed`` interpolates the grid and keeps
      the class/register tokens.

    Example:
        >>> import timm, surgery
        >>> from surgery.adapters import adapt_shapes
        >>> model = timm.create_model("resnet18", in_chans=1, num_classes=10)
        >>> src = timm.create_model("resnet18")
        >>> report = surgery.load_partial(model, src, on_mismatch=adapt_shapes)
        >>> [m.key for m in report.adapted], [m.key for m in report.mismatched]
        (['conv1.weight'], ['fc.weight', 'fc.bias'])
    """
    if ckpt.ndim == 4 and model.ndim == 4 and ckpt.shape[0] == model.shape[0]:
        if ckpt.shape[2:] == model.shape[2:] and ckpt.shape[1] != model.shape[1]:
            from timm.models import adapt_input_conv

            return adapt_input_conv(model.shape[1], ckpt, base_chans=ckpt.shape[1])
    if ckpt.ndim == 3 and model.ndim == 3 and ckpt.shape[::2] == model.shape[::2]:
        grids = _square_grids(ckpt.shape[1], model.shape[1])
        if grids is not None:
            from timm.layers import resample_abs_pos_embed

            prefix, old, new = grids
            return resample_abs_pos_embed(
                ckpt, new_size=[new, new], old_size=[old, old], num_prefix_tokens=prefix
            )
    return None


def _square_grids(n_ckpt: int, n_model: int) -> tuple[int, int, int] | None:
    """``(prefix tokens, old side, new side)`` when both lengths are prefix + a square."""
    for prefix in (1, 0, 2, 4, 5, 8, 9):  # cls; none; cls+dist; register-token variants
        a, b = n_ckpt - prefix, n_model - prefix
        if a > 0 and b > 0 and math.isqrt(a) ** 2 == a and math.isqrt(b) ** 2 == b:
            return prefix, math.isqrt(a), math.isqrt(b)
    return None
