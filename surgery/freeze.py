"""Freeze and unfreeze parts of a model, with BatchNorm statistics that really stay fixed.

Example:
    >>> import torchvision, surgery
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> summary = surgery.freeze(model, "conv1", "bn1", "layer1", "layer2", "layer3")
    >>> model = model.train()  # the frozen BatchNorm layers stay in eval mode
    >>> print(surgery.trainable_summary(model))  # doctest: +SKIP

BatchNorm handling (``bn=``), for every BatchNorm layer (any ``_BatchNorm``, ``SyncBatchNorm``
too) whose parameters are all frozen by the call:

* ``"eval"``: the layer normalises with its running statistics and never updates them, even
  after ``model.train()``: its class becomes a subclass of its own whose ``train()`` keeps it
  in eval, so ``layer.training`` reads ``False`` and no forward hook is involved
  (``torch.compile`` sees a plain BatchNorm). ``isinstance`` checks still hold; the hold
  survives ``copy.deepcopy`` and pickling, and :func:`unfreeze` restores the original class.
* ``"frozen"``: layers of type exactly ``nn.BatchNorm2d`` that track running statistics are
  replaced by torchvision's ``FrozenBatchNorm2d`` with the same weight, bias, statistics and
  eps; other BatchNorm layers (1-D, 3-D, ``SyncBatchNorm``, subclasses such as timm's
  ``BatchNormAct2d``) get ``"eval"`` instead. :func:`unfreeze` swaps them back.
* ``"train"``: BatchNorm layers are left alone (their statistics keep moving in train mode).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.lr_scheduler import LRScheduler
from torchvision.ops.misc import FrozenBatchNorm2d

from ._args import require_module, require_optimizer, written_model
from ._table import _Table, format_count, format_percent
from .errors import UsageError
from .keys.select import ModelIndex, Selection, Selector, describe_selector, select
from .optim import add_param_groups

__all__ = [
    "FreezeSummary",
    "TrainableSummary",
    "freeze",
    "freeze_except",
    "trainable_summary",
    "unfreeze",
]

_FREEZE_BN = ("eval", "frozen", "train")
_UNFREEZE_BN = ("train", "eval")
_EVAL_MARK = "_surgery_bn_eval"  # set on a BatchNorm held in eval mode
_SWAP_MARK = "_surgery_bn_config"  # set on a FrozenBatchNorm2d that replaced a BatchNorm2d


# --------------------------------------------------------------------------- summaries


@dataclass(repr=False)
class FreezeSummary(_Table):
    """What :func:`freeze`, :func:`unfreeze` and :func:`freeze_except` did.

    ``changed_*`` count the parameters whose ``requires_grad`` this call flipped; the
    ``trainable_*``/``total_*`` fields describe the whole model after the call.
    """

    action: str
    model_name: str
    frozen_tensors: int
    frozen_params: int
    unfrozen_tensors: int
    unfrozen_params: int
    trainable_tensors: int
    trainable_params: int
    total_tensors: int
    total_params: int
    bn_eval: list[str] = field(default_factory=list)
    bn_frozen: list[str] = field(default_factory=list)
    bn_released: list[str] = field(default_factory=list)
    optimizer_groups: list[str] = field(default_factory=list)
    optimizer_tensors: int = 0
    optimizer_skipped: int = 0

    _header = ("", "tensors", "params")
    _numeric = (1, 2)
    _text_rows = False  # str(): the sentence and its notes; the notebook view adds the table

    def _caption(self) -> str:
        changed = []
        if self.frozen_tensors or self.action != "unfreeze":
            changed.append(
                f"{self.frozen_tensors} tensors ({format_count(self.frozen_params)} params) frozen"
            )
        if self.unfrozen_tensors or self.action == "unfreeze":
            changed.append(
                f"{self.unfrozen_tensors} tensors ({format_count(self.unfrozen_params)} params) "
                "unfrozen"
            )
        return (
            f"{self.action} {self.model_name}: {', '.join(changed)}; trainable "
            f"{format_count(self.trainable_params)} of {format_count(self.total_params)} params "
            f"({format_percent(self.trainable_params, self.total_params)}%)."
        )

    def _notes(self) -> list[str]:
        lines = []
        bn = []
        if self.bn_eval:
            bn.append(f"{len(self.bn_eval)} held in eval mode (running statistics fixed)")
        if self.bn_frozen:
            bn.append(f"{len(self.bn_frozen)} replaced by FrozenBatchNorm2d")
        if self.bn_released:
            bn.append(f"{len(self.bn_released)} back to normal train/eval behaviour")
        if bn:
            lines.append(f"BatchNorm: {'; '.join(bn)}.")
        if self.optimizer_groups:
            names = ", ".join(repr(n) for n in self.optimizer_groups)
            lines.append(f"optimizer: added {self.optimizer_tensors} tensors in group(s) {names}.")
        elif self.optimizer_skipped:
            lines.append(
                f"optimizer: nothing added; all {self.optimizer_skipped} tensors are already in a "
                "group."
            )
        return lines

    def _rows(self) -> list[list[object]]:
        return [
            ["trainable", self.trainable_tensors, format_count(self.trainable_params)],
            [
                "frozen",
                self.total_tensors - self.trainable_tensors,
                format_count(self.total_params - self.trainable_params),
            ],
            ["total", self.total_tensors, format_count(self.total_params)],
        ]


@dataclass
class TrainableRow:
    module: str
    type: str
    params: int
    trainable: int
    bn_fixed: int


@dataclass(repr=False)
class TrainableSummary(_Table):
    """Per top-level module: parameters in total and trainable, and BatchNorm layers held fixed."""

    model_name: str
    rows: list[TrainableRow]

    _header = ("module", "type", "params", "trainable", "%", "BN fixed")
    _numeric = (2, 3, 4, 5)

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def trainable_params(self) -> int:
        return sum(r.trainable for r in self.rows)

    def _rows(self) -> list[list[object]]:
        cells: list[list[object]] = []
        for r in self.rows:
            n, t = format_count(r.params), format_count(r.trainable)
            cells.append(
                [r.module, r.type, n, t, format_percent(r.trainable, r.params), r.bn_fixed or ""]
            )
        total, train = self.total_params, self.trainable_params
        fixed = sum(r.bn_fixed for r in self.rows)
        cells.append(
            [
                "total",
                "",
                format_count(total),
                format_count(train),
                format_percent(train, total),
                fixed or "",
            ]
        )
        return cells

    def _caption(self) -> str:
        return (
            f"{self.model_name}: {format_count(self.trainable_params)} of "
            f"{format_count(self.total_params)} params trainable"
        )


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Parameters in total and trainable per top-level module (shared ones counted once).

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> _ = freeze_except(model, "fc")
        >>> s = trainable_summary(model)
        >>> s.trainable_params
        5130
    """
    require_module(model, "trainable_summary")
    model = written_model(model)  # a compiled model: the names as written
    children = dict(model.named_children())
    params: dict[str, int] = dict.fromkeys(children, 0)
    trainable: dict[str, int] = dict.fromkeys(children, 0)
    own = "(model)"
    for name, p in model.named_parameters():
        top = name.split(".", 1)[0] if "." in name else own
        params[top] = params.get(top, 0) + p.numel()
        trainable[top] = trainable.get(top, 0) + (p.numel() if p.requires_grad else 0)
    rows = []
    if own in params:
        rows.append(TrainableRow(own, type(model).__name__, params[own], trainable[own], 0))
    for name, child in children.items():
        if not params[name]:
            continue  # relu, pooling: nothing to train or freeze
        fixed = sum(1 for m in child.modules() if _is_fixed_bn(m))
        rows.append(TrainableRow(name, type(child).__name__, params[name], trainable[name], fixed))
    return TrainableSummary(type(model).__name__, rows)


