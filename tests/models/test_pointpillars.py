"""PointPillars: configs and shapes, tracing and ONNX lowering with ScatterND, decode, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from model_checks import training_losses

import fxopt
from fxopt.models import pointpillars as pp
from fxopt.models.lidar_data import generate_scene, make_anchors, make_batch


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return pp.build().eval(), pp.example_inputs()


def test_default_forward_shapes(small):
    model, (features, indices) = small
    assert features.shape == (1, 4096, 16, 9) and indices.shape == (1, 4096) and indices.dtype == torch.int64
    with torch.no_grad():
        cls, box, direction = model(features, indices)
    assert cls.shape == (1, 18, 64, 64) and box.shape == (1, 42, 64, 64) and direction.shape == (1, 12, 64, 64)
    batch = pp.example_inputs(batch_size=2, seed=5)
    with torch.no_grad():
        out = model(*batch)
    assert out[0].shape == (2, 18, 64, 64)
    # the frames of a batch do not mix: frame 1 alone gives the same result
    with torch.no_grad():
        single = model(batch[0][1:], batch[1][1:])
    torch.testing.assert_close(out[1][1:], single[1], atol=1e-5, rtol=1e-4)


def test_scatter_places_pillars_on_the_grid():
    scatter = pp.PillarScatter(nx=3, ny=2, max_pillars=3)
    feats = torch.tensor([[[1.0, 2.0, 9.0], [10.0, 20.0, 90.0]]])  # (B=1, C=2, P=3)
    indices = torch.tensor([[4, 0, 6 + 2]])  # cell (x=1, y=1), cell (0, 0), padding slot 2
    canvas = scatter(feats, indices)
    expected = torch.zeros(1, 2, 2, 3)
    expected[0, :, 1, 1] = torch.tensor([1.0, 10.0])
    expected[0, :, 0, 0] = torch.tensor([2.0, 20.0])
    torch.testing.assert_close(canvas, expected)


def test_kitti_preset_matches_the_published_config():
    cfg = pp.make_config("kitti")
    assert cfg.pillars.grid_size == (432, 496)
    assert cfg.pillars.voxel_size == (0.16, 0.16) and cfg.pillars.point_cloud_range[:2] == (0.0, -39.68)
    assert cfg.pillars.max_points_per_pillar == 32 and cfg.pillars.max_pillars == 12000
    assert cfg.pfn_channels == 64 and cfg.layer_nums == (3, 5, 5) and cfg.layer_strides == (2, 2, 2)
    assert cfg.num_filters == (64, 128, 256) and cfg.upsample_filters == (128, 128, 128)
    assert cfg.head_size == (248, 216) and cfg.anchors.num_anchors_per_location == 6
    torch.manual_seed(0)
    model = pp.build("kitti")
    n_params = sum(p.numel() for p in model.parameters())
    assert 4.5e6 < n_params < 5.0e6  # PointPillars on KITTI: about 4.8 M parameters
    assert model.pfn.linear.out_channels == 64 and model.backbone.out_channels == 384
    convs = [m for m in model.backbone.blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64] * 4 + [128] * 6 + [256] * 6
    assert [m.out_channels for m in (model.head.conv_cls, model.head.conv_box, model.head.conv_dir)] == [18, 42, 12]
    # shapes through the full-size graph, cheaply, on the meta device
    meta = model.to("meta")
    out = meta(torch.zeros(1, 12000, 32, 9, device="meta"), torch.zeros(1, 12000, dtype=torch.long, device="meta"))
    assert [tuple(o.shape) for o in out] == [(1, 18, 248, 216), (1, 42, 248, 216), (1, 12, 248, 216)]


def test_kitti_example_inputs_are_full_size_and_run():
    features, indices = pp.example_inputs("kitti")
    assert features.shape == (1, 12000, 32, 9) and indices.shape == (1, 12000)
    cells = 432 * 496
    real = indices[0] < cells
    assert real.sum() > 5000
    assert len(set(indices[0].tolist())) == 12000 and (indices[0] < cells + 12000).all()
    torch.manual_seed(0)
    model = pp.build("kitti").eval()
    with torch.no_grad():  # about 3 s on one core
        cls, box, direction = model(features, indices)
    assert cls.shape == (1, 18, 248, 216) and direction.shape == (1, 12, 248, 216)
    assert torch.isfinite(box).all()


@pytest.mark.slow
def test_kitti_compiles_for_xavier_with_scatternd():
    torch.manual_seed(0)
    compiled = fxopt.compile(pp.build("kitti"), "xavier", example_inputs=pp.example_inputs("kitti"))
    assert "ScatterND" in compiled.report.onnx["op_types"] and compiled.report.onnx["opset"] == 17


def test_config_overrides_and_errors():
    assert pp.make_config(max_pillars=1000, pfn_channels=8).pillars.max_pillars == 1000
    with pytest.raises(fxopt.InputError, match="preset"):
        pp.make_config("nuscenes")
    with pytest.raises(fxopt.InputError, match="option"):
        pp.make_config(bogus=1)
    with pytest.raises(fxopt.InputError, match="divisible"):
        pp.make_config(voxel_size=(0.3, 0.3))


def test_registered_with_the_registry():
    from fxopt.models.registry import _SPECS

    spec = _SPECS["pointpillars"]
    assert spec is pp.SPEC and spec.presets == ("md", "kitti") and spec.recipe is not None
    inputs = spec.inputs(batch_size=2)
    assert inputs[0].shape == (2, 4096, 16, 9)
    assert isinstance(spec.build(batch_size=2), pp.PointPillars)


def test_trace_and_compile_for_xavier_with_scatternd(small):
    model, inputs = small
    gm = fxopt.trace(model, inputs)
    assert not fxopt.frontend.tracing.leaves_of(gm)  # the whole network is traced, scatter included
    assert any(n.target == "index_put" for n in gm.graph.nodes)
    with torch.no_grad():
        for a, b in zip(gm(*inputs), model(*inputs)):
            torch.testing.assert_close(a, b)
    compiled = fxopt.compile(model, "xavier", example_inputs=inputs)
    onnx_info = compiled.report.onnx
    assert onnx_info["opset"] == 17
    assert "ScatterND" in onnx_info["op_types"]
    assert "ScatterND" in {n.op_type for n in compiled.onnx_model.graph.node}
    assert onnx_info["max_abs_error_vs_torch"] < 1e-3  # verified in ONNX Runtime
    statuses = {r.name: r.status for r in compiled.report.passes}
    assert statuses["fold_batchnorm"] == "applied"
    with torch.no_grad():
        for a, b in zip(compiled(*inputs), model(*inputs)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def _head_with(cfg, entries):
    """Head outputs of zeros (cls logits -10) with chosen anchors switched on."""
    h, w = cfg.head_size
    a, c = cfg.anchors.num_anchors_per_location, cfg.num_classes
    cls = torch.full((1, a, c, h, w), -10.0)
    box = torch.zeros(1, a, 7, h, w)
    direction = torch.zeros(1, a, 2, h, w)
    for (y, x, anchor, label, logit, dbin, deltas) in entries:
        cls[0, anchor, label, y, x] = logit
        direction[0, anchor, dbin, y, x] = 5.0
        box[0, anchor, :, y, x] = torch.tensor(deltas)
    return cls.reshape(1, a * c, h, w), box.reshape(1, a * 7, h, w), direction.reshape(1, a * 2, h, w)


def test_decode_boxes_scores_direction_and_nms():
    cfg = pp.make_config()
    grid, _ = make_anchors(cfg.pillars, cfg.anchors)
    zero = [0.0] * 7
    outputs = _head_with(cfg, [
        (10, 20, 0, 0, 3.0, 1, zero),                            # car anchor, heading 0 -> dir bin 1 keeps 0
        (10, 21, 0, 0, 2.0, 1, zero),                            # overlapping weaker duplicate: suppressed
        (40, 5, 3, 1, 1.0, 0, [0.1, 0, 0, 0, 0, 0, 0.2]),        # pedestrian anchor (pi/2), shifted
        (50, 50, 5, 2, -5.0, 0, zero),                           # below the score threshold
    ])
    (det,) = pp.decode(outputs, cfg)
    assert det["labels"].tolist() == [0, 1]
    np.testing.assert_allclose(det["scores"].numpy(), [1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-1))], rtol=1e-5)
    np.testing.assert_allclose(det["boxes"][0].numpy(), grid[10, 20, 0].numpy(), atol=1e-5)
    ped = grid[40, 5, 3]
    diag = math.hypot(ped[3], ped[4])
    np.testing.assert_allclose(det["boxes"][1, :2].numpy(), [ped[0] + 0.1 * diag, ped[1]], atol=1e-5)
    assert det["boxes"][1, 6].item() == pytest.approx(math.pi / 2 + 0.2, abs=1e-5)
    # the direction bin flips the heading by a half-turn
    flipped = _head_with(cfg, [(10, 20, 0, 0, 3.0, 0, zero)])
    assert pp.decode(flipped, cfg)[0]["boxes"][0, 6].item() == pytest.approx(-math.pi, abs=1e-5)
    assert all(len(d["boxes"]) == 0 for d in pp.decode(_head_with(cfg, []), cfg))


def test_nms_bev():
    boxes = np.array([[0, 0, 0, 4, 2, 1.5, 0], [0.2, 0, 0, 4, 2, 1.5, 0.05], [10, 0, 0, 4, 2, 1.5, 0]])
    assert pp.nms_bev(boxes, [0.5, 0.9, 0.4], 0.1).tolist() == [1, 2]
    assert pp.nms_bev(np.zeros((0, 7)), [], 0.1).tolist() == []


def test_recipe_batch_and_loss():
    generator = torch.Generator().manual_seed(0)
    inputs, targets = pp.RECIPE.batch(0, generator)
    again = pp.RECIPE.batch(0, torch.Generator().manual_seed(0))
    assert torch.equal(inputs[0], again[0][0])  # the data stream is seeded
    assert inputs[0].shape == (pp.TRAIN_BATCH, 4096, 16, 9)
    assert targets["positive"].any(dim=1).all()
    torch.manual_seed(0)
    loss = pp.RECIPE.loss(pp.build()(*inputs), targets)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_md_preset_is_the_kitti_backbone_on_the_default_grid_and_scenes():
    md, default, kitti = pp.make_config("md"), pp.make_config(), pp.make_config("kitti")
    assert md.pillars == default.pillars and md.anchors == default.anchors
    assert (md.pfn_channels, md.layer_nums, md.num_filters, md.upsample_filters) == (
        kitti.pfn_channels, kitti.layer_nums, kitti.num_filters, kitti.upsample_filters)
    # the default's scenes and targets, and a BatchNorm re-estimation after training
    md_recipe = fxopt.models.recipe("pointpillars", preset="md")
    assert md_recipe.bn_batches > 0 and md_recipe.lr == pp.RECIPE.lr and md_recipe.steps == pp.RECIPE.steps
    torch.testing.assert_close(md_recipe.batch(0, torch.Generator().manual_seed(0))[0][0],
                               pp.RECIPE.batch(0, torch.Generator().manual_seed(0))[0][0])
    assert pp.example_inputs("md")[0].shape == pp.example_inputs()[0].shape
    torch.manual_seed(0)
    assert 4.5e6 < sum(p.numel() for p in pp.build("md").parameters()) < 5e6


def test_recipe_of_another_grid_trains_and_evaluates_that_grid():
    # a 64 x 64 grid of 0.64 m pillars: head 32 x 32, so the default's anchors do not fit it
    cfg = dict(voxel_size=(0.64, 0.64), max_pillars=1024, pfn_channels=8, layer_nums=(1, 1, 1), num_filters=(8, 8, 8),
               upsample_filters=(8, 8, 8))
    recipe = fxopt.models.recipe("pointpillars", **cfg)
    assert recipe is not pp.RECIPE and pp.recipe() is pp.RECIPE
    inputs, targets = recipe.batch(0, torch.Generator().manual_seed(0))
    assert inputs[0].shape == (pp.TRAIN_BATCH, 1024, 16, 9)
    torch.manual_seed(0)
    model = pp.build(**cfg)
    outputs = model(*inputs)
    assert outputs[0].shape[-2:] == (32, 32)
    assert torch.isfinite(recipe.loss(outputs, targets))
    # a traced graph has no .config: the recipe's evaluation still decodes on the config's anchors
    gm = fxopt.trace(model.eval(), pp.example_inputs(**cfg))
    assert not hasattr(gm, "config")
    metrics = recipe.evaluate(gm, frames=2)
    with pytest.raises(IndexError):  # the default recipe voxelizes on its 128 x 128 grid
        pp.RECIPE.evaluate(gm, frames=2)
    assert list(metrics) == ["mAP", "car_ap", "pedestrian_ap", "cyclist_ap"]  # mAP first: what fine-tuning keeps
    assert set(recipe.chance()) == set(metrics)


def test_training_smoke_loss_decreases():
    cfg = pp.make_config()
    scene = generate_scene(3, cfg.pillars.scene_config())
    inputs, targets = make_batch([scene], cfg.pillars, cfg.anchors)
    torch.manual_seed(0)
    model = pp.build()
    losses = training_losses(model, lambda out: pp.detection_loss(out, targets, cfg), inputs, pp.RECIPE.lr, steps=8)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_evaluate_and_chance_are_computed():
    rand = pp.random_box_ap(frames=4)
    assert set(rand) == {"car_ap", "pedestrian_ap", "cyclist_ap", "mAP"}
    assert 0 <= rand["car_ap"] < 0.2
    torch.manual_seed(0)
    metrics = pp.evaluate(pp.build(), frames=4)
    assert set(metrics) == set(rand) and all(0 <= v <= 1 for v in metrics.values() if not math.isnan(v))


@pytest.mark.slow
def test_training_beats_chance():
    result = fxopt.models.train("pointpillars", progress=False)
    chance = result.chance
    assert result.metrics["car_ap"] > max(0.3, chance["car_ap"] + 0.2)
    assert result.metrics["mAP"] > chance["mAP"]
