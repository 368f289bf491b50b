"""The `surgery` command: inspect and diff, exit codes, and errors without tracebacks."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgery.cli import build_model, main

from support import SmallCNN, run_cli


@pytest.fixture()
def ddp_ckpt(tmp_path, r18_imagenet) -> str:
    path = tmp_path / "r18.pth"
    sd = {"module." + k: v for k, v in r18_imagenet.items()}
    torch.save({"epoch": 5, "state_dict": sd, "optimizer": {"state": {}}}, path)
    return str(path)


def test_inspect_text_shows_nesting_counts_and_collapsed_tree(ddp_ckpt, capsys):
    done = run_cli(capsys, "inspect", ddp_ckpt)
    assert done.code == 0 and done.err == ""
    out = done.out
    assert "state dict: 'state_dict' (other entries: epoch, optimizer)" in out
    assert "tensors:    122, 11.7M elements" in out
    assert "float32 (102), int64 (20)" in out
    assert "{0..1} ×2 identical" in out  # layer1.0 and layer1.1 have the same structure
    assert "weight  (1000, 512) float32" in out


def test_inspect_json(ddp_ckpt, capsys):
    done = run_cli(capsys, "inspect", ddp_ckpt, "--json")
    assert done.code == 0
    info = json.loads(done.out)
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
        "from support import SmallCNN, run_cli\n\ndef small(num_classes=10):\n"
        "    return SmallCNN(num_classes=num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("my_models:small", num_classes=4)
    assert model.fc.out_features == 4
    torch.save(SmallCNN().state_dict(), tmp_path / "cnn.pt")
    assert main(["diff", str(tmp_path / "cnn.pt"), "--model", "my_models:small"]) == 0


@pytest.mark.distributed  # spawns a process
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


# --------------------------------------------------------------------------- issue 12


def test_diff_reports_model_tensors_a_meta_model_cannot_initialise(tmp_path, capsys):
    # A ViT's cls_token/pos_embed belong to the VisionTransformer itself, which has no
    # reset_parameters(): on meta they cannot get a value, so diff plans on a real model.
    import timm

    state = timm.create_model("test_vit", num_classes=10).state_dict()
    del state["pos_embed"]
    torch.save(state, tmp_path / "vit.pth")
    args = ["diff", str(tmp_path / "vit.pth"), "--model", "timm:test_vit", "--skip", "head.*"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.err == ""
    assert re.search(r"^\s+missing\s+pos_embed\s", captured.out, re.MULTILINE)
    assert "not ok: 1 tensor not loaded: pos_embed" in captured.out
    assert main([*args, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["missing"] == ["pos_embed"] and report["initialised"] == []
    state["pos_embed"] = torch.zeros(timm.create_model("test_vit").pos_embed.shape)
    torch.save(state, tmp_path / "vit.pth")
    assert main(args) == 0  # complete: planned on meta, nothing built for real


def _write_package(root: Path, name: str) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    (root / name / "models.py").write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes=3):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(4, num_classes)\n\n\n"
        "def build_net(num_classes=3):\n    return Net(num_classes)\n\n\n"
        "def not_a_model(num_classes=3):\n    return 3\n\n\n"
        "if __name__ == '__main__':\n    raise SystemExit('imported, not run')\n"
    )


def test_model_spec_imports_from_the_current_directory(tmp_path, monkeypatch, capsys):
    _write_package(tmp_path, "cli_pkg_cwd")
    torch.save({"fc.weight": torch.ones(3, 4), "fc.bias": torch.ones(3)}, tmp_path / "net.pt")
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    assert main(["diff", "net.pt", "--model", "cli_pkg_cwd.models:build_net"]) == 0
    assert "ok: strict=True would load this checkpoint" in capsys.readouterr().out
    assert sys.path == path_before  # the current directory was importable only for the command
    assert main(["diff", "net.pt", "--model", "cli_pkg_cwd.models:not_a_model"]) == 2
    assert "cli_pkg_cwd.models:not_a_model returned an int, not an nn.Module" in (
        capsys.readouterr().err
    )
    sys.modules.pop("cli_pkg_cwd.models", None)
    sys.modules.pop("cli_pkg_cwd", None)


@pytest.mark.distributed  # spawns a process
def test_python_dash_m_surgery_and_version(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-m", "surgery", "--version"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert out.returncode == 0 and out.stdout.startswith("surgery 0.1.0 (torch ")
    out = subprocess.run(
        [sys.executable, "-m", "surgery", "inspect", str(tmp_path / "nope.pt")],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_version_option(capsys):
    done = run_cli(capsys, "--version")
    assert done.code == 0
    assert done.out.startswith("surgery 0.1.0")


@pytest.mark.parametrize("argv", [["--depth", "0"], ["--depth", "-1"], ["--depth", "two"]])
def test_bad_depth_is_refused_by_the_parser(argv, r18_path, capsys):
    done = run_cli(capsys, "inspect", r18_path, *argv)
    assert done.code == 2
    err = done.err
    assert "argument --depth: " in err
    assert "must be 1 or more" in err or "'two' is not a whole number" in err


def test_num_classes_must_be_positive(r18_path, capsys):
    with pytest.raises(SystemExit):
        main(["diff", r18_path, "--model", "torchvision:resnet18", "--num-classes", "0"])
    assert "argument --num-classes: must be 1 or more, not 0" in capsys.readouterr().err


def test_depth_limits_the_tree(r18_path, capsys):
    done = run_cli(capsys, "inspect", r18_path, "--depth", "1")
    assert done.code == 0
    keys = done.out.split("keys:\n", 1)[1].splitlines()
    assert "  layer1  [24 tensors, 148.5K elements]" in keys
    assert all(line.startswith("  ") and not line.startswith("   ") for line in keys)


PICKLING_SCRIPT = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)


if __name__ == "__main__":
    torch.save(Net(), "whole.pt")
"""


