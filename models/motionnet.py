"""MotionNet-style BEV network: spatio-temporal encoder, 2D U-Net, per-cell category/motion/state.

Registered as ``"motionnet"``. The input is a sequence of BEV occupancy grids (B, T, C, H, W)
(C height bins; with ``height_bins=None`` the input is (B, T, H, W)). Two spatio-temporal
blocks (a per-frame 3x3 conv then a temporal 3x1x1 conv, the second block at half resolution)
feed temporal max pooling; a 2D U-Net runs on the pooled features down to 1/8 resolution and
back; three heads give per-cell logits of the category (background / vehicle / pedestrian),
the displacement ``(dx, dy)`` to a future frame (the data's ``horizon``) and static/moving logits.

Example:
    >>> import torch
    >>> model = MotionNet(MotionNetConfig()).eval()
    >>> out = model(torch.zeros(1, 5, 4, 64, 64))
    >>> {k: tuple(v.shape) for k, v in out.items()}
    {'category': (1, 3, 64, 64), 'motion': (1, 2, 64, 64), 'state': (1, 2, 64, 64)}
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxopt.errors import InputError
from fxopt.models.bev_sequence_data import (
    BEV_CATEGORIES,
    BevBatch,
    BevSequenceConfig,
    generate_bev_batch,
)
from fxopt.models.metrics import cell_accuracy, motion_error, segmentation_miou
from fxopt.models.registry import ModelSpec, TrainingRecipe, register_model

__all__ = [
    "PRESETS", "RECIPE", "MotionNet", "MotionNetConfig", "build", "chance", "eval_set", "evaluate",
    "example_inputs", "motion_loss", "motionnet_config",
]


@dataclass(frozen=True)
class MotionNetConfig:
    """Sizes of the BEV network.

    Attributes:
        frames: input frames T of the example inputs (the network takes any T).
        height_bins: occupancy channels per frame (None: input (B, T, H, W), one channel).
        grid: cells per side (a multiple of 8).
        channels: features at full, 1/2, 1/4 and 1/8 resolution.
        num_categories: per-cell classes.
    """

    frames: int = 5
    height_bins: int | None = 4
    grid: int = 64
    channels: tuple[int, int, int, int] = (16, 32, 64, 96)
    num_categories: int = len(BEV_CATEGORIES)


PRESETS: dict[str, MotionNetConfig] = {
    "default": MotionNetConfig(),
    # MotionNet's published scale: 256x256 grid, 13 height slices, 5 frames, wider features
    "full": MotionNetConfig(height_bins=13, grid=256, channels=(32, 64, 128, 256)),
}


def motionnet_config(preset: str = "default", **overrides: Any) -> MotionNetConfig:
    """The config of `preset` with fields replaced by `overrides`."""
    if preset not in PRESETS:
        raise InputError(f"unknown motionnet preset '{preset}'; known: {', '.join(PRESETS)}")
    try:
        config = replace(PRESETS[preset], **overrides)
    except TypeError as error:
        raise InputError(f"bad motionnet config override: {error}") from None
    if config.grid % 8:
        raise InputError(f"motionnet grid {config.grid} must be a multiple of 8 (three 2x downsamplings)")
    if len(config.channels) != 4:
        raise InputError(f"motionnet needs 4 channel widths, got {config.channels}")
    return config


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SpatioTemporalBlock(nn.Module):
    """Per-frame 3x3 conv (optionally strided) then a temporal 3x1x1 conv, on (B, C, T, H, W).

    Both are Conv3d with BatchNorm3d, so the block needs no reshape: any T, static ONNX shapes,
    and channel pruning sees plain conv -> BN chains.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.spatial = nn.Sequential(
            nn.Conv3d(cin, cout, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)
        )
        self.temporal = nn.Sequential(
            nn.Conv3d(cout, cout, (3, 1, 1), 1, (1, 0, 0), bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal(self.spatial(x))


class UpBlock(nn.Module):
    """2x nearest upsampling, concatenation with the skip, two 3x3 convs."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(cin + skip, cout), conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skip], 1))


def _head(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(cin, cin), nn.Conv2d(cin, cout, 1))


class MotionNet(nn.Module):
    """Spatio-temporal pyramid encoder + U-Net + category / motion / state heads.

    ``forward(occupancy)`` (a sequence of any length) returns ``{"category": (B,K,H,W) logits, "motion": (B,2,H,W)
    displacements (dx, dy) in cells, "state": (B,2,H,W) static/moving logits}``.
    """

    def __init__(self, config: MotionNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or MotionNetConfig()
        c0, c1, c2, c3 = self.config.channels
        self.st1 = SpatioTemporalBlock(self.config.height_bins or 1, c0)
        self.st2 = SpatioTemporalBlock(c0, c1, stride=2)
        self.down3 = nn.Sequential(conv_bn_relu(c1, c2, stride=2), conv_bn_relu(c2, c2))
        self.down4 = nn.Sequential(conv_bn_relu(c2, c3, stride=2), conv_bn_relu(c3, c3))
        self.up3 = UpBlock(c3, c2, c2)
        self.up2 = UpBlock(c2, c1, c1)
        self.up1 = UpBlock(c1, c0, c0)
        self.category = _head(c0, self.config.num_categories)
        self.motion = _head(c0, 2)
        self.state = _head(c0, 2)

    def forward(self, occupancy: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.config.height_bins is None:
            occupancy = occupancy.unsqueeze(2)
        x = occupancy.permute(0, 2, 1, 3, 4)  # (B, C, T, H, W)
        f1 = self.st1(x)
        f2 = self.st2(f1)
        s1, s2 = f1.amax(dim=2), f2.amax(dim=2)  # temporal max pooling
        s3 = self.down3(s2)
        x = self.up1(self.up2(self.up3(self.down4(s3), s3), s2), s1)
        return {"category": self.category(x), "motion": self.motion(x), "state": self.state(x)}


def motion_loss(outputs: dict[str, torch.Tensor], batch: BevBatch) -> torch.Tensor:
    """Category cross-entropy (all cells, plus occupied cells again: they are few but hard),
    smooth-L1 displacement and state cross-entropy on occupied cells."""
    occupied = batch.occupied
    count = occupied.sum().clamp(min=1)
    category_error = F.cross_entropy(outputs["category"], batch.category, reduction="none")
    category = category_error.mean() + (category_error * occupied).sum() / count
    disp_error = F.smooth_l1_loss(outputs["motion"], batch.displacement, reduction="none").sum(1)
    motion = (disp_error * occupied).sum() / count
    state = (F.cross_entropy(outputs["state"], batch.moving.long(), reduction="none") * occupied).sum() / count
    return category + motion + state


# --- training recipe -------------------------------------------------------------------------

DATA = BevSequenceConfig()
TRAIN_BATCH = 8
EVAL_SCENES = 32
EVAL_SEED = 20_011  # the held-out set; training draws from the train() seed's generator
VALIDATION_SEED = 40_009  # the validation set a fine-tune selects by, apart from the held-out one


@functools.cache
def eval_set(seed: int = EVAL_SEED) -> BevBatch:
    """The fixed, seeded held-out sequences the recipe evaluates on (`VALIDATION_SEED`: validates on)."""
    return generate_bev_batch(EVAL_SCENES, DATA, seed=seed)


def _scores(category: torch.Tensor, motion: torch.Tensor, state: torch.Tensor, data: BevBatch) -> dict[str, float]:
    foreground = data.category > 0
    error = motion_error(motion, data.displacement, mask=foreground, moving=data.moving, dim=1)
    return {
        "category_miou": segmentation_miou(category, data.category, len(BEV_CATEGORIES))["miou"],
        "category_acc_occupied": cell_accuracy(category, data.category, mask=data.occupied),
        "state_acc_foreground": cell_accuracy(state, data.moving.long(), mask=foreground),
        "motion_error": error["mean"],
        "motion_error_moving": error["moving"],
    }


def evaluate(model: nn.Module, seed: int = EVAL_SEED) -> dict[str, float]:
    """Category mIoU and accuracy, state accuracy and displacement error (cells; lower is better)."""
    data = eval_set(seed)
    outputs = [model(occupancy) for occupancy in data.occupancy.split(16)]
    category, motion, state = (torch.cat([o[key] for o in outputs]) for key in ("category", "motion", "state"))
    return _scores(category.argmax(1), motion, state.argmax(1), data)


def chance() -> dict[str, float]:
    """The best constant predictor on `eval_set`, per metric.

    Every pair (one category everywhere, one state everywhere) with zero motion is scored; each
    metric keeps its best value over the pairs (highest accuracy / mIoU, lowest error).
    """
    data = eval_set()
    zero = torch.zeros_like(data.displacement)
    scored = [
        _scores(torch.full_like(data.category, c), zero, torch.full_like(data.category, s), data)
        for c in range(len(BEV_CATEGORIES))
        for s in (0, 1)
    ]
    return {key: (min if key.startswith("motion") else max)(s[key] for s in scored) for key in scored[0]}


def _batch(step: int, generator: torch.Generator) -> tuple[tuple[torch.Tensor], BevBatch]:
    data = generate_bev_batch(TRAIN_BATCH, DATA, generator=generator)
    return (data.occupancy,), data


RECIPE = TrainingRecipe(
    batch=_batch, loss=motion_loss,
    evaluate=evaluate,
    validate=functools.partial(evaluate, seed=VALIDATION_SEED),
    chance=chance,
    steps=300, lr=2e-3,
)


def build(**cfg: Any) -> MotionNet:
    """A `MotionNet` of `motionnet_config(**cfg)` (random weights; seed torch first)."""
    return MotionNet(motionnet_config(**cfg))


def example_inputs(batch_size: int = 1, **cfg: Any) -> tuple[torch.Tensor]:
    """One random input batch for `build(**cfg)`."""
    c = motionnet_config(**cfg)
    shape = (batch_size, c.frames) + ((c.height_bins,) if c.height_bins is not None else ()) + (c.grid, c.grid)
    return ((torch.rand(shape) < 0.05).float(),)


register_model(ModelSpec(
    name="motionnet",
    build=build,
    inputs=example_inputs,
    summary="MotionNet-style BEV net: 5 frames of 4x64x64 occupancy -> per-cell category, motion, state",
    presets=tuple(PRESETS),
    recipe=RECIPE,
))
