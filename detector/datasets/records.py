"""The annotation record every loader produces and every consumer (training, evaluation, COCO export) reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


@dataclass
class ImageRecord:
    """Ground truth of one image.

    Attributes:
        image_id: dataset-unique id (VOC: the file stem; WIDER: ``event/stem``).
        path: image file.
        width: image width in pixels (from the image itself when the annotation is wrong).
        height: image height in pixels.
        boxes_xyxy: ``(G, 4)`` float32 object boxes in pixels of the image at ``path``, clipped to the image.
        labels: ``(G,)`` int64 class indices, 1-based (0 is background): 1 = head (SCUT) or face (WIDER).
        ignore_xyxy: ``(I, 4)`` float32 regions that are neither positives nor negatives (WIDER invalid faces,
            VOC ``difficult`` objects, uncertain pseudo-labels). Detections on them count neither as TP nor FP.
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes_xyxy: np.ndarray = field(default_factory=_empty_boxes)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    ignore_xyxy: np.ndarray = field(default_factory=_empty_boxes)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.boxes_xyxy = np.asarray(self.boxes_xyxy, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.ignore_xyxy = np.asarray(self.ignore_xyxy, dtype=np.float32).reshape(-1, 4)
        if len(self.labels) != len(self.boxes_xyxy):
            raise ValueError(f"{self.image_id}: {len(self.boxes_xyxy)} boxes but {len(self.labels)} labels")
