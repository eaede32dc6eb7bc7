"""Safety supervisor properties under hypothesis: eager, compiled graph module, and ONNX Runtime.

The properties (B rows per draw, any risk-scorer weights):

- clear scene + healthy flags + a measurable speed: the command passes through bit for bit;
- obstacle inside the stopping envelope on the steered path: acceleration <= 0, target <= speed;
- outputs are always finite and within the vehicle limits, even for extreme inputs;
- the output is never more aggressive than the (limit-clamped) input, and never less
  conservative than the explicit rules alone; a flag down adds its own cap.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fxopt
from fxopt.safety.scenarios import example_batch
from fxopt.safety.supervisor import SPEED_CEILING, SafetySupervisor, SupervisorConfig

CFG = SupervisorConfig()
B = 8  # rows per draw; the ONNX file has the example batch's static shape
S, R = CFG.num_sectors, CFG.max_range
F32 = {"width": 32, "allow_nan": False}


def column(low: float, high: float) -> st.SearchStrategy[np.ndarray]:
    # the model clamps float32 tensors, so its limits are the float32 roundings of the config's
    return hnp.arrays(np.float32, (B, 1), elements=st.floats(float(np.float32(low)), float(np.float32(high)), **F32))


commands = st.builds(
    lambda *cols: np.concatenate(cols, axis=1),
    column(0.0, CFG.v_max), column(CFG.accel_min, CFG.accel_max), column(-CFG.steer_max, CFG.steer_max),
)
extreme_floats = st.floats(**F32) | st.sampled_from([np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30])
extreme = {
    "sectors": hnp.arrays(np.float32, (B, S), elements=extreme_floats),
    "command": hnp.arrays(np.float32, (B, 3), elements=extreme_floats),
    "speed": hnp.arrays(np.float32, (B, 1), elements=extreme_floats),
    "health": hnp.arrays(np.float32, (B, 3), elements=extreme_floats),
}
# any speed the sensor can measure; the rest are input faults (tests/safety/test_input_faults.py)
measured_speeds = column(0.0, SPEED_CEILING)
scorer_weights = st.tuples(st.integers(0, 2**31 - 1), st.floats(0.01, 100.0))


def randomize_scorer(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Give every Linear of `model` (eager or compiled graph) random weights of std `scale`."""
    generator = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 2, "the risk scorer's two Linear layers should survive compilation"
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * scale)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * scale)
    return model


def quiet_scorer(model: torch.nn.Module) -> torch.nn.Module:
    """A scorer that never alarms: the explicit rules alone."""
    with torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.zero_()
        last.bias.fill_(-1e4)
    return model


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def call(model, sectors, command, speed, health) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(t(sectors), t(command), t(speed), t(health))
    return {k: v.numpy() for k, v in out.items()}


def obstacle_on_path(
    distance_fraction: np.ndarray, command: np.ndarray, speed: np.ndarray, others: np.ndarray | None = None
) -> np.ndarray:
    """Sector distances with one obstacle per row on the steered path, inside the stopping envelope.

    `others` fills the remaining sectors (default: empty). The obstacle's own sector is left to
    it: a nearer object there would hide it (a sector reports its nearest return only).
    """
    v = speed.astype(np.float64)
    d_stop = v * CFG.reaction_time + v * v / (2 * CFG.brake_decel) + CFG.margin
    d = distance_fraction * np.minimum(d_stop, R)
    # the point of the steered circle at distance d, by geometry: the circle is centred at
    # (0, 1/κ); the point after turning by α is (sin α, 1 - cos α) / κ, at distance 2 sin(α/2)/|κ|
    curvature = np.tan(np.clip(command[:, 2:3].astype(np.float64), -CFG.steer_max, CFG.steer_max)) / CFG.wheelbase
    turn = 2 * np.arcsin(np.clip(np.abs(curvature) * d / 2, 0.0, 1.0))  # beyond the diameter: the far point
    safe = np.where(np.abs(curvature) < 1e-9, 1.0, curvature)
    x = np.where(np.abs(curvature) < 1e-9, d, np.sin(turn) / np.abs(safe))
    y = np.where(np.abs(curvature) < 1e-9, 0.0, (1 - np.cos(turn)) / safe)
    bearing = np.arctan2(y, x)
    index = np.round(bearing / (2 * math.pi / S)).astype(int) % S
    sectors = np.full((B, S), R, dtype=np.float32) if others is None else others.copy()
    sectors[np.arange(B), index[:, 0]] = d[:, 0]
    return sectors


