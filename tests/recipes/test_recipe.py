"""recipes/resnet18_head.py, run as a script: the demo (reduced and full) and the --data path."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "resnet18_head.py"
RESULT = re.compile(r"^RESULT (.*)$", re.MULTILINE)
METHODS = ("from scratch", "new head only", "full fine-tune, param groups")

# The recipes run as scripts, each in a fresh interpreter: left out of `make test-fast`.
pytestmark = pytest.mark.distributed


def run_recipe(
    *args: str, timeout: float = 600, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the recipe in a fresh interpreter; return the finished process."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # One thread: on a small shared CPU, competing OpenMP threads make runs many times slower.
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, str(RECIPE), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def run_ok(*args: str, **kwargs) -> str:
    """Run the recipe; return its stdout (fail with its stderr)."""
    proc = run_recipe(*args, **kwargs)
    assert proc.returncode == 0, f"recipe failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


def run_fails(*args: str, **kwargs) -> str:
    """Run the recipe, expecting exit status 2 and one line of error; return that line."""
    proc = run_recipe(*args, **kwargs)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resnet18_head: error: "), proc.stderr
    return lines[0]


def result(out: str) -> dict[str, str]:
    found = RESULT.findall(out)
    assert len(found) == 1, f"expected one RESULT line in:\n{out}"
    return dict(item.split("=", 1) for item in found[0].split())


def table_row(out: str, method: str) -> tuple[float, float]:
    """(test accuracy, seconds) from the final table's row for ``method``."""
    m = re.search(rf"^{re.escape(method)}\s+([0-9.]+)\s+([0-9.]+)s$", out, re.MULTILINE)
    assert m, f"no table row for {method!r} in:\n{out}"
    return float(m.group(1)), float(m.group(2))


