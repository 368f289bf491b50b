"""The shared table base and the 'first N, and K more' helpers."""

from __future__ import annotations

from dataclasses import dataclass

from surgery._table import _Table, first_n, first_n_lines, html_table


@dataclass(repr=False)
class Pets(_Table):
    names: list[str]

    _header = ("pet", "legs")
    _numeric = (1,)

    def _caption(self) -> str:
        return f"{len(self.names)} pets"

    def _rows(self) -> list[list[object]]:
        return [[n, 4] for n in self.names]

    def _notes(self) -> list[str]:
        return ["note: <all> fed"]


def test_first_n():
    assert first_n([]) == ""
    assert first_n(["a", "b"], 2) == "a, b"
    assert first_n(["a", "b", "c", "d"], 2) == "a, b and 2 more"
    assert first_n(range(12)) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more"
    assert first_n(["x", "y", "z"], 1, sep="+") == "x and 2 more"
    assert first_n_lines(["a", "b"], 2) == ["    a", "    b"]
    assert first_n_lines("abcd", 1, indent="") == ["a", "... and 3 more"]


def test_table_base_renders_text_repr_and_html():
    t = Pets(["cat", "dog"])
    assert str(t).splitlines() == [
        "2 pets",
        "  pet  legs",
        "  ---  ----",
        "  cat  4",
        "  dog  4",
        "note: <all> fed",
    ]
    assert repr(t) == "Pets('2 pets')"
    html = t._repr_html_()
    assert html.startswith("<table>") and html.endswith("<p>note: &lt;all&gt; fed</p>")
    assert "<td>cat</td><td style='text-align:right'>4</td>" in html
    assert ">2 pets</caption>" in html and "<th style=" in html


def test_html_table_escapes_cells_and_caption():
    html = html_table(("k",), [["<b>&"]], caption="a<b")
    assert "<td>&lt;b&gt;&amp;</td>" in html and "a&lt;b</caption>" in html
