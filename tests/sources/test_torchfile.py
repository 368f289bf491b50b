"""Torch files read by surgery's own restricted unpickler (surgery/sources/torchformat.py).

Values are compared with plain ``torch.load`` (``weights_only=True`` where torch can read the
file, ``weights_only=False`` for what only a trusted load reads) + the entry +
``load_state_dict``; hostile files end in a SurgeryError with the model bit-identical.
"""

from __future__ import annotations

import collections
import io
import itertools
import os
import pickle
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import surgery
from surgery import cli
from surgery.errors import CheckpointError, SurgeryError, UnsafeCheckpointError, UsageError
from surgery.sources.torchfile import load_object
from surgery.sources.torchformat import read_torch

from support import SmallCNN, assert_load_refused, assert_same_state, snapshot

ROOT = Path(__file__).resolve().parents[2]


def _copies(n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` same-shaped, different state dicts of SmallCNN (BatchNorm statistics too)."""
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = SmallCNN()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(seed + 1)
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    return out


def _oracle(path: Path, container: list[str]) -> SmallCNN:
    """Plain torch: load the file, take the entry, ``load_state_dict``."""
    obj = torch.load(path, weights_only=True)
    for part in container:
        obj = obj[part]
    model = SmallCNN()
    model.load_state_dict(obj)
    return model


def _save(obj: object, path: Path) -> None:
    legacy = path.name.startswith("legacy")
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


# --------------------------------------------------------------------------- same-shaped copies

# (entries holding a copy of the model, the entry surgery picks by default or None)
LAYOUTS = [
    (("model_ema", "model"), "model"),  # the example
    (("state_dict", "state_dict_ema"), "state_dict"),  # timm's train.py
    (("student", "teacher"), None),  # DINO: neither is the obvious one
    (("state_dict", "ema_state_dict", "model_ema"), "state_dict"),  # Lightning + EMA callback
]


@pytest.mark.parametrize("name", ["c.pth", "c.pt", "c.ckpt", "legacy.pth"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "+".join(x[0]))
def test_every_entry_loads_its_own_values_in_every_key_order(tmp_path, name, layout):
    entries, default = layout
    copies = _copies(len(entries))
    for order in itertools.permutations(range(len(entries))):
        path = tmp_path / f"{''.join(map(str, order))}{name}"
        _save({entries[i]: copies[i] for i in order} | {"epoch": 3}, path)
        for entry in entries:
            model = SmallCNN()
            report = surgery.load_partial(model, path, entry=entry, strict=True)
            assert report.ok and report.source.endswith(f"[{entry!r}]")
            assert_same_state(model, snapshot(_oracle(path, [entry])))
        model = SmallCNN()
        if default is None:
            with pytest.raises(CheckpointError, match="entry="):
                surgery.load_partial(model, path)
            continue
        report = surgery.load_partial(model, path, strict=True)
        assert report.source.endswith(f"[{default!r}]")
        assert_same_state(model, snapshot(_oracle(path, [default])))


def test_views_sharing_one_storage_and_nested_entries(tmp_path):
    big = torch.arange(64.0)
    a, b = _copies(2)
    a["fc.bias"] = big[10:20]  # a view into the middle of a storage shared with 'x'
    b["fc.bias"] = big[30:40]
    obj = {"x": {"w": big.view(8, 8).t()}, "inner": {"ema": a}, "model": b}
    for name in ("n.pth", "legacy.pth"):
        path = tmp_path / name
        _save(obj, path)
        for entry, container in (("inner.ema", ["inner", "ema"]), ("model", ["model"])):
            model = SmallCNN()
            surgery.load_partial(model, path, entry=entry, strict=True)
            assert_same_state(model, snapshot(_oracle(path, container)))
        sd = surgery.read_checkpoint(path, entry="x")
        assert torch.equal(sd["w"], big.view(8, 8).t())


def test_offsets_come_from_each_storages_record(tmp_path):
    a, b = _copies(2)
    path = tmp_path / "c.pth"
    torch.save({"model_ema": a, "model": b}, path)
    obj = read_torch(path, kind="zip")
    raw = path.read_bytes()
    for entry, sd in (("model_ema", a), ("model", b)):
        for k, t in obj.value[entry].items():
            offset = obj.offset(t)
            assert offset is not None, k
            expected = sd[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            assert raw[offset : offset + len(expected)] == expected, (entry, k)


# --------------------------------------------------------------------------- pickle protocols


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_protocols_load_like_a_trusted_torch_load(tmp_path, protocol, legacy):
    sd = _copies(1)[0] | {"t": torch.arange(12.0).view(3, 4).t(), "h": torch.ones(3).half()}
    path = tmp_path / "p.pth"
    torch.save(sd, path, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy)
    expected = torch.load(path, weights_only=False)  # the oracle (weights-only stops at p4)
    got = surgery.read_checkpoint(path)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype, k


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_code_in_a_pickle_never_runs_and_is_named(tmp_path, protocol):
    marker = tmp_path / "PWNED"
    sd = _copies(1)[0]
    torch.save(sd | {"evil": _Payload(marker)}, tmp_path / "in.pth", pickle_protocol=protocol)
    model = SmallCNN()
    before = snapshot(model)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system") as err:
        surgery.load_partial(model, tmp_path / "in.pth")
    msg = str(err.value)
    assert "in.pth" in msg and msg.index("system") < msg.index("trust_pickle=True")
    assert_same_state(model, before)
    # Beside the weights it is skipped, unread, and said.
    torch.save({"state_dict": sd, "evil": _Payload(marker)}, tmp_path / "by.pth")
    report = surgery.load_partial(model, tmp_path / "by.pth", strict=True)
    assert any("'evil'" in n and "system" in n for n in report.notes)
    assert_same_state(model, sd)
    assert not marker.exists()


# --------------------------------------------------------------------------- raw numpy pickles


def _detectron2(tmp_path: Path, protocol: int) -> tuple[Path, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    arrays = {k: v.numpy().copy() for k, v in SmallCNN().state_dict().items()}
    arrays["fc.weight"] = arrays["fc.weight"].astype(">f4")  # byte order is kept by value
    path = tmp_path / f"model_final_p{protocol}.pkl"
    with open(path, "wb") as f:
        blob = {"model": arrays, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}
        pickle.dump(blob, f, protocol=protocol)
    return path, arrays


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_detectron2_pickle_of_arrays_loads(tmp_path, protocol):
    path, arrays = _detectron2(tmp_path, protocol)
    model = SmallCNN()
    report = surgery.load_partial(model, path, strict=True)
    assert report.ok and report.source.endswith("['model']")
    for k, v in model.state_dict().items():
        assert torch.equal(v, torch.from_numpy(arrays[k].astype(arrays[k].dtype.newbyteorder("="))))
    trusted = surgery.read_checkpoint(path, trust_pickle=True)  # pickle.load, as detectron2
    assert all(torch.equal(trusted[k], v) for k, v in model.state_dict().items())


def test_python2_pickle_of_arrays_loads(tmp_path):
    # What detectron2's model zoo holds: Python 2 pickles whose array data are str.
    data = np.arange(6, dtype="<f4").tobytes()
    blob = (
        b"\x80\x02}q\x00(U\x05modelq\x01}q\x02U\x01wq\x03"
        b"cnumpy.core.multiarray\n_reconstruct\nq\x04cnumpy\nndarray\nq\x05K\x00\x85U\x01b\x87R"
        b"(K\x01K\x02K\x03\x86cnumpy\ndtype\nU\x02f4K\x00K\x01\x87R"
        b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x18" + data + b"tbsu."
    )
    path = tmp_path / "py2.pkl"
    path.write_bytes(blob)
    expected = pickle.loads(blob, encoding="latin1")["model"]["w"]  # the oracle
    got = surgery.read_checkpoint(path)
    assert torch.equal(got["w"], torch.from_numpy(expected))


def test_object_arrays_and_code_in_a_raw_pickle_are_refused(tmp_path):
    path, arrays = _detectron2(tmp_path, 2)
    arrays["bad"] = np.array([1, "x"], dtype=object)
    with open(path, "wb") as f:
        pickle.dump({"model": arrays}, f, protocol=2)
    model = SmallCNN()
    before = snapshot(model)
    with pytest.raises(UnsafeCheckpointError, match="dtype object"):
        surgery.load_partial(model, path)
    marker = tmp_path / "PWNED"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": _Payload(marker)}}, f, protocol=4)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        surgery.load_partial(model, path)
    assert not marker.exists()
    assert_same_state(model, before)


# --------------------------------------------------------------------------- allow_globals


class HParams:
    """A training script's hyper-parameter object, as Lightning saves it."""

    def __init__(self, width: int = 4) -> None:
        self.width = width


def test_lightning_hyper_parameters_are_skipped_and_said(tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self, cfg: HParams) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = SmallCNN()

        def training_step(self, batch, i):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(3)
    module = Tiny(HParams())
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 3, 4, 4)))
    trainer = L.Trainer(
        max_steps=1,
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    # The oracle: torch's weights-only loader refuses the whole file; a trusted load gives it.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    expected = torch.load(path, weights_only=False)["state_dict"]
    model = SmallCNN()
    report = surgery.load_partial(model, path, remap=[(r"^net\.", "")], strict=True)
    assert report.ok
    assert_same_state(model, {k.removeprefix("net."): v for k, v in expected.items()})
    assert any("'hyper_parameters'" in n and "HParams" in n for n in report.notes)
    # Admitted by name, it is read (and nothing is said).
    report = surgery.load_partial(
        model, path, remap=[(r"^net\.", "")], allow_globals=[HParams], strict=True
    )
    assert not any("not read" in n for n in report.notes)


def test_a_class_inside_the_state_dict_is_refused_until_allowed(tmp_path):
    sd = _copies(1)[0]
    path = tmp_path / "c.pth"
    torch.save({"state_dict": {**sd, "cfg_extra_state": HParams()}}, path)
    model = SmallCNN()
    before = snapshot(model)
    for call in (surgery.load_partial, surgery.plan_load):
        with pytest.raises(UnsafeCheckpointError, match=r"HParams.*allow_globals") as err:
            call(model, path)
        assert "['state_dict']" in str(err.value)
    assert_same_state(model, before)
    with pytest.raises(UsageError, match="allow_globals"):
        surgery.load_partial(model, path, allow_globals="HParams")
    for allowed in ([HParams], [f"{__name__}.HParams"]):
        plan = surgery.plan_load(model, path, allow_globals=allowed)
        assert plan.find("conv1.weight")
        model = SmallCNN()
        plan.apply(model)  # the plan keeps what it was made with
        assert_same_state(model, sd)
        assert surgery.read_checkpoint(path, allow_globals=allowed).keys() == sd.keys()


def _module_in_folder(folder: Path, name: str, body: str) -> types.ModuleType:
    """A module ``name`` as a training script would have it, for pickling only: its file in
    ``folder`` is not run here."""
    module = types.ModuleType(name)
    exec(textwrap.dedent(body), module.__dict__)
    for v in vars(module).values():
        if isinstance(v, type):
            v.__module__ = name
    return module


MODELING = """\
import pathlib
pathlib.Path("IMPORTED").write_text("modeling_x ran")


class Thing:
    def __init__(self):
        self.size = 3
"""


@pytest.fixture()
def modeling_folder(tmp_path, monkeypatch):
    """A checkpoint naming ``modeling_x.Thing`` beside a ``modeling_x.py`` that, if imported,
    writes a marker file."""
    module = _module_in_folder(tmp_path, "modeling_x", "class Thing:\n    size = 3\n")
    monkeypatch.setitem(sys.modules, "modeling_x", module)
    sd = SmallCNN().state_dict()
    torch.save({"state_dict": {**sd, "x_extra_state": module.Thing()}}, tmp_path / "inside.pt")
    torch.save(module.Thing(), tmp_path / "whole.pt")
    torch.save({"state_dict": sd, "cfg": module.Thing()}, tmp_path / "beside.pt")
    monkeypatch.delitem(sys.modules, "modeling_x")
    (tmp_path / "modeling_x.py").write_text(MODELING)
    return tmp_path


def _surgery(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run(
        [sys.executable, "-m", "surgery", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


@pytest.mark.distributed  # spawns a process
def test_command_line_explains_a_refusal_without_importing_anything(modeling_folder):
    # As run by a user: python -m surgery puts the current folder first on sys.path.
    out = _surgery(modeling_folder, "inspect", "whole.pt")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "modeling_x.Thing" in out.stderr and "--allow-global" in out.stderr
    assert not (modeling_folder / "IMPORTED").exists()


def test_command_line_imports_only_what_the_user_names(modeling_folder, monkeypatch, capsys):
    monkeypatch.chdir(modeling_folder)  # importable from here, as under python -m
    for name in ("inside.pt", "whole.pt"):
        for argv in (["inspect", name], ["diff", name, "--model", "support:SmallCNN"]):
            assert cli.main(argv) == 2
            err = capsys.readouterr().err
            assert "modeling_x.Thing" in err and "--allow-global MODULE.NAME for each" in err
    assert cli.main(["inspect", "beside.pt"]) == 0
    out = capsys.readouterr().out
    assert "not read: 'cfg'" in out and "--allow-global MODULE.NAME for each" in out
    assert "modeling_x" not in sys.modules and not (modeling_folder / "IMPORTED").exists()
    assert cli.main(["inspect", "inside.pt", "--allow-global", "no_such_mod.Thing"]) == 2
    err = capsys.readouterr().err
    assert "--allow-global no_such_mod.Thing: no such class" in err and "allow_globals" not in err
    # Named by the user, it is imported (the user's choice) and admitted.
    try:
        assert cli.main(["inspect", "inside.pt", "--allow-global", "modeling_x.Thing"]) == 0
        assert (modeling_folder / "IMPORTED").exists()
    finally:
        sys.modules.pop("modeling_x", None)


# --------------------------------------------------------------------------- hostile files


class _Storage:
    """A storage as a crafted pickle names it (a persistent id)."""

    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Crafter(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def crafted_zip(path: Path, obj: object, records: dict[str, bytes]) -> Path:
    """A torch zip whose pickle is ``obj`` (with crafted tensors) and data ``records``."""
    buf = io.BytesIO()
    _Crafter(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", "little")
        for key, data in records.items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")
    return path


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(4))
        self.b = nn.Parameter(torch.zeros(3))


def assert_refused(path: Path, match: str | None = None) -> SurgeryError:
    return assert_load_refused(Two(), path, match)


def test_crafted_file_loads_when_sound(tmp_path):
    store = _Storage("0", 7)
    data = torch.arange(7.0).numpy().tobytes()
    obj = {"a": _Tensor(store, 0, (4,), (1,)), "b": _Tensor(store, 4, (3,), (1,))}
    model = Two()
    surgery.load_partial(model, crafted_zip(tmp_path / "ok.pth", obj, {"0": data}), strict=True)
    assert torch.equal(model.b, torch.tensor([4.0, 5.0, 6.0]))


@pytest.mark.parametrize(
    "a, numel, why",
    [
        ((0, (40,), (1,)), 7, "needs 160 bytes"),  # past the end of its storage
        ((5, (4,), (1,)), 7, "needs"),  # an offset pushing it out
        ((0, (4,), (3,)), 7, "needs"),  # a stride pushing it out
        ((0, (-4,), (1,)), 7, "negative"),
        ((0, (2**62, 0), (1, 1)), 7, "huge"),
        ((-1, (4,), (1,)), 7, "offset"),
        ((0, (4,), (1,)), 70, "holds 28 bytes but its storage needs 280"),  # record too short
    ],
)
def test_tensors_reaching_outside_their_record_are_refused(tmp_path, a, numel, why):
    store = _Storage("0", numel)
    obj = {"a": _Tensor(store, *a), "b": _Tensor(store, 0, (3,), (1,))}
    path = crafted_zip(tmp_path / "bad.pth", obj, {"0": torch.arange(7.0).numpy().tobytes()})
    err = assert_refused(path, why)
    assert "bad.pth" in str(err)


def test_missing_record_and_bad_persistent_ids_are_refused(tmp_path):
    obj = {"a": _Tensor(_Storage("9", 4), 0, (4,), (1,))}
    assert_refused(crafted_zip(tmp_path / "m.pth", obj, {"0": bytes(16)}), "data/9")
    obj = {"a": _Tensor(_Storage("../../etc/passwd", 4), 0, (4,), (1,))}
    assert_refused(crafted_zip(tmp_path / "p.pth", obj, {"0": bytes(16)}), "is missing")


def test_zip64_locator_claiming_several_disks_is_refused(tmp_path):
    torch.save({"a": torch.ones(4), "b": torch.ones(3)}, tmp_path / "ok.pth")
    raw = (tmp_path / "ok.pth").read_bytes()
    end = raw.rfind(b"PK\x05\x06")
    locator = b"PK\x06\x07" + (0).to_bytes(4, "little") + (0).to_bytes(8, "little")
    locator += (3).to_bytes(4, "little")  # three disks
    path = tmp_path / "disks.pth"
    path.write_bytes(raw[:end] + locator + raw[end:])
    err = assert_refused(path, "disks.pth")
    assert isinstance(err, CheckpointError)
    with pytest.raises(CheckpointError):
        surgery.read_checkpoint(path)
    assert cli.main(["inspect", str(path)]) == 2


TRUNCATE = """
import os, sys, torch, surgery
from surgery.loading import options as load
from surgery.errors import CheckpointError
real = load.open_source

def opened_then_truncated(ckpt, **kwargs):
    source = real(ckpt, **kwargs)
    os.truncate(ckpt, 200)  # the storages are gone while the load runs
    return source

load.open_source = opened_then_truncated
for path in sys.argv[1:]:
    model = torch.nn.Linear(64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        surgery.load_partial(model, path)
    except CheckpointError as e:
        assert "ended early" in str(e), e
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        print("refused", path)
"""


@pytest.mark.distributed  # spawns a process
def test_file_truncated_during_the_load_is_refused_not_a_crash(tmp_path):
    # A non-contiguous tensor used to be copied through the mapping: SIGBUS past the end. Run
    # in a child process, so that a crash fails the test instead of the test run.
    paths = [tmp_path / "t.pth", tmp_path / "legacy.pth"]
    for path in paths:
        state = {"weight": torch.randn(64, 64).t(), "bias": torch.randn(64)}
        _save(state, path)
    argv = [sys.executable, "-c", TRUNCATE, *map(str, paths)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert out.returncode == 0, (out.returncode, out.stderr)
    assert out.stdout.split() == [x for p in paths for x in ("refused", str(p))]


PEAK = """
import resource, runpy, sys
sys.argv = ["surgery", "inspect", sys.argv[1]]
import surgery.cli  # imports done: the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    runpy.run_module("surgery", run_name="__main__")
except SystemExit:
    pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


@pytest.mark.distributed  # spawns a process
@pytest.mark.slow
def test_command_line_advice_on_a_zip_bomb_costs_no_memory(tmp_path):
    # A real torch file whose pickle record, recompressed, inflates to 320 MB.
    torch.save({"a": torch.ones(4)}, tmp_path / "ok.pth")
    bomb = tmp_path / "bomb.pth"
    with (
        zipfile.ZipFile(tmp_path / "ok.pth") as zi,
        zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zo,
    ):
        for info in zi.infolist():
            if not info.filename.endswith("/data.pkl"):
                zo.writestr(info.filename, zi.read(info))
                continue
            with zo.open(info.filename, "w", force_zip64=True) as w:
                w.write(zi.read(info))  # the pickle, then zeros after its STOP
                for _ in range(20):
                    w.write(bytes(1 << 24))
    assert bomb.stat().st_size < 4 << 20
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(bomb)], capture_output=True, text=True, check=True
    )
    assert "inflates to" in out.stderr
    assert int(out.stdout.split()[-1]) < 100  # MB of peak memory beyond the imports


def test_a_torch_zip_inside_a_larger_file_is_read_at_its_window(tmp_path):
    # How a torch.distributed.checkpoint .distcp file stores each tensor: torch.save bytes at
    # an offset of a bigger file.
    buf = io.BytesIO()
    expected = {"w": torch.randn(5, 3), "v": torch.arange(7)}
    torch.save(expected, buf)
    blob = buf.getvalue()
    path = tmp_path / "__0_0.distcp"
    path.write_bytes(b"x" * 1000 + blob + b"y" * 333)
    got = read_torch(path, kind="zip", window=(1000, len(blob)))
    assert all(torch.equal(got.value[k], expected[k]) for k in expected)
    raw = path.read_bytes()
    offset = got.offset(got.value["w"])
    assert raw[offset : offset + 60] == expected["w"].numpy().tobytes()
    for window in ((0, 1000), (1000, len(blob) // 2), (len(raw) - 5, 100), (-1, 10)):
        with pytest.raises(CheckpointError, match="distcp"):
            read_torch(path, kind="zip", window=window)
    # The same through load_object, as a DCP reader calls it.
    obj = load_object(path, window=(1000, len(blob)))
    assert torch.equal(obj["v"], expected["v"])


def test_every_kind_of_tensor_reads_as_torch_load_reads_it(tmp_path):
    torch.manual_seed(4)
    with_attr = torch.arange(6.0).view(2, 3)
    with_attr.note = "kept"
    param = nn.Parameter(torch.ones(3))
    param.tag = 7
    scales = torch.tensor([0.1, 0.2, 0.3])
    obj = {
        "nested": torch.nested.nested_tensor([torch.ones(2, 3), torch.arange(6.0).view(3, 2)]),
        "csr": torch.eye(3).to_sparse_csr(),
        "coo": torch.eye(3).to_sparse(),
        "meta": torch.empty(2, 3, device="meta"),
        "conj": torch.tensor([1 + 2j, 3 - 1j]).conj(),
        "attr": with_attr,
        "param": param,
        "qc": torch.quantize_per_channel(
            torch.randn(3, 4), scales, torch.tensor([0, 1, 2]), 0, torch.qint8
        ),
        "qt": torch.quantize_per_tensor(torch.randn(4), 0.1, 2, torch.quint8),
        "bf16": torch.randn(3).bfloat16(),
        "u16": torch.tensor([1, 2, 3]).to(torch.uint16),
        "f8": torch.ones(2).to(torch.float8_e5m2),
        "plain": [torch.Size([2, 3]), torch.device("cpu"), torch.float16],
    }
    path = tmp_path / "kinds.pth"
    torch.save(obj, path)
    expected = torch.load(path, weights_only=False)  # the oracle
    got = read_torch(path, kind="zip").value
    assert got["plain"] == expected["plain"]
    for k, a in expected.items():
        if k == "plain":
            continue
        b = got[k]
        assert type(b) is type(a) and b.dtype == a.dtype and b.layout == a.layout, k
        assert getattr(b, "note", None) == getattr(a, "note", None), k
        assert getattr(b, "tag", None) == getattr(a, "tag", None), k
        if a.is_nested:
            assert all(torch.equal(x, y) for x, y in zip(a.unbind(), b.unbind(), strict=True))
        elif a.is_meta:
            assert b.is_meta and b.shape == a.shape
        elif a.is_quantized:
            assert torch.equal(b.dequantize(), a.dequantize()) and b.qscheme() == a.qscheme()
        elif a.layout != torch.strided:
            assert torch.equal(b.to_dense(), a.to_dense())
        else:
            assert b.is_conj() == a.is_conj()
            a, b = a.resolve_conj(), b.resolve_conj()
            assert torch.equal(b.view(torch.uint8), a.view(torch.uint8)), k


def test_skipped_entries_are_named_at_every_level_of_the_path(tmp_path):
    sd = _copies(1)[0]
    path = tmp_path / "n.pth"
    torch.save({"model": {"module": sd, "cfg": HParams()}, "hp": HParams(), "epoch": 1}, path)
    model = SmallCNN()
    report = surgery.load_partial(model, path, strict=True)
    assert_same_state(model, sd)
    assert any("not read: 'hp', 'model.cfg'" in n for n in report.notes), report.notes
