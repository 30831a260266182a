"""S3FD anchors: square anchors on each head's grid, one per cell or ``per_side x per_side`` per cell."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AnchorSpec", "make_anchors"]


@dataclass(frozen=True)
class AnchorSpec:
    """One detection head's anchors: cell ``stride`` and square anchor side ``size``, both in input pixels.

    ``per_side > 1`` splits every cell into ``per_side x per_side`` sub-cells with one anchor each (a denser grid for
    anchors smaller than the stride can place well, predicted from the coarse cell's features).
    """

    stride: int
    size: float
    per_side: int = 1

    @property
    def per_cell(self) -> int:
        return self.per_side * self.per_side


def make_anchors(
    feature_sizes: list[tuple[int, int]], specs: list[AnchorSpec], dtype: torch.dtype = torch.float32
) -> Tensor:
    """Anchors of all heads, concatenated in the network's output order.

    Anchor ``(y, x)`` of a head is centred on its cell: ``((x + 0.5) * stride, (y + 0.5) * stride)``; with
    ``per_side = p`` the cell holds ``p * p`` anchors centred on its sub-cells,
    ``((x + (j + 0.5) / p) * stride, (y + (i + 0.5) / p) * stride)`` for ``i, j < p``.

    Args:
        feature_sizes: ``(h, w)`` per head.
        specs: stride and size per head.

    Returns:
        ``(A, 4)`` cxcywh boxes in pixels of the model input, ``A = sum(h * w * per_side**2)``; each head in
        row-major cell order, a cell's sub-anchors row-major ``(i, j)`` within it (the network's output order).
    """
    if len(feature_sizes) != len(specs):
        raise ValueError(f"{len(feature_sizes)} feature maps but {len(specs)} anchor specs")
    out = []
    for (h, w), spec in zip(feature_sizes, specs):
        p = spec.per_side
        sub = (torch.arange(p, dtype=dtype) + 0.5) / p
        ys = (torch.arange(h, dtype=dtype)[:, None] + sub) * spec.stride  # (h, p)
        xs = (torch.arange(w, dtype=dtype)[:, None] + sub) * spec.stride  # (w, p)
        cy = ys[:, None, :, None].expand(h, w, p, p)
        cx = xs[None, :, None, :].expand(h, w, p, p)
        size = torch.full_like(cx, spec.size)
        out.append(torch.stack((cx, cy, size, size), dim=-1).reshape(-1, 4))
    return torch.cat(out, dim=0)
