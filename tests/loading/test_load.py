"""load_partial: what loads, what is reported, and that errors leave the model untouched."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery import KeyCollisionError, LoadError, UsageError

from support import FORMS, PREFIXES, SmallCNN, Tied, assert_same_state, save_as, snapshot

HEAD = ("fc.weight", "fc.bias")


def check_resnet18_head_swap(model: nn.Module, sd: dict, report: surgery.LoadReport) -> None:
    """Every tensor but the head equals the checkpoint's; the head is reported with shapes."""
    state = model.state_dict()
    for k, v in sd.items():
        if k not in HEAD:
            assert torch.equal(state[k], v.to(state[k].dtype)), k
    assert {m.key for m in report.mismatched} == set(HEAD)
    shapes = {m.key: (m.checkpoint_shape, m.model_shape) for m in report.mismatched}
    assert shapes["fc.weight"] == ((1000, 512), (10, 512))
    assert shapes["fc.bias"] == ((1000,), (10,))
    assert report.tensors_loaded == 60 and report.tensors_total == 62
    assert report.buffers_loaded == report.buffers_total == 60
    assert not report.missing and not report.unexpected
    assert not report.ok


def test_resnet18_new_head_loads_everything_else(r18_path, r18_imagenet):
    model = torchvision.models.resnet18(num_classes=10)
    head_before = model.fc.weight.detach().clone()
    report = surgery.load_partial(model, r18_path)
    check_resnet18_head_swap(model, r18_imagenet, report)
    assert torch.equal(model.fc.weight, head_before)  # the new head keeps its own init
    assert report.params_total == sum(p.numel() for p in model.parameters())
    assert report.params_loaded == report.params_total - 512 * 10 - 10
    text = str(report)
    assert "fc.weight" in text and "(1000, 512)" in text and "(10, 512)" in text
    assert "60/62" in text


@pytest.mark.parametrize("form", FORMS)
def test_checkpoint_forms(form, tmp_path, r18_imagenet):
    path = save_as(form, r18_imagenet, tmp_path)
    model = torchvision.models.resnet18(num_classes=10)
    report = surgery.load_partial(model, path)
    check_resnet18_head_swap(model, r18_imagenet, report)
    assert report.prefix == PREFIXES[form]
    if form == "legacy":  # read by offset from its mapping, like a zip file: nothing to say
        assert report.notes == []


def test_wrapped_model_gets_prefix_added(r18_path, r18_imagenet):
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = torchvision.models.resnet18(num_classes=10)

    model = Wrapper()
    report = surgery.load_partial(model, r18_path)
    assert report.prefix == ("", "module.")
    assert torch.equal(model.module.layer4[1].conv2.weight, r18_imagenet["layer4.1.conv2.weight"])
    assert {m.key for m in report.mismatched} == {"module.fc.weight", "module.fc.bias"}


def test_prefix_none_turns_detection_off(tmp_path, r18_imagenet):
    path = save_as("ddp", r18_imagenet, tmp_path)
    model = torchvision.models.resnet18(num_classes=10)
    snap = snapshot(model)
    with pytest.raises(LoadError, match=r"0 of 122 checkpoint tensors match ResNet") as e:
        surgery.load_partial(model, path, prefix=None)
    assert 'remap=[(r"^module\\.", "")]' in str(e.value)
    assert "look like 'module.conv1.weight', model keys like 'conv1.weight'" in str(e.value)
    assert_same_state(model, snap)


def test_timm_resnet18_from_torchvision_checkpoint(r18_path, r18_imagenet):
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    report = surgery.load_partial(model, r18_path)
    check_resnet18_head_swap(model, r18_imagenet, report)


def test_timm_vit_new_head(tmp_path):
    kw = dict(pretrained=False, img_size=32, patch_size=8)
    src = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **kw)
    path = tmp_path / "vit.safetensors"
    save_file(src.state_dict(), str(path))
    model = timm.create_model("vit_tiny_patch16_224", num_classes=7, **kw)
    report = surgery.load_partial(model, path, skip="head")
    assert sorted(report.skipped) == ["head.bias", "head.weight"]
    assert report.ok and not report.mismatched
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(model.state_dict()[k], v), k
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_fp16_checkpoint_into_fp32_model(tmp_path, r18_imagenet):
    half = {k: v.half() if v.is_floating_point() else v for k, v in r18_imagenet.items()}
    path = tmp_path / "half.safetensors"
    save_file(half, str(path))
    model = torchvision.models.resnet18(num_classes=10)
    report = surgery.load_partial(model, path)
    assert model.conv1.weight.dtype == torch.float32
    assert torch.equal(model.conv1.weight, half["conv1.weight"].float())
    cast = {k: (a, b) for k, a, b in report.cast}
    assert cast["conv1.weight"] == ("float16", "float32")
    assert "bn1.num_batches_tracked" not in cast
    assert "float16 -> float32" in str(report)


