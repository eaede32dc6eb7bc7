"""Models for the verification regression tests (in a real file: torch.jit.script needs source)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Branchy(nn.Module):
    """Data-dependent control flow: fx makes it a leaf; the exporter would freeze one branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return x.relu()
        return -x


class UnscriptableBranch(nn.Module):
    """A data-dependent branch TorchScript cannot compile (a numpy call)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = float(np.float32(2.0))
        if x.mean() > 0:
            return x * scale
        return -x


class WithLeaf(nn.Module):
    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.middle = middle
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.conv(x)))


class InPlaceInput(nn.Module):
    """Writes into its own input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.bn(self.conv(x))


def export_cases() -> list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]]:
    """Models whose ONNX export the clean-up tests compare: the bundled camera_multitask, pointpillars and
    safety_supervisor (random weights, seeded) and torchvision's mobilenet_v3_small (the exporter's Identity of
    shared weights)."""
    import torchvision

    from fxopt import models

    torch.manual_seed(0)
    cases = [(n, models.create(n).eval(), models.example_inputs(n)) for n in ("camera_multitask", "pointpillars", "safety_supervisor")]
    return cases + [("mobilenet_v3_small", torchvision.models.mobilenet_v3_small().eval(), (torch.randn(1, 3, 64, 64),))]
