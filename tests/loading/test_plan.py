"""The load plan: public data that can be reviewed, edited, saved and applied."""

from __future__ import annotations

import html
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery import (
    KeyCollisionError,
    LoadError,
    LoadPlan,
    PlanEntry,
    SelectorError,
    SurgeryError,
    UsageError,
)
from surgery.checkpoint import CheckpointSource

from support import SmallCNN, Tied, assert_same_state, snapshot

HEAD = ("fc.weight", "fc.bias")


def _r18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def _state_equal(a: nn.Module, b: nn.Module) -> None:
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        assert torch.equal(v, sb[k]), k


# --------------------------------------------------------------------------- the data


def test_plan_has_one_entry_per_key_with_actions_shapes_and_dtypes(r18_path):
    model = _r18()
    plan = surgery.plan_load(model, r18_path)
    assert plan.counts() == {"load": 120, "mismatch": 2}
    assert len(plan) == len(model.state_dict())
    fc = {e.model_key: e for e in plan.find(action="mismatch")}
    e = fc["fc.weight"]
    assert (e.ckpt_key, e.ckpt_shape, e.model_shape) == ("fc.weight", (1000, 512), (10, 512))
    assert (e.ckpt_dtype, e.model_dtype) == ("float32", "float32")
    assert plan.model == "ResNet" and plan.path == str(Path(r18_path))
    assert (plan.strict, plan.on_mismatch, plan.prefix) == (False, "skip", None)
    assert "mismatch" in str(plan) and "fc.weight" in str(plan)
    assert "120 load, 2 mismatch" in repr(plan)


def test_every_action_appears_where_it_should(tmp_path):
    src = SmallCNN()
    sd = {"enc." + k: v for k, v in src.state_dict().items() if k != "conv2.bias"}
    sd["enc.conv1.weight"] = sd["enc.conv1.weight"].half()
    sd["enc.fc.weight"] = torch.zeros(3, 16)
    sd["enc.aux.weight"] = torch.zeros(2)
    sd["enc.drop.weight"] = torch.zeros(2)
    del sd["enc.bn1.num_batches_tracked"]
    model = SmallCNN()
    plan = surgery.plan_load(
        model,
        sd,
        remap=[(r"^enc\.drop\.", None), (r"^enc\.", "")],
        skip="bn2",
        on_mismatch=lambda k, c, m: None,
    )
    by = {e.key: e.action for e in plan}
    assert by["conv1.weight"] == "cast"
    assert by["conv1.bias"] == "load"
    assert by["fc.weight"] == "adapt"
    assert by["bn2.weight"] == by["bn2.running_mean"] == "skip"
    assert by["enc.drop.weight"] == "skip"  # dropped by remap: a checkpoint key
    assert by["conv2.bias"] == "missing"
    assert by["aux.weight"] == "unexpected"
    assert by["bn1.num_batches_tracked"] == "defaulted"
    with surgery.empty_init():
        meta_model = SmallCNN()
    meta_plan = surgery.plan_load(meta_model, {k: v for k, v in src.state_dict().items()})
    assert meta_plan.counts() == {"load": len(src.state_dict())}
    part = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    meta_plan = surgery.plan_load(meta_model, part)
    assert {e.key for e in meta_plan.find(action="initialise")} == set(HEAD)


def test_tied_aliases_are_planned_with_their_partner_and_reported_loaded():
    src = Tied()
    model = Tied()
    plan = surgery.plan_load(model, {"embed.weight": src.embed.weight.detach()})
    alias = next(e for e in plan if e.model_key == "out.weight")
    assert (alias.action, alias.ckpt_key, alias.tied_to) == ("load", "embed.weight", "embed.weight")
    report = plan.apply(model)
    assert sorted(report.loaded) == ["embed.weight", "out.weight"]
    assert report.ok and report.tensors_loaded == report.tensors_total == 1
    assert torch.equal(model.out.weight, src.embed.weight)


