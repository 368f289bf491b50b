"""``surgery inspect``: what a checkpoint holds, as a collapsed key tree or JSON."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

import torch

from .._table import format_count, format_shape
from .._text import escape_control
from ..errors import render
from ..sources import CheckpointSource
from .advice import flag
from .options import open_checkpoint

__all__ = ["cmd_inspect"]


# Key parts beyond this depth stay joined in one node (a hostile key can have thousands).
_MAX_DEPTH = 64


def _tree(keys: dict[str, tuple[torch.Size, torch.dtype]]) -> dict:
    root: dict = {}
    for key, spec in keys.items():
        node = root
        parts = key.split(".")
        if len(parts) > _MAX_DEPTH:  # the tree is walked recursively: keep it shallow
            parts = [*parts[: _MAX_DEPTH - 1], ".".join(parts[_MAX_DEPTH - 1 :])]
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):  # a key that is also a prefix of others
                nxt = node[p] = {"": nxt}
            node = nxt
        if isinstance(node.get(parts[-1]), dict):
            node[parts[-1]][""] = spec
        else:
            node[parts[-1]] = spec
    return root


def _signature(node: Any) -> Any:
    if isinstance(node, dict):
        return tuple((k, _signature(v)) for k, v in node.items())
    return (tuple(node[0]), str(node[1]))


def _stats(node: Any) -> tuple[int, int]:
    if isinstance(node, dict):
        n = p = 0
        for v in node.values():
            a, b = _stats(v)
            n, p = n + a, p + b
        return n, p
    return 1, node[0].numel()


def _render(node: dict, depth: int, indent: str = "  ") -> list[str]:
    lines: list[str] = []
    items = list(node.items())
    i = 0
    while i < len(items):
        name, child = items[i]
        # Collapse a run of numbered siblings with identical structure: blocks.{0..11}.
        j = i
        if _is_index(name) and isinstance(child, dict):
            sig = _signature(child)
            while (
                j + 1 < len(items)
                and _is_index(items[j + 1][0])
                and isinstance(items[j + 1][1], dict)
                and _signature(items[j + 1][1]) == sig
            ):
                j += 1
        label = name if j == i else _run_label([int(k) for k, _ in items[i : j + 1]])
        if isinstance(child, dict):
            n, p = _stats(child)
            # elements, not "params": from the file alone, parameters and buffers look alike
            lines.append(
                f"{indent}{label}  [{n} tensor{'s' * (n != 1)}, {format_count(p)} elements]"
            )
            if depth > 1:
                lines += _render(child, depth - 1, indent + "  ")
        else:
            shape, dtype = child
            shown = label or "(itself)"
            lines.append(
                f"{indent}{shown}  {format_shape(shape)} {str(dtype).removeprefix('torch.')}"
            )
        i = j + 1
    return lines


def _is_index(name: str) -> bool:
    """A numbered sibling (``0``, ``12``): ASCII digits only, so ``²`` stays a plain name."""
    return name.isascii() and name.isdigit()


def _run_label(numbers: list[int]) -> str:
    lo, hi = min(numbers), max(numbers)
    span = f"{lo}..{hi}" if hi - lo + 1 == len(numbers) else ",".join(map(str, sorted(numbers)))
    return f"{{{span}}} ×{len(numbers)} identical"


def natural_key(key: str) -> tuple:
    """Sort key of a dotted name: part by part, numbers by value (``blocks.2`` before
    ``blocks.10``), a number before a word.

    Example:
        >>> sorted(["blocks.10.w", "head.w", "blocks.2.w"], key=natural_key)
        ['blocks.2.w', 'blocks.10.w', 'head.w']
    """
    return tuple((0, int(p), "") if _is_index(p) else (1, 0, p) for p in key.split("."))


def _inspect(source: CheckpointSource, depth: int) -> dict:
    specs = source.specs
    # A format that keeps no order (a safetensors header is sorted by dtype, then name) is
    # shown in natural name order; a torch file in its own, the model's state-dict order.
    shown = (
        specs if source.ordered else dict(sorted(specs.items(), key=lambda i: natural_key(i[0])))
    )
    dtypes = Counter(str(d).removeprefix("torch.") for _, d in specs.values())
    numel = sum(s.numel() for s, _ in specs.values())
    nbytes = sum(s.numel() * d.itemsize for s, d in specs.values())
    return {
        "source": source.description,
        "nesting": source.container,
        "other_entries": source.other_entries,
        "tensors": len(specs),
        "elements": numel,
        "bytes": nbytes,
        "dtypes": dict(dtypes),
        "notes": source.notes,
        "shards": source.data_files(),
        "ordered": source.ordered,
        "keys": {
            k: {"shape": list(s), "dtype": str(d).removeprefix("torch.")}
            for k, (s, d) in specs.items()
        },
        "_tree": _render(_tree(shown), depth),
    }


_BY_NAME = "keys (by name, numbers by value: the file keeps no model order):"
_SHARDS_SHOWN = 8


def _shard_lines(shards: dict[str, int]) -> list[str]:
    if not shards:
        return []
    listed = [f"{name} ({n} tensors)" for name, n in shards.items()]
    more = len(listed) - _SHARDS_SHOWN
    shown = ", ".join(listed[:_SHARDS_SHOWN]) + (f" and {more} more" if more > 0 else "")
    return [f"shards:     {len(shards)} files: {shown}"]


def cmd_inspect(args: argparse.Namespace) -> int:
    source = open_checkpoint(args)
    try:
        info = _inspect(source, args.depth)
    finally:
        source.close()
    tree = info.pop("_tree")
    if args.json:
        print(json.dumps(info, indent=2))  # ensure_ascii: control characters come out as \u001b
        return 0
    where = " -> ".join(repr(c) for c in info["nesting"]) or "top level"
    lines = [
        f"checkpoint: {args.checkpoint}",
        f"state dict: {where}"
        + (
            f" (other entries: {', '.join(info['other_entries'])})" if info["other_entries"] else ""
        ),
        f"tensors:    {info['tensors']}, {format_count(info['elements'])} elements, "
        f"{info['bytes'] / 2**20:.1f} MiB",
        "dtypes:     " + ", ".join(f"{d} ({n})" for d, n in info["dtypes"].items()),
        *_shard_lines(info["shards"]),
        *(f"note:       {render(n, flag)}" for n in info["notes"]),
        "keys:" if info["ordered"] else _BY_NAME,
        *tree,
    ]
    # One name per line at most: escaped line by line, a name cannot start a line of its own.
    print("\n".join(escape_control(line) for line in lines))
    return 0
