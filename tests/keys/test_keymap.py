"""Prefix detection and remap rules on plain key lists."""

from __future__ import annotations

import pytest

from surgery.errors import KeyCollisionError
from surgery.keys.prefix import apply_prefix, detect_prefix
from surgery.keys.remap import apply_remap

MODEL = {"conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight", "fc.weight", "fc.bias"}


@pytest.mark.parametrize(
    ("ckpt", "model", "expected"),
    [
        ([f"module.{k}" for k in MODEL], MODEL, ("module.", "")),
        ([f"module.module.{k}" for k in MODEL], MODEL, ("module.module.", "")),
        (list(MODEL), {f"module.{k}" for k in MODEL}, ("", "module.")),
        (
            [f"backbone.body.{k}" for k in MODEL] + ["rpn.conv.weight"],
            MODEL,
            ("backbone.body.", ""),
        ),
        (
            [f"module.backbone.{k}" for k in MODEL],
            {f"encoder.{k}" for k in MODEL},
            ("module.backbone.", "encoder."),
        ),
        (list(MODEL), MODEL, None),
        # One stray key must not become a rewrite of its own.
        ([*sorted(MODEL - {"layer1.0.conv1.weight"}), "aux_head.weight"], MODEL, None),
    ],
)
def test_detect_prefix(ckpt, model, expected):
    assert detect_prefix(ckpt, set(model)) == expected


def test_prefix_rewrite_collision_is_an_error():
    new_to_old = {"module.fc.weight": "module.fc.weight", "fc.weight": "fc.weight"}
    with pytest.raises(KeyCollisionError, match="prefix=None"):
        apply_prefix(new_to_old, ("module.", ""))


def test_unused_remap_rule_is_noted():
    _, _, notes = apply_remap(["a.b"], {"a.c": "x"})
    assert notes == ["remap rule 'a.c' matched no checkpoint key"]


def test_detect_prefix_scales_linearly():
    # 100k keys with a DDP prefix: correctness here; speed is in tests/benchmarks/load_bench.py.
    model = {f"blocks.{i}.mlp.fc{j}.weight" for i in range(25_000) for j in range(4)}
    ckpt = [f"module.{k}" for k in model]
    assert detect_prefix(ckpt, model) == ("module.", "")
