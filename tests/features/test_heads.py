"""head_rows: classifier rows kept by label, new rows initialised like a fresh layer."""

from __future__ import annotations

import gc
import inspect
import math
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import surgery
from surgery.adapters import adapt_shapes

from support import SmallCNN, assert_same_state, snapshot

SYNSETS = [f"n{i:08d}" for i in range(1000)]  # stand-ins for ImageNet's synset ids


def fresh_linear(seed: int, in_features: int, out_features: int) -> nn.Linear:
    """The oracle for new rows: head_rows draws the k new rows as a fresh ``nn.Linear`` with k
    outputs would (weight, then bias), not a whole fresh layer of the new size."""
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def test_imagenet_head_to_ten_classes_seven_known(r18_imagenet):
    kept = {0: 3, 1: 999, 3: 0, 4: 500, 6: 42, 7: 7, 9: 250}  # new row -> old row
    new_labels = [SYNSETS[kept[i]] if i in kept else f"mine{i}" for i in range(10)]
    model = torchvision.models.resnet18(num_classes=10)
    rows = surgery.head_rows(SYNSETS, new_labels)

    torch.manual_seed(123)
    report = surgery.load_partial(model, r18_imagenet, on_mismatch=rows)
    expected = fresh_linear(123, 512, 3)  # the 3 new rows, as reset_parameters draws them

    assert sorted(m.key for m in report.adapted) == ["fc.bias", "fc.weight"]
    assert not report.mismatched and not report.missing
    for new, old in kept.items():
        assert torch.equal(model.fc.weight[new], r18_imagenet["fc.weight"][old])
        assert torch.equal(model.fc.bias[new], r18_imagenet["fc.bias"][old])
    for i, new in enumerate((2, 5, 8)):
        assert torch.equal(model.fc.weight[new], expected.weight[i])
        assert torch.equal(model.fc.bias[new], expected.bias[i])
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
    expected = fresh_linear(5, 512, 1)

    assert not any(t.is_meta for t in model.state_dict().values())
    assert isinstance(model.fc.weight, nn.Parameter) and model.fc.weight.requires_grad
    assert torch.equal(model.fc.weight[0], r18_imagenet["fc.weight"][10])
    assert torch.equal(model.fc.weight[2], r18_imagenet["fc.weight"][0])
    assert torch.equal(model.fc.weight[1], expected.weight[0])
    assert torch.equal(model.fc.bias[1], expected.bias[0])
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
    expected = fresh_linear(9, 16, 1)
    assert torch.equal(model.fc.bias[5], expected.bias[0])
    assert torch.equal(model.fc.weight[5], expected.weight[0])
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


# --------------------------------------------------------------------------- memory (issue 23)


