"""Hostile and broken ``torch.distributed.checkpoint`` folders: refused, model left as it was.

Each test writes a real DCP folder with ``dcp.save`` in ``tmp_path``, then breaks it as an
attacker or a bad copy would: code in the pickled ``.metadata``, storage paths out of the
folder, a missing or truncated data file, chunks that do not cover their tensor, a compressed
(zip bomb) chunk. The sharded (FSDP2) side of the same checks is in
tests/loading/test_distributed.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery
from surgery import cli
from surgery.errors import CheckpointError, SurgeryError, UnsafeCheckpointError

from support import assert_load_refused

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(4, 3))
        self.b = nn.Parameter(torch.zeros(5))


def values(fill: float | None = None) -> dict[str, torch.Tensor]:
    if fill is not None:
        return {"a": torch.full((4, 3), fill), "b": torch.full((5,), fill)}
    return {"a": torch.arange(12.0).reshape(4, 3) + 1, "b": torch.arange(5.0) + 100}


def save(folder: Path, sd: dict | None = None, *, threads: int = 1) -> Path:
    """``dcp.save`` in this process; ``threads=2`` writes two data files, as two ranks do."""
    writer = dcp.FileSystemWriter(str(folder), thread_count=threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(values() if sd is None else sd, storage_writer=writer, no_dist=True)
    return folder


def edit_metadata(folder: Path, edit) -> None:
    """Unpickle ``.metadata`` (trusted: the test wrote it), ``edit`` it, pickle it back."""
    path = folder / ".metadata"
    md = pickle.loads(path.read_bytes())
    edit(md)
    path.write_bytes(pickle.dumps(md))


def storage_of(folder: Path, name: str):
    md = pickle.loads((folder / ".metadata").read_bytes())
    return next(v for k, v in md.storage_data.items() if k.fqn == name)


def assert_refused(ckpt: object, match: str | None = None, **kwargs: object) -> SurgeryError:
    """load_partial raises a SurgeryError matching ``match``; the model is bit-identical."""
    model = Two()
    with torch.no_grad():
        model.a.copy_(torch.full((4, 3), -1.0))
        model.b.copy_(torch.full((5,), -2.0))
    return assert_load_refused(model, ckpt, match, **kwargs)


# --------------------------------------------------------------------------- code execution


class _Payload:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _payload_metadata(folder: Path, marker: Path, where: str) -> None:
    """Put the payload into ``where`` of an otherwise valid ``.metadata`` (or be it)."""
    if where == "whole":
        (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
        return

    def edit(md) -> None:
        if where == "storage_meta":
            md.storage_meta.checkpoint_id = _Payload(marker)
        elif where == "planner_data":
            md.planner_data = {"a": (_Payload(marker),)}
        elif where == "chunk":
            md.state_dict_metadata["b"].chunks[0].sizes = _Payload(marker)

    edit_metadata(folder, edit)


WHERE = ["whole", "storage_meta", "planner_data", "chunk"]


def _entry_points(folder: Path, tmp_path: Path):
    """Every way surgery reads a DCP folder, as callables on a fresh model."""

    def plan_apply(model: nn.Module) -> None:
        plan = json.loads((tmp_path / "plan.json").read_text())
        surgery.LoadPlan.from_dict(plan).apply(model)

    def restore(model: nn.Module) -> None:
        opt = torch.optim.SGD(model.parameters(), momentum=0.9)
        old = {
            "state": {0: {"momentum_buffer": torch.ones(4, 3)}},
            "param_groups": [{"lr": 0.1, "params": [0, 1]}],
        }
        surgery.restore_optimizer(opt, model, old, names=folder)

    def cli_run(*args: str):
        def run(model: nn.Module) -> None:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main([*args])
            if code == 2:
                raise CheckpointError(err.getvalue())
            raise AssertionError(f"exit {code}: {out.getvalue()}")

        return run

    return {
        "load_partial": lambda m: surgery.load_partial(m, folder),
        "plan_load": lambda m: surgery.plan_load(m, folder),
        "read_checkpoint": lambda m: surgery.read_checkpoint(folder),
        "plan.apply": plan_apply,
        "restore_optimizer": restore,
        "inspect": cli_run("inspect", str(folder)),
        "diff": cli_run("diff", str(folder), "--model", "torch.nn:Identity"),
    }


@pytest.mark.parametrize("where", WHERE)
def test_code_in_metadata_never_runs(tmp_path: Path, where: str) -> None:
    folder = save(tmp_path / "ckpt")
    plan = surgery.plan_load(Two(), folder)
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    marker = tmp_path / "PWNED"
    _payload_metadata(folder, marker, where)
    for name, call in _entry_points(folder, tmp_path).items():
        model = Two()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(SurgeryError) as e:
            call(model)
        assert not marker.exists(), f"{name} ran the payload"
        assert "mkdir" in str(e.value) and ".metadata" in str(e.value), name
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), name
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.mkdir.*save the checkpoint") as e:
        surgery.read_checkpoint(folder)
    assert "torch.Size" not in str(e.value)  # only what was refused is named


@pytest.mark.distributed  # spawns a process
def test_code_in_metadata_never_runs_through_the_recipe(tmp_path: Path) -> None:
    from PIL import Image

    folder = save(tmp_path / "ckpt")
    marker = tmp_path / "PWNED"
    _payload_metadata(folder, marker, "storage_meta")
    for cls in ("cat", "dog"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(tmp_path / "data" / cls / f"{i}.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    recipe = [sys.executable, str(ROOT / "recipes" / "resnet18_head.py")]
    args = ["--weights", str(folder), "--data", str(tmp_path / "data"), "--workers", "0"]
    proc = subprocess.run(
        [*recipe, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "mkdir" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_dcp_save_folders_load_like_dcp_load(tmp_path: Path) -> None:
    """Optimizer state, bf16, float8, uint16, int, bool, 0-d, empty, transposed and
    channels_last tensors, two data files: the restricted metadata and chunk readers give what
    plain ``dcp.load`` gives (the oracle)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(1, 3, 5, 5))
    net[0].weight.data = net[0].weight.data.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    extra = {"h": torch.randn(3).bfloat16(), "m": torch.tensor([True, False]), "n": torch.tensor(7)}
    extra["t"] = torch.randn(2, 3).t()  # saved with its strides
    extra["e"] = torch.zeros(0, 5)
    extra["f8"] = torch.randn(4).to(torch.float8_e4m3fn)  # _rebuild_tensor_v3, untyped storage
    extra["u16"] = torch.tensor([1, 2, 60000], dtype=torch.int32).to(torch.uint16)
    sd = {"model": net.state_dict(), "optim": opt.state_dict(), "extra": extra}
    folder = save(tmp_path / "ckpt", sd, threads=2)
    assert len(list(folder.glob("*.distcp"))) == 2
    got = surgery.read_checkpoint(folder, entry="optim")
    got.update({f"model.{k}": v for k, v in surgery.read_checkpoint(folder, entry="model").items()})
    got.update({f"extra.{k}": v for k, v in surgery.read_checkpoint(folder, entry="extra").items()})
    oracle = {
        "model": {k: torch.zeros_like(v) for k, v in net.state_dict().items()},
        "extra": {k: torch.zeros_like(v) for k, v in extra.items()},
    }
    dcp.load(oracle, checkpoint_id=str(folder), no_dist=True)
    for entry in ("model", "extra"):
        for k, v in oracle[entry].items():
            mine = got[f"{entry}.{k}"]
            assert mine.dtype == v.dtype and mine.shape == v.shape, k
            assert torch.equal(_bytes_of(mine), _bytes_of(v)), k
    assert torch.equal(got["state.0.exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # and into a model, strictly
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))
    surgery.load_partial(fresh, folder, entry="model", strict=True)
    for k, v in oracle["model"].items():
        assert torch.equal(fresh.state_dict()[k], v), k


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


