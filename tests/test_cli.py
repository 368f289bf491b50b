"""The `surgery` command: inspect and diff, exit codes, and errors without tracebacks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SmallCNN

from surgery.cli import build_model, main


@pytest.fixture()
def ddp_ckpt(tmp_path, r18_imagenet) -> str:
    path = tmp_path / "r18.pth"
    sd = {"module." + k: v for k, v in r18_imagenet.items()}
    torch.save({"epoch": 5, "state_dict": sd, "optimizer": {"state": {}}}, path)
    return str(path)


def test_inspect_text_shows_nesting_counts_and_collapsed_tree(ddp_ckpt, capsys):
    assert main(["inspect", ddp_ckpt]) == 0
    out = capsys.readouterr().out
    assert "state dict: 'state_dict' (other entries: epoch, optimizer)" in out
    assert "tensors:    122, 11.7M elements" in out
    assert "float32 (102), int64 (20)" in out
    assert "{0..1} ×2 identical" in out  # layer1.0 and layer1.1 have the same structure
    assert "weight  (1000, 512) float32" in out


def test_inspect_json(ddp_ckpt, capsys):
    assert main(["inspect", ddp_ckpt, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["nesting"] == ["state_dict"] and info["tensors"] == 122
    assert info["keys"]["module.fc.weight"] == {"shape": [1000, 512], "dtype": "float32"}


def test_diff_exit_status_follows_the_report(ddp_ckpt, capsys):
    args = ["diff", ddp_ckpt, "--model", "torchvision:resnet18", "--num-classes", "10"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "stripped prefix 'module.'" in out and "fc.weight" in out and "(1000, 512)" in out
    assert main([*args, "--skip", "fc.*"]) == 0
    assert main(["diff", ddp_ckpt, "--model", "torchvision:resnet18"]) == 0
    capsys.readouterr()
    assert main([*args, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["prefix"] == ["module.", ""]
    assert [m["key"] for m in report["mismatched"]] == ["fc.weight", "fc.bias"]


def test_diff_with_remap_and_timm_spec(tmp_path, r18_imagenet, capsys):
    path = tmp_path / "bb.pth"
    torch.save({"backbone." + k: v for k, v in r18_imagenet.items()}, path)
    args = ["diff", str(path), "--model", "timm:resnet18", "--no-prefix"]
    assert main(args) == 1
    assert main([*args, "--remap", r"^backbone\.="]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "missing.pth"], "does not exist"),
        (["diff", "{ckpt}", "--model", "torchvision:resnet81"], "Did you mean: resnet18"),
        (["diff", "{ckpt}", "--model", "timm:vit_tiny_patch16_2244"], "unknown model"),
        (["diff", "{ckpt}", "--model", "resnet18"], "unknown model spec"),
        (["diff", "{ckpt}", "--model", "no_such_pkg.models:net"], "cannot import"),
        (["diff", "{ckpt}", "--model", "torchvision:resnet18", "--remap", "nope"], "REGEX="),
        (["inspect", "{junk}"], "truncated or corrupt"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, ddp_ckpt, tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage" * 20)
    argv = [a.format(ckpt=ddp_ckpt, junk=junk) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_factory_spec(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "from conftest import SmallCNN\n\ndef small(num_classes=10):\n"
        "    return SmallCNN(num_classes=num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("my_models:small", num_classes=4)
    assert model.fc.out_features == 4
    torch.save(SmallCNN().state_dict(), tmp_path / "cnn.pt")
    assert main(["diff", str(tmp_path / "cnn.pt"), "--model", "my_models:small"]) == 0


def test_console_script_is_installed(ddp_ckpt):
    exe = shutil.which("surgery", path=str(Path(sys.executable).parent))
    assert exe, "the surgery console script is not installed next to this python"
    out = subprocess.run(
        [exe, "diff", ddp_ckpt, "--model", "torchvision:resnet18", "--num-classes", "3"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1 and "fc.weight" in out.stdout
    out = subprocess.run([exe, "inspect", "nope.pt"], capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
