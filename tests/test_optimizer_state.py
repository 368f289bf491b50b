"""restore_optimizer / optimizer_state / restore_scheduler: optimizer state through a surgery."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torchvision
from conftest import SmallCNN, Tied
from torch import nn

import surgery

FORMS = ("checkpoint", "names", "param_names", "dcp", "dcp_flat", "surgery")
SURVIVING = ("conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias")
FROZEN = ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias")


class Wrapper(nn.Module):
    """DataParallel-style: the model under ``module.``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def make_optimizer(kind: str, params, **kw) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=kw.get("lr", 1e-2), weight_decay=0.01)
    return torch.optim.SGD(params, lr=kw.get("lr", 0.1), momentum=0.9)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        out = model(x)
        y = torch.randint(0, out.shape[1], (4,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(out, y).backward()
        opt.step()


def state_copy(opt: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): copy.deepcopy(dict(s)) for p, s in opt.state.items()}


@pytest.fixture(params=["adamw", "sgd"])
def trained(request):
    """An old model and optimizer trained a few steps, its state copied by name."""
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10)
    opt = make_optimizer(request.param, model.parameters())
    train(model, opt)
    by_name = {n: copy.deepcopy(dict(opt.state[p])) for n, p in model.named_parameters()}
    return request.param, model, opt, by_name


def old_state_in_form(form: str, kind: str, model: nn.Module, opt, tmp_path):
    """The old optimizer state in one of the forms restore_optimizer takes, and its kwargs."""
    if form == "checkpoint":
        path = tmp_path / "last.pth"
        torch.save(
            {"epoch": 3, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}, path
        )
        return str(path), {}
    if form == "names":
        return opt.state_dict(), {"names": [n for n, _ in model.named_parameters()]}
    if form == "param_names":
        # the same optimizer, built from named_parameters (torch stores param_names)
        named = make_optimizer(kind, model.named_parameters())
        named.load_state_dict(opt.state_dict())
        sd = named.state_dict()
        assert "param_names" in sd["param_groups"][0]
        return sd, {}
    if form in ("dcp", "dcp_flat"):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(flatten_optimizer_state_dict=form == "dcp_flat")
        return get_optimizer_state_dict(model, opt, options=options), {}
    assert form == "surgery"
    path = tmp_path / "opt.pt"
    torch.save(surgery.optimizer_state(opt, model), path)
    return torch.load(path, weights_only=True), {}


