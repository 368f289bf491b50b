"""surgery.save: safetensors as the hub writes them, ties stored once, written atomically.

Oracles: the model's own state dict, ``safetensors.torch.load_file`` of what was written,
``huggingface_hub.save_torch_state_dict`` / ``save_pretrained`` writing the same model, and
``from_pretrained`` of the folder.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors import torch as st
from torch import nn

import surgery
from surgery import SaveError, UsageError

from support import SmallCNN, Tied, assert_same_state, snapshot


def _files(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder`` (hidden ones too) with its bytes: temporaries show up."""
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in folder.iterdir()}


def _read(folder: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, str]]]:
    """All tensors of a saved folder (or file) by safetensors itself, and each file's metadata."""
    paths = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    metas = []
    for p in paths:
        with safe_open(p, "pt") as f:
            metas.append(f.metadata())
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metas


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.num_batches_tracked.fill_(3)
    return model


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- round trips


def test_plain_model_round_trip(tmp_path):
    model = _cnn()
    saved = surgery.save(model, tmp_path / "out")
    assert saved.files == ("model.safetensors",) and saved.tensors == len(model.state_dict())
    tensors, (meta,) = _read(tmp_path / "out")
    _same(tensors, model.state_dict())  # oracle: the model's own state dict
    assert meta == {"format": "pt"}
    fresh = SmallCNN()
    report = surgery.load_partial(fresh, tmp_path / "out")
    assert report.ok
    _same(fresh.state_dict(), model.state_dict())


def test_state_dict_input_and_single_file(tmp_path):
    sd = _cnn().state_dict()
    saved = surgery.save(sd, tmp_path / "w.safetensors", metadata={"source": "cnn"})
    assert saved.files == ("w.safetensors",)
    _same(st.load_file(tmp_path / "w.safetensors"), sd)
    assert _read(tmp_path / "w.safetensors")[1] == [{"format": "pt", "source": "cnn"}]
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]  # nothing else left beside it


def test_tied_module_stored_once_as_huggingface_hub_records_it(tmp_path):
    from huggingface_hub import save_torch_state_dict

    torch.manual_seed(0)
    model = Tied()
    saved = surgery.save(model, tmp_path / "ours")
    assert saved.tied == {"out.weight": "embed.weight"}
    ours, (meta,) = _read(tmp_path / "ours")
    # oracle: huggingface_hub told to drop the same name writes the same file
    (tmp_path / "hub").mkdir()
    save_torch_state_dict(
        model.state_dict(), tmp_path / "hub", shared_tensors_to_discard=["out.weight"]
    )
    hub, (hub_meta,) = _read(tmp_path / "hub")
    _same(ours, hub)
    assert meta == hub_meta == {"format": "pt", "out.weight": "embed.weight"}
    fresh = Tied()
    report = surgery.load_partial(fresh, tmp_path / "ours")
    assert report.ok and fresh.out.weight is fresh.embed.weight
    _same(fresh.state_dict(), model.state_dict())


def _gpt2():
    return _hf("tiny_gpt2", tie=True)


def _llama():
    return _hf("tiny_llama", tie=True)


@pytest.mark.parametrize("layout", ["model", "checkpoint"])
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_tied_transformers_model_reties_after_from_pretrained_and_load_partial(
    build, layout, tmp_path
):
    torch.manual_seed(0)
    model = build()
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is emb
    saved = surgery.save(model, tmp_path, layout=layout)
    tensors, _ = _read(tmp_path)
    (dropped,) = saved.tied
    assert dropped.startswith("lm_head") and dropped not in tensors  # stored once, embedding kept
    model.config.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path)  # oracle: transformers reading the folder
    assert again.get_output_embeddings().weight is again.get_input_embeddings().weight
    _same(again.state_dict(), model.state_dict())
    fresh = type(model)(model.config)
    report = surgery.load_partial(fresh, tmp_path)
    assert report.ok
    assert fresh.get_output_embeddings().weight is fresh.get_input_embeddings().weight
    _same(fresh.state_dict(), model.state_dict())


