"""Checkpoint-key renaming by the user's ``remap``: a dict, ``(regex, replacement)`` rules or a
callable, applied in time linear in the number of keys. Rules are compiled and checked once
(:func:`compile_rules`), so loading, ``restore_optimizer`` and ``match`` hints read them alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from ..errors import Advice, Fix, KeyCollisionError, UsageError

Remap = Mapping[str, str] | Sequence[tuple[str, str | None]] | Callable[[str], str | None]


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
    notes: list[str] = []
    if remap is None:
        return {k: k for k in keys}, [], notes
    if callable(remap) and not isinstance(remap, Mapping):
        rename = remap
    else:
        exact: dict[str, str] = {}
        rules: list[tuple[str, str | None]]
        if isinstance(remap, Mapping):
            present = set(keys)
            exact = {k: v for k, v in remap.items() if k in present}
            rules = [(k, v) for k, v in remap.items() if k not in present]
        elif isinstance(remap, Sequence) and not isinstance(remap, str):
            rules = []
            for rule in remap:
                if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
                    raise UsageError(
                        Advice(
                            f"remap rule {rule!r} is not a (regex, replacement) pair; pass e.g. ",
                            Fix(
                                "remap",
                                [("^backbone\\.", "")],
                                shown="remap=[(r'^backbone\\.', '')]",
                            ),
                        )
                    )
                rules.append((rule[0], rule[1]))
        else:
            raise UsageError(
                f"remap must be a dict, a list of (regex, replacement) pairs or a callable, "
                f"not {type(remap).__name__}"
            )
        compiled = []
        for pattern, repl in rules:
            try:
                compiled.append((pattern, re.compile(pattern), repl))
            except (re.error, TypeError) as e:
                raise UsageError(f"remap rule {pattern!r} is not a valid regex: {e}") from None
        used: set[str] = set()

        def rename(k: str) -> str | None:
            if k in exact:
                used.add(k)
                return exact[k]
            out: str | None = k
            for pattern, rx, repl in compiled:
                if rx.search(out):
                    used.add(pattern)
                    if repl is None:
                        return None
                    out = rx.sub(repl, out)
            return out

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
    if not callable(remap) or isinstance(remap, Mapping):
        unused = [p for p, _ in rules if p not in used] + [k for k in exact if k not in used]
        for p in unused:
            notes.append(f"remap rule {p!r} matched no checkpoint key")
    return new_to_old, dropped, notes


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
