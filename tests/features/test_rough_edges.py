"""The rough edges a newcomer hit (issue 24), each reproduced and checked against an oracle:
plain torch for values, the message a user needs for text."""

from __future__ import annotations

import json
import pickle
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from timm.models import adapt_input_conv
from torch import nn

import surgery

from support import assert_load_refused, run_cli, save_as

# --------------------------------------------------------------------------- verify


def _tiny_vit() -> torchvision.models.VisionTransformer:
    # torchvision's ViT zero-initialises its head: every output is 0 whatever the body holds
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16
    )


def test_verify_flags_outputs_that_carry_no_information():
    torch.manual_seed(0)
    src, model = _tiny_vit(), _tiny_vit()  # the model's body never loaded the source's
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = src.eval()(x), model.eval()(x)
    assert torch.equal(a, torch.zeros(2, 1000)) and torch.equal(b, a)  # the oracle: all zeros
    with pytest.warns(UserWarning, match="both outputs are constant") as caught:
        d = surgery.verify(src, model, x)
    assert len(caught) == 1
    assert d == 0.0 and isinstance(d, float)  # compares as the old float did
    assert not d.informative and d.constant == ("source", "model")
    assert "outputs are constant" in repr(d) and "says nothing" in str(d)
    assert f"{d:.1e}" == "0.0e+00"  # a format spec still formats the number
    assert pickle.loads(pickle.dumps(d)) == d and not pickle.loads(pickle.dumps(d)).informative
    # features before the head do depend on the body: compared there, the models differ
    src.heads, model.heads = nn.Identity(), nn.Identity()
    with torch.no_grad():
        want = (src(x).double() - model(x).double()).abs().max().item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = surgery.verify(src, model, x)
    assert d == pytest.approx(want) and d > 0.01 and d.informative and d.constant == ()
    assert repr(d) == repr(float(d))


def test_verify_one_constant_side_is_named():
    torch.manual_seed(0)
    src = nn.Linear(4, 3)
    model = nn.Linear(4, 3)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    x = torch.randn(5, 4)
    with torch.no_grad():
        want = src(x).abs().max().item()
    with pytest.warns(UserWarning, match="the model's output is constant"):
        d = surgery.verify(src, model, x)
    assert d == pytest.approx(want) and d.constant == ("model",)


# --------------------------------------------------------------------------- compiled models