# --------------------------------------------------------------------------- BatchNorm


class _HeldEval(nn.Module):
    """Mixed in before a BatchNorm class: the layer stays in eval mode whatever ``train()`` says.

    :func:`_hold_eval` swaps a layer's class to ``_held_class(type(layer))``, a subclass of its
    own class, so ``isinstance`` checks still hold and ``forward`` is the original one (no
    hook: ``torch.compile`` sees a plain module). ``__reduce_ex__`` rebuilds the class from its
    base, so ``copy.deepcopy`` and pickling keep the layer held; :func:`_release_eval` swaps the
    base class back.
    """

    _surgery_base: type[nn.Module]

    def train(self, mode: bool = True) -> _HeldEval:
        return super().train(False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, held in eval by surgery.freeze"

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_new_held, (self._surgery_base,), self.__dict__)


_HELD: dict[type[nn.Module], type[nn.Module]] = {}


def _held_class(base: type[nn.Module]) -> type[nn.Module]:
    """The held-in-eval subclass of ``base`` (one per base class, created on first use)."""
    if base not in _HELD:
        attrs = {"_surgery_base": base, "__module__": __name__, "__qualname__": base.__name__}
        _HELD[base] = type(base.__name__, (_HeldEval, base), attrs)
    return _HELD[base]


