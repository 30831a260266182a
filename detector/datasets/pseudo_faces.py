"""Face pseudo-labels for SCUT-HEAD: turns head records plus a teacher's face boxes into face training records.

SCUT-HEAD has no face ground truth; ``faces_retinaface.json`` (beside the dataset) holds a RetinaFace teacher's boxes
with scores for every Part B image::

    {"faces": {"PartB_00000": [[x1, y1, x2, y2, score], ...], ...}, ...}

in pixels of the image in ``JPEGImages/``. The teacher is right about 90 % of the time at score >= 0.5 (97 % at
>= 0.9), misses many small faces, and about 3.6 % of its >= 0.5 boxes lie outside every annotated head. So each
record becomes (see :class:`FaceLabelPolicy`):

* **faces** (label 1): teacher boxes with ``score >= min_score`` whose centre lies in an annotated head, and those
  outside every head with ``score >= outside_head_min_score`` (confident faces the head annotation missed);
* **ignore regions** (neither positive nor negative): teacher boxes below those scores, and small heads
  (``sqrt(area) < small_head_side``) that hold no face box, where the teacher is blind (on ``partB_train`` only 36 %
  of heads under 12 px get a face vs 59-66 % of every larger size);
* everything else is background, including large heads without a face (seen from behind: rightly no face).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from detector.datasets.records import ImageRecord

__all__ = ["DEFAULT_FACE_LABELS", "FaceLabelPolicy", "FaceLabelReport", "face_records", "read_face_labels"]

log = logging.getLogger(__name__)

DEFAULT_FACE_LABELS = "faces_retinaface.json"  # file name beside the SCUT-HEAD root


@dataclass(frozen=True)
class FaceLabelPolicy:
    """How teacher boxes become faces, ignore regions or background.

    Attributes:
        min_score: teacher boxes at or above this score inside a head are faces; below (down to the file's floor,
            0.3) they are ignore regions.
        outside_head_min_score: a box whose centre is in no annotated head needs this score to be a face; below it
            is an ignore region.
        small_head_side: heads with ``sqrt(w * h)`` below this (pixels of the source image) and no teacher box are
            ignore regions; 0 disables.
    """

    min_score: float = 0.5
    outside_head_min_score: float = 0.9
    small_head_side: float = 16.0

    def __post_init__(self) -> None:
        for name in ("min_score", "outside_head_min_score"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.small_head_side < 0:
            raise ValueError(f"small_head_side must be >= 0, got {self.small_head_side}")


@dataclass
class FaceLabelReport:
    """Counts of one conversion (logged as one line)."""

    images: int = 0
    images_without_labels: int = 0
    faces: int = 0
    faces_outside_heads: int = 0
    ignored_low_score: int = 0
    ignored_outside_heads: int = 0
    ignored_small_heads: int = 0

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self).items())


def read_face_labels(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a pseudo-label file.

    Returns:
        image id -> ``(F, 5)`` float32 ``[x1, y1, x2, y2, score]`` in source-image pixels.

    Raises:
        ValueError: the file is not JSON of the documented shape (the message names the first bad entry).
        FileNotFoundError: no such file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    faces = data.get("faces") if isinstance(data, dict) else None
    if not isinstance(faces, dict):
        raise ValueError(f"{path}: expected an object with a 'faces' mapping of image id -> [[x1, y1, x2, y2, score]]")
    out: dict[str, np.ndarray] = {}
    for image_id, boxes in faces.items():
        try:
            arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: entry {image_id!r} is not a list of [x1, y1, x2, y2, score]") from None
        if not np.isfinite(arr).all():
            raise ValueError(f"{path}: entry {image_id!r} holds a non-finite number")
        out[str(image_id)] = arr
    return out


def _clip(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    x1, x2 = np.minimum(boxes[:, 0], boxes[:, 2]), np.maximum(boxes[:, 0], boxes[:, 2])
    y1, y2 = np.minimum(boxes[:, 1], boxes[:, 3]), np.maximum(boxes[:, 1], boxes[:, 3])
    return np.stack([x1.clip(0, width), y1.clip(0, height), x2.clip(0, width), y2.clip(0, height)], axis=1)


def _centres_in(boxes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """``(F, H)`` bool: the centre of ``boxes[f]`` lies in ``regions[h]`` (both xyxy)."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    return ((cx[:, None] >= regions[None, :, 0]) & (cx[:, None] <= regions[None, :, 2])
            & (cy[:, None] >= regions[None, :, 1]) & (cy[:, None] <= regions[None, :, 3]))


def face_records(
    head_records: Sequence[ImageRecord],
    labels: dict[str, np.ndarray],
    policy: FaceLabelPolicy = FaceLabelPolicy(),
) -> tuple[list[ImageRecord], FaceLabelReport]:
    """Face training records from head records and teacher boxes.

    Args:
        head_records: SCUT-HEAD records (label 1 = head), boxes in source-image pixels.
        labels: :func:`read_face_labels` output; an image without an entry is kept with no faces and its heads as
            ignore regions (nothing is known about its faces), and counted.
        policy: thresholds.

    Returns:
        Records with label 1 = face, ignore regions as described in the module docstring (the head records'
        own ignore regions are kept), and the counts.
    """
    report = FaceLabelReport()
    out: list[ImageRecord] = []
    for rec in head_records:
        report.images += 1
        heads = rec.boxes_xyxy.reshape(-1, 4).astype(np.float32)
        teacher = labels.get(rec.image_id)
        if teacher is None:
            report.images_without_labels += 1
            out.append(replace(rec, boxes_xyxy=np.zeros((0, 4), np.float32), labels=np.zeros((0,), np.int64),
                               ignore_xyxy=np.concatenate([rec.ignore_xyxy.reshape(-1, 4), heads]).astype(np.float32)))
            continue
        boxes = _clip(teacher[:, :4], rec.width, rec.height)
        scores = teacher[:, 4]
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores = boxes[valid], scores[valid]
        inside = _centres_in(boxes, heads)  # (F, H)
        in_head = inside.any(axis=1)
        is_face = np.where(in_head, scores >= policy.min_score, scores >= policy.outside_head_min_score)
        report.faces += int(is_face.sum())
        report.faces_outside_heads += int((is_face & ~in_head).sum())
        report.ignored_low_score += int((~is_face & in_head).sum())
        report.ignored_outside_heads += int((~is_face & ~in_head).sum())
        side = np.sqrt((heads[:, 2] - heads[:, 0]) * (heads[:, 3] - heads[:, 1]))
        small_blind = (side < policy.small_head_side) & ~inside.any(axis=0)
        report.ignored_small_heads += int(small_blind.sum())
        ignore = np.concatenate([rec.ignore_xyxy.reshape(-1, 4), boxes[~is_face], heads[small_blind]])
        out.append(replace(rec, boxes_xyxy=boxes[is_face].astype(np.float32),
                           labels=np.ones(int(is_face.sum()), np.int64), ignore_xyxy=ignore.astype(np.float32)))
    log.info("face pseudo-labels: %s", report.summary())
    return out, report
