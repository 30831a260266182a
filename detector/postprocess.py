"""From raw network outputs to :class:`Detections`: softmax, threshold, top-k, decode, NMS, rescale.

A frame has thousands of anchors but only a handful of boxes above the threshold, so the work is done with numpy on
the candidates only: a cheap necessary condition on the logits (:func:`candidate_anchors`) picks the few anchors that
can pass, and only those are scored (softmax), thresholded, decoded and suppressed. No torch kernel runs here except
``exp`` in decoding (and ``topk`` past ``pre_nms_top_k`` candidates): torch's softmax forks its whole intra-op thread pool even for one row, which costs milliseconds
when another pool (onnxruntime's, or another process) holds the cores.

Decoding, NMS, scaling and clipping do the same float32 operations as the torch functions in
:mod:`detector.boxes` and :mod:`detector.box_coder`, so boxes are bit-identical to theirs; scores are numpy's float32
softmax, within a few ulp (1e-7 relative) of torch's (whose kernel has its own ``exp``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from detector.box_coder import BoxCoder
from detector.boxes import batched_nms_np
from detector.detections import Detections

__all__ = ["PostprocessConfig", "candidate_anchors", "postprocess"]

# Slack of the logit pre-filter in log-probability units (0.1%), far above float32 rounding (~1e-6 relative).
_PREFILTER_MARGIN = 1e-3


# NMS IoU of every backend (S3FD used 0.3). Chosen on the 200 held-out partB_train images (never on partB_val), AP50
# at 0.3 / 0.4 / 0.5 / 0.6: rnnpool_face_m4 0.547 / 0.559 / 0.562 / 0.548, rnnpool_face_m4_paper 0.559 / 0.570 /
# 0.569 / 0.562. In crowds of small heads, neighbours' boxes overlap by more than 0.3.
DEFAULT_NMS_IOU = 0.5


@dataclass(frozen=True)
class PostprocessConfig:
    """Attributes:
    score_threshold: minimum class probability kept.
    pre_nms_top_k: candidates per image entering NMS (bounds its ``k x k`` IoU matrix).
    nms_iou: IoU above which a lower-scoring box of the same class is suppressed (:data:`DEFAULT_NMS_IOU`).
    max_detections: boxes kept per image after NMS.
    """

    score_threshold: float = 0.5
    pre_nms_top_k: int = 1000
    nms_iou: float = DEFAULT_NMS_IOU
    max_detections: int = 750


def _to_numpy(t: Tensor | np.ndarray) -> np.ndarray:
    """A float32 numpy view (no copy for float32 CPU tensors, as from onnxruntime or ``inference_mode``)."""
    if isinstance(t, np.ndarray):
        return t if t.dtype == np.float32 else t.astype(np.float32)
    return t.detach().to("cpu", torch.float32).numpy()


def _softmax_fg(logits: np.ndarray) -> np.ndarray:
    """Foreground columns ``(M, K - 1)`` of the float32 softmax of ``(M, K)`` logits, in torch's order of operations:
    ``exp(l - max l)`` times the reciprocal of its row sum."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # non-finite rows give nan, as in torch
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e[:, 1:] * (np.float32(1) / e.sum(axis=1, keepdims=True))


