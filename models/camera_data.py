"""Seeded procedural camera images with boxes, segmentation masks and CenterNet-style head targets.

A scene is a sky gradient above a horizon, a grass verge and a road (a trapezoid narrowing to
the horizon) below it, with texture noise, background distractors (buildings of random colour
standing on the horizon, dark green bushes below it), a few non-overlapping objects drawn on
top, and a per-image brightness / contrast change:

======== ============== ===================================== ==========================
class    detection id   shape                                 colour
======== ============== ===================================== ==========================
car      0              filled rectangle, wider than tall     red-ish, dark window band
person   1              filled ellipse, about 2.5x taller     green-ish
sign     2              filled circle on a grey pole          blue-ish, white centre dot
======== ============== ===================================== ==========================

Segmentation classes: 0 background (sky, verge, buildings, bushes), 1 road, 2 car, 3 person,
4 sign (``detection id + 2``). A sign's pole is background; its box is the circle.

Boxes are ``(x1, y1, x2, y2)`` in pixels with exclusive ends: an object covers the pixels
``[y1:y2, x1:x2]`` (rectangles fill them, ellipses and circles are inscribed). Objects never
overlap, so every object pixel of the mask lies in its own box and the tight box of an object's
pixels is its box (within a pixel for inscribed shapes).

Dense targets (the model's detection head at stride ``config.stride``): a per-class heatmap with
a Gaussian peak at each box centre, and at the peak cell four box values: the centre's offset
inside the cell ``(ox, oy)`` in [0, 1) and ``log(w / stride)``, ``log(h / stride)``.

Example:
    >>> batch = generate_camera_batch(2, seed=0)
    >>> tuple(batch.images.shape), tuple(batch.segmentation.shape), tuple(batch.heatmap.shape)
    ((2, 3, 96, 160), (2, 96, 160), (2, 3, 24, 40))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "CAMERA_CLASSES", "SEG_CLASSES", "CameraBatch", "CameraDataConfig", "encode_targets",
    "generate_camera_batch", "render_scene",
]

CAMERA_CLASSES = ("car", "person", "sign")
SEG_CLASSES = ("background", "road", "car", "person", "sign")
SEG_OFFSET = 2  # segmentation id = detection id + SEG_OFFSET

# per class: (min height, max height) in pixels, aspect w/h range, base RGB
_OBJECT_STYLE = {
    0: ((10, 24), (1.4, 2.2), (0.80, 0.15, 0.15)),
    1: ((14, 28), (0.35, 0.5), (0.15, 0.75, 0.20)),
    2: ((8, 14), (1.0, 1.0), (0.15, 0.30, 0.90)),
}


@dataclass(frozen=True)
class CameraDataConfig:
    """Image size, object counts and head-target encoding of the generated scenes.

    Attributes:
        height, width: image size in pixels (multiples of ``stride``).
        min_objects, max_objects: objects per image (placement may drop some when crowded).
        stride: output stride of the detection head the dense targets are made for.
        noise: standard deviation of the per-pixel texture noise.
        max_distractors: background buildings and bushes per image (0 .. this many).
        illumination: per-image gain in ``1 ± illumination`` and offset in ``± illumination / 3``.
        placement_tries: random placements tried per object before it is dropped.
        object_scale: object heights are drawn from their class's pixel range times this (2 at
            192x320 keeps the 96x160 scenes' proportions at twice the resolution).
    """

    height: int = 96
    width: int = 160
    min_objects: int = 2
    max_objects: int = 6
    stride: int = 4
    noise: float = 0.04
    max_distractors: int = 4
    illumination: float = 0.3
    placement_tries: int = 20
    object_scale: float = 1.0

    @property
    def num_classes(self) -> int:
        return len(CAMERA_CLASSES)

    @property
    def num_seg_classes(self) -> int:
        return len(SEG_CLASSES)


@dataclass
class CameraBatch:
    """A batch of generated images and their ground truth.

    Attributes:
        images: (B, 3, H, W) float in [0, 1]: the model's input.
        segmentation: (B, H, W) long segmentation ids (see `SEG_CLASSES`).
        instances: (B, H, W) long: index of the object covering the pixel in ``boxes[b]``, -1 none.
        boxes: per image, (N, 4) float boxes ``(x1, y1, x2, y2)``.
        labels: per image, (N,) long detection ids (see `CAMERA_CLASSES`).
        heatmap: (B, K, H/s, W/s) float Gaussian centre heatmaps.
        box_target: (B, 4, H/s, W/s) float ``(ox, oy, log w/s, log h/s)`` at centre cells.
        box_mask: (B, H/s, W/s) bool: the cells that carry a box target.
    """

    images: torch.Tensor
    segmentation: torch.Tensor
    instances: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    heatmap: torch.Tensor
    box_target: torch.Tensor
    box_mask: torch.Tensor


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _pixel_centres(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, 1) row and (1, W) column coordinates of the pixel centres."""
    return torch.arange(h, dtype=torch.float32).view(h, 1) + 0.5, torch.arange(w, dtype=torch.float32).view(1, w) + 0.5


