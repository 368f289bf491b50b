"""head_rows: classifier rows kept by label, new rows initialised like a fresh layer."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torchvision
from conftest import SmallCNN, assert_same_state, snapshot
from safetensors.torch import save_file
from torch import nn

import surgery
from surgery.adapters import adapt_shapes

SYNSETS = [f"n{i:08d}" for i in range(1000)]  # stand-ins for ImageNet's synset ids


def fresh_linear(seed: int, in_features: int, out_features: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def test_imagenet_head_to_ten_classes_seven_known(r18_imagenet):
    kept = {0: 3, 1: 999, 3: 0, 4: 500, 6: 42, 7: 7, 9: 250}  # new row -> old row
    new_labels = [SYNSETS[kept[i]] if i in kept else f"mine{i}" for i in range(10)]
    model = torchvision.models.resnet18(num_classes=10)
    rows = surgery.head_rows(SYNSETS, new_labels)

    torch.manual_seed(123)
    report = surgery.load_partial(model, r18_imagenet, on_mismatch=rows)
    expected = fresh_linear(123, 512, 10)  # what reset_parameters draws for a new 10-row head

    assert sorted(m.key for m in report.adapted) == ["fc.bias", "fc.weight"]
    assert not report.mismatched and not report.missing
    for new, old in kept.items():
        assert torch.equal(model.fc.weight[new], r18_imagenet["fc.weight"][old])
        assert torch.equal(model.fc.bias[new], r18_imagenet["fc.bias"][old])
    for new in (2, 5, 8):
        assert torch.equal(model.fc.weight[new], expected.weight[new])
        assert torch.equal(model.fc.bias[new], expected.bias[new])
    assert torch.equal(model.layer1[0].conv1.weight, r18_imagenet["layer1.0.conv1.weight"])

    assert rows.summary["fc.weight"] == {
        "kept": 7,
        "rows": (1000, 10),
        "new_labels": ["mine2", "mine5", "mine8"],
        "dropped": 993,
        "init": "default",
    }
    assert rows.added == ["mine2", "mine5", "mine8"]
    notes = rows.notes()
    assert notes[0] == (
        "fc.weight: kept 7 of 10 rows by label (checkpoint had 1000); "
        "initialised 3 (default): 'mine2', 'mine5', 'mine8'"
    )
    assert notes[1].startswith("fc.bias: kept 7 of 10 rows")
    assert "1000 -> 10 labels, 7 shared, 3 new" in str(rows)


def test_adding_two_classes_keeps_the_five_rows_in_place():
    torch.manual_seed(0)
    src = SmallCNN(num_classes=5)
    model = SmallCNN(num_classes=7)
    rows = surgery.head_rows(range(5), range(7))
    surgery.load_partial(model, src, on_mismatch=rows)

    assert torch.equal(model.fc.weight[:5], src.fc.weight)
    assert torch.equal(model.fc.bias[:5], src.fc.bias)
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) and the bias both: 1/sqrt(fan_in)
    new_w, new_b = model.fc.weight[5:], model.fc.bias[5:]
    assert new_w.abs().max() <= bound and new_b.abs().max() <= bound
    assert new_w.std() > bound / 4  # drawn, not zeros or a constant
    assert rows.summary["fc.weight"]["new_labels"] == [5, 6]


def test_mean_init_fills_new_rows_with_the_mean_of_the_old_rows():
    torch.manual_seed(0)
    src = SmallCNN(num_classes=5)
    model = SmallCNN(num_classes=7)
    rows = surgery.head_rows(range(5), range(7), init="mean")
    surgery.load_partial(model, src, on_mismatch=rows)

    for i in (5, 6):
        torch.testing.assert_close(model.fc.weight[i], src.fc.weight.mean(0))
        torch.testing.assert_close(model.fc.bias[i], src.fc.bias.mean())
    assert "initialised 2 (mean): 5, 6" in rows.notes()[0]


def test_permuted_classes_from_a_label_file(tmp_path):
    labels = tmp_path / "old.txt"
    labels.write_text("cat\ndog\n\nfox\nhen\n")  # blank lines are not labels
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(8, 4))
    model = nn.Sequential(nn.Linear(8, 5))
    rows = surgery.head_rows(str(labels), ["hen", "fox", "owl", "cat", "dog"])
    surgery.load_partial(model, src, on_mismatch=rows)

    for new, old in {0: 3, 1: 2, 3: 0, 4: 1}.items():
        assert torch.equal(model[0].weight[new], src[0].weight[old])
        assert torch.equal(model[0].bias[new], src[0].bias[old])
    assert rows.summary["0.weight"]["new_labels"] == ["owl"]
    assert rows.old_labels == ["cat", "dog", "fox", "hen"]


def test_timm_head_with_chain_to_adapt_shapes():
    torch.manual_seed(0)
    src = timm.create_model("test_vit", num_classes=6)
    model = timm.create_model("test_vit", num_classes=4, in_chans=1)
    with pytest.raises(surgery.UsageError, match="cannot read label file 'abcdef'"):
        surgery.head_rows("abcdef", "fbxa")  # a string is a file path, not a list of labels

    rows = surgery.head_rows(list("abcdef"), list("fbxa"))
    adapter = surgery.chain(rows, adapt_shapes)
    report = surgery.load_partial(model, src, on_mismatch=adapter)

    adapted = sorted(m.key for m in report.adapted)
    assert adapted == ["head.bias", "head.weight", "patch_embed.proj.weight"]
    for new, old in {0: 5, 1: 1, 3: 0}.items():
        assert torch.equal(model.head.weight[new], src.head.weight[old])
    assert [n.split(":")[0] for n in adapter.notes()] == ["head.weight", "head.bias"]
    assert set(adapter.summary) == {"head.weight", "head.bias"}


def test_meta_model_from_empty_init(r18_imagenet):
    with surgery.empty_init():
        model = torchvision.models.resnet18(num_classes=3)
    assert model.fc.weight.is_meta
    rows = surgery.head_rows(SYNSETS, [SYNSETS[10], "new", SYNSETS[0]])
    torch.manual_seed(5)
    report = surgery.load_partial(model, r18_imagenet, on_mismatch=rows)
    expected = fresh_linear(5, 512, 3)

    assert not any(t.is_meta for t in model.state_dict().values())
    assert isinstance(model.fc.weight, nn.Parameter) and model.fc.weight.requires_grad
    assert torch.equal(model.fc.weight[0], r18_imagenet["fc.weight"][10])
    assert torch.equal(model.fc.weight[2], r18_imagenet["fc.weight"][0])
    assert torch.equal(model.fc.weight[1], expected.weight[1])
    assert torch.equal(model.fc.bias[1], expected.bias[1])
    assert "fc.weight" not in report.initialised


def test_bias_before_weight_in_the_file(tmp_path):
    """safetensors sorts keys (fc.bias first); apply hands a layer's weight to the adapter first,
    so the bias's new rows come from the same fresh layer, and the notes reach the report."""
    torch.manual_seed(0)
    src = SmallCNN(num_classes=5)
    path = tmp_path / "small.safetensors"
    save_file(src.state_dict(), path)
    model = SmallCNN(num_classes=6)
    torch.manual_seed(9)
    report = surgery.load_partial(model, path, on_mismatch=surgery.head_rows(range(5), range(6)))
    expected = fresh_linear(9, 16, 6)
    assert torch.equal(model.fc.bias[5], expected.bias[5])
    assert torch.equal(model.fc.weight[5], expected.weight[5])
    assert torch.equal(model.fc.weight[:5], src.fc.weight)
    assert any("fc.weight: kept 5 of 6 rows" in n for n in report.notes), report.notes


