"""Evaluation metrics for the reference perception models.

All functions accept numpy arrays or torch tensors (converted to numpy) and return plain Python
floats, so their results can go straight into reports and JSON.

- `bev_average_precision`: 3D-detection AP in bird's-eye view (rotated-box IoU), per class and mAP.
- `rotated_iou_bev`: the pairwise rotated-rectangle BEV IoU it is built on (vectorised numpy).
- `segmentation_miou`: per-class IoU and mean IoU of label maps.
- `cell_accuracy`: fraction of (masked) cells whose label is right.
- `motion_error`: mean L2 displacement error, overall and for static / moving cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "average_precision",
    "bev_average_precision",
    "bev_corners",
    "cell_accuracy",
    "motion_error",
    "rotated_iou_bev",
    "segmentation_miou",
]


def _np(x: Any, dtype: Any = None) -> np.ndarray:
    """numpy view of a tensor / array / sequence (detached, on CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


# ----------------------------------------------------------------------------- rotated BEV IoU


def _bev(boxes: Any) -> np.ndarray:
    """(M, 5) x, y, length, width, yaw from (M, 7+) 3D boxes or (M, 5) BEV boxes."""
    b = _np(boxes, np.float64)
    if b.size == 0:
        return np.zeros((0, 5))
    b = b.reshape(-1, b.shape[-1])
    if b.shape[1] == 5:
        return b
    if b.shape[1] >= 7:
        return b[:, [0, 1, 3, 4, 6]]
    raise ValueError(f"boxes need 5 (x, y, l, w, yaw) or 7+ (x, y, z, l, w, h, yaw) columns, got {b.shape[1]}")


def bev_corners(boxes: Any) -> np.ndarray:
    """Corners (M, 4, 2) of BEV boxes, counter-clockwise.

    Args:
        boxes: (M, 7+) ``x, y, z, l, w, h, yaw`` boxes or (M, 5) ``x, y, l, w, yaw``; the length
            runs along the heading ``yaw`` (radians, counter-clockwise from +x).
    """
    b = _bev(boxes)
    x, y, length, width, yaw = b.T
    local = np.array([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]])  # CCW
    dx = local[None, :, 0] * length[:, None]
    dy = local[None, :, 1] * width[:, None]
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    return np.stack([x[:, None] + c * dx - s * dy, y[:, None] + s * dx + c * dy], axis=-1)


def _cross2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _inside(points: np.ndarray, poly: np.ndarray, eps: float) -> np.ndarray:
    """points (..., K, 2) inside the CCW convex quadrilateral poly (..., 4, 2) -> (..., K)."""
    edges = np.roll(poly, -1, axis=-2) - poly  # (..., 4, 2)
    rel = points[..., :, None, :] - poly[..., None, :, :]  # (..., K, 4, 2)
    return np.all(_cross2(edges[..., None, :, :], rel) >= -eps, axis=-1)