def test_sharded_save_matches_huggingface_hub_and_from_pretrained_reads_it(tmp_path):
    from huggingface_hub import save_torch_state_dict

    torch.manual_seed(0)
    model = _llama()
    saved = surgery.save(model, tmp_path / "ours", max_shard_size="3KB", metadata={"k": "v"})
    assert len(saved.files) > 3 and saved.files[-1] == "model.safetensors.index.json"
    (tmp_path / "hub").mkdir()
    save_torch_state_dict(
        model.state_dict(),
        tmp_path / "hub",
        max_shard_size="3KB",
        metadata={"k": "v"},
        shared_tensors_to_discard=["lm_head.weight"],
    )
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    hub_index = json.loads((tmp_path / "hub" / "model.safetensors.index.json").read_text())
    assert index == hub_index  # total_size, metadata and weight_map: the hub's format
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "hub"))
    ours, metas = _read(tmp_path / "ours")
    _same(ours, _read(tmp_path / "hub")[0])
    # unlike the hub, which keeps user metadata in the index only, every shard carries it
    assert all(
        m == {"format": "pt", "k": "v", "lm_head.weight": "model.embed_tokens.weight"}
        for m in metas
    )
    model.config.save_pretrained(tmp_path / "ours")
    again = type(model).from_pretrained(tmp_path / "ours")
    _same(again.state_dict(), model.state_dict())


@pytest.mark.parametrize("limit", [1, 200, 1000, 3000, 10**9])
def test_without_huggingface_hub_the_same_files_are_written(limit, tmp_path, monkeypatch):
    model = _cnn()
    model.fc = nn.Linear(16, 40)  # one tensor of 2560 bytes, above some limits
    with_hub = surgery.save(model, tmp_path / "hub", max_shard_size=limit)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    without = surgery.save(model, tmp_path / "fallback", max_shard_size=limit)
    assert with_hub.files == without.files
    assert _files(tmp_path / "hub") == _files(tmp_path / "fallback")


def _hf(name: str, **kwargs):
    """A tiny transformers model from ``support.hf`` (the configs every conversion test uses)."""
    pytest.importorskip("transformers")
    from support import hf

    return getattr(hf, name)(**kwargs)


def _mixtral():
    return _hf("tiny_mixtral"), torch.randint(0, 64, (1, 7))


def _qwen_moe():
    return _hf("tiny_qwen_moe"), torch.randint(0, 64, (1, 7))


def _vit():
    return _hf("tiny_vit_classifier"), torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("build", [_mixtral, _qwen_moe, _vit], ids=["mixtral", "qwen2_moe", "vit"])
def test_checkpoint_layout_is_what_save_pretrained_writes(build, tmp_path):
    torch.manual_seed(0)
    model, x = build()
    model.eval()
    saved = surgery.save(model, tmp_path / "ours", layout="checkpoint", max_shard_size="40KB")
    model.save_pretrained(tmp_path / "theirs")  # oracle: transformers' own writer
    ours, _ = _read(tmp_path / "ours")
    _same(ours, _read(tmp_path / "theirs")[0])
    assert saved.tensors == len(ours) and set(ours) != set(model.state_dict())  # converted
    model.config.save_pretrained(tmp_path / "ours")
    again = type(model).from_pretrained(tmp_path / "ours").eval()
    _same(again.state_dict(), model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=0)


def test_model_layout_of_mixtral_reads_back_by_load_partial_and_from_pretrained(tmp_path):
    torch.manual_seed(0)
    model, _ = _mixtral()
    surgery.save(model, tmp_path)
    tensors, _ = _read(tmp_path)
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors  # the model's own names
    fresh = type(model)(model.config)
    assert surgery.load_partial(fresh, tmp_path).ok
    _same(fresh.state_dict(), model.state_dict())
    model.config.save_pretrained(tmp_path)
    _same(type(model).from_pretrained(tmp_path).state_dict(), model.state_dict())


