"""Procedural camera scenes: determinism, masks agree with boxes, dense targets encode the boxes."""

from __future__ import annotations

import pytest
import torch

from fxopt.models.camera_data import (
    SEG_CLASSES,
    SEG_OFFSET,
    CameraDataConfig,
    encode_targets,
    generate_camera_batch,
)
from fxopt.models.camera_eval import image_box_ap
from fxopt.models.camera_multitask import decode_detections


@pytest.fixture(scope="module")
def batch():
    return generate_camera_batch(12, seed=3)


def test_same_seed_same_batch_other_seed_differs(batch):
    again = generate_camera_batch(12, seed=3)
    for name in ("images", "segmentation", "instances", "heatmap", "box_target", "box_mask"):
        assert torch.equal(getattr(batch, name), getattr(again, name)), name
    assert all(torch.equal(a, b) for a, b in zip(batch.boxes, again.boxes))
    other = generate_camera_batch(12, seed=4)
    assert not torch.equal(batch.images, other.images)
    # a generator is advanced: two draws from one generator differ
    generator = torch.Generator().manual_seed(3)
    first = generate_camera_batch(2, generator=generator)
    assert torch.equal(first.images, batch.images[:2])
    assert not torch.equal(generate_camera_batch(2, generator=generator).images, first.images)


def test_shapes_ranges_and_class_content(batch):
    assert batch.images.shape == (12, 3, 96, 160) and batch.images.dtype == torch.float32
    assert 0.0 <= float(batch.images.min()) and float(batch.images.max()) <= 1.0
    assert batch.segmentation.shape == (12, 96, 160)
    assert int(batch.segmentation.max()) < len(SEG_CLASSES)
    present = set(batch.segmentation.unique().tolist())
    assert present == set(range(len(SEG_CLASSES)))  # 12 scenes show every class
    counts = [len(b) for b in batch.boxes]
    assert min(counts) >= 1 and max(counts) <= CameraDataConfig().max_objects


def test_mask_agrees_with_boxes(batch):
    for b, (boxes, labels) in enumerate(zip(batch.boxes, batch.labels)):
        seg, inst = batch.segmentation[b], batch.instances[b]
        # every object-class pixel belongs to an object, and only those pixels do
        assert torch.equal(seg >= SEG_OFFSET, inst >= 0)
        for i, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
            ys, xs = torch.nonzero(inst == i, as_tuple=True)
            assert len(ys) > 0, f"object {i} of image {b} has no pixels"
            assert (seg[ys, xs] == label + SEG_OFFSET).all()
            tight = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            assert tight == pytest.approx(box, abs=1.0), (b, i, tight, box)
            x1, y1, x2, y2 = (int(v) for v in box)
            if label == 0:  # cars are filled rectangles: the box is all car
                assert (inst[y1:y2, x1:x2] == i).all()


def test_dense_targets_mark_each_box_centre(batch):
    s = CameraDataConfig().stride
    for b, (boxes, labels) in enumerate(zip(batch.boxes, batch.labels)):
        assert int(batch.box_mask[b].sum()) == len(boxes)
        assert int((batch.heatmap[b] == 1.0).sum()) == len(boxes)
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
            ix, iy = int((x1 + x2) / 2 / s), int((y1 + y2) / 2 / s)
            assert batch.heatmap[b, label, iy, ix] == 1.0 and batch.box_mask[b, iy, ix]
            ox, oy, lw, lh = batch.box_target[b, :, iy, ix].tolist()
            assert 0 <= ox < 1 and 0 <= oy < 1
            assert torch.exp(torch.tensor(lw)) * s == pytest.approx(x2 - x1, rel=1e-5)
    assert float(batch.heatmap.max()) == 1.0 and float(batch.heatmap.min()) >= 0.0


def test_targets_decode_back_to_the_boxes(batch):
    """Feeding the dense targets to the model's decoder recovers every box: AP 1 at IoU 0.95."""
    logits = torch.logit(batch.heatmap.clamp(1e-4, 1 - 1e-4))
    detections = decode_detections({"heatmap": logits, "box": batch.box_target}, score_threshold=0.99)
    for (boxes, _, labels), gt_boxes, gt_labels in zip(detections, batch.boxes, batch.labels):
        assert len(boxes) == len(gt_boxes) and sorted(labels.tolist()) == sorted(gt_labels.tolist())
    ap = image_box_ap(detections, batch.boxes, batch.labels, 3, iou_threshold=0.95)
    assert ap["map"] == pytest.approx(1.0)


def test_encode_targets_of_a_known_box():
    config = CameraDataConfig(height=32, width=32, stride=4)
    heatmap, box_target, mask = encode_targets(torch.tensor([[6.0, 10.0, 14.0, 26.0]]), torch.tensor([2]), config)
    # centre (10, 18) px -> cell (2.5, 4.5) -> cell x=2, y=4, offset (0.5, 0.5); size 8x16 px = 2x4 cells
    assert torch.nonzero(mask).tolist() == [[4, 2]]
    assert heatmap[2, 4, 2] == 1.0 and heatmap[:2].abs().sum() == 0
    assert box_target[:, 4, 2].tolist() == pytest.approx([0.5, 0.5, torch.log(torch.tensor(2.0)).item(), torch.log(torch.tensor(4.0)).item()])


def test_size_not_a_multiple_of_stride_is_refused():
    with pytest.raises(ValueError, match="multiple of stride"):
        generate_camera_batch(1, CameraDataConfig(height=90))
