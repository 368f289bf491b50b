"""Spawning ranks: a test's case run on ``world`` CPU processes (gloo), bounded in time.

A case is a module-level function ``case(rank, world, tmp)`` of the test module (the spawned
ranks import it by name). Each rank records ``done-RANK`` in ``tmp`` once its case passed and
the process group is down; :func:`spawn` fails the test unless every rank did.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["spawn"]

Case = Callable[[int, int, Path], None]


def _worker(rank: int, world: int, tmp: str, case: Case) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        case(rank, world, Path(tmp))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    (Path(tmp) / f"done-{rank}").write_text("ok")
    # gloo's worker threads can abort the interpreter's own teardown ("terminate called without
    # an active exception", SIGABRT; pytorch#179291): the work is checked and recorded, so leave
    # without running finalisers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(
    case: Case, world: int, tmp: Path, monkeypatch: pytest.MonkeyPatch, timeout_s: float
) -> None:
    """Run ``case`` on ``world`` spawned ranks; fail (killing them) if it takes too long."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ctx = mp.start_processes(
        _worker, args=(world, str(tmp), case), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{case.__name__} on {world} ranks did not finish within {timeout_s} s")
    assert sorted(p.name for p in tmp.glob("done-*")) == [f"done-{r}" for r in range(world)]