# --------------------------------------------------------------------------- storage paths


def _point(folder: Path, name: str, relative_path: str) -> None:
    def edit(md) -> None:
        for k, v in md.storage_data.items():
            if k.fqn == name:
                v.relative_path = relative_path

    edit_metadata(folder, edit)


def test_storage_paths_outside_the_folder_are_refused(tmp_path: Path) -> None:
    outside = save(tmp_path / "other", values(7.0))
    data = next(outside.glob("*.distcp"))
    for rel in ["../other/" + data.name, str(data), "x/../../other/" + data.name]:
        folder = save(tmp_path / f"ckpt{len(rel)}")
        _point(folder, "b", rel)
        err = assert_refused(folder, "outside")
        assert rel in str(err) and ".metadata" in str(err)
        with pytest.raises(CheckpointError, match="outside"):
            surgery.read_checkpoint(folder)


def test_data_file_linked_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    outside = save(tmp_path / "other", values(7.0))
    folder = save(tmp_path / "ckpt")
    (data,) = folder.glob("*.distcp")
    data.unlink()
    data.symlink_to(next(outside.glob("*.distcp")))
    assert_refused(folder, "symlink")
    # a link that stays inside the folder is fine
    folder2 = save(tmp_path / "ckpt2")
    (data2,) = folder2.glob("*.distcp")
    data2.rename(folder2 / "real.bin")
    data2.symlink_to(folder2 / "real.bin")
    model = Two()
    surgery.load_partial(model, folder2)
    assert torch.equal(model.a, values()["a"])


