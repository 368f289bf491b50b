"""Hostile and broken checkpoint files: refused with a SurgeryError, model left as it was.

Each test builds its file in ``tmp_path`` with the real libraries, then breaks it the way an
attacker or a bad download would.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery import cli
from surgery.errors import CheckpointError, LoadError, SurgeryError, UnsafeCheckpointError
from surgery.sources import torchformat

from support import assert_load_refused

apply_module = importlib.import_module("surgery.loading.placements.local")


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(4))
        self.b = nn.Parameter(torch.zeros(3))


def values() -> dict[str, torch.Tensor]:
    return {"a": torch.arange(4.0) + 1, "b": torch.arange(3.0) + 10}


def assert_refused(ckpt: object, match: str | None = None, **kwargs: object) -> SurgeryError:
    """load_partial raises a SurgeryError naming ``match`` and leaves the model unchanged."""
    return assert_load_refused(Two(), ckpt, match, **kwargs)


def rewrite_zip(src: Path, dst: Path, edit) -> None:
    """Copy a torch zip record by record through ``edit(name, data) -> data``."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            zo.writestr(info.filename, edit(info.filename, zi.read(info)))


# --------------------------------------------------------------------------- folder boundary


def sharded(folder: Path, shard: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": shard, "b": shard}}))
    return index


def test_index_entry_outside_its_folder_is_refused(tmp_path: Path) -> None:
    save_file(values(), tmp_path / "other.safetensors")
    for shard in ["../other.safetensors", str(tmp_path / "other.safetensors"), "x/../../o"]:
        err = assert_refused(sharded(tmp_path / "ckpt", shard), "outside the index's folder")
        assert shard in str(err)


def test_symlinked_shard_pointing_outside_is_refused(tmp_path: Path) -> None:
    save_file(values(), tmp_path / "secret.safetensors")
    index = sharded(tmp_path / "ckpt", "w.safetensors")
    os.symlink(tmp_path / "secret.safetensors", tmp_path / "ckpt" / "w.safetensors")
    assert_refused(index, "symlink")


def test_symlinks_inside_the_folder_and_hub_cache_layout_load(tmp_path: Path) -> None:
    # A hub cache: the snapshot's index and shards are links into the repo's blob folder.
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    save_file(values(), blobs / "h1")
    (blobs / "h2").write_text(
        json.dumps({"weight_map": {"a": "w.safetensors", "b": "w.safetensors"}})
    )
    os.symlink(blobs / "h1", snap / "w.safetensors")
    os.symlink(blobs / "h2", snap / "model.safetensors.index.json")
    model = Two()
    surgery.load_partial(model, snap / "model.safetensors.index.json")
    assert torch.equal(model.a, values()["a"])


@pytest.mark.parametrize(
    "content",
    [
        "[]",
        '{"weight_map": []}',
        '{"weight_map": 3}',
        '{"weight_map": {"a": 3}}',
        '{"weight_map": {"a": null}}',
        '{"weight_map": {"a": ""}}',
        '{"weight_map": {"a": "model.safetensors.index.json"}}',
        '{"weight_map": {"a": "other.index.json"}}',
        "{",
        "[" * 100_000,
    ],
)
def test_malformed_index_is_refused_naming_it(tmp_path: Path, content: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(content)
    err = assert_refused(index)
    assert str(index) in str(err)


def test_devices_and_pipes_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    assert_refused(fifo, "not a regular file")
    if Path("/dev/zero").exists():
        assert_refused("/dev/zero", "not a regular file")


# --------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize(
    "kind",
    ["quantized", "sparse", "meta", "complex"],
)
def test_tensor_that_cannot_be_copied_is_refused_before_any_write(
    tmp_path: Path, kind: str
) -> None:
    w = {
        "quantized": lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
        "sparse": lambda: torch.ones(3).to_sparse(),
        "meta": lambda: torch.empty(3, device="meta"),
        "complex": lambda: torch.ones(3, dtype=torch.complex64),
    }[kind]()
    path = tmp_path / f"{kind}.pth"
    # 'a' comes first, so a late check would have written it already.
    torch.save({"a": values()["a"], "b": w}, path)
    err = assert_refused(path, "cannot be copied")
    assert "'b'" in str(err)
    # Leaving it out loads the rest.
    model = Two()
    surgery.load_partial(model, path, skip=["b"], strict=False)
    assert torch.equal(model.a, values()["a"])


def test_meta_model_too_big_for_memory_is_refused_before_materialising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "w.safetensors"
    save_file(values(), path)
    with surgery.empty_init():
        model = Two()
    monkeypatch.setattr(apply_module, "available_memory", lambda: 10)
    with pytest.raises(LoadError, match=r"needs .*only .* available"):
        surgery.load_partial(model, path)
    assert model.a.is_meta and model.b.is_meta
    monkeypatch.setattr(apply_module, "available_memory", lambda: None)
    surgery.load_partial(model, path)
    assert torch.equal(model.b, values()["b"])


def test_available_memory_is_a_positive_count() -> None:
    n = apply_module.available_memory()
    assert n is None or n > 0


def test_zip_record_shorter_than_its_storage_is_refused(tmp_path: Path) -> None:
    torch.save(values(), tmp_path / "ok.pth")
    rewrite_zip(
        tmp_path / "ok.pth",
        tmp_path / "short.pth",
        lambda name, data: data[:8] if name.endswith("data/0") else data,
    )
    for mmap in (True, False):
        with pytest.raises(CheckpointError, match="short.pth"):
            surgery.read_checkpoint(tmp_path / "short.pth", mmap=mmap)
    assert_refused(tmp_path / "short.pth", "short.pth")


# --------------------------------------------------------------------------- values


def test_big_endian_torch_file_loads_correct_values(tmp_path: Path) -> None:
    torch.save(values(), tmp_path / "little.pth")

    def to_big(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, dtype="<f4").astype(">f4").tobytes()
        return data

    path = tmp_path / "big.pth"
    rewrite_zip(tmp_path / "little.pth", path, to_big)
    expected = torch.load(path, weights_only=True)
    assert torch.equal(expected["a"], values()["a"])  # torch swaps them back
    sd = surgery.read_checkpoint(path)
    assert all(torch.equal(sd[k], expected[k]) for k in expected)
    model = Two()
    report = surgery.load_partial(model, path)
    assert torch.equal(model.a, expected["a"]) and torch.equal(model.b, expected["b"])
    assert any("big-endian" in n for n in report.notes)


# --------------------------------------------------------------------------- malformed inputs


@pytest.mark.parametrize("key", [3, (1, 2), b"a"])
def test_non_string_state_dict_keys_are_refused(tmp_path: Path, key: object) -> None:
    path = tmp_path / "keys.pth"
    torch.save({key: torch.ones(4), "b": torch.ones(3)}, path)
    err = assert_refused(path, "key")
    assert str(path) in str(err)


def safetensors_with_header(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**62, 4], [2**64]])
def test_safetensors_shape_overflowing_is_refused(tmp_path: Path, shape: list[int]) -> None:
    path = safetensors_with_header(
        tmp_path / "big.safetensors",
        {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}},
    )
    with pytest.raises(CheckpointError, match="big.safetensors"):
        surgery.read_checkpoint(path)
    assert_refused(path, "big.safetensors")


