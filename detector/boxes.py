"""Pure box math on torch tensors.

Formats are in the names:

* ``xyxy``: ``(x_min, y_min, x_max, y_max)``, continuous pixel coordinates (a box covering pixels 0..9 is
  ``(0, 0, 10, 10)``, area 100; no ``+1`` convention).
* ``cxcywh``: ``(center_x, center_y, width, height)`` in the same frame.

Every function takes boxes of shape ``(..., 4)`` (or ``(N, 4)`` where stated) and never changes device or dtype.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "box_area",
    "box_iou",
    "batched_nms",
    "clip_boxes_xyxy",
    "cxcywh_to_xyxy",
    "nms",
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
    iou = box_iou(boxes_xyxy[order], boxes_xyxy[order]).cpu().numpy() > iou_threshold
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


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