# --- the property checks, shared by the eager, compiled and ONNX runs ------------------------

def check_passthrough(out: dict[str, np.ndarray], command: np.ndarray) -> None:
    assert torch.equal(t(out["command"]), t(command))
    assert np.all(out["intervention"] == 0) and np.all(out["risk"] == 0)


def check_brakes(out: dict[str, np.ndarray], speed: np.ndarray) -> None:
    assert np.all(out["command"][:, 1] <= 0.0), out["command"]
    assert np.all(out["command"][:, 0] <= speed[:, 0]), (out["command"], speed)
    assert np.all(out["intervention"].astype(int) & 4)


def check_bounded(out: dict[str, np.ndarray]) -> None:
    for value in out.values():
        assert np.all(np.isfinite(value))
    cmd = out["command"]
    assert np.all((cmd[:, 0] >= 0) & (cmd[:, 0] <= CFG.v_max))
    assert np.all((cmd[:, 1] >= CFG.accel_min) & (cmd[:, 1] <= CFG.accel_max))
    assert np.all(np.abs(cmd[:, 2]) <= np.float32(CFG.steer_max))
    assert np.all((out["risk"] >= 0) & (out["risk"] <= 1))
    code = out["intervention"]
    assert np.all((code == np.round(code)) & (code >= 0) & (code < 256))


def clamp_command(command: np.ndarray) -> np.ndarray:
    low = np.array([0.0, CFG.accel_min, -CFG.steer_max], dtype=np.float32)
    high = np.array([CFG.v_max, CFG.accel_max, CFG.steer_max], dtype=np.float32)
    return np.clip(command, low, high)


def check_not_more_aggressive(out: dict[str, np.ndarray], command: np.ndarray) -> None:
    limited = clamp_command(command)
    assert np.all(out["command"][:, 0] <= limited[:, 0])
    assert np.all(out["command"][:, 1] <= limited[:, 1])
    assert np.all(out["command"][:, 2] == limited[:, 2])


def check_flag_caps(out: dict[str, np.ndarray], health: np.ndarray) -> None:
    cmd = out["command"]
    down = ~(health >= 0.5)
    stop = down[:, 0] | down[:, 1]
    assert np.all(cmd[stop, 0] == 0.0)
    assert np.all(cmd[down[:, 0], 1] <= -CFG.comfort_decel)
    assert np.all(cmd[down[:, 1], 1] <= -CFG.emergency_decel)
    assert np.all(cmd[down[:, 2], 0] <= CFG.degraded_speed)


# --- eager ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eager() -> SafetySupervisor:
    return SafetySupervisor().eval()


@given(command=commands, speed=measured_speeds, weights=scorer_weights)
def test_clear_and_healthy_passes_through_bitwise(eager, command, speed, weights):
    model = randomize_scorer(eager, *weights)
    out = call(model, np.full((B, S), R, np.float32), command, speed, np.ones((B, 3), np.float32))
    check_passthrough(out, command)


clutter = hnp.arrays(np.float32, (B, S), elements=st.floats(0.0, 2 * R, **F32))
flags = hnp.arrays(np.float32, (B, 3), elements=st.sampled_from([0.0, 1.0]))


@given(
    fraction=hnp.arrays(np.float64, (B, 1), elements=st.floats(0.0, 0.99)),
    command=commands, speed=column(0.0, 2 * CFG.v_max), weights=scorer_weights, others=clutter, health=flags,
)
def test_obstacle_inside_envelope_never_accelerates_toward_it(eager, fraction, command, speed, weights, others, health):
    # more obstacles in other sectors and flags down can only add caution
    model = randomize_scorer(eager, *weights)
    sectors = obstacle_on_path(fraction, command, speed, others)
    check_brakes(call(model, sectors, command, speed, health), speed)


@given(**extreme, weights=scorer_weights)
def test_outputs_bounded_finite_and_never_more_aggressive(eager, sectors, command, speed, health, weights):
    model = randomize_scorer(eager, *weights)
    out = call(model, sectors, command, speed, health)
    check_bounded(out)
    check_not_more_aggressive(out, command)
    check_flag_caps(out, health)


