"""A small CNN on scikit-learn's bundled 8x8 digits: real data for pruning and fine-tuning experiments.

    split = load_digits_split(seed=0)
    model = DigitsCNN()
    fit(model, split.x_train, split.y_train, epochs=20)
    accuracy(model, split.x_test, split.y_test)   # ~0.98
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fxopt.errors import InputError

__all__ = ["DigitsCNN", "DigitsSplit", "accuracy", "fit", "load_digits_split"]

NUM_CLASSES = 10
IMAGE_SIZE = 8
_PIXEL_MAX = 16.0  # load_digits pixels are integers 0..16


@dataclass(frozen=True)
class DigitsSplit:
    """A fixed train/test split of the digits; images are ``(N, 1, 8, 8)`` float in [0, 1]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> DigitsSplit:
    """The 1797 digits of `sklearn.datasets.load_digits`, shuffled by `seed` and split.

    The data ships with scikit-learn; nothing is downloaded.

    Args:
        seed: seeds the permutation, so a seed always gives the same split.
        test_fraction: share of the samples held out for testing, in (0, 1).

    Returns:
        A `DigitsSplit`.

    Example:
        >>> split = load_digits_split(seed=0)
        >>> tuple(split.x_train.shape), tuple(split.x_test.shape)
        ((1348, 1, 8, 8), (449, 1, 8, 8))
    """
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / _PIXEL_MAX
    labels = torch.as_tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return DigitsSplit(images[train], labels[train], images[test], labels[test])


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU blocks, two max-pools, flatten and a two-layer classifier.

    The flatten -> linear step makes the last conv's channels a pruning dependency of the
    classifier's input features (4 features per channel on the 2x2 map).

    Args:
        width: channels of the first block; the others have 2x and 4x as many.
        hidden: features of the hidden linear layer.

    Example:
        >>> DigitsCNN(width=8)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        if width < 1 or hidden < 1:
            raise InputError(f"width and hidden must be positive, got {width}, {hidden}")
        self.features = nn.Sequential(
            _conv_block(1, width),
            _conv_block(width, 2 * width),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            _conv_block(2 * width, 4 * width),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * width * 4, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 20,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> list[float]:
    """Train `model` in place (Adam, cosine learning-rate decay, cross-entropy); leave it in eval mode.

    Works on any module with parameters, including a pruned `torch.fx.GraphModule`
    (every parameter is made trainable first).

    Args:
        model: the module to train (modified in place).
        x: images ``(N, 1, 8, 8)``.
        y: class labels ``(N,)``.
        epochs: passes over the data.
        lr: Adam learning rate.
        batch_size: samples per step.
        seed: seeds the batch order.

    Returns:
        The mean training loss of each epoch.
    """
    if epochs < 0 or batch_size < 1:
        raise InputError(f"epochs must be >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=lr)
    steps_per_epoch = -(-len(y) // batch_size)
    # cosine decay to zero: the last epochs settle instead of ending on a noisy step
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for start in range(0, len(y), batch_size):
            batch = order[start:start + batch_size]
            loss = loss_fn(model(x[batch]), y[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        losses.append(total / len(y))
    model.eval()
    return losses


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` (run in eval mode, without gradients) on ``(x, y)``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            logits = model(x[start:start + batch_size])
            correct += int((logits.argmax(dim=1) == y[start:start + batch_size]).sum())
    return correct / len(y)
