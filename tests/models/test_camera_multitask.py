"""Camera multi-task network: outputs, configs, fx/ONNX compilation, AP, training recipe."""

from __future__ import annotations

import math

import pytest
import torch
from model_checks import assert_onnx_matches_torch, training_losses

import fxopt
from fxopt.models import camera_multitask as cm
from fxopt.models.camera_eval import box_iou, image_box_ap

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return cm.CameraMultitaskNet(cm.camera_config()).eval()


def test_forward_returns_the_three_heads(model):
    (x,) = cm.example_inputs(batch_size=2)
    assert x.shape == (2, 3, 96, 160)
    with torch.no_grad():
        out = model(x)
    assert list(out) == ["heatmap", "box", "seg"]
    assert out["heatmap"].shape == (2, 3, 24, 40) and out["box"].shape == (2, 4, 24, 40)
    assert out["seg"].shape == (2, 5, 96, 160)
    # the heatmap starts near the 1% prior so the focal loss is balanced from step one
    assert float(torch.sigmoid(out["heatmap"]).mean()) < 0.05


def test_presets_overrides_and_errors():
    hd = cm.camera_config("hd")
    assert (hd.height, hd.width) == (384, 640) and cm.example_inputs(preset="hd")[0].shape == (1, 3, 384, 640)
    assert cm.camera_config(widths=(8, 16, 24, 32, 48)).widths[0] == 8
    with pytest.raises(fxopt.InputError, match="unknown camera_multitask preset"):
        cm.camera_config("huge")
    with pytest.raises(fxopt.InputError, match="multiple of 32"):
        cm.camera_config(height=100)
    with pytest.raises(fxopt.InputError, match="override"):
        cm.camera_config(depth=3)


def test_registered_spec():
    from fxopt.models.registry import _SPECS

    spec = _SPECS["camera_multitask"]
    assert spec.presets == ("default", "md", "hd") and spec.recipe is cm.RECIPE
    assert fxopt.models.recipe("camera_multitask") is cm.RECIPE
    assert isinstance(spec.build(), cm.CameraMultitaskNet)


def test_traces_whole_and_compiles_for_xavier_verified_in_onnx_runtime(model):
    inputs = cm.example_inputs(batch_size=2)
    gm = fxopt.trace(model, inputs)
    assert not fxopt.leaves_of(gm)
    compiled = fxopt.compile(model, "xavier", example_inputs=inputs)
    statuses = {r.name: r.status for r in compiled.report.passes}
    assert statuses["fold_batchnorm"] == "applied"
    onnx_info = compiled.report.onnx
    assert onnx_info["opset"] == 17 and onnx_info["outputs"] == ["heatmap", "box", "seg"]
    assert onnx_info["max_abs_error_vs_torch"] < 1e-4
    assert set(onnx_info["op_types"]) <= {"Conv", "Relu", "Add", "Resize"}
    assert_onnx_matches_torch(compiled, model, torch.rand(2, 3, 96, 160), onnx_info["outputs"])


def test_decode_detections_reads_peaks_and_boxes():
    heatmap = torch.full((1, 3, 24, 40), -10.0)
    box = torch.zeros(1, 4, 24, 40)
    heatmap[0, 1, 5, 7] = 2.0  # a person centred in cell (x=7, y=5)
    box[0, :, 5, 7] = torch.tensor([0.25, 0.5, math.log(2.0), math.log(5.0)])
    heatmap[0, 1, 5, 8] = 1.0  # a weaker neighbour: not a 3x3 peak
    (boxes, scores, labels), = cm.decode_detections({"heatmap": heatmap, "box": box})
    assert labels.tolist() == [1]
    assert scores.tolist() == pytest.approx([1 / (1 + math.exp(-2.0))])
    # centre (7.25, 5.5) cells = (29, 22) px; size 8 x 20 px
    assert boxes[0].tolist() == pytest.approx([25.0, 12.0, 33.0, 32.0])


