"""Loading checkpoints whose layout differs from the model's, through the model's own
transformers conversions (issue 22): per-expert tensors stacked into a mixture-of-experts
model, the names transformers 5 renamed.

The oracle is transformers itself: ``from_pretrained`` of the very folder ``save_pretrained``
wrote, and for expert order the file's own tensors read with ``safetensors``.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery
from surgery.errors import LoadError

from support import assert_same_state, run_cli, save_dcp, snapshot

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.core_model_loading")  # transformers 5

from support import hf  # noqa: E402  (needs transformers)

EXPERTS = "model.layers.0.mlp.experts.gate_up_proj"


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _assert_equal(state: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor]) -> None:
    assert state.keys() == oracle.keys()
    for k, v in oracle.items():
        assert state[k].dtype == v.dtype, k
        assert torch.equal(state[k], v), f"{k} differs from from_pretrained"


def _folder(tmp_path, name="mixtral", shard=None, seed=0):
    torch.manual_seed(seed)
    model = hf.BUILDERS[name]()
    return model, hf.save_pretrained(model, tmp_path / f"{name}-{shard or 'one'}", shard)


def _fresh(name: str, meta: bool, seed: int = 1):
    torch.manual_seed(seed)
    if meta:
        with surgery.empty_init():
            return hf.BUILDERS[name]()
    return hf.BUILDERS[name]()


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("meta", [False, True], ids=["built", "empty_init"])
@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "vit", "vit_classifier", "dinov2"])
def test_values_equal_from_pretrained_of_the_same_folder(name, shard, meta, tmp_path):
    src, folder = _folder(tmp_path, name, shard)
    model = _fresh(name, meta)
    report = surgery.load_partial(model, folder)
    assert report.ok, report
    assert report.tensors_loaded == report.tensors_total
    _assert_equal(_state(model), hf.from_pretrained(src, folder))


def test_the_issues_mixtral_loads_21_of_21_with_converted_rows(tmp_path):
    _, folder = _folder(tmp_path)
    model = _fresh("mixtral", meta=False)
    report = surgery.load_partial(model, folder)
    text = str(report)
    assert "loaded 21/21 parameter tensors (59,808/59,808 params)" in text
    assert (
        "converted  model.layers.0.mlp.experts.gate_up_proj  <- "
        "model.layers.0.block_sparse_moe.experts.{0..3}.w1/w3.weight (merged, concatenated)"
    ) in text
    assert "model.layers.0.block_sparse_moe.experts.{0..3}.w2.weight (merged)" in text
    assert report.renamed["model.layers.0.block_sparse_moe.gate.weight"] == (
        "model.layers.0.mlp.gate.weight"
    )
    assert len(report.converted) == 4 and not report.unexpected and not report.missing
    assert report.to_dict()["converted"][EXPERTS].startswith("model.layers.0.block_sparse_moe")


def test_experts_stack_in_numeric_order_as_transformers_reads_them(tmp_path):
    """12 experts: string order would put 10 and 11 after 1."""
    torch.manual_seed(0)
    cfg = hf.mixtral_config(experts=12)
    src = transformers.MixtralForCausalLM(cfg)
    folder = hf.save_pretrained(src, tmp_path / "m")
    model = transformers.MixtralForCausalLM(cfg)
    assert surgery.load_partial(model, folder).ok
    _assert_equal(_state(model), hf.from_pretrained(src, folder))
    file = load_file(folder / "model.safetensors")  # the oracle: the file's own tensors
    stacked = model.state_dict()[EXPERTS]
    for i in range(12):
        prefix = f"model.layers.0.block_sparse_moe.experts.{i}"
        assert torch.equal(stacked[i, :64], file[f"{prefix}.w1.weight"])
        assert torch.equal(stacked[i, 64:], file[f"{prefix}.w3.weight"])


def test_a_torch_file_with_keys_in_any_order(tmp_path):
    _, folder = _folder(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    path = tmp_path / "reversed.pt"
    torch.save(dict(reversed(list(tensors.items()))), path)
    model = _fresh("mixtral", meta=False)
    assert surgery.load_partial(model, path).ok
    src = hf.tiny_mixtral()
    _assert_equal(_state(model), hf.from_pretrained(src, folder))


@pytest.mark.parametrize("meta", [False, True], ids=["built", "empty_init"])
def test_a_dcp_folder_in_the_hub_layout(meta, tmp_path):
    src, folder = _folder(tmp_path)
    save_dcp(load_file(folder / "model.safetensors"), tmp_path / "dcp")
    model = _fresh("mixtral", meta=meta)
    assert surgery.load_partial(model, tmp_path / "dcp").ok
    _assert_equal(_state(model), hf.from_pretrained(src, folder))


def test_model_dtype_casts_after_converting(tmp_path):
    src, folder = _folder(tmp_path)
    model = _fresh("mixtral", meta=False).to(torch.bfloat16)
    report = surgery.load_partial(model, folder)
    assert report.ok
    assert (EXPERTS, "float32", "bfloat16") in report.cast
    _assert_equal(_state(model), hf.from_pretrained(src, folder, dtype=torch.bfloat16))


def test_base_model_checkpoint_into_the_classifier(tmp_path):
    """A ViTModel folder into ViTForImageClassification: the prefix transformers adds."""
    _, folder = _folder(tmp_path, "vit")
    model = _fresh("vit_classifier", meta=False)
    report = surgery.load_partial(model, folder)
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"]
    assert sorted(report.unexpected) == ["vit.pooler.dense.bias", "vit.pooler.dense.weight"]
    assert report.prefix == ("", "vit.")  # surgery's prefix rewrite, on converted names too
    oracle = transformers.ViTForImageClassification.from_pretrained(folder).state_dict()
    state = _state(model)
    for k, v in oracle.items():
        if not k.startswith("classifier."):
            assert torch.equal(state[k], v), k


# --------------------------------------------------------------------------- the plan


def test_dry_run_plan_and_json_plan_show_convert_entries(tmp_path):
    src, folder = _folder(tmp_path)
    model = _fresh("mixtral", meta=False)
    before = snapshot(model)
    dry = surgery.load_partial(model, folder, dry_run=True)
    assert dry.dry_run and "would load 21/21" in str(dry) and len(dry.converted) == 4
    assert_same_state(model, before)

    plan = surgery.plan_load(model, folder)
    assert plan.counts() == {"load": 17, "convert": 4}
    (entry,) = plan.find(EXPERTS)
    assert entry.action == "convert" and entry.ckpt_key is None
    assert entry.ckpt_shape == entry.model_shape == (4, 128, 32)
    assert entry.conversion.ops == ("MergeModulelist(dim=0)", "Concatenate(dim=1)")
    assert len(entry.ckpt_keys) == 8
    assert plan.find("model.layers.0.block_sparse_moe.experts.2.w3.weight") == [entry]
    assert "convert  model.layers.0.mlp.experts.gate_up_proj" in str(plan)

    data = json.loads(json.dumps(plan.to_dict()))
    item = next(e for e in data["entries"] if e["model_key"] == EXPERTS)
    assert item["action"] == "convert"
    assert item["conversion"]["ckpt_keys"][".experts.*.w1.weight"][3] == (
        "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    )
    again = surgery.LoadPlan.from_dict(data)
    assert again.entries == plan.entries
    report = again.apply(model)
    assert report.ok and len(report.converted) == 4
    _assert_equal(_state(model), hf.from_pretrained(src, folder))


def test_each_load_asks_transformers_for_the_mapping_once(tmp_path, monkeypatch):
    _, folder = _folder(tmp_path)  # (a model built: transformers has imported its tables)
    tables = sys.modules["transformers.conversion_mapping"]
    real, calls = tables.get_model_conversion_mapping, []
    monkeypatch.setattr(
        tables, "get_model_conversion_mapping", lambda m, *a, **k: calls.append(m) or real(m)
    )
    model = _fresh("mixtral", meta=False)
    assert surgery.load_partial(model, folder).ok and len(calls) == 1
    plan = surgery.plan_load(model, folder)
    with pytest.raises(surgery.UsageError, match="converted into 'model.layers.0.mlp.experts"):
        plan.rename("model.layers.0.block_sparse_moe.experts.1.w2.weight", "lm_head.weight")
    assert plan.apply(model).ok and len(calls) == 3  # planned, then found again to apply


def test_dropping_a_converted_tensor_reads_none_of_its_sources(tmp_path, monkeypatch):
    _, folder = _folder(tmp_path)
    model = _fresh("mixtral", meta=False)
    before = snapshot(model)
    plan = surgery.plan_load(model, folder)
    assert plan.counts()["convert"] == 4
    plan.drop("model.layers.*.mlp.experts.*")
    assert "convert" not in plan.counts() and all(e.conversion for e in plan.find(action="skip"))
    read: list[str] = []
    real = surgery.sources.safetensors.SafetensorsSource.read
    monkeypatch.setattr(
        surgery.sources.safetensors.SafetensorsSource,
        "read",
        lambda self, key: read.append(key) or real(self, key),
    )
    report = plan.apply(model)
    assert not any("experts" in k for k in read)
    assert sorted(report.skipped) == sorted(k for k in before if ".experts." in k)
    for k in report.skipped:
        assert torch.equal(model.state_dict()[k], before[k])


def test_cli_diff_shows_converted_tensors(tmp_path, capsys):
    _, folder = _folder(tmp_path)
    out = run_cli(capsys, "diff", str(folder), "--model", "support.hf:tiny_mixtral")
    assert out.code == 0, out.err
    assert "converted  model.layers.1.mlp.experts.down_proj" in out.out
    assert "ok: strict=True would load this checkpoint" in out.out
    js = run_cli(capsys, "diff", str(folder), "--model", "support.hf:tiny_mixtral", "--json")
    assert len(json.loads(js.out)["converted"]) == 4


def test_cli_convert_writes_the_hub_layout_back(tmp_path, capsys):
    """Hub layout in, the model's conversions, the hub layout out: the very same tensors."""
    _, folder = _folder(tmp_path)
    out = tmp_path / "out"
    spec = "support.hf:tiny_mixtral"
    result = run_cli(
        capsys, "convert", str(folder), "-o", str(out), "--model", spec, "--layout", "checkpoint"
    )
    assert result.code == 0, result.err
    assert "converted  model.layers.0.mlp.experts.gate_up_proj" in result.out
    written = load_file(out / "model.safetensors")
    original = load_file(folder / "model.safetensors")
    assert written.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(written[k], v), k


