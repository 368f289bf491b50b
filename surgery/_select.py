"""Resolve layer selectors against a model, shared by freezing and parameter grouping.

A selector is one of:

* a string: a glob over module and parameter qualified names (``"layer4"`` selects the module
  and everything under it, ``"blocks.1*"``, ``"*.bn*"``), or ``"re:<regex>"``; matching is done
  by :mod:`surgery._names`;
* an ``nn.Module`` subclass: every submodule of that type, and everything under it;
* a callable ``(name, module) -> bool``: every submodule for which it returns true, and
  everything under it.

The model itself (the empty name) is never passed to a type or callable selector; use ``"*"``
to select everything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from ._names import closest, compile_pattern, parents
from .errors import SelectorError

Selector = str | type[nn.Module] | Callable[[str, nn.Module], bool]


def describe_selector(selector: Selector) -> str:
    """A short readable label: the pattern itself, the class name, or the function name."""
    if isinstance(selector, str):
        return selector
    if isinstance(selector, type):
        return selector.__name__
    return getattr(selector, "__name__", None) or type(selector).__name__


def _check(selector: object, action: str) -> None:
    if isinstance(selector, str):
        if not selector:
            raise SelectorError(f"{action} selector is an empty string; pass a name such as 'fc'.")
        return
    if isinstance(selector, type):
        if issubclass(selector, nn.Module):
            return
        raise SelectorError(
            f"{action} selector {selector.__name__} is a class but not an nn.Module subclass; "
            "pass a module type such as nn.BatchNorm2d, a name pattern, or a callable "
            "(name, module) -> bool."
        )
    if callable(selector) and not isinstance(selector, nn.Module):
        return
    raise SelectorError(
        f"{action} selector {selector!r} ({type(selector).__name__}) is not supported; pass a "
        "name pattern ('layer4', 'blocks.1*', 're:...'), an nn.Module subclass, or a callable "
        "(name, module) -> bool."
    )


@dataclass
class Hit:
    """What one selector matched: module names (with descendants) and parameter names."""

    modules: set[str] = field(default_factory=set)
    params: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.modules or self.params)


class ModelIndex:
    """Names of a model's submodules and parameters, every alias of shared ones included."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.model_name = type(model).__name__
        self.modules: list[tuple[str, nn.Module]] = [
            (n, m) for n, m in model.named_modules(remove_duplicate=False) if n
        ]
        self.params: list[tuple[str, nn.Parameter]] = list(
            model.named_parameters(remove_duplicate=False)
        )
        self.top_level = [n for n, _ in model.named_children()]

    def match(self, selector: Selector, action: str = "select") -> Hit:
        """Module names and parameter names that ``selector`` selects (descendants included)."""
        _check(selector, action)
        hit = Hit()
        if isinstance(selector, str):
            rx = compile_pattern(selector)  # the parent rule already covers descendants
            hit.modules = {n for n, _ in self.modules if rx.fullmatch(n)}
            hit.params = {n for n, _ in self.params if rx.fullmatch(n)}
            return hit
        if isinstance(selector, type):
            roots = {n for n, m in self.modules if isinstance(m, selector)}
        else:
            roots = {n for n, m in self.modules if selector(n, m)}
        hit.modules = {
            n for n, _ in self.modules if n in roots or any(p in roots for p in parents(n))
        }
        hit.params = {n for n, _ in self.params if any(p in roots for p in parents(n))}
        return hit

    def top_level_hint(self) -> str:
        top = ", ".join(self.top_level) if self.top_level else "(none)"
        return f"Top-level modules: {top}."

    def nothing_matched(self, selector: Selector, action: str, with_top: bool = True) -> str:
        """The message for a selector that matched nothing: closest names, top-level modules."""
        label = describe_selector(selector)
        top = f" {self.top_level_hint()}" if with_top else ""
        if isinstance(selector, str):
            word = selector[3:] if selector.startswith("re:") else selector
            names = [n for n, _ in self.modules] + [n for n, _ in self.params]
            near = closest(word, names)
            hint = f" Closest names: {', '.join(near)}." if near else ""
            return f"{action} pattern {label!r} matched nothing in {self.model_name}.{hint}{top}"
        if isinstance(selector, type):
            types = ", ".join(dict.fromkeys(type(m).__name__ for _, m in self.modules))
            return (
                f"{action} selector type {label} matched no module in {self.model_name}. "
                f"Module types present: {types or '(none)'}."
            )
        return (
            f"{action} selector {label} returned False for every module of {self.model_name}.{top}"
        )

    def nothing_matched_all(self, selectors: list[Selector], action: str) -> str:
        """One message for every selector that matched nothing (top-level modules listed once)."""
        if len(selectors) == 1:
            return self.nothing_matched(selectors[0], action)
        lines = [self.nothing_matched(s, action, with_top=False) for s in selectors]
        return "\n".join([*lines, self.top_level_hint()])


