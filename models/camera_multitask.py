"""Camera multi-task network: residual CNN backbone, FPN neck, CenterNet detection and segmentation.

Registered as ``"camera_multitask"``. The detection head works on the stride-4 FPN level: a
per-class centre heatmap (logits) and four box values per cell (see `fxopt.models.camera_data`
for their encoding); the segmentation head sums all FPN levels at stride 4 (Panoptic-FPN style)
and upsamples the class logits to the input resolution.

Example:
    >>> import torch
    >>> model = CameraMultitaskNet(CameraMultitaskConfig()).eval()
    >>> out = model(torch.rand(1, 3, 96, 160))
    >>> {k: tuple(v.shape) for k, v in out.items()}
    {'heatmap': (1, 3, 24, 40), 'box': (1, 4, 24, 40), 'seg': (1, 5, 96, 160)}
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxopt.distill import Distill, FeatureMSE, LogitKD, OutputKD, SigmoidKD
from fxopt.errors import InputError
from fxopt.models.camera_data import (
    CAMERA_CLASSES,
    SEG_CLASSES,
    CameraBatch,
    CameraDataConfig,
    generate_camera_batch,
)
from fxopt.models.camera_eval import Detections, image_box_ap
from fxopt.models.metrics import segmentation_miou
from fxopt.models.registry import ModelSpec, TrainingRecipe, register_model

__all__ = [
    "PRESETS", "RECIPE", "CameraMultitaskConfig", "CameraMultitaskNet", "build", "camera_config", "chance",
    "data_config", "decode_detections", "eval_set", "evaluate", "example_inputs", "multitask_loss", "recipe",
]

STRIDE = 4  # the detection head's FPN level


@dataclass(frozen=True)
class CameraMultitaskConfig:
    """Sizes of the camera network.

    Attributes:
        height, width: input image size (multiples of 32: four stride-2 stages after the stem).
        in_channels: image channels.
        widths: channels of the stride-2 stem and of the stages at strides 4, 8, 16, 32.
        blocks: residual blocks in each of the four stages.
        fpn_channels: channels of the FPN levels.
        head_channels: hidden channels of the heads.
        num_classes: detection classes.
        num_seg_classes: segmentation classes.
    """

    height: int = 96
    width: int = 160
    in_channels: int = 3
    widths: tuple[int, ...] = (16, 24, 48, 64, 96)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    fpn_channels: int = 48
    head_channels: int = 48
    num_classes: int = len(CAMERA_CLASSES)
    num_seg_classes: int = len(SEG_CLASSES)


PRESETS: dict[str, CameraMultitaskConfig] = {
    "default": CameraMultitaskConfig(),
    # a mid-sized variant (192x320, wider and deeper) whose Xavier estimate is dominated by compute
    # rather than per-inference and per-kernel overheads; its recipe trains in minutes on a CPU
    "md": CameraMultitaskConfig(
        height=192, width=320, widths=(32, 48, 96, 160, 256), blocks=(1, 2, 2, 1),
        fpn_channels=96, head_channels=96,
    ),
    # a deployment-sized variant (384x640, deeper and wider) for compile and latency studies
    "hd": CameraMultitaskConfig(
        height=384, width=640, widths=(32, 48, 96, 160, 256), blocks=(1, 2, 3, 2),
        fpn_channels=96, head_channels=96,
    ),
}


def camera_config(preset: str = "default", **overrides: Any) -> CameraMultitaskConfig:
    """The config of `preset` with fields replaced by `overrides`."""
    if preset not in PRESETS:
        raise InputError(f"unknown camera_multitask preset '{preset}'; known: {', '.join(PRESETS)}")
    try:
        config = replace(PRESETS[preset], **overrides)
    except TypeError as error:
        raise InputError(f"bad camera_multitask config override: {error}") from None
    if config.height % 32 or config.width % 32:
        raise InputError(f"camera_multitask input {config.height}x{config.width} must be a multiple of 32")
    if len(config.widths) != 5 or len(config.blocks) != 4:
        raise InputError("camera_multitask needs 5 widths (stem + 4 stages) and 4 block counts")
    return config


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (ResNet basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn2(self.conv2(self.conv1(x))))


class Backbone(nn.Module):
    """Stride-2 stem, then four stages (stride-2 conv + residual blocks); returns C2..C5."""

    def __init__(self, config: CameraMultitaskConfig) -> None:
        super().__init__()
        self.stem = conv_bn_relu(config.in_channels, config.widths[0], stride=2)
        self.stages = nn.ModuleList(
            nn.Sequential(conv_bn_relu(cin, cout, stride=2), *(ResidualBlock(cout) for _ in range(n)))
            for cin, cout, n in zip(config.widths[:-1], config.widths[1:], config.blocks)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class FPN(nn.Module):
    """Lateral 1x1 convs, top-down nearest upsampling with addition, 3x3 output convs."""

    def __init__(self, in_channels: tuple[int, ...], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(conv_bn_relu(channels, channels) for _ in in_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            merged.insert(0, lateral + F.interpolate(merged[0], scale_factor=2.0, mode="nearest"))
        return [conv(m) for conv, m in zip(self.output, merged)]


class DetectionHead(nn.Module):
    """CenterNet head: class-centre heatmap logits and (ox, oy, log w, log h) per cell."""

    def __init__(self, channels: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.heatmap = nn.Sequential(conv_bn_relu(channels, hidden), nn.Conv2d(hidden, num_classes, 1))
        self.box = nn.Sequential(conv_bn_relu(channels, hidden), nn.Conv2d(hidden, 4, 1))
        # start at a 1% centre probability so the focal loss is not swamped by easy negatives
        nn.init.constant_(self.heatmap[-1].bias, -math.log(99.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heatmap(x), self.box(x)


class SegmentationHead(nn.Module):
    """Each FPN level through a 3x3 conv, upsampled to stride 4 and summed; logits at full size."""

    def __init__(self, channels: int, hidden: int, num_classes: int, levels: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(conv_bn_relu(channels, hidden) for _ in range(levels))
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        x = self.branches[0](levels[0])
        for i, (branch, level) in enumerate(zip(self.branches[1:], levels[1:]), start=1):
            x = x + F.interpolate(branch(level), scale_factor=float(2**i), mode="bilinear", align_corners=False)
        return F.interpolate(self.classifier(x), scale_factor=float(STRIDE), mode="bilinear", align_corners=False)


class CameraMultitaskNet(nn.Module):
    """Backbone + FPN + detection and segmentation heads.

    ``forward(images (B,3,H,W) in [0,1])`` returns ``{"heatmap": (B,K,H/4,W/4) logits,
    "box": (B,4,H/4,W/4), "seg": (B,S,H,W) logits}``.
    """

    def __init__(self, config: CameraMultitaskConfig | None = None) -> None:
        super().__init__()
        self.config = config or CameraMultitaskConfig()
        c = self.config
        self.backbone = Backbone(c)
        self.neck = FPN(tuple(c.widths[1:]), c.fpn_channels)
        self.detection = DetectionHead(c.fpn_channels, c.head_channels, c.num_classes)
        self.segmentation = SegmentationHead(c.fpn_channels, c.head_channels, c.num_seg_classes, len(c.blocks))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        levels = self.neck(self.backbone(images))
        heatmap, box = self.detection(levels[0])
        return {"heatmap": heatmap, "box": box, "seg": self.segmentation(levels)}


def decode_detections(
    outputs: dict[str, torch.Tensor], top_k: int = 40, score_threshold: float = 0.05
) -> list[Detections]:
    """Boxes from the detection head: heatmap peaks (3x3 max) and their box values.

    Args:
        outputs: the model's output dict (``heatmap`` logits and ``box``).
        top_k: at most this many detections per image.
        score_threshold: drop peaks below this centre probability.

    Returns:
        Per image, ``(boxes (N,4) x1y1x2y2 in pixels, scores (N,), labels (N,))``.
    """
    heat = torch.sigmoid(outputs["heatmap"])
    peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)
    b, k, h, w = heat.shape
    scores, index = peaks.reshape(b, -1).topk(min(top_k, k * h * w))
    labels, cell = index // (h * w), index % (h * w)
    ys, xs = (cell // w).float(), (cell % w).float()
    box = outputs["box"].reshape(b, 4, h * w).gather(2, cell[:, None, :].expand(b, 4, -1))
    cx, cy = (xs + box[:, 0]) * STRIDE, (ys + box[:, 1]) * STRIDE
    half_w, half_h = box[:, 2].exp() * STRIDE / 2, box[:, 3].exp() * STRIDE / 2
    boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1)
    keep = scores >= score_threshold
    return [(boxes[i][keep[i]], scores[i][keep[i]], labels[i][keep[i]]) for i in range(b)]


def _focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of centres."""
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    positive = target >= 1.0
    pos = -((1 - p) ** 2) * log_p * positive
    neg = -((1 - target) ** 4) * p**2 * log_not_p * ~positive
    return (pos.sum() + neg.sum()) / positive.sum().clamp(min=1)


