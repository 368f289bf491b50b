"""Shared fixtures: small real models and checkpoints written to tmp_path (no downloads).

The builders behind them are in the ``support`` package (``tests/support/``), which tests
import; no test imports this module."""

from __future__ import annotations

import pytest
import torch

from support import resnet18_state

# tests/fuzz holds an atheris harness run by hand (see the README), not tests.
collect_ignore = ["fuzz"]


@pytest.fixture(scope="session")
def r18_imagenet() -> dict[str, torch.Tensor]:
    """A 1000-class torchvision resnet18 state dict with random (seeded) weights."""
    return resnet18_state(seed=0)


@pytest.fixture()
def r18_path(tmp_path, r18_imagenet) -> str:
    path = tmp_path / "resnet18.pth"
    torch.save(r18_imagenet, path)
    return str(path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip cleanly where no CUDA device is (the suite never needs one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
