"""Hub names resolve through huggingface_hub / timm / torchvision caches; nothing is downloaded.

Every test runs offline (HF_HUB_OFFLINE=1) against caches built in tmp_path in the layouts
huggingface_hub (``models--org--name/snapshots/<rev>/...``) and torch.hub
(``<hub dir>/checkpoints/<file>``) read.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

import surgery

from support import SmallCNN, assert_same_state, snapshot

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def caches(tmp_path, monkeypatch):
    """Empty HF and torch.hub caches under tmp_path; offline; downloads fail loudly."""
    hf = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch-hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return hf, tmp_path / "torch-hub"


def put_hf(cache: Path, repo_id: str, files: dict[str, dict | bytes], rev: str = REV) -> Path:
    """Write files into a snapshot of ``repo_id`` and point refs/main at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    for name, content in files.items():
        path = snap / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif name.endswith(".safetensors"):
            save_file(content, path)
        else:
            torch.save(content, path)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snap


def small_state(num_classes: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in SmallCNN(num_classes=num_classes).state_dict().items()}


def assert_loaded_from(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_hf_hub_name_loads_the_cached_safetensors(caches):
    state = small_state()
    snap = put_hf(caches[0], "org/small", {"model.safetensors": state})
    model = SmallCNN()
    report = surgery.load_partial(model, "hf-hub:org/small")
    assert_loaded_from(model, state)
    assert report.source == str(snap / "model.safetensors")
    assert surgery.hub_file("hf-hub:org/small") == snap / "model.safetensors"


def test_hf_hub_falls_back_to_pytorch_model_bin_and_takes_a_file_and_revision(caches):
    main, other = small_state(seed=0), small_state(seed=1)
    put_hf(caches[0], "org/small", {"pytorch_model.bin": main})
    rev2 = "f" * 40
    put_hf(caches[0], "org/small", {"sub/ema.pth": {"ema": other}}, rev=rev2)
    (caches[0] / "models--org--small" / "refs" / "main").write_text(REV)  # main is REV

    model = SmallCNN()
    surgery.load_partial(model, "hf_hub:org/small")
    assert_loaded_from(model, main)
    surgery.load_partial(model, f"hf-hub:org/small@{rev2}/sub/ema.pth", key="ema")
    assert_loaded_from(model, other)


def test_hf_hub_sharded_index_comes_with_its_shards(caches):
    state = small_state()
    keys = list(state)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00002.safetensors": {k: state[k] for k in keys[:half]},
        "model-00002-of-00002.safetensors": {k: state[k] for k in keys[half:]},
    }
    index = {"weight_map": {k: n for n, part in shards.items() for k in part}}
    put_hf(
        caches[0],
        "org/sharded",
        {**shards, "model.safetensors.index.json": json.dumps(index).encode()},
    )
    model = SmallCNN()
    surgery.load_partial(model, "hf-hub:org/sharded")
    assert_loaded_from(model, state)


def test_timm_name_resolves_to_the_hub_repo_of_its_pretrained_cfg(caches):
    state = small_state()  # any tensors will do: the test is about where the file is found
    snap = put_hf(caches[0], "timm/resnet18.a1_in1k", {"model.safetensors": state})
    assert surgery.hub_file("timm:resnet18.a1_in1k") == snap / "model.safetensors"
    assert surgery.hub_file("timm:resnet18") == snap / "model.safetensors"  # the default tag
    sd = surgery.read_checkpoint("timm:resnet18.a1_in1k")
    assert sd.keys() == state.keys() and torch.equal(sd["fc.weight"], state["fc.weight"])


def test_torchvision_weights_resolve_to_the_torch_hub_cache(caches):
    state = small_state()
    path = caches[1] / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    model = SmallCNN()
    report = surgery.load_partial(model, "torchvision:ResNet18_Weights.IMAGENET1K_V1")
    assert_loaded_from(model, state)
    assert report.source == str(path)
    assert surgery.hub_file("torchvision:resnet18") == path  # DEFAULT is IMAGENET1K_V1


def test_offline_and_not_cached_names_the_cache_and_a_local_file(caches):
    model = SmallCNN()
    before = snapshot(model)
    repo = caches[0] / "models--timm--resnet18.a1_in1k"
    with pytest.raises(surgery.CheckpointError) as e:
        surgery.load_partial(model, "timm:resnet18.a1_in1k")
    msg = str(e.value)
    assert str(repo) in msg and "HF_HUB_OFFLINE=1" in msg and "model.safetensors" in msg
    assert "path of a local copy" in msg
    assert_same_state(model, before)

    with pytest.raises(surgery.CheckpointError) as e:
        surgery.load_partial(model, "torchvision:ResNet50_Weights.IMAGENET1K_V2")
    msg = str(e.value)
    assert str(caches[1] / "checkpoints" / "resnet50-11ad3fa6.pth") in msg
    assert "HF_HUB_OFFLINE=1" in msg and "path of a local copy" in msg
    assert_same_state(model, before)


def test_offline_env_set_after_import_is_respected(caches, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # env only
    with pytest.raises(surgery.CheckpointError, match="HF_HUB_OFFLINE=1 forbids"):
        surgery.hub_file("torchvision:ResNet18_Weights.IMAGENET1K_V1")


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("timm:resnet18.nope", r"timm has no pretrained weights named 'resnet18.nope'.*resnet18"),
        ("timm:resnett18", "close names: resnet18"),
        ("torchvision:Nope_Weights.X", "torchvision has no weights 'Nope_Weights.X'"),
        ("torchvision:ResNet18_Weights.NOPE", "torchvision has no weights"),
        ("torchvision:resnet18.x", "torchvision has no weights 'resnet18.x'"),  # not an enum
        ("hf-hub:", "names nothing after 'hf-hub:'"),
    ],
)
def test_unknown_names(caches, name, match):
    with pytest.raises(surgery.CheckpointError, match=match):
        surgery.hub_file(name)


def test_an_existing_local_file_wins_over_the_hub_name(caches, tmp_path, monkeypatch):
    state = small_state()
    monkeypatch.chdir(tmp_path)
    torch.save(state, tmp_path / "timm:mine.pth")
    model = SmallCNN()
    surgery.load_partial(model, "timm:mine.pth")
    assert_loaded_from(model, state)
