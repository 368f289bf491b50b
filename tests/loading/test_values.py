"""The values you asked for, or an error (issue 19): non-tensor values in a state dict, tied
parameters, PEFT-wrapped models, and counts that agree with themselves.

Every value is compared with an oracle: plain ``torch.load`` + the entry +
``load_state_dict(strict=False)`` on the same checkpoint.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery import LoadError
from surgery.keys.prefix import detect_prefix

from support import SmallCNN, assert_same_state, snapshot

# --------------------------------------------------------------------------- non-tensor values


def _with_version(kind: str) -> dict:
    """SmallCNN's state dict with one non-tensor value, as a plain dict or an OrderedDict."""
    torch.manual_seed(0)
    sd = SmallCNN().state_dict()  # an OrderedDict keeping torch's _metadata
    if kind == "dict":
        sd = dict(sd)
    elif kind == "OrderedDict":
        sd = collections.OrderedDict(sd)  # no _metadata
    sd["version"] = 2
    return sd


def _oracle(sd: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """What torch's load_state_dict(strict=False) puts in a fresh model, and its unexpected keys."""
    torch.manual_seed(1)
    model = SmallCNN()
    result = model.load_state_dict(sd, strict=False)
    return model.state_dict(), list(result.unexpected_keys)


@pytest.mark.parametrize("kind", ["dict", "OrderedDict", "state_dict"])
@pytest.mark.parametrize("where", ["memory", "zip", "legacy"])
@pytest.mark.parametrize("entry", [None, "state_dict", "flat"])
def test_non_tensor_value_in_a_state_dict_is_an_unexpected_key(tmp_path, kind, where, entry):
    sd = _with_version(kind)
    ckpt: object = sd if entry == "flat" else {"state_dict": sd, "epoch": 3}
    if where != "memory":
        path = tmp_path / "ckpt.pth"
        torch.save(ckpt, path, _use_new_zipfile_serialization=where == "zip")
        ckpt = path
    expected, unexpected = _oracle(sd)
    torch.manual_seed(1)
    model = SmallCNN()
    entry_arg = None if entry == "flat" else entry
    plan = surgery.plan_load(model, ckpt, entry=entry_arg)
    assert [e.key for e in plan.find(action="unexpected")] == unexpected == ["version"]
    report = plan.apply(model)
    assert report.unexpected == unexpected and not report.ok  # strict=True would refuse
    assert report.tensors_loaded == report.tensors_total
    for k, v in expected.items():
        assert torch.equal(model.state_dict()[k], v), k
    fresh = SmallCNN()
    before = snapshot(fresh)
    with pytest.raises(LoadError, match="version"):
        surgery.load_partial(fresh, ckpt, entry=entry_arg, strict=True)
    assert_same_state(fresh, before)


def test_training_statistics_beside_the_weights_are_not_a_second_model():
    """A dict of statistics holding one tensor is not taken for a state dict beside 'student'."""
    sd = SmallCNN().state_dict()
    ckpt = {"student": sd, "stats": {"best_acc": torch.tensor(0.7), "epoch": 3, "arch": "cnn"}}
    model = SmallCNN()
    report = surgery.load_partial(model, ckpt)
    assert report.source == "<dict>['student']" and report.ok
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


# --------------------------------------------------------------------------- prefixes and PEFT


class TwoLayer(nn.Module):
    """fc1 and head of different shapes: a LoRA on fc1 makes their wrapped names differ."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(x)))


def test_prefix_readings_count_only_pairs_whose_shapes_agree():
    ckpt = {"fc1.weight": (16, 8), "fc1.bias": (16,)}
    model = {"m.fc1.weight": (16, 8), "m.fc1.bias": (16,), "m.head.weight": (3, 16)}
    model["m.head.bias"] = (3,)
    # By names alone, "add m." and "fc1. -> m.head." pair two keys each: a tie.
    with pytest.raises(surgery.PrefixTieError):
        detect_prefix(ckpt, set(model))
    assert detect_prefix(ckpt, set(model), lambda c, m: ckpt[c] == model[m]) == ("", "m.")


@pytest.mark.parametrize("form", ["dict", "safetensors", "pth"])
def test_base_checkpoint_into_a_peft_model_with_one_lora_layer(tmp_path, form):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    sd = TwoLayer().state_dict()
    ckpt: object = sd
    if form == "safetensors":
        ckpt = tmp_path / "base.safetensors"
        save_file(sd, ckpt)
    elif form == "pth":
        ckpt = tmp_path / "base.pth"
        torch.save(sd, ckpt)
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(TwoLayer(), peft.LoraConfig(target_modules=["fc1"], r=2))
    lora = {k: v.clone() for k, v in wrapped.state_dict().items() if "lora_" in k}
    report = surgery.load_partial(wrapped, ckpt, strict=True)
    assert report.ok and sorted(report.adapter) == sorted(lora)
    # Oracle: plain torch into the unwrapped base model; the wrapper with its adapters
    # disabled computes the same function, and the LoRA weights are left as they were.
    oracle = TwoLayer()
    oracle.load_state_dict(sd)
    x = torch.randn(5, 8)
    with wrapped.disable_adapter():
        assert torch.equal(wrapped(x), oracle(x))
    state = wrapped.state_dict()
    assert all(torch.equal(state[k], v) for k, v in lora.items())
    assert torch.equal(state["base_model.model.fc1.base_layer.weight"], sd["fc1.weight"])
    assert torch.equal(state["base_model.model.head.weight"], sd["head.weight"])


# --------------------------------------------------------------------------- tied parameters


def _tiny(name: str, tie: bool, seed: int) -> nn.Module:
    """``support.hf``'s tiny ``name`` (transformers), seeded, its head tied or not."""
    pytest.importorskip("transformers")
    from support import hf

    torch.manual_seed(seed)
    return getattr(hf, name)(tie=tie)


def _gpt2(tie: bool, seed: int) -> nn.Module:
    return _tiny("tiny_gpt2", tie, seed)


def _llama(tie: bool, seed: int) -> nn.Module:
    return _tiny("tiny_llama", tie, seed)


class TiedHead(nn.Module):
    """A plain module whose lm_head shares its embedding's weight, with an untied layer."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(12, 4)
        self.norm = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 12, bias=False)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight


def _plain(tie: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return TiedHead(tie)


MODELS = {"plain": _plain, "gpt2": _gpt2, "llama": _llama}
EMBED = {
    "plain": "embed_tokens.weight",
    "gpt2": "transformer.wte.weight",
    "llama": "model.embed_tokens.weight",
}


def _untied_ckpt(tmp_path, name: str, form: str, reverse: bool = False) -> tuple[object, dict]:
    """An untied model's weights (embedding and head differ) as ``form``; and the dict."""
    src = MODELS[name](False, 0)
    sd = dict(src.state_dict())
    if reverse:
        sd = dict(reversed(sd.items()))
    if form == "dict":
        return sd, sd
    if form == "pth":
        torch.save(sd, tmp_path / "untied.pth")
        return tmp_path / "untied.pth", sd
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "untied.safetensors")
    return tmp_path / "untied.safetensors", sd


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("form", ["dict", "pth", "safetensors"])
@pytest.mark.parametrize("reverse", [False, True])
def test_untied_checkpoint_into_a_tied_model_is_refused_naming_both_keys(
    tmp_path, name, form, reverse
):
    ckpt, _ = _untied_ckpt(tmp_path, name, form, reverse)
    model = MODELS[name](True, 1)
    before = snapshot(model)
    embed = EMBED[name]
    for attempt in (
        lambda: surgery.plan_load(model, ckpt),
        lambda: surgery.load_partial(model, ckpt, dry_run=True),
        lambda: surgery.load_partial(model, ckpt),
    ):
        with pytest.raises(surgery.KeyCollisionError) as info:
            attempt()
        text = str(info.value)
        assert isinstance(info.value, LoadError)
        assert f"'{embed}' and 'lm_head.weight'" in text
        assert "skip='lm_head.weight'" in text and f"skip='{embed}'" in text
        assert_same_state(model, before)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("keep", ["embed", "lm_head"])
