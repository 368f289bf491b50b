"""adapt_shapes: conv input channels and ViT position embeddings, via timm's helpers."""

from __future__ import annotations

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv

import surgery
from surgery.adapters import adapt_shapes


def test_one_channel_input_conv_is_adapted_not_skipped():
    src = timm.create_model("resnet18", pretrained=False)
    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10)
    report = surgery.load_partial(model, src, on_mismatch=adapt_shapes)
    assert [m.key for m in report.adapted] == ["conv1.weight"]
    assert [m.key for m in report.mismatched] == ["fc.weight", "fc.bias"]
    expected = adapt_input_conv(1, src.conv1.weight.detach(), base_chans=3)
    assert torch.allclose(model.conv1.weight, expected)
    assert torch.allclose(model.conv1.weight[:, 0], src.conv1.weight.detach().sum(1))


def test_vit_position_embedding_resampled_for_new_image_size():
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=48, patch_size=8, num_classes=3
    )
    report = surgery.load_partial(model, src, on_mismatch=adapt_shapes)
    assert [m.key for m in report.adapted] == ["pos_embed"]
    assert (report.adapted[0].checkpoint_shape, report.adapted[0].model_shape) == (
        (1, 17, 192),
        (1, 37, 192),
    )
    expected = resample_abs_pos_embed(src.pos_embed.detach(), [6, 6], [4, 4], num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected)
    assert torch.equal(model.pos_embed[:, 0], src.pos_embed[:, 0])  # class token kept
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_other_mismatches_are_left_to_skip():
    assert adapt_shapes("fc.weight", torch.zeros(1000, 512), torch.zeros(10, 512)) is None
    assert adapt_shapes("x", torch.zeros(1, 10, 8), torch.zeros(1, 12, 8)) is None  # no grid
