"""A Llama checkpoint with 8 new tokens: surgery against the fastest plain way, at LLM scale.

Run by hand (not part of the test suite); it writes its own checkpoint (random weights, no
downloads) and removes it afterwards unless ``--dir`` names a folder to keep it in:

    .venv/bin/python tests/benchmarks/scale_bench.py                      # tiny, < 1 minute
    .venv/bin/python tests/benchmarks/scale_bench.py --params 1.1e9       # TinyLlama shape, 2.2 GB
    .venv/bin/python tests/benchmarks/scale_bench.py --params 7e9 \
        --ways plain:safetensors,surgery-assign:safetensors --dir /big/disk/ckpt
                        # Llama-2-7B shape, 13.5 GB per layout, 27 GB of disk; on 24 GB of RAM
                        # run one layout's ways at a time (docs/performance.md)
    .venv/bin/python tests/benchmarks/scale_bench.py --read-speed         # raw readinto GB/s too

The checkpoint (bf16, vocabulary 32000, untied head) is written twice: by ``save_pretrained``
with 1 GB safetensors shards, and as one ``torch.save`` file. Every way loads it into the same
model with 8 more tokens (32008 rows; the old rows kept, the new ones initialised) and runs
one forward pass. Each way runs in a fresh process; the ways are interleaved (rotated each
repeat) and the median of ``--repeats`` runs is shown. Time runs from model construction to the
end of the forward pass (imports excluded); "load" is the loading step alone (for transformers
``from_pretrained`` plus ``resize_token_embeddings``); GB/s is the checkpoint's size over the
load. Peak is the process's ``ru_maxrss`` net of the resident set after the imports (pages of a
file mapping the process touched count too). Ratios are to the FASTEST plain way of the same
run. The page cache is warm (every file read once before the first run) unless ``--cold``, which
drops the files' pages (``posix_fadvise(DONTNEED)``, no root needed) before each run. Logits of
the old vocabulary are compared with the fastest plain way's: every way must give the same.

Ways (``--ways``, comma-separated; default: all): the plain ways build the model on the meta
device (accelerate's ``init_empty_weights``), take the tensors from the file mapping
(``safetensors.torch.load_file`` per shard, ``torch.load(mmap=True)``), append the new rows and
``load_state_dict(assign=True)``. A surgery way passes its ``kwargs`` (and ``--surgery-kwargs``)
to ``load_partial`` and is skipped, with a note, when the installed surgery does not take them:
a new way is one line in ``WAYS``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

OLD_VOCAB, ADDED = 32000, 8
# Llama shapes by parameter count (TinyLlama-1.1B and Llama-2-7B); --params picks the nearest.
SHAPES = {
    2e7: dict(hidden_size=128, num_hidden_layers=2, intermediate_size=344, num_attention_heads=4,
              num_key_value_heads=2),
    1.1e9: dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632,
                num_attention_heads=32, num_key_value_heads=4),
    7e9: dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
              num_attention_heads=32, num_key_value_heads=32),
}  # fmt: skip


@dataclass(frozen=True)
class Way:
    """How one way builds the model ("meta", "empty_init", "normal", "hf") and loads which
    layout ("safetensors" folder or one "pth" file); ``kwargs`` go to ``load_partial``."""

    layout: str
    build: str
    plain: bool = False
    kwargs: dict = field(default_factory=dict)
    text: str = ""


WAYS = {
    "plain:safetensors": Way("safetensors", "meta", True,
                             text="meta + load_file per shard + assign=True"),
    "plain:pth": Way("pth", "meta", True, text="meta + torch.load(mmap=True) + assign=True"),
    "transformers": Way("safetensors", "hf",
                        text="from_pretrained + resize_token_embeddings(mean_resizing=False)"),
    "surgery:safetensors": Way("safetensors", "empty_init",
                               text="empty_init + load_partial(on_mismatch=head_rows)"),
    "surgery:pth": Way("pth", "empty_init",
                       text="empty_init + load_partial(on_mismatch=head_rows)"),
    "surgery-copy:safetensors": Way("safetensors", "normal",
                                    text="model built normally + load_partial (copy path)"),
    "surgery-copy:pth": Way("pth", "normal",
                            text="model built normally + load_partial (copy path)"),
    "surgery-assign:safetensors": Way("safetensors", "empty_init", kwargs={"assign": True},
                                      text="empty_init + load_partial(assign=True)"),
    "surgery-assign:pth": Way("pth", "empty_init", kwargs={"assign": True},
                              text="empty_init + load_partial(assign=True)"),
}  # fmt: skip


# --------------------------------------------------------------------------- the checkpoint


def _config(params: float, vocab: int):
    from transformers import LlamaConfig

    shape = SHAPES[min(SHAPES, key=lambda p: abs(math.log(p / params)))]
    return LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **shape)


def _make(folder: Path, params: float) -> None:
    """Write the checkpoint: random bf16 weights (norms 1), safetensors shards and one .pth."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(_config(params, OLD_VOCAB))
    torch.set_default_dtype(torch.float32)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0, 0.02)
    model.save_pretrained(folder / "hf", max_shard_size="1GB")
    torch.save(model.state_dict(), folder / "model.pth")
    (folder / "done.json").write_text(json.dumps({"params": params}))