def _frozen(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def _groups(groups: list[dict]) -> list[tuple[str, float, float, list[int]]]:
    """Group name, lr, decay and the parameters by their position in the model."""
    return [(g["name"], g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in groups]


def test_selectors_see_the_names_written_in_a_compiled_model():
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10)
    compiled = torch.compile(torchvision.models.resnet18(num_classes=10))
    assert {n.removeprefix("_orig_mod.") for n, _ in compiled.named_parameters()} == {
        n for n, _ in plain.named_parameters()
    }
    # the oracle: the same call on the model as written (torch's own names, no wrapper)
    for fn, args in (
        (surgery.freeze, ("layer1", "bn1")),
        (surgery.unfreeze, ("layer1.0",)),
        (surgery.freeze_except, ("fc", nn.BatchNorm2d)),
        (surgery.freeze, (lambda name, m: name == "layer4",)),
    ):
        want, got = fn(plain, *args), fn(compiled, *args)
        assert got.model_name == "ResNet" and str(got) == str(want)
        assert [n.removeprefix("_orig_mod.") for n in _frozen(compiled)] == _frozen(plain)
    assert str(surgery.trainable_summary(compiled)) == str(surgery.trainable_summary(plain))

    surgery.unfreeze(plain, "*"), surgery.unfreeze(compiled, "*")
    pos = {id(p): i for i, p in enumerate(plain.parameters())}
    cpos = {id(p): i for i, p in enumerate(compiled.parameters())}
    kw = dict(lr=1.0, weight_decay=0.1, rules=[("fc", {"lr": 3.0})], layer_decay=0.5)
    want = [(n, lr, wd, [pos[i] for i in ps]) for n, lr, wd, ps in _groups(
        surgery.param_groups(plain, **kw))]  # fmt: skip
    got = [(n, lr, wd, [cpos[i] for i in ps]) for n, lr, wd, ps in _groups(
        surgery.param_groups(compiled, **kw))]  # fmt: skip
    assert got == want and len({lr for _, lr, _, _ in got}) > 3  # layer decay took effect

    surgery.freeze_except(compiled, "fc")
    opt = torch.optim.SGD(surgery.param_groups(compiled, lr=0.1))
    surgery.unfreeze(compiled, "layer4")
    assert surgery.add_param_groups(opt, compiled, "layer4", lr=0.01) == ["layer4"]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {
        id(p) for p in compiled._orig_mod.layer4.parameters()
    }

    with pytest.raises(surgery.SelectorError) as e:
        surgery.freeze(compiled, "layer5")
    assert "in ResNet. Closest names: layer4" in str(e.value) and "_orig_mod" not in str(e.value)
    assert "Top-level modules: conv1, bn1, relu, maxpool, layer1" in str(e.value)


def test_a_compiled_submodule_and_load_skip_use_the_written_names(tmp_path, r18_imagenet):
    torch.manual_seed(0)
    outer = nn.Sequential()
    outer.add_module("backbone", torch.compile(torchvision.models.resnet18(num_classes=10)))
    surgery.freeze(outer, "backbone.layer1")
    inner = outer.backbone._orig_mod.layer1
    want = ["backbone._orig_mod." + n for n, _ in inner.named_parameters(prefix="layer1")]
    assert _frozen(outer) == want
    # load_partial(skip=...) into a compiled model: the oracle is torch's load of the rest
    path = tmp_path / "r18.pth"
    torch.save(r18_imagenet, path)
    compiled = torch.compile(torchvision.models.resnet18(num_classes=10))
    report = surgery.load_partial(compiled, str(path), skip="fc")
    assert report.ok and report.skipped == ["_orig_mod.fc.weight", "_orig_mod.fc.bias"]
    oracle = torchvision.models.resnet18(num_classes=10)
    oracle.load_state_dict({k: v for k, v in r18_imagenet.items() if not k.startswith("fc.")},
                           strict=False)  # fmt: skip
    for k, v in oracle.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(compiled._orig_mod.state_dict()[k], v), k
    report.assert_loaded(allow_missing=["fc"])


# --------------------------------------------------------------------------- pickled classes

NET_MODULE = """
import torch
from torch import nn


class EdgeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
"""


def _refused(path, model: nn.Module) -> str:
    """The message of a trusted load that cannot find a class; the model left as it was."""
    return str(assert_load_refused(model, path, error=surgery.CheckpointError, trust_pickle=True))


def test_a_pickled_model_whose_class_is_not_importable_says_how_to_make_it(tmp_path, monkeypatch):
    pkg = tmp_path / "code" / "edgepkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NET_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    from edgepkg import nets

    torch.manual_seed(0)
    torch.save(nets.EdgeNet(), tmp_path / "whole.pt")
    for name in ("edgepkg.nets", "edgepkg"):
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "code")])

    model = nn.Sequential()
    model.add_module("fc", nn.Linear(4, 3))
    msg = _refused(tmp_path / "whole.pt", model)
    assert "Python cannot find the module 'edgepkg.nets' (edgepkg.nets.EdgeNet)" in msg
    assert "edgepkg/nets.py" in msg and "sys.path.insert(0, " in msg
    assert "torch.save(torch.load(path, weights_only=False).state_dict(), " in msg
    # done as it says, the load works: the oracle is torch.load of the whole model
    sys.path.insert(0, str(tmp_path / "code"))
    report = surgery.load_partial(model, tmp_path / "whole.pt", trust_pickle=True)
    oracle = torch.load(tmp_path / "whole.pt", weights_only=False).state_dict()
    assert report.ok and all(torch.equal(model.state_dict()[k], v) for k, v in oracle.items())

    # the module imports but lost the class (renamed since): say that, not "install it"
    monkeypatch.delattr(sys.modules["edgepkg.nets"], "EdgeNet")
    msg = _refused(tmp_path / "whole.pt", model)
    assert "module 'edgepkg.nets' imports but has no class 'EdgeNet'" in msg
    assert "edgepkg.nets.EdgeNet = " in msg


def test_a_pickled_model_from_a_script_says_to_define_the_class_where_it_loads(
    tmp_path, monkeypatch
):
    namespace: dict = {}
    exec(NET_MODULE, namespace)  # a training script's class: pickled as __main__.EdgeNet
    cls = namespace["EdgeNet"]
    cls.__module__ = "__main__"
    with monkeypatch.context() as m:
        m.setattr(sys.modules["__main__"], "EdgeNet", cls, raising=False)
        torch.save(cls(), tmp_path / "whole.pt")
    msg = _refused(tmp_path / "whole.pt", nn.Linear(4, 3))
    assert "__main__.EdgeNet" in msg and "defined EdgeNet itself" in msg
    assert "from train import EdgeNet" in msg


