"""Several one-model detectors answering as one, so that a request can ask for heads, faces or both.

The head model and the face model are separate networks of the M4 layout (see ``rnnpool_face_m4_face`` in
:mod:`detector.models.variants` for why); :class:`DetectorGroup` runs only the models that provide the requested
classes and merges their boxes into one :class:`Detections`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from detector.detections import Detections
from detector.postprocess import DEFAULT_NMS_IOU

__all__ = ["DEFAULT_CLASSES", "DetectorGroup", "load_detector_group", "parse_classes"]

DEFAULT_CLASSES = ("head",)  # what a request without ``classes`` gets (when the group has heads)
FACE_MODEL = "rnnpool_face_m4_face"


class _SingleDetector(Protocol):
    name: str
    class_names: tuple[str, ...]

    def __call__(self, image_bgr: np.ndarray, score_threshold: float | None = None,
                 max_detections: int | None = None) -> Detections: ...


def parse_classes(text: str | Sequence[str] | None) -> list[str] | None:
    """``"head,face"`` (or a list) -> ``["head", "face"]``; ``None`` -> ``None``; ``"all"`` -> ``["all"]``.

    Raises:
        ValueError: no class named.
    """
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    wanted = list(dict.fromkeys(c.strip() for c in items if c.strip()))
    if not wanted:
        raise ValueError("classes must name at least one class")
    return wanted


class DetectorGroup:
    """Detectors of different classes behind the interface of one.

    Args:
        detectors: one-model detectors (:class:`detector.inference.Detector` or the ONNX one); a class is taken from
            the first detector that has it.
        default_classes: classes returned when a call names none; default: ``head`` if present, else the first
            detector's classes.
    """

    def __init__(self, detectors: Sequence[_SingleDetector], default_classes: Sequence[str] | None = None) -> None:
        if not detectors:
            raise ValueError("a detector group needs at least one detector")
        self.detectors = list(detectors)
        names: list[str] = []
        for d in self.detectors:
            names += [c for c in d.class_names if c not in names]
        self.class_names: tuple[str, ...] = tuple(names)
        if default_classes is None:
            default_classes = DEFAULT_CLASSES if set(DEFAULT_CLASSES) <= set(names) else self.detectors[0].class_names
        self.default_classes: tuple[str, ...] = self.resolve(default_classes)

    @property
    def name(self) -> str:
        """The models' names joined by ``+`` (the head model alone: just its name)."""
        return "+".join(d.name for d in self.detectors)

    @property
    def primary(self) -> _SingleDetector:
        return self.detectors[0]

    def resolve(self, classes: Sequence[str] | None) -> tuple[str, ...]:
        """The classes a call returns, in the group's order: ``None`` = the defaults, ``["all"]`` = every class.

        Raises:
            ValueError: an unknown class (the message lists the known ones).
        """
        if classes is None:
            return self.default_classes
        if list(classes) == ["all"]:
            return self.class_names
        unknown = [c for c in classes if c not in self.class_names]
        if unknown:
            raise ValueError(f"unknown class(es) {', '.join(unknown)}; available: {', '.join(self.class_names)}")
        return tuple(c for c in self.class_names if c in classes)

    def model_names(self, classes: Sequence[str] | None = None) -> list[str]:
        """Names of the models a call with ``classes`` runs."""
        return [d.name for d, _ in self._plan(self.resolve(classes))]

    def _plan(self, wanted: tuple[str, ...]) -> list[tuple[_SingleDetector, list[str]]]:
        plan: list[tuple[_SingleDetector, list[str]]] = []
        taken: set[str] = set()
        for d in self.detectors:
            mine = [c for c in d.class_names if c in wanted and c not in taken]
            if mine:
                plan.append((d, mine))
                taken.update(mine)
        return plan

    def __call__(
        self,
        image_bgr: np.ndarray,
        score_threshold: float | None = None,
        max_detections: int | None = None,
        classes: Sequence[str] | None = None,
    ) -> Detections:
        """Detects the requested classes in one image.

        Args:
            image_bgr: ``(H, W, 3)`` uint8 BGR, ``(H, W, 4)`` BGRA or ``(H, W)`` grayscale.
            score_threshold: overrides each detector's threshold.
            max_detections: cap on the merged boxes (each class keeps its own top boxes first).
            classes: class names (``["all"]`` for every class); ``None`` = :attr:`default_classes`.

        Returns:
            Detections over the requested classes only (``class_names`` lists exactly them), by score.
        """
        wanted = self.resolve(classes)
        parts = []
        for d, mine in self._plan(wanted):
            if tuple(mine) == tuple(d.class_names):
                parts.append(d(image_bgr, score_threshold=score_threshold, max_detections=max_detections))
            else:  # the cap applies after the class filter (the top boxes may all be of another class)
                parts.append(d(image_bgr, score_threshold=score_threshold).filter(classes=mine))
        height, width = image_bgr.shape[:2]
        merged = Detections.concat(parts, wanted) if parts else Detections(
            np.zeros((0, 4)), np.zeros(0), np.zeros(0), wanted, (width, height))
        if max_detections is not None:
            merged = merged.select(slice(0, max_detections))
        return merged


def load_detector_group(
    weights: str | Path | None = None,
    model: str | None = None,
    backend: str = "torch",
    face_weights: str | Path | None = None,
    default_classes: Sequence[str] | None = None,
    score_threshold: float = 0.5,
    nms_iou: float = DEFAULT_NMS_IOU,
    max_detections: int = 750,
) -> DetectorGroup:
    """The detectors of the CLI, the web service and the webcam page.

    Args:
        weights, model, backend: the main (head) model, as in :func:`detector.backends.load_detector`.
        face_weights: weights of a face model; default: the shipped ``rnnpool_face_m4_face`` weights when they exist
            and the main model has no ``face`` class.
        default_classes: see :class:`DetectorGroup`.

    Raises:
        detector.checkpoint.WeightsError, ValueError: as :func:`~detector.backends.load_detector`.
    """
    from detector.backends import load_detector
    from detector.checkpoint import default_weights_path

    kwargs = dict(backend=backend, score_threshold=score_threshold, nms_iou=nms_iou, max_detections=max_detections)
    detectors = [load_detector(weights=weights, model=model, **kwargs)]
    if "face" not in detectors[0].class_names:
        if face_weights is not None:
            detectors.append(load_detector(weights=face_weights, **kwargs))
        elif default_weights_path(FACE_MODEL).is_file():
            detectors.append(load_detector(model=FACE_MODEL, **kwargs))
    return DetectorGroup(detectors, default_classes)
