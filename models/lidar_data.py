"""Procedural lidar scenes, pillar voxelisation, anchors and detection targets for PointPillars.

Everything here runs outside the network, vectorised in numpy (no Python loop over points or
rays), and is seeded, so a scene, a batch or a held-out set is reproducible from an integer.

Scenes (`generate_scene`)
    A spinning multi-beam lidar (64 beams from -24.8 to +2 degrees, like an HDL-64E) mounted
    ``sensor_height`` above a flat ground plane casts rays into a world of boxes: cars,
    pedestrians and cyclists with realistic KITTI sizes and random headings, plus unlabelled
    clutter (poles, walls, bushes). Boxes are sampled without overlap (their circumscribed
    circles, plus a margin, do not touch). Each ray returns its first hit (ground or box), so
    objects show only their visible faces and cast shadows on the ground, as real lidar data
    does. Sensor noise: Gaussian range noise, random dropped returns, per-beam azimuth jitter,
    and a material-dependent intensity with noise. Only returns inside ``max_range`` and the
    point-cloud range are kept. Ground-truth boxes with fewer than ``min_points`` points (fully
    occluded or out of view) are dropped, as unlabelled objects would be in a real data set.

Coordinates: x forward, y left, z up, metres, sensor at the origin; a box is
``(x, y, z, l, w, h, yaw)`` with ``(x, y, z)`` its centre, ``l`` along the heading ``yaw``
(radians, counter-clockwise from +x, in ``[-pi, pi)``). Classes: 0 car, 1 pedestrian, 2 cyclist.

Pillars (`voxelize`, `PillarConfig`)
    Points -> the fixed-size PointPillars inputs: ``(P, N, 9)`` decorated point features,
    flat pillar indices for the scatter, grid coordinates, point counts and a point mask.

Targets (`make_anchors`, `assign_targets`, `encode_boxes`, `decode_boxes`, `make_batch`)
    Anchors on the detection head's feature map, per-class anchor/box matching by bird's-eye
    IoU, the SECOND residual box encoding and direction bins; `make_batch` turns scenes into
    network inputs plus these targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fxopt.models.metrics import bev_corners

__all__ = [
    "CLASS_NAMES",
    "CLASS_SIZES",
    "DIR_OFFSET",
    "AnchorConfig",
    "Pillars",
    "PillarConfig",
    "Scene",
    "SceneConfig",
    "assign_targets",
    "collate_pillars",
    "decode_boxes",
    "encode_boxes",
    "generate_scene",
    "generate_scenes",
    "make_anchors",
    "make_batch",
    "nearest_bev_iou",
    "voxelize",
]

CLASS_NAMES = ("car", "pedestrian", "cyclist")
# mean (l, w, h) and standard deviation per class, metres (KITTI statistics)
CLASS_SIZES = (
    ((3.9, 1.6, 1.56), (0.35, 0.10, 0.10)),
    ((0.8, 0.6, 1.73), (0.12, 0.08, 0.10)),
    ((1.76, 0.6, 1.73), (0.15, 0.06, 0.08)),
)
# mean intensity and spread per class; index 3 is clutter, 4 the ground
_INTENSITY = ((0.45, 0.25), (0.25, 0.10), (0.35, 0.15), (0.30, 0.15), (0.12, 0.05))
DIR_OFFSET = math.pi / 4  # direction-bin boundary offset (OpenPCDet's 0.78539)


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneConfig:
    """What the procedural scene generator produces.

    Attributes:
        point_cloud_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)``; points and boxes lie inside.
        sensor_height: lidar height above the ground plane (the ground is at ``z = -sensor_height``).
        max_range: the sensor's range in metres; no return farther than this.
        beams: number of lidar beams (rings), evenly spaced in elevation.
        elevation_deg: lowest and highest beam elevation, degrees.
        azimuth_resolution_deg: horizontal angle between two returns of a beam.
        num_objects: per class, inclusive ``(min, max)`` count of objects placed (before occlusion).
        num_clutter: inclusive ``(min, max)`` count of unlabelled clutter boxes.
        min_points: a labelled box needs at least this many points to be kept as ground truth.
        range_noise: standard deviation of the Gaussian range noise, metres.
        dropout: probability that a return is lost.
        min_distance: no object centre closer to the sensor than this (metres).
        margin: extra clearance between sampled boxes, metres.
    """

    point_cloud_range: tuple[float, float, float, float, float, float] = (0.0, -39.68, -3.0, 69.12, 39.68, 1.0)
    sensor_height: float = 1.73
    max_range: float = 80.0
    beams: int = 64
    elevation_deg: tuple[float, float] = (-24.8, 2.0)
    azimuth_resolution_deg: float = 0.35
    num_objects: tuple[tuple[int, int], ...] = ((3, 10), (0, 5), (0, 4))
    num_clutter: tuple[int, int] = (2, 6)
    min_points: int = 5
    range_noise: float = 0.02
    dropout: float = 0.05
    min_distance: float = 3.0
    margin: float = 0.3


@dataclass
class Scene:
    """One generated lidar frame.

    Attributes:
        points: (N, 4) float32 ``x, y, z, intensity`` (intensity in [0, 1]).
        boxes: (M, 7) float32 ground-truth boxes ``x, y, z, l, w, h, yaw``.
        labels: (M,) int64 class indices (see `CLASS_NAMES`).
        seed: the seed it was generated from.
    """

    points: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    seed: int = 0

    def boxes_with_class(self) -> torch.Tensor:
        """(M, 8) ``x, y, z, l, w, h, yaw, class`` (class as a float)."""
        return torch.cat([self.boxes, self.labels[:, None].to(self.boxes.dtype)], dim=1)


def _sample_boxes(rng: np.random.Generator, cfg: SceneConfig) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping boxes (K, 7) and their kinds (K,): class index, or 3 for clutter."""
    x0, y0, _, x1, y1, _ = cfg.point_cloud_range
    kinds: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    for c, (lo, hi) in enumerate(cfg.num_objects):
        n = int(rng.integers(lo, hi + 1))
        mean, std = CLASS_SIZES[c]
        s = rng.normal(mean, std, size=(n, 3))
        sizes.append(np.maximum(s, 0.3 * np.asarray(mean)))
        kinds.append(np.full(n, c))
    n_clutter = int(rng.integers(cfg.num_clutter[0], cfg.num_clutter[1] + 1))
    # clutter: poles, walls and bushes
    shape = rng.integers(0, 3, size=n_clutter)
    pole = np.column_stack([rng.uniform(0.15, 0.4, n_clutter)] * 2 + [rng.uniform(2.5, 4.5, n_clutter)])
    wall = np.column_stack([rng.uniform(3, 10, n_clutter), rng.uniform(0.2, 0.5, n_clutter), rng.uniform(1.0, 2.5, n_clutter)])
    bush = np.column_stack([rng.uniform(0.8, 2.5, n_clutter), rng.uniform(0.8, 2.0, n_clutter), rng.uniform(0.5, 1.5, n_clutter)])
    sizes.append(np.choose(shape[:, None], [pole, wall, bush]))
    kinds.append(np.full(n_clutter, 3))
    size = np.concatenate(sizes)
    kind = np.concatenate(kinds)
    n = len(kind)
    # several candidate positions per box, all drawn at once; the first free one is taken
    tries = 8
    radius = 0.5 * np.hypot(size[:, 0], size[:, 1])
    cx = rng.uniform(x0, x1, size=(n, tries))
    cy = rng.uniform(y0, y1, size=(n, tries))
    inside = (
        (cx - radius[:, None] >= x0) & (cx + radius[:, None] <= x1)
        & (cy - radius[:, None] >= y0) & (cy + radius[:, None] <= y1)
    )
    dist = np.hypot(cx, cy)
    inside &= (dist >= cfg.min_distance + radius[:, None]) & (dist + radius[:, None] <= cfg.max_range)
    yaw = rng.uniform(-math.pi, math.pi, size=n)
    order = rng.permutation(n)  # no class gets the free space first
    placed_xy = np.zeros((0, 2))
    placed_r = np.zeros(0)
    keep = np.zeros(n, dtype=bool)
    pos = np.zeros((n, 2))
    for i in order:  # loop over boxes (tens), never over points
        cand = np.column_stack([cx[i], cy[i]])[inside[i]]
        if len(cand) == 0:
            continue
        if len(placed_r):
            d = np.hypot(cand[:, None, 0] - placed_xy[None, :, 0], cand[:, None, 1] - placed_xy[None, :, 1])
            free = np.all(d > radius[i] + placed_r[None, :] + cfg.margin, axis=1)
            cand = cand[free]
            if len(cand) == 0:
                continue
        pos[i] = cand[0]
        keep[i] = True
        placed_xy = np.vstack([placed_xy, cand[:1]])
        placed_r = np.append(placed_r, radius[i])
    z = -cfg.sensor_height + size[:, 2] / 2
    boxes = np.column_stack([pos, z, size, yaw])[keep]
    return boxes, kind[keep]


