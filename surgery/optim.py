"""Optimizer parameter groups: every trainable parameter exactly once, no decay on biases/norms.

Example:
    >>> import torch, torchvision, surgery
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> _ = surgery.freeze_except(model, "fc", "layer4")
    >>> rules = [("fc", {"lr": 1e-3})]
    >>> groups = surgery.param_groups(model, lr=1e-4, rules=rules, weight_decay=0.05)
    >>> opt = torch.optim.AdamW(groups)
    >>> print(surgery.describe_groups(groups))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler as sched

from ._args import require_module, require_optimizer, written_model
from ._table import first_n
from .errors import SelectorError, UsageError
from .group_table import GroupTable, describe_groups
from .keys.select import ModelIndex, Selector, as_selectors, describe_selector, select

__all__ = ["GroupTable", "add_param_groups", "describe_groups", "param_groups"]

RULE_KEYS = ("lr", "lr_scale", "weight_decay")
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    rules: Sequence[tuple[Selector, Mapping[str, float]]]
    | Mapping[Selector, Mapping[str, float]]
    | None = None,
    no_decay: str | Iterable[Selector] | None = "auto",
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Build optimizer parameter groups holding every trainable parameter exactly once.

    Only parameters with ``requires_grad=True`` are included, shared ones once. Parameters with
    identical options share a group; every group has a readable ``"name"`` and explicit ``"lr"``
    and ``"weight_decay"``, so the list goes straight to any ``torch.optim`` optimizer.

    Args:
        model: the model, already frozen as wanted.
        lr: base learning rate.
        weight_decay: base weight decay.
        rules: ordered ``(selector, overrides)``; the first rule matching a parameter sets its
            options. Overrides: ``lr`` (final, no layer decay), ``lr_scale`` (multiplies the
            lr), ``weight_decay`` (for the parameters that are decayed at all). A rule that
            matches no trainable parameter, or only parameters an earlier rule took, is an error.
        no_decay: ``"auto"``: no weight decay for biases, normalisation weights, 1-D parameters
            and the names listed by a (timm) ``no_weight_decay()`` of the model or of a
            submodule. ``None``: decay everything. Or selectors naming exactly the parameters
            not to decay.
        layer_decay: layer-wise lr decay, e.g. ``0.75``: a parameter of layer ``i`` of ``n``
            gets ``lr * layer_decay ** (n - 1 - i)``, so the head keeps the full lr. Layer ids
            come from timm's ``model.group_matcher(coarse=False)`` when the model has one, else
            from the order of its top-level children that hold parameters (parameters of the
            model itself, like a ViT's ``cls_token``, form layer 0).

    The returned lrs already include every scale; the groups carry no ``lr_scale`` key (timm's
    schedulers would apply it a second time).

    Example:
        >>> import torch, torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> groups = param_groups(model, lr=1e-4, weight_decay=0.05, rules=[("fc", {"lr": 1e-3})])
        >>> [g["name"] for g in groups]
        ['default', 'default no_decay', 'fc', 'fc no_decay']
        >>> opt = torch.optim.AdamW(groups)
    """
    require_module(model, "param_groups")
    model = written_model(model)  # a compiled model: the names as written
    _check_number("lr", lr, positive=True)
    _check_number("weight_decay", weight_decay)
    if layer_decay is not None:
        _check_number("layer_decay", layer_decay, positive=True)
        if layer_decay > 1:
            raise UsageError(
                f"layer_decay={layer_decay} would give earlier layers a higher lr than the head; "
                "pass a value in (0, 1], such as 0.75."
            )
    rule_list = _normalise_rules(rules)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        total = sum(1 for _ in model.parameters())
        raise UsageError(
            f"param_groups found no trainable parameter in {type(model).__name__}: all {total} "
            "parameter tensors have requires_grad=False. Unfreeze what should train first, "
            "e.g. surgery.unfreeze(model, 'fc')."
        )
    return _build_groups(
        model,
        named,
        lr=lr,
        weight_decay=weight_decay,
        rules=rule_list,
        no_decay=no_decay,
        layer_decay=layer_decay,
    )


