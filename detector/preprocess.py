"""Image preprocessing that belongs to a model's definition: input area, colour order, size rounding."""

from __future__ import annotations

import math

import cv2
import numpy as np

from detector.models.rnnpool_face import RNNPoolFaceConfig

__all__ = ["input_size_for", "to_model_input"]


def input_size_for(width: int, height: int, config: RNNPoolFaceConfig, mode: str = "area") -> tuple[int, int]:
    """Network input ``(width, height)`` for an image of ``width x height``.

    Args:
        mode: ``"area"`` keeps the aspect ratio and makes ``width * height`` about the model's input area (the paper's
            SCUT-HEAD protocol: ~320x240 pixels for the M4 model), each side rounded to a multiple of
            ``config.size_divisor``; ``"fixed"`` always uses ``config.input_size`` (for fixed-shape exports).
    """
    if mode == "fixed":
        return config.input_size
    if mode != "area":
        raise ValueError(f"unknown resize mode {mode!r}")
    tw, th = config.input_size
    scale = math.sqrt(tw * th / (width * height))
    d = config.size_divisor
    return max(d, int(round(width * scale / d)) * d), max(d, int(round(height * scale / d)) * d)


def to_model_input(image_bgr: np.ndarray, config: RNNPoolFaceConfig, mode: str = "area") -> tuple[np.ndarray, tuple[float, float]]:
    """Converts a decoded image to the network's input.

    Args:
        image_bgr: ``(H, W, 3)`` uint8 BGR (OpenCV order), ``(H, W, 4)`` BGRA or ``(H, W)`` grayscale.
        config: the model's configuration.
        mode: see :func:`input_size_for`.

    Returns:
        ``(C, h, w)`` float32 array of 0..255 pixels (RGB for colour models, luma for grayscale ones) and the
        ``(sx, sy)`` scale from original to input pixels (``x_input = x_original * sx``).
    """
    if image_bgr.ndim == 2:
        gray = image_bgr
        colour = None
    else:
        if image_bgr.shape[2] == 4:
            image_bgr = cv2.cvtColor(image_bgr, cv2.COLOR_BGRA2BGR)
        gray = None
        colour = image_bgr
    height, width = image_bgr.shape[:2]
    w, h = input_size_for(width, height, config, mode)
    if config.grayscale:
        img = gray if gray is not None else cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
    else:
        img = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB) if colour is not None else cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if (w, h) != (width, height):  # cv2.resize to the same size is a copy
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if w < width else cv2.INTER_LINEAR)
    if img.ndim == 2:
        return img.astype(np.float32)[None], (w / width, h / height)
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32), (w / width, h / height)
