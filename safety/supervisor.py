"""The safety supervisor: explicit, tensorised safety rules beside a small learned risk scorer.

The supervisor sits between the control module and the actuators. It reads the nearest obstacle
per angular sector around the vehicle, the command the control module issued, the vehicle speed
and three health flags, and either passes the command through bit for bit or makes it more
conservative. Every rule is written as tensor ops (``torch.where``, ``clamp``, masked minima), so
the whole supervisor traces into one ``torch.fx`` graph and lowers to ONNX opset 17.

Conventions (vehicle frame, SI units):

- ``sectors`` ``(B, S)``: nearest obstacle distance in metres per sector. Sector ``i`` is centred
  on bearing ``i * 2π/S`` measured counter-clockwise from the vehicle's forward axis (so sector 0
  is straight ahead, ``S/4`` is to the left, ``S/2`` behind) and spans ``±π/S`` around it.
  ``max_range`` (or more) means "no obstacle in this sector".
- ``command`` ``(B, 3)``: ``[speed target (m/s), acceleration (m/s²), steering angle (rad,
  positive = left)]``. The vehicle drives forward only; speed targets live in ``[0, v_max]``.
- ``speed`` ``(B, 1)`` or ``(B,)``: measured forward speed in m/s.
- ``health`` ``(B, 3)``: ``[compute, hardware, algorithm]``, 1.0 = healthy, 0.0 = down (a value
  below 0.5, or NaN, counts as down).

Outputs (a dict): ``command`` ``(B, 3)`` supervised command, ``risk`` ``(B, 1)`` in ``[0, 1]``,
``learned_risk`` ``(B, 1)`` (the scorer alone, gated) and ``intervention`` ``(B, 1)``: a bit mask
(as float) of the rules that were active, see `INTERVENTION_BITS`. ``intervention == 0`` implies
the command passed through unchanged.

Input faults. A value no healthy producer emits is a fault of whatever produced the input, and
the supervisor cannot know what it hides: a NaN speed leaves the stopping envelope unknown, a
NaN sector may be an obstacle on the path. Every row with such a value gets the ``input_fault``
response (bit 128) on top of whatever the other rules do:

==================  ===============================================  =========================
input               fault (any element)                              also
==================  ===============================================  =========================
``sectors``         NaN, ±Inf, negative                              read as an obstacle at 0 m
                                                                     (NaN, -Inf, negative) or
                                                                     none (+Inf)
``command``         NaN, ±Inf (finite values beyond the limits are   ``out_of_limits``: NaN is a
                    clamped by ``out_of_limits``, not a fault)       controlled stop, ±Inf clamps
``speed``           NaN, ±Inf, negative, above ``SPEED_CEILING``     read as ``SPEED_CEILING``
                                                                     (worst-case envelope)
``health``          NaN, ±Inf, outside ``[0, 1]``                    NaN or below 0.5 is down
==================  ===============================================  =========================

The ``input_fault`` response is the algorithm-down response without its allowance to speed up:
speed target ``<= degraded_speed``, acceleration ``<= 0``, and ``<= -comfort_decel`` (braking)
while the (worst-case) speed is above ``degraded_speed``; ``risk`` is 1.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fxopt.errors import InputError
from fxopt.models.registry import ModelSpec, TrainingRecipe, register_model

__all__ = [
    "INTERVENTION_BITS",
    "RiskScorer",
    "SafetySupervisor",
    "SectorDistances",
    "SupervisorConfig",
    "decode_intervention",
    "stoppable_speed",
    "sector_distances",
    "stopping_distance",
]

# Measured speeds above this are sensor faults; the cap keeps v² finite even in fp16.
SPEED_CEILING = 100.0
# Stand-in for "no obstacle on the path": finite (fp16-safe) and far beyond any sensor range.
FAR = 1.0e4
# Smallest distance used as a divisor (m).
_EPS = 1.0e-3

# Which rule set which bit of the ``intervention`` output.
INTERVENTION_BITS: dict[str, int] = {
    "out_of_limits": 1,       # the command was outside the limits (or NaN) and was clamped/replaced
    "obstacle_limit": 2,      # an obstacle on the path caps the speed target at a stoppable speed
    "obstacle_brake": 4,      # an obstacle inside the stopping envelope: brake, never speed up
    "learned_caution": 8,     # the learned scorer is alarmed: no acceleration, no speed-up
    "algorithm_down": 16,     # algorithm flag down: limit speed
    "compute_down": 32,       # compute flag down: controlled stop
    "hardware_down": 64,      # hardware flag down: emergency stop
    "input_fault": 128,       # a NaN, ±Inf or out-of-range input value: degraded speed, no acceleration
}


@dataclass(frozen=True)
class SupervisorConfig:
    """Vehicle limits and safety-rule constants of a `SafetySupervisor`.

    Attributes:
        num_sectors: angular sectors over 360°.
        max_range: sensor range in metres; a sector at (or beyond) it is empty.
        v_max: highest speed target (m/s).
        accel_max: highest acceleration command (m/s²).
        accel_min: strongest braking command (m/s², negative).
        steer_max: steering limit (rad, symmetric).
        wheelbase: for the path curvature ``tan(steer) / wheelbase`` (m).
        half_width: half the vehicle width plus lateral clearance: the path corridor (m).
        reaction_time: ``t_react`` of the stopping envelope (s).
        brake_decel: deceleration the stopping envelope assumes (m/s², positive).
        margin: distance kept to an obstacle when stopped (m).
        comfort_decel: braking when compute or algorithm is down (m/s², positive).
        emergency_decel: braking when the hardware is down (m/s², positive).
        degraded_speed: speed limit while the algorithm flag is down (m/s).
        risk_threshold: learned risk above which the scorer forbids speeding up.
        hidden: width of the learned risk scorer's hidden layer.
    """

    num_sectors: int = 32
    max_range: float = 10.0
    v_max: float = 15.0
    accel_max: float = 2.0
    accel_min: float = -6.0
    steer_max: float = 0.6
    wheelbase: float = 2.8
    half_width: float = 1.1
    reaction_time: float = 0.3
    brake_decel: float = 4.0
    margin: float = 1.0
    comfort_decel: float = 2.0
    emergency_decel: float = 6.0
    degraded_speed: float = 2.0
    risk_threshold: float = 0.5
    hidden: int = 32

    def __post_init__(self) -> None:
        problems = [f"{name} must be > 0, got {getattr(self, name)}" for name in _POSITIVE if not getattr(self, name) > 0]
        if not self.accel_min < 0:
            problems.append(f"accel_min must be < 0, got {self.accel_min}")
        if self.num_sectors < 4:
            problems.append(f"num_sectors must be >= 4, got {self.num_sectors}")
        if not self.v_max <= SPEED_CEILING:
            problems.append(f"v_max must be <= {SPEED_CEILING} m/s, got {self.v_max}")
        if not self.max_range < FAR / 10:
            problems.append(f"max_range must be < {FAR / 10:g} m, got {self.max_range}")
        if not self.degraded_speed <= self.v_max:
            problems.append(f"degraded_speed ({self.degraded_speed}) must be <= v_max ({self.v_max})")
        for name in ("comfort_decel", "emergency_decel"):
            if not getattr(self, name) <= -self.accel_min:
                problems.append(f"{name} ({getattr(self, name)}) must be <= -accel_min ({-self.accel_min})")
        if not 0 < self.risk_threshold < 1:
            problems.append(f"risk_threshold must be in (0, 1), got {self.risk_threshold}")
        if problems:
            raise InputError("invalid safety supervisor config: " + "; ".join(problems))

    @classmethod
    def from_kwargs(cls, base: SupervisorConfig | None = None, **overrides: Any) -> SupervisorConfig:
        """`base` (default: the defaults) with `overrides`; an unknown name is an `InputError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InputError(f"unknown safety supervisor option(s) {unknown}; known: {sorted(known)}")
        return replace(base if base is not None else cls(), **overrides)


_POSITIVE = (
    "max_range", "v_max", "accel_max", "steer_max", "wheelbase", "half_width", "reaction_time",
    "brake_decel", "margin", "comfort_decel", "emergency_decel", "degraded_speed", "hidden",
)


def stopping_distance(speed: Tensor, reaction_time: float, brake_decel: float, margin: float) -> Tensor:
    """The stopping envelope ``d_stop = v * t_react + v² / (2 * a_brake) + margin``.

    Args:
        speed: forward speed in m/s (any shape; negative values count as 0).
        reaction_time: seconds driven at `speed` before the brakes act.
        brake_decel: deceleration once braking (m/s², positive).
        margin: distance kept to the obstacle (m).

    Returns:
        The distance in metres, same shape as `speed`.

    Example:
        >>> float(stopping_distance(torch.tensor(10.0), 0.5, 5.0, 1.0))
        16.0
    """
    v = speed.clamp(min=0.0)
    return v * reaction_time + v * v / (2.0 * brake_decel) + margin


def stoppable_speed(free: Tensor, reaction_time: float, brake_decel: float, margin: float) -> Tensor:
    """The highest speed whose stopping envelope fits in `free` metres (inverse of `stopping_distance`)."""
    room = (free - margin).clamp(min=0.0)
    t = reaction_time
    return brake_decel * (torch.sqrt(t * t + 2.0 * room / brake_decel) - t)


class _Scene(NamedTuple):
    """Sanitised inputs and the geometry the rules read (all ``(B, 1)`` unless noted)."""

    distance: Tensor  # (B, S) sector distances, clamped to [0, max_range]
    v: Tensor         # speed in [0, SPEED_CEILING]; a faulty one reads as SPEED_CEILING
    command: Tensor   # (B, 3) the command with NaN entries replaced
    limited: Tensor   # (B, 3) that command clamped to the vehicle limits
    invalid: Tensor   # the command had a NaN
    fault: Tensor     # some input value was non-finite or out of range (see the module docstring)
    free: Tensor      # nearest obstacle on the path corridor, FAR if none
    d_stop: Tensor    # the stopping envelope at the current speed
    on_path: Tensor   # an obstacle on the path within range
    inside: Tensor    # ... and inside the stopping envelope
    in_range: Tensor  # any obstacle within range (gates the learned scorer)
    down: Tensor      # (B, 3) health flags down


class RiskScorer(nn.Module):
    """A tiny MLP: normalised sector distances, speed and command -> collision risk logit.

    Its output only ever makes the supervisor more conservative (see `SafetySupervisor`).
    """

    def __init__(self, num_features: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        # an untrained scorer starts quiet (risk ~0.05) instead of alarming at random
        nn.init.constant_(self.net[2].bias, -3.0)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


class SafetySupervisor(nn.Module):
    """Pass a control command through unchanged when all is well, make it safer when not.

    Rules (each only lowers the speed target and the acceleration; steering is only clamped):

    - an obstacle on the travel path (sectors the steered path sweeps, widened by the vehicle's
      half width) caps the speed target at the speed that can still stop before it;
    - an obstacle inside the stopping envelope ``v * t_react + v²/(2 a_brake) + margin`` forces
      braking (acceleration ``<= -v²/(2 (free - margin))``, and never above 0) and a speed target
      no higher than the current speed;
    - the learned risk scorer, when an obstacle is in range and its risk exceeds the threshold,
      forbids acceleration and speeding up;
    - algorithm down: speed target <= ``degraded_speed``, braking while faster;
      compute down: controlled stop; hardware down: emergency stop;
    - an input fault (a NaN, ±Inf or out-of-range value in any input, see the module docstring):
      speed target <= ``degraded_speed``, no acceleration, braking while faster;
    - finally speed, acceleration and steering are clamped to the vehicle limits (a NaN command
      becomes a controlled stop).

    Limits of the input: a sector reports its nearest return only, so an object close by hides a
    farther one in the same sector (the lidar cannot see past it either); the path is the circle
    of the commanded steering, and the vehicle drives forward only (reversing is out of scope).

    Deploy it in fp32 (``fxopt.compile(..., precision="fp32")``): an fp16 engine rounds the
    passed-through command (7.3 m/s becomes 7.30078), which breaks the bit-exact pass-through and
    can even raise the speed target above the input.

    Args:
        config: a `SupervisorConfig`; keyword overrides (``num_sectors=16`` ...) apply on top.

    Example:
        >>> sup = SafetySupervisor(num_sectors=16).eval()
        >>> sectors = torch.full((1, 16), 10.0)          # nothing in range
        >>> command = torch.tensor([[5.0, 1.0, 0.1]])
        >>> out = sup(sectors, command, torch.tensor([[4.0]]), torch.ones(1, 3))
        >>> torch.equal(out["command"], command), float(out["intervention"])
        (True, 0.0)
        >>> sectors[0, 0] = 3.0                            # an obstacle 3 m straight ahead
        >>> out = sup(sectors, command, torch.tensor([[4.0]]), torch.ones(1, 3))
        >>> bool(out["command"][0, 1] <= 0), bool(out["command"][0, 0] <= 4.0)
        (True, True)
    """

    def __init__(self, config: SupervisorConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = SupervisorConfig.from_kwargs(config, **overrides)
        cfg = self.config
        angles = torch.arange(cfg.num_sectors, dtype=torch.float32) * (2.0 * math.pi / cfg.num_sectors)
        self.register_buffer("sector_angles", angles.unsqueeze(0), persistent=False)
        bits = torch.tensor([[float(b)] for b in INTERVENTION_BITS.values()])
        self.register_buffer("intervention_bits", bits, persistent=False)
        self.risk_scorer = RiskScorer(cfg.num_sectors + 6, cfg.hidden)

    # --- inputs ---------------------------------------------------------------------------
    def _check_shapes(self, sectors: Tensor, command: Tensor, speed: Tensor, health: Tensor) -> None:
        s = self.config.num_sectors
        if sectors.dim() != 2 or sectors.shape[1] != s:
            raise InputError(f"sectors must have shape (B, {s}), got {tuple(sectors.shape)}")
        batch = sectors.shape[0]
        if tuple(command.shape) != (batch, 3):
            raise InputError(f"command must have shape ({batch}, 3) [speed, accel, steer], got {tuple(command.shape)}")
        if speed.numel() != batch:
            raise InputError(f"speed must have shape ({batch}, 1) or ({batch},), got {tuple(speed.shape)}")
        if tuple(health.shape) != (batch, 3):
            raise InputError(f"health must have shape ({batch}, 3) [compute, hardware, algorithm], got {tuple(health.shape)}")

    def _input_fault(self, sectors: Tensor, command: Tensor, speed: Tensor, health: Tensor) -> Tensor:
        """``(B, 1)`` bool: the row has a value no healthy producer emits (NaN fails every comparison)."""
        valid = torch.cat([
            (sectors >= 0.0) & (sectors < math.inf),          # a distance: finite, not negative
            command.abs() < math.inf,                         # NaN or ±Inf; finite excess is out_of_limits
            (speed >= 0.0) & (speed <= SPEED_CEILING),        # a forward speed the sensor can measure
            (health >= 0.0) & (health <= 1.0),                # a flag between down (0) and healthy (1)
        ], dim=1)
        return valid.float().amin(dim=1, keepdim=True) < 1

    def _sanitize_command(self, command: Tensor) -> tuple[Tensor, Tensor]:
        # NaN entries become a controlled stop: speed 0, braking, straight steering
        cfg = self.config
        nan = command != command
        invalid = nan.float().amax(dim=1, keepdim=True) > 0
        fallback = torch.tensor([[0.0, -cfg.comfort_decel, 0.0]], device=command.device)
        return torch.where(nan, fallback, command), invalid

    # --- geometry ---------------------------------------------------------------------------
    def _free_distance(self, distance: Tensor, steer: Tensor) -> Tensor:
        """Nearest obstacle distance on the steered path corridor, `FAR` when there is none."""
        cfg = self.config
        curvature = torch.tan(steer) / cfg.wheelbase
        # the steered circle (through the origin, tangent to +x) is at distance d at bearing
        # asin(κ·d/2); beyond its diameter it never gets that far: look sideways (±90°)
        path_bearing = torch.asin((curvature * distance * 0.5).clamp(-1.0, 1.0))
        # angular half width of the corridor at that range, plus half a sector (obstacle anywhere in it)
        half_angle = torch.atan(cfg.half_width / distance.clamp(min=_EPS)) + math.pi / cfg.num_sectors
        on_path = torch.cos(self.sector_angles - path_bearing) >= torch.cos(half_angle.clamp(max=math.pi))
        present = distance < cfg.max_range
        return torch.where(on_path & present, distance, torch.full_like(distance, FAR)).amin(dim=1, keepdim=True)

    # --- learned risk -----------------------------------------------------------------------
    def _learned_risk(self, distance: Tensor, speed: Tensor, command: Tensor, envelope: Tensor, in_range: Tensor) -> Tensor:
        # features are bounded (inputs are clamped first), so any finite weights give a finite logit
        cfg = self.config
        scale = torch.tensor([[cfg.v_max, -cfg.accel_min, cfg.steer_max]], device=command.device)
        envelope = envelope.clamp(max=2.0 * cfg.max_range) / cfg.max_range
        features = torch.cat([distance / cfg.max_range, speed / SPEED_CEILING, command / scale, envelope], dim=1)
        risk = torch.sigmoid(self.risk_scorer(features))
        risk = torch.where(risk != risk, torch.ones_like(risk), risk)  # a NaN risk counts as alarm
        return torch.where(in_range, risk, torch.zeros_like(risk))

    # --- the rules --------------------------------------------------------------------------
    def _perceive(self, sectors: Tensor, command: Tensor, speed: Tensor, health: Tensor) -> _Scene:
        cfg = self.config
        cmd, invalid = self._sanitize_command(command)
        speed = speed.reshape(-1, 1)
        fault = self._input_fault(sectors, command, speed, health)
        # NaN distances count as an obstacle at the vehicle, a faulty speed as the worst case
        distance = torch.where(sectors != sectors, torch.zeros_like(sectors), sectors).clamp(0.0, cfg.max_range)
        speed_ok = (speed >= 0.0) & (speed <= SPEED_CEILING)
        v = torch.where(speed_ok, speed, torch.full_like(speed, SPEED_CEILING))
        limited = torch.cat([
            cmd[:, 0:1].clamp(0.0, cfg.v_max),
            cmd[:, 1:2].clamp(cfg.accel_min, cfg.accel_max),
            cmd[:, 2:3].clamp(-cfg.steer_max, cfg.steer_max),
        ], dim=1)
        free = self._free_distance(distance, limited[:, 2:3])
        d_stop = stopping_distance(v, cfg.reaction_time, cfg.brake_decel, cfg.margin)
        on_path = free < cfg.max_range
        return _Scene(
            distance=distance, v=v, command=cmd, limited=limited, invalid=invalid, fault=fault, free=free, d_stop=d_stop,
            on_path=on_path, inside=on_path & (free < d_stop),
            in_range=distance.amin(dim=1, keepdim=True) < cfg.max_range,
            down=~(health >= 0.5),  # NaN counts as down
        )

    def _rule_table(self, scene: _Scene, alarm: Tensor) -> tuple[tuple[str, Tensor, Tensor, Tensor], ...]:
        """``(rule, active, speed-target cap, acceleration cap)`` in `INTERVENTION_BITS` order.

        An active rule takes the minimum with its caps, so it can only lower the command.
        """
        cfg, v, free = self.config, scene.v, scene.free
        zero, comfort = torch.zeros_like(v), torch.full_like(v, -cfg.comfort_decel)
        no_cap = torch.full_like(v, FAR)
        v_safe = stoppable_speed(free, cfg.reaction_time, cfg.brake_decel, cfg.margin)
        brake = (v * v / (2.0 * (free - cfg.margin).clamp(min=_EPS))).clamp(0.0, -cfg.accel_min)
        down = scene.down
        return (
            ("out_of_limits", scene.invalid, zero, comfort),                      # NaN command -> controlled stop
            ("obstacle_limit", scene.on_path, v_safe, no_cap),                   # target stoppable before it
            ("obstacle_brake", scene.inside, torch.minimum(v_safe, v), torch.minimum(-brake, zero)),
            ("learned_caution", alarm, v, zero),                                  # hold, never speed up
            ("algorithm_down", down[:, 2:3], torch.full_like(v, cfg.degraded_speed),
             torch.where(v > cfg.degraded_speed, comfort, no_cap)),              # slow down to the limit
            ("compute_down", down[:, 0:1], zero, comfort),                        # controlled stop
            ("hardware_down", down[:, 1:2], zero, torch.full_like(v, -cfg.emergency_decel)),  # emergency stop
            ("input_fault", scene.fault, torch.full_like(v, cfg.degraded_speed),
             torch.where(v > cfg.degraded_speed, comfort, zero)),                 # degraded, never speed up
        )

    def forward(self, sectors: Tensor, command: Tensor, speed: Tensor, health: Tensor) -> dict[str, Tensor]:
        """Supervise one batch of commands.

        Args:
            sectors: ``(B, S)`` nearest obstacle distance per sector (m).
            command: ``(B, 3)`` ``[speed target, acceleration, steering]``.
            speed: ``(B, 1)`` or ``(B,)`` measured forward speed (m/s).
            health: ``(B, 3)`` ``[compute, hardware, algorithm]`` flags, 1 healthy, 0 down.

        Returns:
            ``{"command", "risk", "learned_risk", "intervention"}`` as described in the module
            docstring.
        """
        self._check_shapes(sectors, command, speed, health)
        cfg = self.config
        scene = self._perceive(sectors, command, speed, health)
        envelope = torch.cat([scene.free, scene.d_stop], dim=1)
        learned = self._learned_risk(scene.distance, scene.v, scene.limited, envelope, scene.in_range)
        alarm = scene.in_range & (learned > cfg.risk_threshold)
        target, accel = scene.command[:, 0:1], scene.command[:, 1:2]
        table = self._rule_table(scene, alarm)
        for _, active, speed_cap, accel_cap in table:
            target = torch.where(active, torch.minimum(target, speed_cap), target)
            accel = torch.where(active, torch.minimum(accel, accel_cap), accel)
        supervised = torch.cat([
            target.clamp(0.0, cfg.v_max), accel.clamp(cfg.accel_min, cfg.accel_max), scene.limited[:, 2:3],
        ], dim=1)
        outside = (scene.command != scene.limited).float().amax(dim=1, keepdim=True) > 0
        active = [a | outside if name == "out_of_limits" else a for name, a, _, _ in table]
        intervention = torch.cat([a.float() for a in active], dim=1) @ self.intervention_bits
        rule_risk = torch.where(scene.on_path, (scene.d_stop / scene.free.clamp(min=_EPS)).clamp(0.0, 1.0), torch.zeros_like(learned))
        health_risk = torch.cat([scene.down, scene.fault], dim=1).float().amax(dim=1, keepdim=True)
        risk = torch.maximum(torch.maximum(rule_risk, learned), health_risk)
        return {"command": supervised, "risk": risk, "learned_risk": learned, "intervention": intervention}


def decode_intervention(code: float) -> list[str]:
    """The rule names set in one ``intervention`` value.

    Example:
        >>> decode_intervention(4.0 + 2.0)
        ['obstacle_limit', 'obstacle_brake']
    """
    bits = int(code)
    return [name for name, bit in INTERVENTION_BITS.items() if bits & bit]


def sector_distances(
    points: Tensor,
    num_sectors: int = 32,
    max_range: float = 10.0,
    *,
    z_range: tuple[float, float] | None = None,
) -> Tensor:
    """Nearest point distance per angular sector: the supervisor's ``sectors`` input from lidar points.

    Runs outside the network (a scatter-min, which ONNX opset 17 cannot express); vectorised,
    no Python loop over points. Sector ``i`` is centred on bearing ``i * 2π/num_sectors``
    counter-clockwise from +x, as `SafetySupervisor` expects.

    Args:
        points: ``(N, C)`` or ``(B, N, C)`` points in the vehicle frame (x forward, y left),
            ``C >= 2``; NaN rows are padding and ignored.
        num_sectors: sectors over 360°.
        max_range: the distance written for an empty sector; farther points count as empty.
        z_range: keep only points with ``low <= z <= high`` (needs ``C >= 3``), e.g. to drop
            ground returns.

    Returns:
        ``(num_sectors,)`` or ``(B, num_sectors)`` float32 distances in ``[0, max_range]``.

    Example:
        >>> pts = torch.tensor([[3.0, 0.0], [0.0, 2.0], [5.0, 0.1]])
        >>> sector_distances(pts, num_sectors=4, max_range=10.0).tolist()
        [3.0, 2.0, 10.0, 10.0]
    """
    if points.dim() not in (2, 3) or points.shape[-1] < 2:
        raise InputError(f"points must have shape (N, C) or (B, N, C) with C >= 2, got {tuple(points.shape)}")
    if num_sectors < 1 or not max_range > 0:
        raise InputError(f"need num_sectors >= 1 and max_range > 0, got {num_sectors} and {max_range}")
    if z_range is not None and points.shape[-1] < 3:
        raise InputError(f"z_range needs points with a z column (C >= 3), got C = {points.shape[-1]}")
    batched = points.reshape(-1, points.shape[-2], points.shape[-1]).float()
    x, y = batched[..., 0], batched[..., 1]
    distance = torch.hypot(x, y)
    valid = distance == distance
    if z_range is not None:
        valid &= (batched[..., 2] >= z_range[0]) & (batched[..., 2] <= z_range[1])
    width = 2.0 * math.pi / num_sectors
    index = torch.floor(torch.atan2(y, x) / width + 0.5)
    index = torch.where(valid, index, torch.zeros_like(index)).long() % num_sectors
    distance = torch.where(valid, distance, torch.full_like(distance, max_range)).clamp(max=max_range)
    offsets = torch.arange(batched.shape[0]).unsqueeze(1) * num_sectors
    result = torch.full((batched.shape[0] * num_sectors,), float(max_range))
    result = result.scatter_reduce(0, (index + offsets).reshape(-1), distance.reshape(-1), "amin")
    return result.reshape(*points.shape[:-2], num_sectors)


class SectorDistances(nn.Module):
    """`sector_distances` as a traceable module (dense masked minimum; ONNX opset 17 friendly).

    Each point goes to the sector whose centre direction is nearest (arg-max of the dot
    product), then each sector takes the minimum distance of its points. It costs
    ``B * N * num_sectors`` work instead of a scatter, which opset 17 cannot express with "min",
    so the whole path from points to supervised command can run in one engine.

    Args:
        num_sectors: sectors over 360°.
        max_range: distance of an empty sector.
        z_range: keep only points with ``low <= z <= high`` (points need a z column).

    Example:
        >>> module = SectorDistances(num_sectors=4, max_range=10.0)
        >>> module(torch.tensor([[[3.0, 0.0], [0.0, 2.0], [5.0, 0.0]]])).tolist()
        [[3.0, 2.0, 10.0, 10.0]]
    """

    def __init__(self, num_sectors: int = 32, max_range: float = 10.0, z_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        if num_sectors < 1 or not max_range > 0:
            raise InputError(f"need num_sectors >= 1 and max_range > 0, got {num_sectors} and {max_range}")
        self.num_sectors, self.max_range, self.z_range = num_sectors, float(max_range), z_range
        angles = torch.arange(num_sectors, dtype=torch.float32) * (2.0 * math.pi / num_sectors)
        self.register_buffer("directions", torch.stack([torch.cos(angles), torch.sin(angles)]), persistent=False)
        self.register_buffer("sector_ids", torch.arange(num_sectors), persistent=False)

    def forward(self, points: Tensor) -> Tensor:
        """``(B, N, C)`` points (NaN rows are padding) -> ``(B, num_sectors)`` distances."""
        if points.dim() != 3 or points.shape[-1] < (3 if self.z_range is not None else 2):
            raise InputError(f"points must have shape (B, N, C) with C >= 2 (3 with z_range), got {tuple(points.shape)}")
        xy = points[..., :2]
        distance = torch.sqrt((xy * xy).sum(dim=-1))
        valid = distance == distance
        if self.z_range is not None:
            z = points[..., 2]
            valid = valid & (z >= self.z_range[0]) & (z <= self.z_range[1])
        xy = torch.where(valid.unsqueeze(-1), xy, torch.zeros_like(xy))
        sector = (xy @ self.directions).argmax(dim=-1)  # (B, N): the nearest sector centre
        member = (sector.unsqueeze(-1) == self.sector_ids) & valid.unsqueeze(-1)  # (B, N, S)
        far = torch.full_like(distance, self.max_range).unsqueeze(-1)
        per_sector = torch.where(member, distance.unsqueeze(-1), far).amin(dim=1)
        return per_sector.clamp(max=self.max_range)


# --- registry: build, example inputs and a training recipe for the risk scorer ------------------

def _build(**cfg: Any) -> SafetySupervisor:
    return SafetySupervisor(**cfg)


def _example_inputs(**cfg: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from fxopt.safety.scenarios import example_batch

    return example_batch(SupervisorConfig.from_kwargs(**cfg))


def _recipe_batch(step: int, generator: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    from fxopt.safety.scenarios import collision_labels, mixed_scenes

    inputs = mixed_scenes(256, generator)
    return inputs, collision_labels(inputs)


def _recipe_loss(outputs: dict[str, Tensor], labels: Tensor) -> Tensor:
    return nn.functional.binary_cross_entropy(outputs["learned_risk"].clamp(1e-6, 1 - 1e-6), labels)


VALIDATION_SEED = 40_213  # the balanced validation scenes a fine-tune selects by, apart from the held-out ones


def _recipe_evaluate(model: nn.Module, seed: int | None = None) -> dict[str, float]:
    from fxopt.safety.scenarios import balanced_holdout

    # a traced or compiled graph has no `config`: the recipe's own batches use the default one
    config = getattr(model, "config", None)
    inputs, labels = balanced_holdout(config) if seed is None else balanced_holdout(config, seed=seed)
    risk = model(*inputs)["learned_risk"]
    return risk_metrics(risk, labels)


def _properties(run: Any, model: nn.Module | None) -> dict[str, dict[str, Any]]:
    from fxopt.safety.properties import supervisor_properties

    return supervisor_properties(run, model.config if isinstance(model, SafetySupervisor) else None)


def _equivalence(model: nn.Module, onnx_model: Any) -> dict[str, Any]:
    from fxopt.safety.policy import equivalence_evidence

    return equivalence_evidence(model, onnx_model)


def risk_metrics(risk: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy (risk > 0.5 vs label) and ROC AUC (Mann-Whitney, ties count half) of risk scores.

    Example:
        >>> risk_metrics(torch.tensor([0.9, 0.2, 0.6, 0.4]), torch.tensor([1.0, 0.0, 1.0, 1.0]))
        {'accuracy': 0.75, 'auc': 1.0}
    """
    risk, labels = risk.reshape(-1), labels.reshape(-1) > 0.5
    positives, negatives = risk[labels], risk[~labels]
    if positives.numel() == 0 or negatives.numel() == 0:
        raise InputError("risk_metrics needs both positive and negative labels")
    greater = (positives[:, None] > negatives[None, :]).float().mean()
    ties = (positives[:, None] == negatives[None, :]).float().mean()
    accuracy = ((risk > 0.5) == labels).float().mean()
    return {"accuracy": float(accuracy), "auc": float(greater + 0.5 * ties)}


SPEC = register_model(ModelSpec(
    name="safety_supervisor",
    build=_build,
    inputs=_example_inputs,
    summary="safety cerebellum: stopping-envelope and health rules + tiny learned risk scorer (pass-through or more conservative)",
    precision="fp32",  # fp16 would round the command it must pass through bit for bit
    safety="strict",   # it stands between the planner and the actuators
    model_type=SafetySupervisor,
    properties=_properties,
    equivalence=_equivalence,
    recipe=TrainingRecipe(
        batch=_recipe_batch,
        loss=_recipe_loss,
        evaluate=_recipe_evaluate,
        validate=functools.partial(_recipe_evaluate, seed=VALIDATION_SEED),
        chance={"accuracy": 0.5, "auc": 0.5},  # the held-out set is balanced
        steps=300,
        lr=3e-3,
    ),
))