@contextlib.contextmanager
def _deadline(seconds: int):
    def fail(*_):
        raise TimeoutError("the load hung")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_data_file_that_is_a_pipe_is_refused_without_hanging(tmp_path: Path) -> None:
    folder = save(tmp_path / "ckpt")
    (data,) = folder.glob("*.distcp")
    data.unlink()
    os.mkfifo(data)
    with _deadline(20):
        err = assert_refused(folder, "not a regular file")
    assert data.name in str(err)


# --------------------------------------------------------------------------- missing, truncated


def _last_file(folder: Path) -> str:
    """The data file DCP reads last for Two (the one holding 'b')."""
    return storage_of(folder, "b").relative_path


def test_missing_data_file_is_refused_before_any_write(tmp_path: Path) -> None:
    folder = save(tmp_path / "ckpt", threads=2)
    last = _last_file(folder)
    assert storage_of(folder, "a").relative_path != last  # two files, as two ranks write
    (folder / last).unlink()
    err = assert_refused(folder, "does not exist")
    assert last in str(err) and "copy every file the save wrote" in str(err)
    with pytest.raises(CheckpointError, match="does not exist"):
        surgery.read_checkpoint(folder)


@pytest.mark.parametrize("cut", [1, 200, "all"])
def test_truncated_data_file_is_refused_before_any_write(tmp_path: Path, cut) -> None:
    folder = save(tmp_path / "ckpt", threads=2)
    path = folder / _last_file(folder)
    data = path.read_bytes()
    path.write_bytes(b"" if cut == "all" else data[:-cut])
    err = assert_refused(folder, "truncated")
    assert path.name in str(err)
    # on a meta model too (every tensor read into fresh memory)
    with surgery.empty_init():
        model = Two()
    with pytest.raises(CheckpointError, match="truncated"):
        surgery.load_partial(model, folder)
    assert model.a.is_meta and model.b.is_meta


# --------------------------------------------------------------------------- chunks


def _set_chunks(folder: Path, name: str, chunks, size=None) -> None:
    def edit(md) -> None:
        entry = md.state_dict_metadata[name]
        if size is not None:
            entry.size = torch.Size(size)
        entry.chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks]

    edit_metadata(folder, edit)


