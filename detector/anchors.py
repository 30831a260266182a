"""S3FD anchors: one square anchor per feature-map location."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AnchorSpec", "make_anchors"]


@dataclass(frozen=True)
class AnchorSpec:
    """One detection head's anchors: cell ``stride`` and square anchor side ``size``, both in input pixels."""

    stride: int
    size: float


def make_anchors(
    feature_sizes: list[tuple[int, int]], specs: list[AnchorSpec], dtype: torch.dtype = torch.float32
) -> Tensor:
    """Anchors of all heads, concatenated in the network's output order.

    Anchor ``(y, x)`` of a head is centred on its cell: ``((x + 0.5) * stride, (y + 0.5) * stride)``.

    Args:
        feature_sizes: ``(h, w)`` per head.
        specs: stride and size per head.

    Returns:
        ``(A, 4)`` cxcywh boxes in pixels of the model input, ``A = sum(h * w)``, each head row-major.
    """
    if len(feature_sizes) != len(specs):
        raise ValueError(f"{len(feature_sizes)} feature maps but {len(specs)} anchor specs")
    out = []
    for (h, w), spec in zip(feature_sizes, specs):
        ys = (torch.arange(h, dtype=dtype) + 0.5) * spec.stride
        xs = (torch.arange(w, dtype=dtype) + 0.5) * spec.stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        size = torch.full_like(cx, spec.size)
        out.append(torch.stack((cx, cy, size, size), dim=-1).reshape(-1, 4))
    return torch.cat(out, dim=0)
