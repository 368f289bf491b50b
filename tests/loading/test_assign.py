"""load_partial(..., assign=True): the model takes the checkpoint's tensors, as
``load_state_dict(assign=True)`` does, sharing the file's mapping where no cast is needed.

Oracle: plain ``safetensors.torch.load_file`` / ``torch.load(mmap=True)`` + the model's own
``load_state_dict(assign=True)`` (for casts, ``load_state_dict`` without assign, which casts).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file, save_model
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DeviceMesh

import surgery
from surgery.errors import LoadError, SurgeryError, UsageError
from surgery.loading.placements import local

from support import SmallCNN, Tied, assert_same_state, save_as, snapshot

FORMS = ("safetensors", "sharded_safetensors", "sharded_folder", "pth")


def _state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = SmallCNN()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.num_batches_tracked.fill_(3)
    return {
        k: v.to(dtype) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }


def _save(form: str, sd: dict[str, torch.Tensor], folder) -> str:
    if form == "pth":
        path = folder / "model.pth"
        torch.save(sd, path)
        return str(path)
    if form == "sharded_folder":  # the folder holding an index and its shards
        save_as("sharded_safetensors", sd, folder)
        return str(folder)
    return save_as(form, sd, folder)


def _files(path: str) -> list[str]:
    """The files a checkpoint path reads (the shards of an index, in a folder or named)."""
    if Path(path).is_dir():
        path = str(next(Path(path).glob("*.index.json")))
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = set(json.load(f)["weight_map"].values())
        folder = path.rsplit("/", 1)[0]
        return [f"{folder}/{s}" for s in sorted(shards)]
    return [path]


def _plain(path: str) -> dict[str, torch.Tensor]:
    """What people write: the tensors from the file mapping."""
    out: dict[str, torch.Tensor] = {}
    for f in _files(path):
        if f.endswith(".pth"):
            out.update(torch.load(f, mmap=True, weights_only=True))
        else:
            out.update(load_file(f))
    return out


def _build(how: str) -> SmallCNN:
    torch.manual_seed(1)
    if how == "empty_init":
        with surgery.empty_init():
            return SmallCNN()
    return SmallCNN()


def _oracle(path: str) -> SmallCNN:
    torch.manual_seed(1)
    with torch.device("meta"):
        model = SmallCNN()
    model.load_state_dict(_plain(path), assign=True)
    return model


def _mappings(paths: list[str]) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of ``paths`` (/proc/self/maps)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] in paths:
                lo, hi = parts[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def _in_mapping(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= t.data_ptr() and t.data_ptr() + t.nbytes <= hi for lo, hi in ranges)


def _same_as_oracle(model: nn.Module, oracle: nn.Module) -> None:
    got, want = model.state_dict(), oracle.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("build", ["normal", "empty_init"])
@pytest.mark.parametrize("form", FORMS)
def test_values_equal_load_state_dict_assign(tmp_path, form, build):
    path = _save(form, _state(), tmp_path)
    model = _build(build)
    report = surgery.load_partial(model, path, assign=True)
    assert not report.missing and not report.unexpected
    _same_as_oracle(model, _oracle(path))
    for name, p in model.named_parameters():
        assert type(p) is nn.Parameter and p.requires_grad, name
    assert {n for n, _ in model.named_buffers()} == {n for n, _ in SmallCNN().named_buffers()}
    out = model(torch.randn(2, 3, 8, 8))  # the model works and trains
    out.sum().backward()
    assert model.fc.weight.grad is not None


@pytest.mark.parametrize("form", FORMS)
def test_tensors_lie_in_the_file_mapping_and_writes_stay_private(tmp_path, form):
    path = _save(form, _state(), tmp_path)
    model = _build("empty_init")
    surgery.load_partial(model, path, assign=True)
    ranges = _mappings(_files(path))
    assert ranges, "the file is not mapped"
    for k, t in model.state_dict().items():
        if t.numel():
            assert _in_mapping(t, ranges), f"{k} was copied"
    with torch.no_grad():  # copy-on-write: the file keeps its bytes
        for p in model.parameters():
            p.add_(1.0)
    _same_as_oracle(_oracle(path), _oracle(path))
    assert torch.equal(_plain(path)["fc.weight"] + 1, model.fc.weight.detach())


def test_a_cast_is_a_new_tensor_with_the_cast_values(tmp_path):
    path = _save("safetensors", _state(dtype=torch.float16), tmp_path)
    model = _build("empty_init")
    report = surgery.load_partial(model, path, assign=True)
    assert report.cast
    oracle = SmallCNN()
    oracle.load_state_dict(load_file(path))  # copies, casting to float32
    _same_as_oracle(model, oracle)
    ranges = _mappings([path])
    assert not _in_mapping(model.conv1.weight, ranges)
    assert _in_mapping(model.bn1.num_batches_tracked, ranges)  # int64 either way: shared


def test_adapter_values_are_assigned(tmp_path):
    sd = _state()
    path = _save("safetensors", sd, tmp_path)
    with surgery.empty_init():
        model = SmallCNN(num_classes=4)

    def first_rows(name, ckpt, target):
        return ckpt[: target.shape[0]]

    report = surgery.load_partial(model, path, assign=True, on_mismatch=first_rows)
    assert {m.key for m in report.adapted} == {"fc.weight", "fc.bias"}
    plain = load_file(path)
    assert torch.equal(model.fc.weight, plain["fc.weight"][:4])
    assert torch.equal(model.fc.bias, plain["fc.bias"][:4])
    assert torch.equal(model.conv1.weight, plain["conv1.weight"])


def test_head_rows_into_an_empty_init_model(tmp_path):
    path = _save("safetensors", _state(), tmp_path)
    with surgery.empty_init():
        model = SmallCNN(num_classes=12)
    rows = surgery.head_rows(range(10), range(12))
    surgery.load_partial(model, path, assign=True, on_mismatch=rows)
    plain = load_file(path)
    assert torch.equal(model.fc.weight[:10], plain["fc.weight"])
    assert torch.equal(model.fc.bias[:10], plain["fc.bias"])
    assert model.fc.weight.shape == (12, 16) and not model.fc.weight.is_meta


def test_apply_plan_and_plan_apply_take_assign(tmp_path):
    path = _save("pth", _state(), tmp_path)
    model = _build("empty_init")
    plan = surgery.plan_load(model, path)
    plan.apply(model, assign=True)
    _same_as_oracle(model, _oracle(path))
    assert _in_mapping(model.conv1.weight, _mappings([path]))
    other = _build("normal")
    surgery.apply_plan(other, surgery.plan_load(other, path), assign=True)
    _same_as_oracle(other, _oracle(path))


def test_from_a_dict_the_tensors_themselves_as_torch_does(tmp_path):
    sd = _state()
    model = _build("normal")
    surgery.load_partial(model, sd, assign=True)
    oracle = _build("normal")
    oracle.load_state_dict(sd, assign=True)
    _same_as_oracle(model, oracle)
    assert model.conv1.weight.data_ptr() == sd["conv1.weight"].data_ptr()
    assert oracle.conv1.weight.data_ptr() == sd["conv1.weight"].data_ptr()


def test_a_dcp_folder_is_read_into_new_tensors(tmp_path):
    sd = _state()
    path = save_as("dcp", sd, tmp_path)
    model = _build("empty_init")
    surgery.load_partial(model, path, assign=True)
    oracle = SmallCNN()
    oracle.load_state_dict(sd)
    _same_as_oracle(model, oracle)


# --------------------------------------------------------------------------- parameters


class _Flagged(nn.Parameter):
    """A parameter subclass (as quantization and sharding libraries use)."""


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.b.weight = _Flagged(self.b.weight.detach(), requires_grad=True)
        self.a.weight.requires_grad_(False)
        self.a.weight.note = "kept"  # attributes a library sets on a parameter


def test_parameters_keep_class_requires_grad_and_attributes(tmp_path):
    torch.manual_seed(0)
    sd = {k: v.clone() for k, v in _Frozen().state_dict().items()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    model = _Frozen()
    old = dict(model.named_parameters())
    surgery.load_partial(model, tmp_path / "m.safetensors", assign=True)
    assert type(model.b.weight) is _Flagged and model.b.weight.requires_grad
    assert not model.a.weight.requires_grad and model.a.weight.note == "kept"
    assert all(p is not old[n] for n, p in model.named_parameters())  # new objects, as torch
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v)


@pytest.mark.parametrize("how", ["save_model", "torch.save"])
@pytest.mark.parametrize("build", ["normal", "empty_init"])
def test_tied_weights_stay_one_tensor(tmp_path, how, build):
    torch.manual_seed(0)
    src = Tied()
    if how == "save_model":  # safetensors keeps one of the two names
        path = tmp_path / "tied.safetensors"
        save_model(src, str(path))
    else:  # both names, one storage
        path = tmp_path / "tied.pth"
        torch.save(src.state_dict(), path)
    if build == "empty_init":
        with surgery.empty_init():
            model = Tied()
    else:
        model = Tied()
    surgery.load_partial(model, path, assign=True)
    assert model.out.weight is model.embed.weight
    assert torch.equal(model.embed.weight, src.embed.weight)
    assert len(list(model.parameters())) == 1


def test_two_keys_on_one_storage_into_untied_tensors_do_not_share_memory(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tied.pth"
    torch.save(Tied().state_dict(), path)  # embed.weight and out.weight: one storage

    class Untied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, 4)
            self.out = nn.Linear(4, 11, bias=False)

    model = Untied()
    surgery.load_partial(model, path, assign=True)
    plain = torch.load(path, weights_only=True)
    assert torch.equal(model.embed.weight, plain["embed.weight"])
    assert torch.equal(model.out.weight, plain["out.weight"])
    assert model.out.weight.data_ptr() != model.embed.weight.data_ptr()
    with torch.no_grad():
        model.out.weight.add_(1)
    assert torch.equal(model.embed.weight, plain["embed.weight"])


# --------------------------------------------------------------------------- atomic


@pytest.mark.parametrize("form", FORMS)
def test_a_failing_adapter_leaves_a_normal_model_bit_identical(tmp_path, form):
    path = _save(form, _state(), tmp_path)
    model = SmallCNN(num_classes=4)
    snap, params = snapshot(model), dict(model.named_parameters())

    def boom(name, ckpt, target):
        raise RuntimeError("adapter bug")

    with pytest.raises(LoadError, match="adapter raised RuntimeError"):
        surgery.load_partial(model, path, assign=True, on_mismatch=boom)
    assert_same_state(model, snap)
    assert all(p is params[n] for n, p in model.named_parameters())


def test_a_failing_adapter_leaves_an_empty_init_model_on_meta(tmp_path):
    path = _save("safetensors", _state(), tmp_path)
    with surgery.empty_init():
        model = SmallCNN(num_classes=4)
    params = dict(model.named_parameters())
    bufs = snapshot(model)  # buffers are real under empty_init; parameters are meta

    def wrong_shape(name, ckpt, target):
        return torch.zeros(3)

    with pytest.raises(LoadError, match="returned"):
        surgery.load_partial(model, path, assign=True, on_mismatch=wrong_shape)
    assert all(p is params[n] and p.is_meta for n, p in model.named_parameters())
    for k, v in model.named_buffers():
        assert torch.equal(v, bufs[k])


def test_memory_is_checked_only_for_what_is_not_taken_from_the_file(tmp_path, monkeypatch):
    path = _save("safetensors", _state(), tmp_path)
    monkeypatch.setattr(local, "available_memory", lambda: 16)
    model = _build("empty_init")
    with pytest.raises(LoadError, match="memory"):
        surgery.load_partial(model, path)  # the copy path needs memory for every tensor
    assert model.conv1.weight.is_meta
    surgery.load_partial(model, path, assign=True)  # nothing to allocate
    _same_as_oracle(model, _oracle(path))


# --------------------------------------------------------------------------- refusals


def test_device_is_refused_with_assign(tmp_path):
    path = _save("safetensors", _state(), tmp_path)
    model = _build("empty_init")
    with pytest.raises(UsageError, match=r"assign=True.*device='cuda'.*model\.to"):
        surgery.load_partial(model, path, assign=True, device="cuda")
    assert model.conv1.weight.is_meta
    surgery.load_partial(model, path, assign=True, device="cpu")  # no move: allowed
    _same_as_oracle(model, _oracle(path))


def test_assign_must_be_a_bool(tmp_path):
    path = _save("safetensors", _state(), tmp_path)
    with pytest.raises(UsageError, match="assign must be True or False"):
        surgery.load_partial(SmallCNN(), path, assign="yes")


@pytest.mark.cuda
def test_a_model_on_a_gpu_is_refused(tmp_path):
    path = _save("safetensors", _state(), tmp_path)
    model = SmallCNN().cuda()
    snap = snapshot(model)
    with pytest.raises(UsageError, match="lives on cuda.*leave assign out"):
        surgery.load_partial(model, path, assign=True)
    assert_same_state(model, snap)


def test_a_sharded_model_is_refused(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already set up")
    path = tmp_path / "lin.safetensors"
    save_file({"weight": torch.randn(3, 4), "bias": torch.randn(3)}, str(path))
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        fully_shard(model, mesh=DeviceMesh("cpu", [0]))
        before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
        with pytest.raises(UsageError, match="assign=True.*sharded.*Leave assign out"):
            surgery.load_partial(model, path, assign=True)
        for k, v in model.state_dict().items():
            assert torch.equal(v.full_tensor(), before[k])
        surgery.load_partial(model, path)  # the fix the message gives
        assert torch.equal(model.weight.full_tensor(), load_file(path)["weight"])
    finally:
        dist.destroy_process_group()


def test_a_dry_run_changes_nothing(tmp_path):
    path = _save("safetensors", _state(), tmp_path)
    model = SmallCNN()
    snap = snapshot(model)
    surgery.load_partial(model, path, assign=True, dry_run=True)
    assert_same_state(model, snap)


def test_an_error_is_a_surgery_error(tmp_path):
    with pytest.raises(SurgeryError):
        surgery.load_partial(SmallCNN(), tmp_path / "missing.safetensors", assign=True)