def quick_demo(workdir: Path, seed: int = 0) -> str:
    return run_ok(
        "--quick",
        "--seed",
        str(seed),
        "--workdir",
        str(workdir),
        "--out",
        str(workdir / "finetuned.safetensors"),
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("demo")
    return workdir, quick_demo(workdir)


def test_demo_prints_resolved_arguments_first(quick):
    _, out = quick
    first = out.splitlines()[0]
    assert first.startswith("resnet18_head: ")
    for arg in (
        "--quick=True",
        "--epochs=2",
        "--pretrain-epochs=1",
        "--seed=0",
        "--device=cpu",
        "--threads=1",
    ):
        assert arg in first
    assert "1 CPU thread" in out.splitlines()[1]


def test_demo_prints_a_plain_line_per_epoch(quick):
    # the output is not a terminal here: no tqdm bar, yet every epoch shows loss and accuracy
    _, out = quick
    epoch_line = r"^{} epoch {}/{}  train loss \d+\.\d{{3}}  val acc [01]\.\d{{3}}  \(\d+\.\ds\)$"
    assert re.search(epoch_line.format("pretrain", 1, 1), out, re.MULTILINE), out
    for row in ("scratch", "head", "finetune"):
        for epoch in (1, 2):
            assert re.search(epoch_line.format(row, epoch, 2), out, re.MULTILINE), (row, out)
    assert "100 to show progress" in out


def test_demo_table_says_what_each_row_is_and_the_chance_level(quick):
    _, out = quick
    assert "  from scratch:   a randomly initialised resnet18" in out
    assert "  new head only:  the digits 0-4 checkpoint, frozen" in out
    assert "  full fine-tune: the checkpoint with a new fc; every layer trains" in out
    chance = re.search(r"chance: 0\.200 \(5 classes; .* scores (0\.\d+)\)", out)
    assert chance and 0.2 <= float(chance.group(1)) < 0.35
    accs = {k: float(v) for k, v in result(out).items() if k.endswith("_acc")}
    gain = re.search(r"transfer gain over from scratch: ([+-]\d\.\d+) .* ([+-]\d\.\d+) ", out)
    assert float(gain.group(1)) == pytest.approx(accs["head_acc"] - accs["scratch_acc"], abs=2e-3)
    assert float(gain.group(2)) == pytest.approx(
        accs["finetune_acc"] - accs["scratch_acc"], abs=2e-3
    )


def test_demo_saves_a_ddp_style_pretraining_checkpoint(quick):
    workdir, _ = quick
    ckpt = torch.load(workdir / "resnet18_digits0-4.pth", weights_only=True)
    assert set(ckpt) == {"epoch", "state_dict", "optimizer"}
    assert all(k.startswith("module.") for k in ckpt["state_dict"])
    assert ckpt["state_dict"]["module.fc.weight"].shape == (5, 512)


def test_demo_prints_load_report_freeze_summary_and_groups(quick):
    _, out = quick
    # the two transfer rows load the checkpoint: container unwrapped, prefix stripped, old head
    # left out and said so, everything else loaded
    assert out.count("LoadReport: ") == 2
    assert "resnet18_digits0-4.pth['state_dict'] -> ResNet" in out
    assert out.count("stripped prefix 'module.' (122 keys)") == 2
    assert len(re.findall(r"^\s+skipped\s+fc\.weight\s", out, re.MULTILINE)) == 2
    assert len(re.findall(r"^\s+skipped\s+fc\.bias\s", out, re.MULTILINE)) == 2
    assert out.count("loaded 60/62 parameter tensors") == 2
    assert "missing" not in out
    # head only: everything but fc frozen, BatchNorm statistics held
    assert "freeze_except ResNet: 60 tensors" in out
    assert "BatchNorm: 20 held in eval mode" in out
    # one describe_groups table per row; the fine-tune row has layer-wise learning rates
    assert len(re.findall(r"^\d+ parameter groups, ", out, re.MULTILINE)) == 3
    assert "12 parameter groups, 62 tensors" in out
    assert "2 parameter groups, 2 tensors" in out  # the head only


def test_demo_prints_the_table_and_result_line(quick):
    _, out = quick
    values = result(out)
    assert set(values) == {"scratch_acc", "head_acc", "finetune_acc", "total_time"}
    for key, method in zip(("scratch_acc", "head_acc", "finetune_acc"), METHODS, strict=True):
        acc, seconds = table_row(out, method)
        assert 0.0 <= acc <= 1.0
        assert seconds > 0
        assert float(values[key]) == pytest.approx(acc, abs=1e-3)
    assert re.fullmatch(r"\d+s", values["total_time"])


def test_demo_fine_tuned_weights_load_into_a_fresh_model(quick):
    workdir, _ = quick
    path = workdir / "finetuned.safetensors"
    model = torchvision.models.resnet18(num_classes=5)
    model.load_state_dict(load_file(path))  # strict: every key, every shape
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["classes"]) == ["5", "6", "7", "8", "9"]
    pretrained = torch.load(workdir / "resnet18_digits0-4.pth", weights_only=True)["state_dict"]
    # fine-tuned from the checkpoint, not a fresh init, and really trained
    assert not torch.equal(model.layer4[1].conv2.weight, pretrained["module.layer4.1.conv2.weight"])
    drift = (model.conv1.weight - pretrained["module.conv1.weight"]).abs().max()
    assert 0 < drift < 1e-2  # conv1 trains with the smallest layer-decayed lr


def test_demo_is_deterministic_under_seed_and_quick_has_its_own_folder(quick, tmp_path):
    workdir, out = quick
    again = run_ok("--quick", cwd=tmp_path)  # default folders, relative to the cwd
    assert {k: v for k, v in result(again).items() if k != "total_time"} == {
        k: v for k, v in result(out).items() if k != "total_time"
    }
    assert "--workdir=runs/quick" in again.splitlines()[0]
    quick_dir = tmp_path / "runs" / "quick"
    assert sorted(p.name for p in quick_dir.iterdir()) == [
        "finetuned.safetensors",
        "resnet18_digits0-4.pth",
    ]
    assert not (tmp_path / "runs" / "resnet18_head").exists()  # the full demo's folder
    first, second = (
        load_file(workdir / "finetuned.safetensors"),
        load_file(quick_dir / "finetuned.safetensors"),
    )
    assert all(torch.equal(first[k], second[k]) for k in first)


def assert_transfer_beats_scratch(out: str) -> None:
    """The demo's story: pretraining learned digits 0-4, and both transfer rows beat training
    from scratch on digits 5-9 by a clear margin."""
    scratch, head, finetune = (table_row(out, m)[0] for m in METHODS)
    assert "held-out accuracy 0.9" in out or "held-out accuracy 1.000" in out
    assert head > scratch + 0.05, out
    assert finetune > scratch + 0.05, out


