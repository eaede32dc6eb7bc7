"""The safety supervisor's own property suite: seeded scenes, checked on any implementation of it.

`supervisor_properties` is the supervisor's ``ModelSpec.properties``: a strict compile
(`fxopt.safety.policy.run_property_suite`) runs it on the compiled graph and on the ONNX file.
It needs no hypothesis and takes well under a second: fixed seeded batches from
`fxopt.safety.scenarios`, the same on every run, so the manifest's counts are reproducible.
The hypothesis versions of these properties, over far more inputs, are in ``tests/safety``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fxopt.safety import scenarios
from fxopt.safety.supervisor import (
    INTERVENTION_BITS,
    SPEED_CEILING,
    SupervisorConfig,
    stopping_distance,
)

__all__ = ["PROPERTY_NAMES", "Runner", "supervisor_properties"]

# ``runner(sectors, command, speed, health) -> {output name: array}`` on float32 numpy inputs
Runner = Callable[..., Mapping[str, np.ndarray]]
Inputs = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
# a check returns, per row, whether the property holds
Check = Callable[[Mapping[str, np.ndarray], Inputs, SupervisorConfig], np.ndarray]


def _bits(out: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    return (out["intervention"][:, 0].astype(np.int64) & INTERVENTION_BITS[name]) > 0


def _passes_through(out, inputs, cfg) -> np.ndarray:
    # clear and healthy: the command bit for bit, no rule active
    same = out["command"].view(np.int32) == inputs[1].view(np.int32)
    return same.all(axis=1) & (out["intervention"][:, 0] == 0)


def _brakes_for_obstacle(out, inputs, cfg) -> np.ndarray:
    # an obstacle inside the stopping envelope, straight ahead: brake, never above the current speed
    cmd, speed = out["command"], inputs[2][:, 0]
    return (cmd[:, 1] <= 0) & (cmd[:, 0] <= speed) & _bits(out, "obstacle_brake")


def _flag_caps(out, inputs, cfg) -> np.ndarray:
    cmd, down = out["command"], ~(inputs[3] >= 0.5)
    ok = np.ones(len(cmd), dtype=bool)
    ok &= ~(down[:, 0] | down[:, 1]) | (cmd[:, 0] == 0)          # compute / hardware: stop
    ok &= ~down[:, 0] | (cmd[:, 1] <= -cfg.comfort_decel)
    ok &= ~down[:, 1] | (cmd[:, 1] <= -cfg.emergency_decel)
    ok &= ~down[:, 2] | (cmd[:, 0] <= cfg.degraded_speed)        # algorithm: speed limit
    return ok


def _fault_response(out, inputs, cfg) -> np.ndarray:
    # every row holds a fault: its bit, degraded speed, no acceleration, braking while faster
    cmd, speed = out["command"], inputs[2][:, 0]
    target = np.clip(np.nan_to_num(inputs[1][:, 0], nan=0.0, posinf=cfg.v_max, neginf=0.0), 0.0, cfg.v_max)
    worst = np.where((speed >= 0) & (speed <= SPEED_CEILING), speed, SPEED_CEILING)
    braking = (worst <= cfg.degraded_speed) | (cmd[:, 1] <= -cfg.comfort_decel)
    return _bits(out, "input_fault") & (cmd[:, 1] <= 0) & (cmd[:, 0] <= np.minimum(target, cfg.degraded_speed)) & braking


def _bounded_and_never_more_aggressive(out, inputs, cfg) -> np.ndarray:
    cmd, given = out["command"], inputs[1]
    low = np.array([0.0, cfg.accel_min, -cfg.steer_max], dtype=np.float32)
    high = np.array([cfg.v_max, cfg.accel_max, cfg.steer_max], dtype=np.float32)
    limited = np.clip(given, low, high)
    finite = np.all([np.isfinite(v).all(axis=1) for v in out.values()], axis=0)
    within = ((cmd >= low) & (cmd <= high)).all(axis=1) & (out["risk"][:, 0] >= 0) & (out["risk"][:, 0] <= 1)
    return finite & within & (cmd[:, 0] <= limited[:, 0]) & (cmd[:, 1] <= limited[:, 1])


def _numpy(inputs: tuple[torch.Tensor, ...]) -> Inputs:
    sectors, command, speed, health = (np.ascontiguousarray(t.numpy(), dtype=np.float32) for t in inputs)
    return sectors, command, speed.reshape(-1, 1), health


def _obstacle_ahead(rows: int, generator: torch.Generator, cfg: SupervisorConfig) -> Inputs:
    sectors, command, speed, health = scenarios.clear_scenes(rows, generator, cfg)
    command[:, 2] = 0.0  # straight ahead, so sector 0 is on the path whatever the geometry
    d_stop = stopping_distance(speed, cfg.reaction_time, cfg.brake_decel, cfg.margin).clamp(max=cfg.max_range)
    sectors[:, 0] = (torch.rand(rows, generator=generator) * 0.99 * d_stop[:, 0])
    return _numpy((sectors, command, speed, health))


def _cases(cfg: SupervisorConfig, seed: int, rows: int) -> dict[str, tuple[Check, Inputs]]:
    generator = torch.Generator().manual_seed(seed)
    flags = [scenarios.flags_down(rows // 3 + 1, generator, cfg, flag=f) for f in scenarios.HEALTH_FLAGS]
    wild = [torch.cat(parts) for parts in zip(scenarios.mixed_scenes(rows, generator, cfg), *flags)]
    wild[1] = wild[1] * 2.0  # commands up to twice the limits
    return {
        "clear_and_healthy_passes_through": (_passes_through, _numpy(scenarios.clear_scenes(rows, generator, cfg))),
        "obstacle_in_envelope_brakes": (_brakes_for_obstacle, _obstacle_ahead(rows, generator, cfg)),
        "flag_down_caps_the_command": (_flag_caps, _numpy(tuple(torch.cat(p) for p in zip(*flags)))),
        "input_fault_fails_safe": (_fault_response, _numpy(scenarios.fault_scenes(cfg))),
        "bounded_and_never_more_aggressive": (_bounded_and_never_more_aggressive, _numpy(tuple(wild))),
    }


PROPERTY_NAMES = (
    "clear_and_healthy_passes_through", "obstacle_in_envelope_brakes", "flag_down_caps_the_command",
    "input_fault_fails_safe", "bounded_and_never_more_aggressive",
)


def supervisor_properties(
    run: Runner, config: SupervisorConfig | None = None, *, seed: int = 15, rows: int = 64
) -> dict[str, dict[str, Any]]:
    """Check the supervisor's properties on one implementation of it.

    Args:
        run: ``run(sectors, command, speed, health) -> {output: array}`` on float32 arrays
            (the compiled graph, the ONNX file in ONNX Runtime, the eager model).
        config: the supervisor's config (its limits are part of the properties).
        seed: the seed of the scenes.
        rows: rows per seeded scene kind (the input-fault table has its own: every position
            times every bad value).

    Returns:
        ``{property: {"cases": rows checked, "failures": rows failing, "example": the first
        failing row's inputs and outputs, or None}}`` for each of `PROPERTY_NAMES`.

    Example:
        >>> from fxopt.safety.supervisor import SafetySupervisor
        >>> model = SafetySupervisor().eval()
        >>> def run(*inputs):
        ...     with torch.no_grad():
        ...         return {k: v.numpy() for k, v in model(*map(torch.from_numpy, inputs)).items()}
        >>> result = supervisor_properties(run)
        >>> sorted(result) == sorted(PROPERTY_NAMES), sum(r["failures"] for r in result.values())
        (True, 0)
    """
    cfg = config or SupervisorConfig()
    result: dict[str, dict[str, Any]] = {}
    for name, (check, inputs) in _cases(cfg, seed, rows).items():
        out = {k: np.asarray(v) for k, v in run(*inputs).items()}
        holds = check(out, inputs, cfg)
        failing = np.nonzero(~holds)[0]
        example = None
        if len(failing):
            row = int(failing[0])
            example = (f"row {row}: inputs {[a[row].tolist() for a in inputs]} -> "
                       f"{ {k: v[row].tolist() for k, v in out.items()} }")
        result[name] = {"cases": int(len(holds)), "failures": int(len(failing)), "example": example}
    return result
