"""Scene generator, pillar voxelisation, anchors and targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fxopt.models.lidar_data import (
    CLASS_SIZES,
    AnchorConfig,
    PillarConfig,
    SceneConfig,
    assign_targets,
    collate_pillars,
    decode_boxes,
    direction_bin,
    encode_boxes,
    generate_scene,
    make_anchors,
    make_batch,
    nearest_bev_iou,
    voxelize,
)
from fxopt.models.metrics import rotated_iou_bev

SMALL = PillarConfig((0.0, -20.48, -3.0, 40.96, 20.48, 1.0), (0.32, 0.32), 16, 4096)


def _points_in_box(points: np.ndarray, box: np.ndarray, pad: float = 0.1) -> np.ndarray:
    c, s = math.cos(box[6]), math.sin(box[6])
    d = points[:, :3] - box[:3]
    u, v = d[:, 0] * c + d[:, 1] * s, -d[:, 0] * s + d[:, 1] * c
    return (np.abs(u) <= box[3] / 2 + pad) & (np.abs(v) <= box[4] / 2 + pad) & (np.abs(d[:, 2]) <= box[5] / 2 + pad)


# ----------------------------------------------------------------------------- scenes


def test_scene_is_deterministic_by_seed():
    a, b, c = generate_scene(7), generate_scene(7), generate_scene(8)
    assert torch.equal(a.points, b.points) and torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.points[:100], c.points[:100]) or a.points.shape != c.points.shape
    assert a.points.dtype == torch.float32 and a.boxes.dtype == torch.float32 and a.labels.dtype == torch.int64
    assert a.points.shape[1] == 4 and a.boxes.shape[1] == 7 and a.boxes_with_class().shape[1] == 8


@pytest.mark.parametrize("config", [
    SceneConfig(),
    SMALL.scene_config(max_range=35.0),
    SceneConfig(point_cloud_range=(-30.0, -30.0, -3.0, 30.0, 30.0, 1.0), max_range=40.0),  # all around
])
def test_points_lie_in_range_and_boxes_do_not_overlap(config):
    x0, y0, z0, x1, y1, z1 = config.point_cloud_range
    for seed in range(6):
        scene = generate_scene(seed, config)
        p = scene.points.numpy()
        assert len(p) > 1000
        assert (p[:, 0] >= x0).all() and (p[:, 0] < x1).all() and (p[:, 1] >= y0).all() and (p[:, 1] < y1).all()
        assert (p[:, 2] >= z0).all() and (p[:, 2] < z1).all()
        assert (np.linalg.norm(p[:, :3], axis=1) <= config.max_range + 1e-3).all()
        assert (p[:, 3] >= 0).all() and (p[:, 3] <= 1).all()
        boxes = scene.boxes.numpy()
        iou = rotated_iou_bev(boxes, boxes)
        assert np.allclose(iou, np.eye(len(boxes)))  # pairwise disjoint
        # boxes stand on the ground, inside the range, with enough points on them
        assert np.allclose(boxes[:, 2] - boxes[:, 5] / 2, -config.sensor_height, atol=1e-5)
        assert (np.hypot(boxes[:, 0], boxes[:, 1]) <= config.max_range).all()
        for box in boxes:
            assert _points_in_box(p, box).sum() >= config.min_points


def test_scene_sizes_and_classes_are_realistic():
    boxes, labels = [], []
    for seed in range(20):
        s = generate_scene(seed)
        boxes.append(s.boxes.numpy())
        labels.append(s.labels.numpy())
    boxes, labels = np.concatenate(boxes), np.concatenate(labels)
    assert set(labels.tolist()) == {0, 1, 2}
    for c, (mean, _) in enumerate(CLASS_SIZES):
        got = boxes[labels == c, 3:6].mean(axis=0)
        np.testing.assert_allclose(got, mean, rtol=0.15)
    assert (boxes[:, 6] >= -math.pi).all() and (boxes[:, 6] < math.pi).all()
    assert np.ptp(boxes[:, 6]) > 3  # headings spread over the circle


def test_ground_plane_and_object_points():
    scene = generate_scene(1)
    p = scene.points.numpy()
    on_ground = np.abs(p[:, 2] + 1.73) < 0.1
    assert on_ground.mean() > 0.5
    # ground returns get sparser with range (rings spread out)
    r = np.hypot(p[on_ground, 0], p[on_ground, 1])
    assert (r < 20).sum() > (r > 40).sum()


# ----------------------------------------------------------------------------- voxelize

TINY = PillarConfig((0.0, 0.0, -1.0, 2.0, 2.0, 1.0), (1.0, 1.0), max_points_per_pillar=2, max_pillars=5)
TINY_POINTS = np.array([
    [0.5, 0.5, 0.0, 1.0],    # cell (0, 0)
    [0.7, 0.5, 0.2, 0.5],    # cell (0, 0)
    [0.2, 0.3, -0.2, 0.1],   # cell (0, 0): the third point, over the cap N = 2
    [1.5, 0.25, 0.0, 0.9],   # cell (1, 0)
    [0.5, 1.5, 0.4, 0.3],    # cell (0, 1)
    [3.0, 0.5, 0.0, 1.0],    # outside x
    [0.5, 0.5, 2.0, 1.0],    # outside z
], dtype=np.float32)


def test_voxelize_tiny_cloud_by_hand():
    p = voxelize(TINY_POINTS, TINY, seed=None)  # seed None: keep the first points
    assert p.features.shape == (5, 2, 9) and p.indices.shape == (5,)
    assert p.num_pillars == 3 and p.dropped_points == 3
    # grid 2 x 2: flat index iy * 2 + ix; padding slots point at spare rows 4 + slot
    assert p.indices.tolist() == [0, 1, 2, 4 + 3, 4 + 4]
    assert p.coords.tolist() == [[0, 0], [1, 0], [0, 1], [-1, -1], [-1, -1]]
    assert p.num_points.tolist() == [2, 1, 1, 0, 0]
    assert p.mask.tolist() == [[True, True], [True, False], [True, False], [False, False], [False, False]]
    f = p.features.numpy()
    # pillar 0: points (0.5, 0.5, 0) and (0.7, 0.5, 0.2); mean (0.6, 0.5, 0.1); centre (0.5, 0.5)
    np.testing.assert_allclose(f[0, 0], [0.5, 0.5, 0.0, 1.0, -0.1, 0.0, -0.1, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(f[0, 1], [0.7, 0.5, 0.2, 0.5, 0.1, 0.0, 0.1, 0.2, 0.0], atol=1e-6)
    # pillar 1: one point (1.5, 0.25, 0): its own mean; centre (1.5, 0.5)
    np.testing.assert_allclose(f[1, 0], [1.5, 0.25, 0.0, 0.9, 0, 0, 0, 0.0, -0.25], atol=1e-6)
    np.testing.assert_allclose(f[2, 0], [0.5, 1.5, 0.4, 0.3, 0, 0, 0, 0.0, 0.0], atol=1e-6)
    assert not f[~p.mask.numpy()].any()  # padding is zero


def test_voxelize_caps_pillars_and_points_with_a_seed():
    cfg = PillarConfig((0.0, 0.0, -1.0, 2.0, 2.0, 1.0), (1.0, 1.0), max_points_per_pillar=2, max_pillars=2)
    a = voxelize(torch.from_numpy(TINY_POINTS), cfg, seed=3)
    b = voxelize(TINY_POINTS, cfg, seed=3)
    assert torch.equal(a.features, b.features) and torch.equal(a.indices, b.indices)
    assert a.num_pillars == 2 and a.indices.tolist() == sorted(a.indices.tolist())
    assert set(a.indices.tolist()) <= {0, 1, 2}
    kept = a.features[a.mask][:, :4].numpy()
    assert all(any(np.allclose(k, q) for q in TINY_POINTS) for k in kept)  # a subset of the input


def test_voxelize_scene_fills_fixed_shapes():
    scene = generate_scene(0, SMALL.scene_config())
    p = voxelize(scene.points, SMALL)
    n = p.num_pillars
    assert p.features.shape == (4096, 16, 9) and 1000 < n <= 4096
    assert len(set(p.indices.tolist())) == 4096  # the scatter never writes one row twice
    assert (p.indices[:n] < SMALL.num_cells).all() and (p.indices[n:] >= SMALL.num_cells).all()
    assert (p.num_points[:n] >= 1).all() and (p.num_points <= 16).all()
    assert p.mask.sum() == p.num_points.sum() == len(scene.points) - p.dropped_points
    # the centre offsets stay within half a pillar
    centre = p.features[..., 7:9][p.mask]
    assert centre.abs().max() <= 0.16 + 1e-5
    features, indices = collate_pillars([p, p])
    assert features.shape == (2, 4096, 16, 9) and indices.shape == (2, 4096)


# ----------------------------------------------------------------------------- anchors and targets


def test_anchor_grid_and_box_coding():
    grid, classes = make_anchors(SMALL, AnchorConfig())
    assert grid.shape == (64, 64, 6, 7) and classes.tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_allclose(grid[0, 0, 0, :2].numpy(), [0.32, -20.48 + 0.32], atol=1e-5)
    np.testing.assert_allclose(grid[0, 0, :, 6].numpy(), [0, math.pi / 2] * 3, atol=1e-6)
    boxes = torch.tensor([[10.0, 2.0, -1.0, 4.2, 1.7, 1.5, 0.4], [5.0, -3.0, -0.9, 0.7, 0.5, 1.8, -2.0]])
    anchors = grid[10, 20, [0, 3]]
    np.testing.assert_allclose(decode_boxes(encode_boxes(boxes, anchors), anchors).numpy(), boxes.numpy(), atol=1e-5)
    # bin 0: headings in [pi/4, 5pi/4), bin 1 the other half-turn
    assert direction_bin(torch.tensor([0.0, 1.0, 3.0, -1.0, -3.0, -2.0, 0.7])).tolist() == [1, 0, 0, 1, 0, 1, 1]


def test_nearest_bev_iou():
    a = np.array([[0, 0, 0, 4, 2, 1, 0.0]])
    b = np.array([[0, 0, 0, 4, 2, 1, math.pi / 2], [1, 0, 0, 4, 2, 1, 0.1], [0, 0, 0, 2, 4, 1, math.pi / 2]])
    np.testing.assert_allclose(nearest_bev_iou(a, b), [[1 / 3, 0.6, 1.0]], atol=1e-9)


def test_assign_targets_marks_matching_anchor():
    cfg = AnchorConfig()
    grid, classes = make_anchors(SMALL, cfg)
    car = grid[30, 40, 1].clone()  # a car exactly on a car anchor (heading pi/2)
    ped = grid[10, 5, 2].clone() + torch.tensor([0.1, 0, 0, 0, 0, 0, 0.2])
    out = assign_targets(grid, classes, torch.stack([car, ped]), torch.tensor([0, 1]), cfg)
    k = (30 * 64 + 40) * 6 + 1
    assert out["labels"][k] == 1 and out["positive"][k]
    np.testing.assert_allclose(out["box_targets"][k].numpy(), 0, atol=1e-6)
    assert out["dir_targets"][k] == direction_bin(torch.tensor(math.pi / 2))
    kp = (10 * 64 + 5) * 6 + 2
    assert out["labels"][kp] == 2  # the pedestrian's best anchor, of its own class
    # no anchor of another class is positive, most are background, near ones may be ignored
    pos = out["positive"].nonzero().reshape(-1)
    assert set(classes[pos % 6].tolist()) <= {0, 1}
    assert (out["labels"] == 0).float().mean() > 0.99
    empty = assign_targets(grid, classes, torch.zeros(0, 7), torch.zeros(0, dtype=torch.long), cfg)
    assert not empty["positive"].any() and (empty["labels"] == 0).all()


def test_make_batch():
    scenes = [generate_scene(s, SMALL.scene_config()) for s in (0, 1)]
    (features, indices), targets = make_batch(scenes, SMALL, AnchorConfig())
    k = 64 * 64 * 6
    assert features.shape == (2, 4096, 16, 9) and indices.shape == (2, 4096)
    assert targets["labels"].shape == (2, k) and targets["box_targets"].shape == (2, k, 7)
    assert targets["anchors"].shape == (k, 7) and len(targets["gt_boxes"]) == 2
    for b, s in enumerate(scenes):
        matched = targets["labels"][b][targets["positive"][b]] - 1
        assert set(matched.tolist()) == set(s.labels.tolist())  # every class present gets anchors