# --------------------------------------------------------------------------- key hints


def _half_prefixed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint merged by hand: every other key under DDP's ``module.``."""
    return {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(sd.items())}


def test_half_the_keys_under_module_get_the_one_remap_rule(tmp_path, r18_imagenet, capsys):
    path = tmp_path / "half.pth"
    torch.save(_half_prefixed(r18_imagenet), path)
    rule = 'remap=[(r"^module\\.", "")]'
    report = surgery.load_partial(torchvision.models.resnet18(), path)
    why = report.why_not_ok()
    assert not report.ok and why.startswith("61 unexpected checkpoint keys line up with ")
    assert f"after {rule} (e.g. 'module.bn1.weight' -> 'bn1.weight')" in why
    assert "skip=" not in why and "None" not in why  # no skips, no drops
    assert rule in repr(report) and rule in report._repr_html_().replace("&quot;", '"')
    model = torchvision.models.resnet18()
    with pytest.raises(surgery.LoadError) as e:
        surgery.load_partial(model, path, strict=True)
    assert "61 of the 61 checkpoint keys that name no model key line up" in str(e.value)
    assert f"after {rule}" in str(e.value) and "look like" not in str(e.value)
    # the rule it names loads everything: the oracle is torch's load of the clean state dict
    report = surgery.load_partial(model, path, remap=[(r"^module\.", "")], strict=True)
    oracle = torchvision.models.resnet18()
    oracle.load_state_dict(r18_imagenet)
    assert report.ok
    assert all(torch.equal(model.state_dict()[k], v) for k, v in oracle.state_dict().items())

    argv = ("diff", str(path), "--model", "torchvision:resnet18")
    res = run_cli(capsys, *argv)
    assert res.code == 1 and "--remap '^module\\.='" in res.out
    assert "remap=" not in res.out and "--skip" not in res.out and "--drop" not in res.out
    assert run_cli(capsys, *argv, "--remap", "^module\\.=").code == 0


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, width), nn.Linear(width, width))


def _refused_load(model: nn.Module, path, **kw) -> str:
    return str(assert_load_refused(model, path, error=surgery.LoadError, **kw))


def test_names_that_match_with_other_shapes_say_so(tmp_path):
    torch.manual_seed(0)
    small = _mlp(8).state_dict()
    big = _mlp(16)
    # the oracle for the shapes: torch's own tensors on both sides
    pair = (
        f"'0.weight': checkpoint {tuple(small['0.weight'].shape)} vs model "
        f"{tuple(big.state_dict()['0.weight'].shape)}"
    )
    assert pair == "'0.weight': checkpoint (8, 4) vs model (16, 4)"
    torch.save(small, tmp_path / "small.pth")
    msg = _refused_load(big, tmp_path / "small.pth")
    assert msg.startswith("0 of 4 checkpoint tensors match Sequential. ")
    assert "The names match, the shapes differ: 4 checkpoint tensors" in msg and pair in msg
    assert "on_mismatch=" in msg and "look like" not in msg and "architecture." not in msg

    torch.save({"module." + k: v for k, v in small.items()}, tmp_path / "ddp.pth")
    for kw in ({}, {"strict": True}):
        msg = _refused_load(big, tmp_path / "ddp.pth", **kw)
        assert 'remap=[(r"^module\\.", "")]' in msg and "the names match" in msg
        assert "the shapes differ (4 of 4" in msg and pair in msg, msg
        assert 'prefix="auto"' not in msg  # auto pairs by shape too: it would not find it


# --------------------------------------------------------------------------- command line


def test_cli_entry_with_key_as_a_deprecated_alias(tmp_path, capsys):
    torch.save({"a": {"w": torch.zeros(2, 3)}, "ema": {"w": torch.ones(2, 3)}}, tmp_path / "two.pt")
    path = str(tmp_path / "two.pt")
    res = run_cli(capsys, "inspect", path)
    assert res.code == 2 and "--entry 'a'" in res.err and "--key" not in res.err
    new = run_cli(capsys, "inspect", path, "--entry", "ema", "--json")
    old = run_cli(capsys, "inspect", path, "--key", "ema", "--json")
    assert new.code == old.code == 0 and new.out == old.out and new.err == ""
    assert "'ema'" in new.out and '"nesting": [\n    "ema"' in new.out
    assert "--key is deprecated; use --entry" in old.err
    assert "--key" not in run_cli(capsys, "inspect", "--help").out