def _files(folder: Path, layout: str) -> list[Path]:
    if layout == "pth":
        return [folder / "model.pth"]
    return sorted((folder / "hf").glob("*.safetensors"))


# --------------------------------------------------------------------------- child process


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(name: str, folder: Path, params: float, extra: dict, out: Path) -> None:
    import resource

    import accelerate
    import safetensors.torch
    import torch
    import transformers

    import surgery

    way = WAYS[name]
    cfg = _config(params, OLD_VOCAB + ADDED)
    ids = torch.arange(1, 9)[None]
    import_mb = _rss_mb()
    t0 = time.perf_counter()
    if way.build == "hf":  # construction is inside from_pretrained: counted as load
        model = transformers.LlamaForCausalLM.from_pretrained(folder / "hf", dtype=torch.bfloat16)
        t1 = time.perf_counter()
        model.resize_token_embeddings(OLD_VOCAB + ADDED, mean_resizing=False)
        t1, t2, extra_s = t0, time.perf_counter(), time.perf_counter() - t1
    else:
        torch.set_default_dtype(torch.bfloat16)  # what from_pretrained(dtype=bf16) does
        if way.build == "meta":
            with accelerate.init_empty_weights():
                model = transformers.LlamaForCausalLM(cfg)
        elif way.build == "empty_init":
            with surgery.empty_init():
                model = transformers.LlamaForCausalLM(cfg)
        else:
            model = transformers.LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
        t1 = time.perf_counter()
        if way.plain:
            _plain_load(model, _files(folder, way.layout), safetensors.torch, torch)
            extra_s = 0.0
        else:
            extra_s = _surgery_load(model, folder, way, extra, surgery)
        t2 = time.perf_counter()
    assert not any(t.is_meta for t in model.state_dict().values()), "meta tensors left"
    model.eval()
    with torch.no_grad():  # pages of a file mapping are first touched here, not in the load
        logits = model(ids).logits[0, :, :OLD_VOCAB].float()
    t3 = time.perf_counter()
    torch.save(logits, out.with_suffix(".logits.pt"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "total_s": t3 - t0,
        "construct_s": t1 - t0,
        "load_s": t2 - t1,
        "forward_s": t3 - t2,
        "extra_s": extra_s,  # resize_token_embeddings, or the adapter's share of the load
        "peak_net_mb": peak - import_mb,
        "import_mb": import_mb,
    }
    out.write_text(json.dumps(result))


def _plain_load(model, files: list[Path], st, torch) -> None:
    """What people write: tensors from the file mapping, new rows appended, assign=True."""
    for path in files:
        if path.suffix == ".pth":
            sd = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        else:
            sd = st.load_file(path)
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            if key in sd:
                old = sd[key]
                new = old.new_empty((OLD_VOCAB + ADDED, old.shape[1]))
                new[:OLD_VOCAB] = old
                new[OLD_VOCAB:].normal_(0, 0.02)  # Llama's _init_weights (initializer_range)
                sd[key] = new
        model.load_state_dict(sd, strict=False, assign=True)


class _Timed:
    """The adapter, timed: seconds spent in it, its notes passed through."""

    def __init__(self, adapter) -> None:
        self.adapter, self.seconds = adapter, 0.0

    def __call__(self, name, ckpt, model):
        t0 = time.perf_counter()
        try:
            return self.adapter(name, ckpt, model)
        finally:
            self.seconds += time.perf_counter() - t0

    def notes(self) -> list[str]:
        return self.adapter.notes()


def _surgery_load(model, folder: Path, way: Way, extra: dict, surgery) -> float:
    source = folder / "hf" if way.layout == "safetensors" else folder / "model.pth"
    rows = _Timed(surgery.head_rows(range(OLD_VOCAB), range(OLD_VOCAB + ADDED)))
    report = surgery.load_partial(model, source, on_mismatch=rows, **{**way.kwargs, **extra})
    adapted = {m.key for m in report.adapted}
    if adapted != {"model.embed_tokens.weight", "lm_head.weight"} or report.missing:
        raise SystemExit(f"unexpected load report:\n{report}")
    return rows.seconds


# --------------------------------------------------------------------------- parent


def _drop_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _warm(files: list[Path]) -> None:
    buf = bytearray(64 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _read_speed(folder: Path, cold: bool) -> list[str]:
    """GB/s of plain readinto of each layout's files: into fresh memory (page faults included,
    as a load into a new model pays them) and again into the same, already touched memory."""
    import torch

    lines = []
    for layout in ("safetensors", "pth"):
        files = _files(folder, layout)
        size = sum(p.stat().st_size for p in files)
        bufs = [torch.empty(p.stat().st_size, dtype=torch.uint8) for p in files]
        speeds = []
        for _ in ("fresh", "touched"):
            if cold:
                _drop_cache(files)
            t0 = time.perf_counter()
            for p, b in zip(files, bufs, strict=True):
                _read_into(p, memoryview(b.numpy()))
            speeds.append(size / 1e9 / (time.perf_counter() - t0))
        del bufs
        lines.append(
            f"readinto {layout} ({len(files)} file(s), {size / 1e9:.2f} GB): "
            f"{speeds[0]:.2f} GB/s into fresh memory, {speeds[1]:.2f} GB/s into touched"
        )
    return lines


def _read_into(path: Path, view: memoryview) -> None:
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < len(view):
            n = f.readinto(view[done : done + (1 << 30)])
            if not n:
                break
            done += n


def _machine() -> list[str]:
    import safetensors
    import torch
    import transformers

    import surgery

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rev = subprocess.run(
        ["git", "-C", str(Path(surgery.__file__).parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return [
        f"machine: {os.cpu_count()} cores, {mem:.1f} GiB RAM, {platform.platform()}",
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, safetensors {safetensors.__version__}, surgery "
        f"{getattr(surgery, '__version__', '?')} ({rev or 'no git'}, {surgery.__file__})",
    ]


def _accepted(ways: list[str], extra: dict) -> tuple[list[str], list[str]]:
    import surgery

    params = inspect.signature(surgery.load_partial).parameters
    keep, notes = [], []
    for name in ways:
        way = WAYS[name]
        wanted = {**way.kwargs, **extra} if way.build != "hf" and not way.plain else {}
        missing = [k for k in wanted if k not in params]
        if missing:
            notes.append(f"{name}: skipped, this surgery's load_partial takes no {missing}")
        else:
            keep.append(name)
    return keep, notes


def _run(name: str, folder: Path, args, work: Path, i: int) -> dict:
    way = WAYS[name]
    if args.cold:
        _drop_cache(_files(folder, way.layout))
    out = work / f"{name.replace(':', '_')}-{i}.json"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--dir",
        str(folder),
        "--params",
        str(args.params),
        "--surgery-kwargs",
        args.surgery_kwargs,
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


_FIELDS = ("total_s", "construct_s", "load_s", "forward_s", "extra_s", "peak_net_mb")


def _table(results: dict[str, list[dict]], folder: Path, work: Path) -> list[str]:
    import torch

    med = {
        n: {k: statistics.median(r[k] for r in rs) for k in _FIELDS} for n, rs in results.items()
    }
    plain = [n for n in med if WAYS[n].plain]
    best = min(plain, key=lambda n: med[n]["total_s"]) if plain else next(iter(med))
    ref = torch.load(work / f"{best.replace(':', '_')}-0.logits.pt")
    which = "the fastest plain way in this run" if plain else "no plain way was run"
    lines = [
        f"ratios to {best} ({WAYS[best].text}), {which}",
        "",
        "| way | what | construct+load+first forward | construct | load phase | load GB/s | "
        "of which adapter / resize | first forward | peak RSS net of imports | time / plain | "
        "peak / plain | logits of the old vocabulary |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, m in med.items():
        way = WAYS[n]
        size = sum(p.stat().st_size for p in _files(folder, way.layout))
        logits = torch.load(work / f"{n.replace(':', '_')}-0.logits.pt")
        same = "equal" if torch.equal(logits, ref) else f"max diff {(logits - ref).abs().max():.2g}"
        construct = "in load" if way.build == "hf" else f"{m['construct_s']:.2f} s"
        lines.append(
            f"| {n} | {way.text} | {m['total_s']:.2f} s | {construct} | {m['load_s']:.2f} s | "
            f"{size / 1e9 / m['load_s']:.2f} | {m['extra_s']:.2f} s | {m['forward_s']:.2f} s | "
            f"{m['peak_net_mb']:.0f} MB | {m['total_s'] / med[best]['total_s']:.2f} | "
            f"{m['peak_net_mb'] / med[best]['peak_net_mb']:.2f} | {same} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--params",
        type=float,
        default=2e7,
        help="model size; the nearest of 2e7 (default), 1.1e9, 7e9",
    )
    ap.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {list(WAYS)}")
    ap.add_argument("--repeats", type=int, help="runs per way (default 3; 1 for the tiny model)")
    ap.add_argument("--dir", type=Path, help="keep the checkpoint here (reused if it matches)")
    ap.add_argument("--cold", action="store_true", help="drop the files' page cache before runs")
    ap.add_argument("--read-speed", action="store_true", help="also time plain readinto")
    ap.add_argument("--surgery-kwargs", default="{}", help="JSON: more load_partial kwargs")
    ap.add_argument("--json", type=Path, help="write every run's numbers here")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    extra = json.loads(args.surgery_kwargs)
    if args.repeats is None:
        args.repeats = 1 if args.params < 1e8 else 3
    if args.child == "make":
        return _make(args.dir, args.params)
    if args.child:
        return _child(args.child, args.dir, args.params, extra, args.out)
    unknown = [w for w in args.ways.split(",") if w not in WAYS]
    if unknown:
        ap.error(f"unknown ways {unknown}; choose from {list(WAYS)}")
    ways, notes = _accepted(args.ways.split(","), extra)
    if not ways:
        ap.error("; ".join(notes))
    print(*_machine(), sep="\n")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="scale_bench_") as tmp:
        folder, work = args.dir or Path(tmp) / "ckpt", Path(tmp) / "runs"
        work.mkdir()
        _prepare(folder, args.params)
        _report_run(folder, work, ways, notes, args)


def _prepare(folder: Path, params: float) -> None:
    done = folder / "done.json"
    if done.exists() and json.loads(done.read_text()).get("params") == params:
        print(f"checkpoint: reusing {folder}")
        return
    if folder.exists() and any(folder.iterdir()) and not done.exists():
        raise SystemExit(f"--dir {folder} holds other files; name an empty or new folder")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            "make",
            "--dir",
            str(folder),
            "--params",
            str(params),
        ],
        check=True,
    )
    print(f"checkpoint: written in {time.perf_counter() - t0:.0f} s to {folder}")


def _report_run(folder: Path, work: Path, ways: list[str], notes: list[str], args) -> None:
    cfg = json.loads((folder / "hf" / "config.json").read_text())
    sizes = {
        lay: sum(p.stat().st_size for p in _files(folder, lay)) for lay in ("safetensors", "pth")
    }
    print(
        f"model: Llama hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
        f"intermediate {cfg['intermediate_size']}, {cfg['num_attention_heads']} heads, "
        f"{cfg['num_key_value_heads']} kv heads, vocab {OLD_VOCAB} -> {OLD_VOCAB + ADDED}, bf16; "
        f"safetensors {sizes['safetensors'] / 1e9:.2f} GB in "
        f"{len(_files(folder, 'safetensors'))} shard(s), .pth {sizes['pth'] / 1e9:.2f} GB"
    )
    if not args.cold:
        _warm(_files(folder, "safetensors") + _files(folder, "pth"))
    print(
        f"page cache: {'cold (posix_fadvise DONTNEED before each run)' if args.cold else 'warm'}"
        f"; median of {args.repeats}, each way in its own process, interleaved"
    )
    if args.read_speed:
        print(*_read_speed(folder, args.cold), sep="\n")
    results: dict[str, list[dict]] = {n: [] for n in ways}
    for i in range(args.repeats):
        for n in ways[i % len(ways) :] + ways[: i % len(ways)]:
            results[n].append(_run(n, folder, args, work, i))
    print("", *_table(results, folder, work), sep="\n")
    print(*notes, sep="\n")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
