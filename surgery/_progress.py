"""Progress bars for long loads: the bytes read from the checkpoint, one bar per file.

``progress=None`` (the default of ``load_partial`` and ``apply_plan``) shows a bar only on a
terminal (``sys.stderr.isatty()``) and only when the load reads more than about 1 GB, so
scripts, logs and tests stay quiet; ``True`` always shows it, ``False`` never. A sharded
checkpoint gets one bar per shard file, as transformers shows. tqdm is optional: without it
``progress=True`` is a ``UsageError`` and ``None`` shows nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .errors import UsageError

LARGE = 1 << 30  # bytes a load reads before progress=None shows a bar on a terminal


def check(progress: Any) -> None:
    """Refuse a bad ``progress`` value, or ``progress=True`` without tqdm, before any work."""
    if progress is not None and not isinstance(progress, bool):
        raise UsageError(
            f"progress must be True (always show a bar), False (never) or None (on a terminal "
            f"for loads over 1 GB), not {progress!r}"
        )
    if progress is True and _tqdm() is None:
        raise UsageError(
            "progress=True shows a tqdm progress bar, but tqdm is not installed; "
            "pip install tqdm (or torch-surgery[recipes]), or pass progress=None"
        )


def _tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def _wanted(progress: bool | None, total: int) -> bool:
    if progress is not None:
        return progress
    if total <= LARGE:
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Bars:
    """One tqdm bar per file, opened when its first tensor is read, closed after its last.

    ``files`` maps each file to the bytes the load reads from it, in reading order.

    Example:
        >>> with Bars({"model.safetensors": 8}, progress=False) as bars:
        ...     bars.update("model.safetensors", 8)
    """

    def __init__(self, files: dict[str, int], progress: bool | None) -> None:
        self.files = files
        self._tqdm = _tqdm() if _wanted(progress, sum(files.values())) else None
        self._file: str | None = None
        self._bar: Any = None

    def update(self, file: str, nbytes: int) -> None:
        """Count ``nbytes`` read from ``file``."""
        if self._tqdm is None:
            return
        if file != self._file:
            self._close_bar()
            self._file = file
            self._bar = self._tqdm(
                total=self.files.get(file, 0),
                desc=Path(file).name or file,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                dynamic_ncols=True,
            )
        self._bar.update(nbytes)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_bar()