def test_cli_diff_hints_are_flags(tmp_path, r18_imagenet, capsys):
    state = {**r18_imagenet, "aux.weight": torch.zeros(3), "aux.bias": torch.zeros(3)}
    torch.save(state, tmp_path / "r18.pth")
    argv = ("diff", str(tmp_path / "r18.pth"), "--model", "torchvision:resnet18")
    res = run_cli(capsys, *argv, "--num-classes", "10")
    assert res.code == 1
    assert "(mismatched); pass --skip 'fc.*' if intended" in res.out
    assert "drop with --drop '^aux\\.' if intended" in res.out
    assert "skip=" not in res.out and "remap=" not in res.out
    # the flags it prints do what it says: the oracle is strict=True passing
    assert (
        run_cli(capsys, *argv, "--num-classes", "10", "--skip", "fc.*", "--drop", "^aux\\.").code
        == 0
    )


def test_cli_unknown_flag_gets_did_you_mean(r18_path, capsys):
    res = run_cli(capsys, "diff", r18_path, "--model", "torchvision:resnet18", "--skp", "fc")
    assert res.code == 2 and "unrecognized arguments: --skp fc" in res.err
    assert "did you mean --skip?" in res.err
    res = run_cli(capsys, "diff", r18_path, "--modle", "torchvision:resnet18")
    assert res.code == 2 and "required: --model" in res.err
    assert "--modle: did you mean --model?" in res.err
    res = run_cli(capsys, "inspect", r18_path, "--dpeth=2")
    assert res.code == 2 and "--dpeth: did you mean --depth?" in res.err
    res = run_cli(capsys, "inspect", r18_path, "--zzzzzz")
    assert res.code == 2 and "did you mean" not in res.err  # nothing close: no guess
    res = run_cli(capsys, "--verson")
    assert res.code == 2 and "--verson: did you mean --version?" in res.err


def test_cli_on_mismatch_adapt_loads_a_grey_stem(tmp_path, r18_imagenet, capsys, monkeypatch):
    (tmp_path / "edge_grey.py").write_text(
        "import torchvision\nfrom torch import nn\n\n\ndef grey(num_classes=1000):\n"
        "    m = torchvision.models.resnet18(num_classes=num_classes)\n"
        "    m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)\n    return m\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "edge_grey", raising=False)
    torch.save(r18_imagenet, tmp_path / "r18.pth")
    argv = ("r18.pth", "--model", "edge_grey:grey")
    res = run_cli(capsys, "diff", *argv)
    assert res.code == 1 and "conv1.weight" in res.out and "(mismatched); pass --skip" in res.out
    res = run_cli(capsys, "diff", *argv, "--on-mismatch", "error")
    assert res.code == 2 and "size mismatch" in res.err and "--on-mismatch skip" in res.err
    assert run_cli(capsys, "diff", *argv, "--on-mismatch", "adapt").code == 0
    res = run_cli(capsys, "convert", *argv, "--on-mismatch", "adapt", "-o", "out")
    assert res.code == 0, res.out + res.err
    written = load_file(tmp_path / "out" / "model.safetensors")
    oracle = adapt_input_conv(1, r18_imagenet["conv1.weight"])  # what timm does for in_chans=1
    assert torch.equal(written["conv1.weight"], oracle)
    assert torch.equal(written["layer1.0.conv1.weight"], r18_imagenet["layer1.0.conv1.weight"])


# --------------------------------------------------------------------------- surgery inspect


def test_inspect_counts_elements_and_orders_a_safetensors_tree_by_name(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 4, 3))
    model.add_module("bn", nn.BatchNorm2d(4))
    model.add_module("blocks", nn.Sequential(*(nn.Linear(4 + i, 5 + i) for i in range(12))))
    sd = model.state_dict()
    torch.save(sd, tmp_path / "m.pth")
    save_file(sd, str(tmp_path / "m.safetensors"))
    # the oracle: torch's numbers of elements; BatchNorm holds 2 parameters and 3 buffers
    bn = sum(v.numel() for k, v in sd.items() if k.startswith("bn."))
    assert bn == 17 and len([k for k in sd if k.startswith("bn.")]) == 5

    res = run_cli(capsys, "inspect", str(tmp_path / "m.pth"), "--depth", "2")
    assert res.code == 0 and f"  bn  [5 tensors, {bn} elements]" in res.out
    assert "params" not in res.out
    tops = [
        line.split()[0] for line in res.out.splitlines() if line.startswith("  ") and "[" in line
    ]
    assert tops[:3] == ["stem", "bn", "blocks"]  # a torch file keeps the model's order

    res = run_cli(capsys, "inspect", str(tmp_path / "m.safetensors"), "--depth", "2")
    lines = res.out.splitlines()
    assert "keys (by name, numbers by value: the file keeps no model order):" in lines
    top = [
        line.split()[0] for line in lines if line.startswith("  ") and not line.startswith("   ")
    ]
    assert top == ["blocks", "bn", "stem"]
    blocks = [line.split()[0] for line in lines if line.startswith("    ") and "[" in line]
    assert blocks == [str(i) for i in range(12)]  # 2 before 10, unlike the file's 10 before 2
    bn_leaves = lines[lines.index(f"  bn  [5 tensors, {bn} elements]") + 1 :][:5]
    assert [line.split()[0] for line in bn_leaves] == sorted(k[3:] for k in sd if k[:3] == "bn.")


