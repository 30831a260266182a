"""From raw network outputs to :class:`Detections`: softmax, threshold, top-k, decode, NMS, rescale."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detector.box_coder import BoxCoder
from detector.boxes import batched_nms, clip_boxes_xyxy
from detector.detections import Detections

__all__ = ["PostprocessConfig", "postprocess"]


@dataclass(frozen=True)
class PostprocessConfig:
    """Attributes:
    score_threshold: minimum class probability kept.
    pre_nms_top_k: candidates per image entering NMS (bounds its ``k x k`` IoU matrix).
    nms_iou: IoU above which a lower-scoring box of the same class is suppressed (S3FD: 0.3).
    max_detections: boxes kept per image after NMS.
    """

    score_threshold: float = 0.5
    pre_nms_top_k: int = 1000
    nms_iou: float = 0.3
    max_detections: int = 750


@torch.no_grad()
def postprocess(
    cls_logits: Tensor,
    box_deltas: Tensor,
    anchors_cxcywh: Tensor,
    scales: list[tuple[float, float]],
    image_sizes: list[tuple[int, int]],
    class_names: tuple[str, ...],
    config: PostprocessConfig = PostprocessConfig(),
    box_coder: BoxCoder | None = None,
) -> list[Detections]:
    """Turns a batch of raw outputs into detections in original-image pixels.

    Args:
        cls_logits: ``(N, A, K)`` logits, class 0 background.
        box_deltas: ``(N, A, 4)`` encoded boxes.
        anchors_cxcywh: ``(A, 4)`` anchors in model-input pixels.
        scales: per image ``(sx, sy)`` from original to model-input pixels.
        image_sizes: per image original ``(width, height)``.
        class_names: foreground class names.
        config: thresholds.
        box_coder: decoding (default SSD variances).
    """
    box_coder = box_coder or BoxCoder()
    probs = cls_logits.float().softmax(dim=-1)[..., 1:]  # (N, A, K-1)
    num_fg = probs.shape[-1]
    out = []
    for i in range(probs.shape[0]):
        flat = probs[i].reshape(-1)  # anchor-major: index = a * num_fg + c
        cand = torch.nonzero(flat >= config.score_threshold).flatten()
        if cand.numel() > config.pre_nms_top_k:
            cand = cand[flat[cand].topk(config.pre_nms_top_k).indices]
        scores = flat[cand]
        anchor_idx = torch.div(cand, num_fg, rounding_mode="floor")
        labels = cand % num_fg + 1
        boxes = box_coder.decode(box_deltas[i, anchor_idx].float(), anchors_cxcywh[anchor_idx])
        keep = batched_nms(boxes, scores, labels, config.nms_iou)[: config.max_detections]
        sx, sy = scales[i]
        w, h = image_sizes[i]
        boxes = boxes[keep] / torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)
        boxes = clip_boxes_xyxy(boxes, w, h)
        out.append(Detections(boxes.cpu().numpy(), scores[keep].cpu().numpy(), labels[keep].cpu().numpy(),
                              tuple(class_names), (int(w), int(h))))
    return out