def _cast(origin_dirs: np.ndarray, boxes: np.ndarray, azimuth: np.ndarray, n_beams: int) -> tuple[np.ndarray, np.ndarray]:
    """First box hit per ray: (distance or inf, box index or -1).

    Rays are laid out as (beams, columns) with column azimuths ``azimuth`` (sorted); only the
    columns within each box's azimuth span are tested, gathered without a Python loop.
    """
    dirs = origin_dirs.reshape(-1, 3)
    n_cols = len(azimuth)
    n_rays = len(dirs)
    t_best = np.full(n_rays, np.inf)
    hit = np.full(n_rays, -1)
    if len(boxes) == 0:
        return t_best, hit
    # azimuth span of each box (from its BEV corners; boxes never contain the sensor)
    corners = bev_corners(boxes)  # (K, 4, 2)
    centre_az = np.arctan2(boxes[:, 1], boxes[:, 0])
    ang = np.arctan2(corners[..., 1], corners[..., 0])
    rel = (ang - centre_az[:, None] + np.pi) % (2 * np.pi) - np.pi
    first, last = centre_az + rel.min(axis=1), centre_az + rel.max(axis=1)
    lo = np.searchsorted(azimuth, first, side="left")
    hi = np.searchsorted(azimuth, last, side="right")
    wraps = (first < -np.pi) | (last >= np.pi)  # a span across the -x axis: test every column
    lo, hi = np.where(wraps, 0, lo), np.where(wraps, n_cols, hi)
    count = np.maximum(hi - lo, 0)
    box_of_col = np.repeat(np.arange(len(boxes)), count)
    col = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count) + np.repeat(lo, count)
    # every beam of those columns
    box_idx = np.repeat(box_of_col, n_beams)
    ray = (np.arange(n_beams)[None, :] * n_cols + col[:, None]).reshape(-1)
    if len(ray) == 0:
        return t_best, hit
    b = boxes[box_idx]
    d = dirs[ray]
    c, s = np.cos(b[:, 6]), np.sin(b[:, 6])
    # ray origin (the sensor, 0) and direction in the box frame
    o_local = np.column_stack([-(c * b[:, 0] + s * b[:, 1]), -(-s * b[:, 0] + c * b[:, 1]), -b[:, 2]])
    d_local = np.column_stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]])
    half = b[:, 3:6] / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - o_local) / d_local
        t2 = (half - o_local) / d_local
    t_near = np.nanmax(np.minimum(t1, t2), axis=1)
    t_far = np.nanmin(np.maximum(t1, t2), axis=1)
    ok = (t_far >= t_near) & (t_near > 0)
    ray, t_near, box_idx = ray[ok], t_near[ok], box_idx[ok]
    # nearest hit per ray: sort by (ray, t) and take the first of each ray
    order = np.lexsort((t_near, ray))
    ray, t_near, box_idx = ray[order], t_near[order], box_idx[order]
    first = np.ones(len(ray), dtype=bool)
    first[1:] = ray[1:] != ray[:-1]
    t_best[ray[first]] = t_near[first]
    hit[ray[first]] = box_idx[first]
    return t_best, hit


