"""``LoadReport``: what ``load_partial`` did, as data, as text and as an HTML table.

A report is derived, here only, from the plan and the :class:`Outcome` of applying it
(:func:`report_of`): what was planned, and what the load did (tensors written, adapters that
declined, meta tensors initialised).
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from .._table import (
    _StatusTable,
    first_n,
    first_n_lines,
    format_count,
    html_bar,
    html_table,
    html_verdict,
    status_rows,
)
from .._text import escape_control
from ..errors import Advice, Fix, LoadError
from ..keys.prefix import describe_prefix, lined_up, rewrite_fix, stray_rewrite
from ..keys.select import Selector, match_keys
from .entries import Mismatch, PlanEntry
from .plan import PlanData

__all__ = ["LoadReport", "Mismatch", "Outcome", "outcome_of", "plan_html", "report_of"]

_SHOW = 8  # keys listed per category in the text form


@dataclass
class LoadReport(_StatusTable):
    """What a load did (or, with ``dry_run=True``, would do), derived from its plan.

    Model keys are the model's ``state_dict()`` names; checkpoint keys are the names in the
    file after unwrapping. ``ok`` is true exactly when ``strict=True`` would not have raised:
    nothing missing, unexpected or mismatched (skipped keys and ``defaulted`` counters are
    fine). ``missing_keys`` / ``unexpected_keys`` read as torch's ``_IncompatibleKeys``,
    ``incorrect_shapes`` as fvcore's ``(key, checkpoint shape, model shape)`` list.

    Example:
        >>> report = surgery.load_partial(model, "ckpt.pth")  # doctest: +SKIP
        >>> report.assert_loaded(allow_missing=["fc.*"])  # doctest: +SKIP

    ``tensors_*`` and ``params_*`` count parameters (tensors and elements, tied ones once);
    buffers (BatchNorm statistics) are counted apart in ``buffers_*``. ``loaded`` lists
    every model key that got a value, buffers included (every alias of a tied tensor). Every
    other list names a tied tensor once, by the key that carries it; ``tied`` maps each other
    key of a tied tensor to that key (``missing_keys`` lists them too, as torch does).
    ``missing`` includes keys a meta model ``initialised`` from their module's init.
    ``adapter`` lists the PEFT adapter weights (``lora_A``, ``lora_B``, ...) of a model wrapped
    by ``peft.get_peft_model`` that a base checkpoint left as they were; they are not missing.
    ``converted`` maps each model key a transformers conversion gave a value to the checkpoint
    tensors it was made from, in short (``'...experts.{0..3}.w1/w3.weight (merged,
    concatenated)'``); the plan (``plan.find(action="convert")``) holds every key.
    """

    source: str = ""
    model: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    adapted: list[Mismatch] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    converted: dict[str, str] = field(default_factory=dict)
    cast: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    adapter: list[str] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)
    prefix: tuple[str, str] | None = None
    notes: list[str] = field(default_factory=list)
    tensors_loaded: int = 0
    tensors_total: int = 0
    params_loaded: int = 0
    params_total: int = 0
    buffers_loaded: int = 0
    buffers_total: int = 0
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        """True exactly when ``strict=True`` would not have raised: nothing missing,
        unexpected or mismatched. Skipped keys, defaulted counters and PEFT adapter weights
        are fine."""
        return not self.missing and not self.unexpected and not self.mismatched

    @property
    def missing_keys(self) -> list[str]:
        """Model keys the checkpoint had no tensor for (as torch's ``_IncompatibleKeys``:
        every key of a tied tensor)."""
        if not self.tied:
            return self.missing
        aliases: dict[str, list[str]] = {}
        for k, carrier in self.tied.items():
            aliases.setdefault(carrier, []).append(k)
        return [a for k in self.missing for a in (k, *aliases.get(k, ()))]

    @property
    def unexpected_keys(self) -> list[str]:
        """Checkpoint keys (after renaming) the model has no tensor for (as torch's)."""
        return self.unexpected

    @property
    def incorrect_shapes(self) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """``(key, checkpoint shape, model shape)`` of every mismatched key, as fvcore."""
        return [(m.key, m.checkpoint_shape, m.model_shape) for m in self.mismatched]

    def not_loaded(self) -> list[str]:
        """Model keys that did not get a value: missing plus mismatched (not adapted)."""
        return sorted({*self.missing, *(m.key for m in self.mismatched)})

    def assert_loaded(self, allow_missing: Selector | Iterable[Selector] = ()) -> LoadReport:
        """Raise ``LoadError`` if any model key outside ``allow_missing`` got no value.

        ``allow_missing`` holds name patterns (``"fc.*"``, ``"fc"``, ``"re:..."``) resolved
        like every selector in surgery. It lists keys that *may* go without a value, so a
        pattern matching keys that did load is fine; one that matches no key of the model at
        all is a typo and raises ``SelectorError`` with the closest names.

        Example:
            >>> report = surgery.load_partial(model, ckpt)  # doctest: +SKIP
            >>> report.assert_loaded(allow_missing=["fc.*"])  # doctest: +SKIP
        """
        not_loaded = self.not_loaded()
        known = [*self.loaded, *not_loaded, *self.skipped, *self.defaulted, *self.tied]
        allowed = match_keys(
            allow_missing or None, known, action="allow_missing", owner=self.model or "the model"
        )
        allowed |= {self.tied[k] for k in allowed if k in self.tied}  # a tied tensor's key
        bad = [k for k in not_loaded if k not in allowed]
        if bad:
            raise LoadError(
                f"{len(bad)} model tensor(s) of {self.model} got no value from {self.source}:\n"
                + "\n".join(first_n_lines(bad, 20))
                + "\nPass allow_missing=[...] with their names (globs like 'fc.*') if that is "
                "intended."
            )
        return self

    def why_not_ok(self) -> str:
        """One line saying why ``ok`` is false, and the fix if it was intended (``""`` if ok).

        Example:
            >>> report.why_not_ok()  # doctest: +SKIP
            "2 tensors not loaded: fc.weight, fc.bias (mismatched); pass skip='fc.*' if intended"
        """
        parts: list[tuple[str | Fix, ...]] = []
        unexpected, missing = self.unexpected, self.missing
        # keys that one renaming rule would give a value (a checkpoint half under 'module.')
        unfilled = {*self.missing, *self.defaulted}
        rewrite = stray_rewrite(unexpected, unfilled)
        if rewrite is not None:
            pairs = lined_up(unexpected, unfilled, rewrite)
            fix = rewrite_fix(rewrite)
            parts.append(
                (
                    f"{len(pairs)} unexpected checkpoint keys line up with model keys that got "
                    "no value after ",
                    Fix(fix.option, fix.value, shown=escape_control(str(fix))),
                    f" (e.g. '{pairs[0][0]}' -> '{pairs[0][1]}'); pass it to load them",
                )
            )
            moved, filled = {k for k, _ in pairs}, {m for _, m in pairs}
            unexpected = [k for k in unexpected if k not in moved]
            missing = [k for k in missing if k not in filled]
        for keys, what in (
            ([m.key for m in self.mismatched], "mismatched"),
            (missing, "missing from the checkpoint"),
        ):
            if keys:
                parts.append(
                    (
                        f"{len(keys)} tensor{'s' * (len(keys) != 1)} not loaded: "
                        f"{first_n(keys, 3)} ({what}); pass ",
                        _skip_fix(keys),
                        " if intended",
                    )
                )
        if unexpected:
            n, rx = len(unexpected), _regex(unexpected)
            parts.append(
                (
                    f"{n} unexpected checkpoint key{'s' * (n != 1)}: {first_n(unexpected, 3)}; "
                    "drop with ",
                    Fix("remap", [(rx, None)], shown=escape_control(f"remap=[(r'{rx}', None)]")),
                    " if intended",
                )
            )
        joined = [p for i, part in enumerate(parts) for p in ((("; ",) if i else ()) + part)]
        return Advice(*joined).map_text(escape_control)  # one line, whatever the keys hold

    def to_dict(self) -> dict:
        """Everything in plain Python types (JSON-serialisable)."""
        out = asdict(self)
        out["mismatched"] = [m.to_dict() for m in self.mismatched]
        out["adapted"] = [m.to_dict() for m in self.adapted]
        out["cast"] = [list(c) for c in self.cast]
        out["prefix"] = list(self.prefix) if self.prefix else None
        out["ok"] = self.ok
        return out

    # ------------------------------------------------------------------ rendering

    def summary(self) -> str:
        """One line: ``loaded 60/62 parameter tensors (11,176,512/11,181,642 params), ...``."""
        s = (
            f"{'would load' if self.dry_run else 'loaded'} {self.tensors_loaded}/"
            f"{self.tensors_total} parameter tensors ({self.params_loaded:,}/"
            f"{self.params_total:,} params)"
        )
        if self.buffers_total:
            s += f", buffers {self.buffers_loaded}/{self.buffers_total}"
        if self.adapter:
            s += f", {len(self.adapter)} PEFT adapter tensors kept"
        return s

    _header = ("status", "key", "detail")
    _text_limit = _SHOW
    _html_limit = 50

    def _status_rows(self, limit: int | None) -> list[tuple[str, str, str]]:
        """(status, key, detail) rows, at most ``limit`` keys per status."""
        rows: list[tuple[str, str, str]] = []
        aliases: dict[str, list[str]] = {}  # a tied tensor's other keys, named in its row
        for k, carrier in self.tied.items():
            aliases.setdefault(carrier, []).append(k)

        def add(status: str, items: list[tuple[str, str]]) -> None:
            items = [
                (k, f"{d} (tied: {', '.join(aliases[k])})" if k in aliases else d) for k, d in items
            ]
            rows.extend(status_rows(status, items, limit))

        if self.prefix:
            n = len(self.renamed)
            rows.append(("prefix", "", f"{describe_prefix(self.prefix)} ({n} keys)"))
        add("mismatched", [(m.key, f"{m.shapes()}, not loaded") for m in self.mismatched])
        add("adapted", [(m.key, m.shapes("->")) for m in self.adapted])
        add("missing", [(k, "not in checkpoint") for k in self.missing])
        add("unexpected", [(k, "not in model") for k in self.unexpected])
        add("skipped", [(k, "skipped as asked") for k in self.skipped])
        add("initialised", [(k, "reset_parameters()") for k in self.initialised])
        add("defaulted", [(k, "counter left at its default") for k in self.defaulted])
        add("adapter", [(k, "PEFT adapter weight, left as it is") for k in self.adapter])
        add("converted", [(k, f"<- {d}") for k, d in self.converted.items()])
        if self.cast:
            kinds = sorted({f"{a} -> {b}" for _, a, b in self.cast})
            rows.append(("cast", f"{len(self.cast)} tensors", ", ".join(kinds)))
        if self.renamed:
            # Renames the prefix rewrite explains are summarised in its row, not listed.
            cp, mp = self.prefix or ("", "")
            items = [
                (new, f"from '{old}'")
                for old, new in self.renamed.items()
                if not (self.prefix and old.startswith(cp) and new == mp + old[len(cp) :])
            ]
            add("renamed", items)
        return rows

    def _caption(self) -> str:
        return "\n".join(self._caption_lines())

    def _caption_lines(self) -> list[str]:
        return [f"LoadReport: {self.source} -> {self.model}", f"  {self.summary()}"]

    def _html_caption(self) -> str:
        return f"{self.source} -> {self.model}: {self.summary()}"

    def __repr__(self) -> str:
        why = "" if self.ok else f" ({self.why_not_ok()})"
        return f"<LoadReport {self.summary()}; ok={self.ok}{why}>"

    def _loaded_fraction(self) -> str:
        """'99.9% of parameters loaded (11.2M of 11.2M)': rounded down, never '100' short."""
        done = "would load" if self.dry_run else "loaded"
        part, whole = self.params_loaded, self.params_total
        pct = math.floor(1000 * part / whole) / 10 if whole else 0.0
        return f"{pct:.1f}% of parameters {done} ({format_count(part)} of {format_count(whole)})"

    def _repr_html_(self) -> str:
        # The table (status cells coloured), the loaded fraction as a bar, the ok / not-ok line
        # with its reason, then the notes.
        table = super()._repr_html_()
        cut = table.index("</table>") + len("</table>")
        bar = html_bar(self.params_loaded, self.params_total, self._loaded_fraction())
        return table[:cut] + bar + html_verdict(self.ok, self.why_not_ok()) + table[cut:]


def _common_parent(keys: list[str]) -> str:
    """The longest dotted module prefix every key shares (``""`` when none)."""
    parts = [k.split(".")[:-1] for k in keys]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _pattern(keys: list[str]) -> str:
    """A ``skip=`` value naming ``keys``: ``'fc.*'`` for one module, else a short list."""
    parent = _common_parent(keys)
    if parent:
        return repr(parent + ".*")
    if len(keys) == 1:
        return repr(keys[0])
    return "[" + ", ".join(repr(k) for k in keys[:3]) + (", ...]" if len(keys) > 3 else "]")


def _skip_fix(keys: list[str]) -> Fix:
    """The ``skip=`` naming ``keys`` (the first three and ``...`` when they share no parent)."""
    parent = _common_parent(keys)
    value: Any = parent + ".*" if parent else keys[0] if len(keys) == 1 else keys[:3]
    if not parent and len(keys) > 3:
        value = [*value, ...]
    return Fix("skip", value, shown=escape_control(f"skip={_pattern(keys)}"))


def _regex(keys: list[str]) -> str:
    parent = _common_parent(keys)
    if parent:
        return "^" + re.escape(parent + ".")
    return (
        "^" + re.escape(keys[0]) + "$"
        if len(keys) == 1
        else "^(" + "|".join(re.escape(k) for k in keys[:3]) + ")$"
    )


def plan_html(plan: PlanData) -> str:
    """A plan in a notebook: the table its report will show (rows by status, coloured, every
    cell escaped), the ok / not-ok line with its reason, and the notes. The report is derived
    from the plan as a dry run's is; the loaded-fraction bar needs the model, so it is left out.

    Example:
        >>> plan = surgery.plan_load(model, "resnet18.pth")  # doctest: +SKIP
        >>> plan  # in Jupyter: the table  # doctest: +SKIP
    """
    report = report_of(plan, Outcome(), dry_run=True)
    counts = ", ".join(f"{n} {a}" for a, n in plan.counts().items()) or "no entries"
    table = html_table(
        report._header,
        report._html_rows(),
        f"LoadPlan: {plan.source} -> {plan.model}: {counts}",
        report._numeric,
        report._status_column,
    )
    notes = "".join(f"<p>{html.escape(line)}</p>" for line in report._html_notes())
    return table + html_verdict(report.ok, report.why_not_ok()) + notes


# --------------------------------------------------------------------------- derived


@dataclass
class Outcome:
    """What apply did (or, for a dry run, would do): the facts a report adds to its plan."""

    loaded: list[str] = field(default_factory=list)  # model keys given a value, ties included
    declined: set[str] = field(default_factory=set)  # adapt entries whose adapter said None
    notes: list[str] = field(default_factory=list)  # what the adapter said it did
    initialised: list[str] = field(default_factory=list)
    # LoadReport's count fields by name: tensors_/params_/buffers_ + loaded/total
    counts: Counter[str] = field(default_factory=Counter)


def outcome_of(
    state: Mapping[str, Any],
    written: set[int] | frozenset[int],
    initialised: list[str],
    declined: set[str],
    by_modules: set[str],
) -> Outcome:
    """The outcome of writing the tensors ``written`` (ids) into ``state``. ``by_modules``
    names keys given a value by their module's own loading (an extra state, a quantized
    module's packed weights): not tensors of the model, or not the same object on every
    ``state_dict()`` call. Only tensors are counted."""
    out = Outcome(declined=declined, initialised=initialised)
    counts = out.counts
    seen: set[int] = set()
    for mkey, t in state.items():
        tid = id(t)
        hit = tid in written or mkey in by_modules
        if hit:
            out.loaded.append(mkey)
        if tid in seen or not isinstance(t, Tensor):
            continue
        seen.add(tid)
        if isinstance(t, nn.Parameter):
            n = t.numel()
            counts["tensors_total"] += 1
            counts["params_total"] += n
            if hit:
                counts["tensors_loaded"] += 1
                counts["params_loaded"] += n
        else:
            counts["buffers_total"] += 1
            counts["buffers_loaded"] += hit
    return out


def report_of(plan: PlanData, outcome: Outcome, *, dry_run: bool) -> LoadReport:
    """The one place a :class:`LoadReport` is assembled: from a plan and its outcome."""
    report = LoadReport(
        source=plan.source,
        model=plan.model,
        prefix=plan.prefix,
        notes=[*plan.notes, *outcome.notes],
        loaded=outcome.loaded,
        initialised=outcome.initialised,
        dry_run=dry_run,
        **outcome.counts,
    )
    for e in plan.entries:
        if e.tied_to:  # a tied tensor is reported once, by the key that carries it
            if e.model_key is not None:
                report.tied[e.model_key] = e.tied_to
            continue
        if e.ckpt_key is not None and e.model_key is not None and e.ckpt_key != e.model_key:
            report.renamed[e.ckpt_key] = e.model_key
        _file(report, e, outcome.declined)
    return report


def _file(report: LoadReport, e: PlanEntry, declined: set[str]) -> None:
    """Put one (untied) entry in the report's list for its action."""
    a = e.action
    if a == "load":
        return
    if a == "convert" and e.conversion is not None:
        report.converted[str(e.model_key)] = e.conversion.describe()
        if e.ckpt_dtype != e.model_dtype:
            report.cast.append((e.model_key, e.ckpt_dtype, e.model_dtype))  # type: ignore[arg-type]
    elif a == "cast":
        report.cast.append((e.model_key, e.ckpt_dtype, e.model_dtype))  # type: ignore[arg-type]
    elif a in ("adapt", "mismatch"):
        m = Mismatch.from_entry(e)
        (
            report.adapted if a == "adapt" and e.model_key not in declined else report.mismatched
        ).append(m)
    elif a == "skip":
        report.skipped.append(e.key)
    elif a in ("missing", "initialise"):
        report.missing.append(e.key)
    elif a == "unexpected":
        report.unexpected.append(e.key)
    elif a == "defaulted":
        report.defaulted.append(e.key)
    elif a == "adapter":
        report.adapter.append(e.key)
