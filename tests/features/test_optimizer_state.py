"""restore_optimizer / optimizer_state / restore_scheduler: optimizer state through a surgery."""

from __future__ import annotations

import copy
import importlib
import itertools
import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import surgery

from support import SmallCNN, Tied

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

    path = Path(__file__).resolve().parents[2] / "recipes" / "resnet18_head.py"
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
    args = recipe.get_args_parser().parse_args(["--resume"])  # the defaults: nothing trusted
    report = recipe.resume_optimizer(opt, model, str(path), args)
    assert "OptimizerReport: " in capsys.readouterr().out
    assert len(report.restored) == 8 and report.skipped == ["fc.weight", "fc.bias"]
    k = "exp_avg" if kind == "adamw" else "momentum_buffer"
    assert torch.equal(opt.state[model.conv1.weight][k], old_by_name["conv1.weight"][k])
    assert not opt.state.get(model.fc.weight)
    with pytest.raises(recipe.RecipeError, match="--resume needs"):
        recipe.resume_optimizer(opt, model, old_model.state_dict(), args)


# --------------------------------------------------------------------------- hostile files


def trained_pair(kind: str = "sgd"):
    """A new model and its optimizer with state (one step), and a snapshot of both."""
    torch.manual_seed(2)
    model = SmallCNN()
    opt = make_optimizer(kind, model.parameters())
    train(model, opt, steps=1)
    return model, opt, optimizer_snapshot(opt)


