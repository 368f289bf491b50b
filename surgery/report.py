"""``LoadReport``: what ``load_partial`` did, as data, as text and as an HTML table."""

from __future__ import annotations

import html
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from ._names import compile_patterns, first_match
from ._table import format_shape, html_table, text_table
from .errors import LoadError

__all__ = ["LoadReport", "Mismatch"]

_SHOW = 8  # keys listed per category in the text form


@dataclass(frozen=True)
class Mismatch:
    """A checkpoint tensor whose shape differs from the model's."""

    key: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "checkpoint_shape": list(self.checkpoint_shape),
            "model_shape": list(self.model_shape),
        }

    def __str__(self) -> str:
        return (
            f"{self.key}: checkpoint {format_shape(self.checkpoint_shape)} vs "
            f"model {format_shape(self.model_shape)}"
        )


@dataclass
class LoadReport:
    """What a load did (or, with ``dry_run=True``, would do).

    Model keys are the model's ``state_dict()`` names; checkpoint keys are the names in the
    file after unwrapping. ``ok`` is true when every model tensor the caller did not ``skip``
    got a value from the checkpoint (``defaulted`` counters aside).

    Example:
        >>> report = surgery.load_partial(model, "ckpt.pth")  # doctest: +SKIP
        >>> report.assert_loaded(allow_missing=["fc.*"])  # doctest: +SKIP

    ``tensors_*`` and ``params_*`` count parameters (tensors and elements, tied ones once);
    buffers (BatchNorm statistics) are counted apart in ``buffers_*``. ``loaded`` lists
    every model key that got a value, buffers included.
    """

    source: str = ""
    model: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    adapted: list[Mismatch] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    cast: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
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
        """True when nothing the caller did not skip is missing or mismatched."""
        return not self.missing and not self.mismatched

    def not_loaded(self) -> list[str]:
        """Model keys that did not get a value: missing plus mismatched (not adapted)."""
        return sorted({*self.missing, *(m.key for m in self.mismatched)})

    def assert_loaded(self, allow_missing: Iterable[str] | str = ()) -> LoadReport:
        """Raise ``LoadError`` if any model key outside ``allow_missing`` (globs) got no value.

        Example:
            >>> report = surgery.load_partial(model, ckpt)  # doctest: +SKIP
            >>> report.assert_loaded(allow_missing=["fc.*"])  # doctest: +SKIP
        """
        allowed = compile_patterns(allow_missing)
        bad = [k for k in self.not_loaded() if first_match(allowed, k) is None]
        if bad:
            lines = [f"    {k}" for k in bad[:20]] + (
                [f"    ... and {len(bad) - 20} more"] if len(bad) > 20 else []
            )
            raise LoadError(
                f"{len(bad)} model tensor(s) of {self.model} got no value from {self.source}:\n"
                + "\n".join(lines)
                + "\nPass allow_missing=[...] with their names (globs like 'fc.*') if that is "
                "intended."
            )
        return self

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
        return s

    def _rows(self, limit: int | None) -> list[tuple[str, str, str]]:
        """(status, key, detail) rows, at most ``limit`` keys per status."""
        from ._keymap import describe_prefix

        rows: list[tuple[str, str, str]] = []

        def add(status: str, items: list[tuple[str, str]]) -> None:
            shown = items if limit is None else items[:limit]
            rows.extend((status, k, d) for k, d in shown)
            if len(shown) < len(items):
                rows.append((status, f"... {len(items) - len(shown)} more", ""))

        if self.prefix:
            n = len(self.renamed)
            rows.append(("prefix", "", f"{describe_prefix(self.prefix)} ({n} keys)"))
        add(
            "mismatched",
            [
                (
                    m.key,
                    f"checkpoint {format_shape(m.checkpoint_shape)} vs model "
                    f"{format_shape(m.model_shape)}, not loaded",
                )
                for m in self.mismatched
            ],
        )
        add(
            "adapted",
            [
                (
                    m.key,
                    f"checkpoint {format_shape(m.checkpoint_shape)} -> model "
                    f"{format_shape(m.model_shape)}",
                )
                for m in self.adapted
            ],
        )
        add("missing", [(k, "not in checkpoint") for k in self.missing])
        add("unexpected", [(k, "not in model") for k in self.unexpected])
        add("skipped", [(k, "skipped as asked") for k in self.skipped])
        add("initialised", [(k, "reset_parameters()") for k in self.initialised])
        add("defaulted", [(k, "counter left at its default") for k in self.defaulted])
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

    def __str__(self) -> str:
        head = f"LoadReport: {self.source} -> {self.model}\n  {self.summary()}"
        rows = self._rows(_SHOW)
        parts = [head]
        if rows:
            parts.append(text_table(("status", "key", "detail"), rows, indent="  "))
        parts.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"<LoadReport {self.summary()}; ok={self.ok}>"

    def _repr_html_(self) -> str:
        rows = self._rows(50)
        caption = f"{self.source} -> {self.model}: {self.summary()}"
        table = html_table(("status", "key", "detail"), rows, caption=caption)
        notes = "".join(f"<div>note: {html.escape(n)}</div>" for n in self.notes)
        return table + notes