def generate_scene(seed: int = 0, config: SceneConfig | None = None) -> Scene:
    """Generate one seeded lidar frame (see the module docstring for the model).

    Args:
        seed: the same seed and config always give the same scene.
        config: a `SceneConfig` (default: the KITTI point-cloud range).

    Returns:
        A `Scene` with torch tensors.

    Example:
        >>> scene = generate_scene(0)
        >>> scene.points.shape[1], scene.boxes.shape[1], bool((scene.labels == 0).any())
        (4, 7, True)
    """
    cfg = config or SceneConfig()
    rng = np.random.default_rng(seed)
    x0, y0, z0, x1, y1, z1 = cfg.point_cloud_range
    boxes, kinds = _sample_boxes(rng, cfg)

    # rays: beams x azimuth columns over the azimuths the range covers
    corners_az = np.arctan2([y0, y0, y1, y1], [x0, x1, x0, x1])
    az_lo, az_hi = (-math.pi / 2, math.pi / 2) if x0 >= 0 else (-math.pi, math.pi)
    if x0 > 0:
        az_lo, az_hi = float(corners_az.min()), float(corners_az.max())
    step = math.radians(cfg.azimuth_resolution_deg)
    azimuth = np.arange(az_lo, az_hi, step) + rng.uniform(0, step)
    elevation = np.radians(np.linspace(cfg.elevation_deg[0], cfg.elevation_deg[1], cfg.beams))
    elevation = elevation + rng.normal(0, math.radians(0.02), size=cfg.beams)  # beam calibration
    jitter = rng.uniform(-0.5, 0.5, size=(cfg.beams, 1)) * step * 0.5  # per-beam azimuth offset
    az = azimuth[None, :] + jitter  # (beams, cols)
    ce = np.cos(elevation)[:, None]
    dirs = np.stack([ce * np.cos(az), ce * np.sin(az), np.broadcast_to(np.sin(elevation)[:, None], az.shape)], axis=-1)
    t_box, hit = _cast(dirs, boxes, azimuth, cfg.beams)
    dz = dirs[..., 2].reshape(-1)
    with np.errstate(divide="ignore"):
        t_ground = np.where(dz < 0, cfg.sensor_height / -dz, np.inf)
    t = np.minimum(t_box, t_ground)
    hit = np.where(t_box <= t_ground, hit, -1)  # -1: the ground (or nothing)
    kind = np.append(kinds, 4)[hit]  # material of what each ray hit; 4 = ground
    valid = np.isfinite(t) & (t <= cfg.max_range)
    valid &= rng.random(len(t)) >= cfg.dropout
    t = t + rng.normal(0, cfg.range_noise, size=len(t))
    pts = dirs.reshape(-1, 3) * t[:, None]
    mean = np.asarray(_INTENSITY)[kind]
    intensity = np.clip(rng.normal(mean[:, 0], mean[:, 1]), 0.0, 1.0)
    in_range = (
        (pts[:, 0] >= x0) & (pts[:, 0] < x1) & (pts[:, 1] >= y0) & (pts[:, 1] < y1)
        & (pts[:, 2] >= z0) & (pts[:, 2] < z1) & (np.linalg.norm(pts, axis=1) <= cfg.max_range)
    )
    valid &= in_range
    points = np.column_stack([pts[valid], intensity[valid]]).astype(np.float32)

    # labelled boxes with enough points
    labelled = kinds < len(CLASS_NAMES)
    counts = np.bincount(hit[valid & (hit >= 0)], minlength=len(boxes)) if len(boxes) else np.zeros(0, int)
    keep = labelled & (counts >= cfg.min_points)
    gt = boxes[keep].astype(np.float32)
    return Scene(torch.from_numpy(points), torch.from_numpy(gt.reshape(-1, 7)), torch.from_numpy(kinds[keep].astype(np.int64)), seed)