def _new_held(base: type[nn.Module]) -> nn.Module:
    """Unpickling / deepcopy: an empty instance of the held subclass of ``base``."""
    cls = _held_class(base)
    return cls.__new__(cls)


def _bn_eval_pre_hook(module: nn.Module, args: Any) -> None:
    """surgery 0.1 held BatchNorms with this hook; kept so models pickled then still load."""
    if getattr(module, _EVAL_MARK, False):
        module.training = False


def _is_fixed_bn(m: nn.Module) -> bool:
    return isinstance(m, (FrozenBatchNorm2d, _HeldEval)) or bool(getattr(m, _EVAL_MARK, False))


def _hold_eval(bn: nn.Module) -> None:
    _release_eval(bn, False)  # a 0.1 hook, if any, gives way to the class swap
    bn.__class__ = _held_class(type(bn))
    bn.train(False)


def _release_eval(bn: nn.Module, training: bool) -> bool:
    """Undo :func:`_hold_eval` (or 0.1's hook); whether there was anything to undo."""
    held = isinstance(bn, _HeldEval) or bool(getattr(bn, _EVAL_MARK, False))
    if isinstance(bn, _HeldEval):
        bn.__class__ = bn._surgery_base
    if hasattr(bn, _EVAL_MARK):
        delattr(bn, _EVAL_MARK)
    hooks = bn._forward_pre_hooks
    for key in [k for k, h in hooks.items() if h is _bn_eval_pre_hook]:
        del hooks[key]
    if held:
        bn.train(training)
    return held


