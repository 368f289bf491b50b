"""Devices: checkpoints land on the model's device; ``device=`` places a meta model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import surgery
from surgery import UsageError
from surgery.loading.placements.local import Staging as _Staging
from surgery.sources import open_source

from support import SmallCNN, Tied, assert_same_state, snapshot

cuda = pytest.mark.cuda  # skipped without a CUDA device (conftest)


@pytest.fixture
def trained() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallCNN()
    for b in model.buffers():
        if b.is_floating_point():
            b.uniform_(0.5, 1.5)  # running stats that differ from a fresh model's
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_loaded(model, trained, device):
    state = model.state_dict()
    for k, v in trained.items():
        assert state[k].device.type == device, k
        assert torch.equal(state[k].cpu(), v), k


def test_checkpoint_saved_from_cuda_loads_onto_cpu_model(tmp_path, trained):
    """The storages' saved location ('cuda:0' here) does not matter: the model's device does."""
    path = tmp_path / "from_cuda.pth"
    # Tag every storage 'cuda:0' as a GPU machine's torch.save would (no GPU needed to write).
    torch.serialization.register_package(-100, lambda s: "cuda:0", lambda s, loc: None)
    try:
        torch.save({"state_dict": trained}, path)
    finally:
        torch.serialization._package_registry[:] = [
            p for p in torch.serialization._package_registry if p[0] != -100
        ]
    assert b"cuda:0" in path.read_bytes()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # what a plain torch.load does here
    model = SmallCNN()
    report = surgery.load_partial(model, path)
    assert report.ok
    _assert_loaded(model, trained, "cpu")


@pytest.mark.parametrize("how", ["load_partial", "apply_plan", "plan.apply"])
def test_device_cpu_materialises_meta_model(tmp_path, trained, how):
    path = tmp_path / "w.safetensors"
    save_file(trained, str(path))
    with surgery.empty_init():
        model = SmallCNN()
    if how == "load_partial":
        report = surgery.load_partial(model, path, device="cpu")
    else:
        plan = surgery.plan_load(model, path)
        if how == "apply_plan":
            report = surgery.apply_plan(model, plan, device="cpu")
        else:
            report = plan.apply(model, device=torch.device("cpu"))
    assert report.ok and not any(t.is_meta for t in model.state_dict().values())
    _assert_loaded(model, trained, "cpu")


def test_device_on_meta_model_initialises_what_the_checkpoint_lacks(trained):
    head_less = {k: v for k, v in trained.items() if not k.startswith("fc.")}
    with surgery.empty_init():
        model = SmallCNN()
    report = surgery.load_partial(model, head_less, device="cpu")
    assert sorted(report.initialised) == ["fc.bias", "fc.weight"]
    assert model.fc.weight.device.type == "cpu" and model.fc.weight.abs().sum() > 0
    assert torch.equal(model.conv1.weight, trained["conv1.weight"])


def test_device_on_a_model_already_placed_elsewhere_is_refused(monkeypatch, trained):
    """device= only places a meta model: a CPU model asked onto 'cuda' is refused, not moved."""
    model = SmallCNN()
    before = snapshot(model)
    # Pretend a GPU exists, so the refusal is the one a GPU machine gives.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(UsageError, match=r"already lives on cpu; device= only places a meta"):
        surgery.load_partial(model, trained, device="cuda")
    assert_same_state(model, before)
    # The model's own device is fine (nothing to place).
    assert surgery.load_partial(model, trained, device="cpu").ok


@pytest.mark.parametrize(
    "device, match",
    [("gpu0", "is not a torch device"), ("meta", "would load nothing"), (3.5, "not a torch")],
)
def test_bad_device_is_a_usage_error(trained, device, match):
    with surgery.empty_init():
        model = SmallCNN()
    with pytest.raises(UsageError, match=match):
        surgery.load_partial(model, trained, device=device)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_gpu_is_a_usage_error(trained):
    with surgery.empty_init():
        model = SmallCNN()
    with pytest.raises(UsageError, match=r"torch.cuda.is_available\(\) is False"):
        surgery.load_partial(model, trained, device="cuda")
    assert all(p.is_meta for p in model.parameters())


def test_staging_buffers_alternate_grow_and_cast(tmp_path):
    """The CUDA staging path's bookkeeping, on ordinary memory (pin=False)."""
    tensors = {
        "small": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "big": torch.arange(40, dtype=torch.float32),
        "half": torch.arange(5, dtype=torch.float16),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    source = open_source(path)
    staging = _Staging(pin=False)
    try:
        outs = {k: torch.full_like(v, -1) for k, v in tensors.items()}
        outs["half"] = torch.zeros(5, dtype=torch.float64)  # cast on the way
        outs["small2"] = torch.zeros(2, 3)
        for k in ["small", "big", "half", "empty"]:
            staging.read_into(source, k, outs[k])
        staging.read_into(source, "small", outs["small2"])  # a reused, larger buffer
        staging.finish()
    finally:
        source.close()
    for k, v in tensors.items():
        assert torch.equal(outs[k], v.to(outs[k].dtype)), k
    assert torch.equal(outs["small2"], tensors["small"])


@cuda
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_device_cuda_materialises_meta_model_on_gpu(tmp_path, trained, fmt):
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save(trained, path)
    else:
        save_file(trained, str(path))
    with surgery.empty_init():
        model = SmallCNN()
    report = surgery.load_partial(model, path, device="cuda")
    assert report.ok
    _assert_loaded(model, trained, "cuda")  # buffers built on CPU moved along
    assert model(torch.randn(2, 3, 8, 8, device="cuda")).shape == (2, 10)


@cuda
def test_cuda_model_loads_through_staging_and_ties_stay(trained):
    model = SmallCNN().cuda()
    report = surgery.load_partial(model, trained)
    assert report.ok
    _assert_loaded(model, trained, "cuda")
    with surgery.empty_init():
        tied = Tied()
    src = {"embed.weight": torch.randn(11, 4)}
    surgery.load_partial(tied, src, device="cuda")
    assert tied.out.weight is tied.embed.weight and tied.embed.weight.is_cuda


@cuda
def test_gpu_tensors_in_memory_copy_device_to_device(monkeypatch, trained):
    """A state dict already on the GPU is not staged through CPU memory."""
    staged: list[str] = []
    orig = _Staging.read_into
    monkeypatch.setattr(
        _Staging, "read_into", lambda self, src, k, out: (staged.append(k), orig(self, src, k, out))
    )
    model = SmallCNN().cuda()
    assert surgery.load_partial(model, {k: v.cuda() for k, v in trained.items()}).ok
    assert staged == []
    _assert_loaded(model, trained, "cuda")
    surgery.load_partial(SmallCNN().cuda(), trained)
    assert staged, "CPU tensors into a CUDA model go through the pinned staging buffers"
