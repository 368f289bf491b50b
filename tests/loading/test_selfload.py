"""Modules that load themselves: own ``_load_from_state_dict``, load hooks, extra state,
non-tensor state. surgery hands them their entries as ``load_state_dict`` would, and still
writes nothing when any part of the load is refused."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import surgery
from surgery import LoadError, LoadPlan

from support import Renaming, Tied

# --------------------------------------------------------------------------- models


def snapshot(model: nn.Module) -> dict[str, object]:
    """Every entry of the model's state, copied (extra states and packed weights included)."""
    return {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        for k, v in model.state_dict().items()
    }


def assert_same_state(model: nn.Module, snap: dict[str, object]) -> None:
    state = model.state_dict()
    assert state.keys() == snap.keys()
    for k, v in snap.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(state[k], v), f"{k} changed"
        else:
            assert repr(state[k]) == repr(v), f"{k} changed"


def _vit(seed: int) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
        num_classes=3,
    )  # fmt: skip


def _old_vit_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ViT state dict under torchvision's old MLPBlock names (``linear_1`` / ``linear_2``)."""
    return {
        k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v.clone()
        for k, v in sd.items()
    }


class Resizing(nn.Module):
    """Resizes its buffer to the checkpoint's before loading, as quantization observers do."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("hist", torch.zeros(0))

    def _load_from_state_dict(self, sd, prefix, *args) -> None:  # type: ignore[no-untyped-def]
        if prefix + "hist" in sd:
            self.hist.resize_(sd[prefix + "hist"].shape)
        super()._load_from_state_dict(sd, prefix, *args)


class Extra(nn.Module):
    """Keeps an extra state (tensor or dict) and records what ``set_extra_state`` received."""

    def __init__(self, extra: object) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.extra = extra
        self.received: list[object] = []

    def get_extra_state(self) -> object:
        return self.extra

    def set_extra_state(self, state: object) -> None:
        self.received.append(state)
        self.extra = state


class Net(nn.Module):
    """A self-loading part beside ordinary layers, to check atomicity across both."""

    def __init__(self, part: nn.Module, head: int = 4) -> None:
        super().__init__()
        self.part = part
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, head)


# --------------------------------------------------------------------------- own loading


def test_old_vit_mlp_keys_load_through_mlpblock():
    src, dst = _vit(0), _vit(1)
    ckpt = _old_vit_keys(src.state_dict())
    assert "encoder.layers.encoder_layer_0.mlp.linear_1.weight" in ckpt
    plan = surgery.plan_load(dst, ckpt)
    e = plan.find("encoder.layers.encoder_layer_0.mlp.0.weight")[0]
    assert (e.action, e.ckpt_key) == ("load", "encoder.layers.encoder_layer_0.mlp.linear_1.weight")
    assert "MLPBlock._load_from_state_dict" in e.reason
    report = plan.apply(dst)
    assert report.ok and report.missing == [] and report.unexpected == []
    assert set(report.loaded) == set(dst.state_dict())
    assert (
        report.renamed["encoder.layers.encoder_layer_1.mlp.linear_2.bias"]
        == "encoder.layers.encoder_layer_1.mlp.3.bias"
    )
    assert_same_state(dst, snapshot(src))
    # A plan saved as JSON applies the same way.
    again = _vit(2)
    back = LoadPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back.apply(again, ckpt=ckpt).ok
    assert_same_state(again, snapshot(src))


def test_old_vit_keys_from_a_torch_file_and_strict(tmp_path):
    src, dst = _vit(0), _vit(1)
    path = tmp_path / "old_vit.pth"
    torch.save(_old_vit_keys(src.state_dict()), path)
    report = surgery.load_partial(dst, path, strict=True)
    assert report.ok
    assert_same_state(dst, snapshot(src))


def test_pre_hook_renaming_keys_is_honoured():
    src, dst = Net(Renaming()), Net(Renaming())
    ckpt = {k.replace("part.lin.", "part.old."): v for k, v in src.state_dict().items()}
    report = surgery.load_partial(dst, ckpt, strict=True)
    assert report.ok and report.unexpected == [] and report.missing == []
    assert report.renamed == {
        "part.old.weight": "part.lin.weight",
        "part.old.bias": "part.lin.bias",
    }
    assert {"part.lin.weight", "part.lin.bias", "body.weight", "head.bias"} <= set(report.loaded)
    assert_same_state(dst, snapshot(src))


def test_module_resizing_its_buffer_like_an_observer():
    src, dst = Net(Resizing()), Net(Resizing())
    src.part.hist = torch.arange(5.0)
    report = surgery.load_partial(dst, src.state_dict(), strict=True)
    assert report.ok and "part.hist" in report.loaded
    assert torch.equal(dst.part.hist, torch.arange(5.0))
    assert report.buffers_loaded == report.buffers_total == 1


def test_real_per_channel_observer_is_resized():
    obs = torch.ao.quantization.PerChannelMinMaxObserver(ch_axis=0)
    obs(torch.randn(4, 3))
    fresh = torch.ao.quantization.PerChannelMinMaxObserver(ch_axis=0)
    assert fresh.min_val.shape == (0,)
    report = surgery.load_partial(fresh, obs.state_dict(), strict=True)
    assert report.ok
    assert torch.equal(fresh.min_val, obs.min_val) and torch.equal(fresh.max_val, obs.max_val)


def test_tensor_extra_state_reaches_set_extra_state(tmp_path):
    src, dst = Net(Extra(torch.tensor([1.0, 2.0]))), Net(Extra(torch.zeros(2)))
    path = tmp_path / "extra.pt"
    torch.save(src.state_dict(), path)
    report = surgery.load_partial(dst, path, strict=True)
    assert report.ok and "part._extra_state" in report.loaded
    assert len(dst.part.received) == 1 and torch.equal(
        dst.part.received[0], torch.tensor([1.0, 2.0])
    )
    assert torch.equal(dst.part.lin.weight, src.part.lin.weight)


@pytest.mark.parametrize("how", ["module", "file", "dict"])
def test_dict_extra_state_reaches_set_extra_state(tmp_path, how):
    src, dst = Net(Extra({"step": 7, "name": "ema"})), Net(Extra({}))
    ckpt: object = src
    if how == "file":
        ckpt = tmp_path / "extra.pt"
        torch.save(src.state_dict(), ckpt)
    elif how == "dict":
        ckpt = src.state_dict()  # keeps torch's _metadata, so non-tensor entries are allowed
    report = surgery.load_partial(dst, ckpt, strict=True)
    assert report.ok and "part._extra_state" in report.loaded
    assert dst.part.received == [{"step": 7, "name": "ema"}]
    # Counted truthfully: 6 parameter tensors, no buffer (the extra state is no tensor).
    assert (report.tensors_loaded, report.buffers_total) == (6, 0)


def test_extra_state_missing_from_checkpoint_is_missing():
    src, dst = Net(Extra({"step": 7})), Net(Extra({"step": 0}))
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("_extra_state")}
    report = surgery.load_partial(dst, sd)
    assert report.missing == ["part._extra_state"] and dst.part.received == []
    with pytest.raises(LoadError, match="part._extra_state"):
        surgery.load_partial(dst, sd, strict=True)


# --------------------------------------------------------------------------- quantized


def _qmlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(mlp, {nn.Linear}, dtype=torch.qint8)


def _qvalues(m: nn.Module) -> list[torch.Tensor]:
    return [t for i in (0, 2) for t in (m[i].weight().dequantize(), m[i].bias())]


@pytest.mark.parametrize("how", ["module", "state_dict", "file"])
def test_dynamically_quantized_model_loads_its_own_state(tmp_path, how):
    src, dst = _qmlp(0), _qmlp(1)
    ckpt: object = {"module": src, "state_dict": src.state_dict()}.get(how)
    if how == "file":
        ckpt = tmp_path / "q.pt"
        torch.save(src.state_dict(), ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = surgery.load_partial(dst, ckpt, strict=True)
    assert report.ok
    assert "0._packed_params._packed_params" in report.loaded
    for a, b in zip(_qvalues(src), _qvalues(dst), strict=True):
        assert torch.equal(a, b)


def test_quantized_checkpoint_into_a_float_model_says_what_it_cannot_load():
    float_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    before = snapshot(float_model)
    report = surgery.load_partial(float_model, _qmlp(0), on_mismatch="skip", dry_run=True)
    assert "0._packed_params._packed_params" in report.unexpected
    assert report.loaded == []
    with pytest.raises(LoadError, match="0 of"):
        surgery.load_partial(float_model, _qmlp(0))
    assert_same_state(float_model, before)


def test_quantized_state_without_versions_is_a_clear_error():
    src = _qmlp(0)
    sd = dict(src.state_dict())  # a plain dict: torch's _metadata (module versions) is lost
    dst = _qmlp(1)
    before = _qvalues(dst)
    with pytest.raises(surgery.SurgeryError, match="keeps the module versions"):
        surgery.load_partial(dst, sd)
    assert all(torch.equal(a, b) for a, b in zip(before, _qvalues(dst), strict=True))


# --------------------------------------------------------------------------- atomicity


def test_strict_failure_elsewhere_leaves_self_loading_modules_untouched():
    src, dst = Net(Extra({"step": 7})), Net(Extra({"step": 0}))
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    before = snapshot(dst)
    with pytest.raises(LoadError, match="head.weight"):
        surgery.load_partial(dst, sd, strict=True)
    assert dst.part.received == [] and dst.part.extra == {"step": 0}
    assert_same_state(dst, before)


def test_adapter_failure_elsewhere_leaves_self_loading_modules_untouched():
    src, dst = Net(Renaming(), head=4), Net(Renaming(), head=6)
    ckpt = {k.replace("part.lin.", "part.old."): v for k, v in src.state_dict().items()}
    before = snapshot(dst)

    def broken(name, ckpt_t, model_t):  # type: ignore[no-untyped-def]
        raise ValueError("cannot adapt")

    with pytest.raises(LoadError, match="cannot adapt"):
        surgery.load_partial(dst, ckpt, on_mismatch=broken)
    assert_same_state(dst, before)


def test_mismatch_inside_a_self_loading_module():
    src, dst = _vit(0), _vit(1)
    ckpt = _old_vit_keys(src.state_dict())
    key = "encoder.layers.encoder_layer_0.mlp.linear_1.bias"
    ckpt[key] = torch.zeros(17)
    before = snapshot(dst)
    with pytest.raises(LoadError, match=r"mlp\.0\.bias"):
        surgery.load_partial(dst, ckpt, on_mismatch="error")
    assert_same_state(dst, before)
    report = surgery.load_partial(dst, ckpt)  # skip: everything else loads
    (m,) = report.mismatched
    assert (m.key, m.checkpoint_shape, m.model_shape) == (
        "encoder.layers.encoder_layer_0.mlp.0.bias",
        (17,),
        (16,),
    )
    assert torch.equal(dst.encoder.layers[0].mlp[0].bias, before[m.key])
    assert torch.equal(dst.encoder.layers[0].mlp[0].weight, src.encoder.layers[0].mlp[0].weight)


def test_error_raised_by_a_module_own_loading_is_a_load_error():
    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def _load_from_state_dict(self, sd, prefix, *args) -> None:  # type: ignore[no-untyped-def]
            raise KeyError("needs a version")

    dst = Net(Picky())
    before = snapshot(dst)
    with pytest.raises(LoadError, match="Picky.*needs a version"):
        surgery.load_partial(dst, Net(Picky()).state_dict())
    assert_same_state(dst, before)


def test_skip_inside_a_self_loading_module():
    src, dst = Net(Renaming()), Net(Renaming())
    ckpt = {k.replace("part.lin.", "part.old."): v for k, v in src.state_dict().items()}
    before = snapshot(dst)
    report = surgery.load_partial(dst, ckpt, skip="part.lin.bias")
    assert report.skipped == ["part.lin.bias"]
    assert torch.equal(dst.part.lin.bias, before["part.lin.bias"])
    assert torch.equal(dst.part.lin.weight, src.part.lin.weight)


def test_self_loading_module_on_meta_is_materialised():
    src = _vit(0)
    with surgery.empty_init():
        dst = _vit(1)
    assert dst.encoder.layers[0].mlp[0].weight.is_meta
    report = surgery.load_partial(dst, _old_vit_keys(src.state_dict()), strict=True)
    assert report.ok
    assert_same_state(dst, snapshot(src))


# --------------------------------------------------------------------------- ties


def test_tied_weights_list_every_key_in_loaded():
    src = Tied()
    model = Tied()
    report = surgery.load_partial(model, {"embed.weight": src.embed.weight.detach().clone()})
    assert sorted(report.loaded) == ["embed.weight", "out.weight"]
    assert torch.equal(model.out.weight, src.embed.weight)
    assert model.out.weight is model.embed.weight


def test_dropping_entries_of_a_self_loading_module_in_the_plan():
    src, dst = _vit(0), _vit(1)
    before = snapshot(dst)
    plan = surgery.plan_load(dst, _old_vit_keys(src.state_dict()))
    plan.drop("encoder.layers.encoder_layer_0.mlp.0.*")
    report = plan.apply(dst)
    kept = [
        "encoder.layers.encoder_layer_0.mlp.0.bias",
        "encoder.layers.encoder_layer_0.mlp.0.weight",
    ]
    assert sorted(report.skipped) == kept
    for k in kept:
        assert torch.equal(dst.state_dict()[k], before[k])
    mlp3 = "encoder.layers.encoder_layer_0.mlp.3.weight"
    assert torch.equal(dst.state_dict()[mlp3], src.state_dict()[mlp3])


def test_module_loading_failing_at_apply_writes_nothing():
    """A saved plan applied to a model whose module loads itself differently: refused in the
    rehearsal, before surgery's own writes."""

    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def _load_from_state_dict(self, sd, prefix, *args) -> None:  # type: ignore[no-untyped-def]
            raise KeyError("needs a version")

    src = Net(Renaming())
    plan = surgery.plan_load(Net(Renaming()), src.state_dict())
    dst = Net(Picky())
    before = snapshot(dst)
    with pytest.raises(LoadError, match="needs a version"):
        plan.apply(dst)
    assert_same_state(dst, before)


