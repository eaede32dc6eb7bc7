"""MotionNet-style BEV network: outputs, configs, fx/ONNX compilation, loss and training recipe."""

from __future__ import annotations

import math

import pytest
import torch
from model_checks import assert_onnx_matches_torch, training_losses

import fxopt
from fxopt.models import motionnet as mn
from fxopt.models.bev_sequence_data import generate_bev_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mn.MotionNet(mn.motionnet_config()).eval()


def test_forward_returns_per_cell_heads(model):
    (x,) = mn.example_inputs(batch_size=2)
    assert x.shape == (2, 5, 4, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert list(out) == ["category", "motion", "state"]
    assert out["category"].shape == (2, 3, 64, 64)
    assert out["motion"].shape == out["state"].shape == (2, 2, 64, 64)


def test_temporal_conv_sees_the_frame_order(model):
    """The same frames in another order give other outputs: the net is not a bag of frames."""
    x = generate_bev_batch(1, seed=0).occupancy
    with torch.no_grad():
        a, b = model(x)["motion"], model(x.flip(1))["motion"]
    assert not torch.allclose(a, b, atol=1e-4)


def test_single_channel_grids_and_other_sizes():
    cfg = {"height_bins": None, "grid": 32, "frames": 7, "channels": (8, 8, 16, 16)}
    net = mn.MotionNet(mn.motionnet_config(**cfg)).eval()
    (x,) = mn.example_inputs(batch_size=3, **cfg)
    assert x.shape == (3, 7, 32, 32)
    with torch.no_grad():
        out = net(x)
    assert out["category"].shape == (3, 3, 32, 32) and out["motion"].shape == (3, 2, 32, 32)
    with torch.no_grad():
        assert net(x[:, :4])["state"].shape == (3, 2, 32, 32)  # any sequence length runs


def test_presets_overrides_and_errors():
    full = mn.motionnet_config("full")
    assert (full.grid, full.height_bins, full.frames) == (256, 13, 5)
    with pytest.raises(fxopt.InputError, match="unknown motionnet preset"):
        mn.motionnet_config("tiny")
    with pytest.raises(fxopt.InputError, match="multiple of 8"):
        mn.motionnet_config(grid=60)
    with pytest.raises(fxopt.InputError, match="override"):
        mn.motionnet_config(depth=2)


def test_registered_spec():
    from fxopt.models.registry import _SPECS

    spec = _SPECS["motionnet"]
    assert spec.presets == ("default", "full") and spec.recipe is mn.RECIPE
    assert isinstance(spec.build(), mn.MotionNet)


def test_traces_whole_and_compiles_for_xavier_verified_in_onnx_runtime(model):
    inputs = mn.example_inputs(batch_size=2)
    gm = fxopt.trace(model, inputs)
    assert not fxopt.leaves_of(gm)
    compiled = fxopt.compile(model, "xavier", example_inputs=inputs)
    statuses = {r.name: r.status for r in compiled.report.passes}
    assert statuses["fold_batchnorm"] == "applied"
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in compiled.graph_module.modules())
    onnx_info = compiled.report.onnx
    assert onnx_info["opset"] == 17 and onnx_info["outputs"] == ["category", "motion", "state"]
    assert onnx_info["max_abs_error_vs_torch"] < 1e-4
    assert {"Conv", "ReduceMax", "Resize", "Concat"} <= set(onnx_info["op_types"])
    assert "Shape" not in onnx_info["op_types"] and "Reshape" not in onnx_info["op_types"]
    assert_onnx_matches_torch(compiled, model, generate_bev_batch(2, seed=1).occupancy, onnx_info["outputs"])


def test_loss_is_small_for_the_ground_truth():
    batch = generate_bev_batch(2, seed=2)
    perfect = {
        "category": torch.nn.functional.one_hot(batch.category, 3).permute(0, 3, 1, 2).float() * 50,
        "motion": batch.displacement.clone(),
        "state": torch.nn.functional.one_hot(batch.moving.long(), 2).permute(0, 3, 1, 2).float() * 50,
    }
    assert mn.motion_loss(perfect, batch).item() < 1e-6
    perfect["motion"] = perfect["motion"] + 1.0  # off by one cell in x and y on every cell
    assert mn.motion_loss(perfect, batch).item() == pytest.approx(2 * 0.5, rel=1e-5)  # smooth-L1(1) = 0.5


def test_training_smoke_loss_decreases():
    torch.manual_seed(0)
    model = mn.MotionNet()
    inputs, targets = mn.RECIPE.batch(0, torch.Generator().manual_seed(0))
    losses = training_losses(model, lambda out: mn.RECIPE.loss(out, targets), inputs, mn.RECIPE.lr, steps=6)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_chance_is_computed_from_constant_predictors():
    chance = mn.chance()
    data = mn.eval_set()
    foreground = data.category > 0
    # zero motion: the error is the mean displacement length on foreground cells
    expected = data.displacement.norm(dim=1)[foreground].mean().item()
    assert chance["motion_error"] == pytest.approx(expected, rel=1e-5)
    majority = torch.bincount(data.category[data.occupied]).max().item() / data.occupied.sum().item()
    assert chance["category_acc_occupied"] == pytest.approx(majority)
    assert 0.5 <= chance["state_acc_foreground"] < 0.8
    assert mn.RECIPE.chance is mn.chance  # computed by train(), not when the model registers


@pytest.mark.slow
def test_training_beats_chance():
    result = fxopt.models.train("motionnet", progress=False)
    m, chance = result.metrics, result.chance
    assert m["category_miou"] > chance["category_miou"] + 0.2
    assert m["category_acc_occupied"] > chance["category_acc_occupied"] + 0.05
    assert m["state_acc_foreground"] > chance["state_acc_foreground"] + 0.2
    assert m["motion_error"] < 0.6 * chance["motion_error"]
    assert m["motion_error_moving"] < 0.6 * chance["motion_error_moving"]


@pytest.mark.slow
def test_full_preset_compiles_for_xavier():
    torch.manual_seed(0)
    model = mn.build(preset="full").eval()
    compiled = fxopt.compile(model, "xavier", example_inputs=mn.example_inputs(preset="full"))
    assert compiled.report.onnx["opset"] == 17 and compiled.report.onnx["outputs"] == ["category", "motion", "state"]
    assert compiled.report.onnx["max_abs_error_vs_torch"] < 1e-3
