"""A toy task for the pipeline tests: a small classifier on seeded Gaussian data (seconds per run)."""

from __future__ import annotations

import torch
from torch import nn

from fxopt.automation import UserTask


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


def data(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 4, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    batches = [((x[i:i + 8],), y[i:i + 8]) for i in range(0, 96, 8)]
    return {"train": batches[:8], "eval": batches[8:], "calib": [b[0] for b in batches[:4]]}


def accuracy(model, batches) -> dict:
    hits = sum(int((model(*inputs).argmax(1) == target).sum()) for inputs, target in batches)
    return {"accuracy": hits / sum(len(target) for _, target in batches)}


def toy_task(**overrides) -> UserTask:
    options = {"build": build, "data": data, "loss": nn.functional.cross_entropy, "metrics": accuracy,
               "example_inputs": (torch.randn(1, 4, generator=torch.Generator().manual_seed(0)),), "train_steps": 40, **overrides}
    return UserTask("toy", **options)


# two variants sharing data and train; ratio 0.6 gets a short distillation fine-tune
OPTIONS = {"latency_ratios": (1.0, 0.6), "precisions": ("int8",), "finetune_steps": 3, "calib_batches": 4}