def generate_scenes(seeds: Sequence[int], config: SceneConfig | None = None) -> list[Scene]:
    """`generate_scene` for each seed."""
    return [generate_scene(int(s), config) for s in seeds]


# ----------------------------------------------------------------------------- pillars


@dataclass(frozen=True)
class PillarConfig:
    """The pillar grid and the fixed sizes of the network inputs.

    Attributes:
        point_cloud_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)``; points outside are dropped.
        voxel_size: pillar size ``(dx, dy)`` in metres (a pillar spans the whole z range).
        max_points_per_pillar: N, points kept per pillar.
        max_pillars: P, pillars kept per frame (the input is padded to exactly P).
    """

    point_cloud_range: tuple[float, float, float, float, float, float] = (0.0, -39.68, -3.0, 69.12, 39.68, 1.0)
    voxel_size: tuple[float, float] = (0.16, 0.16)
    max_points_per_pillar: int = 32
    max_pillars: int = 12000

    @property
    def grid_size(self) -> tuple[int, int]:
        """``(nx, ny)``: pillar columns along x and rows along y."""
        x0, y0, _, x1, y1, _ = self.point_cloud_range
        return round((x1 - x0) / self.voxel_size[0]), round((y1 - y0) / self.voxel_size[1])

    @property
    def num_cells(self) -> int:
        nx, ny = self.grid_size
        return nx * ny

    def scene_config(self, **overrides: Any) -> SceneConfig:
        """A `SceneConfig` generating points in this range."""
        return replace(SceneConfig(point_cloud_range=self.point_cloud_range), **overrides)


