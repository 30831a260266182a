"""The registered RNNPool-Face variants: each one is a configuration, not a model file."""

from __future__ import annotations

from typing import Any

from detector.models.registry import register_model
from detector.models.rnnpool_face import BlockSpec as B
from detector.models.rnnpool_face import RNNPoolFace, RNNPoolFaceConfig

__all__ = ["M4", "M4_FACE", "M4_PAPER", "QUANT", "C"]

_RGB = dict(pixel_mean=(123.7, 116.3, 103.5), pixel_std=(58.4, 57.1, 57.4))

# Paper's RNNPool-Face-M4: 320x240 grayscale; 3x3 conv s2 to 4 channels (160x120); RNNPool(8, 4, 16, 16) -> 40x30x64
# (stride 8); four MBConv blocks with a head after each (anchors 8/16 at stride 8, 32/48 at stride 16).
M4_PAPER = RNNPoolFaceConfig(
    name="rnnpool_face_m4_paper",
    input_size=(320, 240),
    in_channels=1,
    stem=((4, 2),),
    rnnpool_hidden=(16, 16),
    rnnpool_patch=8,
    rnnpool_stride=4,
    blocks=(B(32, 1, 2, 8), B(32, 1, 2, 16), B(64, 2, 2, 32), B(64, 1, 2, 48)),
    size_divisor=16,
)

# RNNPool-Face-M4, the default model: the paper's M4 with dense small anchors. The first head predicts 2x2 anchors
# of 8 px per stride-8 cell (an 8 px anchor on a 4 px grid: heads of 6-10 px, a third of SCUT-HEAD B at 320x240, get
# well-placed anchors); paid for by dropping block 0's expansion (its depthwise runs on RNNPool's 64 channels) and a
# 1.5x block 1: 69.8M MAdds vs the paper layout's 75.9M.
M4 = M4_PAPER.replace(
    name="rnnpool_face_m4",
    blocks=(B(32, 1, 1, 8, anchors_per_side=2), B(32, 1, 1.5, 16), B(64, 2, 2, 32), B(64, 1, 2, 48)),
)

# The paper's M4 layout detecting faces (one class): trained from a teacher's face boxes on SCUT-HEAD (detect train
# --face-labels); heads and faces are separate one-class models because a face box lies inside its head box and one
# anchor per location cannot be both classes under a softmax.
M4_FACE = M4_PAPER.replace(name="rnnpool_face_m4_face", class_names=("face",))

# RNNPool-Face-Quant: 640x480 RGB; two 3x3 convs to 4 channels (first s2); RNNPool(8, 4, 8, 8) -> 80x60x32 (stride 8);
# MBConv stack to stride 128 with six heads (anchors 16..512).
QUANT = RNNPoolFaceConfig(
    name="rnnpool_face_quant",
    input_size=(640, 480),
    in_channels=3,
    stem=((4, 2), (4, 1)),
    rnnpool_hidden=(8, 8),
    rnnpool_patch=8,
    rnnpool_stride=4,
    blocks=(
        B(16, 1, 2, 16), B(24, 1, 2, 32), B(32, 2, 2, 64), B(32, 1, 2), B(48, 2, 2, 128), B(48, 1, 2),
        B(64, 2, 2, 256), B(56, 2, 2, 512),
    ),
    size_divisor=32,
    **_RGB,
)

# RNNPool-Face-C: 640x480 RGB; RNNPool(8, 4, 16, 16) directly on the image -> 160x120x64 (stride 4);
# a wide MBConv stack with six heads on strides 4..128 (anchors 16..512); ~1.35M parameters, 1.7G MAdds.
C = RNNPoolFaceConfig(
    name="rnnpool_face_c",
    input_size=(640, 480),
    in_channels=3,
    stem=(),
    rnnpool_hidden=(16, 16),
    rnnpool_patch=8,
    rnnpool_stride=4,
    blocks=(
        B(32, 1, 2, 16), B(64, 2, 4), B(64, 1, 4, 32), B(128, 2, 4), B(128, 1, 4, 64),
        B(160, 2, 4), B(160, 1, 4, 128), B(224, 2, 4, 256), B(240, 2, 4, 512),
    ),
    size_divisor=32,
    **_RGB,
)


def _build(config: RNNPoolFaceConfig, overrides: dict[str, Any]) -> RNNPoolFace:
    return RNNPoolFace(config.replace(**overrides) if overrides else config)


@register_model
def rnnpool_face_m4(**overrides: Any) -> RNNPoolFace:
    """RNNPool-Face-M4 (default): 320x240 grayscale, 2x2 small anchors per cell on the first head, 69.8M MAdds."""
    return _build(M4, overrides)


@register_model
def rnnpool_face_m4_paper(**overrides: Any) -> RNNPoolFace:
    """The paper's RNNPool-Face-M4 layout: 320x240 grayscale, ~56K parameters, 75.9M MAdds."""
    return _build(M4_PAPER, overrides)


@register_model
def rnnpool_face_m4_face(**overrides: Any) -> RNNPoolFace:
    """RNNPool-Face-M4 for faces: the paper's M4 layout with one class, ``face``."""
    return _build(M4_FACE, overrides)


@register_model
def rnnpool_face_quant(**overrides: Any) -> RNNPoolFace:
    """RNNPool-Face-Quant: 640x480 RGB, ~71K parameters."""
    return _build(QUANT, overrides)


@register_model
def rnnpool_face_c(**overrides: Any) -> RNNPoolFace:
    """RNNPool-Face-C: 640x480 RGB, RNNPool directly on the image, ~1.35M parameters."""
    return _build(C, overrides)