@dataclass
class Selection:
    """The union of several selectors' hits, resolved to parameter objects."""

    index: ModelIndex
    modules: set[str]
    param_names: set[str]
    params: list[nn.Parameter]  # unique by identity, model order
    ids: set[int]  # id() of every parameter in ``params``

    def owns(self, param_name: str) -> bool:
        """Whether a parameter name is selected, by name or through its owning module."""
        return param_name in self.param_names or param_name.rpartition(".")[0] in self.modules


def select(
    model: nn.Module,
    selectors: Iterable[Selector],
    *,
    action: str,
    index: ModelIndex | None = None,
) -> Selection:
    """Resolve ``selectors``; one :class:`SelectorError` names every one that matched nothing.

    Example:
        >>> import torchvision
        >>> sel = select(torchvision.models.resnet18(), ["fc"], action="freeze")
        >>> sorted(sel.param_names)
        ['fc.bias', 'fc.weight']
    """
    index = index or ModelIndex(model)
    modules: set[str] = set()
    names: set[str] = set()
    missed: list[Selector] = []
    for sel in selectors:
        hit = index.match(sel, action)
        if not hit:
            missed.append(sel)
        modules |= hit.modules
        names |= hit.params
    if missed:
        raise SelectorError(index.nothing_matched_all(missed, action))
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for n, p in index.params:
        if n in names and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    # a shared parameter selected under one alias is selected under all of them
    names |= {n for n, p in index.params if id(p) in seen}
    return Selection(index, modules, names, params, seen)


def match_keys(
    selectors: Selector | Iterable[Selector] | None,
    keys: Iterable[str],
    *,
    action: str,
    model: nn.Module | None = None,
    owner: str = "the model",
) -> set[str]:
    """The ``keys`` (dotted state-dict or parameter names) that ``selectors`` select.

    The same vocabulary as the model selectors above: a glob or ``"re:"`` pattern over the key
    (a key also matches when one of its dotted parents does), an ``nn.Module`` subclass or a
    callable ``(module_name, module) -> bool`` (these need ``model``: a key is selected when
    its owning module, or one of that module's parents, is). Every selector must match at
    least one key; one :class:`SelectorError` names each that matched nothing, with the
    closest keys. ``None`` selects nothing.

    Example:
        >>> sorted(match_keys("fc", ["conv.weight", "fc.weight", "fc.bias"], action="skip"))
        ['fc.bias', 'fc.weight']
    """
    if selectors is None:
        return set()
    if isinstance(selectors, (str, type)) or (
        callable(selectors) and not isinstance(selectors, nn.Module)
    ):
        selectors = [selectors]  # type: ignore[list-item]
    elif not isinstance(selectors, Iterable):
        raise SelectorError(
            f"{action} takes a name pattern ('fc.*', 're:...'), an nn.Module subclass, a "
            f"callable (name, module) -> bool, or a list of these; got {selectors!r} "
            f"({type(selectors).__name__})."
        )
    keys = list(keys)
    modules = dict(model.named_modules(remove_duplicate=False)) if model is not None else None
    out: set[str] = set()
    missed: list[str] = []
    for sel in selectors:
        _check(sel, action)
        if isinstance(sel, str):
            rx = compile_pattern(sel)
            hit = {k for k in keys if rx.fullmatch(k)}
        else:
            if modules is None:
                raise SelectorError(
                    f"{action} selector {describe_selector(sel)} selects modules, which needs "
                    "the model; pass a name pattern instead (e.g. 'fc.*')."
                )
            roots = {n for n, m in modules.items() if n and _selects(sel, n, m)}
            hit = {
                k
                for k in keys
                if (o := k.rpartition(".")[0]) in roots or any(p in roots for p in parents(o))
            }
        if not hit:
            label = describe_selector(sel)
            if isinstance(sel, str):
                word = sel[3:] if sel.startswith("re:") else sel
                near = closest(word, keys)
                hint = f" Closest names: {', '.join(near)}." if near else ""
            else:
                hint = ""
            missed.append(f"{action} selector {label!r} matched no key of {owner}.{hint}")
        out |= hit
    if missed:
        raise SelectorError("\n".join(missed))
    return out


def _selects(sel: Selector, name: str, module: nn.Module) -> bool:
    if isinstance(sel, type):
        return isinstance(module, sel)
    return bool(sel(name, module))  # type: ignore[operator]