def optimizer_snapshot(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(
        {
            "state": {i: dict(opt.state[p]) for i, p in enumerate(_params(opt)) if opt.state[p]},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        }
    )


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def assert_optimizer_unchanged(opt: torch.optim.Optimizer, before: dict) -> None:
    after = optimizer_snapshot(opt)
    assert after["groups"] == before["groups"]
    assert after["state"].keys() == before["state"].keys()
    for i, st in before["state"].items():
        assert after["state"][i].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(after["state"][i][k], v), (i, k)


def scheduler_snapshot(s) -> dict:
    return copy.deepcopy(
        {
            "state": s.state_dict(),
            "lrs": [g["lr"] for g in s.optimizer.param_groups],
        }
    )


def test_optimizer_and_scheduler_files_get_the_checks_weights_get(tmp_path, monkeypatch):
    from surgery.sources import torchformat

    old_model, old_opt, _ = trained_pair()
    old_sched = torch.optim.lr_scheduler.StepLR(old_opt, step_size=2)
    old_opt.step()
    old_sched.step()
    path = tmp_path / "last.pth"
    ckpt = {
        "state_dict": old_model.state_dict(),
        "optimizer": old_opt.state_dict(),
        "lr_scheduler": old_sched.state_dict(),
    }
    torch.save(ckpt, path)
    model, opt, _ = trained_pair()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    before, sched_before = optimizer_snapshot(opt), scheduler_snapshot(sched)

    # A pickle record inflating past the bound is refused before torch reads it.
    monkeypatch.setattr(torchformat, "MAX_PICKLE", 64)
    real_load = torch.load

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_load)
    for call in (
        lambda: surgery.restore_optimizer(opt, model, path),
        lambda: surgery.restore_scheduler(sched, path),
    ):
        with pytest.raises(surgery.CheckpointError, match="inflates to") as err:
            call()
        assert str(path) in str(err.value)
    assert_optimizer_unchanged(opt, before)
    assert scheduler_snapshot(sched) == sched_before
    monkeypatch.undo()
    assert torch.load is real_load

    # A named pipe would hang the read: refused by kind.
    fifo = tmp_path / "optimizer.pt"
    os.mkfifo(fifo)
    with pytest.raises(surgery.CheckpointError, match="not a regular file"):
        surgery.restore_optimizer(opt, model, fifo)
    assert_optimizer_unchanged(opt, before)

    # The same file read through sources gives what the dict gives (oracle: torch.load).
    expected = torch.load(path, weights_only=True)
    from_file = surgery.restore_optimizer(opt, model, path)
    opt2 = make_optimizer("sgd", model.parameters())
    from_dict = surgery.restore_optimizer(opt2, model, expected)
    assert from_file.restored == from_dict.restored == [n for n, _ in model.named_parameters()]
    for p, q in zip(_params(opt), _params(opt2), strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    assert surgery.restore_scheduler(sched, path) == 1


def trainer_style_folder(folder: Path, kind: str = "trainer") -> tuple[nn.Module, list[str]]:
    """A folder as transformers' Trainer (or accelerate) writes it: weights, optimizer and
    scheduler files, rng state. The optimizer groups decay / no-decay parameters as Trainer
    does, so its positional order is not the model's; returns the model and that order."""
    torch.manual_seed(0)
    model = SmallCNN()
    named = list(model.named_parameters())
    decay = [(n, p) for n, p in named if p.ndim > 1]
    no_decay = [(n, p) for n, p in named if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [
            {"params": [p for _, p in decay], "weight_decay": 0.01},
            {"params": [p for _, p in no_decay], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
    for _ in range(3):
        train(model, opt, steps=1)
        sched.step()
    folder.mkdir()
    ext = "pt" if kind == "trainer" else "bin"
    torch.save(opt.state_dict(), folder / f"optimizer.{ext}")
    torch.save(sched.state_dict(), folder / f"scheduler.{ext}")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    torch.save(
        {"python": 1}, folder / ("rng_state.pth" if kind == "trainer" else "random_states_0.pkl")
    )
    return model, [n for n, _ in decay + no_decay]


@pytest.mark.parametrize("kind", ["trainer", "accelerate"])
def test_training_folders_give_their_optimizer_and_scheduler_files(tmp_path, kind):
    _, order = trainer_style_folder(tmp_path / "checkpoint-3", kind)
    old_state = torch.load(
        tmp_path / "checkpoint-3" / f"optimizer.{'pt' if kind == 'trainer' else 'bin'}",
        weights_only=True,
    )
    model = SmallCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    report = surgery.restore_optimizer(opt, model, tmp_path / "checkpoint-3", names=order)
    assert report.source.endswith(("optimizer.pt", "optimizer.bin"))
    assert sorted(report.restored) == sorted(order)
    params = dict(model.named_parameters())
    for pos, name in enumerate(order):  # oracle: torch.load of the file, by position
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[params[name]][k], old_state["state"][pos][k])

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
    assert surgery.restore_scheduler(sched, tmp_path / "checkpoint-3") == 3
    ref_opt = torch.optim.AdamW(SmallCNN().parameters(), lr=1e-3)
    ref = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda step: 1 / (1 + step))
    for _ in range(3):
        ref_opt.step()
        ref.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    assert sched.state_dict()["_step_count"] == ref.state_dict()["_step_count"]


def test_training_folder_with_several_candidates_asks_and_lightning_ckpt_is_found(tmp_path):
    old, order = trainer_style_folder(tmp_path / "run")
    model = SmallCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, 1)
    before = optimizer_snapshot(opt)
    lightning = {
        "state_dict": old.state_dict(),
        "optimizer_states": [torch.load(tmp_path / "run" / "optimizer.pt", weights_only=True)],
        "lr_schedulers": [torch.load(tmp_path / "run" / "scheduler.pt", weights_only=True)],
    }
    torch.save(lightning, tmp_path / "run" / "last.ckpt")
    for call in (
        lambda: surgery.restore_optimizer(opt, model, tmp_path / "run", names=order),
        lambda: surgery.restore_scheduler(step_lr, tmp_path / "run"),
    ):
        with pytest.raises(surgery.CheckpointError, match="several") as err:
            call()
        assert "last.ckpt" in str(err.value) and ".pt" in str(err.value)
    assert_optimizer_unchanged(opt, before)

    for name in ("optimizer.pt", "scheduler.pt", "pytorch_model.bin", "rng_state.pth"):
        (tmp_path / "run" / name).unlink()
    report = surgery.restore_optimizer(opt, model, tmp_path / "run", names=order)
    assert report.source.endswith("last.ckpt['optimizer_states']['0']")
    assert len(report.restored) == 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
    assert surgery.restore_scheduler(sched, tmp_path / "run") == 3

    empty = tmp_path / "empty"
    empty.mkdir()
    torch.save(old.state_dict(), empty / "model.safetensors.bak")
    with pytest.raises(surgery.CheckpointError, match="holds no optimizer state") as err:
        surgery.restore_optimizer(opt, model, empty)
    assert str(empty) in str(err.value) and "optimizer.pt" in str(err.value)


def brute_force_embeddings(shapes: list, candidates: list) -> list[tuple[int, ...]]:
    """Every in-order choice of candidates that can own the states (the oracle): the same
    shape, or (factored moments) the same rank with some sizes 1."""

    def owns(c: tuple, s: tuple) -> bool:
        return len(c) == len(s) and all(a in (b, 1) for a, b in zip(s, c, strict=True))

    return [
        c
        for c in itertools.combinations(range(len(candidates)), len(shapes))
        if all(owns(candidates[j], s) for j, s in zip(c, shapes, strict=True))
    ]


def test_positional_alignment_agrees_with_brute_force_and_is_linear(monkeypatch):
    _optim_read = importlib.import_module("surgery._optim_read")
    rng = random.Random(0)
    for _ in range(300):
        m = rng.randint(1, 8)
        n = rng.randint(1, m)
        cands = [(rng.choice([1, 2, 3]),) for _ in range(m)]
        states = [(rng.choice([1, 2, 3]),) for _ in range(n)]
        by_pos = [{"momentum_buffer": torch.zeros(s)} for s in states]
        named = [(f"p{j}", c) for j, c in enumerate(cands)]
        ways = brute_force_embeddings(states, cands)
        if n == m:  # the identity, or a contradiction
            ways = [tuple(range(n))] if ways == [tuple(range(n))] else []
        try:
            found, _ = _optim_read._align(by_pos, named, "names=", "<dict>")
        except surgery.OptimizerStateError as e:
            assert len(ways) != 1, (states, cands)
            assert ("more than one way" in str(e)) == (len(ways) > 1)
        else:
            assert len(ways) == 1 and found == [f"p{j}" for j in ways[0]], (states, cands)

    # 4,000 same-shaped weights for 2,000 positional states: ambiguous, found in linear work.
    calls = []
    fits = _optim_read._fits
    monkeypatch.setattr(_optim_read, "_fits", lambda st, shape: calls.append(1) or fits(st, shape))
    weights = {f"w{i:04d}": torch.zeros(1) for i in range(4000)}
    params = [nn.Parameter(torch.zeros(1)) for _ in range(2000)]
    old_opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones(1)
    old_opt.step()
    model = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in range(2000)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(surgery.OptimizerStateError, match="more than one way"):
        surgery.restore_optimizer(opt, model, {"model": weights, "optimizer": old_opt.state_dict()})
    assert not opt.state
    assert len(calls) <= 3 * (4000 + 2000)


def test_restore_scheduler_reaches_far_steps_in_bounded_time():
    def fresh(make):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5, momentum=0.9)
        return opt, make(opt)

    # A closed form (torch's own, for step(epoch)): set, not replayed.
    opt, sched = fresh(lambda o: torch.optim.lr_scheduler.StepLR(o, 10**6, gamma=0.999))
    assert surgery.restore_scheduler(sched, {"last_epoch": 10**12}) == 10**12
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.999 ** (10**6), rel=1e-12)
    assert sched.last_epoch == 10**12
    # A function of the step alone: set directly, the value replaying gives.
    opt, sched = fresh(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + e)))
    surgery.restore_scheduler(sched, {"last_epoch": 10**9})
    assert opt.param_groups[0]["lr"] == 0.5 * (1 / (1 + 10**9))
    assert sched.state_dict()["_step_count"] == 10**9 + 1
    # Neither, and too far to replay: refused, unchanged.
    opt, sched = fresh(lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda e: 0.99))
    before = scheduler_snapshot(sched)
    with pytest.raises(surgery.UsageError, match="1,000,000"):
        surgery.restore_scheduler(sched, {"last_epoch": 10**12})
    assert scheduler_snapshot(sched) == before
    # The schedule itself refuses the step: unchanged, momentum included.
    opt, sched = fresh(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 1.0, total_steps=20))
    before = scheduler_snapshot(sched)
    momentum = opt.param_groups[0]["momentum"]
    with pytest.raises(surgery.UsageError, match="cannot be brought to step 50"):
        surgery.restore_scheduler(sched, {"last_epoch": 50})
    assert scheduler_snapshot(sched) == before
    assert opt.param_groups[0]["momentum"] == momentum