# --------------------------------------------------------------------------- composing


def test_skip_and_remap_compose(tmp_path):
    src, folder = _folder(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    save_file({f"backbone.{k}": v for k, v in tensors.items()}, tmp_path / "wrapped.safetensors")
    model = _fresh("mixtral", meta=False)
    before = snapshot(model)
    report = surgery.load_partial(
        model,
        tmp_path / "wrapped.safetensors",
        remap=[(r"^backbone\.", "")],
        skip="model.layers.1.mlp.experts.*",
    )
    skipped = ["model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    assert sorted(report.skipped) == skipped
    assert report.ok and len(report.converted) == 2
    oracle = hf.from_pretrained(src, folder)
    state = _state(model)
    for k, v in oracle.items():
        assert torch.equal(state[k], before[k] if k in skipped else v), k


def test_one_tensor_into_two_and_skipping_one_of_them(tmp_path):
    """Dinov2's fused ``weights_in`` chunked into ``gate_proj`` and ``up_proj``."""
    src, folder = _folder(tmp_path, "dinov2")
    model = _fresh("dinov2", meta=False)
    before = snapshot(model)
    report = surgery.load_partial(model, folder, skip="encoder.layer.0.mlp.gate_proj.weight")
    assert report.skipped == ["encoder.layer.0.mlp.gate_proj.weight"]
    assert report.converted["encoder.layer.0.mlp.up_proj.weight"] == (
        "encoder.layer.0.mlp.weights_in.weight (chunked)"
    )
    assert len(report.converted) == 7 and report.ok
    oracle = hf.from_pretrained(src, folder)
    for k, v in _state(model).items():
        assert torch.equal(v, before[k] if k in report.skipped else oracle[k]), k


def test_vocabulary_growth_with_head_rows(tmp_path):
    src, folder = _folder(tmp_path)
    torch.manual_seed(1)
    model = transformers.MixtralForCausalLM(hf.mixtral_config(vocab=72))
    rows = surgery.head_rows(range(64), range(72))
    report = surgery.load_partial(model, folder, on_mismatch=rows)
    assert report.ok and len(report.adapted) == 2 and len(report.converted) == 4
    oracle = hf.from_pretrained(src, folder)
    for k, v in _state(model).items():
        want = oracle[k]
        assert torch.equal(v[:64] if v.shape != want.shape else v, want), k


def test_peft_wrapped_destination(tmp_path):
    peft = pytest.importorskip("peft")
    src, folder = _folder(tmp_path)
    torch.manual_seed(1)
    cfg = peft.LoraConfig(target_modules=["q_proj", "gate"], r=2)
    model = peft.get_peft_model(hf.tiny_mixtral(), cfg)
    adapters = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    report = surgery.load_partial(model, folder)
    assert report.ok and len(report.adapter) == len(adapters) == 8
    assert "base_model.model.model.layers.0.mlp.experts.gate_up_proj" in report.converted
    state = model.state_dict()
    for k, v in adapters.items():
        assert torch.equal(state[k], v)
    base = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items()}
    for k, v in hf.from_pretrained(src, folder).items():
        assert torch.equal(base[k], v), k


# --------------------------------------------------------------------------- refusals


def _edit(folder, change) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_wrong_shaped_expert_is_refused_and_nothing_is_loaded(tmp_path):
    _, folder = _folder(tmp_path)
    key = "model.layers.0.block_sparse_moe.experts.2.w1.weight"
    _edit(folder, lambda t: t.__setitem__(key, t[key][:, :31].clone()))
    model = _fresh("mixtral", meta=False)
    before = snapshot(model)
    with pytest.raises(LoadError) as err:
        surgery.load_partial(model, folder)
    text = str(err.value)
    assert "'model.layers.0.mlp.experts.gate_up_proj'" in text and "MergeModulelist" in text
    assert "experts.{0..3}.w1/w3.weight" in text and "skip=['model.layers.0.mlp" in text
    assert_same_state(model, before)
    report = surgery.load_partial(model, folder, skip=EXPERTS)  # the fix the message gives
    assert report.skipped == [EXPERTS] and len(report.converted) == 3
    assert torch.equal(model.state_dict()[EXPERTS], before[EXPERTS])


def test_a_missing_expert_is_a_mismatch(tmp_path):
    _, folder = _folder(tmp_path)
    _edit(
        folder,
        lambda t: [
            t.pop(f"model.layers.1.block_sparse_moe.experts.3.{w}.weight") for w in "w1 w3".split()
        ],
    )
    model = _fresh("mixtral", meta=False)
    before = snapshot(model)
    report = surgery.load_partial(model, folder)
    assert not report.ok
    key = "model.layers.1.mlp.experts.gate_up_proj"
    assert report.incorrect_shapes == [(key, (3, 128, 32), (4, 128, 32))]
    assert "experts.{0..2}.w1/w3.weight" in str(surgery.plan_load(model, folder))
    assert torch.equal(model.state_dict()[key], before[key])
    fresh = _fresh("mixtral", meta=False)
    before = snapshot(fresh)
    for kwargs in ({"on_mismatch": "error"}, {"strict": True}):
        with pytest.raises(LoadError, match="gate_up_proj"):
            surgery.load_partial(fresh, folder, **kwargs)
        assert_same_state(fresh, before)


def test_an_adapter_gets_the_converted_tensor(tmp_path):
    """A checkpoint with 3 experts of 4: the adapter sees the stacked (3, ...) tensor."""
    _, folder = _folder(tmp_path)
    file = load_file(folder / "model.safetensors")
    _edit(folder, lambda t: [t.pop(k) for k in list(t) if ".experts.3." in k])
    seen = {}

    def pad(name, ckpt, model):
        seen[name] = tuple(ckpt.shape)
        return torch.cat([ckpt, torch.zeros(1, *ckpt.shape[1:])])

    model = _fresh("mixtral", meta=False)
    report = surgery.load_partial(model, folder, on_mismatch=pad)
    assert report.ok and len(report.adapted) == 4 and not report.converted.get(EXPERTS)
    assert seen[EXPERTS] == (3, 128, 32)
    stacked = model.state_dict()[EXPERTS]
    for i in range(3):  # the oracle: the file's own tensors, where the model stacks them
        prefix = f"model.layers.0.block_sparse_moe.experts.{i}"
        assert torch.equal(
            stacked[i], torch.cat([file[f"{prefix}.w1.weight"], file[f"{prefix}.w3.weight"]])
        )
    assert not stacked[3].any()


def test_an_op_failing_on_real_tensors_leaves_the_model_untouched(tmp_path, monkeypatch):
    """transformers logs such a failure and loads the rest; surgery raises before writing.
    (Dinov2's Chunk runs at prepare; stacked experts are not converted by ops at all.)"""
    core = sys.modules["transformers.core_model_loading"]
    real = core.Chunk.convert

    def fails_on_data(self, input_dict, *args, **kwargs):
        if not next(iter(input_dict.values()))[0].is_meta:
            raise RuntimeError("disk said no")
        return real(self, input_dict, *args, **kwargs)

    monkeypatch.setattr(core.Chunk, "convert", fails_on_data)
    _, folder = _folder(tmp_path, "dinov2")
    for meta in (False, True):
        model = _fresh("dinov2", meta=meta)
        before = None if meta else snapshot(model)
        with pytest.raises(LoadError, match="disk said no") as err:
            surgery.load_partial(model, folder)
        assert "Nothing was loaded" in str(err.value) and "weights_in" in str(err.value)
        if meta:  # still all on meta: nothing was materialised
            assert all(t.is_meta for t in model.state_dict().values())
        else:
            assert_same_state(model, before)


def test_stacked_experts_are_read_in_place(tmp_path, monkeypatch):
    """Per-expert tensors go straight into their rows: transformers' ops never see the
    checkpoint's data (only meta tensors, and the small tensors of the one-off check)."""
    src, folder = _folder(tmp_path)
    oracle = hf.from_pretrained(src, folder)  # before the spies: it runs the ops on data
    core = sys.modules["transformers.core_model_loading"]
    seen: list[tuple[str, bool, tuple[int, ...]]] = []
    for op in (core.MergeModulelist, core.Concatenate):
        real = op.convert

        def spy(self, input_dict, *args, _real=real, **kwargs):
            t = next(iter(input_dict.values()))
            t = t[0] if isinstance(t, list) else t
            seen.append((type(self).__name__, t.is_meta, tuple(t.shape)))
            return _real(self, input_dict, *args, **kwargs)

        monkeypatch.setattr(op, "convert", spy)
    model = _fresh("mixtral", meta=True)
    assert surgery.load_partial(model, folder).ok
    _assert_equal(_state(model), oracle)
    real_data = [s for s in seen if not s[1] and s[2] in ((64, 32), (32, 64))]
    assert real_data == [] and any(s[1] for s in seen)


def test_a_plan_naming_a_converter_the_model_lacks_is_refused(tmp_path):
    _, folder = _folder(tmp_path)
    model = _fresh("mixtral", meta=False)
    data = surgery.plan_load(model, folder).to_dict()
    item = next(e for e in data["entries"] if e["model_key"] == EXPERTS)
    item["conversion"]["ops"] = ["MergeModulelist(dim=1)", "Concatenate(dim=1)"]
    before = snapshot(model)
    with pytest.raises(LoadError, match="does not declare"):
        surgery.LoadPlan.from_dict(data).apply(model)
    assert_same_state(model, before)


# --------------------------------------------------------------------------- no conversion


@pytest.mark.parametrize("build", [hf.tiny_gpt2, hf.tiny_llama], ids=["gpt2", "llama"])
def test_a_model_type_without_a_mapping_loads_as_before(build, tmp_path, monkeypatch):
    torch.manual_seed(0)
    src = build()
    folder = hf.save_pretrained(src, tmp_path / "m")
    model = build()
    plan = surgery.plan_load(model, folder).to_dict()
    monkeypatch.setitem(sys.modules, "transformers.core_model_loading", None)  # as before 5
    assert surgery.plan_load(model, folder).to_dict() == plan
    monkeypatch.undo()
    assert surgery.load_partial(model, folder).ok
    _assert_equal(_state(model), hf.from_pretrained(src, folder))


def test_a_base_model_checkpoint_without_a_mapping_loads_as_before(tmp_path, monkeypatch):
    """GPT2Model's folder into GPT2LMHeadModel: the prefix rewrite adds 'transformer.' as it
    always did (transformers' own base_model_prefix step is not used), and prefix=None
    still turns it off."""
    torch.manual_seed(0)
    base = hf.tiny_gpt2().transformer
    folder = hf.save_pretrained(base, tmp_path / "base")
    model = hf.tiny_gpt2()

    def outcomes() -> tuple[dict, str]:
        with pytest.raises(LoadError) as err:  # nothing matches without the prefix
            surgery.plan_load(model, folder, prefix=None)
        return surgery.plan_load(model, folder).to_dict(), str(err.value)

    plan, refused = outcomes()
    monkeypatch.setitem(sys.modules, "transformers.core_model_loading", None)  # as before 5
    assert outcomes() == (plan, refused)
    assert plan["prefix"] == ["", "transformer."] and "0 of 28 checkpoint tensors" in refused


def test_without_transformers_5_nothing_is_converted(tmp_path, monkeypatch):
    _, folder = _folder(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers.conversion_mapping", None)
    report = surgery.load_partial(_fresh("mixtral", meta=False), folder)
    assert report.tensors_loaded == 15 and not report.converted  # the issue's "before"
    assert len(report.unexpected) == 26
