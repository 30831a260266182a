"""S3FD-style detection head: square anchors (one or a few per location), optional max-out background."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DetectionHead"]


class DetectionHead(nn.Module):
    """Class logits and box deltas for one feature map, ``anchors_per_cell`` anchors per location.

    With ``maxout_background = M > 1`` the classifier predicts ``M`` background logits per anchor and keeps their
    maximum (S3FD's max-out background label, used on the first, small-anchor head to fight the many small negatives).

    Args:
        in_channels: feature channels.
        num_classes: classes including background (2 for a one-class detector).
        maxout_background: background logits to max over (1 = plain softmax head).
        kernel_size: convolution size of both branches.
        anchors_per_cell: anchors predicted at each location (the sub-cell anchors of
            :class:`detector.anchors.AnchorSpec`); the branches' output channels are anchor-major
            (``cls``: anchor ``s`` owns channels ``s * (num_classes - 1 + M) ...``, ``box``: ``4 * s ...``).

    Shape:
        ``(N, in_channels, H, W)`` -> ``cls_logits (N, H*W*a, num_classes)``, ``box_deltas (N, H*W*a, 4)``; locations
        in row-major (y, x) order, a location's ``a`` anchors consecutive.
    """

    def __init__(self, in_channels: int, num_classes: int, maxout_background: int = 1, kernel_size: int = 3,
                 anchors_per_cell: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.maxout_background = maxout_background
        self.anchors_per_cell = anchors_per_cell
        pad = kernel_size // 2
        self.cls = nn.Conv2d(in_channels, anchors_per_cell * (num_classes - 1 + maxout_background), kernel_size,
                             padding=pad)
        self.box = nn.Conv2d(in_channels, anchors_per_cell * 4, kernel_size, padding=pad)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n, _, h, w = x.shape
        a = self.anchors_per_cell
        # Both branches as one convolution (their weights stacked): on CPU a convolution with a handful of output
        # channels costs about as much as one with 16, so this halves the heads' time.
        k = self.cls.out_channels
        out = F.conv2d(x, torch.cat((self.cls.weight, self.box.weight)), torch.cat((self.cls.bias, self.box.bias)),
                       padding=self.cls.padding)
        cls, box = out[:, :k].reshape(n, a, k // a, h, w), out[:, k:].reshape(n, a, 4, h, w)
        m = self.maxout_background
        if m > 1:
            cls = torch.cat((cls[:, :, :m].amax(dim=2, keepdim=True), cls[:, :, m:]), dim=2)
        cls = cls.permute(0, 3, 4, 1, 2).reshape(n, -1, self.num_classes)
        box = box.permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        return cls, box
