"""Match by structure: torchvision -> timm / transformers, renamed models, differing models,
rules, checkpoint-only mode, hints, layouts that are not 1-to-1, verify and the command."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

import surgery
from surgery import adapters
from surgery.cli import main
from surgery.errors import UsageError


def _randomise_bn(model: nn.Module) -> None:
    """Non-default BatchNorm state, so a wrong pairing changes the output."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def _tv_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
        num_classes=10,
    )  # fmt: skip


def _timm_vit() -> nn.Module:
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2,
        num_classes=10,
    )  # fmt: skip


def _same_load(model_fn, src: nn.Module, m: surgery.Match) -> None:
    """rules() as remap renames every checkpoint key exactly as remap() does."""
    with surgery.empty_init():
        model = model_fn()
    ra = surgery.load_partial(model, src, remap=m.remap(), dry_run=True)
    rb = surgery.load_partial(model, src, remap=m.rules(), dry_run=True)
    assert ra.renamed == rb.renamed and ra.loaded == rb.loaded
    assert ra.missing == rb.missing and ra.unexpected == rb.unexpected
    assert ra.skipped == rb.skipped


# --------------------------------------------------------------------------- real pairs


def test_resnet50_torchvision_to_timm_is_the_identity():
    with surgery.empty_init():
        src = torchvision.models.resnet50()
        dst = timm.create_model("resnet50")
    m = surgery.match(src, dst, torch.zeros(1, 3, 64, 64))
    assert m.complete and not m.unmatched_source and not m.low()
    assert all(p.source == k for k, p in m.pairs.items())
    assert m.rules() == []  # nothing to rename


def test_resnet_torchvision_to_transformers_all_matched_outputs_equal():
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    src = ResNet(Bottleneck, [1, 2, 1, 1])  # resnet50's layout, fewer blocks
    _randomise_bn(src)
    cfg = ResNetConfig(
        depths=[1, 2, 1, 1], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck"
    )
    dst = ResNetModel(cfg)
    x = torch.randn(1, 3, 32, 32)
    m = surgery.match(src, dst, x)
    # HF registers `shortcut` before `layer`; the execution order lines them up anyway.
    assert m.complete and not m.low()
    assert m.unmatched_source == ["fc.weight", "fc.bias"]
    assert m.pairs["encoder.stages.0.layers.0.shortcut.convolution.weight"].source == (
        "layer1.0.downsample.0.weight"
    )
    assert m.pairs["encoder.stages.1.layers.1.layer.2.normalization.running_var"].source == (
        "layer2.1.bn3.running_var"
    )
    report = surgery.load_partial(dst, src, remap=m.remap())
    assert not report.missing and not report.mismatched
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]  # the classifier HF lacks
    features = nn.Sequential(*list(src.children())[:-2])  # before avgpool/fc
    assert surgery.verify(features, dst, x) < 1e-5
    _same_load(lambda: ResNetModel(cfg), src, m)


def test_vit_torchvision_to_timm_all_matched_outputs_equal():
    torch.manual_seed(0)
    src, dst = _tv_vit(), _timm_vit()
    nn.init.normal_(src.heads.head.weight)  # torchvision zero-initialises it: verify would
    nn.init.normal_(src.heads.head.bias)  # compare constants and prove nothing
    x = torch.randn(2, 3, 32, 32)
    m = surgery.match(src, dst, x)
    assert m.complete and not m.unmatched_source and not m.low()
    assert m.pairs["cls_token"].source == "class_token"
    assert m.pairs["pos_embed"].source == "encoder.pos_embedding"
    qkv = m.pairs["blocks.1.attn.qkv.weight"]
    assert qkv.source == "encoder.layers.encoder_layer_1.self_attention.in_proj_weight"
    assert "MultiheadAttention ~ Linear" in qkv.reason
    assert surgery.load_partial(dst, src, remap=m.remap()).ok
    d = surgery.verify(src, dst, x)
    assert d < 1e-5 and d.informative
    rules = m.rules()
    assert (
        r"^encoder\.layers\.encoder_layer_(\d+)\.ln_(\d+)\.",
        r"blocks.\1.norm\2.",
    ) in rules
    assert len(rules) <= 12
    _same_load(_timm_vit, src, m)


# --------------------------------------------------------------------------- synthetic