@pytest.mark.parametrize(
    ("chunks", "match"),
    [
        ([((0, 0), (2, 3))], "cover 6 of its 12"),
        ([], "cover 0 of its 12"),
        ([((0, 0), (4, 3)), ((0, 0), (2, 3))], "overlap"),
        ([((0, 0), (4, 3)), ((2, 0), (1, 3))], "overlap"),
        ([((0, 0), (5, 3))], "outside"),
        ([((0,), (4,))], "dimensions"),
    ],
)
def test_chunks_that_do_not_tile_their_tensor_are_refused(tmp_path: Path, chunks, match) -> None:
    folder = save(tmp_path / "ckpt")
    _set_chunks(folder, "a", chunks)
    err = assert_refused(folder, match)
    assert "'a'" in str(err) and ".metadata" in str(err)
    with pytest.raises(CheckpointError, match=match):
        surgery.read_checkpoint(folder)


@pytest.mark.parametrize("size", [(-12,), (2**62, 4), (2**64,), (1.5,)])
def test_negative_or_overflowing_sizes_are_refused(tmp_path: Path, capsys, size) -> None:
    folder = save(tmp_path / "ckpt")

    def edit(md) -> None:
        md.state_dict_metadata["b"].size = size

    edit_metadata(folder, edit)
    assert_refused(folder, "'b'")
    assert cli.main(["inspect", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert "-12 elements" not in out and "malformed" in err


class _Properties:
    """Pickles as DCP's TensorProperties with a state its __setstate__ rejects."""

    def __init__(self, encoding: object) -> None:
        self.encoding = encoding

    def __reduce__(self):
        from torch.distributed.checkpoint.metadata import TensorProperties

        return (TensorProperties, (), (torch.float32, torch.strided, False, self.encoding, False))


def _set_properties(md, encoding: object) -> None:
    md.state_dict_metadata["b"].properties = _Properties(encoding)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda md: _set_properties(md, 99), "encoding: 99"),
        (lambda md: _set_properties(md, "x"), "encoding: x"),
        (lambda md: setattr(md.state_dict_metadata["b"], "chunks", {"a": 1}), "chunks"),
        (lambda md: setattr(md, "state_dict_metadata", [1, 2]), "not a dict"),
        (lambda md: setattr(md, "storage_data", None), "storage_data"),
        (lambda md: md.state_dict_metadata.update({3: md.state_dict_metadata["b"]}), "3"),
    ],
)
def test_malformed_metadata_fields_are_refused(tmp_path: Path, edit, match) -> None:
    """Fields of the wrong type, and states DCP's own classes reject while being unpickled
    (TensorProperties.__setstate__ with an unknown memory-format encoding): CheckpointError."""
    folder = save(tmp_path / "ckpt")
    edit_metadata(folder, edit)
    err = assert_refused(folder, match)
    assert isinstance(err, CheckpointError) and ".metadata" in str(err)


def test_chunk_without_storage_entry_is_refused(tmp_path: Path) -> None:
    folder = save(tmp_path / "ckpt")

    def edit(md) -> None:
        md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != "b"}

    edit_metadata(folder, edit)
    assert_refused(folder, "no storage entry")


def test_chunk_with_unknown_transform_is_refused_before_any_write(tmp_path: Path) -> None:
    folder = save(tmp_path / "ckpt", threads=2)

    def edit(md) -> None:
        for k, v in md.storage_data.items():
            if k.fqn == "b":
                v.transform_descriptors = ["stream.zstd"]

    edit_metadata(folder, edit)
    assert_refused(folder, "transforms")
    model = Two()
    assert surgery.load_partial(model, folder, skip="b").tensors_loaded == 1  # the rest loads
    assert torch.equal(model.a, values()["a"])


def _brute_tiles(size: tuple[int, ...], chunks) -> bool:
    counts = torch.zeros(size, dtype=torch.int64)
    for offsets, sizes in chunks:
        if any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
            return False
        counts[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] += 1
    return bool((counts == 1).all())