def surgery_model(old: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer, list[dict]]:
    """The surgery: new 5-class head, wrapped under ``module.``, early layers frozen, layer-
    decayed groups; a new optimizer with other hyper-parameters."""
    torch.manual_seed(1)
    model = Wrapper(SmallCNN(num_classes=5))
    surgery.load_partial(model, old.state_dict())
    surgery.freeze(model, "module.conv1", "module.bn1")
    # layer ids from the inner model's children: conv2, bn2 and fc get three learning rates
    groups = surgery.param_groups(model.module, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    return model, groups


@pytest.mark.parametrize("form", FORMS)
def test_state_follows_parameters_through_surgery(trained, form, tmp_path):
    kind, old_model, old_opt, old_by_name = trained
    old_state, kwargs = old_state_in_form(form, kind, old_model, old_opt, tmp_path)
    model, groups = surgery_model(old_model)
    opt = make_optimizer(kind, groups, lr=0.5)  # group lrs override the default
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

    report = surgery.restore_optimizer(opt, model, old_state, **kwargs)

    params = dict(model.named_parameters())
    keys = ("exp_avg", "exp_avg_sq", "step") if kind == "adamw" else ("momentum_buffer",)
    for name in SURVIVING:
        new, old = opt.state[params["module." + name]], old_by_name[name]
        assert set(new) == set(old)
        for k in keys:
            assert torch.equal(new[k], old[k]), (name, k)
            assert new[k].dtype == old[k].dtype
        if kind == "adamw":
            assert float(new["step"]) == 3.0
            assert new["step"].device.type == "cpu"
    # the state is a copy: training the new optimizer leaves the old one alone
    assert all(
        opt.state[params["module." + n]][keys[0]].data_ptr()
        != old_opt.state[dict(old_model.named_parameters())[n]][keys[0]].data_ptr()
        for n in SURVIVING
    )
    # the new head (another shape) starts fresh; the frozen layers' state is reported
    assert not opt.state.get(params["module.fc.weight"])
    assert not opt.state.get(params["module.fc.bias"])
    assert [m.key for m in report.reset] == ["module.fc.weight", "module.fc.bias"]
    assert report.reset[0].checkpoint_shape == (10, 16)
    assert report.reset[0].model_shape == (5, 16)
    assert sorted(report.frozen) == sorted("module." + n for n in FROZEN)
    assert sorted(report.restored) == sorted("module." + n for n in SURVIVING)
    assert report.prefix == ("", "module.")
    assert report.tensors_total == 6
    assert not report.dropped and not report.fresh
    # the new groups and their hyper-parameters are untouched
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == hyper
    assert len({g["lr"] for g in opt.param_groups}) == 3
    assert sum(bool(s) for s in opt.state.values()) == 4
    train(model, opt, steps=1)  # and the optimizer steps
    assert float(opt.state[params["module.fc.weight"]].get("step", 1)) == 1.0


@pytest.mark.slow  # a real resnet18 trained two steps: seconds alone, much longer on a busy CPU
def test_positional_checkpoint_resnet18_head_swap(tmp_path):
    torch.manual_seed(0)
    old = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.AdamW(old.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 16, 16)
    for _ in range(2):
        opt.zero_grad()
        old(x).sum().backward()
        opt.step()
    path = tmp_path / "r18.pth"
    sd = {"module." + k: v for k, v in old.state_dict().items()}  # saved DDP-style
    torch.save({"state_dict": sd, "optimizer": opt.state_dict()}, path)

    model = torchvision.models.resnet18(num_classes=3)
    surgery.load_partial(model, str(path))
    surgery.freeze(model, "conv1", "bn1", "layer1")
    new_opt = torch.optim.AdamW(surgery.param_groups(model, lr=1e-3, layer_decay=0.7))
    report = surgery.restore_optimizer(new_opt, model, str(path))

    old_params = dict(old.named_parameters())
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith("fc."):
            continue
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(new_opt.state[p][k], opt.state[old_params[name]][k]), name
    assert len(report.restored) == 62 - 15 - 2
    assert len(report.frozen) == 15
    assert {m.key for m in report.reset} == {"fc.weight", "fc.bias"}
    assert report.prefix == ("module.", "")
    assert report.form == "positional, names from the checkpoint"
    new_opt.zero_grad()
    model(x).sum().backward()
    new_opt.step()


def test_positional_state_contradicting_names_is_refused(tmp_path):
    torch.manual_seed(0)
    old = SmallCNN()
    # built over the parameters in another order than the state dict's
    opt = torch.optim.AdamW(list(old.parameters())[::-1], lr=1e-3)
    train(old, opt)
    path = tmp_path / "last.pth"
    torch.save({"state_dict": old.state_dict(), "optimizer": opt.state_dict()}, path)

    model = SmallCNN(num_classes=5)
    new_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, new_opt, steps=1)
    before = state_copy(new_opt)
    groups_before = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in new_opt.param_groups]
    )
    with pytest.raises(surgery.OptimizerStateError) as err:
        surgery.restore_optimizer(new_opt, model, str(path))
    msg = str(err.value)
    assert "contradict" in msg
    assert (
        "position 0: step (), exp_avg (10,), exp_avg_sq (10,) vs 'conv1.weight' (8, 3, 3, 3)" in msg
    )
    assert "names=" in msg
    assert "unchanged" in msg
    # the optimizer is exactly as it was
    after = state_copy(new_opt)
    assert after.keys() == before.keys()
    for pid, st in before.items():
        assert all(torch.equal(after[pid][k], v) for k, v in st.items())
    assert [{k: v for k, v in g.items() if k != "params"} for g in new_opt.param_groups] == (
        groups_before
    )
    # isinstance: callers catching LoadError catch it too
    assert isinstance(err.value, surgery.LoadError)


def test_subset_optimizer_is_aligned_by_shape_or_refused_when_ambiguous(tmp_path):
    torch.manual_seed(0)
    old = SmallCNN()
    head_opt = torch.optim.SGD(old.fc.parameters(), lr=0.1, momentum=0.9)
    train(old, head_opt)
    ckpt = {"model": old.state_dict(), "optimizer": head_opt.state_dict()}
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    report = surgery.restore_optimizer(opt, model, ckpt)
    assert report.restored == ["fc.weight", "fc.bias"]
    assert torch.equal(
        opt.state[model.fc.weight]["momentum_buffer"],
        head_opt.state[old.fc.weight]["momentum_buffer"],
    )
    assert "inferred" in " ".join(report.notes)

    bn_opt = torch.optim.SGD([old.bn1.weight], lr=0.1, momentum=0.9)  # (8,): 3 candidates
    train(old, bn_opt)
    with pytest.raises(surgery.OptimizerStateError, match="more than one way"):
        surgery.restore_optimizer(
            opt, model, {"model": old.state_dict(), "optimizer": bn_opt.state_dict()}
        )
    # with the names given it works
    report = surgery.restore_optimizer(opt, model, bn_opt.state_dict(), names=["bn1.weight"])
    assert report.restored == ["bn1.weight"]