# --------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_json_round_trip_applies_like_load_partial(tmp_path, r18_imagenet, fmt):
    path = tmp_path / f"r18.{fmt}"
    if fmt == "pth":
        torch.save(
            {"epoch": 3, "state_dict": {"module." + k: v for k, v in r18_imagenet.items()}}, path
        )
    else:
        save_file({k: v.half() for k, v in r18_imagenet.items()}, str(path))
    torch.manual_seed(1)
    model = _r18()
    torch.manual_seed(1)
    reference = _r18()
    plan = surgery.plan_load(model, path, skip="fc")
    text = json.dumps(plan.to_dict())
    back = LoadPlan.from_dict(json.loads(text))
    assert back == plan  # the data survives; checkpoint/adapter objects are not saved
    assert back.checkpoint is None and back.path == str(path)
    report = back.apply(model)
    expected = surgery.load_partial(reference, path, skip="fc")
    _state_equal(model, reference)
    assert report.to_dict() == expected.to_dict()
    assert report.ok and sorted(report.skipped) == sorted(HEAD)


def test_json_plan_of_an_in_memory_checkpoint_needs_ckpt():
    src = SmallCNN()
    sd = src.state_dict()
    plan = LoadPlan.from_dict(json.loads(json.dumps(surgery.plan_load(SmallCNN(), sd).to_dict())))
    model = SmallCNN()
    with pytest.raises(UsageError, match="pass ckpt="):
        plan.apply(model)
    assert plan.apply(model, sd).ok
    _state_equal(model, src)


def test_json_plan_with_adapter_needs_it_again(r18_path, r18_imagenet):
    def first_ten(name, c, m):
        return c[: m.shape[0]]

    plan = surgery.plan_load(_r18(), r18_path, on_mismatch=first_ten)
    assert plan.on_mismatch == "first_ten"
    back = LoadPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    model = _r18()
    snap = snapshot(model)
    with pytest.raises(UsageError, match="on_mismatch=first_ten"):
        back.apply(model)
    assert_same_state(model, snap)
    report = back.apply(model, on_mismatch=first_ten)
    assert {m.key for m in report.adapted} == set(HEAD)
    assert torch.equal(model.fc.weight, r18_imagenet["fc.weight"][:10])


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"entries": "x"},
        {"entries": [{"action": "teleport", "model_key": "a"}]},
        {"entries": [{"action": "load", "model_key": 3}]},
        {"entries": [{"action": "load", "model_key": "a", "ckpt_shape": "12"}]},
        {"entries": [], "format": 99},
        {"entries": [], "prefix": "module."},
    ],
)
def test_malformed_plan_dicts_are_usage_errors(bad):
    with pytest.raises(UsageError):
        LoadPlan.from_dict(bad)


# --------------------------------------------------------------------------- editing


def test_dropping_entries_changes_what_apply_loads(r18_path, r18_imagenet):
    model = _r18()
    before = snapshot(model)
    plan = surgery.plan_load(model, r18_path)
    plan.drop("layer1", action="load").drop(action="mismatch")
    assert {e.action for e in plan.find("layer1")} == {"skip"}
    report = plan.apply(model)
    state = model.state_dict()
    for k, v in r18_imagenet.items():
        if k.startswith("layer1."):
            assert torch.equal(state[k], before[k]), k  # left as initialised
        elif k not in HEAD:
            assert torch.equal(state[k], v), k
    assert report.ok  # dropped on purpose, like skip=
    assert "layer1.0.conv1.weight" in report.skipped and "fc.weight" in report.skipped


def test_rename_turns_unexpected_and_missing_into_a_load():
    src = SmallCNN()
    sd = src.state_dict()
    sd["classifier.weight"] = sd.pop("fc.weight")
    model = SmallCNN()
    plan = surgery.plan_load(model, sd)
    assert [e.key for e in plan.find(action="unexpected")] == ["classifier.weight"]
    assert [e.key for e in plan.find(action="missing")] == ["fc.weight"]
    report0 = surgery.load_partial(SmallCNN(), sd, dry_run=True)
    assert not report0.ok
    plan.rename("classifier.weight", "fc.weight")
    assert not plan.find(action=("unexpected", "missing"))
    report = plan.apply(model)
    assert report.ok and report.renamed["classifier.weight"] == "fc.weight"
    assert torch.equal(model.fc.weight, src.fc.weight)


def test_rename_onto_a_paired_key_leaves_the_old_tensor_unexpected():
    src = SmallCNN()
    sd = src.state_dict()
    sd["other.bias"] = torch.full((10,), 7.0)
    model = SmallCNN()
    plan = surgery.plan_load(model, sd).rename("other.bias", "fc.bias")
    assert [e.ckpt_key for e in plan.find(action="unexpected")] == ["fc.bias"]
    report = plan.apply(model)
    assert torch.equal(model.fc.bias, torch.full((10,), 7.0))
    assert report.unexpected == ["fc.bias"] and not report.ok


