"""The regex rules a :class:`~surgery.Match` prints: a key-for-key rename table compressed into
a few ``(pattern, replacement)`` rules that ``load_partial(remap=...)`` applies exactly."""

from __future__ import annotations

import re

from ..errors import KeyCollisionError
from ..keys.remap import apply_remap

__all__ = ["compress"]


def _repl_escape(text: str) -> str:
    return text.replace("\\", "\\\\")


def _group_ref(n: int, following: str) -> str:
    return f"\\g<{n}>" if following[:1].isdigit() else f"\\{n}"


def _candidate_rules(renames: dict[str, str], order: list[str]) -> list[tuple[str, str, list[str]]]:
    """(pattern, replacement, source keys it is meant for), in source-key order."""
    groups: dict[tuple, list[tuple[tuple[str, ...], tuple[str, ...], str]]] = {}
    for s in order:
        if s not in renames:
            continue
        d = renames[s]
        ss, ds = s.split("."), d.split(".")
        k = 0
        while k < min(len(ss) - 1, len(ds)) and ss[-1 - k] == ds[-1 - k]:
            k += 1
        head_s = ".".join(ss[: len(ss) - k])
        head_d = ".".join(ds[: len(ds) - k])
        ps, pd = re.split(r"(\d+)", head_s), re.split(r"(\d+)", head_d)
        template = ("prefix" if k else "full", tuple(ps[0::2]), tuple(pd[0::2]))
        groups.setdefault(template, []).append((tuple(ps[1::2]), tuple(pd[1::2]), s))
    rules: list[tuple[str, str, list[str], int]] = []
    for (how, lit_s, lit_d), members in groups.items():
        n_s, n_d = len(lit_s) - 1, len(lit_d) - 1
        assign: dict[int, int] = {}  # source slot -> model slot
        for a in range(n_s):
            if len({m[0][a] for m in members}) < 2:
                continue  # one value only: keep it literal
            for b in range(n_d):
                if b not in assign.values() and all(m[0][a] == m[1][b] for m in members):
                    assign[a] = b
                    break
        sub: dict[tuple, list[str]] = {}
        for vs, vd, key in members:
            lits = (
                tuple(v for a, v in enumerate(vs) if a not in assign),
                tuple(v for b, v in enumerate(vd) if b not in assign.values()),
            )
            sub.setdefault(lits, []).append(key)
        for (fixed_s, fixed_d), keys in sub.items():
            it_s, it_d = iter(fixed_s), iter(fixed_d)
            group_of = {}
            pat = "^" + re.escape(lit_s[0])
            for a in range(n_s):
                if a in assign:
                    group_of[assign[a]] = len(group_of) + 1
                    pat += r"(\d+)"
                else:
                    pat += re.escape(next(it_s))
                pat += re.escape(lit_s[a + 1])
            rep = _repl_escape(lit_d[0])
            for b in range(n_d):
                if b in group_of:
                    rep += _group_ref(group_of[b], lit_d[b + 1])
                else:
                    rep += next(it_d)
                rep += _repl_escape(lit_d[b + 1])
            if how == "prefix":
                pat += r"\."
                rep += "." if rep else ""
            else:
                pat += "$"
            rules.append((pat, rep, keys, order.index(keys[0])))
    rules.sort(key=lambda r: r[3])
    return [(p, r, keys) for p, r, keys, _ in rules]


def _simulate(rules: list[tuple[str, str | None]], keys: list[str]) -> dict[str, str | None] | None:
    """What load_partial's remap does to each key; None when two keys collide."""
    try:
        new_to_old, dropped, _ = apply_remap(keys, rules)
    except KeyCollisionError:
        return None
    out: dict[str, str | None] = {old: new for new, old in new_to_old.items()}
    out.update(dict.fromkeys(dropped))
    return out


def compress(
    mapping: dict[str, str | None], source_keys: list[str]
) -> list[tuple[str, str | None]]:
    want = {k: mapping.get(k, k) for k in source_keys}
    drops: list[tuple[str, str | None]] = [
        ("^" + re.escape(k) + "$", None) for k in source_keys if want[k] is None
    ]
    renames = {k: v for k, v in want.items() if v is not None and v != k}
    cands = _candidate_rules(renames, source_keys)
    for _ in range(len(cands) + 1):
        rules = drops + [(p, r) for p, r, _ in cands]
        got = _simulate(rules, source_keys)
        if got == want:
            return rules
        wrong = set(source_keys) if got is None else {k for k in source_keys if got[k] != want[k]}
        # Replace every generalised rule that touched a wrong key by exact ones.
        fixed: list[tuple[str, str, list[str]]] = []
        changed = False
        for p, r, keys in cands:
            rx = re.compile(p)
            hit = any(rx.search(k) for k in wrong) or bool(wrong & set(keys))
            exact = len(keys) == 1 and p == "^" + re.escape(keys[0]) + "$"
            if hit and not exact:
                fixed += [("^" + re.escape(k) + "$", _repl_escape(renames[k]), [k]) for k in keys]
                changed = True
            else:
                fixed.append((p, r, keys))
        cands = fixed
        if not changed:
            break
    # Exact rules that still chain into each other (a rename cycle): tag every key first so
    # no rule can match another rule's output.
    tag = "__src__."
    rules = [("^", tag), *[("^" + re.escape(tag) + p[1:], r) for p, r in drops]]
    rules += [("^" + re.escape(tag + s) + "$", _repl_escape(d)) for s, d in renames.items()]
    rules.append(("^" + re.escape(tag), ""))
    return rules