@pytest.fixture()
def whole_model(tmp_path, monkeypatch) -> Path:
    """A whole model pickled by a training script that defines its class in __main__."""
    (tmp_path / "train_cli_net.py").write_text(PICKLING_SCRIPT)
    subprocess.run([sys.executable, "train_cli_net.py"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    yield tmp_path / "whole.pt"
    sys.modules.pop("train_cli_net", None)


@pytest.mark.distributed  # spawns a process
def test_pickled_model_advice_names_command_line_options(whole_model, capsys):
    assert main(["inspect", "whole.pt"]) == 2
    err = capsys.readouterr().err
    assert "pass --trust-pickle" in err and "trust_pickle=True" not in err
    assert "__main__.Net" in err and "--import MODULE" in err

    assert main(["inspect", "whole.pt", "--trust-pickle"]) == 2
    err = capsys.readouterr().err
    assert "classes cannot be found: __main__.Net" in err
    assert "pass --import MODULE" in err
    assert "import or define that class" not in err  # Python advice, not for a CLI user
    assert "Traceback" not in err


@pytest.mark.distributed  # spawns a process
def test_import_option_resolves_a_scripts_main_classes(whole_model, capsys):
    main_module = sys.modules["__main__"]
    argv = ["inspect", "whole.pt", "--trust-pickle", "--import", "train_cli_net"]
    assert main(argv) == 0
    assert "weight  (3, 4) float32" in capsys.readouterr().out
    assert not hasattr(main_module, "Net")  # the stand-in lasted only for the command
    assert main(["inspect", "whole.pt", "--import", "no_such_module_xyz"]) == 2
    assert "--import no_such_module_xyz: cannot import it" in capsys.readouterr().err


def test_key_advice_names_the_option(tmp_path, capsys):
    torch.save({"a": {"w": torch.zeros(2)}, "b": {"w": torch.ones(2)}}, tmp_path / "two.pt")
    assert main(["inspect", str(tmp_path / "two.pt")]) == 2
    err = capsys.readouterr().err
    assert "--entry 'a'" in err and "entry=" not in err


EVIL_KEYS = ("fc.\x1b[31mred\x1b[0m", "fc.\x1b]8;;https://example.com\x07link\x1b]8;;\x07")


def test_control_characters_in_key_names_are_escaped(tmp_path, capsys):
    state = SmallCNN().state_dict()
    state.update({k: torch.zeros(1) for k in EVIL_KEYS})
    state[EVIL_KEYS[0] + "\u202e"] = torch.zeros(1)  # a right-to-left override
    torch.save({"state_dict": state, "\x1b[2Jnote": 1}, tmp_path / "evil.pt")
    for argv in (["inspect"], ["diff", "--model", "support:SmallCNN"]):
        # diff: the evil keys are unexpected, so strict=True would fail -> exit 1
        assert main([argv[0], str(tmp_path / "evil.pt"), *argv[1:]]) == (argv[0] == "diff")
        out = capsys.readouterr().out
        for bad in ("\x1b", "\x07", "\u202e"):
            assert bad not in out, (argv, out)
        assert "\\x1b[31mred" in out and "\\x07link" in out and "\\u202e" in out
        if argv[0] == "inspect":
            assert "(other entries: \\x1b[2Jnote)" in out
    assert main(["inspect", str(tmp_path / "evil.pt"), "--json"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and EVIL_KEYS[1] in json.loads(out)["keys"]


def test_escape_control():
    from surgery._text import escape_control

    assert escape_control("layer1.0.conv1.weight") == "layer1.0.conv1.weight"
    assert escape_control("blocks.{0..11} ×12 é 层") == "blocks.{0..11} ×12 é 层"
    assert escape_control("a\x1b[31mb\x9b\x7f\r") == "a\\x1b[31mb\\x9b\\x7f\\x0d"
    assert escape_control("x\u202ey\u200bz\U000e0001") == "x\\u202ey\\u200bz\\U000e0001"
    assert escape_control("one\ntwo\tthree", keep="\n") == "one\ntwo\\x09three"


# --------------------------------------------------------------------------- convert (issue 22)

TINY_VITS = """
from torchvision.models.vision_transformer import VisionTransformer as TV
from timm.models.vision_transformer import VisionTransformer as TM


def tv_vit(num_classes=10):
    return TV(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
              mlp_dim=64, num_classes=num_classes)


def timm_vit(num_classes=10):
    return TM(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
              num_classes=num_classes)
"""


@pytest.fixture()
def tiny_vits(tmp_path, monkeypatch):
    """A module of tiny torchvision and timm ViT factories, importable from the current folder
    (as ``--model tiny_vits:timm_vit``), and the torchvision one's weights in tv.pth."""
    (tmp_path / "tiny_vits.py").write_text(TINY_VITS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import tiny_vits

    torch.manual_seed(0)
    src = tiny_vits.tv_vit().eval()
    torch.save(src.state_dict(), tmp_path / "tv.pth")
    yield tiny_vits, src
    sys.modules.pop("tiny_vits", None)


@pytest.mark.parametrize(
    "how", [["--source", "tiny_vits:tv_vit"], ["--match"]], ids=["source-model", "checkpoint-only"]
)
def test_convert_torchvision_vit_to_timm_by_structure(how, tiny_vits, capsys):
    from safetensors.torch import load_file

    module, src = tiny_vits
    argv = ["convert", "tv.pth", "-o", "out", "--model", "tiny_vits:timm_vit", *how]
    assert main([*argv, "--input", "1,3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "loaded 32/32 parameter tensors" in out and "saved 32 tensors" in out
    assert "from 'encoder.layers.encoder_layer_0.self_attention.in_proj_weight'" in out
    model = module.timm_vit().eval()
    model.load_state_dict(load_file("out/model.safetensors"))  # plain torch reads the output
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # oracle: the source model's forward pass on the same input
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=1e-6)


def test_convert_writes_nothing_unless_the_gaps_are_named(tiny_vits, capsys):
    from safetensors.torch import load_file

    argv = ["convert", "tv.pth", "-o", "out", "--model", "tiny_vits:timm_vit", "--num-classes"]
    argv += ["5", "--source", "tiny_vits:tv_vit", "--input", "1,3,32,32"]
    assert main(argv) == 1  # a 5-class head: nothing pairs with the source's 10-class one
    out = capsys.readouterr().out
    assert "not ok: 2 model tensors would get no value from the checkpoint" in out
    assert "--drop '^heads\\.head\\.'" in out and "nothing written to 'out'" in out
    assert sorted(set(os.listdir()) - {"__pycache__"}) == ["tiny_vits.py", "tv.pth"]
    assert main([*argv, "--allow-missing", "head.*"]) == 1  # the source head still lands nowhere
    assert not Path("out").exists()
    assert main([*argv, "--allow-missing", "head.*", "--drop", r"^heads\."]) == 0
    full_argv = ["convert", "tv.pth", "-o", "full", "--model", "tiny_vits:timm_vit", *argv[8:]]
    assert main(full_argv) == 0  # 10 classes: everything pairs
    new, full = load_file("out/model.safetensors"), load_file("full/model.safetensors")
    assert new.keys() == full.keys()
    for k in new:  # oracle: the complete conversion; the new head keeps timm's init
        assert torch.equal(new[k], full[k]) != k.startswith("head."), k
    assert new["head.weight"].shape == (5, 32)


def test_convert_by_names_with_remap_skip_and_shards(tmp_path, r18_imagenet, capsys):
    path = tmp_path / "bb.pth"
    torch.save({"backbone." + k: v for k, v in r18_imagenet.items()}, path)
    out = tmp_path / "out"
    argv = ["convert", str(path), "-o", str(out), "--model", "torchvision:resnet18"]
    argv += ["--num-classes", "10", "--no-prefix", "--remap", r"^backbone\.="]
    assert main(argv) == 1 and not out.exists()  # fc mismatched
    assert "fc.weight" in capsys.readouterr().out
    assert main([*argv, "--skip", "fc.*", "--max-shard-size", "20MB", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ok"] and info["report"]["skipped"] == ["fc.weight", "fc.bias"]
    files = info["saved"]["files"]
    assert len(files) == 4 and files[-1] == "model.safetensors.index.json"
    loaded = surgery_read(out)
    for k, v in r18_imagenet.items():  # oracle: the checkpoint's own tensors
        if not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k
    assert loaded["fc.weight"].shape == (10, 512)


def surgery_read(folder: Path) -> dict[str, torch.Tensor]:
    from surgery import read_checkpoint

    return read_checkpoint(folder)


MIXTRAL = """
import transformers

def mixtral():
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg)
"""


def test_convert_layout_checkpoint_writes_what_save_pretrained_writes(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import surgery

    (tmp_path / "tiny_mixtral.py").write_text(MIXTRAL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import tiny_mixtral

    try:
        torch.manual_seed(0)
        model = tiny_mixtral.mixtral()
        surgery.save(model, "model_layout")
        argv = ["convert", "model_layout", "-o", "hub", "--model", "tiny_mixtral:mixtral"]
        assert main([*argv, "--layout", "checkpoint"]) == 0
        model.save_pretrained("theirs")  # oracle: transformers' own writer
        ours, theirs = surgery_read(Path("hub")), surgery_read(Path("theirs"))
        assert (
            ours.keys() == theirs.keys()
            and "model.layers.0.block_sparse_moe.experts.3.w1.weight" in ours
        )
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), k
    finally:
        sys.modules.pop("tiny_mixtral", None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--input", "1,3,32,32"], "--input is the example input for --match"),
        (["--drop", "("], "--drop '(' is not a valid regex"),
        (["--allow-missing", "nope.*"], "--allow-missing"),
        (["--max-shard-size", "lots"], "max_shard_size must be"),
    ],
)
def test_convert_bad_options_exit_2_and_write_nothing(extra, message, tiny_vits, capsys):
    argv = ["convert", "tv.pth", "-o", "out", "--model", "tiny_vits:tv_vit", "--num-classes", "3"]
    if "--max-shard-size" in extra:
        argv = argv[:-2]  # a load that is ok, so the bad size is what stops it
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not Path("out").exists()


@pytest.mark.distributed
def test_output_piped_into_head_ends_without_a_traceback(tmp_path):
    # `surgery inspect big.safetensors --json | head -c 100`: head leaves while surgery
    # still writes (far more than a pipe holds); that is no error worth a traceback.
    from safetensors.torch import save_file

    save_file(
        {f"layer.{i}.weight": torch.zeros(1) for i in range(4000)}, tmp_path / "big.safetensors"
    )
    done = subprocess.run(
        f"{shlex.quote(sys.executable)} -m surgery inspect big.safetensors --json | head -c 100",
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert len(done.stdout) == 100, done.stdout
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
