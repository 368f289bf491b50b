"""The copy path reads several tensors at once (a small pool of threads, SURGERY_READ_THREADS).

Oracle: plain ``load_file`` / ``torch.load`` + ``load_state_dict`` (which copies and casts).
A parallel load must give what the serial one gives, and a read failing in a worker must be
raised, leaving a model that materialises (``empty_init``) untouched.
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

import surgery
from surgery.errors import CheckpointError, LoadError, UsageError
from surgery.sources import filebytes, parallel
from surgery.sources.safetensors import SafetensorsSource
from surgery.sources.torchfile import TorchFileSource

from support import assert_same_state, resnet18_state, save_as, snapshot

FORMS = ("safetensors", "sharded_safetensors", "pth")


def _save(form: str, sd: dict[str, torch.Tensor], folder) -> str:
    if form == "pth":
        torch.save(sd, folder / "model.pth")
        return str(folder / "model.pth")
    return save_as(form, sd, folder)


def _oracle(sd: dict[str, torch.Tensor]) -> nn.Module:
    model = torchvision.models.resnet18()
    model.load_state_dict(sd)  # copies, casting to the model's float32
    return model


def _build(how: str) -> nn.Module:
    torch.manual_seed(1)
    if how == "empty_init":
        with surgery.empty_init():
            return torchvision.models.resnet18()
    return torchvision.models.resnet18()


def _same(model: nn.Module, oracle: nn.Module) -> None:
    got, want = model.state_dict(), oracle.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


@pytest.mark.parametrize("half", [False, True], ids=["same-dtype", "cast"])
@pytest.mark.parametrize("build", ["normal", "empty_init"])
@pytest.mark.parametrize("form", FORMS)
def test_parallel_equals_serial_equals_the_oracle(tmp_path, monkeypatch, form, build, half):
    sd = resnet18_state()
    if half:  # read and cast in pieces: make the pieces small, so there are many
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
        monkeypatch.setattr(filebytes, "_CAST_PIECE", 4096)
    path = _save(form, sd, tmp_path)
    oracle = _oracle(sd)
    for threads in ("1", "4"):
        monkeypatch.setenv(parallel.ENV, threads)
        model = _build(build)
        report = surgery.load_partial(model, path)
        assert not report.missing and bool(report.cast) == half
        _same(model, oracle)


def test_reads_run_at_once_in_the_pool(tmp_path, monkeypatch):
    path = _save("safetensors", resnet18_state(), tmp_path)
    monkeypatch.setenv(parallel.ENV, "3")
    meet = threading.Barrier(3, timeout=20)  # the first three reads run at the same time
    names: set[str] = set()
    first = itertools.count()
    real = SafetensorsSource._read_into

    def read_into(self, key, out):
        names.add(threading.current_thread().name)
        if next(first) < 3:
            meet.wait()  # broken (the load fails) unless three reads are running at once
        real(self, key, out)

    monkeypatch.setattr(SafetensorsSource, "_read_into", read_into)
    model = _build("normal")
    surgery.load_partial(model, path)
    assert len(names) == 3 and all(n.startswith("surgery-read") for n in names)
    _same(model, _oracle(resnet18_state()))


def _failing(monkeypatch, cls, bad: str) -> list[str]:
    """Make reading ``bad`` fail as a file cut short would; the keys read are recorded."""
    real = cls._read_into
    read: list[str] = []

    def read_into(self, key, out):
        if key == bad:
            raise CheckpointError(f"'{self.description}' ended early while reading a tensor")
        real(self, key, out)
        read.append(key)

    monkeypatch.setattr(cls, "_read_into", read_into)
    return read


@pytest.mark.parametrize("form", ["safetensors", "pth"])
def test_a_failing_read_in_a_worker_leaves_an_empty_init_model_untouched(
    tmp_path, monkeypatch, form
):
    path = _save(form, resnet18_state(), tmp_path)
    monkeypatch.setenv(parallel.ENV, "4")
    cls = SafetensorsSource if form == "safetensors" else TorchFileSource
    read = _failing(monkeypatch, cls, "layer2.0.conv1.weight")
    model = _build("empty_init")
    params = dict(model.named_parameters())
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(CheckpointError, match="ended early"):
        surgery.load_partial(model, path)
    assert read, "no other read ran"
    assert all(p is params[n] and p.is_meta for n, p in model.named_parameters())
    for k, v in model.named_buffers():
        assert torch.equal(v, bufs[k]), k


def test_a_failing_first_read_leaves_a_normal_model_bit_identical(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    save_file(nn.Sequential(nn.Linear(64, 64), nn.Linear(8, 8)).state_dict(), str(path))
    monkeypatch.setenv(parallel.ENV, "1")
    _failing(monkeypatch, SafetensorsSource, "0.weight")  # the largest: read first
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(8, 8))
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match="ended early"):
        surgery.load_partial(model, path)
    assert_same_state(model, snap)


def test_a_read_failing_after_others_says_the_model_is_partly_loaded(tmp_path, monkeypatch):
    sd = resnet18_state()
    path = _save("safetensors", sd, tmp_path)
    monkeypatch.setenv(parallel.ENV, "1")
    smallest = min(sd, key=lambda k: sd[k].nbytes)  # read after every larger tensor
    _failing(monkeypatch, SafetensorsSource, smallest)
    model = _build("normal")
    with pytest.raises(LoadError, match=r"ended early.*read before this failure.*partly loaded"):
        surgery.load_partial(model, path)


def test_the_pool_size_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(parallel.ENV, raising=False)
    assert 1 <= parallel.read_threads() <= 4
    monkeypatch.setenv(parallel.ENV, "7")
    assert parallel.read_threads() == 7
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(parallel.ENV, bad)
        with pytest.raises(UsageError, match="SURGERY_READ_THREADS"):
            parallel.read_threads()


def test_a_failure_stops_new_reads(monkeypatch):
    started: list[str] = []
    gate = threading.Event()

    def read(key, out):
        started.append(key)
        if key == "a":
            raise CheckpointError("a failed")
        gate.wait(5)

    jobs = [(k, torch.empty(100 - i)) for i, k in enumerate("abcdefgh")]
    done: list[str] = []
    timer = threading.Timer(0.5, gate.set)
    timer.start()
    with pytest.raises(CheckpointError, match="a failed"):
        parallel.read_all(jobs, read, done.append, threads=2)
    timer.cancel()
    assert len(started) <= 3  # 'a', the one beside it, at most one more before the stop
    assert "a" not in done


def test_safetensors_still_reads_what_load_file_reads(tmp_path, monkeypatch):
    sd = resnet18_state()
    path = _save("safetensors", sd, tmp_path)
    monkeypatch.setenv(parallel.ENV, "4")
    source = SafetensorsSource(tmp_path / "model.safetensors")
    try:
        outs = {k: torch.empty_like(v) for k, v in sd.items()}
        source.read_many_into(outs)
    finally:
        source.close()
    plain = load_file(path)
    for k, v in outs.items():
        assert torch.equal(v, plain[k]), k
