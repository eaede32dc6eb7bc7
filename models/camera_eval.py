"""Detection AP for axis-aligned image boxes (greedy matching, all-point AP).

Example:
    >>> import torch
    >>> gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    >>> found = [(torch.tensor([[0.0, 0.0, 10.0, 9.0]]), torch.tensor([0.9]), torch.tensor([0]))]
    >>> image_box_ap(found, gt, [torch.tensor([0])], num_classes=1)["map"]
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fxopt.models.metrics import average_precision

__all__ = ["Detections", "box_iou", "image_box_ap"]

Detections = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # boxes (N,4), scores (N,), labels (N,)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) IoU of boxes ``(x1, y1, x2, y2)`` in `a` (N, 4) and `b` (M, 4)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def image_box_ap(
    detections: Sequence[Detections],
    gt_boxes: Sequence[torch.Tensor],
    gt_labels: Sequence[torch.Tensor],
    num_classes: int,
    iou_threshold: float = 0.5,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Per-class AP and their mean over images, greedy matching by descending score.

    Args:
        detections: per image, ``(boxes (N,4), scores (N,), labels (N,))``.
        gt_boxes: per image, (M, 4) ground-truth boxes.
        gt_labels: per image, (M,) ground-truth class ids.
        num_classes: classes ``0 .. num_classes-1``.
        iou_threshold: a detection is true when it overlaps an unmatched same-class box this much.
        class_names: names for the per-class keys (``ap/<name>``; class ids if omitted).

    Returns:
        ``{"map": mean over classes with ground truth, "ap/<class>": ...}`` (nan for a class with
        no ground-truth box).
    """
    if not len(detections) == len(gt_boxes) == len(gt_labels):
        raise ValueError(f"{len(detections)} detection lists for {len(gt_boxes)} images")
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    result: dict[str, float] = {}
    for c in range(num_classes):
        scores, hits, num_gt = [], [], 0
        for (boxes, score, label), gtb, gtl in zip(detections, gt_boxes, gt_labels):
            mine, truth = label == c, gtb[gtl == c]
            num_gt += len(truth)
            pb, ps = boxes[mine], score[mine]
            order = torch.argsort(ps, descending=True, stable=True)
            pb, ps = pb[order], ps[order]
            taken = torch.zeros(len(truth), dtype=torch.bool)
            ious = box_iou(pb, truth) if len(truth) else torch.zeros(len(pb), 0)
            hit = torch.zeros(len(pb), dtype=torch.bool)
            for i in range(len(pb)):
                candidates = ious[i].masked_fill(taken, -1.0)
                if candidates.numel() and float(candidates.max()) >= iou_threshold:
                    taken[int(candidates.argmax())] = True
                    hit[i] = True
            scores.append(ps)
            hits.append(hit)
        result[f"ap/{names[c]}"] = average_precision(torch.cat(hits), torch.cat(scores), num_gt)
    defined = [v for v in result.values() if v == v]
    result["map"] = sum(defined) / len(defined) if defined else float("nan")
    return {"map": result.pop("map"), **result}