@pytest.mark.parametrize("reverse", [False, True])
def test_skip_picks_which_checkpoint_tensor_a_tie_gets(tmp_path, name, keep, reverse):
    ckpt, sd = _untied_ckpt(tmp_path, name, "pth", reverse)
    embed = EMBED[name]
    skip, kept = ("lm_head.weight", embed) if keep == "embed" else (embed, "lm_head.weight")
    model = MODELS[name](True, 1)
    report = surgery.load_partial(model, ckpt, skip=skip)
    # Oracle: plain torch without the skipped key, into the same tied model.
    oracle = MODELS[name](True, 1)
    oracle.load_state_dict({k: v for k, v in sd.items() if k != skip}, strict=False)
    for k, v in oracle.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(model.lm_head.weight, sd[kept])
    assert report.skipped == [skip] and report.tensors_loaded == report.tensors_total


def _tied_forms(tmp_path, src: nn.Module) -> dict[str, object]:
    sd = src.state_dict()
    torch.save(sd, tmp_path / "zip.pth")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"model": sd, "epoch": 1}, tmp_path / "train.ckpt")
    out: dict[str, object] = {
        "dict": sd,
        "zip": tmp_path / "zip.pth",
        "legacy": tmp_path / "legacy.pth",
        "train": tmp_path / "train.ckpt",
    }
    if hasattr(src, "save_pretrained"):  # transformers drops the tied lm_head from the file
        src.save_pretrained(tmp_path / "hf")
        out["hf"] = tmp_path / "hf"
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_a_tied_checkpoint_loads_into_a_tied_model(tmp_path, name):
    src = MODELS[name](True, 0)
    embed = EMBED[name]
    for form, ckpt in _tied_forms(tmp_path, src).items():
        model = MODELS[name](True, 1)
        plan = surgery.plan_load(model, ckpt)
        report = plan.apply(model)
        oracle = MODELS[name](True, 1)
        oracle.load_state_dict(src.state_dict())  # plain torch, same values
        for k, v in oracle.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), (form, k)
        assert model.lm_head.weight is model.state_dict(keep_vars=True)[embed], form
        assert report.ok and report.tied == {"lm_head.weight": embed}, form
        assert report.tensors_loaded == report.tensors_total, form
        assert "lm_head.weight" in report.loaded and embed in report.loaded, form
        alias = next(e for e in plan if e.model_key == "lm_head.weight")
        assert alias.tied_to == embed and alias.action == "load", form


