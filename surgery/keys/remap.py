"""Checkpoint-key renaming by the user's ``remap``: a dict, ``(regex, replacement)`` rules or a
callable, applied in time linear in the number of keys. Rules are compiled and checked once
(:func:`compile_rules`), so loading, ``restore_optimizer`` and ``match`` hints read them alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import Advice, Fix, KeyCollisionError, UsageError

Remap = Mapping[str, str] | Sequence[tuple[str, str | None]] | Callable[[str], str | None]

_EXAMPLE = Advice(Fix("remap", [("^backbone\\.", "")], shown="remap=[(r'^backbone\\.', '')]"))


@dataclass(frozen=True)
class Rule:
    """A ``(regex, replacement)`` rule, compiled and checked once: it applies where its regex
    is found (``re.search``); ``replacement`` ``None`` drops the name."""

    pattern: str
    regex: re.Pattern[str]
    replacement: str | None


def compile_rules(
    rules: Iterable[object],
    *,
    label: str = "remap rule",
    pair_label: str = "remap rule",
    example: str = _EXAMPLE,
) -> list[Rule]:
    """``rules`` as :class:`Rule` objects; a ``UsageError`` naming the first one that is no
    ``(regex, replacement)`` pair (``pair_label``, with ``example``) or no valid regex."""
    pairs = list(rules)
    for rule in pairs:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise UsageError(
                Advice(f"{pair_label} {rule!r} is not a (regex, replacement) pair; pass e.g. ")
                + example
            )
    out: list[Rule] = []
    for pattern, repl in pairs:  # type: ignore[misc]
        try:
            out.append(Rule(pattern, re.compile(pattern), repl))
        except (re.error, TypeError) as e:
            raise UsageError(f"{label} {pattern!r} is not a valid regex: {e}") from None
    return out


def apply_remap(
    keys: Iterable[str], remap: Remap | None
) -> tuple[dict[str, str], list[str], list[str]]:
    """Rename checkpoint keys.

    Returns ``(new -> old, dropped old keys, notes)``. A dict maps exact names; dict entries
    that name no checkpoint key are used as regex rules (so ``{"^backbone\\.": ""}`` works).
    A list holds ``(regex, replacement)`` rules applied in order (``None`` drops the key);
    a callable returns the new name or ``None`` to drop it.
    """
    keys = list(keys)
    if remap is None:
        return {k: k for k in keys}, [], []
    used: set[str] = set()
    if callable(remap) and not isinstance(remap, Mapping):
        rename, unused = remap, None
    else:
        exact, rules = _exact_and_rules(remap, keys)
        rename = _renamer(exact, rules, used)
        unused = [r.pattern for r in rules] + list(exact)
    new_to_old: dict[str, str] = {}
    dropped: list[str] = []
    for k in keys:
        try:
            new = rename(k)
        except Exception as e:  # a user callable or replacement string failing
            raise UsageError(
                f"remap failed on checkpoint key '{k}': {type(e).__name__}: {e}"
            ) from e
        if new is None:
            dropped.append(k)
            continue
        if not isinstance(new, str):
            raise UsageError(f"remap returned {new!r} for '{k}'; it must return a str or None")
        if new in new_to_old:
            raise collision(new_to_old[new], k, new, "remap")
        new_to_old[new] = k
    notes = [f"remap rule {p!r} matched no checkpoint key" for p in unused or () if p not in used]
    return new_to_old, dropped, notes


def _exact_and_rules(remap: object, keys: list[str]) -> tuple[dict[str, str], list[Rule]]:
    """A dict's exact renames (entries naming a checkpoint key) and every rule, compiled."""
    if isinstance(remap, Mapping):
        present = set(keys)
        exact = {k: v for k, v in remap.items() if k in present}
        return exact, compile_rules((k, v) for k, v in remap.items() if k not in present)
    if isinstance(remap, Sequence) and not isinstance(remap, str):
        return {}, compile_rules(remap)
    raise UsageError(
        f"remap must be a dict, a list of (regex, replacement) pairs or a callable, "
        f"not {type(remap).__name__}"
    )


def _renamer(
    exact: Mapping[str, str], rules: list[Rule], used: set[str]
) -> Callable[[str], str | None]:
    """Exact renames first, else every rule in order; ``used`` collects what applied."""

    def rename(k: str) -> str | None:
        if k in exact:
            used.add(k)
            return exact[k]
        out: str | None = k
        for rule in rules:
            if rule.regex.search(out):
                used.add(rule.pattern)
                if rule.replacement is None:
                    return None
                out = rule.regex.sub(rule.replacement, out)
        return out

    return rename


def collision(a: str, b: str, new: str, how: str) -> KeyCollisionError:
    drop = "^" + re.escape(b) + "$"
    return KeyCollisionError(
        Advice(
            f"checkpoint keys '{a}' and '{b}' both map to model key '{new}' after {how}. "
            "Only one can load: drop one with remap (e.g. ",
            Fix("remap", [(drop, None)], shown=f"remap=[(r'{drop}', None)]"),
            ")",
            *((" or pass ", Fix("prefix", None)) if how == "prefix rewrite" else ()),
        )
    )