def test_broken_zip_structures_are_refused(tmp_path: Path) -> None:
    torch.save(values(), tmp_path / "ok.pth")
    raw = bytearray((tmp_path / "ok.pth").read_bytes())
    # A compression method zipfile does not know, in every central-directory entry.
    cd = raw.rfind(b"PK\x05\x06")
    start = int.from_bytes(raw[cd + 16 : cd + 20], "little")
    pos = start
    while raw[pos : pos + 4] == b"PK\x01\x02":
        raw[pos + 10 : pos + 12] = (99).to_bytes(2, "little")
        n, m, k = (int.from_bytes(raw[pos + i : pos + i + 2], "little") for i in (28, 30, 32))
        pos += 46 + n + m + k
    (tmp_path / "method.pth").write_bytes(bytes(raw))
    assert_refused(tmp_path / "method.pth", "method.pth")
    # A central directory whose entries are overwritten (zipfile: BadZipFile).
    raw = bytearray((tmp_path / "ok.pth").read_bytes())
    raw[start : start + 4] = b"JUNK"
    (tmp_path / "cd.pth").write_bytes(bytes(raw))
    assert_refused(tmp_path / "cd.pth", "cd.pth")


def test_pickle_record_inflating_too_far_is_refused_before_torch_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.save(values(), tmp_path / "ok.pth")
    monkeypatch.setattr(torchformat, "MAX_PICKLE", 64)

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_load)
    assert_refused(tmp_path / "ok.pth", "inflates to")