class BigAllocations(TorchDispatchMode):
    """Records every tensor an aten op allocates of at least ``min_bytes`` (outputs that share no
    storage with the op's inputs: views and in-place results are not allocations)."""

    def __init__(self, min_bytes: int) -> None:
        super().__init__()
        self.min_bytes = min_bytes
        self.seen: list[tuple[str, tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and not t.is_meta
        }
        for t in tree_flatten(out)[0]:
            if (
                isinstance(t, torch.Tensor)
                and not t.is_meta
                and t.untyped_storage().nbytes() >= self.min_bytes
                and t.untyped_storage().data_ptr() not in inputs
            ):
                self.seen.append((str(func), tuple(t.shape), t.dtype))
        return out


def reachable_tensor_bytes(root: object) -> int:
    """Bytes of every tensor reachable from ``root`` through references (gc's view of it)."""
    seen, stack, total = {id(root)}, [root], 0
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            total += obj.untyped_storage().nbytes()
            continue
        if isinstance(obj, type) or inspect.ismodule(obj):
            continue
        for ref in gc.get_referents(obj):
            if id(ref) not in seen:
                seen.add(id(ref))
                stack.append(ref)
    return total


def meta_like(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("old", "new", "init"),
    [
        (range(3000), range(3008), "default"),  # added tokens: one run of kept rows
        (range(3000), range(3008), "mean"),
        (range(3000), [*reversed(range(3000)), "x"], "default"),  # every row moves: gathered
        (range(3000), [*range(0, 3000, 2), "y"], "default"),  # half the rows, 1500 runs
    ],
    ids=["tokens", "mean", "reversed", "every-other"],
)
def test_only_the_output_is_allocated_at_the_head_size(old, new, init, dtype, monkeypatch):
    """Issue 23: no fresh full-size layer, no gathered copy, no float32 copy of a bf16 tensor:
    the output is the only allocation as large as a quarter of the head (scattered rows and
    sums go through a buffer of _CHUNK_BYTES, 16 MiB, made small here for a small head)."""
    monkeypatch.setattr(surgery.heads, "_CHUNK_BYTES", 1 << 16)
    torch.manual_seed(0)
    ckpt = torch.randn(3000, 256).to(dtype)
    rows = surgery.head_rows(old, new, init=init)
    target = meta_like((len(rows.new_labels), 256), dtype)
    size = target.numel() * target.element_size()
    with BigAllocations(size // 4) as allocs:
        out = rows("lm_head.weight", ckpt, target)
    assert allocs.seen == [("aten.empty.memory_format", tuple(target.shape), dtype)], allocs.seen

    old_pos = {lb: i for i, lb in enumerate(old)}
    for i, label in enumerate(new):  # oracle: the checkpoint's own rows, indexed in torch
        if label in old_pos:
            assert torch.equal(out[i], ckpt[old_pos[label]]), i
    added = [i for i, lb in enumerate(new) if lb not in old_pos]
    if init == "mean":
        expected = ckpt.float().mean(0).to(dtype)
        for i in added:
            torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-6)
    else:
        bound = 1 / math.sqrt(256)
        assert out[added].float().abs().max() <= bound
        assert out[added].float().std() > bound / 4


def test_scattered_rows_through_a_small_buffer(monkeypatch):
    """The gather path in chunks of a few rows gives what plain indexing gives."""
    monkeypatch.setattr(surgery.heads, "_CHUNK_BYTES", 3 * 16 * 4)  # 3 rows of 16 float32
    ckpt = torch.randn(500, 16)
    new = [*range(500)][::-1]
    out = surgery.head_rows(range(500), [*new, "z"])("w", ckpt, meta_like((501, 16), ckpt.dtype))
    assert torch.equal(out[:500], ckpt[torch.tensor(new)])
    # float32 checkpoint rows into a bf16 model: cast as .to() casts
    out = surgery.head_rows(range(500), [*new, "z"])(
        "w", ckpt, meta_like((501, 16), torch.bfloat16)
    )
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[:500], ckpt[torch.tensor(new)].to(torch.bfloat16))


def test_nothing_held_after_the_load():
    """Issue 23: the adapter kept a fresh layer per head after the load; now only its label
    index tensors stay (three vectors of ints), whatever the head's size."""
    torch.manual_seed(0)
    src, model = nn.Linear(512, 1000), nn.Linear(512, 1008)
    rows = surgery.head_rows(range(1000), range(1008))
    before = reachable_tensor_bytes(rows)
    assert before <= 3 * 1008 * 8
    surgery.load_partial(model, src, on_mismatch=rows)
    assert torch.equal(model.weight[:1000], src.weight) and torch.equal(model.bias[:1000], src.bias)
    assert reachable_tensor_bytes(rows) == before
    assert rows.summary["weight"]["kept"] == 1000 and len(rows.notes()) == 2


_RSS_SCRIPT = """
import gc, resource, sys, torch, surgery
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
ckpt = torch.empty(32000, 2048).normal_()  # float32: 262 MB, a TinyLlama vocabulary
target = torch.empty(32008, 2048, device="meta")
rows = surgery.head_rows(range(32000), range(32008))
gc.collect()
peak0, rss0 = peak(), rss()
out = rows("lm_head.weight", ckpt, target)
grew = peak() - peak0
ok = torch.equal(out[:32000], ckpt)
del out
gc.collect()
print(grew, rss() - rss0, int(ok))
"""