def test_rename_names_the_closest_keys():
    plan = surgery.plan_load(SmallCNN(), SmallCNN())
    with pytest.raises(UsageError, match="Closest: fc.weight"):
        plan.rename("fc.weight", "fc.wieght")
    with pytest.raises(UsageError, match="checkpoint key 'nope'"):
        plan.rename("nope", "fc.weight")


def test_check_refuses_edits_that_do_not_fit():
    model = SmallCNN()
    plan = surgery.plan_load(model, SmallCNN())
    i = next(i for i, e in enumerate(plan.entries) if e.model_key == "fc.bias")
    plan.entries[i].ckpt_shape = (3,)
    snap = snapshot(model)
    with pytest.raises(LoadError, match=r"fc.bias: checkpoint 'fc.bias' \(3,\) vs model \(10,\)"):
        plan.apply(model)
    assert_same_state(model, snap)

    plan = surgery.plan_load(model, SmallCNN())
    plan.entries.append(PlanEntry("load", "fc.bias", "fc.bias", (10,), (10,), "float32", "float32"))
    with pytest.raises(KeyCollisionError, match="two entries for model key 'fc.bias'"):
        plan.check(model)

    plan = surgery.plan_load(model, SmallCNN())
    with pytest.raises(LoadError, match="SmallCNN has but Linear does not: conv1.weight"):
        plan.check(SmallCNN(num_classes=3).fc)  # another model: its keys are 'weight', 'bias'

    plan = surgery.plan_load(model, SmallCNN())
    plan.entries = [e for e in plan.entries if e.model_key != "fc.weight"]
    checked = plan.check(model)  # a model key without an entry gets nothing: missing
    assert [e.key for e in checked.find(action="missing")] == ["fc.weight"]
    assert len(plan) == len(checked) - 1  # check() returns a new plan
    plan.strict = True
    with pytest.raises(LoadError, match="strict=True"):
        plan.check(model)


def test_apply_refuses_a_checkpoint_that_changed_since_planning(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(SmallCNN().state_dict(), str(path))
    model = SmallCNN()
    plan = surgery.plan_load(model, path)
    save_file(SmallCNN(num_classes=4).state_dict(), str(path))
    snap = snapshot(model)
    with pytest.raises(LoadError, match=r"'fc.weight': planned \(10, 16\) float32"):
        plan.apply(model)
    assert_same_state(model, snap)


# --------------------------------------------------------------------------- no reads when planning


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "dict"])
def test_plan_load_reads_no_tensor_bytes(monkeypatch, tmp_path, r18_imagenet, fmt):
    import surgery.sources.filebytes as fb

    reads: list[str] = []

    def spy(name):
        def f(*args, **kwargs):
            reads.append(name)
            raise AssertionError(f"{name} called while planning")

        return f

    if fmt == "pth":
        path = tmp_path / "r18.pth"
        torch.save(r18_imagenet, path)
        ckpt = path
    elif fmt == "safetensors":
        path = tmp_path / "r18.safetensors"
        save_file(r18_imagenet, str(path))
        ckpt = path
    else:
        ckpt = r18_imagenet
    calls = []
    monkeypatch.setattr(CheckpointSource, "read", spy("read"))
    monkeypatch.setattr(CheckpointSource, "read_into", spy("read_into"))
    monkeypatch.setattr(fb, "_readinto_at", spy("_readinto_at"))  # the file-offset reader
    plan = surgery.plan_load(_r18(), ckpt, on_mismatch=lambda *a: calls.append(a))
    dry = surgery.load_partial(_r18(), ckpt, on_mismatch=lambda *a: calls.append(a), dry_run=True)
    assert reads == [] and calls == []  # neither reads nor adapters while planning
    assert plan.counts() == {"load": 120, "adapt": 2}
    assert {m.key for m in dry.adapted} == set(HEAD)  # reported as would-adapt