def test_failed_load_leaves_no_pending_sparse_tensors(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pth"
    torch.save({"s": torch.ones(3).to_sparse(), "x": surgery.LoadPlan}, path)
    with pytest.raises(UnsafeCheckpointError):
        surgery.read_checkpoint(path)
    assert torch._utils._sparse_tensors_to_validate == []


@pytest.mark.parametrize("protocol", [4, 5])
def test_pickle_protocol_4_and_5_load_without_trust(tmp_path: Path, protocol: int) -> None:
    # torch's weights-only loader stops at their opcodes; surgery's unpickler reads them.
    path = tmp_path / "p.pth"
    torch.save(values(), path, pickle_protocol=protocol)
    expected = torch.load(path, weights_only=False)  # the oracle: trusted, for this file
    sd = surgery.read_checkpoint(path)
    assert sd.keys() == expected.keys()
    assert all(torch.equal(sd[k], expected[k]) for k in expected)
    assert torch.equal(surgery.read_checkpoint(path, trust_pickle=True)["a"], expected["a"])


def test_legacy_tar_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "old.tar"
    with tarfile.open(path, "w") as tf:
        (tmp_path / "sys_info").write_bytes(pickle.dumps({}))
        tf.add(tmp_path / "sys_info", arcname="sys_info")
    with pytest.raises(CheckpointError, match="legacy tar format.*trust_pickle=True"):
        surgery.read_checkpoint(path)


def test_inspect_renders_unicode_digits_and_very_deep_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    deep = ".".join(["l"] * 3000)
    sd = {"blocks.².w": torch.ones(1), "blocks.0.w": torch.ones(1), deep: torch.ones(1)}
    save_file(sd, tmp_path / "odd.safetensors")
    assert cli.main(["inspect", str(tmp_path / "odd.safetensors"), "--depth", "100"]) == 0
    out = capsys.readouterr().out
    assert ("²" in out and "3 tensors" in out) or "tensors:" in out


def test_huge_sparse_file_is_refused_without_mapping_it(tmp_path: Path) -> None:
    torch.save(values(), tmp_path / "ok.pth")
    path = tmp_path / "huge.pth"
    try:
        with open(path, "wb") as f:  # 4 TB of holes, then a valid torch zip
            f.seek(4 << 40)
            f.write((tmp_path / "ok.pth").read_bytes())
    except OSError:
        pytest.skip("this file system cannot hold a 4 TB sparse file")
    assert_refused(path, "huge.pth")
    with open(tmp_path / "zeros.safetensors", "wb") as f:
        f.truncate(4 << 40)
    assert_refused(tmp_path / "zeros.safetensors", "zeros.safetensors")


def test_uncopiable_tensor_in_a_shard_is_refused_before_any_write(tmp_path: Path) -> None:
    torch.save({"a": values()["a"]}, tmp_path / "s1.bin")
    torch.save({"b": torch.ones(3).to_sparse()}, tmp_path / "s2.bin")
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.bin", "b": "s2.bin"}}))
    assert_refused(index, "sparse_coo")


# --------------------------------------------------------------------------- hostile pickles


def torch_zip(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A torch zip file whose pickle record is ``data_pkl`` (written by hand)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            zf.writestr(f"archive/data/{key}", data)
    return path


STORAGE = (  # the persistent id ('storage', torch.FloatStorage, '0', 'cpu', 4)
    b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
)
HOSTILE_PICKLES = {
    # torch.Tensor(2**40) would allocate 4 TB: the class is a marker, not a callable
    "tensor-call": b"\x80\x02ctorch\nTensor\nJ\x00\x00\x00\x40\x85R.",
    # numpy.ndarray.__new__(ndarray, (2**40,)): likewise
    "ndarray-new": b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x40\x85\x85\x81.",
    # a tensor whose saved attributes replace its data with another storage's
    "set-data": b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n"
    b"(ctorch._utils\n_rebuild_tensor_v2\nctorch\nTensor\n("
    + STORAGE
    + b"K\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)Rt"
    b"}X\x04\x00\x00\x00dataK\x01stR.",
    # items written into a tensor of the file (its copy-on-write mapping)
    "setitem-tensor": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n("
    + STORAGE
    + b"K\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRK\x00K\x07s.",
    # state set on torch.Size, a dtype, a storage type
    "build-size": b"\x80\x02ctorch\nSize\n)R}X\x01\x00\x00\x00aK\x01sb.",
    "build-dtype": b"\x80\x02ctorch\nfloat32\nN}X\x01\x00\x00\x00aK\x01s\x86b.",
    "build-storage-type": b"\x80\x02ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeK\x01s\x86b.",
}


@pytest.mark.parametrize("name", list(HOSTILE_PICKLES))
def test_hostile_pickles_are_refused_quickly(tmp_path: Path, name: str) -> None:
    path = torch_zip(tmp_path / f"{name}.pth", HOSTILE_PICKLES[name], {"0": bytes(16)})
    err = assert_refused(path, f"{name}.pth")
    assert isinstance(err, CheckpointError)
    assert torch.float32.itemsize == 4 and torch.FloatStorage is torch.FloatStorage


# --------------------------------------------------------------------------- round three


def safetensors_raw(path: Path, header: bytes, data: bytes = b"\0" * 4) -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


_A = b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'

# Headers the safetensors format (and its library) refuses, which Python's json reads.
FORBIDDEN_HEADERS = {
    "dtype a list": b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
    "dtype a dict": b'{"a": {"dtype": {"F": 32}, "shape": [1], "data_offsets": [0, 4]}}',
    "NaN in metadata": b"{" + _A + b', "__metadata__": {"x": NaN}}',
    "Infinity offset": b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}',
    "float shape": b'{"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}',
    "float offset": b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}',
    "bool shape": b'{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}',
    "string shape": b'{"a": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}}',
    "three offsets": b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}',
    "offset past 2**64": b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, '
    + str(2**64 + 4).encode()
    + b"]}}",
    "metadata a number": b"{" + _A + b', "__metadata__": {"x": 1}}',
    "metadata a list": b"{" + _A + b', "__metadata__": ["x"]}',
    "metadata a string": b"{" + _A + b', "__metadata__": "x"}',
    "metadata nested": b"{" + _A + b', "__metadata__": {"x": {"y": "z"}}}',
    "entry null": b'{"a": null}',
    "unpaired surrogate": b'{"a\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
    "nested 128 deep": b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": '
    + b"[" * 126
    + b"]" * 126
    + b"}}",
    "nested 100,000 deep": b"{" + _A + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("case", list(FORBIDDEN_HEADERS))
def test_safetensors_headers_the_format_forbids_are_refused(tmp_path: Path, case: str) -> None:
    from safetensors import safe_open

    path = safetensors_raw(tmp_path / "w.safetensors", FORBIDDEN_HEADERS[case])
    with pytest.raises(Exception, match="(?i)header|deserializ|invalid"):  # the oracle refuses
        with safe_open(str(path), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CheckpointError, match="w.safetensors") as err:
        surgery.read_checkpoint(path)
    assert "download or save it again" in str(err.value) or "cannot hold" in str(err.value)
    assert_refused(path, "w.safetensors")


@pytest.mark.parametrize(
    "header",
    [
        b"{" + _A + b', "__metadata__": null}',
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}',
        b" {" + _A + b"}  ",
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": '
        + b"[" * 125
        + b"]" * 125
        + b"}}",
        b"{" + _A + b', "__metadata__": {"format": "pt", "note": "[[[{{{"}}',
    ],
)
def test_safetensors_headers_the_format_allows_still_load(tmp_path: Path, header: bytes) -> None:
    from safetensors.torch import load_file

    path = safetensors_raw(tmp_path / "w.safetensors", header, b"\0\0\x80\x3f")
    expected = load_file(path)  # the oracle reads it
    sd = surgery.read_checkpoint(path)
    assert sd.keys() == expected.keys() and torch.equal(sd["a"], expected["a"])


