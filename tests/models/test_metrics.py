"""Metrics against hand-computed cases: rotated BEV IoU, detection AP, mIoU, accuracy, motion error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fxopt.models.metrics import (
    average_precision,
    bev_average_precision,
    bev_corners,
    cell_accuracy,
    motion_error,
    rotated_iou_bev,
    segmentation_miou,
)


def box(x, y, length, width, yaw=0.0, z=0.0, h=1.5):
    return [x, y, z, length, width, h, yaw]


# ----------------------------------------------------------------------------- rotated IoU


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (box(0, 0, 4, 2), box(0, 0, 4, 2), 1.0),  # identical
        (box(0, 0, 4, 2), box(1, 0, 4, 2), 6 / 10),  # shifted along x: 3x2 overlap, union 16-6
        (box(0, 0, 4, 2), box(0, 0, 4, 2, math.pi / 2), 4 / 12),  # crossed: 2x2 overlap
        (box(0, 0, 4, 2), box(0, 0, 4, 2, math.pi), 1.0),  # heading flipped: same rectangle
        (box(0, 0, 2, 2), box(0, 0, 2, 2, math.pi / 4), 1 / math.sqrt(2)),  # octagon 8(sqrt2-1)
        (box(0, 0, 4, 2), box(10, 0, 4, 2), 0.0),  # far apart
        (box(0, 0, 2, 2), box(2, 0, 2, 2), 0.0),  # touching edges
        (box(0, 0, 4, 4), box(0, 0, 2, 2, 0.3), 4 / 16),  # rotated box fully inside
        (box(0, 0, 2, 2), box(1, 1, 2, 2), 1 / 7),  # corner overlap 1x1, union 8-1
    ],
)
def test_rotated_iou_hand_cases(a, b, expected):
    iou = rotated_iou_bev(np.array([a]), np.array([b]))
    assert iou.shape == (1, 1)
    assert iou[0, 0] == pytest.approx(expected, abs=1e-9)
    assert rotated_iou_bev(np.array([b]), np.array([a]))[0, 0] == pytest.approx(expected, abs=1e-9)


def test_rotated_iou_matches_monte_carlo():
    rng = np.random.default_rng(0)
    a = np.column_stack([rng.uniform(-1, 1, 20), rng.uniform(-1, 1, 20), rng.uniform(1, 4, 20),
                         rng.uniform(0.5, 2, 20), rng.uniform(-np.pi, np.pi, 20)])
    b = np.column_stack([rng.uniform(-1, 1, 20), rng.uniform(-1, 1, 20), rng.uniform(1, 4, 20),
                         rng.uniform(0.5, 2, 20), rng.uniform(-np.pi, np.pi, 20)])
    iou = rotated_iou_bev(a, b)
    pts = rng.uniform(-4, 4, size=(200_000, 2))

    def inside(bx):
        c, s = np.cos(bx[4]), np.sin(bx[4])
        d = pts - bx[:2]
        u, v = d[:, 0] * c + d[:, 1] * s, -d[:, 0] * s + d[:, 1] * c
        return (np.abs(u) <= bx[2] / 2) & (np.abs(v) <= bx[3] / 2)

    for i in range(5):
        for j in range(5):
            ia, ib = inside(a[i]), inside(b[j])
            mc = (ia & ib).sum() / max((ia | ib).sum(), 1)
            assert iou[i, j] == pytest.approx(mc, abs=0.01)


def test_rotated_iou_shapes_inputs_and_corners():
    assert rotated_iou_bev(np.zeros((0, 7)), np.zeros((3, 7))).shape == (0, 3)
    t = torch.tensor([box(0, 0, 4, 2), box(1, 0, 4, 2)])
    iou = rotated_iou_bev(t, t)
    np.testing.assert_allclose(iou, [[1, 0.6], [0.6, 1]], atol=1e-9)
    corners = bev_corners(np.array([[1.0, 2.0, 4.0, 2.0, math.pi / 2]]))
    np.testing.assert_allclose(np.sort(corners[0], axis=0), [[0, 0], [0, 0], [2, 4], [2, 4]], atol=1e-9)


# ----------------------------------------------------------------------------- AP


def test_average_precision_hand_curve():
    # TP, FP, TP with 2 GT: precision 1, .5, .667 at recall .5, .5, 1 -> AP = .5*1 + .5*2/3
    assert average_precision([1, 0, 1], [0.9, 0.8, 0.7], 2) == pytest.approx(0.5 + 1 / 3)
    # same detections in a different input order: sorted by score
    assert average_precision([1, 1, 0], [0.7, 0.9, 0.8], 2) == pytest.approx(0.5 + 1 / 3)
    assert average_precision([1, 1], [0.9, 0.8], 4) == pytest.approx(0.5)  # half the objects found
    assert average_precision([], [], 3) == 0.0
    assert math.isnan(average_precision([0], [0.5], 0))


def test_bev_ap_matching_hand_case():
    gt = [np.array([box(0, 0, 4, 2), box(10, 0, 4, 2)])]
    preds = np.array([box(0.2, 0, 4, 2), box(0.1, 0, 4, 2), box(10, 0.1, 4, 2)])  # 2nd: duplicate
    r = bev_average_precision([preds], [np.array([0.9, 0.8, 0.7])], [np.array([0, 0, 0])], gt,
                              [np.array([0, 0])], num_classes=1)
    assert r["ap"][0] == pytest.approx(0.5 + 1 / 3)  # TP, FP (duplicate), TP
    assert r["num_gt"] == {0: 2} and r["num_pred"] == {0: 3}
    assert r["mAP"] == pytest.approx(r["ap"][0])


def test_bev_ap_uses_rotation_and_threshold():
    gt, labels = [np.array([box(0, 0, 4, 2)])], [np.array([0])]
    crossed = [np.array([box(0, 0, 4, 2, math.pi / 2)])]  # IoU 1/3
    args = (crossed, [np.array([0.9])], [np.array([0])], gt, labels, 1)
    assert bev_average_precision(*args)["ap"][0] == 0.0
    assert bev_average_precision(*args, iou_threshold=0.3)["ap"][0] == 1.0


def test_bev_ap_frames_classes_and_absent_class():
    gt_boxes = [np.array([box(0, 0, 4, 2)]), np.array([box(5, 5, 0.8, 0.6)])]
    gt_labels = [np.array([0]), np.array([1])]
    # frame 0: a car hit and a pedestrian prediction where frame 1's pedestrian is (wrong frame)
    # frame 1: the pedestrian found, labelled as class 1; a class-2 prediction with no class-2 GT
    pred_boxes = [np.array([box(0, 0, 4, 2), box(5, 5, 0.8, 0.6)]),
                  np.array([box(5, 5, 0.8, 0.6), box(20, 0, 1.7, 0.6)])]
    pred_scores = [np.array([0.8, 0.95]), np.array([0.6, 0.9])]
    pred_labels = [np.array([0, 1]), np.array([1, 2])]
    r = bev_average_precision(pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels, 3,
                              class_names=["car", "pedestrian", "cyclist"])
    assert r["ap"]["car"] == 1.0
    # pedestrian: FP (0.95, wrong frame) then TP (0.6): precision .5 at recall 1 -> AP .5
    assert r["ap"]["pedestrian"] == pytest.approx(0.5)
    assert math.isnan(r["ap"]["cyclist"])  # no ground truth: left out of the mean
    assert r["mAP"] == pytest.approx(0.75)
    assert r["num_gt"] == {"car": 1, "pedestrian": 1, "cyclist": 0}


def test_bev_ap_single_frame_arrays_and_no_predictions():
    gt = np.array([box(0, 0, 4, 2)])
    r = bev_average_precision(np.zeros((0, 7)), np.zeros(0), np.zeros(0, dtype=int), gt, np.array([0]), 1)
    assert r["ap"][0] == 0.0
    with pytest.raises(ValueError):
        bev_average_precision([np.zeros((0, 7))], [], [], [gt], [np.array([0])], 1)


# ----------------------------------------------------------------------------- dense metrics


def test_segmentation_miou_hand_case():
    pred = np.array([0, 0, 1, 1, 2])
    target = np.array([0, 1, 1, 1, 255])
    r = segmentation_miou(pred, target, num_classes=4, ignore_index=255)
    # class 0: TP 1, FP 1 -> 1/2; class 1: TP 2, FN 1 -> 2/3; classes 2 and 3 absent (the 2 is ignored)
    assert r["iou"] == pytest.approx({0: 0.5, 1: 2 / 3})
    assert r["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert r["per_class"][:2] == pytest.approx([0.5, 2 / 3])
    assert all(math.isnan(v) for v in r["per_class"][2:])


def test_segmentation_miou_counts_class_only_predicted():
    r = segmentation_miou(torch.tensor([[0, 2], [1, 1]]), torch.tensor([[0, 1], [1, 1]]), num_classes=3)
    assert r["iou"] == pytest.approx({0: 1.0, 1: 2 / 3, 2: 0.0})  # class 2 only predicted: IoU 0
    assert r["miou"] == pytest.approx(5 / 9)


def test_cell_accuracy():
    assert cell_accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5
    assert cell_accuracy(np.array([[1, 2], [3, 4]]), np.array([[1, 0], [3, 0]]), mask=[[1, 1], [0, 0]]) == 0.5
    assert cell_accuracy(torch.tensor([1, 1, 1]), torch.tensor([1, 1, 0]), torch.tensor([True, True, False])) == 1.0
    assert math.isnan(cell_accuracy([1], [1], mask=[False]))


def test_motion_error_overall_static_moving():
    pred = np.zeros((1, 2, 2, 2))  # (B, 2, H, W)
    target = np.zeros((1, 2, 2, 2))
    target[0, :, 0, 0] = [3.0, 4.0]  # error 5 at a moving cell
    pred[0, :, 1, 1] = [1.0, 0.0]  # error 1 at a static cell
    moving = np.array([[[True, False], [False, False]]])
    r = motion_error(pred, target, moving=moving, dim=1)
    assert r == pytest.approx({"mean": 6 / 4, "count": 4, "static": 1 / 3, "moving": 5.0})
    masked = motion_error(pred, target, mask=np.array([[[True, True], [False, False]]]), moving=moving, dim=1)
    assert masked == pytest.approx({"mean": 2.5, "count": 2, "static": 0.0, "moving": 5.0})
    last = motion_error(torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 0.0]]))
    assert last == {"mean": 2.0, "count": 1}
