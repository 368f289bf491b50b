"""atheris harness: fuzz surgery's checkpoint readers for longer than the suite allows.

Not collected by pytest. Each input is written as a ``.safetensors``, ``.pth`` or index file
(its first byte picks which) and fed to ``read_checkpoint``, ``load_partial`` and
``surgery inspect``; anything but a ``SurgeryError``, a changed model after a refusal or a
value read from outside the checkpoint's folder is a finding. Run from the repository root:

    PYTHONPATH=. python tests/fuzz/fuzz_load.py -max_total_time=3600 -rss_limit_mb=2048 \
        -timeout=10 tests/fuzz/corpus

The corpus folder is created and seeded with valid files on the first run.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import atheris
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the support package
with atheris.instrument_imports(include=["surgery"]):
    from support import OUTSIDE, check_entry_points

_KINDS = ("m.safetensors", "m.pth", "model.safetensors.index.json")


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)


def _seed(corpus: Path) -> None:
    """Valid files, one per kind, prefixed with the byte that selects their kind."""
    corpus.mkdir(parents=True, exist_ok=True)
    if any(corpus.iterdir()):
        return
    sd = Small().state_dict()
    with tempfile.TemporaryDirectory() as d:
        save_file(sd, Path(d) / "a")
        torch.save(sd, Path(d) / "b")
        files = [(Path(d) / "a").read_bytes(), (Path(d) / "b").read_bytes()]
    files.append(b'{"weight_map": {"fc.weight": "w.safetensors", "fc.bias": "w.safetensors"}}')
    for i, data in enumerate(files):
        (corpus / f"seed{i}").write_bytes(bytes([i]) + data)


def _outside_values() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        save_file(
            {k: torch.full_like(v, OUTSIDE) for k, v in Small().state_dict().items()}, Path(d) / "o"
        )
        return (Path(d) / "o").read_bytes()


def _valid_shard() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        save_file(Small().state_dict(), Path(d) / "w")
        return (Path(d) / "w").read_bytes()


_OUTSIDE = _outside_values()
_SHARD = _valid_shard()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    kind, body = _KINDS[data[0] % len(_KINDS)], data[1:]
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = Path(d) / "ckpt"
        folder.mkdir()
        (folder / "w.safetensors").write_bytes(_SHARD)
        (Path(d) / "w.safetensors").write_bytes(_OUTSIDE)
        path = folder / kind
        path.write_bytes(body)
        check_entry_points(path, Small())


def main() -> None:
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    if corpus:
        _seed(Path(corpus[0]))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
