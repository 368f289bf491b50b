"""Automatic prefix detection: the ``(strip, add)`` rewrite that lines checkpoint keys up with
model keys (``module.``, ``_orig_mod.``, ``backbone.``), and the hints that name it.

The search runs in time linear in the number of keys: it compares a handful of candidate
prefixes (the most common leading components on each side) with set operations.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Collection, Container, Iterable, Sequence

from .._table import format_shape
from .._text import escape_control
from ..errors import Advice, Fix, PrefixTieError
from .remap import collision

_MAX_DEPTH = 3  # leading components considered for a prefix
_CANDIDATES = 4  # most common prefixes tried on each side
_SAMPLE = 4096  # keys scored per candidate


def _leading(key: str, depth: int) -> list[str]:
    """Prefixes of the first 1..depth dotted components, each ending in '.'."""
    out = []
    i = -1
    for _ in range(depth):
        i = key.find(".", i + 1)
        if i < 0:
            break
        out.append(key[: i + 1])
    return out


def _top_prefixes(keys: Iterable[str]) -> list[str]:
    counts: Counter[str] = Counter()
    for k in keys:
        counts.update(_leading(k, _MAX_DEPTH))
    return [p for p, _ in counts.most_common(_CANDIDATES)]


def _sample(keys: Sequence[str], n: int = _SAMPLE) -> Sequence[str]:
    """Evenly spaced keys: a prefix that describes a key set shows in any spread sample."""
    if len(keys) <= n:
        return keys
    step = len(keys) / n
    return [keys[int(i * step)] for i in range(n)]


Fits = Callable[[str, str], bool]  # (checkpoint key, model key) -> the shapes agree


def detect_prefix(
    ckpt_keys: Iterable[str], model_keys: set[str], fits: Fits | None = None
) -> tuple[str, str] | None:
    """The ``(strip, add)`` prefix rewrite that matches the most checkpoint keys to model keys.

    ``None`` when no rewrite more than doubles the keys that already match. Candidates are
    the most common leading components on each side; they are scored on an evenly spaced
    sample of the checkpoint keys (exact below 4096 keys), so 100k keys take milliseconds.
    ``fits(ckpt_key, model_key)`` says whether a pair's shapes agree: a rewrite scores only
    the pairs that fit (``fc1.`` -> ``head.`` pairs names, not tensors, when the shapes
    differ). Two rewrites that match equally many keys but pair different keys (a MoCo
    checkpoint's ``module.encoder_q.`` and ``module.encoder_k.``, ``model.`` and
    ``model_ema.``) raise :class:`PrefixTieError` naming both: the key order of the file must
    not decide.
    """
    best = best_rewrites(ckpt_keys, model_keys, fits)[1]
    if not best:
        return None
    if len(best) > 1:
        raise tie_error(best)
    return best[0][1]


def best_rewrites(
    ckpt_keys: Iterable[str], model_keys: set[str], fits: Fits | None = None
) -> tuple[int, list[tuple[int, tuple[str, str]]]]:
    """How many checkpoint keys match as they are, and the best-scoring rewrites, one per
    distinct pairing of keys, shortest prefix first (both counted on the sample).

    The list is empty when no rewrite more than doubles the keys that already match.
    """
    ckpt = _sample(list(ckpt_keys))
    matched = [k in model_keys for k in ckpt]
    base = sum(matched)
    if base == len(ckpt):
        return base, []
    strip_cands = ["", *_top_prefixes(k for k, hit in zip(ckpt, matched, strict=True) if not hit)]
    hit_set = {k for k, hit in zip(ckpt, matched, strict=True) if hit}
    model_sample = _sample([k for k in model_keys if k not in hit_set])
    add_cands = ["", *_top_prefixes(model_sample)]
    top = 0
    found: list[tuple[int, tuple[str, str], frozenset[tuple[str, str]]]] = []
    for cp in strip_cands:
        n = len(cp)
        # Keys outside the stripped prefix keep their names (and their identity matches).
        kept = [(k, k) for k in hit_set if not k.startswith(cp)]
        if fits is not None:
            kept = [(k, m) for k, m in kept if fits(k, m)]
        for mp in add_cands:
            if cp == mp:
                continue
            pairs = [(k, mp + k[n:]) for k in ckpt if k.startswith(cp)]
            pairs = [(k, m) for k, m in pairs if m in model_keys]
            if fits is not None:
                pairs = [(k, m) for k, m in pairs if fits(k, m)]
            score = len(pairs) + len(kept)
            if score < top or score == 0:
                continue
            if score > top:
                top, found = score, []
            found.append((n + len(mp), (cp, mp), frozenset(pairs + kept)))
    # A prefix describes the checkpoint as a whole (a wrapper, a backbone inside a bigger
    # model): it must more than double the matches, not rename a few stray keys.
    if not found or top <= 2 * base:
        return base, []
    found.sort(key=lambda f: f[0])
    distinct: list[tuple[int, tuple[str, str]]] = []
    seen: list[frozenset[tuple[str, str]]] = []
    for _, rewrite, pairs in found:  # a.b. -> b. pairs the same keys as a. -> '': one reading
        if pairs not in seen:
            seen.append(pairs)
            distinct.append((top, rewrite))
    return base, distinct


def rewrite_fix(rewrite: tuple[str, str]) -> Fix:
    """The ``remap=`` that performs a ``(strip, add)`` prefix rewrite."""
    cp, mp = rewrite
    pattern = "^" + re.escape(cp)
    return Fix("remap", [(pattern, mp)], shown=f'remap=[(r"{pattern}", "{mp}")]')


def tie_error(best: list[tuple[int, tuple[str, str]]]) -> PrefixTieError:
    lines: list[str | Fix] = []
    for score, rw in best:
        lines += ["\n" if lines else "", f"    {describe_prefix(rw)} ({score} keys match): "]
        lines.append(rewrite_fix(rw))
    return PrefixTieError(
        Advice(
            f"{len(best)} prefix rewrites match the model equally well, so the checkpoint "
            "holds several models (an EMA or teacher copy, a momentum encoder) and the order "
            "of its keys would decide which one loads:\n",
            *lines,
            "\nPass the ",
            Fix("remap", shown="remap="),
            " that picks the one you want, or ",
            Fix("prefix", None),
            " to load the names as they are.",
        )
    )


def apply_prefix(new_to_old: dict[str, str], rewrite: tuple[str, str]) -> dict[str, str]:
    """Apply a ``(strip, add)`` rewrite to the keys of ``new -> old``; collisions raise."""
    cp, mp = rewrite
    n = len(cp)
    out: dict[str, str] = {}
    for new, old in new_to_old.items():
        key = mp + new[n:] if new.startswith(cp) else new
        if key in out:
            raise collision(out[key], old, key, "prefix rewrite")
        out[key] = old
    return out


def describe_prefix(rewrite: tuple[str, str]) -> str:
    cp, mp = rewrite
    if cp and mp:
        return f"replaced prefix '{cp}' with '{mp}'"
    if cp:
        return f"stripped prefix '{cp}'"
    return f"added prefix '{mp}'"


def lined_up(
    keys: Iterable[str], targets: Container[str], rewrite: tuple[str, str]
) -> list[tuple[str, str]]:
    """``(key, target)`` for each key the ``(strip, add)`` rewrite turns into a target."""
    cp, mp = rewrite
    n = len(cp)
    return [(k, mp + k[n:]) for k in keys if k.startswith(cp) and mp + k[n:] in targets]


def stray_rewrite(
    unexpected: Sequence[str], unfilled: Collection[str], fits: Fits | None = None
) -> tuple[str, str] | None:
    """The ``(strip, add)`` rewrite that lines up the most ``unexpected`` checkpoint keys with
    model keys left without a value (``unfilled``): a checkpoint merged by hand, half of it
    under ``module.``, which no rewrite of the whole checkpoint explains. ``None`` unless it
    lines up at least two keys and half of the unexpected ones.

    Example:
        >>> stray_rewrite(["module.b.w", "module.c.w"], {"b.w", "c.w"})
        ('module.', '')
    """
    if not unexpected or not unfilled:
        return None
    best = best_rewrites(unexpected, set(unfilled), fits)[1]
    if not best:
        return None
    score, rewrite = best[0]
    return rewrite if score >= 2 and 2 * score >= len(_sample(list(unexpected))) else None


Shapes = Callable[[str, str], tuple[Sequence[int], Sequence[int]] | None]


def prefix_hint(
    ckpt_keys: Sequence[str],
    model_keys: set[str],
    *,
    or_auto: bool = True,
    shapes: Shapes | None = None,
) -> str:
    """A sentence suggesting the remap that would make the key sets line up (``or_auto``: and
    saying ``prefix="auto"`` would find it too): a rewrite of every key, else one for the keys
    that name no model key (a checkpoint half under ``module.``). ``shapes(ckpt_key,
    model_key)`` gives a pair's two shapes: keys whose names the rewrite lines up but whose
    shapes differ are then named with both shapes."""
    best = best_rewrites(ckpt_keys, model_keys)[1]
    present = set(ckpt_keys)
    unmatched = [k for k in ckpt_keys if k not in model_keys]
    missing = sorted(k for k in model_keys if k not in present)
    if not unmatched or not missing:
        return ""
    rewrite = best[0][1] if best else stray_rewrite(unmatched, missing)
    if rewrite is None:
        return escape_control(
            f"Checkpoint keys look like '{unmatched[0]}', model keys like '{missing[0]}'."
        )
    pairs = lined_up(unmatched, model_keys, rewrite)
    fix = rewrite_fix(rewrite)
    fix = Fix(fix.option, fix.value, shown=escape_control(str(fix)))
    differ = _differ(pairs, shapes)
    if best or not pairs:
        example, counterpart = pairs[0] if pairs else (unmatched[0], missing[0])
        text: list[str | Fix] = [
            escape_control(
                f"Checkpoint keys look like '{example}', model keys like '{counterpart}'."
            ),
            " Try ",
            fix,
        ]
        if or_auto and len(differ) < len(pairs):
            text.append(Fix("prefix", "auto", shown=' (or prefix="auto")'))
        text.append(".")
    else:
        text = [
            f"{len(pairs)} of the {len(unmatched)} checkpoint keys that name no model key line "
            "up with model keys after ",
            fix,
            escape_control(f" (e.g. '{pairs[0][0]}' -> '{pairs[0][1]}')."),
        ]
    if differ:
        _, model_key, a, b = differ[0]
        example = escape_control(
            f"'{model_key}': checkpoint {format_shape(a)} vs model {format_shape(b)}"
        )
        text.append(
            f" With it the names match, but the shapes differ ({len(differ)} of {len(pairs)} "
            f"keys, e.g. {example})"
            + (
                ": the checkpoint is for another size or configuration of this model."
                if len(differ) == len(pairs)
                else "; those load as mismatches."
            )
        )
    return Advice(*text)


def _differ(
    pairs: list[tuple[str, str]], shapes: Shapes | None
) -> list[tuple[str, str, Sequence[int], Sequence[int]]]:
    """The pairs whose two shapes differ (none when the shapes are not known)."""
    out = []
    for k, m in pairs if shapes is not None else ():
        both = shapes(k, m)
        if both is not None and tuple(both[0]) != tuple(both[1]):
            out.append((k, m, *both))
    return out
