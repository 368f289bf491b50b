"""A mixture-of-experts hub checkpoint (one tensor per expert) into a transformers model whose
experts are stacked: surgery against ``from_pretrained`` of the same folder, in one run.

Run by hand (not part of the test suite):

    .venv/bin/python tests/benchmarks/moe_bench.py                      # 73M-param Mixtral
    .venv/bin/python tests/benchmarks/moe_bench.py --hidden 1024 --experts 8 --repeats 5

Each way runs in a fresh subprocess (the checkpoint is written by one too: a child starts
with its parent's peak): the clock runs around the load alone, memory is the peak resident
set (``ru_maxrss``) net of the process's peak right after it built the model on the meta
device. Ways: ``from_pretrained`` (transformers converts while loading);
``surgery`` (``load_partial`` into a ``surgery.empty_init`` model: stacked experts are read
straight into their rows); ``surgery(ops)`` (the same with that fast path turned off, so the
checkpoint tensors go through transformers' ops at prepare and the values are held until
commit). The median of the repeats is quoted, with ratios against ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = ["from_pretrained", "surgery", "surgery(ops)"]


def _child(way: str, folder: str) -> None:
    import resource

    import torch
    import transformers

    import surgery
    from surgery.loading.handlers import stacked

    torch.set_num_threads(1)
    cfg = transformers.MixtralConfig.from_pretrained(folder)
    with surgery.empty_init():
        model = transformers.MixtralForCausalLM(cfg)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if way == "from_pretrained":
        model = transformers.MixtralForCausalLM.from_pretrained(folder)
    else:
        if way == "surgery(ops)":
            stacked.regions = lambda *args, **kwargs: None  # the general path
        if not surgery.load_partial(model, folder, progress=False).ok:
            raise SystemExit("surgery did not load the whole checkpoint")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(json.dumps({"s": seconds, "mb": peak}))


def _make(folder: Path, args: argparse.Namespace) -> float:
    import torch
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=1000,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()) / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="runs per way (default 3)")
    p.add_argument("--child", nargs=2, metavar=("WAY", "FOLDER"), help=argparse.SUPPRESS)
    p.add_argument("--make", metavar="FOLDER", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    if args.make:
        print(_make(Path(args.make), args))
        return 0
    sizes = ["--hidden", str(args.hidden), "--layers", str(args.layers)]
    with tempfile.TemporaryDirectory() as tmp:
        # Written by a child too: a child process starts with its parent's peak memory.
        made = subprocess.run(
            [sys.executable, __file__, "--make", tmp, *sizes, "--experts", str(args.experts)],
            capture_output=True,
            text=True,
            check=True,
        )
        millions = float(made.stdout.strip().splitlines()[-1])
        print(f"Mixtral, {millions:.1f}M params, {args.experts} experts x {args.layers} layers")
        results: dict[str, dict[str, float]] = {}
        for way in WAYS:
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", way, tmp],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            results[way] = {k: statistics.median(r[k] for r in runs) for k in ("s", "mb")}
    ref = results["from_pretrained"]
    print(f"{'way':16s} {'load s':>8s} {'x':>6s} {'peak MB':>9s} {'x':>6s}")
    for way, r in results.items():
        print(
            f"{way:16s} {r['s']:8.2f} {r['s'] / ref['s']:6.2f} "
            f"{r['mb']:9.0f} {r['mb'] / ref['mb']:6.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
