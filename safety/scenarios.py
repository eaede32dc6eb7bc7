"""Seeded generators of safety-supervisor inputs, and collision labels by simulating a command.

Every generator takes a ``torch.Generator`` and a `SupervisorConfig` and returns the four
positional supervisor inputs ``(sectors, command, speed, health)`` (see `fxopt.safety.supervisor`
for their layout), so the same draw is reproducible from its seed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fxopt.errors import InputError
from fxopt.safety.supervisor import SPEED_CEILING, SupervisorConfig

__all__ = [
    "HEALTH_FLAGS",
    "INPUT_FAULT_VALUES",
    "balanced_holdout",
    "SupervisorInputs",
    "clear_scenes",
    "collision_labels",
    "example_batch",
    "fault_scenes",
    "flags_down",
    "mixed_scenes",
    "obstacle_scenes",
    "random_commands",
]

SupervisorInputs = tuple[Tensor, Tensor, Tensor, Tensor]
# column of each flag in the ``health`` input
HEALTH_FLAGS = {"compute": 0, "hardware": 1, "algorithm": 2}
# per input, the values no healthy producer emits: non-finite, plus what is out of range there
# (a finite command beyond the limits is clamped by out_of_limits, not a fault)
INPUT_FAULT_VALUES: dict[str, tuple[float, ...]] = {
    "sectors": (math.nan, math.inf, -math.inf, -0.5, -1e30),
    "command": (math.nan, math.inf, -math.inf),
    "speed": (math.nan, math.inf, -math.inf, -0.5, SPEED_CEILING * 1.001, 1e30),
    "health": (math.nan, math.inf, -math.inf, -0.5, 1.5),
}


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def random_commands(batch: int, generator: torch.Generator, config: SupervisorConfig) -> Tensor:
    """``(batch, 3)`` commands drawn uniformly within the vehicle limits."""
    return torch.cat([
        _uniform((batch, 1), 0.0, config.v_max, generator),
        _uniform((batch, 1), config.accel_min, config.accel_max, generator),
        _uniform((batch, 1), -config.steer_max, config.steer_max, generator),
    ], dim=1)


def _speeds(batch: int, generator: torch.Generator, config: SupervisorConfig) -> Tensor:
    return _uniform((batch, 1), 0.0, config.v_max, generator)


def clear_scenes(batch: int, generator: torch.Generator, config: SupervisorConfig | None = None) -> SupervisorInputs:
    """Nothing in range, all flags healthy, random commands and speeds within limits.

    Example:
        >>> sectors, command, speed, health = clear_scenes(4, torch.Generator().manual_seed(0))
        >>> sectors.shape, bool((sectors == 10.0).all()), bool((health == 1).all())
        (torch.Size([4, 32]), True, True)
    """
    config = config or SupervisorConfig()
    sectors = torch.full((batch, config.num_sectors), config.max_range)
    return sectors, random_commands(batch, generator, config), _speeds(batch, generator, config), torch.ones(batch, 3)


def obstacle_scenes(
    batch: int,
    generator: torch.Generator,
    config: SupervisorConfig | None = None,
    *,
    sector: int | None = None,
    distance: tuple[float, float] = (0.2, 10.0),
    clutter: int = 0,
) -> SupervisorInputs:
    """One obstacle per row (plus `clutter` random ones), healthy flags, random commands.

    Args:
        batch: rows.
        generator: the random source.
        config: sector count, range and limits (defaults if omitted).
        sector: the obstacle's sector (random per row if None).
        distance: ``(low, high)`` metres for the obstacle, clipped to the range.
        clutter: further obstacles per row at random sectors and distances.

    Returns:
        ``(sectors, command, speed, health)``.
    """
    config = config or SupervisorConfig()
    s, r = config.num_sectors, config.max_range
    low, high = max(0.0, distance[0]), min(r, distance[1])
    if not low <= high:
        raise InputError(f"obstacle distance range {distance} is empty within the sensor range {r}")
    sectors = torch.full((batch, s), r)
    rows = torch.arange(batch)
    for _ in range(clutter):
        idx = torch.randint(0, s, (batch,), generator=generator)
        sectors[rows, idx] = torch.minimum(sectors[rows, idx], _uniform((batch,), 0.0, r, generator))
    idx = torch.full((batch,), sector % s) if sector is not None else torch.randint(0, s, (batch,), generator=generator)
    sectors[rows, idx] = torch.minimum(sectors[rows, idx], _uniform((batch,), low, high, generator))
    return sectors, random_commands(batch, generator, config), _speeds(batch, generator, config), torch.ones(batch, 3)


def flags_down(
    batch: int,
    generator: torch.Generator,
    config: SupervisorConfig | None = None,
    *,
    flag: str = "hardware",
) -> SupervisorInputs:
    """Scenes with `flag` (``compute``, ``hardware`` or ``algorithm``) down, others random 0/1."""
    if flag not in HEALTH_FLAGS:
        raise InputError(f"unknown health flag '{flag}'; known: {sorted(HEALTH_FLAGS)}")
    config = config or SupervisorConfig()
    sectors, command, speed, _ = obstacle_scenes(batch, generator, config)
    health = (torch.rand((batch, 3), generator=generator) < 0.7).float()
    health[:, HEALTH_FLAGS[flag]] = 0.0
    return sectors, command, speed, health


def mixed_scenes(batch: int, generator: torch.Generator, config: SupervisorConfig | None = None) -> SupervisorInputs:
    """Healthy scenes with 0-3 obstacles, most of them ahead, as the risk scorer meets them."""
    config = config or SupervisorConfig()
    s, r = config.num_sectors, config.max_range
    sectors = torch.full((batch, s), r)
    rows = torch.arange(batch)
    for _ in range(3):
        present = torch.rand((batch,), generator=generator) < 0.6
        # bearings concentrated ahead (normal, sd 45°), so collisions are neither rare nor certain
        bearing = torch.randn((batch,), generator=generator) * (math.pi / 4)
        idx = torch.round(bearing / (2 * math.pi / s)).long() % s
        dist = torch.where(present, _uniform((batch,), 0.3, r, generator), torch.full((batch,), r))
        sectors[rows, idx] = torch.minimum(sectors[rows, idx], dist)
    return sectors, random_commands(batch, generator, config), _speeds(batch, generator, config) * 0.6, torch.ones(batch, 3)


def collision_labels(
    inputs: SupervisorInputs,
    config: SupervisorConfig | None = None,
    *,
    horizon: float = 2.0,
    steps: int = 20,
) -> Tensor:
    """``(B, 1)`` float: 1 when executing the command unchanged hits an obstacle within `horizon`.

    Obstacles are points at their sector's centre bearing; the vehicle is a disc of radius
    ``config.half_width`` following a kinematic bicycle model: it accelerates (or brakes) at the
    commanded rate until it reaches the speed target, never reversing.
    """
    config = config or SupervisorConfig()
    sectors, command, speed, _ = inputs
    s, r = config.num_sectors, config.max_range
    bearing = torch.arange(s, dtype=torch.float32) * (2 * math.pi / s)
    present = sectors < r
    obstacles = torch.stack([sectors * torch.cos(bearing), sectors * torch.sin(bearing)], dim=-1)  # (B, S, 2)
    target = command[:, 0].clamp(0.0, config.v_max)
    accel = command[:, 1].clamp(config.accel_min, config.accel_max)
    curvature = torch.tan(command[:, 2].clamp(-config.steer_max, config.steer_max)) / config.wheelbase
    v = speed.reshape(-1).clamp(min=0.0)
    x, y, heading = torch.zeros_like(v), torch.zeros_like(v), torch.zeros_like(v)
    dt = horizon / steps
    hit = torch.zeros_like(v, dtype=torch.bool)
    for _ in range(steps + 1):
        gap = torch.hypot(obstacles[..., 0] - x[:, None], obstacles[..., 1] - y[:, None])
        hit |= ((gap < config.half_width) & present).any(dim=1)
        v_next = v + accel * dt
        # speed moves toward the target at the commanded rate, never past it (unless already past)
        v_next = torch.where(accel >= 0, torch.minimum(v_next, torch.maximum(v, target)), torch.maximum(v_next, torch.minimum(v, target)))
        v_next = v_next.clamp(min=0.0)
        step = 0.5 * (v + v_next) * dt
        heading = heading + curvature * step
        x, y, v = x + step * torch.cos(heading), y + step * torch.sin(heading), v_next
    return hit.float().unsqueeze(1)


def fault_scenes(config: SupervisorConfig | None = None, *, speeds: tuple[float, ...] = (5.0, 1.0)) -> SupervisorInputs:
    """Every input position with every value of `INPUT_FAULT_VALUES`, one fault per row.

    Each row is a clear, healthy scene (command ``(8, 1, 0)`` clamped to the limits) at each of
    `speeds` (by default one above and one below the degraded speed limit) with one value replaced.

    Example:
        >>> sectors, command, speed, health = fault_scenes(SupervisorConfig(num_sectors=8))
        >>> sectors.shape[0] == 2 * (8 * 5 + 3 * 3 + 1 * 6 + 3 * 5)
        True
    """
    config = config or SupervisorConfig()
    widths = {"sectors": config.num_sectors, "command": 3, "speed": 1, "health": 3}
    rows = [(i, col, value, v) for i, (name, width) in enumerate(widths.items()) for col in range(width)
            for value in INPUT_FAULT_VALUES[name] for v in speeds]
    n = len(rows)
    command = torch.tensor([[min(8.0, config.v_max), min(1.0, config.accel_max), 0.0]]).repeat(n, 1)
    inputs = [torch.full((n, config.num_sectors), config.max_range), command, torch.zeros(n, 1), torch.ones(n, 3)]
    for row, (i, col, value, v) in enumerate(rows):
        inputs[2][row, 0] = v
        inputs[i][row, col] = value
    return inputs[0], inputs[1], inputs[2], inputs[3]


def example_batch(config: SupervisorConfig | None = None) -> SupervisorInputs:
    """A fixed 8-row batch touching every rule: clear, obstacles ahead/aside, each flag down, bad command.

    Rows: 0 clear; 1 obstacle 3 m ahead at 6 m/s; 2 obstacle 8 m ahead at 2 m/s (speed limit);
    3 obstacle beside the vehicle; 4 compute down; 5 hardware down; 6 algorithm down at 5 m/s;
    7 command beyond the limits.
    """
    config = config or SupervisorConfig()
    s, r = config.num_sectors, config.max_range
    sectors = torch.full((8, s), r)
    sectors[1, 0] = min(3.0, r * 0.3)
    sectors[2, 0] = min(8.0, r * 0.8)
    sectors[3, s // 4] = min(2.0, r * 0.2)
    v, a, st = config.v_max, config.accel_max, config.steer_max
    command = torch.tensor([
        [0.5 * v, 0.5 * a, 0.1 * st],
        [0.6 * v, a, 0.0],
        [0.8 * v, 0.5 * a, 0.0],
        [0.4 * v, 0.2 * a, -0.2 * st],
        [0.5 * v, 0.5 * a, 0.0],
        [0.5 * v, 0.5 * a, 0.3 * st],
        [0.7 * v, a, 0.0],
        [2.0 * v, 3.0 * a, 2.0 * st],
    ])
    speed = torch.tensor([[4.0], [6.0], [2.0], [3.0], [5.0], [5.0], [5.0], [3.0]]).clamp(max=v)
    health = torch.ones(8, 3)
    health[4, HEALTH_FLAGS["compute"]] = 0.0
    health[5, HEALTH_FLAGS["hardware"]] = 0.0
    health[6, HEALTH_FLAGS["algorithm"]] = 0.0
    return sectors, command, speed, health


def balanced_holdout(
    config: SupervisorConfig | None = None, *, per_class: int = 500, seed: int = 20211
) -> tuple[SupervisorInputs, Tensor]:
    """A fixed, seeded held-out set of `mixed_scenes` with `per_class` collisions and non-collisions.

    Balanced, so a constant predictor scores accuracy 0.5 and AUC 0.5.
    """
    config = config or SupervisorConfig()
    generator = torch.Generator().manual_seed(seed)
    inputs = mixed_scenes(per_class * 8, generator, config)
    labels = collision_labels(inputs, config).reshape(-1)
    pos, neg = torch.nonzero(labels > 0.5).reshape(-1), torch.nonzero(labels < 0.5).reshape(-1)
    if min(len(pos), len(neg)) < per_class:
        raise InputError(f"only {len(pos)} collisions and {len(neg)} safe scenes drawn; lower per_class ({per_class})")
    chosen = torch.cat([pos[:per_class], neg[:per_class]])
    return tuple(t[chosen] for t in inputs), labels[chosen].unsqueeze(1)  # type: ignore[return-value]