@pytest.mark.distributed  # spawns a process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_resident_memory_of_a_vocabulary_head():
    """In a fresh process (a 262 MB float32 vocabulary head): the call's peak grows by about
    the output alone (before: output + a fresh float32 layer + a gathered copy), and nothing
    stays resident once the output is dropped (before: the fresh layer, 262 MB)."""
    done = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    grew, kept, ok = map(int, done.stdout.split())
    out_bytes = 32008 * 2048 * 4
    assert ok == 1
    assert grew < 1.15 * out_bytes, (grew, out_bytes)
    assert kept < 32 << 20, kept


@pytest.mark.parametrize("tie", [True, False])
def test_llama_added_tokens_bf16_meta(tmp_path, tie):
    """A Llama saved by transformers, loaded into an empty_init bf16 model with 8 more tokens:
    old rows equal the file's, new rows drawn at the layer's bounds, ties kept."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    cfg = dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(0)
    src = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(torch.bfloat16)
    src.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    with surgery.empty_init():
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**{**cfg, "vocab_size": 108})
        )
    model.to(torch.bfloat16)
    rows = surgery.head_rows(range(100), range(108))
    report = surgery.load_partial(model, tmp_path, on_mismatch=rows)

    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert embed.dtype == torch.bfloat16 and not embed.is_meta and not head.is_meta
    assert (head is embed) == tie
    assert torch.equal(embed[:100], saved["model.embed_tokens.weight"])
    if not tie:
        assert torch.equal(head[:100], saved["lm_head.weight"])
    for w in (embed, head):
        new = w[100:].float()
        assert new.abs().max() <= 1 / math.sqrt(32) and new.std() > 0.02
    assert {m.key for m in report.adapted} >= {"model.embed_tokens.weight"}
    assert report.ok and not report.missing
    assert len(rows.notes()) == (1 if tie else 2)


def test_new_rows_have_the_full_layers_distribution():
    """The bounds and spread of the drawn rows are those of a fresh full-size nn.Linear's."""
    torch.manual_seed(1)
    src, model = nn.Linear(64, 10), nn.Linear(64, 2010)
    surgery.load_partial(model, src, on_mismatch=surgery.head_rows(range(10), range(2010)))
    fresh = nn.Linear(64, 2010)  # oracle: reset_parameters of the whole new layer
    new_w, new_b = model.weight[10:].detach(), model.bias[10:].detach()
    assert new_w.abs().max() <= 1 / 8 and new_b.abs().max() <= 1 / 8
    torch.testing.assert_close(new_w.std(), fresh.weight.detach().std(), rtol=0.02, atol=0)
    torch.testing.assert_close(new_b.std(), fresh.bias.detach().std(), rtol=0.1, atol=0)
    assert abs(float(new_w.mean())) < 0.005


def test_conv_head_rows_are_a_fresh_conv_with_k_outputs():
    torch.manual_seed(0)
    src, model = nn.Conv2d(8, 4, 3), nn.Conv2d(8, 6, 3)
    torch.manual_seed(7)
    surgery.load_partial(model, src, on_mismatch=surgery.head_rows(range(4), range(6)))
    torch.manual_seed(7)
    expected = nn.Conv2d(8, 2, 3)  # oracle: the two new rows as reset_parameters draws them
    assert torch.equal(model.weight[4:], expected.weight) and torch.equal(
        model.bias[4:], expected.bias
    )
    assert torch.equal(model.weight[:4], src.weight)


def test_a_six_dimensional_head_has_no_default_init():
    def holder(n: int) -> nn.Module:
        m = nn.Module()
        m.w = nn.Parameter(torch.ones(n, 1, 1, 1, 1, 1) * n)
        m.other = nn.Parameter(torch.zeros(2))
        return m

    src, model = holder(2), holder(3)
    src.other.data.fill_(5)
    before = snapshot(model)
    with pytest.raises(surgery.LoadError, match="no default init for a 6-d head weight"):
        surgery.load_partial(model, src, on_mismatch=surgery.head_rows(range(2), range(3)))
    assert_same_state(model, before)
    surgery.load_partial(model, src, on_mismatch=surgery.head_rows(range(2), range(3), init="mean"))
    assert torch.equal(model.w, torch.full((3, 1, 1, 1, 1, 1), 2.0))
    assert torch.equal(model.other, src.other)
