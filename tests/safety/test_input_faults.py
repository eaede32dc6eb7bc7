"""Input faults fail safe: every NaN, ±Inf or out-of-range input value gets the ``input_fault`` response.

Checked on the eager supervisor, its compiled graph module (fp32) and the ONNX file in ONNX
Runtime: the two faults of issue 15 as regressions, an exhaustive table (every input position ×
every bad value), and a hypothesis property over random scenes with random faults. Each check is
also run on a supervisor whose fault rule is switched off, and must fail there.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fxopt
from fxopt.safety.scenarios import example_batch
from fxopt.safety.supervisor import (
    INTERVENTION_BITS,
    SPEED_CEILING,
    SafetySupervisor,
    SupervisorConfig,
)
from fxopt.safety.verify import run_onnx_batched

CFG = SupervisorConfig()
S, R = CFG.num_sectors, CFG.max_range
FAULT = INTERVENTION_BITS["input_fault"]
NAN, INF = float("nan"), float("inf")
# the bad values per input: non-finite everywhere, plus what is out of range for that input
BAD_VALUES = {
    "sectors": (NAN, INF, -INF, -0.5, -1e30),
    "command": (NAN, INF, -INF),  # finite values beyond the limits are clamped (out_of_limits)
    "speed": (NAN, INF, -INF, -0.5, float(np.nextafter(np.float32(SPEED_CEILING), np.float32(INF))), 1e30),
    "health": (NAN, INF, -INF, -0.5, 1.5),
}
WIDTHS = {"sectors": S, "command": 3, "speed": 1, "health": 3}
# every (input, column) position
POSITIONS = [(name, col) for name, width in WIDTHS.items() for col in range(width)]

Runner = Callable[..., dict[str, np.ndarray]]


class IgnoresFaults(SafetySupervisor):
    """Deliberately broken: no input is ever a fault."""

    def _input_fault(self, sectors, command, speed, health):
        return torch.zeros_like(speed, dtype=torch.bool)


class FlagsFaultsOnly(SafetySupervisor):
    """Deliberately broken: a fault sets its bit but caps nothing."""

    def _rule_table(self, scene, alarm):
        rules = super()._rule_table(scene, alarm)
        no_cap = torch.full_like(scene.v, 1e4)
        return tuple((name, active, no_cap, no_cap) if name == "input_fault" else (name, active, s, a) for name, active, s, a in rules)


def torch_runner(model: torch.nn.Module) -> Runner:
    def run(sectors, command, speed, health):
        with torch.no_grad():
            out = model(*(torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in (sectors, command, speed, health)))
        return {k: v.numpy() for k, v in out.items()}
    return run


def onnx_runner(onnx_model) -> Runner:
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda *inputs: run_onnx_batched(session, [np.asarray(a, np.float32) for a in inputs])


def runners_for(model: SafetySupervisor) -> dict[str, Runner]:
    torch.manual_seed(0)
    model = model.eval()
    # safety="off": the strict policy would refuse the broken supervisors at compile time
    # (tests/safety/test_strict_compile.py); here their properties are checked one runtime at a time
    compiled = fxopt.compile(model, "xavier", example_inputs=example_batch(), precision="fp32", safety="off")
    return {"eager": torch_runner(model), "graph": torch_runner(compiled.graph_module), "onnx": onnx_runner(compiled.onnx_model)}


@pytest.fixture(scope="module")
def runners() -> dict[str, Runner]:
    torch.manual_seed(0)
    return runners_for(SafetySupervisor())


@pytest.fixture(scope="module", params=[IgnoresFaults, FlagsFaultsOnly])
def broken_runners(request) -> dict[str, Runner]:
    torch.manual_seed(0)
    return runners_for(request.param())


KINDS = ("eager", "graph", "onnx")


# --- the fault response ------------------------------------------------------------------------

def worst_case_speed(speed: np.ndarray) -> np.ndarray:
    ok = (speed >= 0) & (speed <= SPEED_CEILING)  # NaN fails both
    return np.where(ok, speed, SPEED_CEILING)[:, 0]


def check_fault_response(out: dict[str, np.ndarray], command: np.ndarray, speed: np.ndarray) -> None:
    """Every row is faulty: its bit, degraded speed, no acceleration, braking while faster."""
    cmd = out["command"]
    target_in = np.clip(np.nan_to_num(command[:, 0], nan=0.0, posinf=CFG.v_max, neginf=0.0), 0.0, CFG.v_max)
    assert np.all(out["intervention"][:, 0].astype(int) & FAULT), out["intervention"][:, 0]
    assert np.all(cmd[:, 1] <= 0.0), cmd
    assert np.all(cmd[:, 0] <= np.minimum(target_in, CFG.degraded_speed)), cmd
    fast = worst_case_speed(speed) > CFG.degraded_speed
    assert np.all(cmd[fast, 1] <= -CFG.comfort_decel), cmd[fast]
    assert np.all(np.isfinite(cmd)) and np.all(out["risk"] == 1.0)


def healthy_scene(rows: int, command=(8.0, 1.0, 0.0), speed: float = 5.0) -> list[np.ndarray]:
    return [
        np.full((rows, S), R, np.float32), np.tile(np.float32(command), (rows, 1)),
        np.full((rows, 1), speed, np.float32), np.ones((rows, 3), np.float32),
    ]


# --- the two faults of issue 15 ------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_nan_speed_does_not_pass_the_command_through(runners, kind):
    # speed target 8 m/s, +1 m/s²: with the speed unknown the vehicle must not speed up
    sectors, command, speed, health = healthy_scene(1)
    speed[:] = NAN
    out = runners[kind](sectors, command, speed, health)
    assert out["command"].tolist() == [[CFG.degraded_speed, -CFG.comfort_decel, 0.0]]
    assert int(out["intervention"][0, 0]) == FAULT
    check_fault_response(out, command, speed)


@pytest.mark.parametrize("kind", KINDS)
def test_nan_sector_off_the_steered_path_is_a_fault(runners, kind):
    # sectors 9..23 lie off the straight path: before the fix their NaN was read as an obstacle
    # that the path rule ignored, and the command passed with its acceleration
    off_path = np.arange(9, 24)
    sectors, command, speed, health = healthy_scene(len(off_path))
    sectors[np.arange(len(off_path)), off_path] = NAN
    out = runners[kind](sectors, command, speed, health)
    check_fault_response(out, command, speed)
    clean = runners[kind](*healthy_scene(1))
    assert clean["command"].tolist() == [[8.0, 1.0, 0.0]] and clean["intervention"][0, 0] == 0


# --- every position, every bad value -------------------------------------------------------------

def fault_table() -> list[np.ndarray]:
    """One row per (position, bad value, base speed): a clear, healthy scene with that one fault."""
    rows = [(name, col, value, base) for name, col in POSITIONS for value in BAD_VALUES[name] for base in (5.0, 1.0)]
    inputs = healthy_scene(len(rows))
    inputs[2][:, 0] = [base for *_, base in rows]  # above and below degraded_speed
    for i, (name, col, value, _) in enumerate(rows):
        inputs[list(WIDTHS).index(name)][i, col] = value
    return inputs


def test_the_table_has_each_bad_value_at_each_position():
    inputs = dict(zip(WIDTHS, fault_table()))
    assert len(inputs["sectors"]) == 2 * sum(WIDTHS[name] * len(BAD_VALUES[name]) for name in WIDTHS) == 380
    for name, col in POSITIONS:
        seen = inputs[name][:, col]
        for value in BAD_VALUES[name]:
            assert np.isnan(seen).any() if value != value else (seen == np.float32(value)).any(), (name, col, value)


@pytest.mark.parametrize("kind", KINDS)
def test_every_bad_value_at_every_position_gets_the_fault_response(runners, kind):
    sectors, command, speed, health = fault_table()
    check_fault_response(runners[kind](sectors, command, speed, health), command, speed)


@pytest.mark.parametrize("kind", KINDS)
def test_the_table_check_fails_on_a_broken_fault_rule(broken_runners, kind):
    sectors, command, speed, health = fault_table()
    with pytest.raises(AssertionError):
        check_fault_response(broken_runners[kind](sectors, command, speed, health), command, speed)


# --- hypothesis: random scenes, random faults ----------------------------------------------------

B = 8
F32 = {"width": 32, "allow_nan": False}


def column(low: float, high: float) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float32, (B, 1), elements=st.floats(float(np.float32(low)), float(np.float32(high)), **F32))


scenes = st.tuples(
    hnp.arrays(np.float32, (B, S), elements=st.floats(0.0, 2 * R, **F32)),  # clutter, in range or not
    st.builds(lambda *c: np.concatenate(c, axis=1),
              column(0.0, CFG.v_max), column(CFG.accel_min, CFG.accel_max), column(-CFG.steer_max, CFG.steer_max)),
    column(0.0, SPEED_CEILING),
    hnp.arrays(np.float32, (B, 3), elements=st.sampled_from([0.0, 1.0])),
    hnp.arrays(np.bool_, (B,)),  # rows cleared to an empty, healthy scene: the fault rule alone
)
# per row: one to three (position, bad value) faults
faults = st.lists(
    st.lists(st.tuples(st.sampled_from(POSITIONS), st.integers(0, 5)), min_size=1, max_size=3), min_size=B, max_size=B,
)


def with_faults(scene: tuple[np.ndarray, ...], row_faults: list[list[tuple[tuple[str, int], int]]]) -> list[np.ndarray]:
    sectors, command, speed, health, clear = scene
    inputs = [sectors.copy(), command.copy(), speed.copy(), health.copy()]
    inputs[0][clear], inputs[3][clear] = R, 1.0
    for row, chosen in enumerate(row_faults):
        for (name, col), pick in chosen:
            values = BAD_VALUES[name]
            inputs[list(WIDTHS).index(name)][row, col] = values[pick % len(values)]
    return inputs


def fault_property(run: Runner, *, shrink: bool = True) -> Callable[[], None]:
    @given(scene=scenes, row_faults=faults)
    def prop(scene, row_faults):
        sectors, command, speed, health = with_faults(scene, row_faults)
        check_fault_response(run(sectors, command, speed, health), command, speed)
    # a failure that is expected needs no minimal example
    phases = tuple(Phase) if shrink else (Phase.explicit, Phase.reuse, Phase.generate)
    return settings(settings.default, phases=phases)(prop)


@pytest.mark.parametrize("kind", KINDS)
def test_faults_in_random_scenes_get_the_fault_response(runners, kind):
    fault_property(runners[kind])()


@pytest.mark.parametrize("kind", KINDS)
def test_the_property_fails_on_a_broken_fault_rule(broken_runners, kind):
    with pytest.raises(AssertionError):
        fault_property(broken_runners[kind], shrink=False)()
