"""Seeded bird's-eye-view occupancy sequences with moving objects and per-cell ground truth.

A scene is a square grid of ``grid x grid`` cells (think 0.5 m cells, frames 0.1 s apart, in the
ego frame: ego motion is already compensated) seen over ``frames`` frames; the last frame is the
*current* one. It holds:

- vehicles (category 1): oriented rectangles about 7-10 x 3.5-4.5 cells, 3 or 4 height bins
  tall; moving ones drive along their heading at 0.5-2 cells / frame;
- pedestrians (category 2): about 1.5-2.5 cells square, all height bins; moving ones walk along
  their heading at 0.15-0.4 cells / frame;
- clutter (category 0, background): static walls (thin long rectangles) and poles, 1 to all
  height bins;
- sensor noise in the occupancy only: dropped voxels and spurious ones, independent per frame.

Every object moves with constant velocity and heading (static ones have velocity 0). Objects do
not overlap (with a cell of gap) in the current frame.

Per-cell ground truth, for the current frame and the clean (noise-free) footprints:
``category`` (0 background, 1 vehicle, 2 pedestrian), ``displacement`` ``(dx, dy)`` in cells to
the frame ``horizon`` frames ahead (velocity x horizon; 0 off objects and on clutter),
``moving`` (the cell's object moves), ``occupied`` (any object, clutter included) and
``instances`` (index into the scene's object list, -1 none).

Axes: occupancy is indexed ``[..., y, x]`` (row ``y``, column ``x``); cell ``(y, x)`` has its
centre at ``(x + 0.5, y + 0.5)``; ``dx`` is along columns, ``dy`` along rows.

Example:
    >>> batch = generate_bev_batch(2, seed=0)
    >>> tuple(batch.occupancy.shape), tuple(batch.displacement.shape)
    ((2, 5, 4, 64, 64), (2, 2, 64, 64))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "BEV_CATEGORIES", "BevBatch", "BevObject", "BevSequenceConfig", "footprint", "generate_bev_batch",
    "sample_scene",
]

BEV_CATEGORIES = ("background", "vehicle", "pedestrian")
CLUTTER, VEHICLE, PEDESTRIAN = 0, 1, 2


@dataclass(frozen=True)
class BevSequenceConfig:
    """Grid, sequence length and scene statistics.

    Attributes:
        grid: cells per side.
        frames: frames per sequence (the last is the current frame).
        height_bins: occupancy channels (height slices) per frame.
        horizon: frames ahead the displacement target reaches.
        vehicles, pedestrians, clutter: (min, max) objects of each kind per scene.
        moving_fraction: probability that a vehicle or pedestrian moves.
        vehicle_speed, pedestrian_speed: (min, max) speed of moving ones, cells / frame.
        dropout: probability that an occupied voxel reads empty.
        false_occupancy: probability that an empty voxel reads occupied.
        placement_tries: random placements tried per object before it is dropped.
    """

    grid: int = 64
    frames: int = 5
    height_bins: int = 4
    horizon: int = 1
    vehicles: tuple[int, int] = (1, 5)
    pedestrians: tuple[int, int] = (1, 6)
    clutter: tuple[int, int] = (1, 4)
    moving_fraction: float = 0.6
    vehicle_speed: tuple[float, float] = (0.5, 2.0)
    pedestrian_speed: tuple[float, float] = (0.15, 0.4)
    dropout: float = 0.05
    false_occupancy: float = 0.003
    placement_tries: int = 20


@dataclass(frozen=True)
class BevObject:
    """One object of a scene, in cells and frames.

    Attributes:
        kind: 0 clutter, 1 vehicle, 2 pedestrian (its cells' category).
        centre: ``(x, y)`` in the current frame.
        size: ``(length, width)``: length along the heading.
        heading: radians, counter-clockwise from +x (towards +y).
        velocity: ``(vx, vy)`` cells per frame (zero for static objects).
        bins: ``(low, high)``: occupied height bins ``low .. high-1``.
    """

    kind: int
    centre: tuple[float, float]
    size: tuple[float, float]
    heading: float
    velocity: tuple[float, float]
    bins: tuple[int, int]

    @property
    def moving(self) -> bool:
        return self.velocity != (0.0, 0.0)


@dataclass
class BevBatch:
    """A batch of sequences and their current-frame ground truth.

    Attributes:
        occupancy: (B, T, C, H, W) float 0/1: the model's input (noisy).
        category: (B, H, W) long.
        displacement: (B, 2, H, W) float ``(dx, dy)`` to ``horizon`` frames ahead.
        moving: (B, H, W) bool.
        occupied: (B, H, W) bool: cells of any object in the current frame.
        instances: (B, H, W) long index into ``objects[b]``, -1 none.
        objects: per scene, its `BevObject` list.
    """

    occupancy: torch.Tensor
    category: torch.Tensor
    displacement: torch.Tensor
    moving: torch.Tensor
    occupied: torch.Tensor
    instances: torch.Tensor
    objects: list[list[BevObject]] = field(default_factory=list)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, bounds: tuple[int, int]) -> int:
    return int(torch.randint(bounds[0], bounds[1] + 1, (), generator=generator))


def footprint(obj: BevObject, offsets: torch.Tensor, grid: int) -> torch.Tensor:
    """(len(offsets), grid, grid) bool: the object's cells `offsets` frames after the current one.

    Args:
        obj: the object.
        offsets: frame offsets from the current frame (e.g. ``[-4, ..., 0]`` for the input frames,
            ``[horizon]`` for the future frame).
        grid: cells per side.
    """
    offsets = offsets.to(torch.float32).view(-1, 1, 1)
    cx = obj.centre[0] + obj.velocity[0] * offsets
    cy = obj.centre[1] + obj.velocity[1] * offsets
    centres = torch.arange(grid, dtype=torch.float32) + 0.5
    dx, dy = centres.view(1, 1, grid) - cx, centres.view(1, grid, 1) - cy
    cos, sin = math.cos(obj.heading), math.sin(obj.heading)
    along, across = dx * cos + dy * sin, -dx * sin + dy * cos
    return (along.abs() <= obj.size[0] / 2) & (across.abs() <= obj.size[1] / 2)


def _sample_object(kind: int, config: BevSequenceConfig, generator: torch.Generator) -> BevObject:
    g, bins = config.grid, config.height_bins
    heading = _uniform(generator, -math.pi, math.pi)
    speed = 0.0
    if kind == VEHICLE:
        size = (_uniform(generator, 7, 10), _uniform(generator, 3.5, 4.5))
        height = _randint(generator, (max(1, bins - 1), bins))
        if float(torch.rand((), generator=generator)) < config.moving_fraction:
            speed = _uniform(generator, *config.vehicle_speed)
    elif kind == PEDESTRIAN:
        side = _uniform(generator, 1.5, 2.5)
        size, height = (side, side), bins
        if float(torch.rand((), generator=generator)) < config.moving_fraction:
            speed = _uniform(generator, *config.pedestrian_speed)
    elif float(torch.rand((), generator=generator)) < 0.5:  # a wall
        size, height = (_uniform(generator, 6, 20), _uniform(generator, 1, 2)), _randint(generator, (1, bins))
    else:  # an axis-aligned pole, so it always covers a cell
        side = _uniform(generator, 1, 1.5)
        size, height, heading = (side, side), _randint(generator, (1, bins)), 0.0
    margin = 4.0
    centre = (_uniform(generator, margin, g - margin), _uniform(generator, margin, g - margin))
    velocity = (speed * math.cos(heading), speed * math.sin(heading))
    return BevObject(kind, centre, size, heading, velocity, (0, height))


def sample_scene(config: BevSequenceConfig, generator: torch.Generator) -> list[BevObject]:
    """A scene's objects, none overlapping another (with a cell of gap) in the current frame."""
    kinds = [VEHICLE] * _randint(generator, config.vehicles) + [PEDESTRIAN] * _randint(generator, config.pedestrians)
    kinds += [CLUTTER] * _randint(generator, config.clutter)
    taken = torch.zeros(config.grid, config.grid, dtype=torch.bool)
    objects = []
    now = torch.zeros(1)
    for kind in kinds:
        for _try in range(config.placement_tries):
            obj = _sample_object(kind, config, generator)
            cells = footprint(obj, now, config.grid)[0]
            grown = F.max_pool2d(cells[None, None].float(), 3, 1, 1)[0, 0] > 0
            if cells.any() and not (grown & taken).any():
                taken |= cells
                objects.append(obj)
                break
    return objects


def _render(objects: list[BevObject], config: BevSequenceConfig, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Noisy occupancy (T, C, H, W) and the current-frame ground-truth maps of one scene."""
    g, t, c = config.grid, config.frames, config.height_bins
    offsets = torch.arange(-(t - 1), 1)
    occupancy = torch.zeros(t, c, g, g)
    category = torch.zeros(g, g, dtype=torch.long)
    displacement = torch.zeros(2, g, g)
    moving = torch.zeros(g, g, dtype=torch.bool)
    instances = torch.full((g, g), -1, dtype=torch.long)
    for index, obj in enumerate(objects):
        cells = footprint(obj, offsets, g)  # (T, H, W)
        low, high = obj.bins
        occupancy[:, low:high] = torch.maximum(occupancy[:, low:high], cells[:, None].float())
        now = cells[-1]
        instances[now] = index
        category[now] = obj.kind
        if obj.kind != CLUTTER:
            displacement[:, now] = torch.tensor(obj.velocity).view(2, 1) * config.horizon
            moving[now] = obj.moving
    keep = torch.rand(occupancy.shape, generator=generator) >= config.dropout
    spurious = torch.rand(occupancy.shape, generator=generator) < config.false_occupancy
    noisy = ((occupancy > 0) & keep) | spurious
    return noisy.float(), category, displacement, moving, instances >= 0, instances


def generate_bev_batch(
    batch_size: int,
    config: BevSequenceConfig | None = None,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> BevBatch:
    """Generate `batch_size` sequences; the same seed (or generator state) gives the same batch.

    Args:
        batch_size: number of sequences.
        config: scene settings (`BevSequenceConfig()` if omitted).
        seed: seeds a fresh generator (ignored when `generator` is given).
        generator: a torch generator to draw from (advanced by the call).

    Returns:
        A `BevBatch`.
    """
    config = config or BevSequenceConfig()
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    scenes = [sample_scene(config, generator) for _ in range(batch_size)]
    rendered = [_render(objects, config, generator) for objects in scenes]
    occupancy, category, displacement, moving, occupied, instances = (torch.stack(parts) for parts in zip(*rendered))
    return BevBatch(occupancy, category, displacement, moving, occupied, instances, scenes)
