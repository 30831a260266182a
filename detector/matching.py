"""S3FD two-stage anchor matching."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detector.boxes import box_area, box_iou

__all__ = ["IGNORE", "NEGATIVE", "MatcherConfig", "match_anchors"]

NEGATIVE = -1  #: anchor is background
IGNORE = -2  #: anchor is neither positive nor negative


@dataclass(frozen=True)
class MatcherConfig:
    """Thresholds of :func:`match_anchors`.

    Attributes:
        positive_iou: stage one: an anchor whose best IoU with a box is at least this is positive for that box.
        stage2_iou: stage two: boxes with fewer anchors than the stage-one average take their best anchors above this.
        ignore_ioa: a non-positive anchor covered by an ignore region for at least this fraction of its area is ignored.
    """

    positive_iou: float = 0.35
    stage2_iou: float = 0.1
    ignore_ioa: float = 0.5


def match_anchors(
    anchors_xyxy: Tensor,
    boxes_xyxy: Tensor,
    ignore_xyxy: Tensor | None = None,
    config: MatcherConfig = MatcherConfig(),
) -> Tensor:
    """Assigns each anchor a box index, :data:`NEGATIVE` or :data:`IGNORE` (S3FD, Zhang et al. 2017, Sec. 3.3).

    Stage one: every anchor with IoU >= ``positive_iou`` goes to its best box, and every box gets its single best
    anchor (so no box is left without one). Stage two: let ``N`` be the mean number of anchors per box after stage one;
    every box with fewer than ``N`` takes its highest-IoU still-negative anchors with IoU > ``stage2_iou`` until it has
    ``N`` (tiny and odd-sized faces get enough anchors); an anchor wanted by several boxes goes to the one it overlaps
    most.

    Args:
        anchors_xyxy: ``(A, 4)`` anchors.
        boxes_xyxy: ``(G, 4)`` boxes in the same frame (positive area).
        ignore_xyxy: ``(I, 4)`` ignore regions, or None.
        config: thresholds.

    Returns:
        ``(A,)`` int64: box index ``>= 0``, ``NEGATIVE`` or ``IGNORE``.
    """
    num_anchors = anchors_xyxy.shape[0]
    matched = torch.full((num_anchors,), NEGATIVE, dtype=torch.long, device=anchors_xyxy.device)
    if boxes_xyxy.shape[0] > 0:
        iou = box_iou(boxes_xyxy, anchors_xyxy)  # (G, A)
        best_iou, best_box = iou.max(dim=0)
        positive = best_iou >= config.positive_iou
        matched[positive] = best_box[positive]
        # Each box keeps its best anchor, even below the threshold.
        best_anchor = iou.argmax(dim=1)
        matched[best_anchor] = torch.arange(boxes_xyxy.shape[0], device=matched.device)

        counts = torch.bincount(matched[matched >= 0], minlength=boxes_xyxy.shape[0])
        need = (int(round(counts.float().mean().item())) - counts).clamp(min=0)
        if int(need.max()) > 0:
            k = min(int(need.max()), num_anchors)
            cand = iou.masked_fill(matched[None] >= 0, 0.0)
            vals, idx = cand.topk(k, dim=1)  # (G, k) best still-negative anchors per box
            take = (torch.arange(k, device=idx.device)[None] < need[:, None]) & (vals > config.stage2_iou)
            box_idx = torch.arange(boxes_xyxy.shape[0], device=idx.device)[:, None].expand(-1, k)[take]
            anchor_idx, v = idx[take], vals[take]
            # An anchor wanted by several boxes goes to the one it overlaps most.
            best = torch.zeros(num_anchors, dtype=v.dtype, device=v.device).scatter_reduce(
                0, anchor_idx, v, "amax", include_self=False)
            win = v >= best[anchor_idx]
            matched[anchor_idx[win]] = box_idx[win]

    if ignore_xyxy is not None and ignore_xyxy.shape[0] > 0:
        lt = torch.maximum(anchors_xyxy[:, None, :2], ignore_xyxy[None, :, :2])
        rb = torch.minimum(anchors_xyxy[:, None, 2:], ignore_xyxy[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=-1)
        ioa = (inter / box_area(anchors_xyxy).clamp(min=1e-6)[:, None]).amax(dim=1)
        matched[(matched == NEGATIVE) & (ioa >= config.ignore_ioa)] = IGNORE
    return matched