def test_short_demo_transfer_beats_scratch(tmp_path):
    # The demo's story at about a third of its CPU time: 5 pretraining epochs instead of 20,
    # 10 transfer epochs instead of 30. Over seeds 0-9 (1 thread) transfer beat training from
    # scratch by +0.12 to +0.22 (new head only) and +0.10 to +0.23 (full fine-tune), with
    # 0.94-0.99 held-out accuracy on digits 0-4; the full demo below asserts the same.
    out = run_ok(
        "--pretrain-epochs",
        "5",
        "--epochs",
        "10",
        "--workdir",
        str(tmp_path),
        "--out",
        str(tmp_path / "ft.safetensors"),
    )
    assert_transfer_beats_scratch(out)


@pytest.mark.slow
@pytest.mark.demo
def test_full_demo_transfer_beats_scratch(tmp_path):
    out = run_ok("--workdir", str(tmp_path), "--out", str(tmp_path / "ft.safetensors"))
    assert_transfer_beats_scratch(out)


# --------------------------------------------------------------------------- --data


def make_image_folder(root: Path, per_class: int = 8) -> list[str]:
    """A tiny ImageFolder of real digits (0, 1, 2) as 24x24 RGB PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    classes = ["one", "two", "zero"]  # ImageFolder sorts class folders by name
    for name, digit in zip(classes, (1, 2, 0), strict=True):
        (root / name).mkdir(parents=True)
        images = digits.images[digits.target == digit][:per_class]
        for i, img in enumerate(images):
            grey = Image.fromarray((img * 255 / 16).astype("uint8"))
            grey.resize((24, 24), Image.BILINEAR).convert("RGB").save(root / name / f"{i}.png")
    return classes


def test_data_path_fine_tunes_from_a_checkpoint_and_saves_safetensors(tmp_path):
    classes = make_image_folder(tmp_path / "data")
    torch.manual_seed(0)
    pretrained = torchvision.models.resnet18(num_classes=10).state_dict()
    ckpt = tmp_path / "resnet18_10class.safetensors"
    save_file(pretrained, ckpt)
    out_path = tmp_path / "out" / "ft.safetensors"
    out = run_ok(
        "--weights",
        str(ckpt),
        "--data",
        str(tmp_path / "data"),
        "--freeze",
        "conv1, bn1,layer1",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--val-fraction",
        "0.25",
        "--out",
        str(out_path),
    )
    assert out.splitlines()[0].startswith("resnet18_head: --weights=")
    assert "data: 18 train / 6 val images, 3 classes" in out
    assert "old head {'fc.weight': (10, 512)}" in out
    assert re.search(r"^\s+skipped\s+fc\.weight\s", out, re.MULTILINE)
    assert "freeze ResNet: 15 tensors" in out  # conv1, bn1 and layer1's 4 convs and 4 BNs
    assert "BatchNorm: 5 held in eval mode" in out
    assert re.search(r"^\d+ parameter groups, 47 tensors", out, re.MULTILINE)
    assert re.search(r"^fine-tune epoch 1/1  train loss \d\.\d{3}  val acc ", out, re.MULTILINE)
    val_acc = float(re.search(r"^RESULT val_acc=([0-9.]+) ", out, re.MULTILINE).group(1))
    assert 0.0 <= val_acc <= 1.0

    state = load_file(out_path)
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(state)
    with safe_open(out_path, "pt") as f:
        assert json.loads(f.metadata()["classes"]) == classes
    # frozen layers (and their BatchNorm statistics) are exactly the checkpoint's
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight"):
        assert torch.equal(state[key], pretrained[key]), key
    assert not torch.equal(state["layer4.1.conv2.weight"], pretrained["layer4.1.conv2.weight"])


def test_weights_and_data_go_together(capsys):
    spec = importlib.util.spec_from_file_location("resnet18_head", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--weights", "x.pth"])  # an argument error: exits before doing anything
    assert exit_info.value.code == 2
    assert "--weights and --data go together" in capsys.readouterr().err


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "data"
    make_image_folder(root, per_class=4)
    return root


FAST = ("--epochs", "1", "--image-size", "32", "--workers", "0", "--batch-size", "5")


def test_missing_weights_file_is_one_line_with_the_fix(tiny_folder, tmp_path):
    line = run_fails("--weights", str(tmp_path / "nope.pth"), "--data", str(tiny_folder))
    assert "nope.pth: no such file" in line and "'timm:NAME' or 'hf-hub:ORG/NAME'" in line


def test_missing_data_folder(tmp_path):
    torch.save({}, tmp_path / "w.pth")
    line = run_fails("--weights", str(tmp_path / "w.pth"), "--data", str(tmp_path / "nodata"))
    assert "nodata: no such folder. Pass an ImageFolder" in line


def test_empty_data_folder(tmp_path):
    torch.save({}, tmp_path / "w.pth")
    (tmp_path / "empty").mkdir()
    line = run_fails("--weights", str(tmp_path / "w.pth"), "--data", str(tmp_path / "empty"))
    assert "Couldn't find any class folder" in line and "one folder of images per class" in line


def test_freeze_selector_matching_nothing_fails_before_any_work(tiny_folder, tmp_path):
    line = run_fails(
        "--weights", "torchvision", "--data", str(tiny_folder), "--freeze", "conv1,layer5"
    )
    assert "--freeze conv1,layer5: " in line and "'layer5' matched nothing" in line
    assert "layer4" in line  # the closest names


def test_torchvision_weights_offline_say_where_the_file_goes(tiny_folder, tmp_path):
    # no network: a proxy on a closed port refuses every connection at once
    offline = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    env = {**offline, "TORCH_HOME": str(tmp_path / "torch_home"), "NO_PROXY": "", "no_proxy": ""}
    line = run_fails("--weights", "torchvision", "--data", str(tiny_folder), env=env)
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "from https://download.pytorch.org/models/resnet18-f37072fd.pth" in line
    assert str(cached) in line and "--weights PATH" in line and "load_partial" not in line
    # each thing said once: the name (as typed), the URL, the path, the way out
    assert line.startswith("resnet18_head: error: --weights torchvision: cannot download ")
    for said in ("--weights torchvision", "https://download.", str(cached), "local copy"):
        assert line.count(said) == 1, (said, line)
    assert "ResNet18_Weights" not in line and "Offline" not in line


def test_hub_weights_offline_say_each_thing_once(tiny_folder, tmp_path):
    # HF_HUB_OFFLINE=1: nothing is downloaded; the library's advice is worded as flags, once
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    line = run_fails("--weights", "timm:resnet18.a1_in1k", "--data", str(tiny_folder), env=env)
    assert line.startswith(
        "resnet18_head: error: --weights timm:resnet18.a1_in1k: not in the Hugging Face cache ("
    )
    assert "hf download timm/resnet18.a1_in1k" in line and "load_partial" not in line
    assert line.count("timm:resnet18.a1_in1k") == 1 and line.count("local copy") == 1, line
    assert line.endswith(", or pass a local copy as --weights PATH"), line


def test_pickled_model_needs_trust_pickle(tiny_folder, tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(num_classes=7), whole)
    args = ("--weights", str(whole), "--data", str(tiny_folder), "--freeze", "none", *FAST)
    line = run_fails(*args, "--out", str(tmp_path / "ft.safetensors"))
    assert "pass --trust-pickle" in line and "trust_pickle=True" not in line
    out = run_ok(*args, "--trust-pickle", "--out", str(tmp_path / "ft.safetensors"))
    assert "old head {'fc.weight': (7, 512)}" in out
    assert (tmp_path / "ft.safetensors").exists()


# --------------------------------------------------------------------------- --help


def load_recipe(path: Path):
    """The recipe as a module (its main() not run)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["resnet18_head.py", "sharded_load.py"])