def _intersection_area(ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Areas of the intersections of CCW convex quadrilaterals ca[i] and cb[i] (both (P, 4, 2)).

    The intersection of two convex polygons is the convex hull of the vertices of each that lie
    inside the other and of the crossing points of their edges. All 4 + 4 + 16 candidates are
    computed at once with a validity mask, sorted by angle around their mean and summed with the
    shoelace formula (invalid slots repeat the first valid point, which adds zero area).
    """
    n = ca.shape[0]
    if n == 0:
        return np.zeros(0)
    scale = max(float(np.abs(ca).max()), float(np.abs(cb).max()), 1.0)
    eps = 1e-9 * scale * scale
    a_in_b = _inside(ca, cb, eps)  # (P, 4)
    b_in_a = _inside(cb, ca, eps)
    # edge-edge crossings: a edge i (p + t r), b edge j (q + u s)
    p, r = ca[:, :, None, :], (np.roll(ca, -1, axis=1) - ca)[:, :, None, :]
    q, s = cb[:, None, :, :], (np.roll(cb, -1, axis=1) - cb)[:, None, :, :]
    denom = _cross2(r, s)  # (P, 4, 4)
    parallel = np.abs(denom) < 1e-12 * scale * scale
    safe = np.where(parallel, 1.0, denom)
    t = _cross2(q - p, s) / safe
    u = _cross2(q - p, r) / safe
    tol = 1e-9
    cross_ok = ~parallel & (t >= -tol) & (t <= 1 + tol) & (u >= -tol) & (u <= 1 + tol)
    cross_pts = (p + t[..., None] * r).reshape(n, 16, 2)
    pts = np.concatenate([ca, cb, cross_pts], axis=1)  # (P, 24, 2)
    valid = np.concatenate([a_in_b, b_in_a, cross_ok.reshape(n, 16)], axis=1)
    count = valid.sum(axis=1)
    centre = (pts * valid[..., None]).sum(axis=1) / np.maximum(count, 1)[:, None]
    angle = np.arctan2(pts[..., 1] - centre[:, None, 1], pts[..., 0] - centre[:, None, 0])
    angle = np.where(valid, angle, np.inf)
    order = np.argsort(angle, axis=1, kind="stable")
    pts = np.take_along_axis(pts, order[..., None], axis=1)
    valid = np.take_along_axis(valid, order, axis=1)
    pts = np.where(valid[..., None], pts, pts[:, :1, :])
    area = 0.5 * _cross2(pts, np.roll(pts, -1, axis=1)).sum(axis=1)
    return np.where(count >= 3, np.abs(area), 0.0)


def rotated_iou_bev(boxes_a: Any, boxes_b: Any) -> np.ndarray:
    """Pairwise bird's-eye-view IoU of rotated boxes, (M, K) float64, vectorised.

    Args:
        boxes_a: (M, 7+) ``x, y, z, l, w, h, yaw`` or (M, 5) ``x, y, l, w, yaw`` boxes.
        boxes_b: (K, 7+) or (K, 5) boxes.

    The rotated rectangles are intersected exactly (convex polygon clipping, see
    `_intersection_area`); pairs whose circumscribed circles do not touch are skipped.

    Example:
        >>> import numpy as np
        >>> square = np.array([[0.0, 0.0, 2.0, 2.0, 0.0]])
        >>> diamond = np.array([[0.0, 0.0, 2.0, 2.0, np.pi / 4]])
        >>> round(float(rotated_iou_bev(square, diamond)[0, 0]), 4)  # octagon 8(sqrt2-1) / (8 - it)
        0.7071
    """
    a, b = _bev(boxes_a), _bev(boxes_b)
    iou = np.zeros((len(a), len(b)))
    if len(a) == 0 or len(b) == 0:
        return iou
    ra = 0.5 * np.hypot(a[:, 2], a[:, 3])
    rb = 0.5 * np.hypot(b[:, 2], b[:, 3])
    dist = np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])
    ia, ib = np.nonzero(dist < ra[:, None] + rb[None, :])
    if len(ia) == 0:
        return iou
    ca, cb = bev_corners(a), bev_corners(b)
    inter = _intersection_area(ca[ia], cb[ib])
    area_a, area_b = a[:, 2] * a[:, 3], b[:, 2] * b[:, 3]
    union = area_a[ia] + area_b[ib] - inter
    iou[ia, ib] = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    return np.clip(iou, 0.0, 1.0)


# ----------------------------------------------------------------------------- detection AP


def average_precision(tp: Any, scores: Any, num_gt: int) -> float:
    """All-point interpolated AP (area under the monotone precision envelope, VOC 2010+).

    Args:
        tp: (D,) 1 for a true positive detection, 0 for a false positive.
        scores: (D,) detection scores (sorted here, descending, ties keep input order).
        num_gt: number of ground-truth objects; 0 gives NaN.
    """
    if num_gt <= 0:
        return float("nan")
    tp_arr, sc = _np(tp, np.float64).reshape(-1), _np(scores, np.float64).reshape(-1)
    if tp_arr.size == 0:
        return 0.0
    order = np.argsort(-sc, kind="stable")
    tp_cum = np.cumsum(tp_arr[order])
    fp_cum = np.cumsum(1.0 - tp_arr[order])
    recall = tp_cum / num_gt
    precision = tp_cum / np.maximum(tp_cum + fp_cum, 1e-12)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _frames(x: Any) -> list[Any]:
    """A list of per-frame arrays from a list/tuple, or one frame given as a single array."""
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def bev_average_precision(
    pred_boxes: Sequence[Any] | Any,
    pred_scores: Sequence[Any] | Any,
    pred_labels: Sequence[Any] | Any,
    gt_boxes: Sequence[Any] | Any,
    gt_labels: Sequence[Any] | Any,
    num_classes: int,
    iou_threshold: float = 0.5,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Bird's-eye-view detection average precision per class and its mean, over frames.

    Each argument is a list with one entry per frame (a single array is taken as one frame).
    Boxes are ``(M, 7)`` ``x, y, z, l, w, h, yaw`` (or ``(M, 5)`` BEV ``x, y, l, w, yaw``);
    labels are integer class indices in ``[0, num_classes)``.

    Matching, per class over all frames: detections are taken in descending score order; each
    is a true positive when its best rotated BEV IoU (`rotated_iou_bev`) with a not yet matched
    ground-truth box of its class in its frame is ``>= iou_threshold`` (that box is then
    matched), otherwise a false positive. AP is the all-point interpolated area under the
    precision/recall curve (`average_precision`).

    Returns:
        ``{"ap": {class: AP}, "mAP": float, "num_gt": {class: int}, "num_pred": {class: int}}``;
        classes are keyed by name when ``class_names`` is given, else by index. A class with no
        ground truth has AP NaN and is left out of mAP (mAP is NaN if no class has any).

    Example:
        >>> import numpy as np
        >>> gt = [np.array([[0, 0, 0, 4, 2, 1.5, 0.0]])]
        >>> pred = [np.array([[0.1, 0, 0, 4, 2, 1.5, 0.0], [9, 9, 0, 4, 2, 1.5, 0.0]])]
        >>> r = bev_average_precision(pred, [np.array([0.9, 0.8])], [np.array([0, 0])], gt, [np.array([0])], 1)
        >>> r["ap"][0], r["mAP"]
        (1.0, 1.0)
    """
    pb, ps, pl = _frames(pred_boxes), _frames(pred_scores), _frames(pred_labels)
    gb, gl = _frames(gt_boxes), _frames(gt_labels)
    if not (len(pb) == len(ps) == len(pl) == len(gb) == len(gl)):
        raise ValueError("pred_boxes, pred_scores, pred_labels, gt_boxes and gt_labels need one entry per frame")
    names = list(class_names) if class_names is not None else list(range(num_classes))
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for {num_classes} classes")
    tps: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    scs: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    num_gt = np.zeros(num_classes, dtype=np.int64)
    for boxes_p, scores_p, labels_p, boxes_g, labels_g in zip(pb, ps, pl, gb, gl):
        boxes_p, boxes_g = _bev(boxes_p), _bev(boxes_g)
        scores_p = _np(scores_p, np.float64).reshape(-1)
        labels_p = _np(labels_p, np.int64).reshape(-1)
        labels_g = _np(labels_g, np.int64).reshape(-1)
        for c in range(num_classes):
            gmask, pmask = labels_g == c, labels_p == c
            num_gt[c] += int(gmask.sum())
            if not pmask.any():
                continue
            sc = scores_p[pmask]
            order = np.argsort(-sc, kind="stable")
            sc = sc[order]
            iou = rotated_iou_bev(boxes_p[pmask][order], boxes_g[gmask])
            tp = np.zeros(len(sc))
            matched = np.zeros(iou.shape[1], dtype=bool)
            for i in range(len(sc)):  # greedy matching in score order (few detections per frame)
                if iou.shape[1] == 0:
                    break
                cand = np.where(matched, -1.0, iou[i])
                j = int(np.argmax(cand))
                if cand[j] >= iou_threshold:
                    matched[j] = True
                    tp[i] = 1.0
            tps[c].append(tp)
            scs[c].append(sc)
    ap: dict[Any, float] = {}
    num_pred: dict[Any, int] = {}
    for c in range(num_classes):
        tp = np.concatenate(tps[c]) if tps[c] else np.zeros(0)
        sc = np.concatenate(scs[c]) if scs[c] else np.zeros(0)
        ap[names[c]] = average_precision(tp, sc, int(num_gt[c]))
        num_pred[names[c]] = int(len(tp))
    valid = [v for v in ap.values() if not np.isnan(v)]
    return {
        "ap": ap,
        "mAP": float(np.mean(valid)) if valid else float("nan"),
        "num_gt": {names[c]: int(num_gt[c]) for c in range(num_classes)},
        "num_pred": num_pred,
    }


# ----------------------------------------------------------------------------- dense metrics


def segmentation_miou(
    pred: Any, target: Any, num_classes: int, ignore_index: int | None = None
) -> dict[str, Any]:
    """Per-class intersection-over-union and its mean for integer label maps.

    Args:
        pred: predicted labels, any shape (integers in ``[0, num_classes)``).
        target: ground-truth labels, same shape; cells equal to ``ignore_index`` are skipped.
        num_classes: number of classes.
        ignore_index: a target label to leave out (e.g. 255), or None.

    Returns:
        ``{"iou": {class: IoU}, "miou": float, "per_class": [IoU or NaN] * num_classes}``.
        ``IoU_c = TP / (TP + FP + FN)``; a class absent from both prediction and target
        (``TP + FP + FN == 0``) is left out of ``iou`` and of the mean (NaN in ``per_class``).
        Predictions outside ``[0, num_classes)`` count as wrong for the true class.

    Example:
        >>> r = segmentation_miou([0, 0, 1, 1], [0, 1, 1, 1], num_classes=3)
        >>> {c: round(v, 4) for c, v in r["iou"].items()}, round(r["miou"], 4)
        ({0: 0.5, 1: 0.6667}, 0.5833)
    """
    p = _np(pred).reshape(-1).astype(np.int64)
    t = _np(target).reshape(-1).astype(np.int64)
    if p.shape != t.shape:
        raise ValueError(f"pred and target sizes differ: {p.shape} vs {t.shape}")
    keep = np.ones_like(t, dtype=bool) if ignore_index is None else t != ignore_index
    keep &= (t >= 0) & (t < num_classes)
    p, t = p[keep], t[keep]
    valid_p = (p >= 0) & (p < num_classes)
    conf = np.bincount(t[valid_p] * num_classes + p[valid_p], minlength=num_classes**2)
    conf = conf.reshape(num_classes, num_classes)  # rows: target, cols: prediction
    tp = np.diag(conf).astype(np.float64)
    fn = np.bincount(t, minlength=num_classes)[:num_classes] - tp  # includes invalid predictions
    fp = conf.sum(axis=0) - tp
    denom = tp + fp + fn
    per_class = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
    iou = {c: float(per_class[c]) for c in range(num_classes) if denom[c] > 0}
    present = per_class[denom > 0]
    return {
        "iou": iou,
        "miou": float(present.mean()) if present.size else float("nan"),
        "per_class": [float(v) for v in per_class],
    }


def cell_accuracy(pred_labels: Any, target_labels: Any, mask: Any = None) -> float:
    """Fraction of cells whose predicted label equals the target (within ``mask`` if given).

    Args:
        pred_labels: integer labels, any shape.
        target_labels: same shape.
        mask: optional boolean array of the same shape; only True cells count.

    Returns:
        The accuracy in [0, 1]; NaN when no cell is counted.

    Example:
        >>> cell_accuracy([1, 2, 3, 4], [1, 2, 0, 0]), cell_accuracy([1, 2, 3, 4], [1, 2, 0, 0], [1, 0, 1, 0])
        (0.5, 0.5)
    """
    p, t = _np(pred_labels), _np(target_labels)
    if p.shape != t.shape:
        raise ValueError(f"pred_labels and target_labels shapes differ: {p.shape} vs {t.shape}")
    correct = p == t
    if mask is not None:
        m = _np(mask).astype(bool)
        if m.shape != p.shape:
            raise ValueError(f"mask shape {m.shape} differs from labels {p.shape}")
        correct = correct[m]
    return float(correct.mean()) if correct.size else float("nan")


def motion_error(
    pred_disp: Any, target_disp: Any, mask: Any = None, moving: Any = None, *, dim: int = -1
) -> dict[str, float]:
    """Mean L2 displacement error, overall and for static / moving cells.

    Args:
        pred_disp: predicted displacements; the vector components (e.g. dx, dy) lie along
            ``dim`` (default last, e.g. ``(..., 2)``; use ``dim=1`` for ``(B, 2, H, W)`` maps).
        target_disp: true displacements, same shape.
        mask: optional boolean array of the shape without ``dim``: only True cells count
            (e.g. occupied / foreground cells).
        moving: optional boolean array of the same shape as ``mask``: which cells truly move.

    Returns:
        ``{"mean": ...}`` plus ``"static"`` and ``"moving"`` when ``moving`` is given; each the
        mean L2 norm of ``pred - target`` over the counted cells (NaN when there are none),
        and ``"count"``, the number of counted cells.

    Example:
        >>> import numpy as np
        >>> pred = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
        >>> true = np.zeros((3, 2))
        >>> motion_error(pred, true, moving=np.array([True, False, False]))
        {'mean': 2.0, 'count': 3, 'static': 0.5, 'moving': 5.0}
    """
    p, t = _np(pred_disp, np.float64), _np(target_disp, np.float64)
    if p.shape != t.shape:
        raise ValueError(f"pred_disp and target_disp shapes differ: {p.shape} vs {t.shape}")
    err = np.linalg.norm(p - t, axis=dim)
    keep = np.ones(err.shape, dtype=bool)
    if mask is not None:
        keep = np.broadcast_to(_np(mask).astype(bool), err.shape)

    def _mean(sel: np.ndarray) -> float:
        vals = err[sel]
        return float(vals.mean()) if vals.size else float("nan")

    out: dict[str, float] = {"mean": _mean(keep), "count": int(keep.sum())}
    if moving is not None:
        mov = np.broadcast_to(_np(moving).astype(bool), err.shape)
        out["static"] = _mean(keep & ~mov)
        out["moving"] = _mean(keep & mov)
    return out
