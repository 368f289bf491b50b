"""param_groups / describe_groups on torchvision resnet18 and a timm ViT."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
import torchvision
from torch import nn

import surgery
from surgery import SelectorError, UsageError

LR, WD = 1e-4, 0.05


@pytest.fixture
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.fixture(scope="module")
def vit_model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10)


@pytest.fixture
def vit(vit_model) -> nn.Module:
    for p in vit_model.parameters():
        p.requires_grad_(True)
    return vit_model


def _group_of(groups: list[dict]) -> dict[int, dict]:
    """id(param) -> its group; fails if a parameter is in two groups."""
    out: dict[int, dict] = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out, f"a parameter is in {out[id(p)]['name']} and {g['name']}"
            out[id(p)] = g
    return out


def _check_partition(model: nn.Module, groups: list[dict]) -> dict[str, dict]:
    """Every trainable parameter in exactly one group, no frozen one; name -> group."""
    where = _group_of(groups)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(where) == trainable
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)) and all(names)
    for g in groups:
        assert set(g) == {"name", "params", "lr", "weight_decay"}
        assert g["params"]
    torch.optim.AdamW(groups)  # accepted as is
    return {n: where[id(p)] for n, p in model.named_parameters() if id(p) in where}


# --------------------------------------------------------------------------- resnet18


def test_resnet_partial_freeze_rules_and_no_decay(resnet):
    model = resnet
    surgery.freeze(model, "conv1", "bn1", "layer1", "layer2", "layer3")
    groups = surgery.param_groups(model, lr=LR, rules=[("fc", {"lr": 1e-3})], weight_decay=WD)
    by_name = _check_partition(model, groups)
    assert not any(n.startswith(("layer1", "layer2", "layer3", "conv1", "bn1.")) for n in by_name)
    bn_params = {
        f"{m}.{p}"
        for m, mod in model.named_modules()
        if isinstance(mod, nn.BatchNorm2d) and m.startswith("layer4")
        for p in ("weight", "bias")
    }
    for name, g in by_name.items():
        no_decay = name.endswith(".bias") or name in bn_params
        assert g["weight_decay"] == (0.0 if no_decay else WD), name
        assert g["lr"] == (1e-3 if name.startswith("fc.") else LR), name
    assert by_name["fc.weight"]["name"] == "fc" and by_name["fc.bias"]["name"] == "fc no_decay"
    assert by_name["layer4.0.conv1.weight"]["name"] == "default"
    assert [g["name"] for g in groups] == ["default", "default no_decay", "fc", "fc no_decay"]

    # a real step with these groups moves only trainable parameters
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups)
    model.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in by_name), n


def test_resnet_layer_decay_follows_top_level_children(resnet):
    model = resnet
    groups = surgery.param_groups(model, lr=LR, weight_decay=WD, layer_decay=0.5)
    by_name = _check_partition(model, groups)
    # conv1, bn1, layer1..layer4, fc hold parameters: 7 layers, fc last
    order = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    for i, top in enumerate(order):
        expected = LR * 0.5 ** (len(order) - 1 - i)
        lrs = [g["lr"] for n, g in by_name.items() if n.split(".")[0] == top]
        assert lrs and lrs == pytest.approx([expected] * len(lrs)), top
    assert by_name["fc.weight"]["lr"] == LR
    assert by_name["layer4.1.conv2.weight"]["name"] == "layer4"
    assert by_name["layer4.1.bn2.weight"]["name"] == "layer4 no_decay"
    assert by_name["conv1.weight"]["name"] == "conv1"


def test_first_matching_rule_wins_and_lr_scale(resnet):
    model = resnet
    rules = [
        ("fc.bias", {"lr": 1.0}),
        ("fc", {"lr": 2.0, "weight_decay": 0.3}),
        (nn.BatchNorm2d, {"lr_scale": 0.1}),
        ("layer4", {"lr_scale": 0.5}),
    ]
    groups = surgery.param_groups(model, lr=LR, weight_decay=WD, rules=rules)
    by_name = _check_partition(model, groups)
    assert by_name["fc.bias"]["lr"] == 1.0 and by_name["fc.bias"]["weight_decay"] == 0.0
    assert by_name["fc.weight"]["lr"] == 2.0 and by_name["fc.weight"]["weight_decay"] == 0.3
    assert by_name["layer4.0.bn1.weight"]["lr"] == pytest.approx(LR * 0.1)  # rule 3 before 4
    assert by_name["layer4.0.conv1.weight"]["lr"] == pytest.approx(LR * 0.5)
    assert by_name["layer1.0.conv1.weight"]["lr"] == LR
    assert by_name["bn1.weight"]["name"] == "BatchNorm2d no_decay"


def test_rule_lr_scale_combines_with_layer_decay(resnet):
    groups = surgery.param_groups(
        resnet, lr=LR, layer_decay=0.5, rules=[("layer4", {"lr_scale": 0.1})]
    )
    by_name = _check_partition(resnet, groups)
    assert by_name["layer4.0.conv1.weight"]["lr"] == pytest.approx(LR * 0.5 * 0.1)
    assert by_name["layer4.0.conv1.weight"]["name"] == "layer4"  # rule and layer agree


def test_identical_options_share_a_group(resnet):
    rules = [("fc", {"lr": 1e-3}), ("layer4", {"lr": 1e-3})]
    groups = surgery.param_groups(resnet, lr=LR, rules=rules)  # no decay: one group per lr
    by_name = _check_partition(resnet, groups)
    assert len(groups) == 2
    assert by_name["fc.weight"] is by_name["layer4.0.conv1.weight"]
    assert by_name["fc.weight"]["name"] == "layer4 + fc"  # model order


def test_no_decay_none_and_explicit(resnet):
    groups = surgery.param_groups(resnet, lr=LR, weight_decay=WD, no_decay=None)
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("default", WD)]
    groups = surgery.param_groups(resnet, lr=LR, weight_decay=WD, no_decay=["fc"])
    by_name = _check_partition(resnet, groups)
    assert by_name["fc.bias"]["weight_decay"] == 0 and by_name["fc.weight"]["weight_decay"] == 0
    assert by_name["bn1.weight"]["weight_decay"] == WD


def test_shared_parameters_appear_once():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

    model = Tied()
    groups = surgery.param_groups(model, lr=LR, weight_decay=WD, rules=[("out", {"lr": 1.0})])
    where = _check_partition(model, groups)
    assert sum(len(g["params"]) for g in groups) == 3
    assert where["emb.weight"]["lr"] == 1.0  # the rule matched it through its alias


# --------------------------------------------------------------------------- timm ViT


def test_vit_groups_no_decay_and_layer_decay(vit):
    model = vit
    surgery.freeze(model, "patch_embed")
    groups = surgery.param_groups(
        model, lr=LR, weight_decay=WD, layer_decay=0.75, rules=[("head", {"lr": 1e-3})]
    )
    by_name = _check_partition(model, groups)
    assert "patch_embed.proj.weight" not in by_name
    # no decay: biases, norm weights, and what the model lists in no_weight_decay()
    for n in ("cls_token", "pos_embed", "blocks.0.norm1.weight", "norm.weight", "head.bias"):
        assert by_name[n]["weight_decay"] == 0.0, n
    for n in ("blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight", "head.weight"):
        assert by_name[n]["weight_decay"] == WD, n
    # layer decay: timm's group_matcher gives stem 0, blocks.i -> i + 1, head 13
    assert by_name["head.weight"]["lr"] == 1e-3
    lrs = [by_name[f"blocks.{i}.attn.qkv.weight"]["lr"] for i in range(12)]
    for i, lr in enumerate(lrs):
        assert lr == pytest.approx(LR * 0.75 ** (13 - 1 - i))
    assert all(a < b for a, b in itertools.pairwise(lrs))
    assert by_name["cls_token"]["lr"] == pytest.approx(LR * 0.75**13)
    assert by_name["cls_token"]["lr"] < lrs[0]
    assert by_name["norm.weight"]["lr"] == lrs[-1]  # final norm sits with the last block


def test_vit_layer_decay_without_rules_gives_head_full_lr(vit):
    groups = surgery.param_groups(vit, lr=LR, weight_decay=WD, layer_decay=0.75)
    by_name = _check_partition(vit, groups)
    assert by_name["head.weight"]["lr"] == LR
    assert by_name["head.weight"]["name"] == "head"
    assert by_name["blocks.3.norm2.bias"]["name"] == "blocks.3 no_decay"
    assert by_name["norm.weight"]["name"] == "blocks.11+norm no_decay"
    assert by_name["cls_token"]["name"].startswith("cls_token+pos_embed")


def test_wrapped_timm_backbone_no_weight_decay():
    class Wrapper(nn.Module):
        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(192, 2)

    backbone = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0, depth=1
    )
    model = Wrapper(backbone)
    by_name = _check_partition(model, surgery.param_groups(model, lr=LR, weight_decay=WD))
    assert by_name["backbone.pos_embed"]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["weight_decay"] == WD


# --------------------------------------------------------------------------- errors


def test_rule_typo_names_closest(resnet):
    with pytest.raises(SelectorError) as e:
        surgery.param_groups(resnet, lr=LR, rules=[("fcc", {"lr": 1e-3})])
    assert "param_groups rule pattern 'fcc' matched nothing in ResNet" in str(e.value)
    assert "Closest names: fc" in str(e.value)


def test_rule_matching_only_frozen_parameters(resnet):
    surgery.freeze(resnet, "layer1")
    with pytest.raises(SelectorError, match="all frozen"):
        surgery.param_groups(resnet, lr=LR, rules=[("layer1", {"lr": 1e-3})])


def test_shadowed_rule(resnet):
    rules = [("fc.weight", {}), ("layer4", {}), ("fc.bias", {}), ("fc", {"lr": 1})]
    msg = r"'fc' never applies.*rule\(s\) 'fc.weight', 'fc.bias'\. Put the more specific"
    with pytest.raises(SelectorError, match=msg):
        surgery.param_groups(resnet, lr=LR, rules=rules)


def test_bad_options(resnet):
    with pytest.raises(UsageError, match="unknown option.*'momentum'.*allowed: lr, lr_scale"):
        surgery.param_groups(resnet, lr=LR, rules=[("fc", {"momentum": 0.9})])
    with pytest.raises(UsageError, match="pair"):
        surgery.param_groups(resnet, lr=LR, rules=["fc"])
    with pytest.raises(UsageError, match="lr must be a positive number"):
        surgery.param_groups(resnet, lr=0)
    with pytest.raises(UsageError, match="layer_decay"):
        surgery.param_groups(resnet, lr=LR, layer_decay=1.5)
    with pytest.raises(UsageError, match="no_decay"):
        surgery.param_groups(resnet, lr=LR, weight_decay=WD, no_decay=3)


def test_no_trainable_parameter(resnet):
    surgery.freeze(resnet, "*")
    with pytest.raises(UsageError, match="no trainable parameter in ResNet"):
        surgery.param_groups(resnet, lr=LR)


def test_rules_as_mapping(resnet):
    groups = surgery.param_groups(resnet, lr=LR, rules={"fc": {"lr": 1e-3}})
    assert _check_partition(resnet, groups)["fc.weight"]["lr"] == 1e-3


# --------------------------------------------------------------------------- describe_groups


def test_describe_groups(resnet):
    surgery.freeze(resnet, "conv1", "bn1", "layer1", "layer2", "layer3")
    groups = surgery.param_groups(resnet, lr=LR, rules=[("fc", {"lr": 1e-3})], weight_decay=WD)
    table = surgery.describe_groups(groups)
    lines = str(table).splitlines()
    trainable = sum(p.numel() for p in resnet.parameters() if p.requires_grad)
    assert table.total_params == trainable
    assert lines[0].startswith("4 parameter groups, 17 tensors")
    assert lines[1].split() == ["group", "tensors", "params", "lr", "weight", "decay"]
    fc = next(line for line in lines if line.strip().startswith("fc "))
    assert fc.split() == ["fc", "1", "5.1K", "0.001", "0.05"]
    html = table._repr_html_()
    assert html.startswith("<table>") and "<td>fc no_decay</td>" in html

    opt = torch.optim.SGD(groups)
    assert [r.name for r in surgery.describe_groups(opt).rows] == [g["name"] for g in groups]
    surgery.freeze(resnet, "fc")
    assert "holds 1 frozen tensor" in str(surgery.describe_groups(opt))
    plain = surgery.describe_groups([{"params": list(resnet.fc.parameters())}])
    assert plain.rows[0].name == "group 0" and "default" in str(plain)


# --------------------------------------------------------------------------- add_param_groups

SCHEDULES = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9**e),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6, eta_min=1e-3),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
}


def _step(opt, scheduler, model=None):
    if model is not None:
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    scheduler.step()


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_group_added_mid_schedule_follows_it(kind):
    from support import SmallCNN

    torch.manual_seed(0)
    # reference: the head group at 0.1 and the fc group at 0.02 from the start
    model = SmallCNN(num_classes=3)
    ref_opt = torch.optim.SGD(
        [{"params": [model.conv1.weight], "lr": 0.1}, {"params": [model.fc.weight], "lr": 0.02}]
    )
    ref = SCHEDULES[kind](ref_opt)
    expected = []
    for _ in range(8):
        _step(ref_opt, ref)
        expected.append(ref_opt.param_groups[1]["lr"])

    surgery.freeze_except(model, "conv1.weight")
    opt = torch.optim.SGD([{"params": [model.conv1.weight], "lr": 0.1}])
    scheduler = SCHEDULES[kind](opt)
    for _ in range(3):
        _step(opt, scheduler, model)
    summary = surgery.unfreeze(
        model, "fc.weight", optimizer=opt, lr=0.02, weight_decay=0, scheduler=scheduler
    )
    assert summary.optimizer_groups == ["unfreeze fc.weight"]
    new = opt.param_groups[1]
    assert new["initial_lr"] == 0.02 and scheduler.base_lrs == [0.1, 0.02]
    assert new["lr"] == pytest.approx(expected[2])  # joins where the schedule is now
    assert scheduler.get_last_lr()[1] == pytest.approx(expected[2])
    before = model.fc.weight.detach().clone()
    for i in range(3, 8):
        _step(opt, scheduler, model)
        assert new["lr"] == pytest.approx(expected[i]), i
    assert not torch.equal(model.fc.weight, before)  # the new group trains
    assert scheduler.state_dict()["base_lrs"] == [0.1, 0.02]


def test_add_param_groups_adds_what_no_group_holds(resnet):
    surgery.freeze_except(resnet, "fc", "layer4")
    opt = torch.optim.AdamW(
        [p for n, p in resnet.named_parameters() if n.startswith("fc")], lr=1e-3, weight_decay=WD
    )
    added = surgery.add_param_groups(opt, resnet, lr=1e-4)
    assert added == ["added", "added no_decay"]
    groups = _group_of(opt.param_groups)  # no parameter twice
    assert set(groups) == {id(p) for p in resnet.parameters() if p.requires_grad}
    assert [g["weight_decay"] for g in opt.param_groups[1:]] == [WD, 0.0]
    assert surgery.add_param_groups(opt, resnet, lr=1e-4) == []
    assert surgery.add_param_groups(opt, resnet, "layer1", lr=1e-4) == []  # frozen: nothing
    surgery.unfreeze(resnet, "layer3")
    named = surgery.add_param_groups(opt, resnet, "layer3", lr=1e-5, name="warmup")
    assert named == ["warmup", "warmup no_decay"]
    assert opt.param_groups[-1]["lr"] == 1e-5


def test_scheduler_must_be_passed_and_be_one_a_group_can_follow(resnet):
    surgery.freeze_except(resnet, "fc")
    groups = surgery.param_groups(resnet, lr=0.1)
    opt = torch.optim.SGD(groups)
    torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(UsageError, match="scheduler=sched"):
        surgery.unfreeze(resnet, "layer4", optimizer=opt, lr=0.01)
    assert not any(p.requires_grad for p in resnet.layer4.parameters())  # nothing changed
    assert opt.param_groups == before

    opt = torch.optim.SGD(surgery.param_groups(resnet, lr=0.1))
    cyclic = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    with pytest.raises(UsageError, match="cannot add a group to a running OneCycleLR"):
        surgery.unfreeze(resnet, "layer4", optimizer=opt, lr=0.01, scheduler=cyclic)
    assert len(opt.param_groups) == 1 and not resnet.layer4[0].conv1.weight.requires_grad

    two = torch.optim.SGD([{"params": [resnet.fc.weight]}, {"params": [resnet.fc.bias]}], lr=0.1)
    per_group = torch.optim.lr_scheduler.LambdaLR(two, [lambda e: 1.0, lambda e: 0.5])
    with pytest.raises(UsageError, match="one lr_lambda per group"):
        surgery.add_param_groups(two, resnet, "layer4", lr=0.01, scheduler=per_group)
    other = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(groups), step_size=1)
    with pytest.raises(UsageError, match="not attached to this optimizer"):
        surgery.add_param_groups(two, resnet, lr=0.01, scheduler=other)
    with pytest.raises(UsageError, match="lr="):
        surgery.add_param_groups(two, resnet)
    with pytest.raises(UsageError, match="scheduler apply only with optimizer"):
        surgery.unfreeze(resnet, "layer4", scheduler=other)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: surgery.param_groups(42, lr=0.1), "model"),
        (lambda: surgery.describe_groups(42), "groups"),
        (lambda: surgery.describe_groups([1]), "groups"),
        (lambda: surgery.describe_groups([{"params": 3}]), "groups"),
        (lambda: surgery.add_param_groups("x", nn.Linear(2, 2), lr=0.1), "optimizer"),
        (
            lambda: surgery.add_param_groups(
                torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1), 42, lr=0.1
            ),
            "model",
        ),
    ],
)
def test_wrong_argument_types_are_usage_errors_naming_the_argument(call, argument):
    with pytest.raises(UsageError, match=f"as {argument}, got"):
        call()