def multitask_loss(outputs: dict[str, torch.Tensor], batch: CameraBatch) -> torch.Tensor:
    """Focal heatmap loss + L1 box loss at centre cells + pixel cross-entropy for segmentation."""
    mask = batch.box_mask.unsqueeze(1).expand_as(outputs["box"])
    box = F.l1_loss(outputs["box"][mask], batch.box_target[mask], reduction="sum") / batch.box_mask.sum().clamp(min=1)
    seg = F.cross_entropy(outputs["seg"], batch.segmentation)
    return _focal_loss(outputs["heatmap"], batch.heatmap) + box + seg


# --- training recipe -------------------------------------------------------------------------

DATA = CameraDataConfig(stride=STRIDE)  # dense targets for the detection head's level
TRAIN_BATCH = 8
EVAL_IMAGES = 48
EVAL_SEED = 10_007  # the held-out set; training draws from the train() seed's generator
VALIDATION_SEED = 30_011  # the validation set a fine-tune selects by, apart from the held-out one


def data_config(config: CameraMultitaskConfig | None = None) -> CameraDataConfig:
    """The generated scenes a config trains and evaluates on: its image size, with objects scaled
    by ``height / 96`` so a larger preset sees the default's scenes at a higher resolution."""
    config = config or CameraMultitaskConfig()
    if (config.height, config.width) == (DATA.height, DATA.width):
        return DATA
    return replace(DATA, height=config.height, width=config.width, object_scale=config.height / DATA.height)


