"""The one result type shared by the CLI, the web service and the webcam demo."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Detections"]

# BGR colours per class index (1-based); class 0 is never drawn.
_COLOURS_BGR = [(0, 200, 0), (0, 140, 255), (255, 80, 0), (200, 0, 200)]


@dataclass
class Detections:
    """Detections in one image.

    Attributes:
        boxes_xyxy: ``(K, 4)`` float32 boxes in pixels of the original image (x right, y down, continuous coordinates).
        scores: ``(K,)`` float32 confidences in [0, 1], descending.
        labels: ``(K,)`` int64 class indices, 1-based into ``class_names``.
        class_names: foreground class names; label ``i`` is ``class_names[i - 1]``.
        image_size: ``(width, height)`` of the original image.
    """

    boxes_xyxy: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] = ("head",)
    image_size: tuple[int, int] = (0, 0)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.boxes_xyxy = np.asarray(self.boxes_xyxy, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if not (len(self.boxes_xyxy) == len(self.scores) == len(self.labels)):
            raise ValueError("boxes, scores and labels must have the same length")

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def label_names(self) -> list[str]:
        return [self.class_names[i - 1] for i in self.labels.tolist()]

    def counts(self) -> dict[str, int]:
        """Number of detections per class name (every class listed, zeros included)."""
        return {name: int((self.labels == i + 1).sum()) for i, name in enumerate(self.class_names)}

    def select(self, mask: np.ndarray) -> Detections:
        """The detections where ``mask`` (bool ``(K,)`` or indices) holds."""
        return Detections(self.boxes_xyxy[mask], self.scores[mask], self.labels[mask], self.class_names,
                          self.image_size, dict(self.extra))

    def filter(self, min_score: float = 0.0, classes: list[str] | tuple[str, ...] | None = None) -> Detections:
        """Keeps scores >= ``min_score`` and, if given, only the named ``classes``."""
        keep = self.scores >= min_score
        if classes is not None:
            unknown = set(classes) - set(self.class_names)
            if unknown:
                raise ValueError(f"unknown classes {sorted(unknown)}; this model has {list(self.class_names)}")
            wanted = [self.class_names.index(c) + 1 for c in classes]
            keep &= np.isin(self.labels, wanted)
        return self.select(keep)

    @classmethod
    def concat(cls, parts: list[Detections], class_names: tuple[str, ...]) -> Detections:
        """Merges detections of one image from several models into one set over ``class_names``.

        Labels are remapped by name (every class a part's boxes carry must be in ``class_names``); the result is
        sorted by score, descending (stable). ``image_size`` is the first part's (all must agree); ``extra`` dicts are merged.
        """
        if not parts:
            return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0), class_names)
        if len({p.image_size for p in parts}) > 1:
            raise ValueError("cannot merge detections of different image sizes")
        labels = []
        for p in parts:
            missing = sorted(set(p.label_names) - set(class_names))
            if missing:
                raise ValueError(f"classes {missing} are not in {list(class_names)}")
            lut = np.array([0] + [class_names.index(n) + 1 if n in class_names else 0 for n in p.class_names])
            labels.append(lut[p.labels].astype(np.int64))
        scores = np.concatenate([p.scores for p in parts])
        order = np.argsort(-scores, kind="stable")
        extra: dict[str, Any] = {}
        for p in parts:
            extra.update(p.extra)
        return cls(np.concatenate([p.boxes_xyxy for p in parts])[order], scores[order],
                   np.concatenate(labels)[order], tuple(class_names), parts[0].image_size, extra)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: boxes rounded to 0.01 px, scores to 1e-4."""
        w, h = self.image_size
        return {
            "count": len(self),
            "counts": self.counts(),
            "image_width": int(w),
            "image_height": int(h),
            "detections": [
                {
                    "box_xyxy": [round(float(v), 2) for v in box],
                    "score": round(float(s), 4),
                    "label": name,
                }
                for box, s, name in zip(self.boxes_xyxy, self.scores, self.label_names)
            ],
        }

    def draw(self, image_bgr: np.ndarray, thickness: int = 2, show_scores: bool = True) -> np.ndarray:
        """A copy of ``image_bgr`` (HxWx3 uint8, BGR, the original image) with the boxes and a count drawn."""
        import cv2

        out = np.ascontiguousarray(image_bgr).copy()
        if out.ndim == 2:
            out = cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)
        for box, score, label in zip(self.boxes_xyxy, self.scores, self.labels):
            colour = _COLOURS_BGR[(int(label) - 1) % len(_COLOURS_BGR)]
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            cv2.rectangle(out, (x0, y0), (x1, y1), colour, thickness)
            if show_scores:
                cv2.putText(out, f"{score:.2f}", (x0, max(y0 - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1)
        text = ", ".join(f"{n}s: {c}" for n, c in self.counts().items())
        cv2.putText(out, text, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 4)
        cv2.putText(out, text, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2)
        return out