def add_param_groups(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    *selectors: Selector,
    lr: float | None = None,
    weight_decay: float | None = None,
    scheduler: sched.LRScheduler | None = None,
    name: str | None = None,
) -> list[str]:
    """Add the trainable parameters that no group of ``optimizer`` holds yet; the new group names.

    For gradual unfreezing (:func:`~surgery.unfreeze` calls it with ``optimizer=``): the
    trainable parameters the selectors match (all of the model's without selectors) that no
    group holds (checked by identity) go to a new group ``name`` (default: the selectors) with
    ``lr``. ``weight_decay`` defaults to the highest among the optimizer's groups (the base
    decay); when it is non-zero, biases and normalisation weights go to a second group
    ``"<name> no_decay"`` without decay, as in :func:`param_groups`. Groups get
    ``param_names`` when the optimizer's have them. Calling it again adds nothing.

    An LR scheduler built on the optimizer must be passed as ``scheduler``: the new groups get
    ``initial_lr=lr``, the scheduler's ``base_lrs`` (and ``lr_lambdas``) grow by one per group,
    and each group starts at the lr the schedule gives ``lr`` at the current step, so the next
    ``scheduler.step()`` moves it along the same curve as the others. Supported: LambdaLR,
    MultiplicativeLR, StepLR, MultiStepLR, ConstantLR, LinearLR, ExponentialLR, PolynomialLR,
    CosineAnnealingLR, CosineAnnealingWarmRestarts; other schedulers are refused, as is an
    optimizer whose groups carry ``initial_lr`` (a scheduler is attached) without ``scheduler``.
    Nothing is changed when it raises.

    Example:
        >>> import torch, torchvision
        >>> from surgery import freeze_except, unfreeze
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> _ = freeze_except(model, "fc")
        >>> opt = torch.optim.SGD(param_groups(model, lr=0.1))
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        >>> _ = unfreeze(model, "layer4")
        >>> add_param_groups(opt, model, "layer4", lr=0.01, scheduler=sched)
        ['layer4']
        >>> sched.base_lrs
        [0.1, 0.01]
    """
    lr = _check_added(optimizer, model, lr, weight_decay, scheduler)
    model = written_model(model)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    index = ModelIndex(model)
    if selectors:
        sel = select(model, selectors, action="add_param_groups", index=index)
        chosen = sel.ids
    else:
        chosen = {id(p) for _, p in index.params}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in chosen]
    new = [(n, p) for n, p in named if id(p) not in held]
    if not new:
        return []
    if weight_decay is None:  # the base decay: the highest among the existing groups
        decays = [float(g.get("weight_decay", 0.0) or 0.0) for g in optimizer.param_groups]
        weight_decay = max(decays, default=0.0)
    label = name or "+".join(describe_selector(s) for s in selectors) or "added"
    groups = _build_groups(
        model, new, lr=lr, weight_decay=float(weight_decay), default_label=label, index=index
    )
    with_names = any("param_names" in g for g in optimizer.param_groups)
    names = {id(p): n for n, p in new}
    start = _schedule_factor(scheduler) if scheduler is not None else None
    for g in groups:
        if with_names:
            g["param_names"] = [names[id(p)] for p in g["params"]]
        if scheduler is not None:
            g["initial_lr"] = g["lr"]
            g["lr"] = start(g["lr"])  # type: ignore[misc]
        optimizer.add_param_group(g)
        if scheduler is not None:
            _grow_scheduler(scheduler, g)
    return [g["name"] for g in groups]


def _check_added(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    lr: float | None,
    weight_decay: float | None,
    scheduler: sched.LRScheduler | None,
) -> float:
    """:func:`add_param_groups`'s arguments checked before anything changes; the new lr."""
    require_optimizer(optimizer, "add_param_groups")
    require_module(model, "add_param_groups")
    if lr is None:
        raise UsageError(
            "adding parameters to an optimizer needs the new group's lr=, e.g. lr=1e-5; the "
            "optimizer's default lr is rarely the one you mean."
        )
    _check_number("lr", lr, positive=True)
    if weight_decay is not None:
        _check_number("weight_decay", weight_decay)
    _check_scheduler(optimizer, scheduler)
    return lr