def test_help_explains_every_option_and_shows_its_default(script):
    path = ROOT / "recipes" / script
    proc = subprocess.run(
        [sys.executable, str(path), "--help"], capture_output=True, text=True, check=True
    )
    # one block per option: "  --name METAVAR   help text" and its continuation lines
    blocks: dict[str, str] = {}
    for block in re.split(r"\n(?=  -)", proc.stdout.split("\noptions:\n", 1)[1]):
        words = block.split("\n\n")[0].split()  # not the next group's heading
        options = []
        while words and (words[0].startswith("-") or words[0] == words[0].upper()):
            options.append(words.pop(0).rstrip(","))  # the option strings and metavars
        for option in options:
            blocks[option] = " ".join(words)
    parser = load_recipe(path).get_args_parser()
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(actions) >= 7
    for action in actions:
        option = action.option_strings[-1]
        text = blocks.get(option, "")
        assert len(text) > 15, f"{script} {option} has no help: {text!r}"
        default = action.default
        if default is None:  # a default that depends on the mode is said in words
            assert "(default: None)" not in text
        elif default is not False and default != []:
            assert f"(default: {default})" in text, f"{script} {option} hides its default {text!r}"


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--epochs", "0", "--epochs 0: must be at least 1, e.g. --epochs 10"),
        ("--val-fraction", "1.5", "--val-fraction 1.5: must be in [0, 1): the share of DATA"),
        ("--val-fraction", "-0.1", "(0: train on every image, without validation)"),
        ("--val-fraction", "nan", "--val-fraction nan: must be in [0, 1)"),
        ("--batch-size", "0", "--batch-size 0: must be at least 1, e.g. --batch-size 16"),
        ("--lr", "-1", "--lr -1.0: must be a positive number"),
        ("--layer-decay", "1.5", "--layer-decay 1.5: must be above 0 and at most 1"),
        ("--workers", "-1", "--workers -1: must be 0 (load in the main process) or more"),
        ("--device", "cuda:99" if torch.cuda.is_available() else "cuda", "--device cuda"),
    ],
)
def test_out_of_range_numbers_are_one_line_errors_before_any_work(
    option, value, said, tmp_path, capsys
):
    recipe = load_recipe(RECIPE)
    argv = ["--weights", str(tmp_path / "w.pth"), "--data", str(tmp_path / "data")]
    with pytest.raises(SystemExit) as exit_info:
        recipe.main([*argv, option, value])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resnet18_head: error: "), captured.err
    assert said in lines[0]
    assert captured.out == ""  # refused before printing the resolved arguments or reading files