def test_bias_alone_needs_the_model():
    """A checkpoint whose head bias mismatches but whose weight is absent: no fan-in known."""
    torch.manual_seed(0)
    src = SmallCNN(num_classes=5)
    sd = {k: v for k, v in src.state_dict().items() if k != "fc.weight"}
    model = SmallCNN(num_classes=6)
    before = snapshot(model)
    with pytest.raises(surgery.LoadError, match=r"'fc.bias'.*Pass model=") as e:
        surgery.load_partial(model, sd, on_mismatch=surgery.head_rows(range(5), range(6)))
    assert "Nothing was loaded" in str(e.value)
    assert_same_state(model, before)
    surgery.load_partial(model, sd, on_mismatch=surgery.head_rows(range(5), range(6), model=model))
    assert torch.equal(model.fc.bias[:5], src.fc.bias)


def test_conv_classifier_and_other_mismatches_pass_through():
    torch.manual_seed(0)
    src = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1))  # a 1x1-conv classifier
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 5, 1))
    rows = surgery.head_rows(range(4), [3, 2, 1, 0, 4])
    report = surgery.load_partial(model, src, on_mismatch=rows)

    assert [m.key for m in report.mismatched] == ["0.weight"]  # not a head: left to others
    assert torch.equal(model[1].weight[0], src[1].weight[3])
    bound = 1 / math.sqrt(8)
    assert model[1].weight[4].abs().max() <= bound and model[1].bias[4].abs() <= bound


def test_no_shared_label_is_noted():
    src, model = nn.Linear(2, 3), nn.Linear(2, 4)
    rows = surgery.head_rows(["0", "1", "2"], [0, 1, 2, 3])  # str vs int: nothing in common
    surgery.load_partial(model, src, on_mismatch=rows)
    assert rows.summary["weight"]["kept"] == 0
    assert "no label is in both lists" in rows.notes()[-1]


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        (["a", "b", "a"], ["a"], r"old_labels holds 'a' twice \(positions 0 and 2\)"),
        (["a"], [], "new_labels is empty"),
        ([["a"]], ["a"], "not hashable"),
        (3, ["a"], "must be a list of labels or a file path, not int"),
    ],
)
def test_bad_labels(old, new, match):
    with pytest.raises(surgery.UsageError, match=match):
        surgery.head_rows(old, new)


def test_bad_options():
    with pytest.raises(surgery.UsageError, match="init must be 'default' or 'mean'"):
        surgery.head_rows(["a"], ["b"], init="zeros")
    with pytest.raises(surgery.UsageError, match="chain takes callables"):
        surgery.chain(surgery.head_rows(["a"], ["b"]), "skip")