HOSTILE_OPTIMIZER_STATES = {
    "groups are not dicts": lambda: {"state": {}, "param_groups": [1]},
    "params is a number": lambda: {"state": {}, "param_groups": [{"params": 5}]},
    "params holds a bool": lambda: {"state": {}, "param_groups": [{"params": [True]}]},
    "param_names is a number": lambda: {
        "state": {0: {"momentum_buffer": torch.zeros(8, 3, 3, 3)}},
        "param_groups": [{"params": [0], "param_names": 3}],
    },
    "param_names too short": lambda: {
        "state": {},
        "param_groups": [{"params": [0, 1], "param_names": ["conv1.weight"]}],
    },
    "a state is a number": lambda: {"state": {0: 5}, "param_groups": [{"params": [0]}]},
    "a state is a list": lambda: {"state": {0: [1]}, "param_groups": [{"params": [0]}]},
    "a meta tensor": lambda: {
        "state": {"conv1.weight": {"momentum_buffer": torch.empty(8, 3, 3, 3, device="meta")}},
        "param_groups": [{"params": ["conv1.weight"]}],
    },
    "a sparse tensor": lambda: {
        "state": {"fc.bias": {"momentum_buffer": torch.ones(10).to_sparse()}},
        "param_groups": [{"params": ["fc.bias"]}],
    },
    "surgery shapes not a dict": lambda: {
        "format": "surgery.optimizer_state",
        "state": {},
        "param_groups": [{"params": ["fc.bias"]}],
        "shapes": 3,
    },
}


