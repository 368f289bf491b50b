"""Each model as a sequence of entries (a layer's own tensors, or one free parameter), in the
order a forward pass first uses them, or in registration order."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import SurgeryError, UsageError

__all__ = ["Entry", "checkpoint_entries", "module_entries", "run_eval", "traced_entries"]


@dataclass
class Entry:
    """One step of a model's sequence: a layer's own tensors, or one free parameter."""

    name: str  # module path, or the key of a free parameter
    kind: str  # class name shown in reasons
    family: str | None  # None: compare shapes only (checkpoint mode)
    keys: list[str]
    shapes: dict[str, tuple[int, ...]]  # canonical (Conv1D weights transposed)
    transposed: set[str] = field(default_factory=set)
    traced: bool = True

    def signature(self) -> tuple:
        return (self.family, tuple(sorted(self.shapes.values())))


def _family(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
        return "linear"
    if isinstance(mod, nn.MultiheadAttention):
        return "attention"
    if isinstance(mod, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    name = type(mod).__name__.lower()
    for word, fam in (("norm", "norm"), ("conv", "conv"), ("linear", "linear")):
        if word in name:
            return fam
    return None  # a container or custom module: each of its own tensors stands alone


def module_entries(model: nn.Module) -> tuple[list[Entry], dict[str, Tensor]]:
    """Entries in registration order, and every persistent state key -> its tensor."""
    state = model.state_dict(keep_vars=True)
    entries: list[Entry] = []
    for mname, mod in model.named_modules(remove_duplicate=False):
        own = [
            (n, t)
            for n, t in [*mod._parameters.items(), *mod._buffers.items()]
            if t is not None and n not in mod._non_persistent_buffers_set
        ]
        own = [(n, t) for n, t in own if (f"{mname}.{n}" if mname else n) in state]
        if not own:
            continue
        fam = _family(mod)
        kind = type(mod).__name__
        if fam is None:
            for n, t in own:
                key = f"{mname}.{n}" if mname else n
                entries.append(Entry(key, "parameter", "param", [key], {key: tuple(t.shape)}))
            continue
        keys, shapes, transposed = [], {}, set()
        for n, t in own:
            key = f"{mname}.{n}" if mname else n
            shape = tuple(t.shape)
            if kind == "Conv1D" and n == "weight" and len(shape) == 2:
                shape, _ = shape[::-1], transposed.add(key)
            keys.append(key)
            shapes[key] = shape
        entries.append(Entry(mname or "(model)", kind, fam, keys, shapes, transposed))
    return entries, state


def checkpoint_entries(shapes: Mapping[str, tuple[int, ...]]) -> list[Entry]:
    """Keys grouped by their module path, in file (registration) order."""
    groups: dict[str, list[str]] = {}
    for key in shapes:
        groups.setdefault(key.rpartition(".")[0], []).append(key)
    return [
        Entry(mod or "(model)", "?", None, keys, {k: tuple(shapes[k]) for k in keys})
        for mod, keys in groups.items()
    ]


class _FirstUse(TorchFunctionMode):
    """Records, in order, the first time each watched tensor is passed to a torch function.

    With ``to_meta`` every real tensor argument is replaced by a meta copy before the call,
    so a model whose parameters are on the meta device runs without memory or compute, and a
    real buffer is never modified.
    """

    def __init__(self, watched: set[int], to_meta: bool) -> None:
        super().__init__()
        self.watched = watched
        self.to_meta = to_meta
        self.order: dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        for t in _tensors((args, kwargs)):
            i = id(t)
            if i in self.watched and i not in self.order:
                self.order[i] = len(self.order)
        if self.to_meta:
            args, kwargs = _to_meta((args, kwargs))
        return func(*args, **kwargs)


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _to_meta(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj if obj.is_meta else obj.detach().to("meta")
    if isinstance(obj, tuple):
        return tuple(_to_meta(x) for x in obj)
    if isinstance(obj, list):
        return [_to_meta(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_meta(v) for k, v in obj.items()}
    return obj


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def run_eval(model: nn.Module, example_input: Any, mode: TorchFunctionMode | None) -> Any:
    """Run the model in eval mode without gradients; training flags are restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if mode is None:
                return _call(model, example_input)
            with mode:
                return _call(model, example_input)
    finally:
        for m, flag in flags:
            m.training = flag


def traced_entries(model: nn.Module, example_input: Any, which: str) -> list[Entry]:
    """Entries in the order the forward pass first uses them; unused ones follow."""
    entries, state = module_entries(model)
    watched = {id(t) for t in state.values()}
    # On the meta device first: no compute, no buffer changes. A model with real weights whose
    # forward reads tensor values (data-dependent shapes, .item()) is run for real instead.
    has_meta = any(t.is_meta for t in state.values())
    error: Exception | None = None
    for to_meta in (True,) if has_meta else (True, False):
        mode = _FirstUse(watched, to_meta)
        try:
            run_eval(model, example_input, mode)
            break
        except SurgeryError:
            raise
        except Exception as e:
            error = e
    else:
        assert error is not None
        raise UsageError(
            f"running the {which} {type(model).__name__} on the example input failed: "
            f"{type(error).__name__}: {error}. Pass an input the model accepts (a tensor, a "
            "tuple of positional arguments or a dict of keyword arguments)"
            + (
                "; the model is on the meta device: build it on CPU if its forward reads "
                "tensor values."
                if has_meta
                else "."
            )
        ) from None
    never = len(mode.order) + len(entries)

    def first(i_entry: tuple[int, Entry]) -> tuple[int, int]:
        i, e = i_entry
        pos = min((mode.order.get(id(state[k]), never) for k in e.keys), default=never)
        e.traced = pos < never
        return (pos, i)

    return [e for _, e in sorted(enumerate(entries), key=first)]
