"""Name patterns under :mod:`surgery._select` (the one selector vocabulary): globs, ``re:``.

A string selector is a glob over dotted qualified names; a name also matches when one of its
parent modules does, so ``"layer4"`` selects ``layer4.0.conv1.weight``. ``"re:..."`` is a regex
(``re.fullmatch``, same parent rule).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable

from .errors import SelectorError

# A name matches a pattern when the whole name, or one of its dotted parents, matches it.
_PARENT_SUFFIX = r"(?:\..*)?"


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a glob (or ``"re:<regex>"``) into a regex that also matches children."""
    if not isinstance(pattern, str):
        raise SelectorError(
            f"name pattern must be a string such as 'fc.*' or 're:...', got {pattern!r} "
            f"({type(pattern).__name__})."
        )
    if pattern.startswith("re:"):
        body = pattern[3:]
        try:
            re.compile(body)
        except re.error as e:
            raise SelectorError(f"invalid regex {body!r} in selector {pattern!r}: {e}") from None
    else:
        # fnmatch.translate gives '(?s:...)\Z'; strip the anchor so children can follow.
        body = fnmatch.translate(pattern)
        body = body.removesuffix(r"\Z")
    return re.compile(f"(?:{body}){_PARENT_SUFFIX}", re.DOTALL)


def closest(word: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The names closest to ``word`` (for 'did you mean' hints)."""
    names = list(dict.fromkeys(names))
    found = difflib.get_close_matches(word, names, n=n, cutoff=0.5)
    if not found:
        # Fall back to names sharing the pattern's first component.
        head = word.split(".", 1)[0].strip("*?[]")
        found = [x for x in names if head and head in x][:n]
        if not found and head:  # 'fcc.*' -> 'backbone.fc': a name ending in a near component
            found = [x for x in names if _similar(head, x.rpartition(".")[2])][:n]
    return found


def _similar(a: str, b: str) -> bool:
    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.6


def parents(name: str) -> list[str]:
    """Dotted parents of a name, outermost first: ``'a.b.c'`` -> ``['a', 'a.b']``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]
