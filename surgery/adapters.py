"""Ready-made adapters for tensors that do not load as they are.

``on_mismatch`` adapters, called by ``load_partial(..., on_mismatch=...)`` with
``(model key, checkpoint tensor, model tensor)`` for each shape mismatch:

- :func:`adapt_shapes`: input-channel and position-embedding changes (timm's helpers);
- :func:`transpose_linear`: a GPT-2 ``Conv1D`` weight ``(in, out)`` into ``nn.Linear``
  ``(out, in)`` (and back).

Plain functions on a state dict, for layouts no 1-to-1 rename can express (one tensor becomes
several, or a square weight whose transpose has the same shape), applied before loading:

- :func:`split_fused`: a fused ``in_proj_weight`` / ``qkv.weight`` into q, k, v;
- :func:`concat_fused`: the reverse;
- :func:`transposed`: transpose named 2-D tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ._names import closest
from .errors import UsageError

__all__ = ["adapt_shapes", "concat_fused", "split_fused", "transpose_linear", "transposed"]


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


def transpose_linear(name: str, ckpt: Tensor, model: Tensor) -> Tensor | None:
    """``on_mismatch`` adapter: a 2-D tensor whose transpose fits (``Conv1D`` <-> ``Linear``).

    GPT-2's ``Conv1D`` stores its weight as ``(in, out)``, ``nn.Linear`` as ``(out, in)``.
    A square weight has no shape mismatch, so it never reaches an adapter: use
    :func:`transposed` on the state dict for those.

    Example:
        >>> import torch
        >>> transpose_linear("fc.weight", torch.zeros(4, 3), torch.zeros(3, 4)).shape
        torch.Size([3, 4])
    """
    if ckpt.ndim == 2 and model.ndim == 2 and ckpt.shape[::-1] == model.shape:
        return ckpt.t().contiguous()
    return None


def transposed(state: Mapping[str, Tensor], keys: Sequence[str]) -> dict[str, Tensor]:
    """A copy of ``state`` with the 2-D tensors named in ``keys`` transposed.

    Example:
        >>> import torch
        >>> sd = transposed({"c_attn.weight": torch.zeros(4, 12)}, ["c_attn.weight"])
        >>> sd["c_attn.weight"].shape
        torch.Size([12, 4])
    """
    out = dict(state)
    for key in keys:
        t = _get(out, key, "transposed")
        if t.ndim != 2:
            raise UsageError(f"transposed: '{key}' has shape {tuple(t.shape)}; only 2-D tensors")
        out[key] = t.t().contiguous()
    return out


def split_fused(
    state: Mapping[str, Tensor], key: str, into: Sequence[str], *, dim: int = 0
) -> dict[str, Tensor]:
    """A copy of ``state`` with the fused tensor ``key`` replaced by equal chunks named ``into``.

    For ``nn.MultiheadAttention``'s ``in_proj_weight`` ``(3D, D)`` (or timm's
    ``attn.qkv.weight``) going into a model with separate q, k, v projections. Not an
    ``on_mismatch`` adapter: one checkpoint tensor becomes several.

    Example:
        >>> import torch
        >>> sd = {"attn.in_proj_weight": torch.zeros(6, 2)}
        >>> sd = split_fused(sd, "attn.in_proj_weight", ["q.weight", "k.weight", "v.weight"])
        >>> sorted(sd), tuple(sd["q.weight"].shape)
        (['k.weight', 'q.weight', 'v.weight'], (2, 2))
    """
    t = _get(state, key, "split_fused")
    if not into or t.shape[dim] % len(into):
        raise UsageError(
            f"split_fused: '{key}' of shape {tuple(t.shape)} does not split into "
            f"{len(into)} equal parts along dim {dim}; name one key per part in into="
        )
    out = {k: v for k, v in state.items() if k != key}
    for name, part in zip(into, torch.chunk(t, len(into), dim=dim), strict=True):
        out[name] = part.contiguous()
    return out


def concat_fused(
    state: Mapping[str, Tensor], keys: Sequence[str], into: str, *, dim: int = 0
) -> dict[str, Tensor]:
    """A copy of ``state`` with the tensors ``keys`` concatenated (in that order) into ``into``.

    The reverse of :func:`split_fused`: separate q, k, v projections into a fused
    ``in_proj_weight`` / ``qkv.weight``.

    Example:
        >>> import torch
        >>> sd = {f"{n}.weight": torch.zeros(2, 2) for n in "qkv"}
        >>> sd = concat_fused(sd, ["q.weight", "k.weight", "v.weight"], "qkv.weight")
        >>> list(sd), tuple(sd["qkv.weight"].shape)
        (['qkv.weight'], (6, 2))
    """
    parts = [_get(state, k, "concat_fused") for k in keys]
    try:
        fused = torch.cat(parts, dim=dim)
    except RuntimeError as e:
        shapes = ", ".join(f"{k} {tuple(p.shape)}" for k, p in zip(keys, parts, strict=True))
        raise UsageError(f"concat_fused: cannot concatenate {shapes} along dim {dim}") from e
    out = {k: v for k, v in state.items() if k not in set(keys)}
    out[into] = fused
    return out


def _get(state: Mapping[str, Tensor], key: str, who: str) -> Tensor:
    if key not in state:
        near = closest(key, state)
        raise UsageError(
            f"{who}: no key '{key}' in the state dict"
            + (f"; closest: {', '.join(near)}" if near else "")
        )
    return state[key]
