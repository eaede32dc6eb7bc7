"""Equivalence of the torch supervisor and its ONNX lowering over a box of inputs, and its manifest.

`check_equivalence` runs both on stratified samples of the input box (every scalar range cut
into intervals, one draw per interval, shuffled per dimension: Latin hypercube), on the box's
corners for speed, steering and health flags, and on inputs placed right at the rules' decision
boundaries (obstacle at the stopping distance, speed at the degraded limit), where a one-ulp
difference between the two runtimes could flip a rule. It reports the largest output deviation
and every row whose active rules differ. `safety_manifest` records what was verified.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor

from fxopt.compiler import state_dict_sha256
from fxopt.errors import InputError
from fxopt.output.files import write_atomic
from fxopt.output.onnx_weights import serialize
from fxopt.safety.supervisor import (
    INTERVENTION_BITS,
    SafetySupervisor,
    SupervisorConfig,
    stopping_distance,
)

__all__ = [
    "EquivalenceReport", "InputBox", "check_equivalence", "input_samples", "run_onnx_batched", "safety_manifest",
    "write_manifest",
]

OUTPUTS = ("command", "risk", "learned_risk", "intervention")


@dataclass(frozen=True)
class InputBox:
    """The ranges the equivalence check samples (``None``: the supervisor's own limits).

    Attributes:
        distance: sector distances (m); ``empty_fraction`` of sectors are left empty.
        speed: measured speeds (m/s).
        command_margin: how far beyond the command limits to sample, as a fraction of each range.
        empty_fraction: share of sectors with no obstacle.
    """

    distance: tuple[float, float] | None = None
    speed: tuple[float, float] | None = None
    command_margin: float = 0.1
    empty_fraction: float = 0.7


@dataclass(frozen=True)
class EquivalenceReport:
    """How closely ONNX Runtime reproduces the torch supervisor.

    Attributes:
        samples: rows compared, by kind (``stratified``, ``corners``, ``boundary``).
        max_abs_error: largest absolute deviation per output.
        rule_mismatches: rows whose ``intervention`` codes differ, with both codes decoded.
        atol: allowed command deviation.
        passed: no rule mismatch and every deviation within ``atol``.
    """

    samples: dict[str, int]
    max_abs_error: dict[str, float]
    rule_mismatches: list[dict[str, Any]] = field(default_factory=list)
    atol: float = 1e-5
    passed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        errors = ", ".join(f"{k} {v:.3g}" for k, v in self.max_abs_error.items())
        verdict = "equivalent" if self.passed else "NOT equivalent"
        return (
            f"safety supervisor torch vs ONNX Runtime: {verdict} on {sum(self.samples.values())} rows "
            f"({', '.join(f'{k} {v}' for k, v in self.samples.items())}); max|err| {errors}; "
            f"{len(self.rule_mismatches)} rule mismatches"
        )


def _limits(config: SupervisorConfig, box: InputBox) -> dict[str, tuple[float, float]]:
    pad = box.command_margin
    def widen(low: float, high: float) -> tuple[float, float]:
        return low - pad * (high - low), high + pad * (high - low)
    return {
        "distance": box.distance or (0.0, config.max_range),
        "speed": box.speed or (0.0, config.v_max * (1 + pad)),
        "target": widen(0.0, config.v_max),
        "accel": widen(config.accel_min, config.accel_max),
        "steer": widen(-config.steer_max, config.steer_max),
    }


def _latin_hypercube(rows: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    # one draw in each of `rows` equal intervals per dimension, intervals shuffled independently
    strata = np.stack([rng.permutation(rows) for _ in range(dims)], axis=1)
    return (strata + rng.random((rows, dims))) / rows


def _scale(unit: np.ndarray, low_high: tuple[float, float]) -> np.ndarray:
    return low_high[0] + unit * (low_high[1] - low_high[0])


def _stratified(rows: int, config: SupervisorConfig, box: InputBox, rng: np.random.Generator) -> list[np.ndarray]:
    s, lim = config.num_sectors, _limits(config, box)
    unit = _latin_hypercube(rows, s + 5 + 3, rng)
    sectors = _scale(unit[:, :s], lim["distance"])
    sectors[rng.random((rows, s)) < box.empty_fraction] = config.max_range
    command = np.stack([_scale(unit[:, s + i], lim[k]) for i, k in enumerate(("target", "accel", "steer"))], axis=1)
    speed = _scale(unit[:, s + 3:s + 4], lim["speed"])
    health = (unit[:, s + 5:] > 0.15).astype(np.float64)  # each flag down in ~15 % of rows
    return [sectors, command, speed, health]


def _corners(config: SupervisorConfig, rng: np.random.Generator) -> list[np.ndarray]:
    # every combination of speed {0, v_max}, steering {-max, 0, max} and the 8 flag patterns
    rows = list(itertools.product((0.0, config.v_max), (-config.steer_max, 0.0, config.steer_max), itertools.product((0.0, 1.0), repeat=3)))
    n = len(rows)
    sectors = np.full((n, config.num_sectors), config.max_range)
    sectors[np.arange(n), rng.integers(0, config.num_sectors, n)] = rng.uniform(0.0, config.max_range, n)
    command = np.array([[config.v_max, config.accel_max, steer] for _, steer, _ in rows])
    speed = np.array([[v] for v, _, _ in rows])
    health = np.array([flags for _, _, flags in rows], dtype=np.float64)
    return [sectors, command, speed, health]


def _boundary(rows: int, config: SupervisorConfig, rng: np.random.Generator) -> list[np.ndarray]:
    # an obstacle straight ahead at the stopping distance, nudged by a few float32 ulps either way
    speed = rng.uniform(0.0, config.v_max, (rows, 1)).astype(np.float32)
    d_stop = stopping_distance(torch.from_numpy(speed), config.reaction_time, config.brake_decel, config.margin).numpy()
    nudge = rng.integers(-3, 4, (rows, 1))
    distance = d_stop.copy()
    for _ in range(3):
        distance = np.where(nudge > 0, np.nextafter(distance, np.float32(np.inf)), distance)
        distance = np.where(nudge < 0, np.nextafter(distance, np.float32(-np.inf)), distance)
        nudge = nudge - np.sign(nudge)
    sectors = np.full((rows, config.num_sectors), config.max_range, dtype=np.float32)
    sectors[:, 0] = np.minimum(distance[:, 0], config.max_range)
    command = np.stack([np.full(rows, config.v_max), np.full(rows, config.accel_max), np.zeros(rows)], axis=1)
    speed[: rows // 4] = config.degraded_speed  # at the algorithm-down speed limit
    health = np.ones((rows, 3))
    health[: rows // 4, 2] = 0.0
    return [sectors, command, speed, health]


def input_samples(
    config: SupervisorConfig, box: InputBox | None = None, *, stratified: int = 512, boundary: int = 128, seed: int = 0
) -> dict[str, tuple[Tensor, ...]]:
    """The inputs `check_equivalence` compares on, by kind, as float32 tensors.

    Example:
        >>> samples = input_samples(SupervisorConfig(num_sectors=8), stratified=16, boundary=8)
        >>> {k: tuple(v[0].shape) for k, v in samples.items()}
        {'stratified': (16, 8), 'corners': (48, 8), 'boundary': (8, 8)}
    """
    rng = np.random.default_rng(seed)
    box = box or InputBox()
    kinds = {
        "stratified": _stratified(stratified, config, box, rng),
        "corners": _corners(config, rng),
        "boundary": _boundary(boundary, config, rng),
    }
    return {k: tuple(torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in arrays) for k, arrays in kinds.items()}


def run_onnx_batched(session: Any, inputs: Sequence[Tensor | np.ndarray], batch: int | None = None) -> dict[str, np.ndarray]:
    """Run an ONNX Runtime `session` with a static batch size over any number of input rows.

    fxopt exports static shapes, so rows go `batch` at a time (default: the session's first
    input's batch dimension), the last chunk padded with copies of its last row.

    Returns:
        ``{output name: array}`` with one row per input row.
    """
    arrays = [x.numpy() if isinstance(x, Tensor) else np.asarray(x) for x in inputs]
    if batch is None:
        batch = session.get_inputs()[0].shape[0]
        if not isinstance(batch, int):
            raise InputError("the ONNX model must have a static batch dimension (fxopt exports static shapes)")
    rows = arrays[0].shape[0]
    names = [i.name for i in session.get_inputs()]
    chunks: list[list[np.ndarray]] = []
    for start in range(0, rows, batch):
        part = [x[start:start + batch] for x in arrays]
        short = batch - part[0].shape[0]
        part = [np.concatenate([p, np.repeat(p[-1:], short, axis=0)]) if short else p for p in part]
        chunks.append([o[: batch - short] for o in session.run(None, dict(zip(names, part)))])
    outputs = [o.name for o in session.get_outputs()]
    return {name: np.concatenate([c[i] for c in chunks]) for i, name in enumerate(outputs)}


def check_equivalence(
    model: SafetySupervisor,
    onnx_model: onnx.ModelProto,
    box: InputBox | None = None,
    *,
    stratified: int = 512,
    boundary: int = 128,
    seed: int = 0,
    atol: float = 1e-5,
) -> EquivalenceReport:
    """Compare `model` (torch, eval mode) with `onnx_model` in ONNX Runtime over `box`.

    Args:
        model: the supervisor the ONNX file was exported from (or its compiled graph's source).
        onnx_model: the lowering, e.g. ``fxopt.compile(model, ...).onnx_model``.
        box: input ranges; the supervisor's limits (commands 10 % beyond) by default.
        stratified: Latin-hypercube rows.
        boundary: rows at the stopping-envelope and degraded-speed boundaries.
        seed: sampling seed.
        atol: allowed deviation of ``command``, ``risk`` and ``learned_risk`` (plus 1e-4 relative).

    Returns:
        An `EquivalenceReport`.
    """
    import onnxruntime as ort

    if not isinstance(model, SafetySupervisor):
        raise InputError(f"check_equivalence needs a SafetySupervisor, got {type(model).__name__}")
    session = ort.InferenceSession(serialize(onnx_model), providers=["CPUExecutionProvider"])
    batch = session.get_inputs()[0].shape[0]
    if not isinstance(batch, int):
        raise InputError("the ONNX model must have a static batch dimension (fxopt exports static shapes)")
    samples = input_samples(model.config, box, stratified=stratified, boundary=boundary, seed=seed)
    max_abs = dict.fromkeys(OUTPUTS, 0.0)
    mismatches: list[dict[str, Any]] = []
    passed = True
    model = model.eval()
    for kind, inputs in samples.items():
        with torch.no_grad():
            reference = {k: v.numpy() for k, v in model(*inputs).items()}
        lowered = run_onnx_batched(session, inputs, batch)
        for name in OUTPUTS:
            error = np.abs(lowered[name].astype(np.float64) - reference[name])
            max_abs[name] = max(max_abs[name], float(error.max()))
            if name != "intervention" and not np.all(error <= atol + 1e-4 * np.abs(reference[name])):
                passed = False
        for row in np.nonzero(lowered["intervention"][:, 0] != reference["intervention"][:, 0])[0]:
            mismatches.append({
                "kind": kind,
                "row": int(row),
                "torch": _rules(reference["intervention"][row, 0]),
                "onnx": _rules(lowered["intervention"][row, 0]),
            })
    return EquivalenceReport(
        samples={k: int(v[0].shape[0]) for k, v in samples.items()},
        max_abs_error=max_abs,
        rule_mismatches=mismatches,
        atol=atol,
        passed=passed and not mismatches,
    )


def _rules(code: float) -> list[str]:
    return [name for name, bit in INTERVENTION_BITS.items() if int(code) & bit]


def safety_manifest(model: SafetySupervisor, onnx_model: onnx.ModelProto, report: EquivalenceReport) -> dict[str, Any]:
    """What was verified, for the deployment record: config, hashes, rule bits, the report.

    The ONNX hash is over its serialised bytes, the weights hash is fxopt's state_dict SHA-256,
    so the manifest ties the verified file to the exact supervisor it came from.
    """
    data = serialize(onnx_model)
    return {
        "model": "safety_supervisor",
        "config": asdict(model.config),
        "intervention_bits": dict(INTERVENTION_BITS),
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "state_dict_sha256": state_dict_sha256(model),
        "equivalence": report.to_dict(),
        "torch": torch.__version__,
        "onnx_opset": max((o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")), default=0),
    }


def write_manifest(path: str | os.PathLike[str], manifest: dict[str, Any]) -> str:
    """Write `manifest` as JSON through a temporary file and a rename; returns the path."""
    path = os.fspath(path)
    write_atomic(path, json.dumps(manifest, indent=2, default=str) + "\n")
    return path