def test_image_box_ap_hand_computed():
    gt_boxes = [torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([[0.0, 0, 10, 10]])]
    gt_labels = [torch.tensor([0, 0]), torch.tensor([1])]
    detections = [
        # image 0: a hit (0.9), a miss (0.8), a duplicate of the first box (0.7), the second box (0.6)
        (torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 31]]),
         torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0, 0, 0, 0])),
        # image 1: the right box with the wrong class, then with the right one
        (torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]]), torch.tensor([0.95, 0.5]), torch.tensor([0, 1])),
    ]
    ap = image_box_ap(detections, gt_boxes, gt_labels, num_classes=2, class_names=("car", "person"))
    # class 0 ranked: 0.95 FP, 0.9 TP, 0.8 FP, 0.7 FP (duplicate), 0.6 TP over 2 ground truths:
    # recall 0.5 at precision 1/2, recall 1 at precision 2/5 -> AP = 0.5*0.5 + 0.5*0.4 = 0.45
    assert ap["ap/car"] == pytest.approx(0.45)
    assert ap["ap/person"] == pytest.approx(1.0)
    assert ap["map"] == pytest.approx(0.725)
    strict = image_box_ap(detections, gt_boxes, gt_labels, num_classes=2, iou_threshold=0.95)
    assert strict["ap/0"] == pytest.approx(0.5 * 0.5)  # 10x11 vs 10x10 (IoU 10/11) now misses
    assert box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3], [5, 5, 6, 6]])).tolist() == [[pytest.approx(1 / 7), 0.0]]


def test_training_smoke_loss_decreases():
    torch.manual_seed(0)
    model = cm.CameraMultitaskNet()
    inputs, targets = cm.RECIPE.batch(0, torch.Generator().manual_seed(0))
    losses = training_losses(model, lambda out: cm.RECIPE.loss(out, targets), inputs, cm.RECIPE.lr, steps=6)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0]


def test_chance_is_computed_from_constant_predictors():
    chance = cm.chance()
    assert set(chance) == {"seg_miou", "det_map50", "det_map75"}
    assert 0.2 < chance["seg_miou"] < 0.5  # sky and road right, objects never
    assert chance["det_map50"] < 0.05
    assert cm.RECIPE.chance is cm.chance  # computed by train(), not when the model registers


@pytest.mark.slow
def test_training_beats_chance():
    result = fxopt.models.train("camera_multitask", progress=False)
    chance = result.chance
    assert result.metrics["seg_miou"] > max(0.7, chance["seg_miou"] + 0.3)
    assert result.metrics["det_map50"] > max(0.6, chance["det_map50"] + 0.5)
    assert result.losses[-1] < 0.3 * result.losses[0]


@pytest.mark.slow
def test_hd_preset_compiles_for_xavier():
    torch.manual_seed(0)
    model = cm.build(preset="hd").eval()
    compiled = fxopt.compile(model, "xavier", example_inputs=cm.example_inputs(preset="hd"))
    assert compiled.report.onnx["opset"] == 17 and compiled.report.onnx["outputs"] == ["heatmap", "box", "seg"]
    assert compiled.report.onnx["max_abs_error_vs_torch"] < 1e-3


def test_md_recipe_trains_on_its_own_scenes_with_objects_scaled():
    recipe = fxopt.models.recipe("camera_multitask", preset="md")
    assert recipe is not cm.RECIPE and (recipe.steps, recipe.lr) == (cm.RECIPE.steps, cm.RECIPE.lr)
    (images,), batch = recipe.batch(0, torch.Generator().manual_seed(0))
    assert images.shape == (8, 3, 192, 320) and batch.heatmap.shape[-2:] == (48, 80)
    data = cm.data_config(cm.camera_config(preset="md"))
    assert data.object_scale == 2.0 and cm.data_config() is cm.DATA
    # the same scenes at twice the resolution: box heights follow the class ranges doubled
    heights = torch.cat([b[:, 3] - b[:, 1] for b in cm.eval_set(data).boxes])
    default_heights = torch.cat([b[:, 3] - b[:, 1] for b in cm.eval_set().boxes])
    assert heights.min() >= 16 and heights.max() > 28 >= default_heights.max()
    # a model of that config trains one step and is evaluated on the 192x320 held-out set
    result = fxopt.models.train("camera_multitask", steps=1, progress=False, preset="md", widths=(8, 8, 8, 8, 8),
                                blocks=(1, 1, 1, 1), fpn_channels=8, head_channels=8)
    assert set(result.metrics) == {"seg_miou", "det_map50", "det_map75"} and result.model.config.height == 192
    assert 0.2 < result.chance["seg_miou"] < 0.5


def test_md_preset_estimate_is_compute_bound_enough_for_half_latency():
    """md is in the bench because slim can reach half its Xavier estimate (the default config
    cannot: its smallest candidate is 0.68x)."""
    from fxopt.passes.slim import latency_range

    torch.manual_seed(0)
    inputs = cm.example_inputs(preset="md")
    floor_s, base_s = latency_range(fxopt.trace(cm.build(preset="md"), inputs), inputs, "xavier", "int8")
    assert floor_s / base_s < 0.45