def test_too_many_shots_for_the_demo_is_one_line(tmp_path):
    line = run_fails("--quick", "--shots", "500", "--workdir", str(tmp_path / "w"))
    assert line == (
        "resnet18_head: error: --shots 500: must be at most 159 (digits 5-9 need the rest to "
        "show progress and to test on), e.g. --shots 10"
    )
    assert not (tmp_path / "w").exists()  # refused before pretraining


# --------------------------------------------------------------------------- awkward data


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def fine_tune_data(data: Path, tmp_path: Path, *args: str) -> str:
    """The --data path from a random 10-class checkpoint, fast settings; returns stdout."""
    ckpt = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_file(torchvision.models.resnet18(num_classes=10).state_dict(), ckpt)
    return run_ok(
        "--weights", str(ckpt), "--data", str(data), *FAST, "--out", str(tmp_path / "ft.st"), *args
    )


def test_val_fraction_zero_trains_on_every_image_without_validation(tiny_folder, tmp_path):
    out = fine_tune_data(tiny_folder, tmp_path, "--val-fraction", "0")
    assert "data: 12 train images, no validation (--val-fraction 0), 3 classes" in out
    assert re.search(r"^fine-tune epoch 1/1  train loss \d\.\d{3}  \(\d+\.\ds\)$", out, re.M), out
    values = result(out)
    assert set(values) == {"train_loss", "time"}, values  # no made-up validation accuracy
    epoch_loss = re.search(r"^fine-tune epoch 1/1  train loss (\d\.\d{3})", out, re.M).group(1)
    assert values["train_loss"] == epoch_loss


def test_a_one_image_class_trains_and_is_not_held_out(tiny_folder, tmp_path):
    data = copy_folder(tiny_folder, tmp_path / "data")
    for extra in ("1.png", "2.png", "3.png"):
        (data / "one" / extra).unlink()  # 'one' keeps a single image: 9 images in all
    # seed 0 holds out 2 of the 9, 'one' among them: a class that never trains. Kept in
    # training instead, 8 train in batches of 6 (before: 7, a last batch of 1 that BatchNorm
    # in training mode cannot normalise at this size)
    out = fine_tune_data(data, tmp_path, "--freeze", "none", "--batch-size", "6")
    assert "note: class 'one' has 1 image; it trains, none is held out" in out
    assert "data: 8 train / 1 val images, 3 classes" in out
    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(load_file(tmp_path / "ft.st"))  # trained and saved: every key


def test_a_last_batch_of_one_image_is_dropped(tiny_folder, tmp_path):
    # 12 images, 3 held out: 9 to train on in batches of 8 leaves one image alone
    out = fine_tune_data(
        tiny_folder, tmp_path, "--freeze", "none", "--batch-size", "8", "--val-fraction", "0.25"
    )
    assert "data: 9 train / 3 val images, 3 classes" in out
    assert (
        "note: 9 training images in batches of 8 leave a last batch of 1, which BatchNorm "
        "cannot train on; it is dropped each epoch" in out
    )
    assert re.search(r"^RESULT val_acc=[01]\.\d{3} train_loss=\d+\.\d{3} time=\d+s$", out, re.M)


