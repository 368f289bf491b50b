"""Time and peak memory that hostile files cost surgery, each against plain torch's way.

Run by hand (not part of the test suite):

    .venv/bin/python tests/benchmarks/hostile_bench.py
    .venv/bin/python tests/benchmarks/hostile_bench.py --surgery /path/to/other/checkout

Each case runs in a fresh subprocess with a time limit; inside it the clock and the peak
resident set (``ru_maxrss``, net of the resident set right after the imports) cover one call.
``--surgery`` puts another checkout first on ``sys.path`` (to measure the code before a fix).
Cases:

- ``optimizer zip bomb``: a 0.5 MB ``.pth`` whose pickle record inflates to 512 MB, given to
  ``restore_optimizer`` (plain: ``torch.load(weights_only=True)`` of the same file).
- ``positional alignment``: a 1.3 MB training checkpoint holding 16,000 weights and the
  positional state of an optimizer over 8,000 of them, given to ``restore_optimizer``.
- ``scheduler last_epoch 10**12``: ``restore_scheduler`` on ``{"last_epoch": 10**12}``.
- ``sparse 1 GB index``: a folder whose ``model.safetensors.index.json`` is a 1 GB sparse file
  (plain: ``json.load`` of it).
- ``deep index``: an index of 100,000 nested lists in a folder.
- ``sparse 4 TB safetensors``: a valid header for one 4 TB tensor, the data a sparse file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

PRELUDE = """
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r}) if {root!r} else None
from pathlib import Path
import torch
import surgery
folder = Path({folder!r})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
{body}
    outcome = "ok"
except surgery.SurgeryError as e:
    outcome = "SurgeryError: " + str(e).splitlines()[0][:90]
except BaseException as e:
    outcome = "CRASH " + type(e).__name__ + ": " + str(e).splitlines()[0][:80]
print(json.dumps({{"s": time.perf_counter() - t0, "mb": (resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss - base) / 1024, "outcome": outcome}}))
"""

CASES = {
    "optimizer zip bomb": (
        "m = torch.nn.Linear(2, 2)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "surgery.restore_optimizer(opt, m, folder / 'bomb.pth')",
        "torch.load(folder / 'bomb.pth', weights_only=True)",
    ),
    "positional alignment": (
        "params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(8000)]\n"
        "m = torch.nn.ParameterList(params)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "surgery.restore_optimizer(opt, m, folder / 'align.pth')",
        None,
    ),
    "scheduler last_epoch 10**12": (
        "opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)\n"
        "sched = torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda e: 0.99)\n"
        "surgery.restore_scheduler(sched, {'last_epoch': 10**12})",
        None,
    ),
    "sparse 1 GB index": (
        "surgery.read_checkpoint(folder / 'index')",
        "json.loads((folder / 'index' / 'model.safetensors.index.json').read_bytes())",
    ),
    "deep index": ("surgery.read_checkpoint(folder / 'deep')", None),
    "sparse 4 TB safetensors": ("surgery.read_checkpoint(folder / 'huge.safetensors')", None),
}


def make_files(folder: Path) -> None:
    import torch

    # The pickle record deflated: torch inflates compressed zip records too.
    torch.save({"state": {}, "param_groups": [], "pad": "a" * (512 << 20)}, folder / "plain.pth")
    with (
        zipfile.ZipFile(folder / "plain.pth") as zi,
        zipfile.ZipFile(folder / "bomb.pth", "w") as zo,
    ):
        for info in zi.infolist():
            method = zipfile.ZIP_DEFLATED if info.filename.endswith(".pkl") else zipfile.ZIP_STORED
            zo.writestr(info.filename, zi.read(info), compress_type=method, compresslevel=9)
    (folder / "plain.pth").unlink()
    weights = {f"w{i:05d}": torch.zeros(1) for i in range(16000)}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1)) for _ in range(8000)], lr=0.1)
    torch.save({"model": weights, "optimizer": opt.state_dict()}, folder / "align.pth")
    for name, content in (("index", None), ("deep", b"[" * 100_000 + b"]" * 100_000)):
        (folder / name).mkdir()
        index = folder / name / "model.safetensors.index.json"
        with open(index, "wb") as f:
            if content is None:  # 1 GB of spaces, then a valid index: a sparse file
                f.truncate(1 << 30)
                f.seek(1 << 30)
                f.write(json.dumps({"weight_map": {}}).encode())
            else:
                f.write(content)
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4 << 40]}}
    ).encode()
    with open(folder / "huge.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + (4 << 40))


def run(code: str, folder: Path, root: str, limit: float) -> str:
    body = textwrap.indent(code, "    ")
    script = PRELUDE.format(root=root, folder=str(folder), body=body)
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=limit
        )
    except subprocess.TimeoutExpired:
        return f"did not finish in {limit:.0f} s"
    try:
        r = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return "died: " + (out.stderr.strip().splitlines() or ["?"])[-1][:100]
    return f"{r['s']:8.2f} s  {r['mb']:8.0f} MB  {r['outcome']}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--surgery", default="", help="checkout to import surgery from")
    parser.add_argument("--limit", type=float, default=120.0, help="seconds per case")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--make", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make:
        make_files(Path(args.make))
        return
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        # In a child process: a child's peak memory starts from its parent's at fork time.
        subprocess.run([sys.executable, __file__, "--make", d], check=True)
        for name in args.cases:
            code, plain = CASES[name]
            print(f"{name:30s} surgery {run(code, folder, args.surgery, args.limit)}")
            if plain:
                print(f"{'':30s} plain   {run(plain, folder, args.surgery, args.limit)}")


if __name__ == "__main__":
    main()
