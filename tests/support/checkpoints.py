"""A state dict written as each kind of checkpoint people have, by the library that writes it
in the wild: torch (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, a training file,
Lightning, the legacy format), safetensors (one file, shards with an index, a folder), sharded
torch files and a ``torch.distributed.checkpoint`` folder."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn

__all__ = ["FORMS", "PREFIXES", "save_as", "save_dcp"]

# Each form save_as writes, and the prefix load_partial finds in it (None: no prefix).
PREFIXES: dict[str, tuple[str, str] | None] = {
    "ddp": ("module.", ""),
    "compile": ("_orig_mod.", ""),
    "nested": None,
    "lightning": ("model.", ""),
    "safetensors": None,
    "sharded_safetensors": None,
    "sharded_bin": None,
    "folder": None,
    "legacy": None,
    "dcp": None,
}
FORMS = tuple(PREFIXES)


def save_dcp(sd: dict, path: Path) -> None:
    """``dcp.save`` in this process alone (``no_dist``), its warnings kept quiet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=path, no_dist=True)


def save_as(form: str, sd: dict[str, torch.Tensor], folder: Path) -> str:
    """Write ``sd`` into ``folder`` as ``form`` (one of :data:`FORMS`); the path to load."""
    if form in _TORCH_FORMS:
        path = folder / _TORCH_FORMS[form][0]
        torch.save(_TORCH_FORMS[form][1](sd), path)
    elif form == "safetensors":
        path = folder / "model.safetensors"
        save_file(sd, str(path))
    elif form == "sharded_safetensors":
        path = _sharded(sd, folder, "model-0000{}-of-00002.safetensors", "model.safetensors")
    elif form == "sharded_bin":
        path = _sharded(sd, folder, "pytorch_model-0000{}-of-00002.bin", "pytorch_model.bin")
    elif form == "folder":
        save_file(sd, str(folder / "model.safetensors"))
        path = folder
    elif form == "legacy":
        path = folder / "old.pth"
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif form == "dcp":
        path = folder / "dcp"
        save_dcp(dict(sd), path)
    else:
        raise AssertionError(f"unknown checkpoint form {form!r}; one of {FORMS}")
    return str(path)


def _training_file(sd: dict) -> dict:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    return {"epoch": 12, "state_dict": sd, "optimizer": opt.state_dict()}


def _lightning(sd: dict) -> dict:
    return {
        "epoch": 3,
        "global_step": 100,
        "state_dict": {"model." + k: v for k, v in sd.items()},
        "optimizer_states": [{"state": {}, "param_groups": []}],
        "hyper_parameters": {"lr": 0.1},
    }


_TORCH_FORMS = {
    "ddp": ("ddp.pth", lambda sd: {"module." + k: v for k, v in sd.items()}),
    "compile": ("compiled.pt", lambda sd: {"_orig_mod." + k: v for k, v in sd.items()}),
    "nested": ("train.pth.tar", _training_file),
    "lightning": ("epoch=3.ckpt", _lightning),
}


def _sharded(sd: dict, folder: Path, shard_name: str, index_name: str) -> Path:
    """Two shards (the first half of the keys, the rest) and the index naming them, as
    ``save_pretrained`` lays them out."""
    keys = list(sd)
    half = len(keys) // 2
    weight_map: dict[str, str] = {}
    for i, ks in enumerate((keys[:half], keys[half:])):
        name = shard_name.format(i + 1)
        part = {k: sd[k] for k in ks}
        if name.endswith(".safetensors"):
            save_file(part, str(folder / name))
        else:
            torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(ks, name))
    path = folder / f"{index_name}.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path
