"""surgery.sources: the entry= rename, unwrapping without files, one-copy sharded reads, and
the messages for files that are not model checkpoints."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import surgery
from surgery import CheckpointError, UsageError
from surgery.sources import CheckpointSource, filebytes, open_source
from surgery.sources.safetensors import SafetensorsSource
from surgery.sources.torchfile import TorchFileSource
from surgery.sources.unwrap import find_state_dict, is_optimizer_state, pick_entry, unwrap

from support import SmallCNN, assert_same_state, snapshot


@pytest.fixture()
def cnn_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    return SmallCNN().state_dict()


def _plus_one(sd):
    return {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}


# --------------------------------------------------------------------------- entry= and key=


def test_entry_picks_the_container_entry(tmp_path, cnn_sd):
    ema = _plus_one(cnn_sd)
    torch.save({"model": cnn_sd, "ema": ema}, tmp_path / "c.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # entry= itself warns about nothing
        out = surgery.read_checkpoint(tmp_path / "c.pth", entry="ema")
        src = open_source(tmp_path / "c.pth", entry="ema")
    assert torch.equal(out["fc.bias"], ema["fc.bias"])
    assert src.container == ["ema"] and src.other_entries == ["model"]
    src.close()


def test_key_still_works_with_a_deprecation_warning(tmp_path, cnn_sd):
    ema = _plus_one(cnn_sd)
    torch.save({"model": cnn_sd, "ema": ema}, tmp_path / "c.pth")
    with pytest.warns(DeprecationWarning, match=r"key= is renamed entry=.*entry='ema'") as rec:
        out = surgery.read_checkpoint(tmp_path / "c.pth", key="ema")
    assert len(rec) == 1 and rec[0].filename == __file__  # points at the caller's line
    assert torch.equal(out["fc.bias"], ema["fc.bias"])
    with pytest.warns(DeprecationWarning, match="entry="):
        src = open_source({"model": cnn_sd, "ema": ema}, key="ema")
    assert torch.equal(src.read("fc.bias"), ema["fc.bias"])


def test_entry_and_key_together_is_a_usage_error(tmp_path, cnn_sd):
    torch.save({"model": cnn_sd}, tmp_path / "c.pth")
    for fn in (surgery.read_checkpoint, open_source):
        with pytest.raises(UsageError, match="pass entry= only"):
            fn(tmp_path / "c.pth", entry="model", key="model")


def test_checkpoint_module_keeps_its_names():
    import surgery.checkpoint as old
    import surgery.sources as new

    for name in ("read_checkpoint", "open_source", "CheckpointSource", "CheckpointLike"):
        assert getattr(old, name) is getattr(new, name)
    assert surgery.read_checkpoint is new.read_checkpoint


def test_source_protocol_public_members():
    """read, read_into, close, read_region_into (a rank's shard of a sharded model), and
    shares (two keys that are one tensor of the checkpoint), check_reads (every file a load
    will read is there in full, before the first write), read_many_into (many keys at once,
    collectively where a source can), resident (the device a tensor already lies on), mapped
    (the tensor as it lies in the file's mapping, for assign=True), data_files (tensors per
    file of a checkpoint in several files, for surgery inspect)."""
    methods = {n for n, v in vars(CheckpointSource).items() if callable(v) and n[0] != "_"}
    expected = {"read", "read_into", "read_region_into", "close", "shares", "check_reads"}
    expected |= {"read_many_into", "resident", "mapped", "data_files"}
    assert methods == expected
    assert CheckpointSource("x").specs == {}


# --------------------------------------------------------------------------- unwrapping, no files


def test_unwrap_finds_the_obvious_container_and_says_where():
    sd = {"w": torch.ones(2)}
    found = unwrap({"epoch": 3, "optimizer": {"state": {}, "param_groups": []}, "state_dict": sd})
    assert found.tensors == sd and found.container == ["state_dict"]
    assert found.other_entries == ["epoch", "optimizer"] and found.suffix == "['state_dict']"
    nested = unwrap({"model": {"module": sd}, "step": 1})
    assert nested.container == ["model", "module"] and nested.other_entries == ["step"]
    flat = unwrap(sd)
    assert flat.tensors == sd and flat.container == [] and flat.other_entries == []
    # "model" beats an unnamed tensor dict; a lone tensor dict under any name is found
    assert unwrap({"aux": {"v": torch.zeros(1)}, "model": sd}).container == ["model"]
    assert unwrap({"weights_v2": sd, "epoch": 1}).container == ["weights_v2"]


def test_unwrap_module_values_and_dotted_entries():
    lin = torch.nn.Linear(2, 3)
    assert unwrap({"net": lin}).tensors.keys() == {"weight", "bias"}
    obj = {"extra": {"inner": {"w": torch.ones(1)}}, "extra.flat": {"v": torch.ones(1)}}
    assert pick_entry(obj, "extra.inner", "<x>")[1] == ["extra", "inner"]
    assert pick_entry(obj, "extra.flat", "<x>")[1] == ["extra.flat"]  # exact key first
    assert unwrap(obj, "extra.inner").container == ["extra", "inner"]
    with pytest.raises(CheckpointError, match=r"<x> has no entry 'nope'.*'extra' \(dict of 1\)"):
        pick_entry(obj, "nope", "<x>")


def test_unwrap_asks_for_entry_when_several_dicts_qualify():
    sd = {"w": torch.ones(1)}
    with pytest.raises(CheckpointError, match=r"'student' \(1 tensors\).*entry='student'"):
        unwrap({"student": sd, "teacher": sd}, where="kd.pth")


def test_unwrap_names_non_tensor_values():
    # Tensors beside plain values are a state dict, as load_state_dict takes it (the values
    # are unexpected keys); tensors beside a dict that holds no state dict are refused.
    flat = {"a": torch.ones(1), "b": [1.0]}
    assert unwrap(flat).tensors is flat
    with pytest.raises(CheckpointError, match=r"'stats' \(dict of 1\).*entry="):
        unwrap({"a": torch.ones(1), "stats": {"epoch": 1}})
    with pytest.raises(CheckpointError, match="is empty"):
        unwrap({})
    with pytest.raises(CheckpointError, match=r"holds a list of 1, not a state dict"):
        find_state_dict([torch.ones(1)], "<x>", explicit=False)


def test_float_entry_names_the_entry_and_its_type(tmp_path, cnn_sd):
    with pytest.raises(CheckpointError) as e:
        unwrap({"model": cnn_sd, "best_iou": 0.71}, "best_iou", "run.ckpt")
    assert "'best_iou'" in str(e.value) and "float (0.71)" in str(e.value)
    assert "'model' (dict of 16)" in str(e.value)  # the entries to pick from
    torch.save({"model": cnn_sd, "best_iou": 0.71}, tmp_path / "run.ckpt")
    with pytest.raises(CheckpointError, match=r"entry 'best_iou' of .*run.ckpt holds a float"):
        surgery.read_checkpoint(tmp_path / "run.ckpt", entry="best_iou")


# --------------------------------------------------------------------------- not model weights


def _optimizer_state() -> dict:
    model = SmallCNN()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    return opt.state_dict()


def test_optimizer_state_is_recognised(tmp_path):
    opt_sd = _optimizer_state()
    assert is_optimizer_state(opt_sd) and not is_optimizer_state({"state": torch.ones(1)})
    torch.save(opt_sd, tmp_path / "opt.pt")
    for src in (opt_sd, tmp_path / "opt.pt"):
        with pytest.raises(CheckpointError) as e:
            surgery.read_checkpoint(src)
        msg = str(e.value)
        assert "optimizer state" in msg and "model" in msg and "weights" in msg
        assert "surgery.restore_optimizer" in msg
    # picked explicitly, or beside other entries with no weights at all
    with pytest.raises(CheckpointError, match="is an optimizer state, not model weights"):
        unwrap({"model": {"w": torch.ones(1)}, "optim": opt_sd}, "optim")
    with pytest.raises(CheckpointError, match=r"'optimizer' \(optimizer state\).*no model weights"):
        unwrap({"epoch": 3, "optimizer": opt_sd})


def test_optimizer_state_refused_before_any_write(tmp_path):
    torch.save(_optimizer_state(), tmp_path / "opt.pt")
    model = SmallCNN()
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match="optimizer state"):
        surgery.load_partial(model, tmp_path / "opt.pt")
    assert_same_state(model, snap)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"epoch,loss\n1,0.5\n2,0.4\n", ["not a torch checkpoint", "text", "'epoch,loss"]),
        (b"<!DOCTYPE html><html>Not Found</html>", ["not a torch checkpoint", "HTML"]),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", ["Git LFS", "git lfs"]),
        (b"", ["not a torch checkpoint", "empty"]),
        (bytes(range(1, 64)) * 2, ["not a torch checkpoint", "neither a torch zip"]),
    ],
)
def test_a_file_that_is_no_torch_file_says_so(tmp_path, content, words):
    (tmp_path / "model.pth").write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        surgery.read_checkpoint(tmp_path / "model.pth")
    msg = str(e.value)
    assert "model.pth" in msg and all(w in msg for w in words), msg
    assert "pop from empty list" not in msg


# --------------------------------------------------------------------------- safetensors


def test_safetensors_header_gives_specs_and_values(tmp_path):
    sd = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5, dtype=torch.int64),
        "h": torch.randn(2, 2).to(torch.bfloat16),
        "m": torch.tensor([True, False, True]),
        "z": torch.empty(0, 3),
    }
    save_file(sd, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    src = open_source(tmp_path / "x.safetensors")
    assert src.specs == {k: (v.shape, v.dtype) for k, v in sd.items()}
    for k, v in sd.items():
        assert torch.equal(src.read(k), v)
        out = torch.zeros(v.shape, dtype=torch.float64)
        src.read_into(k, out)  # through one temporary: another dtype
        assert torch.equal(out, v.double())
    src.close()
    assert torch.equal(surgery.read_checkpoint(tmp_path / "x.safetensors")["a"], sd["a"])


def _rewrite_header(path, edit):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def test_safetensors_header_checked_before_reading(tmp_path):
    save_file({"a": torch.ones(4), "b": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    path = tmp_path / "x.safetensors"
    _rewrite_header(path, lambda h: h["a"].update(shape=[5]))
    with pytest.raises(CheckpointError, match=r"x.safetensors.*tensor 'a' spans 16 bytes.*need 20"):
        open_source(path)
    save_file({"a": torch.ones(4)}, str(path))
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(CheckpointError, match="longer than its header says"):
        open_source(path)
    save_file({"a": torch.ones(4)}, str(path))
    _rewrite_header(path, lambda h: h["a"].update(dtype="F4"))
    with pytest.raises(CheckpointError, match="tensor 'a' has dtype F4"):
        open_source(path)


def test_safetensors_without_suffix_is_sniffed(tmp_path, cnn_sd):
    save_file(cnn_sd, str(tmp_path / "weights.data"))
    src = open_source(tmp_path / "weights.data")
    assert isinstance(src, SafetensorsSource) and src.specs.keys() == cnn_sd.keys()
    src.close()


# --------------------------------------------------------------------------- sharded, one copy


def _sharded(tmp_path, sd, kind):
    keys = list(sd)
    weight_map = {}
    for i, ks in enumerate((keys[:7], keys[7:])):
        name = f"shard-{i}.{kind}"
        part = {k: sd[k] for k in ks}
        if kind == "safetensors":
            save_file(part, str(tmp_path / name))
        else:
            torch.save({"state_dict": part} if i else part, tmp_path / name)
        weight_map.update(dict.fromkeys(ks, name))
    index = tmp_path / f"model.{kind}.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return index


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_load_reads_straight_into_the_model(tmp_path, monkeypatch, cnn_sd, kind):
    index = _sharded(tmp_path, cnn_sd, kind)
    whole_reads: list[str] = []
    into: list[int] = []
    real = filebytes._readinto_at

    def no_read(self, key):
        whole_reads.append(key)
        raise AssertionError(f"read({key!r}) materialised a copy")

    def spy(f, offset, out, description):
        into.append(out.data_ptr())
        return real(f, offset, out, description)

    monkeypatch.setattr(SafetensorsSource, "read", no_read)
    monkeypatch.setattr(TorchFileSource, "read", no_read)
    monkeypatch.setattr(filebytes, "_readinto_at", spy)
    model = SmallCNN()
    report = surgery.load_partial(model, index)
    assert report.ok and not whole_reads
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in cnn_sd.items())
    # every tensor's bytes were read once, into the model's own memory
    assert sorted(into) == sorted(t.data_ptr() for t in state.values())


def test_sharded_index_with_a_wrong_shard(tmp_path, cnn_sd):
    index = _sharded(tmp_path, cnn_sd, "safetensors")
    wm = json.loads(index.read_text())["weight_map"]
    wm["fc.bias"] = "shard-0.safetensors"  # fc.bias lives in shard-1
    index.write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match="maps 'fc.bias' to 'shard-0.safetensors'"):
        open_source(index)
    index.write_text(json.dumps({"weights": wm}))
    with pytest.raises(CheckpointError, match="not a sharded-checkpoint index"):
        open_source(index)
    with pytest.raises(CheckpointError, match="entry='ema' does not apply"):
        open_source(index, entry="ema")