@dataclass
class Pillars:
    """Fixed-size PointPillars inputs of one frame (P = max_pillars, N = max_points_per_pillar).

    Attributes:
        features: (P, N, 9) float32 per point ``x, y, z, r, x - x_mean, y - y_mean, z - z_mean,
            x - x_centre, y - y_centre`` (mean over the pillar's kept points, centre of the
            pillar cell); zero for padding points and pillars.
        indices: (P,) int64 scatter index: ``iy * nx + ix`` for a real pillar, and
            ``nx * ny + p`` (a distinct spare cell after the grid) for padding slot ``p``, so the
            network's scatter never writes one cell twice.
        coords: (P, 2) int64 ``(ix, iy)`` grid coordinates, ``-1`` for padding.
        num_points: (P,) int64 points in each pillar (after the N cap).
        mask: (P, N) bool, True for real points.
        num_pillars: number of real pillars (``<= P``).
        dropped_points: points lost to the N and P caps.
    """

    features: torch.Tensor
    indices: torch.Tensor
    coords: torch.Tensor
    num_points: torch.Tensor
    mask: torch.Tensor
    num_pillars: int
    dropped_points: int = 0


def voxelize(points: Any, config: PillarConfig, seed: int | None = 0) -> Pillars:
    """Group points into pillars and decorate them: the PointPillars preprocessing.

    Vectorised: points are binned to grid cells, sorted by cell (a stable sort, with a random
    key first when ``seed`` is set), ranked within their cell with ``np.unique`` counts, and
    written into the padded ``(P, N, 9)`` array with one fancy-index assignment.

    Args:
        points: (M, 4) ``x, y, z, intensity`` (tensor or array); points outside the range are dropped.
        config: the `PillarConfig`.
        seed: when a pillar has more than N points, or there are more than P pillars, a random
            subset (from this seed) is kept; ``None`` keeps the first points in input order and
            the pillars with the lowest cell index.

    Returns:
        `Pillars` (torch tensors); real pillars come first, in increasing cell index.

    Example:
        >>> cfg = PillarConfig((0, 0, -1, 2, 2, 1), (1.0, 1.0), max_points_per_pillar=2, max_pillars=3)
        >>> p = voxelize([[0.5, 0.5, 0, 1], [0.7, 0.5, 0, 1], [1.5, 0.5, 0, 1]], cfg)
        >>> p.indices.tolist(), p.num_points.tolist(), p.features.shape
        ([0, 1, 6], [2, 1, 0], torch.Size([3, 2, 9]))
    """
    pts = points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points)
    pts = pts.astype(np.float32, copy=False).reshape(-1, 4)
    x0, y0, z0, x1, y1, z1 = config.point_cloud_range
    vx, vy = config.voxel_size
    nx, ny = config.grid_size
    n_cap, p_cap = config.max_points_per_pillar, config.max_pillars
    total = len(pts)
    ix = np.floor((pts[:, 0] - x0) / vx).astype(np.int64)
    iy = np.floor((pts[:, 1] - y0) / vy).astype(np.int64)
    ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny) & (pts[:, 2] >= z0) & (pts[:, 2] < z1)
    pts, ix, iy = pts[ok], ix[ok], iy[ok]
    cell = iy * nx + ix
    rng = np.random.default_rng(seed) if seed is not None else None
    if rng is not None:
        order = np.lexsort((rng.random(len(cell)), cell))
    else:
        order = np.argsort(cell, kind="stable")
    pts, cell = pts[order], cell[order]
    uniq, start, counts = np.unique(cell, return_index=True, return_counts=True)
    # which pillars are kept
    if len(uniq) > p_cap:
        chosen = rng.permutation(len(uniq))[:p_cap] if rng is not None else np.arange(p_cap)
        chosen = np.sort(chosen)
    else:
        chosen = np.arange(len(uniq))
    slot_of_pillar = np.full(len(uniq), -1)
    slot_of_pillar[chosen] = np.arange(len(chosen))
    pillar = np.repeat(np.arange(len(uniq)), counts)
    rank = np.arange(len(cell)) - np.repeat(start, counts)
    slot = slot_of_pillar[pillar]
    keep = (slot >= 0) & (rank < n_cap)
    pts, slot, rank, cell = pts[keep], slot[keep], rank[keep], cell[keep]
    n_pillars = len(chosen)
    num_points = np.bincount(slot, minlength=p_cap)[:p_cap]
    # decorations
    sums = np.stack([np.bincount(slot, weights=pts[:, k], minlength=p_cap) for k in range(3)], axis=1)
    mean = sums / np.maximum(num_points, 1)[:, None]
    cx = (cell % nx + 0.5) * vx + x0
    cy = (cell // nx + 0.5) * vy + y0
    feats = np.concatenate(
        [pts, pts[:, :3] - mean[slot], (pts[:, 0] - cx)[:, None], (pts[:, 1] - cy)[:, None]], axis=1
    ).astype(np.float32)
    features = np.zeros((p_cap, n_cap, 9), dtype=np.float32)
    features[slot, rank] = feats
    mask = np.zeros((p_cap, n_cap), dtype=bool)
    mask[slot, rank] = True
    indices = nx * ny + np.arange(p_cap, dtype=np.int64)
    indices[:n_pillars] = uniq[chosen]
    coords = np.full((p_cap, 2), -1, dtype=np.int64)
    coords[:n_pillars, 0] = uniq[chosen] % nx
    coords[:n_pillars, 1] = uniq[chosen] // nx
    return Pillars(
        torch.from_numpy(features),
        torch.from_numpy(indices),
        torch.from_numpy(coords),
        torch.from_numpy(num_points.astype(np.int64)),
        torch.from_numpy(mask),
        int(n_pillars),
        int(total - len(pts)),
    )


def collate_pillars(pillars: Sequence[Pillars]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack frames into the network inputs ``(features (B, P, N, 9), indices (B, P))``."""
    return torch.stack([p.features for p in pillars]), torch.stack([p.indices for p in pillars])


# ----------------------------------------------------------------------------- anchors and targets


@dataclass(frozen=True)
class AnchorConfig:
    """Anchors of the detection head: per class a size, a bottom height and match thresholds.

    Attributes:
        sizes: per class ``(l, w, h)``.
        bottom_heights: per class, z of the anchor's bottom face.
        rotations: anchor headings at every location (radians).
        matched_thresholds: per class, BEV IoU at or above which an anchor is positive.
        unmatched_thresholds: per class, BEV IoU below which an anchor is background
            (between the two: ignored in the class loss).
        feature_stride: pillar cells per head feature-map cell.
    """

    sizes: tuple[tuple[float, float, float], ...] = tuple(s[0] for s in CLASS_SIZES)
    bottom_heights: tuple[float, ...] = (-1.73, -1.73, -1.73)
    rotations: tuple[float, ...] = (0.0, math.pi / 2)
    matched_thresholds: tuple[float, ...] = (0.6, 0.5, 0.5)
    unmatched_thresholds: tuple[float, ...] = (0.45, 0.35, 0.35)
    feature_stride: int = 2

    @property
    def num_classes(self) -> int:
        return len(self.sizes)

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.sizes) * len(self.rotations)


def make_anchors(pillars: PillarConfig, anchors: AnchorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor boxes on the head's feature map.

    Returns:
        ``(boxes (H, W, A, 7), classes (A,))`` with ``H = ny / stride``, ``W = nx / stride`` and
        ``A = classes x rotations`` ordered class-major (anchor ``a`` is class ``a // R``,
        rotation ``a % R``); box centres at the feature cells' centres.
    """
    x0, y0, _, _, _, _ = pillars.point_cloud_range
    nx, ny = pillars.grid_size
    s = anchors.feature_stride
    w, h = nx // s, ny // s
    xs = x0 + (np.arange(w) + 0.5) * pillars.voxel_size[0] * s
    ys = y0 + (np.arange(h) + 0.5) * pillars.voxel_size[1] * s
    per = []
    for size, bottom in zip(anchors.sizes, anchors.bottom_heights):
        for rot in anchors.rotations:
            per.append([size[0], size[1], size[2], bottom + size[2] / 2, rot])
    per_arr = np.asarray(per)  # (A, 5): l, w, h, z, yaw
    a = len(per_arr)
    grid = np.zeros((h, w, a, 7))
    grid[..., 0] = xs[None, :, None]
    grid[..., 1] = ys[:, None, None]
    grid[..., 2] = per_arr[:, 3]
    grid[..., 3:6] = per_arr[:, :3]
    grid[..., 6] = per_arr[:, 4]
    classes = np.repeat(np.arange(anchors.num_classes), len(anchors.rotations))
    return torch.from_numpy(grid.astype(np.float32)), torch.from_numpy(classes)


def _nearest_aligned(boxes: np.ndarray) -> np.ndarray:
    """(K, 4) axis-aligned BEV ``x_min, y_min, x_max, y_max`` after rotating each box to the nearest axis."""
    yaw = np.abs(((boxes[:, 6] + np.pi / 2) % np.pi) - np.pi / 2)  # in [0, pi/2]
    swap = yaw > np.pi / 4
    length = np.where(swap, boxes[:, 4], boxes[:, 3])
    width = np.where(swap, boxes[:, 3], boxes[:, 4])
    return np.column_stack([boxes[:, 0] - length / 2, boxes[:, 1] - width / 2, boxes[:, 0] + length / 2, boxes[:, 1] + width / 2])


def nearest_bev_iou(boxes_a: Any, boxes_b: Any) -> np.ndarray:
    """(K, M) BEV IoU of boxes rotated to their nearest axis (the fast IoU used to match anchors)."""
    a = _nearest_aligned(np.asarray(boxes_a, dtype=np.float64).reshape(-1, 7))
    b = _nearest_aligned(np.asarray(boxes_b, dtype=np.float64).reshape(-1, 7))
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """SECOND residual encoding of boxes (..., 7) relative to anchors (..., 7).

    ``dx, dy = (x - xa, y - ya) / diag_a``, ``dz = (z - za) / ha``, ``dl, dw, dh = log(size / size_a)``,
    ``dyaw = yaw - yaw_a`` (the loss compares it through a sine, so it may wrap).
    """
    xa, ya, za, la, wa, ha, ra = anchors.unbind(-1)
    xg, yg, zg, lg, wg, hg, rg = boxes.unbind(-1)
    diag = torch.sqrt(la**2 + wa**2)
    return torch.stack(
        [(xg - xa) / diag, (yg - ya) / diag, (zg - za) / ha,
         torch.log(lg / la), torch.log(wg / wa), torch.log(hg / ha), rg - ra], dim=-1
    )


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_boxes`."""
    xa, ya, za, la, wa, ha, ra = anchors.unbind(-1)
    dx, dy, dz, dl, dw, dh, dr = deltas.unbind(-1)
    diag = torch.sqrt(la**2 + wa**2)
    return torch.stack(
        [dx * diag + xa, dy * diag + ya, dz * ha + za,
         torch.exp(dl.clamp(max=6)) * la, torch.exp(dw.clamp(max=6)) * wa, torch.exp(dh.clamp(max=6)) * ha, dr + ra], dim=-1
    )


def direction_bin(yaw: torch.Tensor) -> torch.Tensor:
    """Which half-turn the heading is in (0 or 1), with the `DIR_OFFSET` boundary."""
    return (torch.remainder(yaw - DIR_OFFSET, 2 * math.pi) >= math.pi).long()


def assign_targets(
    anchors: torch.Tensor,
    anchor_classes: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    config: AnchorConfig,
) -> dict[str, torch.Tensor]:
    """Match anchors to ground-truth boxes of their own class by nearest-axis BEV IoU.

    An anchor is positive when its IoU with a box of its class is ``>= matched_thresholds[c]``
    or it is (one of) that box's best anchor(s); background below ``unmatched_thresholds[c]``;
    ignored in between.

    Args:
        anchors: (..., A, 7) anchors (e.g. from `make_anchors`); flattened to (K, 7).
        anchor_classes: (A,) class of each anchor slot.
        boxes: (M, 7) ground-truth boxes; labels: (M,) their classes.
        config: the thresholds.

    Returns:
        ``labels`` (K,) int64: class + 1 for positives, 0 background, -1 ignored;
        ``box_targets`` (K, 7) encoded boxes (zeros where not positive); ``dir_targets`` (K,)
        direction bins; ``positive`` (K,) bool.
    """
    a = anchors.reshape(-1, 7)
    k = len(a)
    cls = anchor_classes.repeat(k // len(anchor_classes)).numpy()
    out_labels = np.zeros(k, dtype=np.int64)
    box_t = torch.zeros(k, 7)
    dir_t = torch.zeros(k, dtype=torch.long)
    if len(boxes) == 0:
        return {"labels": torch.from_numpy(out_labels), "box_targets": box_t, "dir_targets": dir_t,
                "positive": torch.zeros(k, dtype=torch.bool)}
    gl = labels.numpy()
    # only anchors near some box can match: prefilter by centre distance
    an = a.numpy().astype(np.float64)
    gb = boxes.numpy().astype(np.float64)
    iou = np.zeros((k, len(gb)))
    reach = 0.5 * (np.hypot(an[:, 3], an[:, 4]).max() + np.hypot(gb[:, 3], gb[:, 4]))
    near = np.nonzero((np.abs(an[:, None, 0] - gb[None, :, 0]) < reach[None, :]).any(1)
                      & (np.abs(an[:, None, 1] - gb[None, :, 1]) < reach[None, :]).any(1))[0]
    if len(near):
        sub = nearest_bev_iou(an[near], gb)
        sub[cls[near][:, None] != gl[None, :]] = 0.0
        iou[near] = sub
    best = iou.argmax(axis=1)
    best_iou = iou[np.arange(k), best]
    matched_thr = np.asarray(config.matched_thresholds)[cls]
    unmatched_thr = np.asarray(config.unmatched_thresholds)[cls]
    positive = best_iou >= matched_thr
    # every box gets its best anchor(s) even below the threshold
    gt_best = iou.max(axis=0)
    forced = (iou == gt_best[None, :]) & (gt_best[None, :] > 0)
    f_anchor, f_gt = np.nonzero(forced)
    best[f_anchor] = f_gt
    positive[f_anchor] = True
    ignored = ~positive & (best_iou >= unmatched_thr)
    out_labels[positive] = gl[best[positive]] + 1
    out_labels[ignored] = -1
    pos_t = torch.from_numpy(positive)
    gt_pos = boxes[torch.from_numpy(best[positive])]
    box_t[pos_t] = encode_boxes(gt_pos, a[pos_t])
    dir_t[pos_t] = direction_bin(gt_pos[:, 6])
    return {"labels": torch.from_numpy(out_labels), "box_targets": box_t, "dir_targets": dir_t, "positive": pos_t}


def make_batch(
    scenes: Sequence[Scene],
    pillars: PillarConfig,
    anchors: AnchorConfig,
    anchor_boxes: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int | None = 0,
) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, Any]]:
    """Scenes -> network inputs and head targets.

    Args:
        scenes: the frames of the batch.
        pillars: the pillar grid and input sizes.
        anchors: the anchor configuration.
        anchor_boxes: `make_anchors` output, if already computed.
        seed: passed to `voxelize` (subsampling of over-full pillars / grids).

    Returns:
        ``((features (B, P, N, 9), indices (B, P)), targets)`` where ``targets`` holds the stacked
        `assign_targets` results (``labels`` (B, K), ``box_targets`` (B, K, 7), ``dir_targets``,
        ``positive``), the ``anchors`` (K, 7) and the ground truth ``gt_boxes`` / ``gt_labels``
        (lists, one per frame).
    """
    grid, classes = anchor_boxes if anchor_boxes is not None else make_anchors(pillars, anchors)
    inputs = collate_pillars([voxelize(s.points, pillars, seed) for s in scenes])
    per = [assign_targets(grid, classes, s.boxes, s.labels, anchors) for s in scenes]
    targets: dict[str, Any] = {key: torch.stack([p[key] for p in per]) for key in per[0]}
    targets["anchors"] = grid.reshape(-1, 7)
    targets["gt_boxes"] = [s.boxes for s in scenes]
    targets["gt_labels"] = [s.labels for s in scenes]
    return inputs, targets