# Schedulers whose lr at a step is eta_min + (base_lr - eta_min) * f(step) for every group, so
# a group added late can join at the point of the curve the others are at.
_AFFINE_SCHEDULERS: tuple[type, ...] = (
    sched.LambdaLR,
    sched.MultiplicativeLR,
    sched.StepLR,
    sched.MultiStepLR,
    sched.ConstantLR,
    sched.LinearLR,
    sched.ExponentialLR,
    sched.PolynomialLR,
    sched.CosineAnnealingLR,
    sched.CosineAnnealingWarmRestarts,
)


def _check_scheduler(optimizer: torch.optim.Optimizer, scheduler: sched.LRScheduler | None) -> None:
    """Refuse, before anything changes, a scheduler a new group could not follow."""
    fix = (
        "Create the scheduler after adding the groups, or rebuild it (keeping last_epoch) "
        "once they are added."
    )
    if scheduler is None:
        if any("initial_lr" in g for g in optimizer.param_groups):
            raise UsageError(
                "the optimizer's groups carry 'initial_lr', so an LR scheduler is attached to "
                "it; a group added behind its back would keep a constant lr (or make "
                "scheduler.step() fail). Pass it: scheduler=sched. " + fix
            )
        return
    if getattr(scheduler, "optimizer", None) is not optimizer:
        raise UsageError(
            f"scheduler {type(scheduler).__name__} is not attached to this optimizer; pass the "
            "scheduler built on it."
        )
    if not isinstance(scheduler, _AFFINE_SCHEDULERS):
        names = ", ".join(c.__name__ for c in _AFFINE_SCHEDULERS)
        raise UsageError(
            f"cannot add a group to a running {type(scheduler).__name__}: surgery can extend "
            f"only {names}. " + fix
        )
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is not None and len({id(f) for f in lambdas}) > 1:
        raise UsageError(
            f"{type(scheduler).__name__} has one lr_lambda per group, so which one a new group "
            "should follow is ambiguous. " + fix
        )
    n = len(optimizer.param_groups)
    if len(scheduler.base_lrs) != n:
        raise UsageError(
            f"{type(scheduler).__name__} has {len(scheduler.base_lrs)} base_lrs for {n} "
            "parameter groups (a group was added without it). " + fix
        )


def _schedule_factor(scheduler: sched.LRScheduler) -> Any:
    """``lr -> the lr the schedule gives a group of initial lr ``lr`` now``, read off the first
    existing group whose initial lr differs from ``eta_min``."""
    eta = float(getattr(scheduler, "eta_min", 0.0))
    groups = scheduler.optimizer.param_groups
    for base, g in zip(scheduler.base_lrs, groups, strict=True):
        if float(base) != eta:
            ratio = (float(g["lr"]) - eta) / (float(base) - eta)
            return lambda lr: eta + (lr - eta) * ratio
    return lambda lr: lr


def _grow_scheduler(scheduler: sched.LRScheduler, group: dict[str, Any]) -> None:
    """One more entry in the scheduler's per-group lists, for ``group`` just added."""
    scheduler.base_lrs.append(group["initial_lr"])
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is not None:
        lambdas.append(lambdas[0])
    last = getattr(scheduler, "_last_lr", None)  # what get_last_lr() returns until next step
    if isinstance(last, list):
        last.append(group["lr"])


