"""Safety supervisor unit tests: sector preprocessing, envelope formula, each rule, tracing, compile."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

import fxopt
import fxopt.safety.scenarios as scenarios
from fxopt.errors import InputError
from fxopt.safety.supervisor import (
    INTERVENTION_BITS,
    SafetySupervisor,
    SectorDistances,
    SupervisorConfig,
    decode_intervention,
    sector_distances,
    stoppable_speed,
    stopping_distance,
)

CFG = SupervisorConfig()
R = CFG.max_range


def quiet(model: SafetySupervisor) -> SafetySupervisor:
    """The model with a scorer that never alarms (so a test sees the explicit rules alone)."""
    torch.nn.init.constant_(model.risk_scorer.net[2].bias, -50.0)
    return model.eval()


def run(model, sectors, command, speed, health=None):
    sectors = torch.as_tensor(sectors, dtype=torch.float32).reshape(1, -1)
    health = torch.ones(1, 3) if health is None else torch.tensor([health], dtype=torch.float32)
    out = model(sectors, torch.tensor([command], dtype=torch.float32), torch.tensor([[float(speed)]]), health)
    return {k: v.detach() for k, v in out.items()}


def empty(num_sectors: int = 32) -> torch.Tensor:
    return torch.full((num_sectors,), R)


# --- sector_distances -------------------------------------------------------------------------

def test_sector_distances_hand_made_points():
    points = torch.tensor([
        [3.0, 0.0],      # ahead, sector 0
        [2.0, 0.5],      # ahead too (bearing 14°, within ±45°), nearer
        [0.0, 4.0],      # left, sector 1
        [-1.0, -1.0],    # bearing -135° -> 225°: the boundary between sectors 2 and 3 rounds up to 3
        [0.0, -20.0],    # right but beyond range
    ])
    result = sector_distances(points, num_sectors=4, max_range=10.0)
    assert result.shape == (4,) and result.dtype == torch.float32
    torch.testing.assert_close(result, torch.tensor([math.hypot(2.0, 0.5), 4.0, 10.0, math.sqrt(2.0)]))


def test_sector_distances_sector_centres_follow_the_supervisor_convention():
    # one point on each sector centre, at distance 1 + i: sector i must read 1 + i
    s = 16
    angles = torch.arange(s) * (2 * math.pi / s)
    radii = 1.0 + torch.arange(s, dtype=torch.float32) * 0.5
    points = torch.stack([radii * torch.cos(angles), radii * torch.sin(angles)], dim=1)
    torch.testing.assert_close(sector_distances(points, s, 20.0), radii)


def test_sector_distances_batched_with_nan_padding_and_z_filter():
    nan = float("nan")
    points = torch.tensor([
        [[1.0, 0.0, 0.5], [nan, nan, nan], [0.0, -2.0, 0.5]],
        [[5.0, 0.0, -1.5], [6.0, 0.0, 0.2], [nan, nan, nan]],  # the first point is ground
    ])
    result = sector_distances(points, num_sectors=4, max_range=10.0, z_range=(-1.0, 2.0))
    assert result.shape == (2, 4)
    torch.testing.assert_close(result, torch.tensor([[1.0, 10.0, 10.0, 2.0], [6.0, 10.0, 10.0, 10.0]]))


def test_sector_distances_rejects_bad_input():
    with pytest.raises(InputError, match="points must have shape"):
        sector_distances(torch.zeros(5), 8, 10.0)
    with pytest.raises(InputError, match="C >= 3"):
        sector_distances(torch.zeros(5, 2), 8, 10.0, z_range=(0.0, 1.0))
    with pytest.raises(InputError, match="num_sectors"):
        sector_distances(torch.zeros(5, 2), 0, 10.0)


def test_sector_distances_module_matches_the_function_and_compiles():
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(2, 400, 3, generator=generator) * 6.0
    points[1, 300:] = float("nan")  # padding
    module = SectorDistances(32, 10.0, z_range=(-8.0, 8.0))
    expected = sector_distances(points, 32, 10.0, z_range=(-8.0, 8.0))
    torch.testing.assert_close(module(points), expected)
    # compile refuses NaN example inputs (checks on them are vacuous): trace on far-away points
    # instead of the padding, then run the compiled module on the padded points
    finite = torch.where(torch.isnan(points), torch.full_like(points, 50.0), points)
    result = fxopt.compile(module, "xavier", example_inputs=(finite,))
    assert result.report.leaves == [] and result.report.onnx["opset"] == 17
    assert "ScatterElements" not in result.report.onnx["op_types"]
    torch.testing.assert_close(result(points), expected)


# --- the stopping envelope --------------------------------------------------------------------

@pytest.mark.parametrize("v,t,a,m,expected", [
    (0.0, 0.3, 4.0, 1.0, 1.0),
    (10.0, 0.5, 5.0, 1.0, 5.0 + 10.0 + 1.0),
    (4.0, 0.3, 4.0, 0.5, 1.2 + 2.0 + 0.5),
    (-3.0, 0.3, 4.0, 1.0, 1.0),  # reversing counts as standing
])
def test_stopping_distance_formula(v, t, a, m, expected):
    assert float(stopping_distance(torch.tensor(v), t, a, m)) == pytest.approx(expected)


def test_stoppable_speed_inverts_the_envelope():
    free = torch.linspace(CFG.margin, 50.0, 200)
    v = stoppable_speed(free, CFG.reaction_time, CFG.brake_decel, CFG.margin)
    torch.testing.assert_close(stopping_distance(v, CFG.reaction_time, CFG.brake_decel, CFG.margin), free)
    assert float(stoppable_speed(torch.tensor(0.2), 0.3, 4.0, 1.0)) == 0.0  # closer than the margin


def test_obstacle_ahead_inside_and_outside_the_envelope():
    model = quiet(SafetySupervisor())
    v = 6.0
    d_stop = float(stopping_distance(torch.tensor(v), CFG.reaction_time, CFG.brake_decel, CFG.margin))
    assert d_stop < R  # 1.8 + 4.5 + 1 = 7.3 m
    command = [10.0, 1.5, 0.0]
    sectors = empty()
    sectors[0] = d_stop - 0.2
    inside = run(model, sectors, command, v)
    assert inside["command"][0, 1] <= -v * v / (2 * (d_stop - 0.2 - CFG.margin)) + 1e-5
    assert inside["command"][0, 0] <= v
    assert decode_intervention(float(inside["intervention"])) == ["obstacle_limit", "obstacle_brake"]
    assert float(inside["risk"]) == 1.0
    sectors[0] = d_stop + 0.2
    outside = run(model, sectors, command, v)
    limit = float(stoppable_speed(torch.tensor(d_stop + 0.2), CFG.reaction_time, CFG.brake_decel, CFG.margin))
    assert outside["command"][0, 1] == 1.5  # no braking needed yet
    assert outside["command"][0, 0] == pytest.approx(limit)  # but no target it could not stop from
    assert decode_intervention(float(outside["intervention"])) == ["obstacle_limit"]
    assert 0.0 < float(outside["risk"]) < 1.0


def test_obstacles_off_the_path_or_behind_pass_through():
    model = quiet(SafetySupervisor())
    command = [8.0, 1.0, 0.0]
    for sector, distance in [(16, 2.0), (8, 1.5), (24, 1.5), (4, 6.0)]:  # behind, left, right, 45° ahead-left
        sectors = empty()
        sectors[sector] = distance
        out = run(model, sectors, command, 6.0)
        assert torch.equal(out["command"], torch.tensor([command])), (sector, distance)
        assert float(out["intervention"]) == 0.0


def test_steering_turns_the_corridor_toward_the_obstacle():
    model = quiet(SafetySupervisor())
    sectors = empty()
    sectors[2] = 5.0  # bearing 22.5° to the left, 5 m away
    straight = run(model, sectors, [8.0, 1.0, 0.0], 6.0)
    left = run(model, sectors, [8.0, 1.0, 0.4], 6.0)
    right = run(model, sectors, [8.0, 1.0, -0.4], 6.0)
    assert float(straight["intervention"]) == 0.0 and float(right["intervention"]) == 0.0
    assert "obstacle_brake" in decode_intervention(float(left["intervention"]))
    assert left["command"][0, 1] <= 0.0 and left["command"][0, 2] == pytest.approx(0.4)  # steering kept


def test_standing_vehicle_with_obstacle_in_the_margin_stays():
    model = quiet(SafetySupervisor())
    sectors = empty()
    sectors[0] = 0.5
    out = run(model, sectors, [3.0, 1.0, 0.0], 0.0)
    assert out["command"][0, 0] == 0.0 and out["command"][0, 1] <= 0.0


# --- health flags -----------------------------------------------------------------------------

@pytest.mark.parametrize("flag,speed_cap,accel_cap", [
    ("compute", 0.0, -CFG.comfort_decel),
    ("hardware", 0.0, -CFG.emergency_decel),
    ("algorithm", CFG.degraded_speed, -CFG.comfort_decel),  # faster than degraded_speed: brake
])
def test_each_health_flag_down(flag, speed_cap, accel_cap):
    model = quiet(SafetySupervisor())
    health = [1.0, 1.0, 1.0]
    health[scenarios.HEALTH_FLAGS[flag]] = 0.0
    out = run(model, empty(), [9.0, 1.5, 0.2], 5.0, health)
    assert float(out["command"][0, 0]) == pytest.approx(speed_cap)
    assert float(out["command"][0, 1]) == pytest.approx(accel_cap)
    assert float(out["command"][0, 2]) == pytest.approx(0.2)
    assert decode_intervention(float(out["intervention"])) == [f"{flag}_down"]
    assert float(out["risk"]) == 1.0


def test_algorithm_down_below_the_degraded_speed_only_limits_the_target():
    model = quiet(SafetySupervisor())
    out = run(model, empty(), [9.0, 1.0, 0.0], 1.0, [1.0, 1.0, 0.0])
    assert out["command"].tolist() == [[CFG.degraded_speed, 1.0, 0.0]]


def test_nan_health_counts_as_down_and_nan_command_stops():
    model = quiet(SafetySupervisor())
    # a NaN is also an input fault: its own bit beside the flag's / the command's rule
    out = run(model, empty(), [9.0, 1.0, 0.0], 3.0, [1.0, float("nan"), 1.0])
    assert decode_intervention(float(out["intervention"])) == ["hardware_down", "input_fault"]
    out = run(model, empty(), [float("nan"), 1.0, float("nan")], 3.0)
    assert out["command"].tolist() == [[0.0, -CFG.comfort_decel, 0.0]]
    assert decode_intervention(float(out["intervention"])) == ["out_of_limits", "input_fault"]


def test_out_of_limit_command_is_clamped_and_flagged():
    model = quiet(SafetySupervisor())
    out = run(model, empty(), [40.0, -20.0, -3.0], 3.0)
    assert out["command"].tolist() == [[CFG.v_max, CFG.accel_min, pytest.approx(-CFG.steer_max)]]
    assert decode_intervention(float(out["intervention"])) == ["out_of_limits"]


def test_learned_alarm_forbids_speeding_up_only_with_something_in_range():
    model = SafetySupervisor().eval()
    torch.nn.init.constant_(model.risk_scorer.net[2].bias, 50.0)  # always alarmed
    clear = run(model, empty(), [9.0, 1.0, 0.0], 4.0)
    assert clear["command"].tolist() == [[9.0, 1.0, 0.0]] and float(clear["learned_risk"]) == 0.0
    sectors = empty()
    sectors[16] = 4.0  # behind: the rules ignore it, the scorer does not
    alarmed = run(model, sectors, [9.0, 1.0, 0.0], 4.0)
    assert alarmed["command"].tolist() == [[4.0, 0.0, 0.0]]
    assert decode_intervention(float(alarmed["intervention"])) == ["learned_caution"]


def test_example_batch_touches_every_rule():
    model = quiet(SafetySupervisor())
    out = model(*scenarios.example_batch())
    codes = [decode_intervention(c) for c in out["intervention"].reshape(-1).tolist()]
    assert codes == [
        [], ["obstacle_limit", "obstacle_brake"], ["obstacle_limit"], [], ["compute_down"],
        ["hardware_down"], ["algorithm_down"], ["out_of_limits"],
    ]
    assert set(INTERVENTION_BITS) - {"learned_caution", "input_fault"} == {name for c in codes for name in c}


# --- config and inputs --------------------------------------------------------------------------

def test_config_keyword_overrides_and_errors():
    model = SafetySupervisor(num_sectors=16, max_range=8.0)
    assert model.config.num_sectors == 16 and model.sector_angles.shape == (1, 16)
    assert SafetySupervisor(SupervisorConfig(v_max=5.0, degraded_speed=1.0), hidden=8).config.v_max == 5.0
    with pytest.raises(InputError, match="unknown safety supervisor option"):
        SafetySupervisor(sectors=16)
    with pytest.raises(InputError, match="accel_min must be < 0"):
        SafetySupervisor(accel_min=1.0)
    with pytest.raises(InputError, match="emergency_decel"):
        SafetySupervisor(emergency_decel=10.0)


def test_wrong_input_shapes_name_the_input():
    model = SafetySupervisor(num_sectors=16)
    with pytest.raises(InputError, match=r"sectors must have shape \(B, 16\)"):
        model(torch.zeros(2, 32), torch.zeros(2, 3), torch.zeros(2, 1), torch.ones(2, 3))
    with pytest.raises(InputError, match="health must have shape"):
        model(torch.zeros(2, 16), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 2))


def test_registry_builds_the_configured_model():
    from fxopt import models

    assert "safety_supervisor" in models.names()
    model = models.create("safety_supervisor", num_sectors=16)
    inputs = models.example_inputs("safety_supervisor", num_sectors=16)
    assert isinstance(model, SafetySupervisor) and model.config.num_sectors == 16
    assert inputs[0].shape == (8, 16) and model(*inputs)["command"].shape == (8, 3)


def test_training_recipe_beats_chance_on_the_balanced_holdout(one_thread):
    from fxopt import models

    untrained = models.spec("safety_supervisor").recipe.evaluate(quiet(SafetySupervisor()))
    assert untrained["accuracy"] == 0.5  # a silent scorer says "no collision" to every row
    result = models.train("safety_supervisor", steps=150, seed=0, progress=False)
    assert result.chance == {"accuracy": 0.5, "auc": 0.5}
    assert result.metrics["accuracy"] > 0.75 and result.metrics["auc"] > 0.85, result.metrics
    assert result.losses[-1] < result.losses[0]


def test_collision_labels_on_hand_made_scenes():
    sectors = torch.full((4, 32), R)
    sectors[0, 0] = 3.0    # ahead, driving on at 5 m/s: hit
    sectors[1, 16] = 3.0   # behind: no hit
    sectors[2, 0] = 3.0    # ahead, but braking from 1 m/s stops after 0.25 m (plus 1.1 m disc): no hit
    sectors[3, 8] = 0.5    # beside, inside the vehicle disc already: hit
    command = torch.tensor([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0], [0.0, -4.0, 0.0], [0.0, -4.0, 0.0]])
    speed = torch.tensor([[5.0], [5.0], [1.0], [0.0]])
    labels = scenarios.collision_labels((sectors, command, speed, torch.ones(4, 3)))
    assert labels.reshape(-1).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_scenario_generators_are_seeded_and_shaped():
    def draw(fn, **kw):
        return fn(16, torch.Generator().manual_seed(3), **kw)

    for fn, kw in [(scenarios.clear_scenes, {}), (scenarios.obstacle_scenes, {"clutter": 2}),
                   (scenarios.flags_down, {"flag": "compute"}), (scenarios.mixed_scenes, {})]:
        first, second = draw(fn, **kw), draw(fn, **kw)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        assert [tuple(x.shape) for x in first] == [(16, 32), (16, 3), (16, 1), (16, 3)]
    sectors = draw(scenarios.obstacle_scenes, sector=5, distance=(1.0, 2.0))[0]
    assert bool(((sectors[:, 5] >= 1.0) & (sectors[:, 5] <= 2.0)).all())
    assert bool((draw(scenarios.flags_down, flag="compute")[3][:, 0] == 0).all())
    with pytest.raises(InputError, match="unknown health flag"):
        draw(scenarios.flags_down, flag="brakes")


# --- tracing and compiling ------------------------------------------------------------------------

def test_traces_into_one_graph_without_leaves():
    model = SafetySupervisor()
    gm = fxopt.trace(model, scenarios.example_batch())
    assert fxopt.leaves_of(gm) == ()
    modules = {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    assert modules <= {"Linear", "ReLU"}
    ops = {str(n.target) for n in gm.graph.nodes}
    assert not any(op in ops for op in ("item", "tolist", "nonzero"))  # no value-dependent Python


@pytest.fixture(scope="module", params=["xavier", "cpu"])
def compiled(request):
    torch.manual_seed(0)
    model = SafetySupervisor().eval()
    return request.param, model, fxopt.compile(model, request.param, example_inputs=scenarios.example_batch())


def test_compiles_with_onnx_verified(compiled):
    target, model, result = compiled
    assert result.report.onnx["opset"] == 17
    assert result.report.onnx["max_abs_error_vs_torch"] <= 1e-5
    assert result.report.leaves == []
    inputs = scenarios.mixed_scenes(8, torch.Generator().manual_seed(1))
    expected, got = model(*inputs), result.graph_module(*inputs)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-6)
    session = ort.InferenceSession(result.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
    by_name = dict(zip([o.name for o in session.get_outputs()], outputs))
    assert set(by_name) == {"command", "risk", "learned_risk", "intervention"}
    np.testing.assert_allclose(by_name["command"], expected["command"].detach().numpy(), atol=1e-5)
    np.testing.assert_array_equal(by_name["intervention"], expected["intervention"].numpy())


def test_fp32_deployment_plan_keeps_the_command_exact(tmp_path):
    model = SafetySupervisor().eval()
    result = fxopt.compile(model, "xavier", example_inputs=scenarios.example_batch(), precision="fp32")
    paths = result.save(tmp_path / "supervisor")
    plan = open(paths["build_engine.sh"]).read()
    assert "trtexec" in plan and "--fp16" not in plan and "--int8" not in plan
    clear = scenarios.clear_scenes(8, torch.Generator().manual_seed(2))
    assert torch.equal(result(*clear)["command"], clear[1])