def test_views_are_written_as_the_values_they_show(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    weight = torch.randn(5, 3)
    rows = torch.randn(3, 4)
    state = {
        "t": base.t(),  # non-contiguous view
        "row0": base[0],  # a slice of the same storage
        "rows": base[1:3],  # another, disjoint from row0
        "w": weight,
        "w_t": weight.t(),  # the same bytes seen transposed: not a tie
        "w_alias": weight,  # a tie
        "half": base[:, :3],  # strided slice
        "top": rows[0:2],  # contiguous slices that overlap each other
        "bottom": rows[1:3],
        "w_bits": weight.view(torch.int32),  # the same bytes as another dtype: not a tie
    }
    saved = surgery.save(state, tmp_path)
    assert saved.tied == {"w_alias": "w"}
    tensors, (meta,) = _read(tmp_path)
    expected = {k: v.contiguous() for k, v in state.items() if k != "w_alias"}
    _same(tensors, expected)
    assert meta["w_alias"] == "w"


@pytest.mark.cuda
def test_gpu_tensors_are_saved(tmp_path):
    model = _cnn().cuda()
    surgery.save(model, tmp_path)
    _same(_read(tmp_path)[0], {k: v.cpu() for k, v in model.state_dict().items()})


# --------------------------------------------------------------------------- refusals


def test_meta_tensors_are_refused_by_name(tmp_path):
    with surgery.empty_init():
        model = SmallCNN()
    with pytest.raises(UsageError, match=r"conv1\.weight.*meta device: nothing to save"):
        surgery.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metadata": {"epoch": 3}}, r"metadata\['epoch'\] is int.*strings only"),
        ({"metadata": {"format": "np"}}, "'format' must be 'pt'"),
        ({"metadata": {"total_size": "1"}}, "'total_size' is written by save"),
        ({"metadata": ["a"]}, "dict of str -> str"),
        ({"max_shard_size": "5 parsecs"}, "max_shard_size must be"),
        ({"max_shard_size": 0}, "at least 1 byte"),
        ({"max_shard_size": True}, "max_shard_size must be"),
        ({"layout": "hub"}, "layout must be"),
    ],
)
def test_bad_options_are_refused_and_nothing_is_written(kwargs, message, tmp_path):
    model = _cnn()
    before = snapshot(model)
    with pytest.raises(UsageError, match=message):
        surgery.save(model, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    assert_same_state(model, before)


def test_tie_record_names_cannot_be_overwritten_by_user_metadata(tmp_path):
    with pytest.raises(UsageError, match="'out.weight' is written by save"):
        surgery.save(Tied(), tmp_path, metadata={"out.weight": "mine"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({}, "has no tensors"),
        ({"a": torch.ones(2), "step": 3}, r"step \(int\).*not tensors"),
        ({"a": torch.ones(2).to_sparse()}, r"sparse_coo.*to_dense"),
        ({"__metadata__": torch.ones(2)}, "names safetensors cannot store"),
        ({1: torch.ones(2)}, "names safetensors cannot store"),
    ],
)
def test_state_dicts_safetensors_cannot_hold_are_refused(state, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        surgery.save(state, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_layout_needs_the_model_itself(tmp_path):
    with pytest.raises(UsageError, match="needs the model"):
        surgery.save(_cnn().state_dict(), tmp_path, layout="checkpoint")
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(UsageError, match="holds one at 'base_model.model'"):
        surgery.save(model, tmp_path, layout="checkpoint")
    assert_same_state(model, before)
    assert list(tmp_path.iterdir()) == []


def test_a_plain_model_has_one_layout(tmp_path):
    model = _cnn()
    surgery.save(model, tmp_path / "a", layout="checkpoint")
    surgery.save(model, tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_one_file_cannot_shard_and_a_file_is_not_a_folder(tmp_path):
    with pytest.raises(UsageError, match="cannot shard.*Save to a folder"):
        surgery.save(_cnn(), tmp_path / "w.safetensors", max_shard_size=100)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        surgery.save(_cnn(), tmp_path / "notes.txt")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_sharded_dtensors_are_refused_with_the_gather_that_works(tmp_path):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DeviceMesh

    if dist.is_initialized():
        pytest.skip("a process group is already set up")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = nn.Linear(4, 3)
        fully_shard(model, mesh=DeviceMesh("cpu", [0]))
        with pytest.raises(UsageError, match="sharded DTensors.*get_model_state_dict"):
            surgery.save(model, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        surgery.save(full, tmp_path / "out")  # the fix the message gives
        _same(
            _read(tmp_path / "out")[0], {k: v.full_tensor() for k, v in model.state_dict().items()}
        )
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- atomicity


class _Boom(Exception):
    """What safetensors' writer raises in these tests (surgery reports it as a UsageError)."""


def _fail_after(monkeypatch, n: int, exc: type[BaseException] = _Boom) -> None:
    """Make safetensors' writer raise on its call number ``n + 1`` (after ``n`` shards)."""
    real = st.save_file
    calls = []

    def flaky(*args, **kwargs):
        if len(calls) == n:
            raise exc("disk on fire")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "save_file", flaky)


@pytest.mark.parametrize(
    ("exc", "raised"), [(_Boom, UsageError), (KeyboardInterrupt, KeyboardInterrupt)]
)
def test_failure_mid_write_leaves_no_checkpoint_and_no_temporaries(
    exc, raised, tmp_path, monkeypatch
):
    _fail_after(monkeypatch, 1, exc)
    with pytest.raises(raised, match="disk on fire"):
        surgery.save(_cnn(), tmp_path / "runs" / "out", max_shard_size=500)
    assert list(tmp_path.iterdir()) == []  # not even the parent it created


def test_failure_mid_write_keeps_the_old_checkpoint_intact(tmp_path, monkeypatch):
    torch.manual_seed(1)
    surgery.save(SmallCNN(), tmp_path, max_shard_size=1000)  # the old checkpoint, 3 shards
    (tmp_path / "config.json").write_text("{}")
    before = _files(tmp_path)
    _fail_after(monkeypatch, 2)
    with pytest.raises(UsageError, match="cannot write model-00003-of-00005.safetensors.*fire"):
        surgery.save(_cnn(), tmp_path, max_shard_size=500)
    assert _files(tmp_path) == before


def test_failure_while_renaming_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    torch.manual_seed(1)
    surgery.save(SmallCNN(), tmp_path, max_shard_size=1000)
    before = _files(tmp_path)
    real = os.rename
    calls = []

    def flaky(src, dst):
        calls.append(1)
        if len(calls) == 7:  # the 4 old files moved aside, 2 new ones placed
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(SaveError, match="No space left on device.*unchanged") as info:
        surgery.save(_cnn(), tmp_path, max_shard_size=500)
    assert isinstance(info.value, OSError)
    assert _files(tmp_path) == before


def test_success_replaces_only_the_checkpoint_files(tmp_path):
    torch.manual_seed(1)
    surgery.save(SmallCNN(), tmp_path, max_shard_size=1000)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.backup").write_text("mine")
    model = _cnn()
    surgery.save(model, tmp_path)  # one file now: the old shards and index go
    assert sorted(os.listdir(tmp_path)) == [
        "config.json",
        "model.safetensors",
        "model.safetensors.backup",
    ]
    _same(_read(tmp_path)[0], model.state_dict())


def test_single_file_failure_keeps_the_old_file(tmp_path, monkeypatch):
    surgery.save(SmallCNN(), tmp_path / "w.safetensors")
    before = _files(tmp_path)
    _fail_after(monkeypatch, 0)
    with pytest.raises(UsageError, match="disk on fire"):
        surgery.save(_cnn(), tmp_path / "w.safetensors")
    assert _files(tmp_path) == before


def test_unwritable_folder_is_a_save_error(tmp_path):
    if os.name != "posix" or os.geteuid() == 0:
        pytest.skip("needs POSIX permissions as a normal user")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(SaveError, match="cannot write.*Nothing was written"):
            surgery.save(_cnn(), locked / "out")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_a_file_in_the_way_of_the_folder_is_a_save_error(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(SaveError, match="cannot write.*Nothing was written"):
        surgery.save(_cnn(), tmp_path / "runs" / "out")
    assert sorted(os.listdir(tmp_path)) == ["runs"]