def test_tiling_check_agrees_with_painting_every_element() -> None:
    from surgery.sources.dcp_metadata import tiling_problem

    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hypothesis.settings(max_examples=300, derandomize=True, deadline=None)
    @hypothesis.given(
        size=st.lists(st.integers(0, 5), min_size=0, max_size=3),
        data=st.data(),
    )
    def check(size: list[int], data) -> None:
        n = data.draw(st.integers(0, 6))
        chunks = []
        for _ in range(n):
            offsets = tuple(data.draw(st.integers(0, d)) for d in size)
            sizes = tuple(
                data.draw(st.integers(0, d - o + 1)) for o, d in zip(offsets, size, strict=True)
            )
            chunks.append((offsets, sizes))
        got = tiling_problem(tuple(size), chunks)
        assert (got is None) == _brute_tiles(tuple(size), chunks), (size, chunks, got)

    check()


@pytest.mark.parametrize("layout", ["rows", "grid", "staggered"])
def test_tiling_check_on_thousands_of_chunks(layout: str) -> None:
    """Grid (4096 chunks), 1-D and staggered layouts: exact tilings pass, one moved edge
    fails; checked against painting every element (the oracle)."""
    from surgery.sources.dcp_metadata import tiling_problem

    if layout == "rows":
        size, chunks = (8192, 2), [((i * 2, 0), (2, 2)) for i in range(4096)]
    elif layout == "grid":
        size = (128, 128)
        chunks = [((i * 2, j * 2), (2, 2)) for i in range(64) for j in range(64)]
    else:  # rows split at a different column each: a large grid of edges, checked by sweep
        size = (3000, 3000)
        chunks = [
            c
            for i in range(1500)
            for c in (((2 * i, 0), (2, i + 1)), ((2 * i, i + 1), (2, 2999 - i)))
        ]
    assert tiling_problem(size, chunks) is None
    assert _brute_tiles(size, chunks)
    (o, s), rest = chunks[-1], chunks[:-1]
    moved = [*rest, ((o[0] - 1, o[1]), s)]
    assert "overlap" in tiling_problem(size, moved) and not _brute_tiles(size, moved)
    assert math.prod(size) == sum(math.prod(s) for _, s in chunks)


def test_reader_refuses_to_unpickle_non_tensor_entries(tmp_path: Path) -> None:
    """DCP's reader would torch.load(weights_only=False) a non-tensor entry; surgery's never
    reads one (they are left out of the specs), and refuses if a plan asks."""
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    from surgery.sources.dcp_files import DataFiles, checked_reader
    from surgery.sources.dcp_metadata import read_dcp_metadata

    folder = save(tmp_path / "ckpt", {"a": torch.ones(2), "step": 3})
    assert list(surgery.sources.open_source(folder).specs) == ["a"]
    layout = read_dcp_metadata(folder)
    assert layout.others == ["step"]
    reader = checked_reader(folder, layout.metadata, DataFiles(folder))
    index = MetadataIndex("step")
    empty = torch.Size([])
    item = ReadItem(LoadItemType.BYTE_IO, index, empty, index, empty, empty)
    with pytest.raises(CheckpointError, match="tensors only"):
        reader.read_data(LoadPlan([item]), None)


# --------------------------------------------------------------------------- chunk contents


def _rewrite_chunk(folder: Path, name: str, make_blob) -> None:
    """Replace tensor ``name``'s chunk by ``make_blob(old_blob)``, appended to its data file."""
    info = storage_of(folder, name)
    path = folder / info.relative_path
    data = path.read_bytes()
    blob = make_blob(data[info.offset : info.offset + info.length])
    path.write_bytes(data + blob)

    def edit(md) -> None:
        for k, v in md.storage_data.items():
            if k.fqn == name:
                v.offset, v.length = len(data), len(blob)

    edit_metadata(folder, edit)


