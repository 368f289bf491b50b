"""Every ```python block of README.md and of the docs site (docs/**/*.md) runs, so they stay honest.

Convention: each block runs on its own (fresh globals) in a temporary folder that holds the
files the examples name, written with random weights (see ``FILES``). A block that needs
anything else (the network, a file only a user has, optional libraries, an elided ``...``) is
marked by an HTML comment on the line right before its fence, with the reason:

    <!-- skip-test: needs runs/last.pth, a training checkpoint -->
    ```python
    ...

The comment does not show on GitHub, PyPI or the built site. Only fences that open a line
count (indented ones inside a list too, run dedented); other languages (```bash, ```text,
plain ```) are not run.
"""

from __future__ import annotations

import re
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# The README and every page of the docs site (docs/design notes included).
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
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


def python_blocks(text: str, name: str = "README.md") -> list[tuple[int, str, str | None]]:
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
                raise AssertionError(f"{name}:{i + 1}: ```python block never closed")
            m = SKIP.match(lines[i - 1].strip()) if i else None
            code = textwrap.dedent("\n".join(lines[start:j]) + "\n")
            out.append((start, code, m.group(1) if m else None))
            i = j
        i += 1
    return out


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# (file, line, code, skip reason or None) for every ```python block of every page.
BLOCKS = [
    (_name(path), line, code, why)
    for path in DOCS
    for line, code, why in python_blocks(path.read_text(encoding="utf-8"), _name(path))
]
RUNNABLE = [(f, n, c) for f, n, c, why in BLOCKS if why is None]


def test_blocks_found_and_some_run():
    readme = [c for f, _, c in RUNNABLE if f == "README.md"]
    # The README's 30-second tour is checked, not only skipped.
    assert any("resnet18_imagenet.pth" in code for code in readme)
    assert any("plan_load" in code for code in readme)
    # Every task page shows runnable code, and so do most blocks overall.
    for page in ("getting-started", "loading", "checkpoints", "plan", "freeze", "security"):
        assert any(f == f"docs/{page}.md" for f, _, _ in RUNNABLE), f"docs/{page}.md runs nothing"
    assert len(RUNNABLE) >= 2 * (len(BLOCKS) - len(RUNNABLE))


def test_python_blocks_parse_and_markers_name_a_reason():
    """Even skipped blocks are valid Python (``...`` elisions included)."""
    for name, line, code, _ in BLOCKS:
        compile(code, f"{name}:{line}", "exec")
    # A marker not right before a python fence is a typo that silently runs nothing.
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for k, text in enumerate(lines):
            if text.lstrip().startswith("<!--") and "skip-test" in text:
                where = f"{_name(path)}:{k + 1}"
                assert SKIP.match(text.strip()), f"{where}: malformed marker {text!r}"
                assert k + 1 < len(lines) and lines[k + 1].strip() == "```python", (
                    f"{where}: skip-test marker is not right before a ```python fence"
                )


@pytest.mark.parametrize(
    "name, line, code", [pytest.param(f, n, c, id=f"{f}:{n}") for f, n, c in RUNNABLE]
)
def test_doc_block_runs(name, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp() in an example stays here
    for file, write in FILES.items():
        if file in code:
            write(tmp_path / file)
    exec(compile(code, f"{name}:{line}", "exec"), {"__name__": "__docs__"})
