"""Tiny text/HTML table rendering shared by every report (load, trainable summary, groups).

Names in the text forms come from files: every cell, list item, caption line and note is
printed with control characters escaped (``escape_control``), so a key holding a newline
cannot add a line of its own to a report.
"""

from __future__ import annotations

import html
from collections.abc import Collection, Iterable, Sequence

from ._text import escape_control

LIST_LIMIT = 10  # how many names a message or a table lists before 'and K more'


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
    """Left-aligned, space-padded columns; control characters in cells escaped."""
    cells = [[escape_control(str(c)) for c in header]]
    cells += [[escape_control(str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for k, r in enumerate(cells):
        lines.append(
            indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        )
        if k == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_TH_STYLE = "text-align:left;padding:2px 10px;border-bottom:1px solid #999"
_NUM_STYLE = "text-align:right"

# Status cell colours: (background, text). Both are set, so a status reads on light and dark
# notebook themes alike; the status word itself stays in the cell, so plain HTML says it too.
_BAD = ("#fde2e1", "#8a1c1c")  # the load is not ok because of these
_CHANGED = ("#fff3cd", "#7a5200")  # loaded, but not as stored (adapted, cast, initialised)
_DONE = ("#dcf5e3", "#1f6b35")  # loaded or restored as asked
_ASIDE = ("#ececec", "#444444")  # left out on purpose
STATUS_COLOURS: dict[str, tuple[str, str]] = {
    "mismatched": _BAD,
    "missing": _BAD,
    "unexpected": _BAD,
    "dropped": _BAD,
    "adapted": _CHANGED,
    "cast": _CHANGED,
    "initialised": _CHANGED,
    "fresh": _CHANGED,
    "frozen": _CHANGED,
    "loaded": _DONE,
    "restored": _DONE,
    "renamed": _DONE,
    "prefix": _DONE,
    "skipped": _ASIDE,
    "defaulted": _ASIDE,
    "adapter": _ASIDE,
}


def _status_style(status: object) -> str:
    colours = STATUS_COLOURS.get(str(status))
    if colours is None:
        return ""
    return f" style='background:{colours[0]};color:{colours[1]};padding:0 6px'"


def html_table(
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    caption: str | None = None,
    numeric: Collection[int] = (),
    status_column: int | None = None,
) -> str:
    """A plain HTML table (escaped), for Jupyter's ``_repr_html_``; ``numeric`` columns (by
    index) are right-aligned. ``status_column`` (an index) colours that column's cells by
    their word (:data:`STATUS_COLOURS`: red what makes a load not ok, amber what changed,
    green what loaded, grey what was left out on purpose). Inline CSS only, no script: other
    cells stay bare ``<td>``s so the markup reads plainly."""
    out = ["<table>"]
    if caption:
        out.append(
            "<caption style='text-align:left;font-weight:bold;white-space:nowrap'>"
            f"{html.escape(caption)}</caption>"
        )
    out.append(
        "<thead><tr>"
        + "".join(f"<th style='{_TH_STYLE}'>{html.escape(str(h))}</th>" for h in header)
        + "</tr></thead><tbody>"
    )
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            if i == status_column:
                style = _status_style(c)
            elif i in numeric:
                style = f" style='{_NUM_STYLE}'"
            else:
                style = ""
            cells.append(f"<td{style}>{html.escape(str(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def html_bar(part: float, whole: float, label: str) -> str:
    """A small inline bar filled ``part / whole``, then ``label`` (the text says it all; the
    bar only shows it). Inline CSS, no script.

    Example:
        >>> bar = html_bar(1, 4, "1 of 4 loaded")
        >>> "width:25.0%" in bar, bar.endswith("</span></span> 1 of 4 loaded</div>")
        (True, True)
    """
    frac = min(max(part / whole, 0.0), 1.0) if whole else 0.0
    return (
        "<div style='margin:2px 0'>"
        "<span style='display:inline-block;width:120px;height:0.7em;background:#e3e3e3;"
        "border:1px solid #bbb;vertical-align:middle'>"
        f"<span style='display:block;height:100%;width:{100 * frac:.1f}%;background:#3a7bd5'>"
        f"</span></span> {html.escape(label)}</div>"
    )


def html_verdict(ok: bool, why: str = "") -> str:
    """One line: a green ``ok`` or a red ``not ok`` followed by ``why``."""
    if ok:
        return "<div style='color:#1f6b35;font-weight:bold'>&#10003; ok</div>"
    reason = f": <span style='font-weight:normal'>{html.escape(why)}</span>" if why else ""
    return f"<div style='color:#b42318;font-weight:bold'>&#10007; not ok{reason}</div>"


# --------------------------------------------------------------------------- lists


def first_n(items: Iterable[object], n: int = LIST_LIMIT, sep: str = ", ") -> str:
    """The first ``n`` items joined, then how many were left out: ``'a, b, c and 4 more'``.

    Example:
        >>> first_n(["conv1", "bn1", "layer1", "layer2"], 2)
        'conv1, bn1 and 2 more'
    """
    items = [escape_control(str(x)) for x in items]
    shown = sep.join(items[:n])
    return f"{shown} and {len(items) - n} more" if len(items) > n else shown


def first_n_lines(items: Iterable[object], n: int = LIST_LIMIT, indent: str = "    ") -> list[str]:
    """One indented line per item for the first ``n``, then ``'... and K more'`` if any left.

    Example:
        >>> first_n_lines(["a", "b", "c"], 2, indent="  ")
        ['  a', '  b', '  ... and 1 more']
    """
    items = [escape_control(str(x)) for x in items]
    lines = [indent + x for x in items[:n]]
    if len(items) > n:
        lines.append(f"{indent}... and {len(items) - n} more")
    return lines


def status_rows(
    status: str, items: Sequence[tuple[str, str]], limit: int | None = None
) -> list[tuple[str, str, str]]:
    """``(status, key, detail)`` table rows for the first ``limit`` items (all for ``None``),
    then a ``'... K more'`` row if any were left out: the row form of :func:`first_n`.

    Example:
        >>> status_rows("missing", [("a", "x"), ("b", "y")], 1)
        [('missing', 'a', 'x'), ('missing', '... 1 more', '')]
    """
    shown = items if limit is None else items[:limit]
    rows = [(status, k, d) for k, d in shown]
    if len(shown) < len(items):
        rows.append((status, f"... {len(items) - len(shown)} more", ""))
    return rows


# --------------------------------------------------------------------------- base


class _Table:
    """Shared rendering of a result that reads as a caption, a table and note lines.

    A subclass sets ``_header`` (column names) and ``_numeric`` (right-aligned columns in HTML)
    and defines ``_caption()`` and ``_rows()``; ``_notes()`` (plain lines after the table) is
    optional; ``_status_column`` (an index) colours that column's cells by status.
    ``_text_rows = False`` leaves the table out of ``str()`` (caption and notes only)
    while the notebook view keeps it; a table without rows is left out of ``str()``. The
    notebook view may differ through ``_html_caption()``, ``_html_rows()`` (e.g. more rows)
    and ``_html_notes()``, which default to the text ones. ``_indent`` starts each text table
    line. Dataclass subclasses need ``@dataclass(repr=False)`` so they keep this ``__repr__``
    (or define their own).
    """

    _header: tuple[str, ...] = ()
    _numeric: tuple[int, ...] = ()
    _status_column: int | None = None
    _text_rows: bool = True
    _indent: str = "  "

    def _caption(self) -> str:
        raise NotImplementedError

    def _caption_lines(self) -> list[str]:
        """The caption as text lines (a subclass may add a summary line under it)."""
        return [self._caption()]

    def _rows(self) -> Sequence[Sequence[object]]:
        raise NotImplementedError

    def _notes(self) -> list[str]:
        return []

    def _html_caption(self) -> str:
        return self._caption()

    def _html_rows(self) -> Sequence[Sequence[object]]:
        return self._rows()

    def _html_notes(self) -> list[str]:
        return self._notes()

    def __str__(self) -> str:
        lines = [escape_control(line) for line in self._caption_lines()]
        rows = self._rows() if self._text_rows else ()
        if rows:
            lines.append(text_table(self._header, rows, indent=self._indent))
        return "\n".join(lines + [escape_control(line) for line in self._notes()])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._caption()!r})"

    def _repr_html_(self) -> str:
        table = html_table(
            self._header,
            self._html_rows(),
            self._html_caption(),
            self._numeric,
            self._status_column,
        )
        return table + "".join(f"<p>{html.escape(line)}</p>" for line in self._html_notes())


class _StatusTable(_Table):
    """A report listing keys by status: ``(status, key, detail)`` rows from
    ``_status_rows(limit)``, at most ``_text_limit`` per status in ``str()`` and
    ``_html_limit`` in the notebook (``None``: all), then the ``notes`` attribute."""

    notes: list[str]
    _text_limit: int | None = LIST_LIMIT
    _html_limit: int | None = None
    _status_column: int | None = 0

    def _status_rows(self, limit: int | None) -> list[tuple[str, str, str]]:
        raise NotImplementedError

    def _rows(self) -> list[tuple[str, str, str]]:
        return self._status_rows(self._text_limit)

    def _html_rows(self) -> list[tuple[str, str, str]]:
        return self._status_rows(self._html_limit)

    def _notes(self) -> list[str]:
        return [f"  note: {n}" for n in self.notes]

    def _html_notes(self) -> list[str]:
        return [f"note: {n}" for n in self.notes]