def test_apply_reads_only_the_tensors_it_loads(monkeypatch, r18_path):
    read: list[str] = []
    orig = CheckpointSource.read_into

    def spy(self, key, out):
        read.append(key)
        return orig(self, key, out)

    model = _r18()
    plan = surgery.plan_load(model, r18_path).drop("layer4")
    monkeypatch.setattr(CheckpointSource, "read_into", spy)
    plan.apply(model)
    assert len(read) == 120 - 30 and not any(k.startswith(("layer4", "fc")) for k in read)


# --------------------------------------------------------------------------- adapters at apply


def test_adapters_run_at_apply_and_a_failing_one_changes_nothing(r18_path):
    seen: list[str] = []

    def fails_on_bias(name, c, m):
        seen.append(name)
        if name.endswith("bias"):
            raise ValueError("cannot adapt a bias")
        return c[: m.shape[0]]

    model = _r18()
    snap = snapshot(model)
    plan = surgery.plan_load(model, r18_path, on_mismatch=fails_on_bias)
    assert seen == []
    with pytest.raises(LoadError, match=r"raised ValueError for 'fc.bias'.*cannot adapt a bias"):
        plan.apply(model)
    assert seen == ["fc.weight", "fc.bias"]
    assert_same_state(model, snap)  # bit-identical: adapters run before the first write

    with pytest.raises(LoadError, match="adapter returned"):
        surgery.load_partial(model, r18_path, on_mismatch=lambda n, c, m: c[:3])
    assert_same_state(model, snap)


def test_adapter_returning_none_is_a_mismatch_and_strict_refuses_it(r18_path):
    model = _r18()
    snap = snapshot(model)
    report = surgery.load_partial(model, r18_path, on_mismatch=lambda n, c, m: None)
    assert {m.key for m in report.mismatched} == set(HEAD) and not report.adapted
    assert not report.ok
    model = _r18()
    snap = snapshot(model)
    with pytest.raises(LoadError, match="strict=True"):
        surgery.load_partial(model, r18_path, on_mismatch=lambda n, c, m: None, strict=True)
    assert_same_state(model, snap)


# --------------------------------------------------------------------------- selectors


def test_skip_pattern_matching_nothing_names_the_closest_keys():
    model = SmallCNN()
    with pytest.raises(SelectorError, match=r"'fcc\.\*' matched nothing in SmallCNN.*fc") as e:
        surgery.plan_load(model, SmallCNN(), skip="fcc.*")
    assert "Closest names:" in str(e.value)
    with pytest.raises(SelectorError):
        surgery.load_partial(model, SmallCNN(), skip=["fc", "bn9"])


def test_skip_takes_module_types_and_callables():
    src = SmallCNN()
    model = SmallCNN()
    before = snapshot(model)
    report = surgery.load_partial(model, src, skip=[nn.Linear])
    assert sorted(report.skipped) == sorted(HEAD) and report.ok
    assert torch.equal(model.fc.weight, before["fc.weight"])
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    report = surgery.load_partial(SmallCNN(), src, skip=lambda n, m: n.startswith("bn"))
    assert len(report.skipped) == 10


# --------------------------------------------------------------------------- ok == strict


def _case(name: str):
    """(model, checkpoint, kwargs) for one load situation."""
    torch.manual_seed(0)
    src = SmallCNN()
    sd = dict(src.state_dict())
    model = SmallCNN()
    kw: dict = {}
    if name == "exact":
        pass
    elif name == "missing":
        del sd["conv2.bias"]
    elif name == "unexpected":
        sd["aux.weight"] = torch.zeros(2)
    elif name == "mismatch":
        model = SmallCNN(num_classes=3)
    elif name == "skipped_head":
        model = SmallCNN(num_classes=3)
        kw["skip"] = "fc"
    elif name == "defaulted":
        sd = {k: v for k, v in sd.items() if "num_batches_tracked" not in k}
    elif name == "prefix":
        sd = {"module." + k: v for k, v in sd.items()}
    elif name == "adapted":
        model = SmallCNN(num_classes=3)
        kw["on_mismatch"] = lambda n, c, m: c[: m.shape[0]]
    elif name == "adapter_declines":
        model = SmallCNN(num_classes=3)
        kw["on_mismatch"] = lambda n, c, m: None
    elif name == "meta_initialised":
        with surgery.empty_init():
            model = SmallCNN()
        del sd["fc.bias"]
    elif name == "meta_full":
        with surgery.empty_init():
            model = SmallCNN()
    elif name == "remap_dropped":
        sd["aux.weight"] = torch.zeros(2)
        kw["remap"] = {"aux.weight": None}
    elif name == "cast":
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    elif name == "tied":
        model, sd = Tied(), {"embed.weight": Tied().embed.weight.detach()}
    elif name == "unexpected_and_skipped":
        sd["aux.weight"] = torch.zeros(2)
        kw["skip"] = "fc"
    else:
        raise AssertionError(name)
    return model, sd, kw


