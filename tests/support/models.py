"""Small real models the tests load into: the smallest CNN with every kind of state, a net with
tied weights, and a seeded 1000-class resnet18 state dict (the "pretrained" checkpoint)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

__all__ = ["Renaming", "SmallCNN", "Tied", "resnet18_state"]


class SmallCNN(nn.Module):
    """A 2-layer CNN with BatchNorm: the smallest model with every kind of state."""

    def __init__(self, in_ch: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class Tied(nn.Module):
    """An embedding whose weight the output layer shares (tied parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.out = nn.Linear(4, 11, bias=False)
        self.out.weight = self.embed.weight


class Renaming(nn.Module):
    """Renames its old key ``old.weight`` to ``lin.weight`` in a load_state_dict pre-hook:
    a module that loads itself."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_load_state_dict_pre_hook(self._rename)

    @staticmethod
    def _rename(module, sd, prefix, *_) -> None:  # type: ignore[no-untyped-def]
        for n in ("weight", "bias"):
            if f"{prefix}old.{n}" in sd:
                sd[f"{prefix}lin.{n}"] = sd.pop(f"{prefix}old.{n}")


def resnet18_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A 1000-class torchvision resnet18 state dict with random (seeded) weights and BatchNorm
    statistics away from their defaults, so copying them is visible."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    return {k: v.clone() for k, v in model.state_dict().items()}