@given(sectors=clutter, command=commands, speed=column(0.0, 2 * CFG.v_max), health=flags, weights=scorer_weights)
def test_scorer_only_adds_caution(eager, sectors, command, speed, health, weights):
    rules_only = call(quiet_scorer(eager), sectors, command, speed, health)
    out = call(randomize_scorer(eager, *weights), sectors, command, speed, health)
    assert np.all(out["command"][:, :2] <= rules_only["command"][:, :2])
    assert np.all(out["risk"] >= rules_only["risk"])
    check_flag_caps(out, health)


@given(
    command=commands, speed=column(0.0, CFG.v_max),
    nan_mask=hnp.arrays(np.bool_, (B, 3 + 1 + S)),
)
def test_nan_inputs_give_a_safe_bounded_command(eager, command, speed, nan_mask):
    sectors = np.full((B, S), R, np.float32)
    command, speed = command.copy(), speed.copy()
    command[nan_mask[:, :3]] = np.nan
    speed[nan_mask[:, 3:4]] = np.nan
    sectors[nan_mask[:, 4:]] = np.nan
    out = call(eager, sectors, command, speed, np.ones((B, 3), np.float32))
    check_bounded(out)
    bad = nan_mask[:, :3].any(axis=1)
    assert np.all(out["command"][bad, 0] == 0.0) and np.all(out["command"][bad, 1] <= -CFG.comfort_decel)


# --- the compiled graph module and its ONNX file ----------------------------------------------

@pytest.fixture(scope="module")
def compiled() -> fxopt.CompiledModel:
    torch.manual_seed(0)
    return fxopt.compile(SafetySupervisor(), "xavier", example_inputs=example_batch())


@pytest.fixture(scope="module")
def onnx_session(compiled) -> ort.InferenceSession:
    return ort.InferenceSession(compiled.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, sectors, command, speed, health) -> dict[str, np.ndarray]:
    feed = dict(zip([i.name for i in session.get_inputs()], [sectors, command, speed, health]))
    outputs = session.run(None, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feed.items()})
    return dict(zip([o.name for o in session.get_outputs()], outputs))


@given(command=commands, speed=measured_speeds, weights=scorer_weights)
def test_compiled_clear_and_healthy_passes_through_bitwise(compiled, command, speed, weights):
    model = randomize_scorer(compiled.graph_module, *weights)
    check_passthrough(call(model, np.full((B, S), R, np.float32), command, speed, np.ones((B, 3), np.float32)), command)


@given(
    fraction=hnp.arrays(np.float64, (B, 1), elements=st.floats(0.0, 0.99)),
    command=commands, speed=column(0.0, 2 * CFG.v_max), weights=scorer_weights, others=clutter, health=flags,
)
def test_compiled_obstacle_inside_envelope_brakes(compiled, fraction, command, speed, weights, others, health):
    model = randomize_scorer(compiled.graph_module, *weights)
    sectors = obstacle_on_path(fraction, command, speed, others)
    check_brakes(call(model, sectors, command, speed, health), speed)


@given(**extreme, weights=scorer_weights)
def test_compiled_outputs_bounded_and_never_more_aggressive(compiled, sectors, command, speed, health, weights):
    model = randomize_scorer(compiled.graph_module, *weights)
    out = call(model, sectors, command, speed, health)
    check_bounded(out)
    check_not_more_aggressive(out, command)
    check_flag_caps(out, health)


@given(
    clear_command=commands, clear_speed=column(0.0, SPEED_CEILING),
    fraction=hnp.arrays(np.float64, (B, 1), elements=st.floats(0.0, 0.99)),
    command=commands, speed=column(0.0, 2 * CFG.v_max),
    sectors=extreme["sectors"], wild_command=extreme["command"], wild_speed=extreme["speed"], health=extreme["health"],
)
def test_onnx_runtime_keeps_the_properties(
    onnx_session, clear_command, clear_speed, fraction, command, speed, sectors, wild_command, wild_speed, health,
):
    healthy = np.ones((B, 3), np.float32)
    check_passthrough(run_onnx(onnx_session, np.full((B, S), R, np.float32), clear_command, clear_speed, healthy), clear_command)
    check_brakes(run_onnx(onnx_session, obstacle_on_path(fraction, command, speed), command, speed, healthy), speed)
    out = run_onnx(onnx_session, sectors, wild_command, wild_speed, health)
    check_bounded(out)
    check_not_more_aggressive(out, wild_command)
    check_flag_caps(out, health)
