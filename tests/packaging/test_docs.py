"""The documentation site: it builds with ``mkdocs build --strict`` (a warning fails), its API
page documents every public name, and the built page renders in a real browser.

The browser check opens the built API page in headless Chromium (``--dump-dom``: the DOM after
the page's scripts ran) and is skipped where no Chromium is on PATH. The code blocks of the
pages run in tests/packaging/test_readme.py.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import render_html

import surgery

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "docs" / "api.md"


def _mkdocs(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    # NO_MKDOCS_2_WARNING: Material's end-of-life banner is not a build warning, only noise.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = _mkdocs("--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(out))
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def _text(fragment: str) -> str:
    """The visible text of an HTML fragment, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", fragment))).strip()


def _signature(page: str, name: str) -> str:
    """The rendered signature block that follows the object's heading anchor."""
    start = page.index(f'id="{name}"')
    block = re.search(r'<div class="doc-signature[^"]*">(.*?)</div>', page[start:], re.S)
    assert block, f"no signature rendered after {name}"
    return _text(block.group(1))


def test_mkdocs_build_strict_builds_every_page(site):
    """The strict build passed (the fixture); every page of the nav and the API page are there."""
    for page in ("index", "getting-started", "loading", "plan", "freeze", "optimizer-state",
                 "sharded", "converting", "security", "cli", "api", "performance"):  # fmt: skip
        assert (site / f"{page}.html").is_file(), page
    assert (site / "design" / "transformers-conversions.html").is_file()
    sig = _signature((site / "api.html").read_text(encoding="utf-8"), "surgery.load_partial")
    assert sig.startswith("load_partial(") and sig.endswith("-> LoadReport")


def test_strict_build_fails_on_a_broken_anchor(tmp_path):
    """The site's link checks are warnings, so --strict turns a broken anchor into a failure."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n## Real\n\n[ok](#real) [broken](#no-such-heading)\n")
    (tmp_path / "mkdocs.yml").write_text(
        f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: docs\nhooks: []\nnav: [index.md]\n"
    )
    done = _mkdocs("--site-dir", str(tmp_path / "site"), cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "'#no-such-heading'" in out and "Aborted with 1 warnings in strict mode" in out


def test_api_page_documents_every_public_name(site):
    """docs/api.md has `::: surgery.NAME` for each name in surgery.__all__, and the built page
    has each one's anchor (the names resolve through the top-level package)."""
    listed = re.findall(r"^::: surgery\.(\w+)$", API.read_text(encoding="utf-8"), re.M)
    assert sorted(listed) == sorted(surgery.__all__)
    page = (site / "api.html").read_text(encoding="utf-8")
    missing = [n for n in surgery.__all__ if f'id="surgery.{n}"' not in page]
    assert not missing, f"not rendered: {missing}"
    # The docstrings' Example: sections render as code, their Sphinx roles as plain names.
    assert ":func:" not in page and ":class:" not in page
    assert ">>> import torchvision, surgery" in _text(page)


@pytest.mark.skipif(render_html.find_browser() is None, reason="needs chromium on PATH")
def test_api_page_renders_in_chromium(site):
    browser = render_html.find_browser()
    page = site / "api.html"
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    dom = done.stdout
    assert "<title>API reference - surgery</title>" in dom
    sig = _signature(dom, "surgery.load_partial")
    assert re.match(r"load_partial\( model: \w+, ckpt: \w+, \*, ", sig), sig
    for param in ("strict", "entry", "remap", "prefix", "skip", "on_mismatch", "device"):
        assert f" {param}: " in sig, (param, sig)
    assert sig.endswith(") -> LoadReport")
    # The theme's scripts ran offline: they add a copy button to every code block.
    assert 'data-md-type="copy"' in dom and 'data-md-type="copy"' not in page.read_text()


def test_readme_links_into_the_docs_resolve(site):
    """README.md links pages of docs/ (read on GitHub or in a clone): each page exists and
    each #anchor is a heading of the built page."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#\s]*)(?:#([^)\s]+))?\)", readme)
    assert len(links) >= 10
    for target, anchor in links:
        assert (ROOT / target).exists(), target
        if anchor:
            built = site / Path(target).relative_to("docs").with_suffix(".html")
            assert f'id="{anchor}"' in built.read_text(encoding="utf-8"), (target, anchor)
