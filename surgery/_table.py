"""Tiny text/HTML table rendering shared by every report (load, trainable summary, groups)."""

from __future__ import annotations

import html
from collections.abc import Sequence


def format_count(n: int | float) -> str:
    """Human count: 11689512 -> '11.7M'."""
    n = float(n)
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{int(n)}"


def format_percent(part: float, whole: float) -> str:
    """'23.4', or two decimals below 1 so a small trainable head does not read as '0.0'."""
    if not whole:
        return "-"
    pct = 100.0 * part / whole
    return f"{pct:.2f}" if 0 < pct < 1 else f"{pct:.1f}"


def format_shape(shape: Sequence[int] | None) -> str:
    if shape is None:
        return "-"
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """Left-aligned, space-padded columns."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for k, r in enumerate(cells):
        lines.append(
            indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        )
        if k == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def html_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], caption: str | None = None
) -> str:
    """A plain HTML table (escaped), for Jupyter's ``_repr_html_``."""
    out = ["<table>"]
    if caption:
        out.append(f"<caption style='text-align:left'>{html.escape(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header))
    out.append("</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)