def test_a_tied_plan_read_back_refuses_a_checkpoint_that_is_not_tied():
    src = TiedHead()
    plan = surgery.plan_load(TiedHead(), src.state_dict())
    saved = surgery.LoadPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    model = TiedHead()
    assert saved.apply(model, src.state_dict()).tied == {"lm_head.weight": "embed_tokens.weight"}
    untied = {k: v.clone() for k, v in src.state_dict().items()}
    before = snapshot(model)
    with pytest.raises(LoadError, match="two different tensors"):
        saved.apply(model, untied)
    assert_same_state(model, before)


def test_the_command_line_gives_the_tie_fix_as_a_flag(tmp_path, monkeypatch, capsys):
    from surgery.cli import main

    (tmp_path / "tied_models.py").write_text(
        "from test_values import TiedHead\n\ndef tied(num_classes=None):\n    return TiedHead()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    torch.save(TiedHead(tie=False).state_dict(), tmp_path / "untied.pt")
    assert main(["diff", str(tmp_path / "untied.pt"), "--model", "tied_models:tied"]) == 2
    err = capsys.readouterr().err
    assert "--skip 'lm_head.weight'" in err and "skip=" not in err


# --------------------------------------------------------------------------- counts


def _count_case(name: str) -> tuple[nn.Module, dict, dict]:
    """A tied model (3 parameter tensors under 4 keys), a tied checkpoint, load options."""
    model = _plain(True, 1)
    src = _plain(True, 0)
    sd = src.state_dict()  # embed_tokens.weight and lm_head.weight: one storage
    kw: dict = {}
    if name == "cast":
        sd = src.half().state_dict()  # .half() keeps the tie
    elif name in ("missing", "initialised"):
        sd = {k: v for k, v in sd.items() if k.startswith("norm.")}
        if name == "initialised":
            with surgery.empty_init():
                model = TiedHead()
    elif name in ("mismatched", "adapted"):
        big = torch.randn(13, 4)
        sd = {**sd, "embed_tokens.weight": big, "lm_head.weight": big}
        if name == "adapted":
            kw["on_mismatch"] = lambda key, ckpt, target: ckpt[: target.shape[0]]
    elif name == "skipped":
        kw["skip"] = ["embed_tokens.weight", "lm_head.weight"]
    elif name == "renamed":
        sd = {"model." + k: v for k, v in sd.items()}
    return model, sd, kw


# list name -> how many entries it has: one per tensor, tied ones once (loaded: every key)
COUNTS = {
    "cast": 3,
    "missing": 1,
    "initialised": 1,
    "mismatched": 1,
    "adapted": 1,
    "skipped": 1,
    "renamed": 3,
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_a_tied_tensor_is_one_tensor_in_every_count(name):
    model, sd, kw = _count_case(name)
    plan = surgery.plan_load(model, sd, **kw)
    report = plan.apply(model, on_mismatch=kw.get("on_mismatch"))
    listed = getattr(report, name)
    assert len(listed) == COUNTS[name], listed
    assert report.tensors_total == 3 and report.tied == {"lm_head.weight": "embed_tokens.weight"}
    # The plan counts tensors too; the report's lists agree with it and with the totals.
    counts = plan.counts()
    assert sum(counts.values()) == 3
    assert len(report.missing) + len(report.mismatched) + len(report.skipped) == (
        report.tensors_total - report.tensors_loaded
    )
    if name == "cast":
        assert counts == {"cast": 3} and report.tensors_loaded == 3
    if name in ("missing", "initialised"):
        assert report.missing == ["embed_tokens.weight"]
        assert report.missing_keys == ["embed_tokens.weight", "lm_head.weight"]  # as torch
        assert report.not_loaded() == ["embed_tokens.weight"]
        report.assert_loaded(allow_missing="lm_head.weight")  # an alias allows its tensor
        assert "not in checkpoint (tied: lm_head.weight)" in str(report)
    if name == "adapted":
        assert torch.equal(model.lm_head.weight, sd["lm_head.weight"][:12])
    loaded_ids = {id(model.state_dict(keep_vars=True)[k]) for k in report.loaded}
    assert len(loaded_ids) == report.tensors_loaded + report.buffers_loaded


def test_the_only_dict_of_tensors_is_found_whatever_else_it_holds():
    """An EMA copy with as many plain values as tensors, alone in its file, is the weights."""
    src = nn.Linear(3, 2)
    ckpt = {"model_ema": {**src.state_dict(), "version": 2, "decay": 0.999}, "epoch": 3}
    model = nn.Linear(3, 2)
    report = surgery.load_partial(model, ckpt)
    assert report.source == "<dict>['model_ema']"
    assert sorted(report.unexpected) == ["decay", "version"]
    oracle = nn.Linear(3, 2)
    oracle.load_state_dict(ckpt["model_ema"], strict=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in oracle.state_dict().items())


def test_a_shard_holding_both_names_of_a_tie_loads(tmp_path):
    """A sharded .bin checkpoint whose shard keeps a tied pair as one storage (torch.save)."""
    src = TiedHead()
    sd = src.state_dict()
    tied = {k: sd[k] for k in ("embed_tokens.weight", "lm_head.weight")}
    norm = {k: v for k, v in sd.items() if k.startswith("norm.")}
    torch.save(tied, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(norm, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: "pytorch_model-00001-of-00002.bin" for k in tied}
    weight_map.update({k: "pytorch_model-00002-of-00002.bin" for k in norm})
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    model = _plain(True, 1)
    report = surgery.load_partial(model, tmp_path)
    assert report.ok and report.tied == {"lm_head.weight": "embed_tokens.weight"}
    oracle = _plain(True, 1)
    oracle.load_state_dict(sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in oracle.state_dict().items())
