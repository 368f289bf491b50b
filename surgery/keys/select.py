"""The one name-matching vocabulary of surgery: freeze selectors, ``param_groups`` rules and
``no_decay``, and the ``skip`` / ``allow_missing`` keys of loading all resolve here.

:func:`select` resolves selectors against a model's modules and parameters; :func:`match_keys`
against a list of keys (a checkpoint's or a model's state-dict names). A selector is one of:

* a string: a glob over module and parameter qualified names (``"layer4"`` selects the module
  and everything under it, ``"blocks.1*"``, ``"*.bn*"``), or ``"re:<regex>"``; matching is done
  by :mod:`surgery._names`;
* an ``nn.Module`` subclass: every submodule of that type, and everything under it;
* a callable ``(name, module) -> bool``: every submodule for which it returns true, and
  everything under it.

The model itself (the empty name) is never passed to a type or callable selector; use ``"*"``
to select everything. Names are matched as the user wrote them: in a model wrapped by
``torch.compile`` (whose names gain ``_orig_mod.``) ``"layer1"`` selects ``_orig_mod.layer1``,
and callables and hints see the names without ``_orig_mod``. A selector that selects nothing
is refused with one :class:`~surgery.SelectorError` message, whoever asked: the closest names
for a pattern, the module types present for a type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from .._names import closest, compile_pattern, parents
from .._table import first_n
from ..errors import SelectorError

Selector = str | type[nn.Module] | Callable[[str, nn.Module], bool]
_TOP_LEVEL = 12  # top-level modules named in a 'matched nothing' hint
_COMPILED = "_orig_mod"  # where torch.compile's wrapper keeps the module it compiled


def written_name(name: str) -> str:
    """A name as the user wrote it: without the ``_orig_mod`` parts ``torch.compile`` adds
    (``backbone._orig_mod.layer1`` -> ``backbone.layer1``). Selectors match either form.

    Example:
        >>> written_name("_orig_mod.layer1.0.conv1.weight"), written_name("_orig_mod")
        ('layer1.0.conv1.weight', '')
    """
    if _COMPILED not in name:
        return name
    return ".".join(p for p in name.split(".") if p != _COMPILED)


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


def as_selectors(selectors: object, action: str) -> list[Selector]:
    """One selector or an iterable of them as a list (``None``: none), each checked."""
    if selectors is None:
        return []
    if isinstance(selectors, (str, type)) or (
        callable(selectors) and not isinstance(selectors, nn.Module)
    ):
        selectors = [selectors]
    elif not isinstance(selectors, Iterable) or isinstance(selectors, (bytes, nn.Module)):
        raise SelectorError(
            f"{action} takes a name pattern ('fc.*', 're:...'), an nn.Module subclass, a "
            f"callable (name, module) -> bool, or a list of these; got {selectors!r} "
            f"({type(selectors).__name__})."
        )
    out = list(selectors)
    for sel in out:
        _check(sel, action)
    return out


def _selects(sel: Selector, name: str, module: nn.Module) -> bool:
    if isinstance(sel, type):
        return isinstance(module, sel)
    return bool(sel(name, module))  # type: ignore[operator]


def _predicate(
    selector: Selector, modules: list[tuple[str, nn.Module]] | None, action: str
) -> Callable[[str], bool]:
    """Whether a dotted name is selected: a pattern matches it or one of its parents; a type
    or callable selects the modules it accepts and every name under them."""
    if isinstance(selector, str):
        rx = compile_pattern(selector)  # the parent rule already covers descendants

        def hit(name: str) -> bool:
            if rx.fullmatch(name) is not None:
                return True
            written = written_name(name)
            return written != name and rx.fullmatch(written) is not None

        return hit
    if modules is None:
        raise SelectorError(
            f"{action} selector {describe_selector(selector)} selects modules, which needs "
            "the model; pass a name pattern instead (e.g. 'fc.*')."
        )
    # a type or callable sees the names as written; a compiled model's own wrapper ('') is
    # the model itself, never passed
    roots = {n for n, m in modules if written_name(n) and _selects(selector, written_name(n), m)}
    return lambda name: name in roots or any(p in roots for p in parents(name))


def _nothing_matched(
    selector: Selector,
    action: str,
    owner: str,
    names: list[str],
    modules: list[tuple[str, nn.Module]] | None,
) -> str:
    """The one message for a selector that selected none of ``names``: the closest names for a
    pattern, the module types present for a type."""
    label = describe_selector(selector)
    if isinstance(selector, str):
        word = selector[3:] if selector.startswith("re:") else selector
        # the names' parents too: a key list names 'fc.weight', the user thinks of 'fc'; and
        # the names as written (a compiled model's without '_orig_mod')
        written = (written_name(n) for n in names)
        candidates = dict.fromkeys(x for n in written if n for x in (*parents(n), n))
        near = closest(word, candidates)
        hint = f" Closest names: {', '.join(near)}." if near else ""
        return f"{action} pattern {label!r} matched nothing in {owner}.{hint}"
    if isinstance(selector, type):
        types = dict.fromkeys(type(m).__name__ for n, m in modules or () if n)
        if any(isinstance(m, selector) for n, m in modules or () if n):
            return f"{action} selector type {label} matched modules but no name of {owner}."
        return (
            f"{action} selector type {label} matched no module in {owner}. "
            f"Module types present: {first_n(types) or '(none)'}."
        )
    return f"{action} selector {label} returned False for every module of {owner}."


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
        """Module names and parameter names that ``selector`` selects (descendants included);
        an empty :class:`Hit` when it selects nothing."""
        _check(selector, action)
        selected = _predicate(selector, self.modules, action)
        return Hit(
            {n for n, _ in self.modules if selected(n)}, {n for n, _ in self.params if selected(n)}
        )

    def top_level_hint(self) -> str:
        return f"Top-level modules: {first_n(self.top_level, _TOP_LEVEL) or '(none)'}."

    def nothing_matched(self, selector: Selector, action: str, with_top: bool = True) -> str:
        """The message for a selector that matched nothing: closest names, top-level modules."""
        names = [n for n, _ in self.modules] + [n for n, _ in self.params]
        msg = _nothing_matched(selector, action, self.model_name, names, self.modules)
        return f"{msg} {self.top_level_hint()}" if with_top else msg

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
    selectors = as_selectors(selectors, action)
    keys = list(keys)
    modules = list(model.named_modules(remove_duplicate=False)) if model is not None else None
    out: set[str] = set()
    missed: list[str] = []
    for sel in selectors:
        selected = _predicate(sel, modules, action)
        hit = {k for k in keys if selected(k)}
        if not hit:
            missed.append(_nothing_matched(sel, action, owner, keys, modules))
        out |= hit
    if missed:
        raise SelectorError("\n".join(missed))
    return out