def test_bare_positional_state_needs_names(trained):
    kind, old_model, old_opt, _ = trained
    model = SmallCNN()
    opt = make_optimizer(kind, model.parameters())
    with pytest.raises(surgery.OptimizerStateError, match="names="):
        surgery.restore_optimizer(opt, model, old_opt.state_dict())
    # the old model (or its weights) names them
    report = surgery.restore_optimizer(opt, model, old_opt.state_dict(), names=old_model)
    assert len(report.restored) == 10
    report = surgery.restore_optimizer(
        opt, model, old_opt.state_dict(), names=old_model.state_dict()
    )
    assert len(report.restored) == 10
    with pytest.raises(surgery.OptimizerStateError, match="lists 2 names"):
        surgery.restore_optimizer(opt, model, old_opt.state_dict(), names=["a", "b"])


def test_on_mismatch_adapter_and_error(trained):
    kind, old_model, old_opt, old_by_name = trained
    model = SmallCNN(num_classes=4)
    surgery.load_partial(model, old_model)
    opt = make_optimizer(kind, model.parameters())
    state = surgery.optimizer_state(old_opt, old_model)

    with pytest.raises(
        surgery.OptimizerStateError, match=r"fc\.weight: old \(10, 16\) vs new \(4, 16\)"
    ):
        surgery.restore_optimizer(opt, model, state, on_mismatch="error")
    assert not opt.state

    calls = []

    def keep_rows(name, old_value, new_param):  # the head rows the weights kept
        calls.append(name)
        return old_value[: new_param.shape[0]]

    report = surgery.restore_optimizer(opt, model, state, on_mismatch=keep_rows)
    assert [m.key for m in report.adapted] == ["fc.weight", "fc.bias"]
    assert not report.reset
    k = "exp_avg" if kind == "adamw" else "momentum_buffer"
    assert torch.equal(opt.state[model.fc.weight][k], old_by_name["fc.weight"][k][:4])
    assert set(calls) == {"fc.weight", "fc.bias"}

    with pytest.raises(surgery.OptimizerStateError, match="adapter returned"):
        surgery.restore_optimizer(opt, model, state, on_mismatch=lambda n, v, p: v)
    report = surgery.restore_optimizer(opt, model, state, on_mismatch=lambda n, v, p: None)
    assert [m.key for m in report.reset] == ["fc.weight", "fc.bias"]
    assert not opt.state.get(model.fc.weight)


def test_skip_leaves_a_same_shape_head_fresh_and_remap_renames(trained):
    kind, old_model, old_opt, _ = trained
    model = SmallCNN()
    opt = make_optimizer(kind, model.parameters())
    state = surgery.optimizer_state(old_opt, old_model)
    report = surgery.restore_optimizer(opt, model, state, skip="fc")
    assert report.skipped == ["fc.weight", "fc.bias"]
    assert not opt.state.get(model.fc.weight)
    assert len(report.restored) == 8

    class Renamed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = SmallCNN()

    other = Renamed()
    opt2 = make_optimizer(kind, other.parameters())
    report = surgery.restore_optimizer(opt2, other, state, remap=[(r"^", "backbone.")], prefix=None)
    assert len(report.restored) == 10
    with pytest.raises(surgery.OptimizerStateError, match="none of the 10"):
        surgery.restore_optimizer(opt2, other, state, remap={"^conv": "trunk"}, prefix=None)


def test_training_checkpoint_forms(trained, tmp_path):
    kind, old_model, old_opt, _ = trained
    lightning = {
        "state_dict": {"model." + k: v for k, v in old_model.state_dict().items()},
        "optimizer_states": [old_opt.state_dict()],
    }
    model = SmallCNN()
    opt = make_optimizer(kind, model.parameters())
    report = surgery.restore_optimizer(opt, model, lightning)
    assert len(report.restored) == 10
    assert report.source == "<dict>['optimizer_states']['0']"
    lightning["optimizer_states"].append(old_opt.state_dict())
    with pytest.raises(surgery.CheckpointError, match="entry='optimizer_states.0'"):
        surgery.restore_optimizer(opt, model, lightning)
    report = surgery.restore_optimizer(opt, model, lightning, entry="optimizer_states.1")
    assert len(report.restored) == 10
    with pytest.raises(surgery.CheckpointError, match="found no optimizer state"):
        surgery.restore_optimizer(opt, model, {"state_dict": old_model.state_dict()})
    with pytest.raises(surgery.CheckpointError, match="does not exist"):
        surgery.restore_optimizer(opt, model, tmp_path / "nope.pth")