def test_index_naming_a_shard_the_os_refuses_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    index = sharded(folder, "a" * 300 + ".safetensors")
    for ckpt in (index, folder):
        err = assert_refused(ckpt, "model.safetensors.index.json")
        assert "name too long" in str(err).lower() and "a" * 300 in str(err)


@pytest.mark.distributed  # spawns a process
def test_sparse_4tb_safetensors_is_refused_before_allocating(tmp_path: Path) -> None:
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4 << 40]}}
    ).encode()
    path = tmp_path / "huge.safetensors"
    try:
        with open(path, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            f.truncate(8 + len(header) + (4 << 40))
    except OSError:
        pytest.skip("this file system cannot hold a 4 TB sparse file")
    with pytest.raises(CheckpointError, match=r"huge\.safetensors.*4398\.0 GB.*available"):
        surgery.read_checkpoint(path)


def run_measured(code: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; its outcome and peak memory growth (MB)."""
    script = (
        "import json, resource, surgery\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    {code}\n"
        "    out = 'ok'\n"
        "except surgery.SurgeryError as e:\n"
        "    out = type(e).__name__ + ': ' + str(e)\n"
        "grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024\n"
        "print(json.dumps({'outcome': out, 'mb': grown}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def sparse_index(path: Path, size: int = 1 << 30) -> Path:
    """A valid index after ``size`` bytes of spaces, as a sparse file would be if it held them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(size)
        f.write(json.dumps({"weight_map": {}}).encode())
    return path


def test_sparse_1gb_index_is_refused_before_it_is_read(tmp_path: Path) -> None:
    index = sparse_index(tmp_path / "ckpt" / "model.safetensors.index.json")
    result = run_measured(f"surgery.read_checkpoint({str(tmp_path / 'ckpt')!r})")
    assert result["mb"] < 100, result  # 1 GB read and decoded once: +2 GB
    assert result["outcome"].startswith("CheckpointError") and str(index) in result["outcome"]
    assert "200 MB at most" in result["outcome"]


def test_sparse_1gb_index_in_an_offline_hub_cache_is_refused_before_it_is_read(
    tmp_path: Path,
) -> None:
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--org--big"
    index = sparse_index(repo / "snapshots" / rev / "model.safetensors.index.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    env = {"HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = run_measured("surgery.read_checkpoint('hf-hub:org/big')", env)
    assert result["mb"] < 100, result
    assert result["outcome"].startswith("CheckpointError") and str(index) in result["outcome"]


@pytest.mark.parametrize("where", ["folder", "index"])
def test_deeply_nested_index_is_refused(tmp_path: Path, where: str) -> None:
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    index.parent.mkdir()
    index.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    err = assert_refused(index.parent if where == "folder" else index, "nested deeper")
    assert str(index) in str(err)


def test_key_names_cannot_add_lines_to_reports(tmp_path: Path, capsys) -> None:
    fake = "a\nverified: safe to load"
    path = tmp_path / "w.safetensors"
    save_file({fake: torch.ones(4), "b": torch.ones(3), "c\rok": torch.ones(2)}, path)
    outputs = []
    assert cli.main(["inspect", str(path)]) == 0
    outputs.append(capsys.readouterr().out)
    cli.main(["diff", str(path), "--model", "support:SmallCNN"])
    outputs.append(capsys.readouterr().out)
    model = Two()
    outputs.append(str(surgery.load_partial(model, path, strict=False)))
    outputs.append(str(surgery.plan_load(Two(), path)))
    with pytest.raises(LoadError) as err:  # and the messages: nothing matches here
        surgery.load_partial(Two(), {fake: torch.ones(4)})
    outputs.append(str(err.value))
    for out in outputs:
        lines = out.splitlines()
        assert not any(line.lstrip().startswith("verified") for line in lines), out
        assert "a\\x0averified: safe to load" in out, out
        assert "\r" not in out