def test_optimizer_built_before_load_keeps_its_parameters(r18_path, r18_imagenet):
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = [id(p) for p in model.parameters()]
    surgery.load_partial(model, r18_path)
    assert [id(p) for p in model.parameters()] == ids
    assert opt.param_groups[0]["params"][0] is model.conv1.weight
    assert torch.equal(opt.param_groups[0]["params"][0], r18_imagenet["conv1.weight"])


def test_remap_forms(tmp_path):
    src = SmallCNN()
    sd = {k.replace("conv", "encoder.conv"): v for k, v in src.state_dict().items()}
    sd["aux.weight"] = torch.ones(3)
    for remap in (
        [(r"^encoder\.", ""), (r"^aux\.", None)],
        {r"^encoder\.": "", r"^aux\.": None},
        lambda k: None if k.startswith("aux.") else k.removeprefix("encoder."),
    ):
        model = SmallCNN()
        report = surgery.load_partial(model, sd, remap=remap, prefix=None)
        assert report.ok and not report.unexpected, remap
        assert torch.equal(model.conv2.weight, src.conv2.weight)
        assert report.renamed["encoder.conv1.weight"] == "conv1.weight"
        assert "aux.weight" in report.skipped


def test_exact_rename_dict(tmp_path):
    src = SmallCNN()
    sd = src.state_dict()
    sd["classifier.weight"] = sd.pop("fc.weight")
    sd["classifier.bias"] = sd.pop("fc.bias")
    model = SmallCNN()
    report = surgery.load_partial(
        model, sd, remap={"classifier.weight": "fc.weight", "classifier.bias": "fc.bias"}
    )
    assert report.ok and torch.equal(model.fc.weight, src.fc.weight)


def test_collision_names_both_keys_and_leaves_model(tmp_path):
    sd = SmallCNN().state_dict()
    sd["head.weight"] = sd["fc.weight"].clone()
    model = SmallCNN()
    snap = snapshot(model)
    with pytest.raises(KeyCollisionError) as e:
        surgery.load_partial(model, sd, remap=[(r"^head\.", "fc.")])
    assert "'fc.weight'" in str(e.value) and "'head.weight'" in str(e.value)
    assert_same_state(model, snap)


def test_strict_lists_everything_and_leaves_model(r18_path):
    model = torchvision.models.resnet18(num_classes=10)
    model.extra = nn.Linear(2, 2)
    snap = snapshot(model)
    with pytest.raises(LoadError) as e:
        surgery.load_partial(model, r18_path, strict=True)
    msg = str(e.value)
    assert "1 missing" not in msg and "2 missing" in msg
    for k in ("extra.weight", "extra.bias", "fc.weight: checkpoint (1000, 512) vs model (10, 512)"):
        assert k in msg
    assert "strict=False" in msg
    assert_same_state(model, snap)


def test_strict_hint_suggests_remap(tmp_path, r18_imagenet):
    path = tmp_path / "bb.pth"
    torch.save({"backbone." + k: v for k, v in r18_imagenet.items()}, path)
    model = torchvision.models.resnet18()
    with pytest.raises(LoadError, match=r'remap=\[\(r"\^backbone\\\.", ""\)\]'):
        surgery.load_partial(model, path, strict=True, prefix=None)
    report = surgery.load_partial(model, path, strict=True)  # auto prefix fixes it
    assert report.ok and report.prefix == ("backbone.", "")


def test_on_mismatch_error_and_adapter(r18_path, r18_imagenet):
    model = torchvision.models.resnet18(num_classes=10)
    snap = snapshot(model)
    with pytest.raises(
        LoadError, match=r"fc.weight: checkpoint \(1000, 512\) vs model \(10, 512\)"
    ):
        surgery.load_partial(model, r18_path, on_mismatch="error")
    assert_same_state(model, snap)

    with pytest.raises(LoadError, match="adapter returned"):
        surgery.load_partial(model, r18_path, on_mismatch=lambda k, c, m: c[:3])
    assert_same_state(model, snap)

    seen = []

    def first_ten(name, ckpt_t, model_t):
        seen.append((name, tuple(ckpt_t.shape), tuple(model_t.shape)))
        return ckpt_t[:10]

    report = surgery.load_partial(model, r18_path, on_mismatch=first_ten)
    assert sorted(seen) == [("fc.bias", (1000,), (10,)), ("fc.weight", (1000, 512), (10, 512))]
    assert torch.equal(model.fc.weight, r18_imagenet["fc.weight"][:10])
    assert report.ok and {m.key for m in report.adapted} == set(HEAD)


def test_tied_parameters_count_once_and_as_loaded():
    src = Tied()
    model = Tied()
    report = surgery.load_partial(model, {"embed.weight": src.embed.weight.detach()})
    assert report.ok and report.missing == []
    assert report.tensors_loaded == report.tensors_total == 1
    assert model.out.weight is model.embed.weight
    assert torch.equal(model.out.weight, src.embed.weight)


def test_num_batches_tracked_is_defaulted_not_missing():
    src = SmallCNN()
    sd = {k: v for k, v in src.state_dict().items() if "num_batches_tracked" not in k}
    report = surgery.load_partial(SmallCNN(), sd, strict=True)
    assert report.ok
    assert sorted(report.defaulted) == ["bn1.num_batches_tracked", "bn2.num_batches_tracked"]


