"""Notebook HTML: status cells coloured, the loaded fraction as a bar, an ok / not-ok line.

The string checks run everywhere; ``test_rendered_in_chromium`` renders the reports in
headless Chromium (tests/render_html.py) and checks the screenshot's pixels, where Chromium
is on PATH.
"""

from __future__ import annotations

import html as htmllib

import pytest
import render_html
import torchvision

import surgery
from surgery._table import STATUS_COLOURS, html_bar, html_table, html_verdict


def _hex(rgb: str) -> tuple[int, int, int]:
    return tuple(int(rgb[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def test_status_column_colours_known_words_only():
    out = html_table(("status", "key"), [["missing", "a<b"], ["odd", "c"]], status_column=0)
    bg, fg = STATUS_COLOURS["missing"]
    assert f"<td style='background:{bg};color:{fg};padding:0 6px'>missing</td>" in out
    assert "<td>a&lt;b</td>" in out and "<td>odd</td>" in out  # unknown status: plain cell
    assert out.startswith("<table>") and "<script" not in out


def test_bar_and_verdict():
    assert "width:100.0%" in html_bar(5, 4, "x") and "width:0.0%" in html_bar(1, 0, "x")
    assert "ok</div>" in html_verdict(True) and "not ok" not in html_verdict(True)
    bad = html_verdict(False, "fc.weight <mismatched>")
    assert "not ok" in bad and "fc.weight &lt;mismatched&gt;" in bad


def test_head_swap_html_says_why_not_ok_next_to_the_table(r18_path):
    report = surgery.load_partial(torchvision.models.resnet18(num_classes=10), r18_path)
    out = report._repr_html_()
    assert not report.ok
    assert htmllib.escape(report.why_not_ok()) in out and "not ok" in out
    assert f"background:{STATUS_COLOURS['mismatched'][0]}" in out
    # the bar's label never rounds a partial load up to 100%
    assert "99.9% of parameters loaded" in out or "99.8% of parameters loaded" in out
    ok = surgery.load_partial(
        torchvision.models.resnet18(num_classes=10), r18_path, skip="fc.*"
    )._repr_html_()
    assert "&#10003; ok" in ok and "not ok" not in ok


@pytest.mark.skipif(render_html.find_browser() is None, reason="needs chromium on PATH")
def test_rendered_in_chromium(tmp_path):
    from PIL import Image

    assert render_html.main([str(tmp_path)]) == 0
    page = (tmp_path / "reports.html").read_text()
    assert "not ok" in page and "<script" not in page
    img = Image.open(tmp_path / "reports.png").convert("RGB")
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}

    def near(rgb: tuple[int, int, int]) -> bool:
        return any(sum(abs(a - b) for a, b in zip(c, rgb, strict=True)) <= 6 for c in colours)

    # The browser painted the styles: red 'mismatched' cells, grey 'skipped', the blue bar.
    assert near(_hex(STATUS_COLOURS["mismatched"][0])), "no mismatched-red cell in the screenshot"
    assert near(_hex(STATUS_COLOURS["skipped"][0])), "no skipped-grey cell in the screenshot"
    assert near(_hex("#3a7bd5")), "no loaded-fraction bar in the screenshot"
