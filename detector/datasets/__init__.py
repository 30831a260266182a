"""Dataset layer: annotation loaders (VOC/SCUT-HEAD, WIDER FACE), augmentation, and the torch dataset.

All loaders return ``(list[ImageRecord], LoadReport)``; boxes are ``xyxy`` float32 pixels of the image file.

The loaders import only numpy; the torch dataset and the albumentations transforms (``train`` extra) are imported
on first access, so ``import detector.datasets.records`` works in a serving install without albumentations.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from detector.datasets.records import ImageRecord
from detector.datasets.voc import LoadReport, load_voc, read_image_size, sanitize_boxes
from detector.datasets.wider import load_wider, parse_wider_gt

if TYPE_CHECKING:
    from detector.datasets.dataset import DetectionDataset, TransformFn, collate_detection, decode_image
    from detector.datasets.transforms import (
        IGNORE_LABEL,
        DetectionTransform,
        SmallObjectZoomCrop,
        build_eval_transform,
        build_train_transform,
    )

_LAZY = {
    "DetectionDataset": "dataset",
    "TransformFn": "dataset",
    "collate_detection": "dataset",
    "decode_image": "dataset",
    "IGNORE_LABEL": "transforms",
    "DetectionTransform": "transforms",
    "SmallObjectZoomCrop": "transforms",
    "build_eval_transform": "transforms",
    "build_train_transform": "transforms",
}

__all__ = [
    "IGNORE_LABEL",
    "DetectionDataset",
    "DetectionTransform",
    "ImageRecord",
    "LoadReport",
    "SmallObjectZoomCrop",
    "TransformFn",
    "build_eval_transform",
    "build_train_transform",
    "collate_detection",
    "decode_image",
    "load_voc",
    "load_wider",
    "parse_wider_gt",
    "read_image_size",
    "sanitize_boxes",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