def _build_groups(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    *,
    lr: float,
    weight_decay: float,
    rules: Sequence[tuple[Selector, dict[str, float]]] = (),
    no_decay: str | Iterable[Selector] | None = "auto",
    layer_decay: float | None = None,
    default_label: str = "default",
    index: ModelIndex | None = None,
) -> list[dict[str, Any]]:
    """Groups for ``(name, parameter)`` pairs (unique, trainable); add_param_groups uses it too."""
    index = index or ModelIndex(model)
    rule_ids = _resolve_rules(index, rules, named)
    no_decay_names = _no_decay_names(model, index, named, no_decay)
    if layer_decay is not None:
        layer_of, num_layers = _layer_ids(model)
        layer_labels = _layer_labels(layer_of)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    labels: dict[tuple[float, float], list[str]] = {}
    for name, p in named:
        matching = (r for r, ids in zip(rules, rule_ids, strict=True) if id(p) in ids)
        rule = next(matching, None)
        opts = rule[1] if rule else {}
        parts = [describe_selector(rule[0])] if rule else []
        if "lr" in opts:
            group_lr = float(opts["lr"])
        elif layer_decay is not None:
            layer = layer_of.get(name, num_layers - 1)
            group_lr = lr * layer_decay ** (num_layers - 1 - layer)
            label = layer_labels.get(layer, f"layer {layer}")
            if label not in parts:
                parts.append(label)
        else:
            group_lr = float(lr)
        group_lr *= float(opts.get("lr_scale", 1.0))
        wd = float(opts.get("weight_decay", weight_decay))
        if wd > 0 and name in no_decay_names:
            wd = 0.0
            parts.append("no_decay")
        if not parts or parts[0] == "no_decay":
            parts.insert(0, default_label)
        label = " ".join(parts)
        key = (group_lr, wd)
        if key not in groups:
            groups[key] = {"name": "", "params": [], "lr": group_lr, "weight_decay": wd}
            labels[key] = []
        groups[key]["params"].append(p)
        if label not in labels[key]:
            labels[key].append(label)
    seen: dict[str, int] = {}
    for key, g in groups.items():
        name = " + ".join(labels[key])
        seen[name] = seen.get(name, 0) + 1
        g["name"] = name if seen[name] == 1 else f"{name} #{seen[name]}"
    return list(groups.values())