def test_report_as_text_html_and_dict(trained, tmp_path):
    kind, old_model, old_opt, _ = trained
    model, groups = surgery_model(old_model)
    opt = make_optimizer(kind, groups)
    old_state, _ = old_state_in_form("checkpoint", kind, old_model, old_opt, tmp_path)
    report = surgery.restore_optimizer(opt, model, old_state)
    text = str(report)
    assert text.startswith(f"OptimizerReport: {old_state}['optimizer'] (positional, names from ")
    assert "restored 4/6 parameter states" in text
    assert "2 reset, 4 frozen" in text
    assert "added prefix 'module.'" in text
    assert re.search(r"reset\s+module\.fc\.weight\s+old \(10, 16\) vs new \(5, 16\)", text)
    assert re.search(
        r"frozen\s+module\.conv1\.weight\s+old state not restored: requires_grad=False", text
    )
    assert not report.ok
    html = report._repr_html_()
    assert html.startswith("<table>") and "module.conv2.weight" in html  # restored rows too
    d = json.loads(json.dumps(report.to_dict()))
    assert d["reset"][0] == {
        "key": "module.fc.weight",
        "checkpoint_shape": [10, 16],
        "model_shape": [5, 16],
    }
    assert d["ok"] is False and len(d["restored"]) == 4
    assert "OptimizerReport restored 4/6" in repr(report)


def test_optimizer_state_names_tied_parameters_once_and_refuses_strangers():
    model = Tied()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.out(model.embed(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    state = surgery.optimizer_state(opt, model)
    assert list(state["state"]) == ["embed.weight"]
    assert state["shapes"] == {"embed.weight": [11, 4]}
    fresh = Tied()
    opt2 = torch.optim.Adam(fresh.parameters(), lr=0.1)
    report = surgery.restore_optimizer(opt2, fresh, state)
    assert report.restored == ["embed.weight"]
    with pytest.raises(surgery.UsageError, match="not parameters of Tied"):
        surgery.optimizer_state(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1), model)


def test_restore_scheduler_replays_the_schedule_for_the_new_groups(trained):
    kind, old_model, old_opt, _ = trained
    old_sched = torch.optim.lr_scheduler.OneCycleLR(old_opt, max_lr=0.1, total_steps=20)
    for _ in range(7):
        old_opt.step()
        old_sched.step()
    ckpt = {"optimizer": old_opt.state_dict(), "lr_scheduler": old_sched.state_dict()}

    _, groups = surgery_model(old_model)
    max_lrs = [10 * g["lr"] for g in groups]
    opt = make_optimizer(kind, copy.copy(groups))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lrs, total_steps=20)
    assert surgery.restore_scheduler(sched, ckpt) == 7
    # the reference: the same schedule stepped 7 times
    ref_opt = make_optimizer(kind, copy.copy(groups))
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=max_lrs, total_steps=20)
    for _ in range(7):
        ref_opt.step()
        ref.step()
    assert sched.last_epoch == ref.last_epoch == 7
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    assert sched.get_last_lr() == ref.get_last_lr()
    with pytest.raises(surgery.UsageError, match="already at step 7"):
        surgery.restore_scheduler(sched, {"last_epoch": 3})

    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    old_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(old_opt)
    for loss in (1.0, 0.5, 0.6, 0.7):
        old_plateau.step(loss)
    surgery.restore_scheduler(plateau, {"scheduler": old_plateau.state_dict()})
    assert (plateau.best, plateau.num_bad_epochs) == (0.5, 2)


def load_recipe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "resnet18_head.py"
    spec = importlib.util.spec_from_file_location("resnet18_head", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def test_recipe_resume_restores_all_but_the_head(trained, tmp_path, capsys):
    kind, old_model, old_opt, old_by_name = trained
    recipe = load_recipe()
    assert recipe.get_args_parser().parse_args(["--resume"]).resume is True
    path = tmp_path / "pretrained.pth"  # the demo's layout: DDP keys, positional AdamW state
    sd = {"module." + k: v for k, v in old_model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": sd, "optimizer": old_opt.state_dict()}, path)
    model = SmallCNN(num_classes=10)  # a new head of the same shape
    surgery.load_partial(model, str(path), skip="fc")
    opt = make_optimizer(kind, surgery.param_groups(model, lr=1e-3, layer_decay=0.5))
    report = recipe.resume_optimizer(opt, model, str(path))
    assert "OptimizerReport: " in capsys.readouterr().out
    assert len(report.restored) == 8 and report.skipped == ["fc.weight", "fc.bias"]
    k = "exp_avg" if kind == "adamw" else "momentum_buffer"
    assert torch.equal(opt.state[model.conv1.weight][k], old_by_name["conv1.weight"][k])
    assert not opt.state.get(model.fc.weight)
    with pytest.raises(SystemExit, match="--resume needs"):
        recipe.resume_optimizer(opt, model, old_model.state_dict())