CASES = {
    "exact": True,
    "missing": False,
    "unexpected": False,
    "mismatch": False,
    "skipped_head": True,
    "defaulted": True,
    "prefix": True,
    "adapted": True,
    "adapter_declines": False,
    "meta_initialised": False,
    "meta_full": True,
    "remap_dropped": True,
    "cast": True,
    "tied": True,
    "unexpected_and_skipped": False,
}


@pytest.mark.parametrize(("name", "ok"), list(CASES.items()))
def test_report_ok_agrees_with_strict(name, ok):
    model, sd, kw = _case(name)
    report = surgery.load_partial(model, sd, dry_run=True, **kw)
    if name != "adapter_declines":  # a dry run does not run adapters
        assert report.ok is ok
    model, sd, kw = _case(name)
    report = surgery.load_partial(model, sd, **kw)
    assert report.ok is ok
    model, sd, kw = _case(name)
    snap = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
    if ok:
        surgery.load_partial(model, sd, strict=True, **kw)
    else:
        with pytest.raises(LoadError, match="strict=True"):
            surgery.load_partial(model, sd, strict=True, **kw)
        state = model.state_dict()
        for k, v in snap.items():
            assert torch.equal(state[k], v), k


def test_report_speaks_torch_and_fvcore_and_says_why_not_ok(r18_path):
    report = surgery.load_partial(_r18(), r18_path)
    assert report.missing_keys == report.missing == []
    assert report.unexpected_keys == report.unexpected == []
    assert report.incorrect_shapes == [
        ("fc.weight", (1000, 512), (10, 512)),
        ("fc.bias", (1000,), (10,)),
    ]
    line = "2 tensors not loaded: fc.weight, fc.bias (mismatched); pass skip='fc.*' if intended"
    assert report.why_not_ok() == line
    assert line in repr(report) and "ok=False" in repr(report)
    assert html.escape(line) in report._repr_html_()
    sd = dict(SmallCNN().state_dict())
    sd["aux.weight"] = torch.zeros(2)
    report = surgery.load_partial(SmallCNN(), sd)
    assert "1 unexpected checkpoint key: aux.weight" in repr(report)
    assert "remap=[(r'^aux\\.', None)]" in repr(report)
    ok = surgery.load_partial(SmallCNN(), SmallCNN())
    assert repr(ok).endswith("ok=True>") and ok.why_not_ok() == ""


def test_assert_loaded_allow_patterns_resolve_like_every_selector(r18_path):
    report = surgery.load_partial(_r18(), r18_path)
    assert report.assert_loaded(allow_missing="fc") is report
    assert report.assert_loaded(allow_missing=["fc", "layer1"]) is report  # layer1 loaded: fine
    assert report.assert_loaded(allow_missing="re:fc\\..*") is report
    with pytest.raises(SelectorError, match="Closest names: fc.weight"):
        report.assert_loaded(allow_missing="fc.wieght")  # matches no key of the model: a typo
    with pytest.raises(LoadError, match="fc.bias"):
        report.assert_loaded(allow_missing="fc.weight")


# --------------------------------------------------------------------------- errors and arguments


def test_load_error_is_a_runtime_error_and_collision_a_load_error():
    assert issubclass(LoadError, RuntimeError) and issubclass(LoadError, SurgeryError)
    assert issubclass(KeyCollisionError, LoadError)
    with pytest.raises(RuntimeError):
        surgery.load_partial(SmallCNN(num_classes=3), SmallCNN(), strict=True)