def _check_number(what: str, value: object, positive: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        need = "a positive number" if positive else "a number >= 0"
        raise UsageError(f"{what} must be {need}, got {value!r}.")


def _normalise_rules(rules: object) -> list[tuple[Selector, dict[str, float]]]:
    if rules is None:
        return []
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
        raise UsageError(
            f"rules must be a list of (selector, overrides) pairs, got {type(rules).__name__}; "
            'e.g. rules=[("fc", {"lr": 1e-3})].'
        )
    out = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise UsageError(
                f"rules[{i}] must be a (selector, overrides) pair, got {rule!r}; "
                'e.g. ("fc", {"lr": 1e-3}).'
            )
        sel, overrides = rule
        if not isinstance(overrides, Mapping):
            raise UsageError(
                f"rules[{i}] overrides must be a dict such as {{'lr': 1e-3}}, got {overrides!r}."
            )
        bad = [k for k in overrides if k not in RULE_KEYS]
        if bad:
            raise UsageError(
                f"rules[{i}] ({describe_selector(sel)!r}) has unknown option(s) "
                f"{', '.join(map(repr, bad))}; allowed: {', '.join(RULE_KEYS)}."
            )
        for k, v in overrides.items():
            _check_number(f"rules[{i}] {k}", v, positive=(k == "lr"))
        out.append((sel, dict(overrides)))
    return out


def _resolve_rules(
    index: ModelIndex,
    rules: Sequence[tuple[Selector, dict[str, float]]],
    named: list[tuple[str, nn.Parameter]],
) -> list[set[int]]:
    """Per rule, the ids of the parameters it matches; errors for useless rules, raised once."""
    action = "param_groups rule"
    trainable = {id(p) for _, p in named}
    all_ids: list[set[int]] = []
    problems: list[str] = []
    claimed: dict[int, str] = {}  # parameter id -> label of the first rule matching it
    taken_by: list[str] = []  # labels of the rules so far, in order
    for sel, _ in rules:
        hit = index.match(sel, action)
        ids = {id(p) for n, p in index.params if n in hit.params}
        all_ids.append(ids)
        label = describe_selector(sel)
        if not hit:
            problems.append(index.nothing_matched(sel, action, with_top=False))
            continue
        live = ids & trainable
        if not live:
            what = f"{len(ids)} parameter tensors, all frozen" if ids else "no parameter"
            trainable_top = sorted({n.split(".", 1)[0] for n, _ in named})
            problems.append(
                f"{action} {label!r} matched {what} in {index.model_name}; frozen parameters "
                f"are never put in a group. Trainable: {first_n(trainable_top)}."
            )
            continue
        if live <= claimed.keys():
            takers = {claimed[i] for i in live}
            earlier = ", ".join(repr(x) for x in dict.fromkeys(taken_by) if x in takers)
            problems.append(
                f"{action} {label!r} never applies: every parameter it matches was taken by "
                f"the earlier rule(s) {earlier}. Put the more specific rule first."
            )
        for i in live:
            claimed.setdefault(i, label)
        taken_by.append(label)
    if problems:
        raise SelectorError("\n".join([*problems, index.top_level_hint()]))
    return all_ids


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def _no_decay_names(
    model: nn.Module,
    index: ModelIndex,
    named: list[tuple[str, nn.Parameter]],
    no_decay: str | Iterable[Selector] | None,
) -> set[str]:
    if no_decay is None or no_decay is False:
        return set()
    if not (isinstance(no_decay, str) and no_decay == "auto"):
        selectors = as_selectors(no_decay, "no_decay")
        sel = select(model, selectors, action="no_decay", index=index)
        return {n for n, p in named if id(p) in sel.ids}
    owners = dict(index.modules)
    owners[""] = model
    listed_names: set[str] = set()  # what (timm) no_weight_decay() lists, resolved to names
    for prefix, m in [("", model), *index.modules]:
        listed = getattr(m, "no_weight_decay", None)
        if callable(listed):
            for n in listed():  # timm lists names a variant may lack ('dist_token'): no error
                listed_names |= index.match(f"{prefix}.{n}" if prefix else n, "no_decay").params
    out = set()
    for n, p in named:
        owner = owners.get(n.rpartition(".")[0])
        if (
            p.ndim <= 1
            or n == "bias"
            or n.endswith(".bias")
            or (owner is not None and _is_norm(owner))
            or n in listed_names
        ):
            out.add(n)
    return out


def _layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Map parameter name -> layer id, and the number of layers (the head is the last)."""
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        from timm.models import group_parameters

        layer_of = group_parameters(model, matcher(coarse=False), reverse=True)
        return layer_of, max(layer_of.values(), default=0) + 1

    def top(name: str) -> str:  # "" for the model's own parameters
        return name.split(".", 1)[0] if "." in name else ""

    names = [n for n, _ in model.named_parameters()]
    tops = {top(n) for n in names}
    order = [""] if "" in tops else []
    order += [c for c, _ in model.named_children() if c in tops]
    rank = {c: i for i, c in enumerate(order)}
    layer_of = {n: rank[top(n)] for n in names}
    return layer_of, len(order)


def _layer_labels(layer_of: dict[str, int]) -> dict[int, str]:
    """A readable name per layer id: the module path its parameters share ('layer4',
    'blocks.3', 'head'), else the blocks it spans ('blocks.11+norm')."""

    def unit(name: str) -> str:  # 'blocks.3.attn.qkv.weight' -> 'blocks.3'; 'fc.bias' -> 'fc'
        parts = name.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]

    members: dict[int, list[str]] = {}
    for name, layer in layer_of.items():
        members.setdefault(layer, []).append(name)
    labels = {}
    for layer, names in members.items():
        paths = [n.split(".")[:-1] for n in names]  # module path of each parameter
        common = []
        for parts in zip(*paths, strict=False):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        if common:
            labels[layer] = ".".join(common)
        else:
            units = list(dict.fromkeys(unit(n) for n in names))
            labels[layer] = "+".join(units[:3]) + ("+..." if len(units) > 3 else "")
    return labels