def _to_frozen(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    stats = bn.running_mean
    new = FrozenBatchNorm2d(bn.num_features, eps=bn.eps).to(device=stats.device, dtype=stats.dtype)
    with torch.no_grad():
        if bn.weight is not None:
            new.weight.copy_(bn.weight)
        if bn.bias is not None:
            new.bias.copy_(bn.bias)
        new.running_mean.copy_(bn.running_mean)
        new.running_var.copy_(bn.running_var)
    tracked = bn.num_batches_tracked
    config = {"momentum": bn.momentum, "affine": bn.affine, "num_batches_tracked": tracked}
    setattr(new, _SWAP_MARK, config)
    return new


def _from_frozen(frozen: FrozenBatchNorm2d, training: bool) -> nn.BatchNorm2d:
    config = getattr(frozen, _SWAP_MARK)
    stats = frozen.running_mean
    bn = nn.BatchNorm2d(
        stats.numel(), eps=frozen.eps, momentum=config["momentum"], affine=config["affine"]
    ).to(device=stats.device, dtype=stats.dtype)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(frozen.weight)
            bn.bias.copy_(frozen.bias)
        bn.running_mean.copy_(frozen.running_mean)
        bn.running_var.copy_(frozen.running_var)
        if config["num_batches_tracked"] is not None:
            bn.num_batches_tracked.copy_(config["num_batches_tracked"])
    return bn.train(training)


def _replace(model: nn.Module, index: ModelIndex, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered (every alias)."""
    for name, m in index.modules:
        if m is old:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, new)


def _touched_bns(index: ModelIndex, touched: set[str]) -> list[tuple[str, nn.Module]]:
    """BatchNorm-like modules (once each) whose name is in ``touched``."""
    out, seen = [], set()
    for name, m in index.modules:
        if name in touched and id(m) not in seen and isinstance(m, (_BatchNorm, FrozenBatchNorm2d)):
            seen.add(id(m))
            out.append((name, m))
    return out


def _apply_bn_freeze(
    model: nn.Module, index: ModelIndex, touched: set[str], bn: str, summary: FreezeSummary
) -> None:
    """Hold in eval / swap the touched BatchNorm layers whose parameters are all frozen now."""
    if bn == "train":
        return
    for name, m in _touched_bns(index, touched):
        if not isinstance(m, _BatchNorm) or any(p.requires_grad for p in m.parameters()):
            continue
        base = m._surgery_base if isinstance(m, _HeldEval) else type(m)
        swappable = base is nn.BatchNorm2d and m.running_mean is not None
        if bn == "frozen" and swappable:
            _release_eval(m, False)
            _replace(model, index, m, _to_frozen(m))
            summary.bn_frozen.append(name)
        else:
            if not isinstance(m, _HeldEval):
                summary.bn_eval.append(name)
            _hold_eval(m)


def _apply_bn_unfreeze(
    model: nn.Module, index: ModelIndex, touched: set[str], bn: str, summary: FreezeSummary
) -> None:
    """Release (``"train"``) or hold (``"eval"``) the touched BatchNorm layers; swap ours back."""
    for name, m in _touched_bns(index, touched):
        if isinstance(m, FrozenBatchNorm2d):
            if not hasattr(m, _SWAP_MARK):
                continue  # part of the architecture, not ours to undo
            new = _from_frozen(m, model.training)
            _replace(model, index, m, new)
            m = new
            if bn == "train":
                summary.bn_released.append(name)
        if bn == "eval":
            if not isinstance(m, _HeldEval):
                summary.bn_eval.append(name)
            _hold_eval(m)
        elif _release_eval(m, model.training) and name not in summary.bn_released:
            summary.bn_released.append(name)


# --------------------------------------------------------------------------- public API


def _checked(
    model: object,
    action: str,
    selectors: tuple[Selector, ...],
    bn: object,
    allowed: tuple[str, ...],
    optimizer: object = None,
) -> nn.Module:
    """The arguments of ``freeze``/``freeze_except``/``unfreeze`` checked, in the order their
    errors are raised; the model with the names as written (a compiled model's own)."""
    require_module(model, action)
    model = written_model(model)
    if optimizer is not None:
        require_optimizer(optimizer, action)
    _check_bn(bn, allowed, action)
    _check_selectors(selectors, action)
    return model


def _check_bn(bn: object, allowed: tuple[str, ...], action: str) -> None:
    if bn not in allowed:
        raise UsageError(
            f"{action}: bn={bn!r} is not one of {', '.join(map(repr, allowed))}. 'eval' holds "
            "frozen BatchNorm statistics fixed, 'frozen' swaps in FrozenBatchNorm2d, 'train' "
            "leaves BatchNorm alone."
        )


def _check_selectors(selectors: tuple[Selector, ...], action: str) -> None:
    if not selectors:
        raise UsageError(
            f"{action} needs at least one selector, e.g. {action}(model, 'layer4'); "
            f"use '*' to mean every parameter."
        )


def _flip(params: Iterable[nn.Parameter], trainable: bool) -> tuple[int, int]:
    """Set ``requires_grad``; a newly frozen parameter also loses its stale ``.grad`` (otherwise
    ``optimizer.step()`` would keep moving it through momentum and weight decay)."""
    tensors = count = 0
    for p in params:
        if p.requires_grad != trainable:
            tensors += 1
            count += p.numel()
            p.requires_grad_(trainable)
        if not trainable:
            p.grad = None
    return tensors, count


def _summary(action: str, model: nn.Module) -> FreezeSummary:
    return FreezeSummary(action, type(model).__name__, 0, 0, 0, 0, 0, 0, 0, 0)


def _count(summary: FreezeSummary, model: nn.Module) -> FreezeSummary:
    """Fill the whole-model counts, after any BatchNorm swap."""
    params = list(model.parameters())
    train = [p for p in params if p.requires_grad]
    summary.trainable_tensors = len(train)
    summary.trainable_params = sum(p.numel() for p in train)
    summary.total_tensors = len(params)
    summary.total_params = sum(p.numel() for p in params)
    return summary


def _touched_by(sel: Selection, index: ModelIndex, wanted: set[int]) -> set[str]:
    """Module names a call touches: covered as modules, or owning a parameter in ``wanted``."""
    touched = set(sel.modules)
    for name, m in index.modules:
        if any(id(p) in wanted for p in m.parameters(recurse=False)):
            touched.add(name)
    return touched


def freeze(model: nn.Module, *selectors: Selector, bn: str = "eval") -> FreezeSummary:
    """Freeze (``requires_grad=False``) everything the selectors match.

    Selectors: a glob over module/parameter names (``"layer4"``, ``"blocks.1*"``, ``"*.bn*"``),
    ``"re:<regex>"``, an ``nn.Module`` subclass, or a callable ``(name, module) -> bool``. One
    that matches nothing raises :class:`~surgery.SelectorError` naming the closest names. A
    ``torch.compile``'d model is selected by the names as written (``"layer1"``, not
    ``"_orig_mod.layer1"``). Frozen parameters also lose their ``.grad``. ``bn``: ``"eval"``
    (default), ``"frozen"`` or ``"train"``, see the module docstring.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> s = freeze(model, "conv1", "bn1", "layer1", "layer2", "layer3")
        >>> len(s.bn_eval)  # bn1 and the 14 BatchNorms of layer1-3
        15
    """
    model = _checked(model, "freeze", selectors, bn, _FREEZE_BN)
    index = ModelIndex(model)
    sel = select(model, selectors, action="freeze", index=index)
    frozen = _flip(sel.params, trainable=False)
    touched = _touched_by(sel, index, sel.ids)
    summary = _summary("freeze", model)
    summary.frozen_tensors, summary.frozen_params = frozen
    _apply_bn_freeze(model, index, touched, bn, summary)
    return _count(summary, model)


def freeze_except(model: nn.Module, *selectors: Selector, bn: str = "eval") -> FreezeSummary:
    """Freeze everything except what the selectors match, which is made trainable.

    Afterwards exactly the selected parameters are trainable. Equivalent to freezing the rest
    with ``bn`` and then :func:`unfreeze` on the selectors (which releases their BatchNorms).

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> s = freeze_except(model, "fc", "layer4")
        >>> s.trainable_params == sum(p.numel() for p in model.layer4.parameters()) + 5130
        True
    """
    model = _checked(model, "freeze_except", selectors, bn, _FREEZE_BN)
    index = ModelIndex(model)
    keep = select(model, selectors, action="freeze_except", index=index)
    rest = [p for _, p in index.params if id(p) not in keep.ids]
    rest = list({id(p): p for p in rest}.values())
    summary = _summary("freeze_except", model)
    summary.frozen_tensors, summary.frozen_params = _flip(rest, trainable=False)
    summary.unfrozen_tensors, summary.unfrozen_params = _flip(keep.params, trainable=True)
    # a BatchNorm outside the kept modules is frozen unless one of its parameters is kept
    touched = {n for n, _ in index.modules if n not in keep.modules}
    _apply_bn_freeze(model, index, touched, bn, summary)
    _apply_bn_unfreeze(model, index, _touched_by(keep, index, keep.ids), "train", summary)
    return _count(summary, model)


def unfreeze(
    model: nn.Module,
    *selectors: Selector,
    bn: str = "train",
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    scheduler: LRScheduler | None = None,
) -> FreezeSummary:
    """Make what the selectors match trainable again; optionally add it to an optimizer.

    ``bn="train"`` (default) releases the BatchNorm layers it covers (held in eval mode or
    swapped to ``FrozenBatchNorm2d`` by :func:`freeze`); ``bn="eval"`` trains their affine
    parameters but keeps their running statistics fixed.

    With ``optimizer`` (and the required ``lr``), for gradual unfreezing, the parameters it
    makes trainable that no group holds yet go to new groups ``"unfreeze <selectors>"`` (and
    ``"... no_decay"``) through :func:`~surgery.add_param_groups`, which says how
    ``weight_decay`` defaults. An LR scheduler already built on the optimizer must be passed
    as ``scheduler``: the new groups then follow its schedule. Calling it again adds nothing.

    Example:
        >>> import torch, torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> _ = freeze_except(model, "fc")
        >>> from surgery import param_groups
        >>> opt = torch.optim.SGD(param_groups(model, lr=0.1))
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5)
        >>> s = unfreeze(model, "layer4", optimizer=opt, lr=0.01, scheduler=sched)
        >>> s.optimizer_groups, len(opt.param_groups), sched.base_lrs
        (['unfreeze layer4'], 2, [0.1, 0.01])
    """
    model = _checked(model, "unfreeze", selectors, bn, _UNFREEZE_BN, optimizer)
    if optimizer is None and (lr is not None or weight_decay is not None or scheduler):
        raise UsageError("unfreeze: lr, weight_decay and scheduler apply only with optimizer=.")
    index = ModelIndex(model)
    sel = select(model, selectors, action="unfreeze", index=index)
    if optimizer is not None:  # refuse a bad lr or scheduler first: an empty model adds nothing
        add_param_groups(
            optimizer, nn.Module(), lr=lr, weight_decay=weight_decay, scheduler=scheduler
        )
    summary = _summary("unfreeze", model)
    summary.unfrozen_tensors, summary.unfrozen_params = _flip(sel.params, trainable=True)
    _apply_bn_unfreeze(model, index, _touched_by(sel, index, sel.ids), bn, summary)
    if optimizer is not None:
        # re-read the model: BatchNorms swapped back from FrozenBatchNorm2d have new parameters
        label = "unfreeze " + "+".join(describe_selector(s) for s in selectors)
        added = add_param_groups(
            optimizer,
            model,
            *selectors,
            lr=lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            name=label,
        )
        chosen = {id(p) for n, p in model.named_parameters() if p.requires_grad and sel.owns(n)}
        summary.optimizer_groups = added
        summary.optimizer_tensors = sum(
            len(g["params"])
            for g in optimizer.param_groups[len(optimizer.param_groups) - len(added) :]
        )
        summary.optimizer_skipped = len(chosen) - summary.optimizer_tensors
    return _count(summary, model)
