"""Small typed convolution layers the RNNPool-Face models are built from."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ConvBNAct", "MBConv", "make_activation"]


def make_activation(name: str | None) -> nn.Module:
    """``"relu"``, ``"relu6"`` or ``None`` (identity)."""
    if name is None:
        return nn.Identity()
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    raise ValueError(f"unknown activation {name!r}")


class ConvBNAct(nn.Sequential):
    """``Conv2d`` (no bias, 'same' padding) + ``BatchNorm2d`` + activation.

    Shape: ``(N, in_channels, H, W)`` -> ``(N, out_channels, ceil(H / stride), ceil(W / stride))`` for odd kernels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: str | None = "relu",
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            make_activation(act),
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride


class MBConv(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection.

    The residual connection is used when ``stride == 1`` and the channel count is unchanged; the expansion is
    skipped when ``expand_ratio == 1``.

    Shape: ``(N, in_channels, H, W)`` -> ``(N, out_channels, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, expand_ratio: float = 2, act: str = "relu6"
    ) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        layers: list[nn.Module] = []
        if hidden != in_channels:
            layers.append(ConvBNAct(in_channels, hidden, 1, act=act))
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=act), ConvBNAct(hidden, out_channels, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y