@pytest.mark.parametrize(
    ("damage", "workers", "why"),
    [("garbage", "0", "not an image PIL knows"), ("truncated", "1", "image file is truncated")],
)
def test_a_corrupt_image_is_named_with_its_path(tiny_folder, tmp_path, damage, workers, why):
    data = copy_folder(tiny_folder, tmp_path / "data")
    bad = data / "two" / "1.png"
    bad.write_bytes(b"not a png" if damage == "garbage" else bad.read_bytes()[:120])
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pth")
    args = ("--weights", str(tmp_path / "w.pth"), "--data", str(data), "--val-fraction", "0")
    line = run_fails(*args, *FAST, "--workers", workers, "--out", str(tmp_path / "ft.st"))
    assert line == (
        f"resnet18_head: error: --data: cannot read the image {bad} ({why}); delete or "
        "replace that file"
    )
    assert not (tmp_path / "ft.st").exists()


def test_train_and_val_folders_with_different_classes_name_them(tiny_folder, tmp_path):
    data = tmp_path / "data"
    copy_folder(tiny_folder, data / "train")
    copy_folder(tiny_folder, data / "val")
    (data / "val" / "zero").rename(data / "val" / "nought")
    torch.save({}, tmp_path / "w.pth")
    line = run_fails("--weights", str(tmp_path / "w.pth"), "--data", str(data), *FAST)
    assert line == (
        f"resnet18_head: error: --data {data}: train/ and val/ hold different class folders: "
        "'zero' only in train/; 'nought' only in val/. Give both the same class folders (the "
        "head's outputs follow their sorted names)"
    )


def test_a_single_class_folder_is_refused(tmp_path):
    make_image_folder(tmp_path / "all", per_class=2)
    data = copy_folder(tmp_path / "all" / "one", tmp_path / "data" / "one").parent
    torch.save({}, tmp_path / "w.pth")
    line = run_fails("--weights", str(tmp_path / "w.pth"), "--data", str(data), *FAST)
    assert line == (
        f"resnet18_head: error: --data {data}: one class folder ('one'); a classifier needs at "
        "least 2"
    )


# --------------------------------------------------------------------------- --allow-global

HPARAMS_MODULE = '''
class TrainConfig:
    """Plain data a training script stored inside its state dict."""

    def __init__(self, lr, layers):
        self.lr, self.layers = lr, layers
'''


def test_allow_global_admits_a_class_the_weights_hold(tiny_folder, tmp_path):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "recipe_hparams.py").write_text(HPARAMS_MODULE)
    sys.path.insert(0, str(tmp_path / "mods"))
    try:
        from recipe_hparams import TrainConfig  # written above, as a user's module is

        torch.manual_seed(0)
        pretrained = torchvision.models.resnet18(num_classes=10).state_dict()
        ckpt = tmp_path / "with_config.pth"
        torch.save({**pretrained, "config": TrainConfig(0.1, [2, 2, 2, 2])}, ckpt)
    finally:
        sys.path.remove(str(tmp_path / "mods"))
        sys.modules.pop("recipe_hparams", None)
    env = {"PYTHONPATH": str(tmp_path / "mods")}
    args = ("--weights", str(ckpt), "--data", str(tiny_folder), "--freeze", "conv1,layer1", *FAST)
    args = (*args, "--out", str(tmp_path / "ft.safetensors"))

    line = run_fails(*args, env=env)  # refused: the class is not on the allow-list
    assert "contains pickled Python objects (recipe_hparams.TrainConfig)" in line
    assert "pass --allow-global recipe_hparams.TrainConfig;" in line
    assert "pass --trust-pickle." in line
    assert "allow_globals" not in line and "trust_pickle" not in line

    out = run_ok(*args, "--allow-global", "recipe_hparams.TrainConfig", env=env)
    assert "--allow-global=['recipe_hparams.TrainConfig']" in out.splitlines()[0]
    assert "read " + str(ckpt) + ": 122 tensors, old head {'fc.weight': (10, 512)}" in out
    state = load_file(tmp_path / "ft.safetensors")
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer1.1.bn2.running_var"):
        assert torch.equal(state[key], pretrained[key]), key  # frozen: the checkpoint's values

    line = run_fails(*args, "--allow-global", "recipe_hparams.NoSuchConfig", env=env)
    assert line == (
        "resnet18_head: error: --allow-global recipe_hparams.NoSuchConfig: no such class; give "
        "MODULE.NAME of a class Python can import (its module installed or on PYTHONPATH), or "
        "pass the class itself"
    )
