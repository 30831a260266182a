"""The RNNPool-Face network, built from a typed configuration.

conv stem -> RNNPool -> MBConv blocks, with an S3FD-style detection head after the blocks that carry an anchor size.
Every variant in :mod:`detector.models.variants` is a :class:`RNNPoolFaceConfig`, never a copy of this file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detector.anchors import AnchorSpec
from detector.nn import ConvBNAct, DetectionHead, MBConv, RNNPool
from detector.nn.rnnpool import pair

__all__ = ["BlockSpec", "RNNPoolFace", "RNNPoolFaceConfig"]


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block; ``anchor_size`` (input pixels) puts a detection head on its output, with
    ``anchors_per_side ** 2`` anchors per location (see :class:`detector.anchors.AnchorSpec`)."""

    out_channels: int
    stride: int = 1
    expand_ratio: float = 2.0
    anchor_size: float | None = None
    anchors_per_side: int = 1


@dataclass(frozen=True)
class RNNPoolFaceConfig:
    """Everything that defines a variant, preprocessing included.

    Attributes:
        name: registry name.
        input_size: ``(width, height)`` of the model input; images are resized to this area (see
            :mod:`detector.preprocess`).
        in_channels: 1 = grayscale, 3 = RGB (colour order R, G, B).
        stem: ``(out_channels, stride)`` of each 3x3 ConvBNReLU before RNNPool (may be empty).
        rnnpool_hidden: ``(h1, h2)``.
        rnnpool_patch: RNNPool patch, int or ``(rows, cols)``.
        rnnpool_stride: RNNPool stride, int or ``(rows, cols)``.
        blocks: the MBConv stack.
        class_names: foreground classes; class index 0 is background, ``i`` is ``class_names[i - 1]``.
        maxout_background: background logits max-ed out on the first head (S3FD); other heads use 1.
        pixel_mean: per input channel, subtracted from 0..255 pixels inside ``forward``.
        pixel_std: per input channel, divides after the mean.
        size_divisor: inference resizes keep width and height multiples of this (the largest head stride).
        act: activation of the MBConv blocks.
    """

    name: str
    input_size: tuple[int, int]
    in_channels: int
    stem: tuple[tuple[int, int], ...]
    rnnpool_hidden: tuple[int, int]
    rnnpool_patch: int | tuple[int, int]
    rnnpool_stride: int | tuple[int, int]
    blocks: tuple[BlockSpec, ...]
    class_names: tuple[str, ...] = ("head",)
    maxout_background: int = 3
    pixel_mean: tuple[float, ...] = (127.5,)
    pixel_std: tuple[float, ...] = (64.0,)
    size_divisor: int = 16
    act: str = "relu6"

    @property
    def num_classes(self) -> int:
        """Classes including background."""
        return len(self.class_names) + 1

    @property
    def grayscale(self) -> bool:
        return self.in_channels == 1

    def replace(self, **changes: Any) -> RNNPoolFaceConfig:
        """A copy with some fields changed (lists are converted to the tuple types)."""
        return RNNPoolFaceConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain python types only (safe for ``torch.load(weights_only=True)`` and JSON)."""
        d = dataclasses.asdict(self)
        d["blocks"] = [dataclasses.asdict(b) if isinstance(b, BlockSpec) else dict(b) for b in self.blocks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RNNPoolFaceConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        d = dict(d)
        d["blocks"] = tuple(b if isinstance(b, BlockSpec) else BlockSpec(**b) for b in d["blocks"])
        d["stem"] = tuple(tuple(int(v) for v in s) for s in d["stem"])
        for key in ("input_size", "rnnpool_hidden", "class_names", "pixel_mean", "pixel_std"):
            d[key] = tuple(d[key])
        for key in ("rnnpool_patch", "rnnpool_stride"):
            d[key] = d[key] if isinstance(d[key], int) else tuple(d[key])
        return cls(**d)


class RNNPoolFace(nn.Module):
    """RNNPool-Face detector network.

    ``forward`` returns raw tensors only; anchors (:mod:`detector.anchors`), decoding (:mod:`detector.box_coder`)
    and NMS (:mod:`detector.postprocess`) live outside so that the same network exports to ONNX and C.

    Input: ``(N, in_channels, H, W)`` float pixels in 0..255 (RGB or grayscale); normalised inside.
    Output: ``cls_logits (N, A, num_classes)`` (max-out background already applied) and
    ``box_deltas (N, A, 4)`` (SSD-encoded against the anchors), heads concatenated in order, each head's locations in
    row-major order (a location's anchors consecutive), ``A = sum(h_i * w_i * a_i)`` over :meth:`feature_sizes`,
    ``a_i`` the head's anchors per location.
    """

    def __init__(self, config: RNNPoolFaceConfig) -> None:
        super().__init__()
        self.config = config
        c = config.in_channels
        if len(config.pixel_mean) != c or len(config.pixel_std) != c:
            raise ValueError(f"{config.name}: pixel_mean/pixel_std need {c} values")
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, c, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, c, 1, 1), persistent=False)

        stem: list[nn.Module] = []
        for out_channels, stride in config.stem:
            stem.append(ConvBNAct(c, out_channels, 3, stride, act="relu"))
            c = out_channels
        self.stem = nn.Sequential(*stem)
        h1, h2 = config.rnnpool_hidden
        self.rnnpool = RNNPool(c, h1, h2, config.rnnpool_patch, config.rnnpool_stride)
        c = self.rnnpool.out_channels

        self.blocks = nn.ModuleList()
        self.heads = nn.ModuleDict()
        for i, spec in enumerate(config.blocks):
            self.blocks.append(MBConv(c, spec.out_channels, spec.stride, spec.expand_ratio, act=config.act))
            c = spec.out_channels
            if spec.anchor_size is not None:
                maxout = config.maxout_background if not self.heads else 1
                self.heads[str(i)] = DetectionHead(c, config.num_classes, maxout,
                                                   anchors_per_cell=spec.anchors_per_side**2)
        if not self.heads:
            raise ValueError(f"{config.name}: no block has an anchor_size, so there is no detection head")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_pooled(self.forward_front(x))

    def forward_front(self, x: Tensor) -> Tensor:
        """Normalisation, stem and RNNPool: ``(N, in_channels, H, W)`` pixels -> ``(N, 4 * h2, H', W')``."""
        x = (x - self.pixel_mean) / self.pixel_std
        return self.rnnpool(self.stem(x))

    def forward_pooled(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The network after RNNPool: ``(N, 4 * h2, H', W')`` -> ``(cls_logits, box_deltas)`` as :meth:`forward`."""
        cls_out, box_out = [], []
        for i, block in enumerate(self.blocks):
            x = block(x)
            head = self.heads[str(i)] if str(i) in self.heads else None
            if head is not None:
                cls, box = head(x)
                cls_out.append(cls)
                box_out.append(box)
        return torch.cat(cls_out, dim=1), torch.cat(box_out, dim=1)

    # --- geometry, used by anchors and the exporters -------------------------------------------------------

    def anchor_specs(self) -> list[AnchorSpec]:
        """Stride (input pixels per feature cell) and square anchor size of each head, in output order."""
        stride = 1
        for _, s in self.config.stem:
            stride *= s
        rs = pair(self.config.rnnpool_stride)
        if rs[0] != rs[1]:
            raise ValueError("square anchors need an RNNPool stride equal along rows and columns")
        stride *= rs[0]
        specs = []
        for spec in self.config.blocks:
            stride *= spec.stride
            if spec.anchor_size is not None:
                specs.append(AnchorSpec(stride=stride, size=float(spec.anchor_size), per_side=spec.anchors_per_side))
        return specs

    def feature_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """``(h, w)`` of each head's feature map for an ``height x width`` input (exact conv arithmetic)."""

        def down(v: int, s: int) -> int:
            return -(-v // s)  # ceil: every layer pads 'same'

        h, w = height, width
        for _, s in self.config.stem:
            h, w = down(h, s), down(w, s)
        h, w = self.rnnpool.output_size(h, w)
        sizes = []
        for spec in self.config.blocks:
            h, w = down(h, spec.stride), down(w, spec.stride)
            if spec.anchor_size is not None:
                sizes.append((h, w))
        return sizes

    def num_anchors(self, height: int, width: int) -> int:
        specs = self.anchor_specs()
        return sum(h * w * a.per_cell for (h, w), a in zip(self.feature_sizes(height, width), specs))

