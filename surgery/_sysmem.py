"""How much memory this machine can give now, for checks made before allocating."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

__all__ = ["available_memory", "format_bytes", "gc_paused"]


def available_memory() -> int | None:
    """Bytes of memory available to allocate now (psutil if installed, else the OS's count of
    free pages); ``None`` when neither can tell."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return int(psutil.virtual_memory().available)
        except Exception:  # psutil cannot read this system's counters
            pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n: int) -> str:
    """``'4398.0 GB'``, ``'12.5 MB'``: a size in a message.

    Example:
        >>> format_bytes(4 << 40), format_bytes(12_500_000)
        ('4398.0 GB', '12.5 MB')
    """
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: a load makes many short-lived acyclic objects, and
    on a model with tens of thousands of modules each full collection walks them all (it
    doubled the time to plan 100k keys). The previous state is restored."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