def test_inspect_says_how_many_shards_a_folder_has(tmp_path, r18_imagenet, capsys):
    index = save_as("sharded_safetensors", r18_imagenet, tmp_path)
    weight_map = json.loads(Path(index).read_text())["weight_map"]
    counts = Counter(weight_map.values())  # the oracle: what the index says
    assert len(counts) == 2
    res = run_cli(capsys, "inspect", str(tmp_path))
    shards = ", ".join(f"{name} ({n} tensors)" for name, n in sorted(counts.items()))
    assert res.code == 0 and f"shards:     2 files: {shards}" in res.out
    info = json.loads(run_cli(capsys, "inspect", str(tmp_path), "--json").out)
    assert info["shards"] == dict(sorted(counts.items()))
    info = json.loads(
        run_cli(capsys, "inspect", str(tmp_path / "model-00001-of-00002.safetensors"), "--json").out
    )
    assert info["shards"] == {}


def test_inspect_says_how_many_files_a_dcp_folder_has(tmp_path, capsys):
    """A DCP folder written in two files: each file's tensors, as DCP's own metadata says."""
    import torch.distributed.checkpoint as dcp

    sd = {f"layer{i}.weight": torch.randn(64, 64) for i in range(6)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp_path, thread_count=2), no_dist=True)
        metadata = dcp.FileSystemReader(tmp_path).read_metadata()  # the oracle (our own file)
    held: dict[str, set[str]] = {}
    for index, info in metadata.storage_data.items():
        held.setdefault(info.relative_path, set()).add(index.fqn)
    counts = {name: len(held[name]) for name in sorted(held)}
    assert len(counts) == 2 and sum(counts.values()) == 6
    res = run_cli(capsys, "inspect", str(tmp_path))
    shards = ", ".join(f"{name} ({n} tensors)" for name, n in counts.items())
    assert res.code == 0 and f"shards:     2 files: {shards}" in res.out
    assert json.loads(run_cli(capsys, "inspect", str(tmp_path), "--json").out)["shards"] == counts


# --------------------------------------------------------------------------- notebook


def _tbody(page: str) -> str:
    return page[page.index("<tbody>") : page.index("</tbody>")]


def test_load_plan_has_the_report_table_in_a_notebook(r18_path):
    model = torchvision.models.resnet18(num_classes=10)
    plan = surgery.plan_load(model, r18_path, skip="layer4.1")
    page = plan._repr_html_()
    # the oracle: the report a dry run of the same load gives, rendered by the report itself
    report = surgery.load_partial(model, r18_path, skip="layer4.1", dry_run=True)
    assert _tbody(page) == _tbody(report._repr_html_())
    assert "mismatched" in _tbody(page) and "skipped" in _tbody(page)
    assert f"LoadPlan: {r18_path} -&gt; ResNet: 108 load, 12 skip, 2 mismatch<" in page
    assert "not ok" in page and "fc.*" in page  # the verdict, with its reason


def test_load_plan_html_is_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    torch.save({"weight": torch.zeros(3, 4), evil: torch.zeros(1)}, tmp_path / "evil.pth")
    plan = surgery.plan_load(nn.Linear(4, 3), tmp_path / "evil.pth")
    page = plan._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
