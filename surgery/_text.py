"""Text from files, made safe to print on a terminal.

Key names, entry names and strings inside a checkpoint come from whoever wrote the file. A key
holding ``'\\x1b[31m'`` (an ANSI colour) or an OSC sequence (``'\\x1b]8;;url\\x07'``, a
hyperlink or a window title) would act on the terminal instead of being shown; a right-to-left
override (U+202E) would show a key reversed. ``escape_control`` writes each such character as
a visible escape, the way ``repr`` does, and leaves everything printable (``×``, ``é``, CJK)
as it is.
"""

from __future__ import annotations

from .errors import Advice

__all__ = ["escape_control"]


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape_control(text: str, *, keep: str = "") -> str:
    """``text`` with every non-printable character written as ``\\xNN``/``\\uNNNN``.

    Escapes C0 and C1 control characters (ESC, BEL, CR, DEL, CSI ...), format characters
    (bidirectional overrides, zero-width characters), line and paragraph separators and
    unassigned code points: all that ``str.isprintable()`` rejects except the plain space.
    Characters in ``keep`` (e.g. ``"\\n"`` for multi-line output) are left as they are.

    Example:
        >>> escape_control("layer1.\\x1b[31mweight")
        'layer1.\\\\x1b[31mweight'
        >>> escape_control("a\\nb", keep="\\n") == "a\\nb"
        True
    """
    if text.isprintable():  # the common case, in C
        return text
    if isinstance(text, Advice):  # escape its text, keep its fixes as data
        return text.map_text(lambda part: escape_control(part, keep=keep))
    return "".join(ch if ch.isprintable() or ch in keep else _escape(ch) for ch in text)
