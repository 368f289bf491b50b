"""Loading base weights into a model already wrapped by ``peft.get_peft_model``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import surgery
from surgery.keys import peft as _peft

transformers = pytest.importorskip("transformers", reason="PEFT tests need transformers")
peft = pytest.importorskip("peft", reason="PEFT tests need peft")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _bert(num_labels: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def _lora(model: nn.Module) -> nn.Module:
    config = peft.LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"], r=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config).eval()


def _wrapped_names(key: str) -> list[str]:
    """Where a base key lives in the LoRA-wrapped BERT."""
    module, _, leaf = key.rpartition(".")
    full = f"base_model.model.{module}"
    if module.endswith((".query", ".value")):
        return [f"{full}.base_layer.{leaf}"]
    if module == "classifier":
        return [f"{full}.modules_to_save.default.{leaf}", f"{full}.original_module.{leaf}"]
    return [f"{full}.{leaf}"]


@pytest.fixture
def base(tmp_path):
    src = _bert(seed=0)
    src.save_pretrained(tmp_path / "base")  # model.safetensors
    return src, tmp_path / "base"


def test_base_weights_load_into_the_wrapped_model(base):
    src, folder = base
    pm = _lora(_bert(seed=1))
    state = pm.state_dict()
    lora = {k: v.clone() for k, v in state.items() if ".lora_" in k}
    assert len(lora) == 8
    assert not torch.equal(
        state["base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight"],
        src.state_dict()["bert.encoder.layer.0.attention.self.query.weight"],
    )

    report = surgery.load_partial(pm, folder)

    state = pm.state_dict()
    for key, value in src.state_dict().items():
        for name in _wrapped_names(key):
            assert torch.equal(state[name], value), name
    for key, value in lora.items():
        assert torch.equal(state[key], value), f"{key} changed"
    assert sorted(report.adapter) == sorted(lora)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.ok
    assert "adapter" in str(report) and "PEFT-wrapped model" in str(report)
    assert report.to_dict()["adapter"] == report.adapter
    # LoRA B starts at zero: the wrapped model computes what the source model computes.
    x = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=x).logits, src(input_ids=x).logits)


def test_plan_has_an_adapter_action_and_strict_passes(base):
    src, folder = base
    pm = _lora(_bert(seed=1))
    plan = surgery.plan_load(pm, folder, strict=True)
    assert plan.counts() == {"load": 43, "adapter": 8}
    assert {e.model_key for e in plan.find(action="adapter")} == {
        k for k in pm.state_dict() if ".lora_" in k
    }
    # A plan saved as JSON and read back re-derives the adapter entries from the model.
    again = surgery.LoadPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    report = again.apply(pm, ckpt=folder)
    assert report.ok and len(report.adapter) == 8
    assert torch.equal(
        pm.state_dict()["base_model.model.classifier.original_module.weight"],
        src.classifier.weight,
    )


def test_replaced_head_goes_into_both_copies_alike(base):
    src, folder = base
    pm = _lora(_bert(num_labels=5, seed=1))
    adapter = surgery.head_rows(["a", "b", "c"], ["c", "a", "b", "d", "e"])
    report = surgery.load_partial(pm, folder, on_mismatch=adapter)
    head = pm.base_model.model.classifier
    copy, original = head.modules_to_save["default"], head.original_module
    assert torch.equal(copy.weight, original.weight) and torch.equal(copy.bias, original.bias)
    assert torch.equal(copy.weight[:3], src.classifier.weight[[2, 0, 1]])
    assert torch.equal(copy.bias[:3], src.classifier.bias[[2, 0, 1]])
    assert {m.key for m in report.adapted} == {
        f"base_model.model.classifier.{part}.{leaf}"
        for part in ("modules_to_save.default", "original_module")
        for leaf in ("weight", "bias")
    }
    assert report.ok


def test_mismatched_head_is_reported_for_both_copies(base):
    _, folder = base
    pm = _lora(_bert(num_labels=5, seed=1))
    before = pm.base_model.model.classifier.original_module.weight.detach().clone()
    report = surgery.load_partial(pm, folder)
    assert len(report.mismatched) == 4 and not report.ok
    assert torch.equal(pm.base_model.model.classifier.original_module.weight, before)


def test_inactive_adapter_copies_are_left_alone(base):
    src, folder = base
    pm = _lora(_bert(seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter(
            "other",
            peft.LoraConfig(target_modules=["query"], modules_to_save=["classifier"], r=2),
        )
    other = pm.base_model.model.classifier.modules_to_save["other"].weight.detach().clone()
    report = surgery.load_partial(pm, folder)
    head = pm.base_model.model.classifier
    assert torch.equal(head.modules_to_save["default"].weight, src.classifier.weight)
    assert torch.equal(head.modules_to_save["other"].weight, other)
    assert "base_model.model.classifier.modules_to_save.other.weight" in report.adapter
    assert report.ok


def test_a_full_peft_state_dict_loads_by_its_own_names(tmp_path):
    trained = _lora(_bert(seed=0))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_()
    torch.save(trained.state_dict(), tmp_path / "peft.pt")
    pm = _lora(_bert(seed=1))
    report = surgery.load_partial(pm, tmp_path / "peft.pt")
    assert report.ok and report.adapter == [] and report.renamed == {}
    for key, value in trained.state_dict().items():
        assert torch.equal(pm.state_dict()[key], value), key


def test_llama_with_lora_computes_what_the_base_computes(tmp_path):
    from support import hf

    torch.manual_seed(0)
    src = hf.tiny_llama().eval()
    src.save_pretrained(tmp_path / "llama")
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(
            hf.tiny_llama(),
            peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4),
        ).eval()
    report = surgery.load_partial(pm, tmp_path / "llama")
    assert report.ok and len(report.adapter) == 8
    x = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=x).logits, src(input_ids=x).logits)


def test_a_model_without_peft_has_no_view():
    model = _bert()
    assert _peft.peft_view(model, model.state_dict()) is None
    plan = surgery.plan_load(model, model)
    assert "adapter" not in plan.counts() and not any("PEFT" in n for n in plan.notes)


def test_meta_adapter_weights_are_initialised_with_a_warning(base):
    src, folder = base
    with surgery.empty_init():
        pm = _lora(_bert(seed=1))
    report = surgery.load_partial(pm, folder)
    lora = sorted(k for k in pm.state_dict() if ".lora_" in k)
    assert sorted(report.initialised) == lora and report.adapter == []
    assert any("meta device" in n and "reset_parameters" in n for n in report.notes)
    state = pm.state_dict()
    assert not any(t.is_meta for t in state.values())
    assert torch.equal(
        state["base_model.model.classifier.modules_to_save.default.weight"], src.classifier.weight
    )
