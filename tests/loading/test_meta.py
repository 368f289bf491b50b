"""Models on the meta device: empty_init, materialisation by load_partial, one-copy reads."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery import LoadError
from surgery.checkpoint import open_source

from support import SmallCNN, Tied


def test_empty_init_puts_parameters_on_meta_and_keeps_buffers():
    with surgery.empty_init():
        model = SmallCNN()
    assert all(p.is_meta for p in model.parameters())
    assert all(not b.is_meta for b in model.buffers())
    assert isinstance(model.fc.weight, nn.Parameter)
    # Outside the block nothing is patched any more.
    assert not SmallCNN().fc.weight.is_meta


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_meta_model_is_materialised(tmp_path, r18_imagenet, fmt):
    path = tmp_path / f"r18.{fmt}"
    if fmt == "pth":
        torch.save({"state_dict": {"module." + k: v for k, v in r18_imagenet.items()}}, path)
    else:
        save_file(r18_imagenet, str(path))
    with surgery.empty_init():
        model = torchvision.models.resnet18(num_classes=10)
    report = surgery.load_partial(model, path)
    assert not any(t.is_meta for t in model.state_dict().values())
    for k, v in r18_imagenet.items():
        if not k.startswith("fc."):
            assert torch.equal(model.state_dict()[k], v), k
    assert sorted(report.initialised) == ["fc.bias", "fc.weight"]
    # The new head got its module's own init (kaiming uniform), not zeros or garbage.
    bound = 1 / 512**0.5
    assert 0 < model.fc.weight.abs().max() <= bound and model.fc.bias.abs().max() <= bound
    assert model.fc.weight.requires_grad
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert "initialised" in str(report)


def test_meta_timm_vit_with_tied_and_new_head(tmp_path):
    kw = dict(pretrained=False, img_size=32, patch_size=8)
    src = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **kw)
    path = tmp_path / "vit.safetensors"
    save_file(src.state_dict(), str(path))
    with surgery.empty_init():
        model = timm.create_model("vit_tiny_patch16_224", num_classes=5, **kw)
    report = surgery.load_partial(model, path)
    assert torch.equal(model.pos_embed, src.pos_embed)
    assert torch.equal(model.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)
    assert sorted(report.initialised) == ["head.bias", "head.weight"]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_meta_tied_parameters_stay_tied():
    src = Tied()
    with surgery.empty_init():
        model = Tied()
    surgery.load_partial(model, {"embed.weight": src.embed.weight.detach()})
    assert model.out.weight is model.embed.weight and not model.out.weight.is_meta
    assert torch.equal(model.out.weight, src.embed.weight)
    assert [id(p) for p in model.parameters()] == [id(model.embed.weight)]


def test_meta_without_reset_parameters_is_an_error_before_any_write():
    class Prompted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.prompt = nn.Parameter(torch.zeros(3, 4))

    src = Prompted()
    with surgery.empty_init():
        model = Prompted()
    with pytest.raises(LoadError, match=r"prompt \(Prompted\).*reset_parameters"):
        surgery.load_partial(model, {k: v for k, v in src.state_dict().items() if k != "prompt"})
    assert all(p.is_meta for p in model.parameters())  # untouched


def test_meta_dry_run_keeps_model_on_meta(r18_path):
    with surgery.empty_init():
        model = torchvision.models.resnet18(num_classes=10)
    report = surgery.load_partial(model, r18_path, dry_run=True)
    assert all(p.is_meta for p in model.parameters())
    assert sorted(report.initialised) == ["fc.bias", "fc.weight"]


def test_fast_path_reads_by_offset_for_torch_and_safetensors(tmp_path, r18_imagenet):
    torch.save(
        {"epoch": 1, "state_dict": r18_imagenet, "opt": {"m": torch.ones(9)}}, tmp_path / "a.pth"
    )
    save_file(r18_imagenet, str(tmp_path / "a.safetensors"))
    for name in ("a.pth", "a.safetensors"):
        src = open_source(tmp_path / name)
        assert set(src._offsets) == set(r18_imagenet), name
        out = torch.empty_like(r18_imagenet["layer3.0.conv1.weight"])
        src.read_into("layer3.0.conv1.weight", out)
        assert torch.equal(out, r18_imagenet["layer3.0.conv1.weight"])
        half = torch.empty(out.shape, dtype=torch.float16)
        src.read_into("layer3.0.conv1.weight", half)  # cast through a temporary
        assert torch.equal(half, r18_imagenet["layer3.0.conv1.weight"].half())
        src.close()
