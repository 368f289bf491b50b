"""Render surgery's notebook HTML in a real browser, to look at it as a person would.

Writes ``OUT/reports.html`` (the ``_repr_html_`` of a clean head swap's LoadReport, an ok
LoadReport, a trainable summary and a parameter-group table; or, with ``--notebook``, every
HTML output of an executed notebook) and, when Chromium is on PATH, ``OUT/reports.png``, a
headless screenshot. Open the PNG (or the HTML) and check the tables read well.

    PYTHONPATH=$PWD python tests/render_html.py /tmp/render
    PYTHONPATH=$PWD python tests/render_html.py /tmp/render --notebook executed.ipynb

Exit status 0; the paths written are printed, one a line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """The first headless-capable Chromium on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def report_fragments() -> list[tuple[str, str]]:
    """(title, HTML) for the reports a notebook shows, built from a tiny random ResNet-18."""
    import torch
    import torchvision

    import surgery

    torch.manual_seed(0)
    pretrained = torchvision.models.resnet18(num_classes=1000).state_dict()
    model = torchvision.models.resnet18(num_classes=4)
    swap = surgery.load_partial(model, {"module." + k: v for k, v in pretrained.items()})
    clean = surgery.load_partial(model, pretrained, skip="fc.*")
    trainable = surgery.freeze_except(model, "layer4", "fc")
    groups = surgery.describe_groups(surgery.param_groups(model, lr=1e-3, weight_decay=0.01))
    return [
        ("head swap (ok=False, with the reason)", swap._repr_html_()),
        ("head swap with skip='fc.*' (ok)", clean._repr_html_()),
        ("freeze summary", trainable._repr_html_()),
        ("parameter groups", groups._repr_html_()),
    ]


def notebook_fragments(path: Path) -> list[tuple[str, str]]:
    """(cell, HTML) for every HTML output of an executed notebook."""
    nb = json.loads(path.read_text())
    out = []
    for i, cell in enumerate(nb.get("cells", [])):
        for o in cell.get("outputs", []):
            html = o.get("data", {}).get("text/html")
            if html:
                out.append((f"cell {i}", "".join(html) if isinstance(html, list) else html))
    return out


def page(fragments: list[tuple[str, str]]) -> str:
    """A plain page laid out like a notebook's output area (no script)."""
    body = "".join(
        f"<h3 style='font:600 13px sans-serif;color:#555;margin:18px 0 4px'>{title}</h3>"
        f"<div style='font:13px sans-serif'>{html}</div>"
        for title, html in fragments
    )
    return f"<!doctype html><html><head><meta charset='utf-8'></head><body>{body}</body></html>"


def screenshot(browser: str, html: Path, png: Path, size: str = "1000,1400") -> None:
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={png}",
            f"--window-size={size}",
            html.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for reports.html and reports.png")
    parser.add_argument("--notebook", type=Path, help="an executed .ipynb to render instead")
    parser.add_argument("--window-size", default="1000,1400", help="WIDTH,HEIGHT in pixels")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    fragments = notebook_fragments(args.notebook) if args.notebook else report_fragments()
    html = args.out / "reports.html"
    html.write_text(page(fragments), encoding="utf-8")
    print(html)
    browser = find_browser()
    if browser is None:
        print("no chromium on PATH: open the HTML yourself", file=sys.stderr)
        return 0
    png = args.out / "reports.png"
    screenshot(browser, html, png, args.window_size)
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
