"""Pure box math on torch tensors.

Formats are in the names:

* ``xyxy``: ``(x_min, y_min, x_max, y_max)``, continuous pixel coordinates (a box covering pixels 0..9 is
  ``(0, 0, 10, 10)``, area 100; no ``+1`` convention).
* ``cxcywh``: ``(center_x, center_y, width, height)`` in the same frame.

Every function takes boxes of shape ``(..., 4)`` (or ``(N, 4)`` where stated) and never changes device or dtype.
The ``*_np`` functions are the same operations on float32 numpy arrays, for inference post-processing (a handful of
boxes, where torch's per-call overhead dominates): every float operation is the same as in the torch version, so the
results are bit-identical.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "box_area",
    "box_iou",
    "box_iou_np",
    "batched_nms",
    "batched_nms_np",
    "clip_boxes_xyxy",
    "cxcywh_to_xyxy",
    "nms",
    "nms_np",
    "xyxy_to_cxcywh",
]


def xyxy_to_cxcywh(boxes_xyxy: Tensor) -> Tensor:
    """Corner boxes ``(..., 4)`` to centre/size boxes ``(..., 4)``."""
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def cxcywh_to_xyxy(boxes_cxcywh: Tensor) -> Tensor:
    """Centre/size boxes ``(..., 4)`` to corner boxes ``(..., 4)``."""
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_area(boxes_xyxy: Tensor) -> Tensor:
    """Areas ``(...,)`` of corner boxes ``(..., 4)``; inverted boxes count as 0."""
    wh = (boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """Pairwise intersection over union.

    Args:
        boxes1_xyxy: ``(N, 4)``.
        boxes2_xyxy: ``(M, 4)``.

    Returns:
        ``(N, M)`` IoU; 0 where the union is empty.
    """
    area1 = box_area(boxes1_xyxy)
    area2 = box_area(boxes2_xyxy)
    lt = torch.maximum(boxes1_xyxy[:, None, :2], boxes2_xyxy[None, :, :2])
    rb = torch.minimum(boxes1_xyxy[:, None, 2:], boxes2_xyxy[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def clip_boxes_xyxy(boxes_xyxy: Tensor, width: float, height: float) -> Tensor:
    """Clip corner boxes ``(..., 4)`` to the image ``[0, width] x [0, height]``."""
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    return torch.stack(
        (x0.clamp(0, width), y0.clamp(0, height), x1.clamp(0, width), y1.clamp(0, height)), dim=-1
    )


def box_iou_np(boxes1_xyxy: np.ndarray, boxes2_xyxy: np.ndarray) -> np.ndarray:
    """:func:`box_iou` on float32 numpy arrays ``(N, 4)``, ``(M, 4)`` -> ``(N, M)`` (bit-identical to it).

    Large inputs are done on coordinate columns, so that every ``(N, M)`` operation runs over contiguous rows (numpy
    is slow on a trailing axis of 2); small ones in fewer, broadcast operations.
    """
    wh1 = np.maximum(boxes1_xyxy[:, 2:] - boxes1_xyxy[:, :2], 0)
    wh2 = np.maximum(boxes2_xyxy[:, 2:] - boxes2_xyxy[:, :2], 0)
    area1 = wh1[:, 0] * wh1[:, 1]
    area2 = wh2[:, 0] * wh2[:, 1]
    if len(boxes1_xyxy) * len(boxes2_xyxy) <= 4096:
        wh = np.maximum(np.minimum(boxes1_xyxy[:, None, 2:], boxes2_xyxy[None, :, 2:])
                        - np.maximum(boxes1_xyxy[:, None, :2], boxes2_xyxy[None, :, :2]), 0)
        inter = wh[..., 0] * wh[..., 1]
    else:
        ax0, ay0, ax1, ay1 = (np.ascontiguousarray(c) for c in boxes1_xyxy.T)
        bx0, by0, bx1, by1 = (np.ascontiguousarray(c) for c in boxes2_xyxy.T)
        w = np.maximum(np.minimum(ax1[:, None], bx1[None, :]) - np.maximum(ax0[:, None], bx0[None, :]), 0)
        h = np.maximum(np.minimum(ay1[:, None], by1[None, :]) - np.maximum(ay0[:, None], by0[None, :]), 0)
        inter = w * h
    union = area1[:, None] + area2[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / np.maximum(union, np.finfo(inter.dtype).tiny)
    iou[~(union > 0)] = 0
    return iou


def _greedy_keep(overlaps: np.ndarray) -> list[int]:
    """Greedy suppression on boxes sorted by descending score: ``overlaps`` ``(N, N)`` bool, ``[i, j]`` = box ``j``
    overlaps box ``i`` above the threshold. Returns the kept positions, ascending."""
    suppressed = np.zeros(len(overlaps), dtype=bool)
    keep = []
    for i in range(len(overlaps)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return keep


def nms_np(boxes_xyxy: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """:func:`nms` on numpy arrays: float32 boxes ``(N, 4)`` and scores ``(N,)`` -> int64 kept indices ``(K,)``."""
    n = len(scores)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")  # descending; ties keep the lower index first
    if n == 1:
        return order.astype(np.int64)
    ordered = boxes_xyxy[order]
    return order[_greedy_keep(box_iou_np(ordered, ordered) > iou_threshold)].astype(np.int64)


def batched_nms_np(boxes_xyxy: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """:func:`batched_nms` on numpy arrays (float32 boxes and scores, integer labels); bit-identical to it."""
    if boxes_xyxy.size == 0:
        return np.zeros(0, dtype=np.int64)
    span = boxes_xyxy.max() - boxes_xyxy.min() + np.float32(1)
    shifted = boxes_xyxy + (labels.astype(boxes_xyxy.dtype) * span)[:, None]
    return nms_np(shifted, scores, iou_threshold)


def nms(boxes_xyxy: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression.

    Visits boxes by descending score (ties: lower index first) and drops every later box whose IoU with a kept box is
    strictly greater than ``iou_threshold``. The IoU matrix is built once (``N x N``), so callers cap ``N`` (top-k).

    Args:
        boxes_xyxy: ``(N, 4)``.
        scores: ``(N,)``.
        iou_threshold: suppression threshold.

    Returns:
        ``(K,)`` int64 indices into the input of the kept boxes, by descending score.
    """
    if boxes_xyxy.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes_xyxy.device)
    order = torch.argsort(scores, descending=True, stable=True)
    overlaps = box_iou(boxes_xyxy[order], boxes_xyxy[order]).cpu().numpy() > iou_threshold
    return order[torch.as_tensor(_greedy_keep(overlaps), dtype=torch.long, device=order.device)]


def batched_nms(boxes_xyxy: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Per-class NMS in one pass: boxes of different ``labels`` ``(N,)`` never suppress each other.

    Returns:
        ``(K,)`` kept indices by descending score.
    """
    if boxes_xyxy.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes_xyxy.device)
    # Shift each class to its own region so that boxes of different classes cannot overlap.
    span = boxes_xyxy.max() - boxes_xyxy.min() + 1
    shifted = boxes_xyxy + (labels.to(boxes_xyxy) * span)[:, None]
    return nms(shifted, scores, iou_threshold)
