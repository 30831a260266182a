"""S3FD multibox loss: smooth-L1 box regression and cross-entropy with 3:1 hard-negative mining."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detector.box_coder import BoxCoder
from detector.boxes import cxcywh_to_xyxy
from detector.matching import NEGATIVE, MatcherConfig, match_anchors

__all__ = ["MultiBoxLoss", "assign_targets"]


def assign_targets(
    anchors_cxcywh: Tensor, targets: list[dict[str, Tensor]], matcher: MatcherConfig
) -> tuple[Tensor, Tensor]:
    """Matches every image's boxes to the anchors.

    Args:
        anchors_cxcywh: ``(A, 4)`` input pixels.
        targets: per image ``boxes_xyxy (G, 4)``, ``labels (G,)`` (1-based) and optionally ``ignore_xyxy (I, 4)``,
            in pixels of the model input.
        matcher: thresholds.

    Returns:
        ``labels (N, A)`` int64 (0 background, ``>0`` class, -1 ignored) and ``boxes (N, A, 4)`` xyxy: the matched
        box of each positive anchor (the anchor itself elsewhere, so that encoding stays finite).
    """
    anchors_xyxy = cxcywh_to_xyxy(anchors_cxcywh)
    all_labels, all_boxes = [], []
    for t in targets:
        boxes = t["boxes_xyxy"].to(anchors_xyxy)
        ignore = t.get("ignore_xyxy")
        matched = match_anchors(anchors_xyxy, boxes, None if ignore is None else ignore.to(anchors_xyxy), matcher)
        pos = matched >= 0
        labels = torch.zeros_like(matched)
        labels[matched < NEGATIVE] = -1
        labels[pos] = t["labels"].to(matched)[matched[pos]]
        box = anchors_xyxy.clone()
        box[pos] = boxes[matched[pos]]
        all_labels.append(labels)
        all_boxes.append(box)
    return torch.stack(all_labels), torch.stack(all_boxes)


@dataclass
class LossOutput:
    loss: Tensor
    loss_cls: Tensor
    loss_box: Tensor
    num_pos: int


class MultiBoxLoss(nn.Module):
    """S3FD/SSD multibox loss.

    * box: smooth-L1 on the encoded deltas of positive anchors;
    * class: cross-entropy on positives and on the hardest negatives, ``neg_pos_ratio`` per positive (and at least
      ``neg_pos_ratio`` per image, so that an image without faces still teaches background);
    * both summed and divided by ``max(1, number of positives in the batch)``. An image with no faces gives zero box
      loss.

    Args:
        box_coder: anchor encoding.
        matcher: matching thresholds.
        neg_pos_ratio: negatives kept per positive.
    """

    def __init__(
        self, box_coder: BoxCoder | None = None, matcher: MatcherConfig = MatcherConfig(), neg_pos_ratio: int = 3
    ) -> None:
        super().__init__()
        self.box_coder = box_coder or BoxCoder()
        self.matcher = matcher
        self.neg_pos_ratio = neg_pos_ratio

    def forward(
        self, cls_logits: Tensor, box_deltas: Tensor, anchors_cxcywh: Tensor, targets: list[dict[str, Tensor]]
    ) -> LossOutput:
        """Args: ``cls_logits (N, A, K)``, ``box_deltas (N, A, 4)``, ``anchors_cxcywh (A, 4)``, targets as in
        :func:`assign_targets`."""
        with torch.no_grad():
            labels, boxes = assign_targets(anchors_cxcywh, targets, self.matcher)
        pos = labels > 0
        num_pos = int(pos.sum())
        norm = max(1, num_pos)

        target_deltas = self.box_coder.encode(boxes[pos], anchors_cxcywh.expand_as(boxes)[pos])
        loss_box = F.smooth_l1_loss(box_deltas[pos].float(), target_deltas, reduction="sum") / norm

        ce = F.cross_entropy(cls_logits.float().flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none")
        ce = ce.view_as(labels)
        with torch.no_grad():
            mining = ce.masked_fill(labels != 0, -1.0)  # only negatives compete
            num_neg = (pos.sum(dim=1) * self.neg_pos_ratio).clamp(min=self.neg_pos_ratio)
            rank = mining.argsort(dim=1, descending=True).argsort(dim=1)
            neg = (rank < num_neg[:, None]) & (labels == 0)
        loss_cls = ce[pos | neg].sum() / norm
        return LossOutput(loss=loss_cls + loss_box, loss_cls=loss_cls, loss_box=loss_box, num_pos=num_pos)
