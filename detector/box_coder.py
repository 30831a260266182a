"""SSD box coding against anchors."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from detector.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh

__all__ = ["BoxCoder"]


class BoxCoder:
    """SSD encoding with variances ``(0.1, 0.2)``.

    ``d_x = (c_x - a_x) / (v_0 a_w)``, ``d_y = (c_y - a_y) / (v_0 a_h)``, ``d_w = log(w / a_w) / v_1``,
    ``d_h = log(h / a_h) / v_1``; :meth:`decode` inverts :meth:`encode` exactly (up to float rounding).

    Args:
        variances: ``(center, size)`` variances.
        max_log_scale: decoded ``log(w / a_w)`` is clamped to this, so that wild deltas cannot overflow ``exp``.
    """

    def __init__(self, variances: tuple[float, float] = (0.1, 0.2), max_log_scale: float = math.log(1000.0 / 16)):
        self.variances = variances
        self.max_log_scale = max_log_scale

    def encode(self, boxes_xyxy: Tensor, anchors_cxcywh: Tensor) -> Tensor:
        """Boxes ``(..., A, 4)`` xyxy matched to anchors ``(A, 4)`` cxcywh -> deltas ``(..., A, 4)``.

        Boxes must have positive width and height.
        """
        b = xyxy_to_cxcywh(boxes_xyxy)
        v0, v1 = self.variances
        center = (b[..., :2] - anchors_cxcywh[..., :2]) / (v0 * anchors_cxcywh[..., 2:])
        size = torch.log(b[..., 2:] / anchors_cxcywh[..., 2:]) / v1
        return torch.cat((center, size), dim=-1)

    def decode(self, deltas: Tensor, anchors_cxcywh: Tensor) -> Tensor:
        """Deltas ``(..., A, 4)`` and anchors ``(A, 4)`` cxcywh -> boxes ``(..., A, 4)`` xyxy (input pixels)."""
        v0, v1 = self.variances
        center = anchors_cxcywh[..., :2] + deltas[..., :2] * v0 * anchors_cxcywh[..., 2:]
        size = anchors_cxcywh[..., 2:] * torch.exp((deltas[..., 2:] * v1).clamp(max=self.max_log_scale))
        return cxcywh_to_xyxy(torch.cat((center, size), dim=-1))

    def decode_np(self, deltas: np.ndarray, anchors_cxcywh: np.ndarray) -> np.ndarray:
        """:meth:`decode` on float32 numpy arrays ``(K, 4)`` -> ``(K, 4)`` xyxy, bit-identical to it.

        For a few boxes per image (post-processing), where the per-call overhead of torch dominates. ``exp`` is
        torch's (numpy's differs in the last bit for some inputs); every other operation is exactly rounded in both.
        """
        v0, v1 = self.variances
        center = anchors_cxcywh[:, :2] + deltas[:, :2] * v0 * anchors_cxcywh[:, 2:]
        log_scale = np.ascontiguousarray(np.minimum(deltas[:, 2:] * v1, self.max_log_scale))
        size = anchors_cxcywh[:, 2:] * torch.exp(torch.from_numpy(log_scale)).numpy()
        half = size / 2
        return np.concatenate((center - half, center + half), axis=1)
