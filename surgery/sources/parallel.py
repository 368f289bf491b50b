"""Reading many tensors at once, in a small bounded pool of threads.

A read is a positioned ``preadv`` straight into its destination's memory (or a tensor copy),
and both release the GIL, so a few threads read several tensors at once: the kernel's copy out
of the page cache and the page faults of fresh memory run on every core instead of one, as
transformers' loader does with its own pool. The pool has ``min(4, cpu count)`` threads;
``SURGERY_READ_THREADS`` sets another bound (``1`` reads in the calling thread, one tensor after
another). The caller's callback runs in the calling thread, so a progress bar needs no lock.
When a read fails, no new read starts, the running ones finish, and the first error is raised.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

import torch
from torch import Tensor

from ..errors import UsageError

__all__ = ["ENV", "read_all", "read_threads"]

ENV = "SURGERY_READ_THREADS"
_DEFAULT = 4


def read_threads() -> int:
    """How many threads read at once: ``$SURGERY_READ_THREADS``, else ``min(4, cpu count)``.

    Example:
        >>> read_threads() >= 1
        True
    """
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return max(1, min(_DEFAULT, os.cpu_count() or 1))
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(
            f"{ENV}={raw!r} is not a number of threads; set it to 1 (read one tensor at a "
            f"time) or more, or unset it for min({_DEFAULT}, cpu count)"
        )
    return n


def read_all(
    jobs: Sequence[tuple[str, Tensor]],
    read: Callable[[str, Tensor], None],
    on_read: Callable[[str], None],
    threads: int | None = None,
) -> None:
    """Run ``read(key, out)`` for every ``(key, out)`` of ``jobs``, the largest first, on up
    to ``threads`` threads (default :func:`read_threads`); ``on_read(key)`` in this thread as
    each finishes. The first failure stops new reads and is raised once the others are done."""
    threads = read_threads() if threads is None else threads
    order = sorted(jobs, key=lambda j: -j[1].numel() * j[1].element_size())
    if threads <= 1 or len(order) <= 1:
        for key, out in order:
            read(key, out)
            on_read(key)
        return
    stop = threading.Event()

    def one(key: str, out: Tensor) -> str:
        if not stop.is_set():
            with torch.no_grad():  # grad mode is per thread: a parameter is written in place
                read(key, out)
        return key

    with ThreadPoolExecutor(min(threads, len(order)), thread_name_prefix="surgery-read") as pool:
        pending: set[Future[str]] = {pool.submit(one, k, out) for k, out in order}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    on_read(fut.result())  # raises the read's error
        except BaseException:
            stop.set()
            for fut in pending:
                fut.cancel()
            raise
