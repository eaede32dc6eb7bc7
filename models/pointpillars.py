"""PointPillars: a pillar-based lidar 3D object detector (Lang et al., CVPR 2019).

The network takes the fixed-size pillar tensors that `fxopt.models.lidar_data.voxelize` makes
outside it, so its graph is static, traceable by ``torch.fx`` and exports to ONNX opset 17:

    features (B, P, N, 9), indices (B, P)
      -> pillar feature net: per-point linear (1x1 conv) + BatchNorm + ReLU, max over the N points
      -> scatter to the bird's-eye-view pseudo-image: ``index_put`` of the (B*P, C) pillar rows into a
         flattened (B * (H*W + P), C) canvas (ONNX ScatterND); padding pillars write to P spare
         rows after the grid, which are sliced off, so no cell is written twice
      -> 2D backbone: down-sampling conv blocks, each up-sampled (ConvTranspose2d) and concatenated
      -> anchor head (1x1 convs): class logits (B, A*C, H', W'), box deltas (B, A*7, H', W'),
         direction logits (B, A*2, H', W'), with A = classes x 2 headings anchors per location.

`decode` turns the head outputs into scored boxes (top-k + rotated BEV NMS, outside the
network); `detection_loss` is the focal + smooth-L1 + direction loss used by the training recipe.

Configs: the small default (a 128 x 128 grid of 0.32 m pillars over 41 x 41 m, well under a
second per batch on a CPU), ``preset="md"`` (the KITTI backbone below on the default's grid and
scenes, 4.8 M parameters) and ``preset="kitti"``, the published KITTI PointPillars settings:
0.16 m pillars over x 0-69.12 m, y +-39.68 m (432 x 496), 32 points per pillar, 12000 pillars,
64 pillar channels, 3/5/5 conv blocks at strides 2/2/2 with 64/128/256 channels, each up-sampled
to 128 channels (384 concatenated), anchors for car / pedestrian / cyclist x 2 headings.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxopt.distill import Distill, FeatureMSE, OutputKD, SigmoidKD
from fxopt.errors import InputError
from fxopt.models.lidar_data import (
    CLASS_NAMES,
    DIR_OFFSET,
    AnchorConfig,
    PillarConfig,
    Scene,
    collate_pillars,
    decode_boxes,
    generate_scene,
    make_anchors,
    make_batch,
    voxelize,
)
from fxopt.models.metrics import bev_average_precision, rotated_iou_bev
from fxopt.models.registry import ModelSpec, TrainingRecipe, register_model

__all__ = [
    "PRESETS",
    "PointPillars",
    "PointPillarsConfig",
    "decode",
    "detection_loss",
    "evaluate",
    "example_inputs",
    "flatten_head",
    "make_config",
    "nms_bev",
    "recipe",
]


@dataclass(frozen=True)
class PointPillarsConfig:
    """Everything that fixes a PointPillars network, its inputs and its anchors.

    Attributes:
        pillars: the pillar grid and the fixed input sizes (P, N).
        anchors: anchor sizes, heights, headings and matching thresholds (one per class).
        pfn_channels: pillar feature channels (the pseudo-image depth).
        layer_nums: extra 3x3 convs in each down-sampling block (after its strided conv).
        layer_strides: stride of each block's first conv.
        num_filters: channels of each block.
        upsample_strides: ConvTranspose2d stride bringing each block to the head's resolution.
        upsample_filters: channels of each up-sampled map (concatenated for the head).
        class_names: detected classes (as many as the anchor sizes).
    """

    pillars: PillarConfig = field(default_factory=PillarConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    pfn_channels: int = 64
    layer_nums: tuple[int, ...] = (3, 5, 5)
    layer_strides: tuple[int, ...] = (2, 2, 2)
    num_filters: tuple[int, ...] = (64, 128, 256)
    upsample_strides: tuple[int, ...] = (1, 2, 4)
    upsample_filters: tuple[int, ...] = (128, 128, 128)
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def head_stride(self) -> int:
        """Pillar cells per head feature-map cell."""
        return self.layer_strides[0] // self.upsample_strides[0]

    @property
    def head_size(self) -> tuple[int, int]:
        """``(H', W')`` of the head's outputs."""
        nx, ny = self.pillars.grid_size
        return ny // self.head_stride, nx // self.head_stride

    def validate(self) -> PointPillarsConfig:
        n = len(self.layer_nums)
        if not (len(self.layer_strides) == len(self.num_filters) == len(self.upsample_strides) == len(self.upsample_filters) == n):
            raise InputError("layer_nums, layer_strides, num_filters, upsample_strides and upsample_filters need equal lengths")
        if len(self.anchors.sizes) != self.num_classes:
            raise InputError(f"{len(self.anchors.sizes)} anchor sizes for {self.num_classes} classes")
        nx, ny = self.pillars.grid_size
        total = 1
        for i, s in enumerate(self.layer_strides):
            total *= s
            if nx % total or ny % total:
                raise InputError(f"grid {nx}x{ny} is not divisible by the cumulative stride {total} of block {i}")
            if total != self.head_stride * self.upsample_strides[i]:
                raise InputError(f"block {i} up-sampled by {self.upsample_strides[i]} does not reach the head stride {self.head_stride}")
        if self.anchors.feature_stride != self.head_stride:
            raise InputError(f"anchor feature_stride {self.anchors.feature_stride} != head stride {self.head_stride}")
        return self