def _background(config: CameraDataConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sky / verge / road image, its segmentation (background 0, road 1) and the horizon row."""
    h, w = config.height, config.width
    horizon = int(h * _uniform(generator, 0.35, 0.5))
    ys = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    xs = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    sky_top = torch.tensor([0.35, 0.55, 0.85]) + 0.05 * torch.randn(3, generator=generator)
    sky_fade = (ys / max(horizon, 1)).clamp(0, 1)
    image = sky_top.view(3, 1, 1) + 0.3 * sky_fade  # lighter towards the horizon
    verge = torch.tensor([0.30, 0.45, 0.20]) + 0.05 * torch.randn(3, generator=generator)
    below = ys >= horizon
    image = torch.where(below, verge.view(3, 1, 1).expand(3, h, w), image)
    # road: a trapezoid from the full bottom width up to a narrow band at the horizon
    centre = w * _uniform(generator, 0.4, 0.6)
    depth = ((ys - horizon) / max(h - horizon, 1)).clamp(0, 1)
    half_width = w * (0.05 + 0.5 * depth)
    road = below & ((xs - centre).abs() <= half_width)
    shade = 0.25 + 0.15 * depth + 0.03 * float(torch.randn((), generator=generator))
    image = torch.where(road, shade.expand(3, h, w), image)
    image = image + config.noise * torch.randn(3, h, w, generator=generator)
    return image, road.long(), horizon


def _add_distractors(image: torch.Tensor, segmentation: torch.Tensor, horizon: int, config: CameraDataConfig, generator: torch.Generator) -> None:
    """Background clutter: buildings on the horizon, bushes below it (segmentation 0)."""
    h, w = config.height, config.width
    ys, xs = _pixel_centres(h, w)
    for _ in range(_randint(generator, 0, config.max_distractors)):
        cx = _uniform(generator, 0, w)
        if float(torch.rand((), generator=generator)) < 0.5:  # a building standing on the horizon
            half_w, top = _uniform(generator, 4, 15), horizon - _uniform(generator, 8, 30)
            mask = ((xs - cx).abs() <= half_w) & (ys >= top) & (ys < horizon)
            colour = torch.rand(3, generator=generator) * 0.6 + 0.2
        else:  # a bush somewhere below the horizon
            cy, rx, ry = _uniform(generator, horizon, h), _uniform(generator, 3, 10), _uniform(generator, 2, 6)
            mask = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
            colour = torch.tensor([0.12, 0.38, 0.12]) + 0.08 * torch.randn(3, generator=generator)
        image[:, mask] = colour.view(3, 1).clamp(0, 1)
        segmentation[mask] = 0


def _shape_mask(label: int, box: tuple[int, int, int, int], h: int, w: int) -> torch.Tensor:
    """(H, W) bool pixels of an object: a rectangle for cars, an inscribed ellipse otherwise."""
    x1, y1, x2, y2 = box
    ys, xs = _pixel_centres(h, w)
    inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
    if label == 0:
        return inside
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    # the +0.5 pixel slack keeps the tips of small ellipses inside their box's extreme pixels
    return inside & ((((xs - cx) / (rx + 0.5)) ** 2 + ((ys - cy) / (ry + 0.5)) ** 2) <= 1)


def _paint(image: torch.Tensor, mask: torch.Tensor, label: int, box: tuple[int, int, int, int], generator: torch.Generator) -> None:
    colour = torch.tensor(_OBJECT_STYLE[label][2]) + 0.08 * torch.randn(3, generator=generator)
    image[:, mask] = colour.view(3, 1).clamp(0, 1)
    x1, y1, x2, y2 = box
    if label == 0:  # a dark window band in the upper half
        band = mask.clone()
        band[: y1 + (y2 - y1) // 4] = False
        band[y1 + (y2 - y1) // 2 :] = False
        image[:, band] = 0.12
    elif label == 2:  # a white centre dot
        cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
        image[:, cy - 1 : cy + 1, cx - 1 : cx + 1] = 0.95


def _sample_box(label: int, horizon: int, config: CameraDataConfig, generator: torch.Generator) -> tuple[int, int, int, int]:
    (hmin, hmax), (amin, amax), _ = _OBJECT_STYLE[label]
    bh = _randint(generator, round(hmin * config.object_scale), round(hmax * config.object_scale))
    bw = max(3, round(bh * _uniform(generator, amin, amax)))
    x1 = _randint(generator, 0, config.width - bw)
    # cars and people stand on the ground (their bottom edge below the horizon); signs float
    lowest_top = 0 if label == 2 else max(0, min(horizon + 2 - bh, config.height - bh))
    y1 = _randint(generator, lowest_top, config.height - bh)
    return x1, y1, x1 + bw, y1 + bh


def _overlaps(box: tuple[int, int, int, int], taken: list[tuple[int, int, int, int]]) -> bool:
    x1, y1, x2, y2 = box
    # one pixel of gap, so neighbouring objects never touch in the mask either
    return any(x1 <= bx2 and bx1 <= x2 and y1 <= by2 and by1 <= y2 for bx1, by1, bx2, by2 in taken)


def render_scene(config: CameraDataConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image: ``(image (3,H,W), segmentation (H,W), instances (H,W), boxes (N,4), labels (N,))``."""
    image, segmentation, horizon = _background(config, generator)
    _add_distractors(image, segmentation, horizon, config, generator)
    instances = torch.full((config.height, config.width), -1, dtype=torch.long)
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[int] = []
    for _ in range(_randint(generator, config.min_objects, config.max_objects)):
        label = _randint(generator, 0, config.num_classes - 1)
        for _try in range(config.placement_tries):
            box = _sample_box(label, horizon, config, generator)
            if not _overlaps(box, boxes):
                break
        else:
            continue  # too crowded: drop this object
        mask = _shape_mask(label, box, config.height, config.width)
        if label == 2:  # a pole under the sign, drawn as background
            x1, _, x2, y2 = box
            pole = (x1 + x2) // 2
            pole_mask = torch.zeros_like(mask)
            pole_mask[y2 : y2 + (y2 - box[1]), pole - 1 : pole + 1] = True
            image[:, pole_mask & (instances < 0)] = 0.5  # behind the objects already drawn
        _paint(image, mask, label, box, generator)
        segmentation[mask] = label + SEG_OFFSET
        instances[mask] = len(boxes)
        boxes.append(box)
        labels.append(label)
    box_tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    gain = 1 + config.illumination * _uniform(generator, -1, 1)
    offset = config.illumination / 3 * _uniform(generator, -1, 1)
    return (image * gain + offset).clamp(0, 1), segmentation, instances, box_tensor, torch.tensor(labels, dtype=torch.long)


def _gaussian_radius(w: float, h: float) -> float:
    # a peak about a third of the smaller box side wide, at least one cell
    return max(1.0, min(w, h) / 3)


def encode_targets(boxes: torch.Tensor, labels: torch.Tensor, config: CameraDataConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CenterNet targets for one image: ``(heatmap (K,h,w), box_target (4,h,w), box_mask (h,w))``.

    Args:
        boxes: (N, 4) ``(x1, y1, x2, y2)`` in pixels.
        labels: (N,) detection ids.
        config: image size and stride.

    Returns:
        The heatmap is 1 at each centre cell and falls off as a Gaussian; the box target holds
        ``(ox, oy, log(w/s), log(h/s))`` where the mask is set.
    """
    s = config.stride
    gh, gw = config.height // s, config.width // s
    heatmap = torch.zeros(config.num_classes, gh, gw)
    box_target = torch.zeros(4, gh, gw)
    box_mask = torch.zeros(gh, gw, dtype=torch.bool)
    ys = torch.arange(gh, dtype=torch.float32).view(gh, 1)
    xs = torch.arange(gw, dtype=torch.float32).view(1, gw)
    for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
        cx, cy = (x1 + x2) / 2 / s, (y1 + y2) / 2 / s
        ix, iy = min(int(cx), gw - 1), min(int(cy), gh - 1)
        sigma = _gaussian_radius((x2 - x1) / s, (y2 - y1) / s) / 2
        peak = torch.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma**2))
        heatmap[label] = torch.maximum(heatmap[label], peak)
        box_target[:, iy, ix] = torch.tensor([cx - ix, cy - iy, math.log((x2 - x1) / s), math.log((y2 - y1) / s)])
        box_mask[iy, ix] = True
    return heatmap, box_target, box_mask


def generate_camera_batch(
    batch_size: int,
    config: CameraDataConfig | None = None,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> CameraBatch:
    """Generate `batch_size` scenes; the same seed (or generator state) gives the same batch.

    Args:
        batch_size: number of images.
        config: scene settings (`CameraDataConfig()` if omitted).
        seed: seeds a fresh generator (ignored when `generator` is given).
        generator: a torch generator to draw from (advanced by the call).

    Returns:
        A `CameraBatch` with images, masks, boxes, labels and dense head targets.
    """
    config = config or CameraDataConfig()
    if config.height % config.stride or config.width % config.stride:
        raise ValueError(f"image size {config.height}x{config.width} is not a multiple of stride {config.stride}")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    scenes = [render_scene(config, generator) for _ in range(batch_size)]
    targets = [encode_targets(boxes, labels, config) for _, _, _, boxes, labels in scenes]
    return CameraBatch(
        images=torch.stack([s[0] for s in scenes]),
        segmentation=torch.stack([s[1] for s in scenes]),
        instances=torch.stack([s[2] for s in scenes]),
        boxes=[s[3] for s in scenes],
        labels=[s[4] for s in scenes],
        heatmap=torch.stack([t[0] for t in targets]),
        box_target=torch.stack([t[1] for t in targets]),
        box_mask=torch.stack([t[2] for t in targets]),
    )
