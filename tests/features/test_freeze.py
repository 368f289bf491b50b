"""freeze / unfreeze / freeze_except / trainable_summary: behaviour on real training steps."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import surgery
from surgery import SelectorError, SurgeryError, UsageError

from support import SmallCNN, Tied, snapshot


def _batch(n: int = 4, size: int = 16, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 2, size: int = 16):
    model.train()
    for i in range(steps):
        x, y = _batch(size=size, seed=i, classes=10 if size == 32 else 3)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _ids(params) -> set[int]:
    return {id(p) for p in params}


@pytest.fixture
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


# --------------------------------------------------------------------------- training steps


def test_issue_example_step_changes_only_trainable_and_bn_stats_stay(resnet):
    model = resnet
    summary = surgery.freeze(model, "conv1", "bn1", "layer1", "layer2", "layer3")
    trainable = _ids(list(model.layer4.parameters()) + list(model.fc.parameters()))
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    frozen_bns = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not n.startswith("layer4")
    ]
    assert sorted(summary.bn_eval) == sorted(frozen_bns)
    assert summary.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)

    before = snapshot(model)
    # deliberately hand *every* parameter to a decaying optimizer: frozen ones must not move
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train_steps(model, opt, steps=2, size=32)
    after = model.state_dict()
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"frozen {name} moved"
            assert p.grad is None
    for bn in frozen_bns:
        for stat in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"{bn}.{stat}"
            assert torch.equal(before[key], after[key]), f"{key} moved in train mode"
        assert model.get_submodule(bn).training is False
    # the BatchNorms of layer4 are still trainable and keep updating statistics
    assert not torch.equal(before["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])
    assert model.layer4[0].bn1.training is True


def test_freeze_drops_stale_grads():
    model = SmallCNN(num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    _train_steps(model, opt, steps=1)  # momentum buffers and grads exist now
    x, y = _batch(seed=5)
    nn.functional.cross_entropy(model(x), y).backward()  # fresh grads on every parameter
    surgery.freeze(model, "conv1", "bn1")
    assert model.conv1.weight.grad is None and model.bn1.bias.grad is None
    conv1 = model.conv1.weight.detach().clone()
    opt.step()  # with a stale grad this would move conv1 through momentum and decay
    assert torch.equal(model.conv1.weight, conv1)


def test_bn_eval_survives_train_deepcopy_and_pickle():
    model = SmallCNN(num_classes=3)
    surgery.freeze(model, "conv1", "bn1")
    for m in (model, copy.deepcopy(model)):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        for clone in (m, torch.load(buf, weights_only=False)):
            clone.train()
            mean, var = clone.bn1.running_mean.clone(), clone.bn1.running_var.clone()
            mean2 = clone.bn2.running_mean.clone()
            clone(_batch()[0])
            assert torch.equal(clone.bn1.running_mean, mean)
            assert torch.equal(clone.bn1.running_var, var)
            assert not torch.equal(clone.bn2.running_mean, mean2)
            assert clone.bn1.training is False and clone.bn2.training is True


def _cnn_with_bn1_stats() -> SmallCNN:
    """A SmallCNN in eval mode whose bn1 statistics and weight are not the defaults."""
    model = SmallCNN(num_classes=3).eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
        model.bn1.weight.uniform_(0.5, 2)
    return model


def test_frozen_bn_uses_running_stats_in_train_mode():
    model = _cnn_with_bn1_stats()
    x = _batch()[0]
    ref = model.bn1(model.conv1(x))
    surgery.freeze(model, "conv1", "bn1")
    model.train()
    torch.testing.assert_close(model.bn1(model.conv1(x)), ref)


def test_unfreeze_releases_bn_and_restores_training():
    model = SmallCNN(num_classes=3)
    surgery.freeze(model, "conv1", "bn1")
    summary = surgery.unfreeze(model, "bn1")
    assert summary.bn_released == ["bn1"]
    assert summary.unfrozen_tensors == 2
    assert len(model.bn1._forward_pre_hooks) == 0
    assert model.bn1.weight.requires_grad and not model.conv1.weight.requires_grad
    model.train()
    mean = model.bn1.running_mean.clone()
    model(_batch()[0])
    assert not torch.equal(model.bn1.running_mean, mean)


def test_unfreeze_bn_eval_trains_affine_but_keeps_stats():
    model = SmallCNN(num_classes=3)
    summary = surgery.unfreeze(model, "bn2", bn="eval")
    assert summary.bn_eval == ["bn2"]
    model.train()
    mean = model.bn2.running_mean.clone()
    model(_batch()[0])
    assert torch.equal(model.bn2.running_mean, mean)
    assert model.bn2.weight.requires_grad


def test_bn_train_leaves_statistics_moving():
    model = SmallCNN(num_classes=3)
    summary = surgery.freeze(model, "bn1", bn="train")
    assert summary.bn_eval == [] and summary.bn_frozen == []
    model.train()
    mean = model.bn1.running_mean.clone()
    model(_batch()[0])
    assert not torch.equal(model.bn1.running_mean, mean)


def test_bn_frozen_swaps_to_frozenbatchnorm_and_back():
    model = _cnn_with_bn1_stats()
    x = _batch()[0]

    def bn1_out() -> torch.Tensor:
        return model.bn1(model.conv1(x))

    ref = bn1_out()
    summary = surgery.freeze(model, "conv1", "bn1", bn="frozen")
    assert summary.bn_frozen == ["bn1"]
    assert isinstance(model.bn1, FrozenBatchNorm2d)
    assert summary.total_tensors == 8  # bn1's two parameters became buffers
    model.train()
    torch.testing.assert_close(bn1_out(), ref)

    back = surgery.unfreeze(model, "bn1")
    assert back.bn_released == ["bn1"]
    assert type(model.bn1) is nn.BatchNorm2d and model.bn1.weight.requires_grad
    assert model.bn1.training is True  # follows the model's mode
    model.eval()
    torch.testing.assert_close(bn1_out(), ref)


def test_bn_frozen_falls_back_to_eval_for_other_batchnorms():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    summary = surgery.freeze(model, "0", "1", bn="frozen")
    assert summary.bn_frozen == [] and summary.bn_eval == ["1"]
    assert isinstance(model[1], nn.BatchNorm1d)
    model.train()
    mean = model[1].running_mean.clone()
    model(torch.randn(8, 4))
    assert torch.equal(model[1].running_mean, mean)


def test_affine_false_bn_under_frozen_selector_is_held():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)), nn.Conv2d(4, 2, 1)
    )
    summary = surgery.freeze(model, "0")
    assert summary.bn_eval == ["0.1"]


def test_partly_frozen_bn_is_not_held():
    model = SmallCNN(num_classes=3)
    summary = surgery.freeze(model, "bn1.weight")
    assert summary.bn_eval == []
    assert model.bn1.bias.requires_grad
    summary = surgery.freeze(model, "bn1.bias")  # now all of bn1 is frozen
    assert summary.bn_eval == ["bn1"]


def test_freeze_except_sets_exactly_the_selection_trainable(resnet):
    model = resnet
    surgery.freeze(model, "fc")
    summary = surgery.freeze_except(model, "fc", "layer4")
    keep = _ids(list(model.layer4.parameters()) + list(model.fc.parameters()))
    assert {id(p) for p in model.parameters() if p.requires_grad} == keep
    assert summary.unfrozen_tensors == 2  # fc was frozen before
    assert summary.frozen_tensors == len(list(model.parameters())) - len(keep)
    assert "layer4.0.bn1" not in summary.bn_eval and "bn1" in summary.bn_eval
    model.train()
    held, free = model.layer3[0].bn1, model.layer4[0].bn1
    means = held.running_mean.clone(), free.running_mean.clone()
    model(_batch(size=32, classes=10)[0])
    assert torch.equal(held.running_mean, means[0])
    assert not torch.equal(free.running_mean, means[1])


# --------------------------------------------------------------------------- selectors


def test_selector_kinds(resnet):
    model = resnet
    bn_params = _ids(
        p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    )
    s = surgery.freeze(model, nn.BatchNorm2d)
    assert {id(p) for p in model.parameters() if not p.requires_grad} == bn_params
    assert s.frozen_tensors == len(bn_params)

    model = torchvision.models.resnet18(num_classes=10)
    surgery.freeze(model, "*.bn*")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if ".bn" in n}

    model = torchvision.models.resnet18(num_classes=10)
    surgery.freeze(model, r"re:layer[12]\.0")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        n for n, _ in model.named_parameters() if n.startswith(("layer1.0.", "layer2.0."))
    }

    model = torchvision.models.resnet18(num_classes=10)
    surgery.freeze(model, lambda name, m: isinstance(m, nn.Conv2d) and name.startswith("layer1"))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        n for n, _ in model.named_parameters() if n.startswith("layer1") and "conv" in n
    }


def test_typo_raises_with_suggestions_and_freezes_nothing(resnet):
    with pytest.raises(SelectorError) as e:
        surgery.freeze(resnet, "layer3", "layer5")
    msg = str(e.value)
    assert "freeze pattern 'layer5' matched nothing in ResNet" in msg
    assert "Closest names: layer4" in msg
    assert "Top-level modules: conv1, bn1, relu, maxpool, layer1" in msg
    assert all(p.requires_grad for p in resnet.parameters())  # nothing half-done
    assert isinstance(e.value, SurgeryError)


def test_every_bad_selector_reported_at_once(resnet):
    with pytest.raises(SelectorError) as e:
        surgery.freeze_except(resnet, "fcc", nn.Conv3d, lambda n, m: False)
    msg = str(e.value)
    assert "'fcc' matched nothing" in msg and "Closest names: fc" in msg
    assert "type Conv3d matched no module" in msg
    assert "<lambda> returned False for every module" in msg
    assert msg.count("Top-level modules") == 1


@pytest.mark.parametrize("bad", [3, None, nn.Linear(2, 2), dict])
def test_bad_selector_type(bad):
    with pytest.raises(SelectorError, match="not"):
        surgery.freeze(SmallCNN(num_classes=3), bad)


def test_bad_arguments():
    model = SmallCNN(num_classes=3)
    with pytest.raises(UsageError, match="bn='off'"):
        surgery.freeze(model, "bn1", bn="off")
    with pytest.raises(UsageError, match="'frozen'"):
        surgery.unfreeze(model, "bn1", bn="frozen")
    with pytest.raises(UsageError, match="at least one selector"):
        surgery.freeze(model)
    with pytest.raises(UsageError, match="optimizer="):
        surgery.unfreeze(model, "bn1", lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UsageError, match="lr="):
        surgery.unfreeze(model, "bn1", optimizer=opt)


def test_shared_parameter_frozen_through_any_alias():
    model = Tied()
    s = surgery.freeze(model, "out")
    assert not model.embed.weight.requires_grad
    assert s.frozen_tensors == 1 and s.total_tensors == 1 and s.trainable_params == 0


# --------------------------------------------------------------------------- gradual unfreezing


def test_gradual_unfreezing_adds_a_group_once(resnet):
    model = resnet
    surgery.freeze_except(model, "fc")
    opt = torch.optim.AdamW(surgery.param_groups(model, lr=1e-3, weight_decay=0.05))
    n_groups = len(opt.param_groups)

    s = surgery.unfreeze(model, "layer4", optimizer=opt, lr=1e-4)
    added = opt.param_groups[n_groups:]
    assert [g["name"] for g in added] == ["unfreeze layer4", "unfreeze layer4 no_decay"]
    assert s.optimizer_groups == ["unfreeze layer4", "unfreeze layer4 no_decay"]
    assert _ids(p for g in added for p in g["params"]) == _ids(model.layer4.parameters())
    assert [g["lr"] for g in added] == [1e-4, 1e-4]
    assert [g["weight_decay"] for g in added] == [0.05, 0.0]  # the groups' base decay
    no_decay = _ids(added[1]["params"])
    bns = [m for m in model.layer4.modules() if isinstance(m, nn.BatchNorm2d)]
    assert no_decay == _ids(p for m in bns for p in m.parameters())  # resnet convs have no bias

    total = len(opt.param_groups)
    again = surgery.unfreeze(model, "layer4", optimizer=opt, lr=1e-4)
    assert len(opt.param_groups) == total and again.optimizer_groups == []
    assert again.optimizer_skipped == len(list(model.layer4.parameters()))
    assert "nothing added" in str(again)
    # a wider unfreeze adds only what is new
    s3 = surgery.unfreeze(model, "layer3", "layer4", optimizer=opt, lr=1e-5, weight_decay=0)
    assert _ids(p for g in opt.param_groups[total:] for p in g["params"]) == _ids(
        model.layer3.parameters()
    )
    assert s3.optimizer_groups == ["unfreeze layer3+layer4"]  # no decay: one group
    assert opt.param_groups[total]["lr"] == 1e-5 and s3.optimizer_tensors == 15
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(held) == len(set(held))
    before = model.layer4[1].conv2.weight.detach().clone()
    _train_steps(model, opt, steps=1, size=32)
    assert not torch.equal(model.layer4[1].conv2.weight, before)


def test_unfreeze_frozen_batchnorm_adds_its_new_parameters():
    model = SmallCNN(num_classes=3)
    surgery.freeze(model, "conv1", "bn1", bn="frozen")
    opt = torch.optim.SGD(surgery.param_groups(model, lr=0.1), lr=0.1)
    surgery.unfreeze(model, "bn1", optimizer=opt, lr=0.1)
    assert _ids(opt.param_groups[-1]["params"]) == _ids(model.bn1.parameters())


def test_unfreeze_keeps_named_optimizer_groups_consistent():
    model = SmallCNN(num_classes=3)
    surgery.freeze(model, "conv1")
    opt = torch.optim.SGD(
        [p for p in model.named_parameters() if p[1].requires_grad], lr=0.1
    )  # a torch optimizer built from named parameters
    if "param_names" not in opt.param_groups[0]:
        pytest.skip("this torch has no named parameter groups")
    surgery.unfreeze(model, "conv1", optimizer=opt, lr=0.1)
    assert opt.param_groups[-1]["param_names"] == ["conv1.weight", "conv1.bias"]


# --------------------------------------------------------------------------- summaries


def test_summaries_render(resnet):
    s = surgery.freeze(resnet, "conv1", "bn1", "layer1")
    text = str(s)
    assert text.startswith("freeze ResNet: 15 tensors")
    assert "BatchNorm: 5 held in eval mode" in text
    assert "<table>" in s._repr_html_()

    t = surgery.trainable_summary(resnet)
    rows = {r.module: r for r in t.rows}
    assert rows["layer1"].trainable == 0
    assert rows["layer1"].params == sum(p.numel() for p in resnet.layer1.parameters())
    assert rows["layer2"].trainable == rows["layer2"].params
    assert rows["layer1"].bn_fixed == 4 and rows["bn1"].bn_fixed == 1
    assert "relu" not in rows and "avgpool" not in rows  # nothing to train there
    assert t.total_params == sum(p.numel() for p in resnet.parameters())
    lines = str(t).splitlines()
    assert lines[0].startswith("ResNet: ")
    assert any(line.split()[:1] == ["layer1"] for line in lines)
    assert "<table>" in t._repr_html_() and "layer4" in t._repr_html_()


def test_small_trainable_share_does_not_read_as_zero():
    model = torchvision.models.resnet18(num_classes=5)
    s = surgery.freeze_except(model, "fc")
    assert "trainable 2.6K of 11.2M params (0.02%)" in str(s)
    total = str(surgery.trainable_summary(model)).splitlines()[-1].split()
    assert total[0] == "total" and total[-2] == "0.02"


# --------------------------------------------------------------------------- held BatchNorm


def _no_hooks(m: nn.Module) -> bool:
    return not (m._forward_pre_hooks or m._forward_hooks)


def test_held_bn_reads_eval_right_after_train_and_has_no_hooks():
    model = SmallCNN(num_classes=3)
    surgery.freeze(model, "conv1", "bn1")
    model.train()
    assert model.bn1.training is False  # before any forward call
    assert model.bn2.training is True and model.training is True
    assert isinstance(model.bn1, nn.BatchNorm2d) and _no_hooks(model.bn1)
    assert "held in eval" in repr(model.bn1)
    stats = model.bn1.running_mean.clone(), model.bn1.running_var.clone()
    for seed in range(2):
        model(_batch(seed=seed)[0])
        assert model.bn1.training is False
    assert torch.equal(model.bn1.running_mean, stats[0])
    assert torch.equal(model.bn1.running_var, stats[1])
    assert int(model.bn1.num_batches_tracked) == 0
    model.eval().train()
    assert model.bn1.training is False


def test_held_bn_class_survives_copies_and_unfreeze_restores_it():
    model = SmallCNN(num_classes=3)
    surgery.freeze(model, "bn1")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        clone.train()
        assert clone.bn1.training is False and _no_hooks(clone.bn1)
        assert isinstance(clone.bn1, nn.BatchNorm2d)
        assert type(clone.bn1) is type(model.bn1)  # one held class per BatchNorm class
        summary = surgery.unfreeze(clone, "bn1")
        assert summary.bn_released == ["bn1"]
        assert type(clone.bn1) is nn.BatchNorm2d and clone.bn1.training is True
        mean = clone.bn1.running_mean.clone()
        clone(_batch()[0])
        assert not torch.equal(clone.bn1.running_mean, mean)
    assert model.bn1.training is False  # the copies did not release the original


def test_held_bn_subclass_and_refreeze_to_frozenbatchnorm():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 1), MyBN(4), nn.BatchNorm2d(4))
    summary = surgery.freeze(model, "1", "2")
    assert summary.bn_eval == ["1", "2"]
    assert isinstance(model[1], MyBN) and type(model[1]).__name__ == "MyBN"
    clone = copy.deepcopy(model)
    assert isinstance(clone[1], MyBN) and clone.train()[1].training is False
    # a layer held in eval can still be swapped to FrozenBatchNorm2d later
    again = surgery.freeze(model, "2", bn="frozen")
    assert again.bn_frozen == ["2"] and isinstance(model[2], FrozenBatchNorm2d)
    assert isinstance(model[1], MyBN) and model.train()[1].training is False


def test_model_held_by_surgery_0_1_hook_is_released():
    from surgery.freeze import _bn_eval_pre_hook

    model = SmallCNN(num_classes=3)
    model.bn1.weight.requires_grad_(False)
    model.bn1.bias.requires_grad_(False)
    model.bn1._surgery_bn_eval = True  # how 0.1 marked a held layer
    model.bn1.register_forward_pre_hook(_bn_eval_pre_hook)
    assert surgery.trainable_summary(model).rows[1].bn_fixed == 1
    summary = surgery.unfreeze(model, "bn1")
    assert summary.bn_released == ["bn1"] and _no_hooks(model.bn1)
    assert not hasattr(model.bn1, "_surgery_bn_eval")


@pytest.mark.slow
def test_held_bn_compiles_as_a_plain_module():
    model = SmallCNN(num_classes=3)
    surgery.freeze(model, "conv1", "bn1")
    model.train()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # a graph break fails
    means = model.bn1.running_mean.clone(), model.bn2.running_mean.clone()
    compiled(_batch()[0])
    assert torch.equal(model.bn1.running_mean, means[0])
    assert not torch.equal(model.bn2.running_mean, means[1])


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda m: surgery.freeze(42, "fc"), "model"),
        (lambda m: surgery.freeze_except(42, "fc"), "model"),
        (lambda m: surgery.unfreeze(42, "fc"), "model"),
        (lambda m: surgery.trainable_summary(42), "model"),
        (lambda m: surgery.unfreeze(m, "fc", optimizer="x", lr=0.1), "optimizer"),
        (lambda m: surgery.unfreeze(m, "fc", optimizer="x"), "optimizer"),
    ],
)
def test_wrong_argument_types_are_usage_errors_naming_the_argument(call, argument):
    model = SmallCNN()
    surgery.freeze(model, "conv1")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(UsageError, match=f"needs .* as {argument}, got"):
        call(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