def test_key_is_deprecated_for_entry():
    src = SmallCNN()
    ckpt = {"ema": src.state_dict(), "model": SmallCNN().state_dict()}
    model = SmallCNN()
    with pytest.warns(DeprecationWarning, match="entry="):
        surgery.load_partial(model, ckpt, key="ema")
    assert torch.equal(model.fc.weight, src.fc.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = SmallCNN()
        surgery.load_partial(model, ckpt, entry="ema")
        assert torch.equal(model.fc.weight, src.fc.weight)
        assert surgery.plan_load(model, ckpt, entry="ema").entry == "ema"
    with pytest.raises(UsageError, match="not both"), pytest.warns(DeprecationWarning):
        surgery.load_partial(model, ckpt, key="ema", entry="ema")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model": "not a model"},
        {"model": None},
        {"remap": 42},
        {"remap": [("a",)]},
        {"remap": lambda k: 3},
        {"remap": lambda k: k.nope},
        {"remap": [(3, "a")]},
        {"remap": [("conv", 3)]},
        {"remap": {"conv1.weight": 3}},
        {"on_mismatch": "pad"},
        {"on_mismatch": 3},
        {"on_mismatch": nn.Linear},
        {"entry": 5},
        {"entry": ["a"]},
        {"prefix": "module."},
        {"prefix": ["auto"]},
        {"skip": 3},
        {"skip": [3]},
        {"skip": [int]},
        {"strict": "yes"},
        {"trust_pickle": 1},
        {"dry_run": "no"},
    ],
)
def test_no_bare_python_error_escapes_for_bad_arguments(kwargs):
    kwargs = dict(kwargs)
    model = kwargs.pop("model", SmallCNN())
    fns = [surgery.load_partial]
    if "dry_run" not in kwargs:
        fns.append(surgery.plan_load)
    for fn in fns:
        with pytest.raises(SurgeryError) as e:
            fn(model, SmallCNN().state_dict(), **kwargs)
        assert type(e.value) is not SurgeryError  # a specific subclass, with a message
        assert str(e.value)


def test_skip_int_is_a_usage_error():
    with pytest.raises(UsageError):
        surgery.plan_load(SmallCNN(), SmallCNN(), skip=3)


def test_apply_plan_arguments():
    model = SmallCNN()
    plan = surgery.plan_load(model, SmallCNN())
    with pytest.raises(UsageError, match="needs a LoadPlan"):
        surgery.apply_plan(model, plan.to_dict())
    with pytest.raises(UsageError, match="nn.Module"):
        surgery.apply_plan("model", plan)
    with pytest.raises(UsageError, match="on_mismatch"):
        surgery.apply_plan(model, plan, on_mismatch="skip")
    with pytest.raises(UsageError, match="unknown action"):
        plan.find(action="copy")
    with pytest.raises(UsageError, match="needs key patterns"):
        plan.drop()
    assert surgery.apply_plan(model, plan).ok


def test_meta_model_from_a_saved_plan_is_initialised(tmp_path):
    src = SmallCNN()
    path = tmp_path / "cnn.safetensors"
    save_file({k: v for k, v in src.state_dict().items() if k != "fc.bias"}, str(path))
    plan = LoadPlan.from_dict(json.loads(json.dumps(surgery.plan_load(SmallCNN(), path).to_dict())))
    assert [e.key for e in plan.find(action="missing")] == ["fc.bias"]
    with surgery.empty_init():
        model = SmallCNN()
    report = plan.apply(model)  # re-checked against the meta model: initialise, not missing
    assert report.initialised == ["fc.bias"] and report.missing == ["fc.bias"]
    assert not any(t.is_meta for t in model.state_dict().values())
    assert torch.equal(model.fc.weight, src.fc.weight)


# --------------------------------------------------------------------------- docs


def test_docs_plan_review_apply_example_runs(tmp_path, monkeypatch, r18_imagenet, capsys):
    page = (Path(__file__).parents[2] / "docs" / "plan.md").read_text()
    section = page.split("# Plan, review, apply", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.save(r18_imagenet, tmp_path / "resnet18.pth")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/plan.md", "exec"), {})
    out = capsys.readouterr().out
    assert "mismatch" in out and "fc.weight" in out
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert sum(e["action"] == "skip" for e in saved["entries"]) == 2


def test_plan_file_cannot_grant_itself_trust_pickle():
    """A plan JSON is data from elsewhere: from_dict ignores its trust_pickle unless passed."""
    d = surgery.plan_load(SmallCNN(), SmallCNN(), trust_pickle=True).to_dict()
    assert d["trust_pickle"] is True
    assert surgery.LoadPlan.from_dict(d).trust_pickle is False
    assert surgery.LoadPlan.from_dict(d, trust_pickle=True).trust_pickle is True
