"""Models wrapped by PEFT: the base model's key names, and which keys are adapter weights.

``peft.get_peft_model`` renames every tensor of the model it wraps: a ``base_model.model.``
prefix, a ``.base_layer.`` infix in each adapted layer, and two copies of every module in
``modules_to_save`` (``<m>.original_module.*`` and ``<m>.modules_to_save.<adapter>.*``). A base
checkpoint matches none of these names. :func:`peft_view` reads the wrapper's structure (duck
typed: ``peft`` is never imported) and gives, for each base key, the model keys that hold it,
and the set of adapter keys (``lora_A``, ``lora_B``, ``lora_embedding_*``,
``lora_magnitude_vector``, the copies of inactive adapters, ...), which a base checkpoint
leaves as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..errors import KeyCollisionError
from .prefix import apply_prefix, best_rewrites, tie_error

_MARKERS = ("base_layer.", "original_module.", "modules_to_save.")


@dataclass
class PeftView:
    """The base model as seen through a PEFT wrapper.

    ``base`` maps each base key (``encoder.layer.0.attention.self.query.weight``) to the model
    keys holding it (``base_model.model.encoder.layer.0.attention.self.query.base_layer.weight``;
    for a ``modules_to_save`` module both the active copy and ``original_module``). ``adapter``
    holds the model keys of adapter weights. ``active`` names the active adapters.
    """

    base: dict[str, list[str]] = field(default_factory=dict)
    adapter: set[str] = field(default_factory=set)
    active: list[str] = field(default_factory=list)
    wrapper: str = ""


def _active(module: nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", None)
    if isinstance(active, str):
        return [active]
    try:
        return [a for a in active if isinstance(a, str)] if active is not None else []
    except TypeError:
        return []


def _is_tuner_model(module: nn.Module) -> bool:
    """PEFT's ``BaseTuner`` (``LoraModel``, ...): the wrapped model is its ``model`` child. (A
    transformers model with ``add_adapter`` also has ``peft_config``, but no ``inject_adapter``.)
    """
    return (
        hasattr(module, "peft_config")
        and callable(getattr(module, "inject_adapter", None))
        and isinstance(module._modules.get("model"), nn.Module)
    )


def _looks_wrapped(model: nn.Module, state: Mapping[str, Tensor]) -> bool:
    """A cheap first test (one scan of the key text), so unwrapped models pay ~nothing."""
    if hasattr(model, "peft_config"):
        return True
    text = "\n".join(state)
    return any(m in text for m in _MARKERS)


def peft_view(model: nn.Module, state: Mapping[str, Tensor]) -> PeftView | None:
    """The :class:`PeftView` of ``model``, or ``None`` when no PEFT wrapper is found.

    Recognised by structure: a top-level ``PeftModel`` (``peft_config`` and a ``base_model``
    child whose ``model`` child is the wrapped model), tuner layers (a ``base_layer`` child
    beside the adapter weights) and ``modules_to_save`` wrappers (``original_module`` and a
    ``modules_to_save`` dict of copies, one per adapter).
    """
    if not _looks_wrapped(model, state):
        return None
    drop: set[str] = set()  # module names whose segment the base name leaves out
    adapter_mods: set[str] = set()  # module names whose whole subtree is adapter weights
    tuners: set[str] = set()  # modules whose own tensors are adapter weights
    active: list[str] = []
    wrapper = ""
    if hasattr(model, "peft_config"):
        children = model._modules
        if isinstance(children.get("base_model"), nn.Module):  # PeftModel
            drop.add("base_model")
            wrapper = type(model).__name__
            if _is_tuner_model(children["base_model"]):
                drop.add("base_model.model")
        elif _is_tuner_model(model):  # a tuner model (LoraModel) itself
            drop.add("model")
            wrapper = type(model).__name__
    for name, mod in model.named_modules():
        children = mod._modules
        prefix = f"{name}." if name else ""
        if isinstance(children.get("original_module"), nn.Module):  # ModulesToSaveWrapper & co.
            mine = _active(mod)
            active += [a for a in mine if a not in active]
            drop.add(prefix + "original_module")
            for child, sub in children.items():
                if child == "original_module" or sub is None:
                    continue
                if child == "modules_to_save" and isinstance(sub, nn.ModuleDict):
                    drop.add(prefix + child)
                    for a in sub:
                        (drop if a in mine else adapter_mods).add(f"{prefix}{child}.{a}")
                else:
                    adapter_mods.add(prefix + child)
            tuners.add(name)
        elif isinstance(children.get("base_layer"), nn.Module):  # a tuner layer (lora.Linear)
            active += [a for a in _active(mod) if a not in active]
            drop.add(prefix + "base_layer")
            adapter_mods.update(prefix + c for c in children if c != "base_layer")
            tuners.add(name)
    if not (adapter_mods or tuners):
        return None
    view = PeftView(active=active, wrapper=wrapper or type(model).__name__)
    for key in state:
        parts = key.split(".")
        kept: list[str] = []
        path = ""
        is_adapter = False
        for seg in parts[:-1]:
            path = f"{path}.{seg}" if path else seg
            if path in adapter_mods:
                is_adapter = True
                break
            if path not in drop:
                kept.append(seg)
        else:
            # A tensor held directly by a tuner layer or wrapper (not its base) is an adapter's.
            is_adapter = path in tuners and path not in drop
        if is_adapter:
            view.adapter.add(key)
        else:
            kept.append(parts[-1])
            view.base.setdefault(".".join(kept), []).append(key)
    return view


def map_keys(
    view: PeftView,
    new_to_old: dict[str, str],
    state: Mapping[str, Tensor],
    auto_prefix: bool,
    ckpt_shape: Callable[[str], tuple[int, ...] | None],
) -> tuple[dict[str, str], tuple[str, str] | None, bool]:
    """Map checkpoint keys (``new -> old``) onto a PEFT model: through its base names, or
    directly when the checkpoint already uses the wrapper's names (a full PEFT state dict).

    Returns ``(model key -> checkpoint key, prefix rewrite, whether the base names were used)``.
    A base key held by several model keys (a ``modules_to_save`` module) maps to each. Both
    readings are scored by the pairs whose shapes agree (``ckpt_shape`` gives a checkpoint
    key's shape, ``None`` for a value that is no tensor) and the better one is taken; only
    its own prefix detection may refuse a tie. The wrapper's names are a reading of their
    own, not a prefix competing with the base model's.
    """

    def shape_of(mkey: str) -> tuple[int, ...] | None:
        t = state.get(mkey)
        return tuple(t.shape) if isinstance(t, Tensor) else None

    base_shape = {b: shape_of(keys[0]) for b, keys in view.base.items()}

    def reading(
        targets: Mapping[str, tuple[int, ...] | None],
    ) -> tuple[dict[str, str], tuple[str, str] | None, int, Exception | None]:
        def fits(new: str, mkey: str) -> bool:
            return ckpt_shape(new_to_old[new]) == targets.get(mkey)

        best = best_rewrites(new_to_old, set(targets), fits)[1] if auto_prefix else []
        rewrite = best[0][1] if best else None  # tied readings score alike: count the first
        try:
            mapped = apply_prefix(new_to_old, rewrite) if rewrite is not None else new_to_old
        except KeyCollisionError as e:
            return new_to_old, None, -1, e
        n = sum(1 for k, old in mapped.items() if k in targets and ckpt_shape(old) == targets[k])
        return mapped, rewrite, n, tie_error(best) if len(best) > 1 else None

    via, via_rewrite, n_via, via_error = reading(base_shape)
    direct, direct_rewrite, n_direct, direct_error = reading({k: shape_of(k) for k in state})
    if n_via <= n_direct:
        if direct_error is not None:
            raise direct_error
        return direct, direct_rewrite, False
    if via_error is not None:
        raise via_error
    out: dict[str, str] = {}
    for base, ckey in via.items():
        for mkey in view.base.get(base, (base,)):
            out[mkey] = ckey
    return out, via_rewrite, True


def note(view: PeftView, n_mapped: int) -> str:
    """The plan note saying a PEFT wrapper was seen and what that changed."""
    names = ", ".join(repr(a) for a in view.active) or "none"
    return (
        f"PEFT-wrapped model ({view.wrapper}, active adapter {names}): {n_mapped} checkpoint "
        "tensors mapped through the wrapper's names (base_model.model., .base_layer., "
        f"modules_to_save copy and original_module); {len(view.adapter)} adapter tensors left "
        "as they are"
    )


def meta_note(view: PeftView, state: Mapping[str, Tensor]) -> list[str]:
    """A warning for adapter weights on the ``meta`` device: they are ``initialise``d by their
    modules' ``reset_parameters()``, which is not PEFT's own init (LoRA's B is not zero)."""
    meta = [k for k in view.adapter if state[k].is_meta]
    if not meta:
        return []
    return [
        f"{len(meta)} PEFT adapter tensors are on the meta device (e.g. '{min(meta)}'): they are "
        "initialised by their modules' reset_parameters(), not by PEFT's init (LoRA's B is then "
        "not zero). Wrap the model with get_peft_model after loading, or re-initialise the "
        "adapters (peft's reset_lora_parameters) before training"
    ]


def adapter_keys(model: nn.Module, state: Mapping[str, Tensor]) -> set[str]:
    """Model keys of PEFT adapter weights (empty for a model without a PEFT wrapper)."""
    view = peft_view(model, state)
    return set() if view is None else view.adapter
