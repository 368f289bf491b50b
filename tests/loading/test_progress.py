"""Progress bars on long loads: bytes read, one bar per shard, quiet unless asked or large."""

from __future__ import annotations

import io
import json
import sys
from typing import ClassVar

import pytest
import torch
from safetensors.torch import save_file

import surgery
from surgery import _progress
from surgery.errors import UsageError

from support import SmallCNN, assert_same_state, snapshot

tqdm = pytest.importorskip("tqdm", reason="progress bars need tqdm")


class Recorder(tqdm.tqdm):
    """A tqdm that remembers every bar it made (description, total, bytes counted)."""

    made: ClassVar[list[Recorder]] = []

    def __init__(self, *args, **kwargs) -> None:
        kwargs["file"] = io.StringIO()
        super().__init__(*args, **kwargs)
        Recorder.made.append(self)


@pytest.fixture
def recorder(monkeypatch):
    Recorder.made = []
    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    return Recorder.made


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _nbytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    sd = SmallCNN().state_dict()
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_progress_true_writes_a_bar_of_the_bytes_read(ckpt, capsys):
    path, sd = ckpt
    model = SmallCNN()
    report = surgery.load_partial(model, path, progress=True)
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "100%" in err
    assert report.ok
    assert torch.equal(model.state_dict()["fc.weight"], sd["fc.weight"])


def test_bar_total_is_the_bytes_of_the_loaded_tensors(ckpt, recorder):
    path, sd = ckpt
    surgery.load_partial(SmallCNN(), path, skip="fc", progress=True)
    (bar,) = recorder
    loaded = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    assert bar.total == bar.n == _nbytes(loaded)
    assert bar.desc.startswith("model.safetensors")


def test_bytes_are_counted_in_the_checkpoint_dtype(tmp_path, recorder):
    sd = {k: v.half() if v.is_floating_point() else v for k, v in SmallCNN().state_dict().items()}
    save_file(sd, str(tmp_path / "half.safetensors"))
    report = surgery.load_partial(SmallCNN(), tmp_path / "half.safetensors", progress=True)
    assert report.cast
    assert recorder[0].total == recorder[0].n == _nbytes(sd)


def test_one_bar_per_shard(tmp_path, recorder):
    torch.manual_seed(0)
    sd = SmallCNN().state_dict()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    # Interleaved keys: the load still reads one shard, then the other.
    shards: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for i, (k, v) in enumerate(sd.items()):
        shards[names[i % 2]][k] = v
    for name, tensors in shards.items():
        save_file(tensors, str(tmp_path / name))
    weight_map = {k: n for n, tensors in shards.items() for k in tensors}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    model = SmallCNN()
    surgery.load_partial(model, index, progress=True)
    assert [b.desc for b in recorder] == names
    assert [b.total for b in recorder] == [_nbytes(shards[n]) for n in names]
    assert all(b.n == b.total for b in recorder)
    assert_same_state(model, sd)


def test_progress_false_and_none_write_nothing(ckpt, capsys, monkeypatch):
    path, _ = ckpt
    surgery.load_partial(SmallCNN(), path, progress=False)
    surgery.load_partial(SmallCNN(), path)  # None, and captured stderr is not a terminal
    assert capsys.readouterr().err == ""
    # On a terminal, None still says nothing for a small load ...
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    surgery.load_partial(SmallCNN(), path)
    assert term.getvalue() == ""
    # ... and shows the bar once the load reads more than the threshold.
    monkeypatch.setattr(_progress, "LARGE", 100)
    surgery.load_partial(SmallCNN(), path)
    assert "model.safetensors" in term.getvalue()


def test_false_and_dry_run_stay_quiet_on_a_terminal(ckpt, monkeypatch):
    path, _ = ckpt
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(_progress, "LARGE", 0)
    surgery.load_partial(SmallCNN(), path, progress=False)
    surgery.load_partial(SmallCNN(), path, dry_run=True)  # a dry run reads nothing
    assert term.getvalue() == ""


def test_plan_apply_and_apply_plan_take_progress(ckpt, recorder):
    path, sd = ckpt
    model = SmallCNN()
    plan = surgery.plan_load(model, path)
    plan.apply(model, progress=True)
    surgery.apply_plan(model, plan, progress=False)
    assert len(recorder) == 1 and recorder[0].total == _nbytes(sd)


def test_without_tqdm(ckpt, monkeypatch, capsys):
    path, sd = ckpt
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    model = SmallCNN()
    before = snapshot(model)
    with pytest.raises(UsageError, match="pip install tqdm"):
        surgery.load_partial(model, path, progress=True)
    assert_same_state(model, before)
    with pytest.raises(UsageError, match="tqdm"):
        surgery.plan_load(model, path).apply(model, progress=True)
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setattr(_progress, "LARGE", 0)
    report = surgery.load_partial(model, path)  # None: no bar, no error
    assert report.ok and sys.stderr.getvalue() == ""
    assert_same_state(model, sd)


@pytest.mark.parametrize("bad", ["yes", 1, 0.5])
def test_bad_progress_values(ckpt, bad):
    with pytest.raises(UsageError, match="progress must be"):
        surgery.load_partial(SmallCNN(), ckpt[0], progress=bad)