def test_unexpected_and_missing_reported(r18_imagenet):
    sd = dict(r18_imagenet)
    sd["aux_head.weight"] = torch.zeros(3)
    del sd["layer1.0.conv1.weight"]
    report = surgery.load_partial(torchvision.models.resnet18(), sd)
    assert report.unexpected == ["aux_head.weight"]
    assert report.missing == ["layer1.0.conv1.weight"]
    assert not report.ok
    with pytest.raises(LoadError, match="layer1.0.conv1.weight"):
        report.assert_loaded()
    report.assert_loaded(allow_missing=["layer1.*"])


def test_assert_loaded_allows_globs(r18_path):
    report = surgery.load_partial(torchvision.models.resnet18(num_classes=10), r18_path)
    with pytest.raises(LoadError, match="fc.bias"):
        report.assert_loaded()
    assert report.assert_loaded(allow_missing=("fc.*",)) is report
    assert report.assert_loaded(allow_missing="fc") is report


def test_dry_run_changes_nothing_and_reports_the_same(r18_path):
    model = torchvision.models.resnet18(num_classes=10)
    snap = snapshot(model)
    dry = surgery.load_partial(model, r18_path, dry_run=True)
    assert_same_state(model, snap)
    assert "would load 60/62" in str(dry)
    real = surgery.load_partial(torchvision.models.resnet18(num_classes=10), r18_path)
    d1, d2 = dry.to_dict(), real.to_dict()
    d1.pop("dry_run"), d2.pop("dry_run")
    assert d1 == d2
    json.dumps(d1)


def test_repr_html_is_a_table_naming_keys(r18_path):
    report = surgery.load_partial(torchvision.models.resnet18(num_classes=10), r18_path)
    html = report._repr_html_()
    assert html.startswith("<table>") and "</table>" in html
    assert "<td>fc.weight</td>" in html and "(1000, 512)" in html


def test_skipped_tensors_are_never_read(monkeypatch, r18_path):
    from surgery.checkpoint import CheckpointSource

    read: list[str] = []
    orig_into, orig_read = CheckpointSource.read_into, CheckpointSource.read

    def spy_into(self, key, out):
        read.append(key)
        return orig_into(self, key, out)

    def spy_read(self, key):
        read.append(key)
        return orig_read(self, key)

    monkeypatch.setattr(CheckpointSource, "read_into", spy_into)
    monkeypatch.setattr(CheckpointSource, "read", spy_read)
    model = torchvision.models.resnet18(num_classes=10)
    surgery.load_partial(model, r18_path)
    assert len(read) == 120 and not set(HEAD) & set(read)


def test_views_and_non_contiguous_tensors_load_exactly(tmp_path):
    big = torch.randn(40, 30)
    sd = {
        "conv1.weight": torch.randn(8, 3, 3, 3),
        "fc.weight": big.t()[:10, :16],  # non-contiguous view
        "fc.bias": big[5, 3:13],  # view at an offset into a shared storage
        "conv2.weight": torch.randn(3, 3, 16, 8).permute(2, 3, 0, 1),
    }
    path = tmp_path / "views.pth"
    torch.save(sd, path)
    model = SmallCNN()
    surgery.load_partial(model, path)
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_bad_arguments_are_clear_errors():
    model = SmallCNN()
    with pytest.raises(UsageError, match="on_mismatch"):
        surgery.load_partial(model, model, on_mismatch="pad")
    with pytest.raises(UsageError, match="prefix"):
        surgery.load_partial(model, model, prefix="module.")
    with pytest.raises(UsageError, match="regex"):
        surgery.load_partial(model, model, remap=[("(", "")])
    with pytest.raises(UsageError, match="remap must be"):
        surgery.load_partial(model, model, remap=42)


def test_module_and_dict_sources():
    src = SmallCNN()
    model = SmallCNN()
    assert surgery.load_partial(model, src, strict=True).ok
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert surgery.load_partial(SmallCNN(), {"model": src.state_dict(), "step": 3}).ok


@pytest.mark.cuda
def test_loads_onto_the_models_own_cuda_device(r18_path, r18_imagenet):
    model = torchvision.models.resnet18(num_classes=10).cuda().half()
    report = surgery.load_partial(model, r18_path)
    assert model.conv1.weight.device.type == "cuda"
    assert torch.equal(model.conv1.weight.cpu(), r18_imagenet["conv1.weight"].half())
    assert ("conv1.weight", "float32", "float16") in report.cast


def test_garbage_collector_state_is_restored(r18_path):
    import gc

    assert gc.isenabled()
    surgery.load_partial(torchvision.models.resnet18(num_classes=10), r18_path)
    assert gc.isenabled()
    with pytest.raises(LoadError):
        surgery.load_partial(torchvision.models.resnet18(num_classes=10), r18_path, strict=True)
    assert gc.isenabled()
    gc.disable()
    try:
        surgery.load_partial(torchvision.models.resnet18(num_classes=10), r18_path)
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()