class Net(nn.Module):
    """conv/bn stem, `depth` residual blocks, a head."""

    def __init__(self, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(self.norm(x.mean((2, 3))))


class Renamed(nn.Module):
    """Net's computation with other names, registered in another order."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(8, 10)
        self.final_ln = nn.LayerNorm(8)
        self.stages = nn.ModuleDict(
            {
                f"s{2 - i}": nn.ModuleDict(
                    {"bn": nn.BatchNorm2d(8), "conv": nn.Conv2d(8, 8, 3, padding=1)}
                )
                for i in range(3)
            }
        )
        self.bn_in = nn.BatchNorm2d(8)
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_in(self.conv_in(x))
        for i in range(3):
            s = self.stages[f"s{i}"]
            x = x + torch.relu(s["bn"](s["conv"](x)))
        return self.classifier(self.final_ln(x.mean((2, 3))))


def test_renamed_and_reordered_model_all_matched_high():
    torch.manual_seed(0)
    src, dst = Net(), Renamed()
    _randomise_bn(src)
    x = torch.randn(2, 3, 8, 8)
    m = surgery.match(src, dst, x)
    assert m.complete and not m.unmatched_source and not m.low()
    assert m.pairs["stages.s0.conv.weight"].source == "blocks.0.0.weight"
    assert m.pairs["stages.s2.bn.running_mean"].source == "blocks.2.1.running_mean"
    assert surgery.load_partial(dst, src, remap=m.remap()).ok
    assert surgery.verify(src, dst, x) == 0
    _same_load(Renamed, src, m)
    text = str(m)
    assert "32/32 model tensors matched (32 high, 0 low confidence)" in text
    assert "stages.s0.conv.weight" in text and "<table>" in m._repr_html_()


def test_extra_block_and_new_head_are_unmatched_the_rest_matched():
    src = Net(depth=3, classes=10)
    with surgery.empty_init():
        dst = Net(depth=4, classes=5)
    m = surgery.match(src, dst, torch.zeros(1, 3, 8, 8))
    extra = {k for k in m.model_shapes if k.startswith("blocks.3.")}
    assert set(m.unmatched_model) == extra | {"head.weight", "head.bias"}
    assert m.unmatched_source == ["head.weight", "head.bias"]
    assert not m.low()  # nothing was paired on a guess
    assert all(p.source == k for k, p in m.pairs.items())
    report = surgery.load_partial(dst, src, remap=m.remap())
    assert sorted(report.missing) == sorted(k for k in extra | {"head.weight", "head.bias"}
                                            if not k.endswith("num_batches_tracked"))  # fmt: skip
    assert not report.mismatched  # the old head was dropped, not offered by name


def test_rules_fall_back_to_exact_rules_for_swapped_names():
    class A(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x))

    class B(A):
        def forward(self, x):  # same layers, run in the other order
            return self.a(self.b(x))

    torch.manual_seed(0)
    src, x = A(), torch.randn(3, 4)
    m = surgery.match(src, B(), x)
    assert m.remap() == {"a.weight": "b.weight", "a.bias": "b.bias", "b.weight": "a.weight",
                         "b.bias": "a.bias"}  # fmt: skip
    _same_load(B, src, m)
    dst = B()
    surgery.load_partial(dst, src, remap=m.rules())
    assert surgery.verify(src, dst, x) == 0


def test_checkpoint_only_is_low_confidence_and_says_so(tmp_path):
    torch.manual_seed(0)
    src = Net()
    path = tmp_path / "net.pth"
    torch.save({k: v for k, v in src.state_dict().items() if "num_batches" not in k}, path)

    class Prefixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = Net()

    m = surgery.match(str(path), Prefixed())
    assert m.pairs["backbone.blocks.1.0.weight"].source == "blocks.1.0.weight"
    assert all(p.level == "low" for p in m.pairs.values())
    assert any("checkpoint only" in n for n in m.notes)
    assert sorted(m.unmatched_model) == sorted(
        k for k in m.model_shapes if k.endswith("num_batches_tracked")
    )


def test_hints_anchor_the_alignment_and_bad_hints_name_the_closest():
    src, dst = Net(), Renamed()
    x = torch.zeros(1, 3, 8, 8)
    m = surgery.match(src, dst, x, hints={"blocks.1.0.weight": "stages.s1.conv.weight"})
    assert m.pairs["stages.s1.conv.weight"].reason == "hint"
    m = surgery.match(src, dst, x, hints=[(r"^head\.", "classifier.")])
    assert m.pairs["classifier.bias"].reason == "hint" and m.complete
    with pytest.raises(UsageError, match="closest: blocks.1.0.weight"):
        surgery.match(src, dst, x, hints={"blocks.1.0.weigth": "stages.s1.conv.weight"})
    with pytest.raises(UsageError, match="shapes differ"):
        surgery.match(src, dst, x, hints={"head.weight": "stages.s1.conv.weight"})


# --------------------------------------------------------------------------- layouts


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class Separate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, 2, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, 8))


def test_fused_qkv_reported_with_its_adapter_and_split_fused_loads_it():
    torch.manual_seed(0)
    src, dst, x = Fused(), Separate(), torch.randn(2, 5, 8)
    m = surgery.match(src, dst, x)
    kinds = {(lay.kind, lay.source_keys, lay.model_keys) for lay in m.layouts}
    assert ("split", ("attn.in_proj_weight",), ("q.weight", "k.weight", "v.weight")) in kinds
    assert ("split", ("attn.in_proj_bias",), ("q.bias", "k.bias", "v.bias")) in kinds
    assert m.pairs["out.weight"].source == "attn.out_proj.weight"
    assert "split_fused" in str(m)
    sd = src.state_dict()
    for lay in m.layouts:
        sd = adapters.split_fused(sd, lay.source_keys[0], lay.model_keys)
    sd = {m.remap().get(k, k) or k: v for k, v in sd.items()}
    assert surgery.load_partial(dst, sd, strict=True).ok
    assert surgery.verify(src, dst, x) < 1e-5
    back = adapters.concat_fused(sd, ["q.weight", "k.weight", "v.weight"], "qkv")
    assert torch.equal(back["qkv"], src.attn.in_proj_weight.detach())


def test_gpt2_conv1d_to_linear_is_a_transposed_layout():
    from transformers.pytorch_utils import Conv1D

    class G(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = Conv1D(12, 4)  # weight (4, 12): (in, out)

        def forward(self, x):
            return self.c_fc(x)

    class L(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 12)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(0)
    src, dst, x = G(), L(), torch.randn(3, 4)
    m = surgery.match(src, dst, x)
    assert m.pairs["fc.weight"].source == "c_fc.weight" and m.complete
    assert [lay.kind for lay in m.layouts] == ["transpose"]
    report = surgery.load_partial(dst, src, remap=m.remap(), on_mismatch=adapters.transpose_linear)
    assert report.ok and [a.key for a in report.adapted] == ["fc.weight"]
    assert surgery.verify(src, dst, x) < 1e-6


def test_adapters_refuse_what_they_cannot_do():
    assert adapters.transpose_linear("w", torch.zeros(4, 3), torch.zeros(4, 3)) is None
    with pytest.raises(UsageError, match="equal parts"):
        adapters.split_fused({"w": torch.zeros(5, 2)}, "w", ["a", "b", "c"])
    with pytest.raises(UsageError, match="closest: weight"):
        adapters.transposed({"weight": torch.zeros(2, 2)}, ["weigth"])
    sd = adapters.transposed({"w": torch.arange(6.0).view(2, 3)}, ["w"])
    assert sd["w"].shape == (3, 2) and sd["w"][2, 1] == 5


# --------------------------------------------------------------------------- verify, CLI


def test_verify_picks_comparable_outputs_and_refuses_different_shapes():
    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return {"logits": self.fc(x) + 1, "last_hidden_state": self.fc(x)}

    torch.manual_seed(0)
    a = Dict()
    b = nn.Linear(4, 4)
    b.load_state_dict(a.fc.state_dict())
    x = torch.randn(2, 4)
    assert surgery.verify(a, b, x) == 0  # last_hidden_state by default
    assert surgery.verify(a, b, x, source_output="logits") == pytest.approx(1.0)
    with pytest.raises(UsageError, match=r"source \(2, 4\) vs model \(2, 3\)"):
        surgery.verify(a, nn.Linear(4, 3), x)
    with surgery.empty_init():
        meta = nn.Linear(4, 4)
    with pytest.raises(UsageError, match="meta device"):
        surgery.verify(a, meta, x)


def test_bad_input_says_what_failed():
    with pytest.raises(UsageError, match="example input"):
        surgery.match(Net(), Renamed(), torch.zeros(1, 5, 8, 8))


def test_cli_match_prints_table_and_rules(capsys):
    argv = ["match", "torchvision:resnet18", "timm:resnet18", "--input", "1,3,32,32"]
    assert main([*argv, "--rules"]) == 0
    out = capsys.readouterr().out
    assert "122/122 model tensors matched" in out
    assert "layer4.1.bn2.running_var" in out and "rules = [\n]" in out
    assert main(["match", "torchvision:vit_b_16", "timm:vit_base_patch16_224", "--input",
                 "1,3,224,224", "--rules"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "152/152 model tensors matched (152 high" in out
    assert r"(r'^encoder\.layers\.encoder_layer_(\d+)\.mlp\.0\.', r'blocks.\1.mlp.fc1.')," in out
    argv = ["match", "torchvision:resnet18", "torchvision:resnet34", "--input", "1,3,32,32"]
    assert main([*argv, "--json"]) == 1  # resnet34's extra blocks get nothing
    info = json.loads(capsys.readouterr().out)
    assert "layer3.5.conv1.weight" in info["unmatched_model"]
    assert main(["match", "torchvision:resnet18", "timm:resnet18", "--input", "1,x"]) == 2
    assert "must be a shape" in capsys.readouterr().err