def _zip_bomb(inflated: int) -> bytes:
    """A torch.save zip of a 5-element float tensor whose pickle claims a storage of
    ``inflated`` bytes, stored deflated: a few hundred KB that inflate to ``inflated``."""
    ref = io.BytesIO()
    torch.save(torch.zeros(5), ref)
    out = io.BytesIO()
    with zipfile.ZipFile(ref) as zi, zipfile.ZipFile(out, "w") as zo:
        for info in zi.infolist():
            data = zi.read(info)
            if info.filename.endswith("data.pkl"):  # storage numel 5 -> inflated / 4
                at = data.index(b"K\x05t", data.index(b"cpu"))
                data = data[:at] + b"J" + (inflated // 4).to_bytes(4, "little") + data[at + 2 :]
            if "/data/" not in info.filename:
                zo.writestr(info.filename, data)
                continue
            record = zipfile.ZipInfo(info.filename)
            record.compress_type = zipfile.ZIP_DEFLATED
            with zo.open(record, "w", force_zip64=True) as w:
                block = bytes(1 << 20)
                for _ in range(inflated >> 20):
                    w.write(block)
    return out.getvalue()


def _deflated(blob: bytes) -> bytes:
    """The same torch.save zip with every record deflated."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as zi, zipfile.ZipFile(out, "w") as zo:
        for info in zi.infolist():
            zo.writestr(info.filename, zi.read(info), compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def test_compressed_chunk_zip_bomb_is_refused_before_it_inflates(tmp_path: Path) -> None:
    folder = save(tmp_path / "ckpt", threads=2)
    bomb = _zip_bomb(64 << 20)
    assert len(bomb) < (1 << 20)
    _rewrite_chunk(folder, "b", lambda old: bomb)
    err = assert_refused(folder, "compressed")
    assert _last_file(folder) in str(err)


def test_chunk_contents_that_do_not_match_the_metadata_are_refused(tmp_path: Path) -> None:
    cases = {
        "deflated": (_deflated, "compressed"),
        "bigger": (lambda old: _torch_bytes(torch.zeros(50)), "50"),
        "other dtype": (lambda old: _torch_bytes(torch.zeros(5, dtype=torch.float64)), "float64"),
        "view of more": (lambda old: _torch_bytes(torch.zeros(50)[:5]), "200 bytes"),
        "not a zip": (lambda old: b"\0" * len(old), "zip"),
        "code": (lambda old: _torch_bytes(_Evil()), "builtins.print"),
    }
    for name, (make, match) in cases.items():
        folder = save(tmp_path / name.replace(" ", "_"), threads=2)
        _rewrite_chunk(folder, "b", make)
        assert_refused(folder, match)


class _Evil:
    def __reduce__(self):
        return (print, ("ran",))


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_storage_record_past_the_chunk_is_refused(tmp_path: Path) -> None:
    """A record whose directory entry claims more bytes than the chunk holds."""
    folder = save(tmp_path / "ckpt", threads=2)

    def grow(old: bytes) -> bytes:
        ref = zipfile.ZipFile(io.BytesIO(old))
        name = next(i.filename for i in ref.infolist() if "/data/" in i.filename)
        at = old.index(name.encode(), ref.start_dir) - 46  # its central directory entry
        raw = bytearray(old)
        assert raw[at : at + 4] == b"PK\x01\x02"
        raw[at + 20 : at + 28] = (10**6).to_bytes(4, "little") * 2  # both sizes
        return bytes(raw)

    _rewrite_chunk(folder, "b", grow)
    assert_refused(folder, "more than the chunk holds")


def test_zip_bomb_costs_no_memory(tmp_path: Path) -> None:
    """The bomb's inflated size never gets allocated: peak memory grows by far less."""
    import resource

    folder = save(tmp_path / "ckpt", threads=2)
    _rewrite_chunk(folder, "b", lambda old: _zip_bomb(256 << 20))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert_refused(folder, "compressed")
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 100 * 1024


def test_copy_of_a_folder_elsewhere_still_loads(tmp_path: Path) -> None:
    """Relative storage paths: a copied folder reads its own files (not the original's)."""
    folder = save(tmp_path / "ckpt", threads=2)
    shutil.copytree(folder, tmp_path / "copy")
    save(folder, values(7.0), threads=2)  # the original now holds other values
    model = Two()
    surgery.load_partial(model, tmp_path / "copy", strict=True)
    assert torch.equal(model.a, values()["a"]) and torch.equal(model.b, values()["b"])