@pytest.mark.parametrize("case", list(HOSTILE_OPTIMIZER_STATES))
def test_hostile_optimizer_state_is_refused_naming_the_file(tmp_path, case):
    path = tmp_path / "opt.pt"
    torch.save({"optimizer": HOSTILE_OPTIMIZER_STATES[case]()}, path)
    model, opt, before = trained_pair()
    with pytest.raises(surgery.CheckpointError) as err:
        surgery.restore_optimizer(opt, model, path)
    msg = str(err.value)
    assert str(path) in msg and "save the optimizer state again" in msg
    assert_optimizer_unchanged(opt, before)


@pytest.mark.parametrize(
    "value", ["abc", float("nan"), float("inf"), None, -3, True, 2**60, 2.5, [1]]
)
def test_hostile_last_epoch_is_refused_naming_the_file(tmp_path, value):
    path = tmp_path / "scheduler.pt"
    torch.save({"last_epoch": value, "_step_count": 1}, path)
    _, opt, _ = trained_pair()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    before = scheduler_snapshot(sched)
    with pytest.raises(surgery.CheckpointError, match="not a step count") as err:
        surgery.restore_scheduler(sched, path)
    assert str(path) in str(err.value)
    assert scheduler_snapshot(sched) == before
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    for bad in ({"last_epoch": 3, "best": "abc"}, {"last_epoch": 3, "num_bad_epochs": -1}):
        with pytest.raises(surgery.CheckpointError, match="ReduceLROnPlateau"):
            surgery.restore_scheduler(plateau, bad)
    assert (plateau.best, plateau.num_bad_epochs, plateau.last_epoch) == (float("inf"), 0, 0)
    with pytest.raises(surgery.UsageError, match="scheduler="):
        surgery.restore_scheduler("x", {"last_epoch": 3})