def test_hooks_on_the_model_itself_keep_load_what_fits():
    class Model(Net):
        def __init__(self, head: int) -> None:
            super().__init__(nn.Linear(4, 4), head=head)
            self.calls: list[tuple[list[str], list[str]]] = []
            self.register_load_state_dict_pre_hook(self._rename)
            self.register_load_state_dict_post_hook(self._seen)

        @staticmethod
        def _rename(module, sd, prefix, *_) -> None:  # type: ignore[no-untyped-def]
            for k in [k for k in sd if k.startswith(prefix + "classifier.")]:
                sd[k.replace("classifier.", "head.")] = sd.pop(k)

        @staticmethod
        def _seen(module, incompatible) -> None:  # type: ignore[no-untyped-def]
            module.calls.append(
                (list(incompatible.missing_keys), list(incompatible.unexpected_keys))
            )

    src, dst = Model(head=4), Model(head=6)
    ckpt = {k.replace("head.", "classifier."): v for k, v in src.state_dict().items()}
    before = snapshot(dst)
    report = surgery.load_partial(dst, ckpt)
    assert {m.key for m in report.mismatched} == {"head.weight", "head.bias"}
    assert report.renamed["classifier.weight"] == "head.weight"
    assert torch.equal(dst.head.weight, before["head.weight"])
    assert torch.equal(dst.body.weight, src.body.weight)
    assert torch.equal(dst.part.weight, src.part.weight)
    assert len(dst.calls) == 1  # the post-hook ran once on the model (and once on a copy)
    with pytest.raises(LoadError, match="head.weight"):
        surgery.load_partial(Model(head=6), ckpt, strict=True)