SMALL_RANGE = (0.0, -20.48, -3.0, 40.96, 20.48, 1.0)

PRESETS: dict[str, PointPillarsConfig] = {
    # small: 128 x 128 pillars of 0.32 m, 16 points, 4096 pillars; 32-channel features; a light backbone
    "default": PointPillarsConfig(
        pillars=PillarConfig(SMALL_RANGE, (0.32, 0.32), max_points_per_pillar=16, max_pillars=4096),
        anchors=AnchorConfig(feature_stride=2),
        pfn_channels=32,
        layer_nums=(1, 2, 2),
        layer_strides=(2, 2, 2),
        num_filters=(32, 64, 128),
        upsample_strides=(1, 2, 4),
        upsample_filters=(64, 64, 64),
    ),
    # the KITTI backbone (64 pillar channels, 3/5/5 blocks of 64/128/256, 128 channels up-sampled)
    # on the default's grid and scenes: compute-bound enough on Xavier for slimming to halve it
    # (the default's fixed per-inference and per-kernel costs put its floor near 0.9x), still
    # trainable in minutes on a CPU
    "md": PointPillarsConfig(
        pillars=PillarConfig(SMALL_RANGE, (0.32, 0.32), max_points_per_pillar=16, max_pillars=4096),
        anchors=AnchorConfig(feature_stride=2),
    ),
    # the published KITTI PointPillars (OpenPCDet pointpillar.yaml; P = 12000 as in the paper)
    "kitti": PointPillarsConfig(
        pillars=PillarConfig((0.0, -39.68, -3.0, 69.12, 39.68, 1.0), (0.16, 0.16), max_points_per_pillar=32, max_pillars=12000),
        anchors=AnchorConfig(
            sizes=((3.9, 1.6, 1.56), (0.8, 0.6, 1.73), (1.76, 0.6, 1.73)),
            bottom_heights=(-1.78, -0.6, -0.6),
            matched_thresholds=(0.6, 0.5, 0.5),
            unmatched_thresholds=(0.45, 0.35, 0.35),
            feature_stride=2,
        ),
    ),
}

_PILLAR_FIELDS = {f.name for f in fields(PillarConfig)}
_MODEL_FIELDS = {f.name for f in fields(PointPillarsConfig)}


def make_config(preset: str | None = None, **overrides: Any) -> PointPillarsConfig:
    """The config of a preset (``None``/``"default"``: the small one, ``"md"`` or ``"kitti"``) with overrides.

    Overrides may name `PointPillarsConfig` fields (``pfn_channels=...``) or `PillarConfig`
    fields (``max_pillars=...``, ``voxel_size=...``).

    Example:
        >>> make_config("kitti").pillars.grid_size
        (432, 496)
        >>> make_config(max_pillars=1000).pillars.max_pillars
        1000
    """
    name = preset or "default"
    if name not in PRESETS:
        raise InputError(f"unknown pointpillars preset '{name}'; presets: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[name]
    pillar_kw = {k: v for k, v in overrides.items() if k in _PILLAR_FIELDS}
    model_kw = {k: v for k, v in overrides.items() if k in _MODEL_FIELDS}
    unknown = set(overrides) - set(pillar_kw) - set(model_kw)
    if unknown:
        raise InputError(f"unknown pointpillars option(s): {', '.join(sorted(unknown))}")
    if pillar_kw:
        cfg = replace(cfg, pillars=replace(cfg.pillars, **pillar_kw))
    return replace(cfg, **model_kw).validate()


# ----------------------------------------------------------------------------- network


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01), nn.ReLU()]


