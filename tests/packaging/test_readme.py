"""Every ```python block of README.md runs, so the README stays honest.

Convention: each block runs on its own (fresh globals) in a temporary folder that holds the
files the examples name, written with random weights (see ``FILES``). A block that needs
anything else (the network, a file only a user has, optional libraries, an elided ``...``) is
marked by an HTML comment on the line right before its fence, with the reason:

    <!-- skip-test: needs runs/last.pth, a training checkpoint -->
    ```python
    ...

The comment does not show on GitHub or PyPI. Only fences that open a line count; other
languages (```bash, plain ```) are not run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision

README = Path(__file__).resolve().parents[2] / "README.md"
SKIP = re.compile(r"^<!--\s*skip-test:\s*(\S.*?)\s*-->$")


def _r18_ddp(path: Path) -> None:
    """resnet18 (1000 classes) saved as a DDP training script does."""
    sd = torchvision.models.resnet18().state_dict()
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)


def _r18(path: Path) -> None:
    torch.save(torchvision.models.resnet18().state_dict(), path)


# The files README examples name, as a user would have them.
FILES: dict[str, Callable[[Path], None]] = {
    "resnet18_imagenet.pth": _r18_ddp,
    "resnet18.pth": _r18,
}


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of every ```python block."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise AssertionError(f"README.md:{i + 1}: ```python block never closed")
            m = SKIP.match(lines[i - 1].strip()) if i else None
            out.append((start, "\n".join(lines[start:j]) + "\n", m.group(1) if m else None))
            i = j
        i += 1
    return out


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_blocks_found_and_some_run():
    assert len(BLOCKS) >= 5
    runnable = [code for _, code, why in BLOCKS if why is None]
    # The 30-second tour and plan/apply examples are checked, not only skipped.
    assert any("resnet18_imagenet.pth" in code for code in runnable)
    assert any("plan_load" in code for code in runnable)


def test_python_blocks_parse_and_markers_name_a_reason():
    """Even skipped blocks are valid Python (``...`` elisions included)."""
    for line, code, _ in BLOCKS:
        compile(code, f"README.md:{line}", "exec")
    # A marker not right before a python fence is a typo that silently runs nothing.
    lines = README.read_text(encoding="utf-8").splitlines()
    for k, text in enumerate(lines):
        if text.lstrip().startswith("<!--") and "skip-test" in text:
            assert SKIP.match(text.strip()), f"README.md:{k + 1}: malformed marker {text!r}"
            assert k + 1 < len(lines) and lines[k + 1].strip() == "```python", (
                f"README.md:{k + 1}: skip-test marker is not right before a ```python fence"
            )


@pytest.mark.parametrize(
    "line, code", [(n, c) for n, c, why in BLOCKS if why is None], ids=lambda v: f"line{v}"
)
def test_readme_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, write in FILES.items():
        if name in code:
            write(tmp_path / name)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
