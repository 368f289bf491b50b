"""Aligning two entry sequences (edit distance over layer signatures; hints anchor it), pairing
the tensors inside aligned layers, and fused layouts (q/k/v stacked in one tensor)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from .._names import closest
from ..errors import UsageError
from ..keys.remap import compile_rules
from .result import Layout
from .trace import Entry

__all__ = ["Hints", "align", "find_layouts", "hint_pairs", "leaf", "pair_entries"]

Hints = Mapping[str, str] | Sequence[tuple[str, str]]

# Alignment costs, in hundredths; structure decides, names only break ties.
_GAP = 100
_FAMILY = 30  # same shapes, different kind of layer (MultiheadAttention ~ Linear)
_FORBID = 10**6  # contradicts a hint
_ANCHOR = -(10**4)  # agrees with a hint
_NAME_SCALE = 10**4  # structural cost * scale + name cost (<= 10 per step)


def _tokens(name: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z]+|\d+", name.lower()))


def _struct_cost(a: Entry, b: Entry) -> int:
    sa, sb = a.signature(), b.signature()
    fam = 0 if (a.family is None or b.family is None or a.family == b.family) else _FAMILY
    if sa[1] == sb[1]:
        return fam
    ca, cb = Counter(sa[1]), Counter(sb[1])
    overlap = sum((ca & cb).values()) / max(len(sa[1]), len(sb[1]))
    return 100 + round(100 * (1 - overlap)) + fam


def align(
    src: list[Entry], dst: list[Entry], anchors: set[tuple[int, int]]
) -> list[tuple[int | None, int | None]]:
    """Global alignment (edit distance) of the two entry sequences; cheapest path."""
    n, m = len(src), len(dst)
    anchored_a = {a for a, _ in anchors}
    anchored_b = {b for _, b in anchors}
    tok_a = [_tokens(e.name) for e in src]
    tok_b = [_tokens(e.name) for e in dst]
    sig_a = [e.signature() for e in src]
    sig_b = [e.signature() for e in dst]
    cache: dict[tuple, int] = {}
    gap = _GAP * _NAME_SCALE + 5
    prev = [j * gap for j in range(m + 1)]
    back = [bytes(m + 1)]
    for i in range(1, n + 1):
        cur = [i * gap] + [0] * m
        row = bytearray(m + 1)
        row[0] = 1
        a = i - 1
        for j in range(1, m + 1):
            b = j - 1
            key = (sig_a[a], sig_b[b])
            s = cache.get(key)
            if s is None:
                s = cache[key] = _struct_cost(src[a], dst[b])
            if (a, b) in anchors:
                s = _ANCHOR
            elif a in anchored_a or b in anchored_b:
                s = _FORBID
            if src[a].name == dst[b].name:
                nc = 0
            else:
                ta, tb = tok_a[a], tok_b[b]
                union = len(ta | tb)
                nc = 1 + round(9 * (1 - len(ta & tb) / union)) if union else 10
            best, how = prev[j - 1] + s * _NAME_SCALE + nc, 0
            up = prev[j] + gap
            if up < best:
                best, how = up, 1
            left = cur[j - 1] + gap
            if left < best:
                best, how = left, 2
            cur[j] = best
            row[j] = how
        back.append(bytes(row))
        prev = cur
    path: list[tuple[int | None, int | None]] = []
    i, j = n, m
    while i > 0 or j > 0:
        how = back[i][j] if i > 0 and j > 0 else (1 if i > 0 else 2)
        if how == 0:
            path.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif how == 1:
            path.append((i - 1, None))
            i -= 1
        else:
            path.append((None, j - 1))
            j -= 1
    path.reverse()
    return path


# --------------------------------------------------------------------------- pairing


def leaf(key: str) -> str:
    return key.rpartition(".")[2]


def pair_entries(a: Entry, b: Entry) -> list[tuple[str, str, float, str]]:
    """Pair the tensors of two aligned entries by shape, then by name, then by order."""
    same_sig = a.signature()[1] == b.signature()[1]
    same_family = a.family is None or b.family is None or a.family == b.family
    by_shape_a: dict[tuple, list[str]] = defaultdict(list)
    by_shape_b: dict[tuple, list[str]] = defaultdict(list)
    for k in a.keys:
        by_shape_a[a.shapes[k]].append(k)
    for k in b.keys:
        by_shape_b[b.shapes[k]].append(k)
    if same_sig and same_family:
        base, reason = 1.0, "aligned module"
    elif same_sig:
        base, reason = 0.8, f"aligned module ({a.kind} ~ {b.kind})"
    else:
        base, reason = 0.6, "aligned module, other tensors differ"
    out = []
    for shape, ka in by_shape_a.items():
        kb = list(by_shape_b.get(shape, []))
        if not kb:
            continue
        rest_a = []
        for k in ka:  # same leaf name first (weight~weight, running_mean~running_mean)
            twin = next((x for x in kb if leaf(x) == leaf(k)), None)
            if twin is not None and len(ka) > 1:
                kb.remove(twin)
                out.append((k, twin, base, reason))
            else:
                rest_a.append(k)
        unique = len(ka) == 1
        for k, twin in zip(rest_a, kb, strict=False):
            conf = base if unique else min(base, 0.7)
            why = reason if unique else reason + ", repeated shape paired by order"
            out.append((k, twin, conf, why))
    return out


def hint_pairs(
    hints: Hints | None,
    src_entries: list[Entry],
    dst_entries: list[Entry],
) -> list[tuple[str, str]]:
    """(source key, model key) pairs from hints: tensor keys, module names or regex rules
    (read as ``remap`` rules are: :func:`surgery.keys.remap.compile_rules`)."""
    if not hints:
        return []
    src_keys = {k: e for e in src_entries for k in e.keys}
    dst_keys = {k: e for e in dst_entries for k in e.keys}
    if isinstance(hints, Mapping):
        src_mods = {e.name: e for e in src_entries}
        dst_mods = {e.name: e for e in dst_entries}
        return _named_hints(hints, src_keys, dst_keys, src_mods, dst_mods)
    if isinstance(hints, Sequence) and not isinstance(hints, str):
        example = "hints=[(r'^features\\.', 'backbone.')] or a dict of key pairs"
        rules = compile_rules(hints, label="hint rule", pair_label="hint", example=example)
        out: list[tuple[str, str]] = []
        for rule in rules:
            hits = (
                [(k, rule.regex.sub(rule.replacement, k)) for k in src_keys if rule.regex.search(k)]
                if rule.replacement is not None
                else []
            )
            hits = [(k, d) for k, d in hits if d in dst_keys]
            if not hits:
                raise UsageError(
                    f"hint rule {rule.pattern!r} -> {rule.replacement!r} turns no source key into "
                    f"a model key; source keys look like {next(iter(src_keys), '-')!r}, model "
                    f"keys like {next(iter(dst_keys), '-')!r}"
                )
            out += hits
        return out
    raise UsageError(
        f"hints must be a dict {{source key: model key}} or a list of (regex, replacement) "
        f"rules, not {type(hints).__name__}"
    )


def _named_hints(
    hints: Mapping[str, str],
    src_keys: Mapping[str, Entry],
    dst_keys: Mapping[str, Entry],
    src_mods: Mapping[str, Entry],
    dst_mods: Mapping[str, Entry],
) -> list[tuple[str, str]]:
    """Pairs from ``{source key or module: model key or module}`` hints."""
    out: list[tuple[str, str]] = []
    for s, d in hints.items():
        if s in src_keys and d in dst_keys:
            out.append((s, d))
        elif s in src_mods and d in dst_mods:
            out += [(x, y) for x, y, _, _ in pair_entries(src_mods[s], dst_mods[d])]
        else:
            if s not in src_keys and s not in src_mods:
                bad, side, names = s, "source", [*src_keys, *src_mods]
            else:
                bad, side, names = d, "model", [*dst_keys, *dst_mods]
            near = closest(bad, names)
            raise UsageError(
                f"hint {s!r} -> {d!r}: {bad!r} is not a tensor key or module of the {side}"
                + (f"; closest: {', '.join(near)}" if near else "")
                + ". Hints pair two tensor keys or two modules that own tensors."
            )
    return out


def find_layouts(
    src_left: list[tuple[str, tuple[int, ...]]],
    dst_left: list[tuple[str, tuple[int, ...]]],
) -> tuple[list[Layout], set[str], set[str]]:
    """One tensor that is k others stacked on dim 0 (fused q/k/v), in either direction."""
    layouts: list[Layout] = []
    used_s: set[str] = set()
    used_d: set[str] = set()

    def kind(key: str) -> str:
        return "bias" if "bias" in leaf(key) else "weight"

    for one, many, direction in ((src_left, dst_left, "split"), (dst_left, src_left, "concat")):
        for key, shape in one:
            if not shape or key in used_s | used_d:
                continue
            for k in (3, 2):
                if shape[0] % k:
                    continue
                part = (shape[0] // k, *shape[1:])
                cands = [
                    x
                    for x, s in many
                    if s == part and kind(x) == kind(key) and x not in used_s | used_d
                ]
                if len(cands) == k:
                    if direction == "split":
                        lay = Layout("split", (key,), tuple(cands), "surgery.adapters.split_fused")
                        used_s.add(key)
                        used_d.update(cands)
                    else:
                        lay = Layout(
                            "concat", tuple(cands), (key,), "surgery.adapters.concat_fused"
                        )
                        used_d.add(key)
                        used_s.update(cands)
                    layouts.append(lay)
                    break
    return layouts, used_s, used_d
