"""The ``surgery`` command: look inside a checkpoint, or dry-run loading it into a model.

    surgery inspect CKPT [--entry E] [--depth D] [--json] [--allow-global MODULE.NAME]
    surgery diff CKPT --model SPEC [--num-classes N] [--remap REGEX=REPL] [--skip GLOB]
                 [--drop REGEX] [--on-mismatch skip|error|adapt] [--json]
    surgery match SRC_SPEC DST_SPEC --input 1,3,224,224 [--rules] [--json]
    surgery convert CKPT -o OUT --model SPEC [--source SPEC --input 1,3,224,224 | --match]
                    [--remap REGEX=REPL] [--skip GLOB] [--allow-missing GLOB] [--drop REGEX]
                    [--layout model|checkpoint] [--max-shard-size 5GB] [--json]
    python -m surgery ...          (the same command)

``diff`` exits 0 when the load would pass ``strict=True`` (nothing missing, unexpected or
mismatched; skipped keys are fine), 1 otherwise, and 2
on bad input (missing or corrupt file, unknown model spec). Nothing is downloaded: models are
built with ``empty_init`` (no random init) and given untouched, unfilled memory, so tensors the
checkpoint lacks (a ViT's ``pos_embed``) are reported missing. The current directory is
importable, as with ``python -m``: ``--model mypkg.models:build_net`` and ``--import
mypkg.models`` work from the folder holding ``mypkg``.
``inspect`` shows a torch file's keys in its own (the model's) order; a safetensors file or a
shard index keeps none, so its keys are shown by name, numbers by value (``blocks.2`` before
``blocks.10``); subtrees count elements (parameters and buffers look alike in a file).
Text from the checkpoint (key names, entry names) is printed with control characters escaped.
A refused pickle is explained from the names of the classes it holds: nothing is imported.
"""

from __future__ import annotations

from .main import main
from .models import build_model

__all__ = ["build_model", "main"]
