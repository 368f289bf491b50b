"""Load time and peak memory: surgery against the plain PyTorch ways, measured in one run.

Run by hand (not part of the test suite):

    .venv/bin/python tests/benchmarks/load_bench.py                 # resnet50 + ViT-L/16
    .venv/bin/python tests/benchmarks/load_bench.py --models resnet50 --repeats 5

Each case runs in a fresh subprocess. Inside it the clock runs from model construction to the
end of one forward pass (imports excluded); memory is the process's peak resident set
(``ru_maxrss``), also shown net of the resident set right after the imports. Each case is
repeated and the median quoted. Checkpoints hold random weights written to a temp folder:
``.pth`` in a DDP-style training checkpoint (``{'epoch', 'state_dict': {'module.*'},
'optimizer'}``) and flat ``.safetensors``; every way loads them into a model whose head is
replaced by a 10-class one. A last section times ``load_partial(..., dry_run=True)`` planning
on 100,000 keys.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"resnet50": "resnet50", "vit_l16": "vit_large_patch16_224"}
HEADS = {"resnet50": "fc.", "vit_l16": "head."}

# (way, formats it applies to)
WAYS = [
    ("torch.load", ("pth",)),
    ("torch.load(mmap)", ("pth",)),
    ("safetensors.load_file", ("safetensors",)),
    ("timm.load_checkpoint", ("pth", "safetensors")),
    ("surgery", ("pth", "safetensors")),
    ("surgery(meta)", ("pth", "safetensors")),
]
PLAIN = {"torch.load", "torch.load(mmap)", "safetensors.load_file", "timm.load_checkpoint"}


# --------------------------------------------------------------------------- child process


def _child(model_key: str, fmt: str, way: str, path: str) -> None:
    import resource

    import timm
    import torch

    import surgery

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    name, head = MODELS[model_key], HEADS[model_key]
    x = torch.randn(1, 3, 224, 224)
    import_mb = rss_mb()

    def clean(sd: dict) -> dict:
        """What people write by hand: strip 'module.', drop the old head."""
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        return {k: v for k, v in sd.items() if not k.startswith(head)}

    t0 = time.perf_counter()
    if way == "surgery(meta)":
        with surgery.empty_init():
            model = timm.create_model(name, pretrained=False, num_classes=10)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=10)
    if way == "torch.load":
        sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(clean(sd), strict=False)
    elif way == "torch.load(mmap)":
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
        model.load_state_dict(clean(sd), strict=False)
    elif way == "safetensors.load_file":
        from safetensors.torch import load_file

        model.load_state_dict(clean(load_file(path)), strict=False)
    elif way == "timm.load_checkpoint":
        from timm.models import load_checkpoint

        load_checkpoint(model, path, strict=False, filter_fn=lambda sd, m: clean(sd))
    else:
        report = surgery.load_partial(model, path)
        assert {m.key for m in report.mismatched} == {head + "weight", head + "bias"}, report
    sd = None
    model.eval()
    with torch.no_grad():
        model(x)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"time_s": elapsed, "peak_mb": rss_mb(), "import_mb": import_mb}))


# --------------------------------------------------------------------------- planning


def _planning(n_keys: int = 100_000, repeats: int = 5) -> dict:
    import torch
    from torch import nn

    import surgery

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(2, 2)
            self.fc2 = nn.Linear(2, 2)

    model = nn.Module()
    model.blocks = nn.ModuleList(Block() for _ in range(n_keys // 4))
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    sd = {"epoch": 1, "state_dict": sd}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        report = surgery.load_partial(model, sd, dry_run=True)
        times.append(time.perf_counter() - t0)
    assert report.tensors_loaded == n_keys and report.prefix == ("module.", "")
    gc.disable()  # as inside load_partial, so the share below is comparable
    t0 = time.perf_counter()
    model.state_dict(keep_vars=True)
    state_dict_s = time.perf_counter() - t0
    gc.enable()
    del torch
    return {"keys": n_keys, "median_s": statistics.median(times), "state_dict_s": state_dict_s}


# --------------------------------------------------------------------------- parent


def _prepare(model_key: str, folder: Path) -> dict[str, str]:
    import timm
    import torch
    from safetensors.torch import save_file

    model = timm.create_model(MODELS[model_key], pretrained=False)
    sd = model.state_dict()
    pth = folder / f"{model_key}.pth"
    opt = {"state": {}, "param_groups": [{"lr": 0.1, "params": list(range(len(sd)))}]}
    torch.save(
        {"epoch": 90, "state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer": opt},
        pth,
    )
    st = folder / f"{model_key}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    return {"pth": str(pth), "safetensors": str(st)}


def _subprocess(*args: str) -> dict:
    """Run this script with ``args`` in a fresh interpreter; its last stdout line is JSON.

    The parent never imports torch or holds weights: Linux carries ``ru_maxrss`` across
    ``exec``, so a big parent would inflate every child's peak.
    """
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_case(model_key: str, fmt: str, way: str, path: str) -> dict:
    return _subprocess("--child", model_key, fmt, way, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="load_bench.json", help="where to write results")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--planning", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return {}
    if args.prepare:
        print(json.dumps(_prepare(args.prepare[0], Path(args.prepare[1]))))
        return {}
    if args.planning:
        print(json.dumps(_planning()))
        return {}
    print(f"args: {vars(args)}")
    results: dict = {"cases": [], "ratios": {}, "planning": None}
    with tempfile.TemporaryDirectory() as tmp:
        for model_key in args.models:
            paths = _subprocess("--prepare", model_key, tmp)
            for fmt in ("pth", "safetensors"):
                rows = {}
                for way, fmts in WAYS:
                    if fmt not in fmts:
                        continue
                    runs = [_run_case(model_key, fmt, way, paths[fmt]) for _ in range(args.repeats)]
                    row = {
                        "model": model_key,
                        "format": fmt,
                        "way": way,
                        "time_s": statistics.median(r["time_s"] for r in runs),
                        "peak_mb": statistics.median(r["peak_mb"] for r in runs),
                        "net_mb": statistics.median(r["peak_mb"] - r["import_mb"] for r in runs),
                    }
                    rows[way] = row
                    results["cases"].append(row)
                    print(
                        f"  {model_key:9s} {fmt:12s} {way:22s} {row['time_s']:7.2f} s "
                        f"{row['peak_mb']:8.0f} MB peak {row['net_mb']:8.0f} MB net",
                        flush=True,
                    )
                plain = [r for w, r in rows.items() if w in PLAIN]
                best_t = min(plain, key=lambda r: r["time_s"])
                best_m = min(plain, key=lambda r: r["peak_mb"])
                base = rows.get("torch.load") or rows["safetensors.load_file"]
                s, sm = rows["surgery"], rows["surgery(meta)"]
                results["ratios"][f"{model_key}/{fmt}"] = {
                    "plain_way": base["way"],
                    "best_plain_time_way": best_t["way"],
                    "surgery_time_vs_best_plain": s["time_s"] / best_t["time_s"],
                    "surgery_peak_vs_plain": s["peak_mb"] / base["peak_mb"],
                    "surgery_net_peak_vs_plain": s["net_mb"] / base["net_mb"],
                    "surgery_peak_vs_lowest_plain": s["peak_mb"] / best_m["peak_mb"],
                    "meta_speedup_vs_plain": base["time_s"] / sm["time_s"],
                    "meta_speedup_vs_best_plain": best_t["time_s"] / sm["time_s"],
                    "meta_peak_vs_plain": sm["peak_mb"] / base["peak_mb"],
                }
    results["planning"] = _subprocess("--planning")
    _print(results)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return results


def _print(results: dict) -> None:
    print("\nway                    model     format        time s   peak MB   net MB")
    for r in results["cases"]:
        print(
            f"{r['way']:22s} {r['model']:9s} {r['format']:12s} {r['time_s']:7.2f} "
            f"{r['peak_mb']:9.0f} {r['net_mb']:8.0f}"
        )
    print(
        "\nratios (plain way = torch.load for .pth, safetensors.load_file for .safetensors;"
        " targets: time <= 1.05, peak <= 0.6, meta speed-up >= 2)"
    )
    for case, q in results["ratios"].items():
        print(
            f"  {case:22s} surgery time / best plain ({q['best_plain_time_way']}) "
            f"{q['surgery_time_vs_best_plain']:.2f}   peak / plain {q['surgery_peak_vs_plain']:.2f}"
            f" (net {q['surgery_net_peak_vs_plain']:.2f})   meta speed-up vs plain "
            f"{q['meta_speedup_vs_plain']:.1f}x (vs best {q['meta_speedup_vs_best_plain']:.1f}x)"
        )
    p = results["planning"]
    print(
        f"\nplanning {p['keys']:,} keys (dry run, DDP prefix detected): {p['median_s']:.3f} s "
        f"median (of which model.state_dict(): {p['state_dict_s']:.3f} s)"
    )


if __name__ == "__main__":
    main()
