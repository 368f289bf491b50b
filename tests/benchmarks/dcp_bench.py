"""Sharded loads: per-rank peak memory and time of ``load_partial`` against plain ``dcp.load``.

Run by hand (not part of the test suite), on CPU with gloo:

    .venv/bin/python tests/benchmarks/dcp_bench.py                   # ~200 MB model, 1/2/4 ranks
    .venv/bin/python tests/benchmarks/dcp_bench.py --ranks 2 --repeats 5 --layers 24
    .venv/bin/python tests/benchmarks/dcp_bench.py --saved-by 4 --ways surgery(dcp)

One full-match checkpoint of an MLP (``--layers`` x Linear(``--width``)) is written once by a
single process, as a DCP folder and as one ``.safetensors`` file. For each rank count and each
way, the ranks are fresh interpreters started by this script (which never imports torch:
Linux carries ``ru_maxrss`` across ``exec``). Each rank builds the model on the meta device,
shards it with FSDP2 ``fully_shard``, allocates and zeroes its shards, then loads:

- ``dcp.load``: ``dcp.load(model.state_dict(), checkpoint_id=folder)``, the plain way;
- ``surgery(dcp)`` / ``surgery(safetensors)``: ``surgery.load_partial(model, path)``.

Memory is each rank's peak resident set (``ru_maxrss``) net of the resident set after the
imports; it includes the rank's own shards. Time is the slowest rank's wall time of the load
call (between two barriers); medians over ``--repeats`` runs, which interleave the ways. With
``--warm K`` (default 5) each surgery run then times K alternating (``dcp.load``, surgery)
pairs in the same processes: the ratio per pair, median over pairs, is the steadier time
comparison on a busy machine. Targets (issue 13): net peak per rank <= weights / N + 10% of
the weights (the "one tensor" of headroom), and time <= 1.1x ``dcp.load``.

``--saved-by K`` writes the DCP folder from K FSDP2 ranks (each tensor stored as K row chunks,
as a sharded training run saves it) instead of one process (each tensor one chunk, which DCP
reads whole on every rank that needs part of it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = ("dcp.load", "surgery(dcp)", "surgery(safetensors)")


def _model(layers: int, width: int):
    from torch import nn

    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


# --------------------------------------------------------------------------- child processes


def _prepare(folder: str, layers: int, width: int, saved_by: int) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = _model(layers, width).state_dict()
    if saved_by == 1:
        dcp.save(sd, checkpoint_id=os.path.join(folder, "dcp"), no_dist=True)
    save_file(sd, os.path.join(folder, "model.safetensors"))
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    return {"weights_mb": nbytes / 2**20, "params": sum(t.numel() for t in sd.values())}


def _save_rank(world: int, rank: int, store: str, folder: str, layers: int, width: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)  # the same weights as _prepare's
    model = _model(layers, width)
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dcp.save(model.state_dict(), checkpoint_id=os.path.join(folder, "dcp"))
    dist.barrier()  # no collective left on gloo's threads at exit (pytorch#190489)
    dist.destroy_process_group()
    print("{}")


def _rank(
    way: str, world: int, rank: int, store: str, folder: str, layers: int, width: int, warm: int
):
    import resource

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import surgery

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    import_mb = peak_mb()
    with torch.device("meta"):
        model = _model(layers, width)
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().zero_()  # make the shards resident before the baseline
    built_mb = peak_mb()
    dist.barrier()
    t0 = time.perf_counter()
    if way == "dcp.load":
        dcp.load(model.state_dict(), checkpoint_id=os.path.join(folder, "dcp"))
    else:
        ckpt = "dcp" if way == "surgery(dcp)" else "model.safetensors"
        report = surgery.load_partial(model, os.path.join(folder, ckpt))
        if not (report.ok and report.tensors_loaded == 2 * layers):
            raise RuntimeError(f"unexpected report: {report}")
    elapsed = time.perf_counter() - t0
    dist.barrier()
    load_peak_mb = peak_mb()
    # Warm pairs in this process, after the measured load: dcp.load then this way, alternating,
    # so that a machine shared with other work slows both alike.
    pairs = []
    for _ in range(warm if way != "dcp.load" else 0):
        dist.barrier()
        t0 = time.perf_counter()
        dcp.load(model.state_dict(), checkpoint_id=os.path.join(folder, "dcp"))
        dist.barrier()
        t1 = time.perf_counter()
        surgery.load_partial(model, os.path.join(folder, ckpt))
        dist.barrier()
        pairs.append((t1 - t0, time.perf_counter() - t1))
    # check a value against the checkpoint (outside the timed and measured region)
    w = model[0].weight.full_tensor()
    dist.barrier()  # no collective left on gloo's threads at exit (pytorch#190489)
    dist.destroy_process_group()
    print(
        json.dumps(
            {
                "time_s": elapsed,
                "import_mb": import_mb,
                "built_mb": built_mb,
                "peak_mb": load_peak_mb,
                "checksum": float(w.double().sum()),
                "warm_pairs": pairs,
            }
        )
    )


# --------------------------------------------------------------------------- parent


def _python(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip


def _result(proc: subprocess.Popen, what: str, timeout: float = 600) -> dict:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _run(way: str, world: int, folder: str, layers: int, width: int, warm: int = 0) -> list[dict]:
    store = tempfile.mktemp(prefix="dcp_bench_store_")
    size = (str(layers), str(width))
    procs = [
        _python("--save", str(world), str(r), store, folder, *size)
        if way == "save"
        else _python("--rank", way, str(world), str(r), store, folder, *size, str(warm))
        for r in range(world)
    ]
    try:
        return [_result(p, f"{way} rank {r}/{world}") for r, p in enumerate(procs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if os.path.exists(store):
            os.remove(store)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--saved-by", type=int, default=1, help="ranks that write the DCP folder")
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    parser.add_argument("--json", default="dcp_bench.json", help="where to write results")
    parser.add_argument("--prepare", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument(
        "--warm", type=int, default=5, help="warm (dcp.load, way) pairs per surgery run"
    )
    parser.add_argument("--rank", nargs=8, help=argparse.SUPPRESS)
    parser.add_argument("--save", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        folder, layers, width, saved_by = args.prepare
        print(json.dumps(_prepare(folder, int(layers), int(width), int(saved_by))))
        return {}
    if args.save:
        world, rank, store, folder, layers, width = args.save
        _save_rank(int(world), int(rank), store, folder, int(layers), int(width))
        return {}
    if args.rank:
        way, world, rank, store, folder, layers, width, warm = args.rank
        _rank(way, int(world), int(rank), store, folder, int(layers), int(width), int(warm))
        return {}
    print(f"args: {vars(args)}")
    results: dict = {"args": vars(args), "rows": []}
    with tempfile.TemporaryDirectory() as folder:
        size = (str(args.layers), str(args.width))
        info = _result(_python("--prepare", folder, *size, str(args.saved_by)), "prepare")
        if args.saved_by > 1:
            _run("save", args.saved_by, folder, args.layers, args.width)
        weights = info["weights_mb"]
        results["weights_mb"] = weights
        print(f"model: {info['params']:,} params, {weights:.0f} MB (float32)")
        for world in args.ranks:
            # Repeats interleave the ways, so a machine that gets busier affects them alike.
            ways = ["dcp.load", *(w for w in args.ways if w != "dcp.load")]
            all_runs: dict[str, list[list[dict]]] = {way: [] for way in ways}
            for _ in range(args.repeats):
                for way in ways:
                    run = _run(way, world, folder, args.layers, args.width, args.warm)
                    all_runs[way].append(run)
            times: dict[str, float] = {}
            for way, runs in all_runs.items():
                sums = {r["checksum"] for run in runs for r in run}
                if len(sums) != 1:
                    raise RuntimeError(f"{way}: loaded values differ between runs/ranks")
                net = [max(r["peak_mb"] - r["import_mb"] for r in run) for run in runs]
                extra = [max(r["peak_mb"] - r["built_mb"] for r in run) for run in runs]
                row = {
                    "ranks": world,
                    "way": way,
                    "time_s": statistics.median(max(r["time_s"] for r in run) for run in runs),
                    "net_peak_mb": statistics.median(net),
                    "over_model_mb": statistics.median(extra),
                    "target_mb": weights / world + 0.1 * weights,
                }
                times[way] = row["time_s"]
                row["time_vs_dcp"] = row["time_s"] / times["dcp.load"]
                # warm pairs: slowest rank per pair, ratio per pair, median over all pairs
                ratios = [
                    max(r["warm_pairs"][i][1] for r in run)
                    / max(r["warm_pairs"][i][0] for r in run)
                    for run in runs
                    for i in range(len(run[0]["warm_pairs"]))
                ]
                row["warm_time_vs_dcp"] = statistics.median(ratios) if ratios else None
                results["rows"].append(row)
                warm_txt = (
                    f", warm {row['warm_time_vs_dcp']:.2f}x" if row["warm_time_vs_dcp"] else ""
                )
                print(
                    f"  {world} rank(s) {way:22s} {row['time_s']:6.2f} s "
                    f"({row['time_vs_dcp']:.2f}x dcp.load{warm_txt})  net peak/rank "
                    f"{row['net_peak_mb']:6.0f} MB (target <= {row['target_mb']:.0f}; "
                    f"{row['over_model_mb']:.0f} MB over its built shards)",
                    flush=True,
                )
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