@functools.cache
def eval_set(data: CameraDataConfig = DATA, seed: int = EVAL_SEED) -> CameraBatch:
    """The fixed, seeded held-out images the recipe evaluates on (`VALIDATION_SEED`: validates on)."""
    return generate_camera_batch(EVAL_IMAGES, data, seed=seed)


def _scores(seg_pred: torch.Tensor, detections: list[Detections], data: CameraBatch) -> dict[str, float]:
    miou = segmentation_miou(seg_pred, data.segmentation, len(SEG_CLASSES))["miou"]
    ap50, ap75 = (
        image_box_ap(detections, data.boxes, data.labels, len(CAMERA_CLASSES), iou)["map"] for iou in (0.5, 0.75)
    )
    return {"seg_miou": float(miou), "det_map50": ap50, "det_map75": ap75}


def evaluate(model: nn.Module, data_config: CameraDataConfig = DATA, seed: int = EVAL_SEED) -> dict[str, float]:
    """Segmentation mIoU and detection mAP at IoU 0.5 and 0.75 on `eval_set` (model in eval mode)."""
    data = eval_set(data_config, seed)
    seg, detections = [], []
    for images in data.images.split(16):
        outputs = model(images)
        seg.append(outputs["seg"].argmax(1))
        detections += decode_detections(outputs)
    return _scores(torch.cat(seg), detections, data)


def chance(data_config: CameraDataConfig = DATA) -> dict[str, float]:
    """The metrics of image-independent predictors on `eval_set`.

    Segmentation: the per-pixel majority class of the set (sky above, road below); detection:
    each class's mean box, predicted in every image.
    """
    data = eval_set(data_config)
    counts = F.one_hot(data.segmentation, len(SEG_CLASSES)).sum(0)
    seg = counts.argmax(-1).expand_as(data.segmentation)
    labels, boxes = torch.cat(data.labels), torch.cat(data.boxes)
    present = [c for c in range(len(CAMERA_CLASSES)) if (labels == c).any()]
    mean_boxes = torch.stack([boxes[labels == c].mean(0) for c in present])
    constant = (mean_boxes, torch.ones(len(present)), torch.tensor(present))
    return _scores(seg, [constant] * EVAL_IMAGES, data)


def _batcher(data: CameraDataConfig) -> Any:
    def batch(step: int, generator: torch.Generator) -> tuple[tuple[torch.Tensor], CameraBatch]:
        scenes = generate_camera_batch(TRAIN_BATCH, data, generator=generator)
        return (scenes.images,), scenes

    return batch


def recipe(**cfg: Any) -> TrainingRecipe:
    """The training recipe of ``build(**cfg)``: the default recipe on `data_config`'s scenes.

    Example:
        >>> recipe(preset="md").batch(0, torch.Generator().manual_seed(0))[0][0].shape
        torch.Size([8, 3, 192, 320])
    """
    data = data_config(camera_config(**cfg))
    if data == DATA:
        return RECIPE
    return replace(RECIPE, batch=_batcher(data), evaluate=functools.partial(evaluate, data_config=data),
                   validate=functools.partial(evaluate, data_config=data, seed=VALIDATION_SEED),
                   chance=functools.partial(chance, data_config=data))


# The fine-tune after compression that kept md within 2 points at 0.49x (bench/results/slim_md_400.md):
# binary KL on the heatmap, softened per-pixel KL on the segmentation, regression of the box maps.
# compile's distill="kd" and finetune_lr=None use it; 1e-4 left md's det mAP75 42 points down
FINETUNE_DISTILL = Distill(logits=OutputKD({"heatmap": SigmoidKD(), "seg": LogitKD(2.0), "box": FeatureMSE()}))

RECIPE = TrainingRecipe(
    batch=_batcher(DATA), loss=multitask_loss,
    evaluate=evaluate,
    validate=functools.partial(evaluate, seed=VALIDATION_SEED),
    chance=chance,
    steps=300, lr=2e-3,
    finetune_lr=5e-4, finetune_steps=400, distill=FINETUNE_DISTILL,
)


def build(**cfg: Any) -> CameraMultitaskNet:
    """A `CameraMultitaskNet` of `camera_config(**cfg)` (random weights; seed torch first)."""
    return CameraMultitaskNet(camera_config(**cfg))


def example_inputs(batch_size: int = 1, **cfg: Any) -> tuple[torch.Tensor]:
    """One random input batch for `build(**cfg)`."""
    config = camera_config(**cfg)
    return (torch.rand(batch_size, config.in_channels, config.height, config.width),)


register_model(ModelSpec(
    name="camera_multitask",
    build=build,
    inputs=example_inputs,
    summary="camera CNN + FPN with CenterNet detection and segmentation heads (3x96x160)",
    presets=tuple(PRESETS),
    recipe=RECIPE,
    config_recipe=recipe,
))
