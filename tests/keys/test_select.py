"""One selector vocabulary: freeze, param_groups (rules, no_decay), add_param_groups and key
matching (skip / allow_missing) accept the same forms and refuse a miss the same way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgery
from surgery import SelectorError, UsageError
from surgery._names import compile_pattern
from surgery.keys.select import match_keys

from support import SmallCNN


def _frozen_by(selector) -> set[str]:
    model = SmallCNN(num_classes=3)
    surgery.freeze(model, selector)
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _rule_hits(selector) -> set[str]:
    model = SmallCNN(num_classes=3)
    groups = surgery.param_groups(model, lr=0.1, rules=[(selector, {"lr": 1.0})], no_decay=None)
    marked = {id(p) for g in groups if g["lr"] == 1.0 for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in marked}


def _no_decay_hits(selector) -> set[str]:
    model = SmallCNN(num_classes=3)
    groups = surgery.param_groups(model, lr=0.1, weight_decay=0.1, no_decay=selector)
    undecayed = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in undecayed}


def _key_hits(selector) -> set[str]:
    model = SmallCNN(num_classes=3)
    keys = [n for n, _ in model.named_parameters()]
    return match_keys(selector, keys, action="skip", model=model)


def _added_by(selector) -> set[str]:
    model = SmallCNN(num_classes=3)
    opt = torch.optim.SGD([model.fc.weight], lr=0.1)
    surgery.add_param_groups(opt, model, selector, lr=0.1)
    held = {id(p) for g in opt.param_groups[1:] for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in held}


RESOLVERS = [_frozen_by, _rule_hits, _no_decay_hits, _key_hits, _added_by]
SELECTORS = {
    "glob": ("bn*", {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}),
    "regex": (r"re:conv\d\.bias", {"conv1.bias", "conv2.bias"}),
    "parameter": ("fc.bias", {"fc.bias"}),
    "type": (nn.Conv2d, {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}),
    "callable": (lambda name, m: name == "bn2", {"bn2.weight", "bn2.bias"}),
}


@pytest.mark.parametrize("resolve", RESOLVERS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("kind", list(SELECTORS))
def test_every_consumer_selects_the_same_parameters(resolve, kind):
    selector, expected = SELECTORS[kind]
    assert resolve(selector) == expected


@pytest.mark.parametrize(
    "call",
    [
        lambda m: surgery.freeze(m, "fcc"),
        lambda m: surgery.unfreeze(m, "fcc"),
        lambda m: surgery.param_groups(m, lr=0.1, rules=[("fcc", {"lr": 1.0})]),
        lambda m: surgery.param_groups(m, lr=0.1, weight_decay=0.1, no_decay=["fcc"]),
        lambda m: surgery.add_param_groups(torch.optim.SGD(m.parameters(), lr=0.1), m, "fcc", lr=1),
        lambda m: match_keys("fcc", m.state_dict(), action="skip", owner="SmallCNN"),
    ],
    ids=["freeze", "unfreeze", "rules", "no_decay", "add_param_groups", "keys"],
)
def test_a_miss_is_the_same_error_everywhere(call):
    model = SmallCNN(num_classes=3)
    with pytest.raises(SelectorError, match=r"pattern 'fcc' matched nothing in SmallCNN\.") as e:
        call(model)
    assert "Closest names: fc" in str(e.value)
    assert all(p.requires_grad for p in model.parameters())  # nothing half-done


def test_skip_glob_that_matches_nothing_names_closest_keys():
    keys = ["backbone.fc.weight", "backbone.fc.bias", "conv.weight"]
    with pytest.raises(SelectorError) as e:
        match_keys("fcc.*", keys, action="skip", owner="checkpoint 'x.pth'")
    assert str(e.value) == (
        "skip pattern 'fcc.*' matched nothing in checkpoint 'x.pth'. Closest names: backbone.fc."
    )


def test_type_selector_miss_lists_types_present_briefly():
    model = nn.Sequential(*[getattr(nn, t)() for t in ["ReLU", "GELU", "Tanh", "SiLU"] * 3])
    model.append(nn.Linear(2, 2))
    with pytest.raises(SelectorError) as e:
        surgery.freeze(model, nn.Conv2d)
    msg = str(e.value)
    assert "type Conv2d matched no module in Sequential" in msg
    assert "Module types present: ReLU, GELU, Tanh, SiLU, Linear." in msg
    assert "Top-level modules: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 1 more." in msg


def test_key_type_selector_without_model_and_bad_forms_are_selector_errors():
    with pytest.raises(SelectorError, match="needs the model"):
        match_keys([nn.Linear], ["fc.weight"], action="skip")
    for bad in (3, nn.Linear(2, 2), b"fc"):
        with pytest.raises(SelectorError):
            match_keys(bad, ["fc.weight"], action="skip")
    with pytest.raises(SelectorError, match="must be a string"):
        compile_pattern(3)  # a malformed pattern is a SelectorError, never a bare TypeError
    with pytest.raises(SelectorError, match="invalid regex"):
        surgery.freeze(SmallCNN(), "re:(")


def test_no_decay_takes_one_selector_or_a_list_and_refuses_other_values():
    model = SmallCNN(num_classes=3)
    one = surgery.param_groups(model, lr=0.1, weight_decay=0.1, no_decay=nn.BatchNorm2d)
    listed = surgery.param_groups(model, lr=0.1, weight_decay=0.1, no_decay=[nn.BatchNorm2d])
    assert [len(g["params"]) for g in one] == [len(g["params"]) for g in listed] == [6, 4]
    with pytest.raises(UsageError, match="no_decay takes a name pattern"):
        surgery.param_groups(model, lr=0.1, weight_decay=0.1, no_decay=3)


def test_timm_style_no_weight_decay_may_list_absent_names():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 4, 4))
            self.fc = nn.Linear(4, 4)

        def no_weight_decay(self) -> set[str]:
            return {"pos", "dist_token"}  # timm lists tokens some variants lack

    groups = surgery.param_groups(Net(), lr=0.1, weight_decay=0.1)
    decay = {g["name"]: len(g["params"]) for g in groups}
    assert decay == {"default": 1, "default no_decay": 2}  # fc.weight | pos, fc.bias