class PillarFeatureNet(nn.Module):
    """Per-point linear (as a 1x1 conv over (B, 9, P, N)) + BatchNorm + ReLU, then max over points."""

    def __init__(self, in_channels: int = 9, out_channels: int = 64) -> None:
        super().__init__()
        self.linear = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.01)
        self.relu = nn.ReLU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.permute(0, 3, 1, 2)  # (B, 9, P, N)
        x = self.relu(self.norm(self.linear(x)))
        return torch.amax(x, dim=3)  # (B, C, P)


class PillarScatter(nn.Module):
    """Pillar features (B, C, P) -> pseudo-image (B, C, ny, nx), an ``index_put`` (ONNX ScatterND).

    Row ``b * (nx*ny + P) + indices[b, p]`` of a zero canvas receives pillar ``p`` of frame ``b``;
    padding pillars point at the P spare rows after each frame's grid, which are dropped.
    """

    def __init__(self, nx: int, ny: int, max_pillars: int) -> None:
        super().__init__()
        self.nx, self.ny, self.max_pillars = nx, ny, max_pillars
        self.rows = nx * ny + max_pillars

    def forward(self, pillar_features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        batch, channels = pillar_features.shape[0], pillar_features.shape[1]
        rows = pillar_features.permute(0, 2, 1).reshape(-1, channels)  # (B*P, C)
        frame = torch.cumsum(torch.ones_like(indices[:, :1]), dim=0) - 1  # (B, 1): 0..B-1
        flat = (indices + frame * self.rows).reshape(-1)
        # zeros computed from the data: a constant canvas would be folded by the ONNX exporters
        # into a (B * (nx*ny + P), C) initializer (58 MB for the KITTI grid). One row of zeros per
        # channel, not one value: a slice of the channel dim would tie it to channel 0, and channel
        # pruning could not narrow the pillar net and the scatter
        canvas = (rows[:1] * 0).expand(batch * self.rows, channels)
        canvas = canvas.index_put((flat,), rows)
        canvas = canvas.reshape(batch, self.rows, channels)[:, : self.nx * self.ny]
        return canvas.permute(0, 2, 1).reshape(batch, channels, self.ny, self.nx)


class Backbone2d(nn.Module):
    """Down-sampling conv blocks; each block's output up-sampled (ConvTranspose2d) and concatenated."""

    def __init__(self, cfg: PointPillarsConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.deblocks = nn.ModuleList()
        cin = cfg.pfn_channels
        for n, stride, cout, up, up_c in zip(cfg.layer_nums, cfg.layer_strides, cfg.num_filters,
                                             cfg.upsample_strides, cfg.upsample_filters):
            layers = _conv_bn_relu(cin, cout, stride)
            for _ in range(n):
                layers += _conv_bn_relu(cout, cout)
            self.blocks.append(nn.Sequential(*layers))
            self.deblocks.append(nn.Sequential(
                nn.ConvTranspose2d(cout, up_c, up, stride=up, bias=False),
                nn.BatchNorm2d(up_c, eps=1e-3, momentum=0.01), nn.ReLU(),
            ))
            cin = cout
        self.out_channels = sum(cfg.upsample_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ups = []
        for block, deblock in zip(self.blocks, self.deblocks):
            x = block(x)
            ups.append(deblock(x))
        return torch.cat(ups, dim=1)


class AnchorHead(nn.Module):
    """1x1 convs: class logits (A*C), box deltas (A*7) and direction logits (A*2) per location."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int) -> None:
        super().__init__()
        self.conv_cls = nn.Conv2d(in_channels, num_anchors * num_classes, 1)
        self.conv_box = nn.Conv2d(in_channels, num_anchors * 7, 1)
        self.conv_dir = nn.Conv2d(in_channels, num_anchors * 2, 1)
        prior = 0.01  # focal-loss initialisation: every anchor starts as background
        nn.init.constant_(self.conv_cls.bias, -math.log((1 - prior) / prior))
        nn.init.normal_(self.conv_box.weight, mean=0.0, std=0.001)
        nn.init.zeros_(self.conv_box.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.conv_cls(x), self.conv_box(x), self.conv_dir(x)


class PointPillars(nn.Module):
    """PointPillars detector.

    Inputs: ``features`` (B, P, N, 9) float32 and ``indices`` (B, P) int64 from
    `fxopt.models.lidar_data.voxelize` / `collate_pillars`.
    Outputs: ``(cls (B, A*C, H', W'), box (B, A*7, H', W'), dir (B, A*2, H', W'))``.

    Example:
        >>> import torch
        >>> model = PointPillars(make_config()).eval()
        >>> cls, box, direction = model(*example_inputs())
        >>> tuple(cls.shape), tuple(box.shape), tuple(direction.shape)
        ((1, 18, 64, 64), (1, 42, 64, 64), (1, 12, 64, 64))
    """

    def __init__(self, config: PointPillarsConfig | None = None) -> None:
        super().__init__()
        self.config = (config or make_config()).validate()
        cfg = self.config
        nx, ny = cfg.pillars.grid_size
        self.pfn = PillarFeatureNet(9, cfg.pfn_channels)
        self.scatter = PillarScatter(nx, ny, cfg.pillars.max_pillars)
        self.backbone = Backbone2d(cfg)
        self.head = AnchorHead(self.backbone.out_channels, cfg.anchors.num_anchors_per_location, cfg.num_classes)

    def forward(self, features: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pillars = self.pfn(features)
        canvas = self.scatter(pillars, indices)
        return self.head(self.backbone(canvas))


# ----------------------------------------------------------------------------- inputs, loss, decode


def example_scenes(config: PointPillarsConfig, batch_size: int = 1, seed: int = 0) -> list[Scene]:
    """`batch_size` generated scenes in the config's range (seeds ``seed, seed + 1, ...``)."""
    scene_cfg = config.pillars.scene_config()
    return [generate_scene(seed + i, scene_cfg) for i in range(batch_size)]


def example_inputs(preset: str | None = None, batch_size: int = 1, seed: int = 0, **overrides: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Network inputs ``(features, indices)`` from generated scenes through `voxelize`."""
    cfg = make_config(preset, **overrides)
    return collate_pillars([voxelize(s.points, cfg.pillars) for s in example_scenes(cfg, batch_size, seed)])


def build(preset: str | None = None, batch_size: int = 1, seed: int = 0, **overrides: Any) -> PointPillars:
    """A PointPillars network (random weights) for a preset; ``batch_size``/``seed`` only shape the inputs."""
    del batch_size, seed
    return PointPillars(make_config(preset, **overrides))


def flatten_head(outputs: tuple[torch.Tensor, ...], config: PointPillarsConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head maps -> per-anchor rows in `make_anchors` order: (B, K, C), (B, K, 7), (B, K, 2)."""
    cls, box, direction = outputs
    a = config.anchors.num_anchors_per_location

    def rows(t: torch.Tensor, k: int) -> torch.Tensor:
        b, _, h, w = t.shape
        return t.reshape(b, a, k, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a, k)

    return rows(cls, config.num_classes), rows(box, 7), rows(direction, 2)


def _anchors(config: PointPillarsConfig) -> tuple[torch.Tensor, torch.Tensor]:
    key = (config.pillars, config.anchors)
    if key not in _ANCHOR_CACHE:
        _ANCHOR_CACHE[key] = make_anchors(config.pillars, config.anchors)
    return _ANCHOR_CACHE[key]


_ANCHOR_CACHE: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Element-wise sigmoid focal loss (Lin et al. 2017)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * ce


def detection_loss(
    outputs: tuple[torch.Tensor, ...],
    targets: Mapping[str, Any],
    config: PointPillarsConfig | None = None,
    weights: tuple[float, float, float] = (1.0, 2.0, 0.2),
) -> torch.Tensor:
    """Focal class loss + smooth-L1 box loss (sine-difference heading) + direction cross-entropy.

    Each term is summed over anchors, divided by the frame's number of positive anchors and
    averaged over the batch (the OpenPCDet normalisation); ``weights`` scale class, box and
    direction terms (1, 2, 0.2 as published).

    Args:
        outputs: the network's ``(cls, box, dir)``.
        targets: `fxopt.models.lidar_data.make_batch` targets.
        config: the network's config (default: the small one).
    """
    cfg = config or make_config()
    cls, box, direction = flatten_head(outputs, cfg)
    labels = targets["labels"]  # (B, K)
    positive = labels > 0
    batch = cls.shape[0]
    norm = positive.sum(dim=1, keepdim=True).clamp(min=1).to(cls.dtype)  # (B, 1)
    one_hot = F.one_hot(labels.clamp(min=0), cfg.num_classes + 1)[..., 1:].to(cls.dtype)
    cls_weight = (labels >= 0).to(cls.dtype) / norm
    cls_loss = (sigmoid_focal_loss(cls, one_hot).sum(-1) * cls_weight).sum() / batch
    box_t = targets["box_targets"]
    # sine difference: compare sin(pred - target) through sin(a)cos(b) and cos(a)sin(b)
    pred_r, tgt_r = box[..., 6:7], box_t[..., 6:7]
    box_p = torch.cat([box[..., :6], torch.sin(pred_r) * torch.cos(tgt_r)], dim=-1)
    box_g = torch.cat([box_t[..., :6], torch.cos(pred_r) * torch.sin(tgt_r)], dim=-1)
    reg_weight = positive.to(cls.dtype) / norm
    box_loss = (F.smooth_l1_loss(box_p, box_g, beta=1 / 9, reduction="none").sum(-1) * reg_weight).sum() / batch
    dir_loss = (F.cross_entropy(direction.reshape(-1, 2), targets["dir_targets"].reshape(-1), reduction="none")
                .reshape(batch, -1) * reg_weight).sum() / batch
    return weights[0] * cls_loss + weights[1] * box_loss + weights[2] * dir_loss


def nms_bev(boxes: Any, scores: Any, threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression by rotated BEV IoU; indices kept, by descending score."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    if len(order) == 0:
        return order
    iou = rotated_iou_bev(b[order], b[order])
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):  # over detections (<= pre-NMS top-k), not points
        if suppressed[i]:
            continue
        keep.append(order[i])
        suppressed |= iou[i] > threshold
    return np.asarray(keep, dtype=np.int64)


def decode(
    outputs: tuple[torch.Tensor, ...],
    config: PointPillarsConfig | None = None,
    score_threshold: float = 0.1,
    nms_threshold: float = 0.1,
    pre_nms: int = 300,
    max_detections: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """Head outputs -> boxes per frame (outside the network).

    Per anchor the best class score (sigmoid) is taken; anchors above ``score_threshold`` are
    ranked, the top ``pre_nms`` decoded (`decode_boxes`; the heading's half-turn from the
    direction logits), then class-agnostic rotated BEV NMS at ``nms_threshold`` keeps at most
    ``max_detections``.

    Returns:
        One dict per frame: ``boxes`` (D, 7) ``x, y, z, l, w, h, yaw`` (yaw in [-pi, pi)),
        ``scores`` (D,), ``labels`` (D,) int64.
    """
    cfg = config or make_config()
    cls, box, direction = flatten_head(tuple(o.detach().float() for o in outputs), cfg)
    anchors = _anchors(cfg)[0].reshape(-1, 7)
    results = []
    for b in range(cls.shape[0]):
        scores, labels = torch.sigmoid(cls[b]).max(dim=-1)
        cand = torch.nonzero(scores > score_threshold).reshape(-1)
        if len(cand) > pre_nms:
            cand = cand[torch.topk(scores[cand], pre_nms).indices]
        boxes = decode_boxes(box[b, cand], anchors[cand])
        dir_label = direction[b, cand].argmax(dim=-1).to(boxes.dtype)
        rot = boxes[:, 6] - DIR_OFFSET
        rot = rot - torch.floor(rot / math.pi) * math.pi  # in [0, pi)
        yaw = rot + DIR_OFFSET + math.pi * dir_label
        boxes[:, 6] = yaw - torch.floor((yaw + math.pi) / (2 * math.pi)) * 2 * math.pi
        keep = torch.from_numpy(nms_bev(boxes.numpy(), scores[cand].numpy(), nms_threshold))[:max_detections]
        results.append({"boxes": boxes[keep], "scores": scores[cand][keep], "labels": labels[cand][keep]})
    return results


# ----------------------------------------------------------------------------- training recipe

TRAIN_BATCH = 2
EVAL_FRAMES = 32
EVAL_SEED = 2**31  # held-out scenes use seeds from here; training seeds are drawn below 2**31
VALIDATION_SEED = 2**31 + 2_000_000  # the validation scenes a fine-tune selects by, apart from the held-out ones


def _recipe_config(model: nn.Module | None = None) -> PointPillarsConfig:
    cfg = getattr(model, "config", None)
    return cfg if isinstance(cfg, PointPillarsConfig) else make_config()


def _batch(step: int, generator: torch.Generator, config: PointPillarsConfig | None = None,
           ) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, Any]]:
    del step
    cfg = config or make_config()
    seeds = torch.randint(0, 2**31 - 1, (TRAIN_BATCH,), generator=generator).tolist()
    scene_cfg = cfg.pillars.scene_config()
    scenes = [generate_scene(s, scene_cfg) for s in seeds]
    return make_batch(scenes, cfg.pillars, cfg.anchors, _anchors(cfg), seed=seeds[0])


def _loss(outputs: tuple[torch.Tensor, ...], targets: Mapping[str, Any], config: PointPillarsConfig | None = None) -> torch.Tensor:
    return detection_loss(outputs, targets, config or make_config())


def _ap_metrics(result: dict[str, Any], class_names: tuple[str, ...]) -> dict[str, float]:
    # mAP first: a recipe's first metric is the one fine-tuning keeps its best state by
    # (`fxopt.distill.recipe_metric`) and slim's re-rank scores on
    return {"mAP": float(result["mAP"]), **{f"{name}_ap": float(result["ap"][name]) for name in class_names}}


def _held_out(cfg: PointPillarsConfig, frames: int, seed: int = EVAL_SEED) -> list[Scene]:
    scene_cfg = cfg.pillars.scene_config()
    return [generate_scene(seed + i, scene_cfg) for i in range(frames)]


def evaluate(model: nn.Module, frames: int = EVAL_FRAMES, batch_size: int = 4, score_threshold: float = 0.05,
             config: PointPillarsConfig | None = None, seed: int = EVAL_SEED) -> dict[str, float]:
    """``mAP`` and BEV AP at IoU 0.5 per class (``car_ap`` ...) on a fixed seeded held-out set.

    The scenes, pillars and anchors are `config`'s, else ``model.config`` when the model has one
    (a traced or compiled graph has not), else the small default config's.
    """
    cfg = config or _recipe_config(model)
    scenes = _held_out(cfg, frames, seed)
    preds: list[dict[str, torch.Tensor]] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(scenes), batch_size):
            inputs = collate_pillars([voxelize(s.points, cfg.pillars) for s in scenes[i : i + batch_size]])
            preds += decode(model(*inputs), cfg, score_threshold=score_threshold)
    model.train(was_training)
    result = bev_average_precision(
        [p["boxes"] for p in preds], [p["scores"] for p in preds], [p["labels"] for p in preds],
        [s.boxes for s in scenes], [s.labels for s in scenes], cfg.num_classes, 0.5, cfg.class_names,
    )
    return _ap_metrics(result, cfg.class_names)


def random_box_ap(frames: int = EVAL_FRAMES, per_class: int = 20, seed: int = 0,
                  config: PointPillarsConfig | None = None) -> dict[str, float]:
    """AP of a random detector on the held-out set: ``per_class`` boxes of each class's mean size
    per frame, uniform in the range with uniform headings and random scores."""
    cfg = config or make_config()
    scenes = _held_out(cfg, frames)
    rng = np.random.default_rng(seed)
    x0, y0, _, x1, y1, _ = cfg.pillars.point_cloud_range
    pb, ps, pl = [], [], []
    for _ in scenes:
        boxes, labels = [], []
        for c, (size, bottom) in enumerate(zip(cfg.anchors.sizes, cfg.anchors.bottom_heights)):
            xy = rng.uniform([x0, y0], [x1, y1], size=(per_class, 2))
            rows = np.column_stack([xy, np.full(per_class, bottom + size[2] / 2), np.tile(size, (per_class, 1)),
                                    rng.uniform(-math.pi, math.pi, per_class)])
            boxes.append(rows)
            labels.append(np.full(per_class, c))
        pb.append(np.concatenate(boxes))
        pl.append(np.concatenate(labels))
        ps.append(rng.random(len(pb[-1])))
    result = bev_average_precision(pb, ps, pl, [s.boxes for s in scenes], [s.labels for s in scenes],
                                   cfg.num_classes, 0.5, cfg.class_names)
    return _ap_metrics(result, cfg.class_names)


def untrained_ap(seed: int = 0, config: PointPillarsConfig | None = None) -> dict[str, float]:
    """AP of a freshly initialised network of `config` (default: the small one; seeded) on the held-out set."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PointPillars(config or make_config())
    return evaluate(model)


def chance(config: PointPillarsConfig | None = None) -> dict[str, float]:
    """The recipe's chance level (it runs the held-out evaluation): per metric the better of an
    untrained network and the random detector (`random_box_ap`)."""
    untrained, rand = untrained_ap(config=config), random_box_ap(config=config)
    return {k: max(untrained[k], rand[k]) for k in untrained}


PRECISE_BN_BATCHES = 16  # see `recipe`

# The fine-tune after compression bench/slim.py measured (md at 0.499x, mAP -0.6 points,
# bench/results/slim_pointpillars_md.md): binary KL on the class logits, regression of the box
# deltas; compile's distill="kd" and finetune_lr=None use it
FINETUNE_DISTILL = Distill(logits=OutputKD({0: SigmoidKD(), 1: FeatureMSE()}))

RECIPE = TrainingRecipe(
    batch=_batch,
    loss=_loss,
    evaluate=evaluate,
    validate=functools.partial(evaluate, seed=VALIDATION_SEED),
    chance=chance,
    steps=800,  # about 3.5 CPU-minutes on one core, data generation included
    lr=2e-3,
    finetune_lr=5e-4, finetune_steps=200, distill=FINETUNE_DISTILL,
)


def recipe(preset: str | None = None, **overrides: Any) -> TrainingRecipe:
    """The training recipe of ``build(preset, **overrides)``: the default recipe on that config's
    scenes, pillars and anchors, ending with a BatchNorm re-estimation (``bn_batches``) for any
    config but the default.

    Why: the BatchNorm momentum is the published 0.01, so after 800 steps the running statistics
    still average weights of about 100 steps before. The default net is shallow enough not to
    mind; the ``md`` net (the KITTI backbone) trained without it scores mAP 0.000 in eval mode
    (outputs near 850 where training mode gives about 13) and 0.28 at 250 steps once its
    statistics are re-estimated. The default config keeps `RECIPE` as it is.

    Example:
        >>> recipe() is RECIPE, recipe("md").bn_batches
        (True, 16)
        >>> recipe("kitti").batch(0, torch.Generator().manual_seed(0))[0][0].shape
        torch.Size([2, 12000, 32, 9])
    """
    cfg = make_config(preset, **overrides)
    if cfg == make_config():
        return RECIPE
    return replace(RECIPE, batch=functools.partial(_batch, config=cfg), loss=functools.partial(_loss, config=cfg),
                   evaluate=functools.partial(evaluate, config=cfg), chance=functools.partial(chance, config=cfg),
                   validate=functools.partial(evaluate, config=cfg, seed=VALIDATION_SEED),
                   bn_batches=PRECISE_BN_BATCHES)


SPEC = register_model(ModelSpec(
    name="pointpillars",
    build=build,
    inputs=example_inputs,
    summary="PointPillars lidar 3D detector (pillars -> ScatterND BEV pseudo-image -> 2D backbone -> anchor head)",
    presets=("md", "kitti"),
    recipe=RECIPE,
    config_recipe=recipe,
))