def candidate_anchors(logits: np.ndarray, score_threshold: float) -> np.ndarray:
    """Anchors whose foreground softmax can reach ``score_threshold``: a superset of those that do.

    With two classes the score is ``sigmoid(l_1 - l_0)``, so ``score >= t`` iff ``l_1 - l_0 >= log(t / (1 - t))``
    (used for ``t <= 0.99``). In general ``softmax(l)_c <= exp(l_c - max l)`` (the sum is at least 1), so
    ``score_c >= t`` needs ``l_c - max l >= log t``. Both bounds are lowered by ``1e-3`` (log units) so that float32
    rounding of the softmax can never push a rejected anchor over the threshold; the exact test follows on the
    survivors.

    Args:
        logits: ``(A, K)`` float32 logits of one image, class 0 background.
        score_threshold: the minimum score; below ``1e-30`` (or ``<= 0``) every anchor is kept.

    Returns:
        ``(M,)`` ascending int64 anchor indices.
    """
    t = score_threshold
    if not t >= 1e-30:
        return np.arange(len(logits), dtype=np.int64)
    with np.errstate(invalid="ignore"):  # inf - inf = nan: such rows score nan and never pass
        if logits.shape[1] == 2:
            bound = math.log(t / (1 - t)) if t <= 0.99 else math.log(t)
            rel = logits[:, 1] - logits[:, 0]
        else:
            bound = math.log(t)
            rel = (logits[:, 1:] - logits.max(axis=1, keepdims=True)).max(axis=1)
        return np.flatnonzero(rel >= bound - _PREFILTER_MARGIN)


def postprocess(
    cls_logits: Tensor | np.ndarray,
    box_deltas: Tensor | np.ndarray,
    anchors_cxcywh: Tensor | np.ndarray,
    scales: list[tuple[float, float]],
    image_sizes: list[tuple[int, int]],
    class_names: tuple[str, ...],
    config: PostprocessConfig = PostprocessConfig(),
    box_coder: BoxCoder | None = None,
) -> list[Detections]:
    """Turns a batch of raw outputs into detections in original-image pixels.

    Per image: class probabilities (softmax, class 0 background), every (anchor, foreground class) with probability
    ``>= config.score_threshold``, the ``config.pre_nms_top_k`` best of them, decoding, per-class NMS, the first
    ``config.max_detections`` boxes, scaling to the original image and clipping to it. Only the anchors that pass
    :func:`candidate_anchors` are scored and decoded, which gives exactly the result of doing it for all of them.

    Args:
        cls_logits: ``(N, A, K)`` logits, class 0 background (torch tensor or numpy array).
        box_deltas: ``(N, A, 4)`` encoded boxes.
        anchors_cxcywh: ``(A, 4)`` anchors in model-input pixels.
        scales: per image ``(sx, sy)`` from original to model-input pixels.
        image_sizes: per image original ``(width, height)``.
        class_names: foreground class names.
        config: thresholds.
        box_coder: decoding (default SSD variances).

    Returns:
        One :class:`Detections` per image, by descending score.
    """
    box_coder = box_coder or BoxCoder()
    logits_all = _to_numpy(cls_logits)
    deltas_all = _to_numpy(box_deltas)
    anchors = _to_numpy(anchors_cxcywh)
    threshold = config.score_threshold
    out = []
    for i in range(logits_all.shape[0]):
        logits = logits_all[i]
        rows = candidate_anchors(logits, threshold)
        probs = _softmax_fg(logits[rows])
        row_pos, cls = np.nonzero(probs >= threshold)  # anchor-major, as a flat (anchor, class) index
        scores = probs[row_pos, cls]
        if len(scores) > config.pre_nms_top_k:
            top = torch.from_numpy(scores).topk(config.pre_nms_top_k).indices.numpy()
            row_pos, cls, scores = row_pos[top], cls[top], scores[top]
        anchor_idx = rows[row_pos]
        labels = cls.astype(np.int64) + 1
        boxes = box_coder.decode_np(deltas_all[i][anchor_idx], anchors[anchor_idx])
        keep = batched_nms_np(boxes, scores, labels, config.nms_iou)[: config.max_detections]
        sx, sy = scales[i]
        w, h = image_sizes[i]
        boxes = boxes[keep] / np.array([sx, sy, sx, sy], dtype=np.float32)
        boxes = np.clip(boxes, np.float32(0), np.array([w, h, w, h], dtype=np.float32))
        out.append(Detections(boxes, scores[keep], labels[keep], tuple(class_names), (int(w), int(h))))
    return out
