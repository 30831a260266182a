"""High-level inference: a model + weights turning BGR images into :class:`Detections`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from detector.anchors import make_anchors
from detector.checkpoint import DEFAULT_MODEL, default_weights_path, load_model
from detector.detections import Detections
from detector.models import build_model
from detector.models.rnnpool_face import RNNPoolFace
from detector.postprocess import DEFAULT_NMS_IOU, PostprocessConfig, postprocess
from detector.preprocess import to_model_input

__all__ = ["Detector"]


class Detector:
    """Detects heads (or faces) in images of any size.

    Args:
        weights: a weights file or training checkpoint; ``None`` = the shipped weights of ``model``.
        model: variant name, used when ``weights`` is None (default ``rnnpool_face_m4``); or an already built
            :class:`RNNPoolFace` (then ``weights`` is ignored — for tests and training-time evaluation).
        score_threshold: minimum score of a returned box.
        nms_iou: NMS IoU threshold.
        max_detections: boxes per image.
        resize: ``"area"`` (the paper's protocol, default) or ``"fixed"``; see :func:`detector.preprocess.input_size_for`.
        device: torch device string.

    Raises:
        detector.checkpoint.WeightsError: unreadable or missing weights.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        model: str | RNNPoolFace | None = None,
        score_threshold: float = 0.5,
        nms_iou: float = DEFAULT_NMS_IOU,
        max_detections: int = 750,
        resize: str = "area",
        device: str = "cpu",
    ) -> None:
        if isinstance(model, RNNPoolFace):
            self.model, self.meta = model, {}
        else:
            path = Path(weights) if weights is not None else default_weights_path(model or DEFAULT_MODEL)
            self.model, self.meta = load_model(path)
            self.weights_path = path
        self.model = self.model.to(device).eval()
        self.device = torch.device(device)
        self.config = self.model.config
        self.resize = resize
        self.postprocess_config = PostprocessConfig(
            score_threshold=score_threshold, nms_iou=nms_iou, max_detections=max_detections
        )
        self._anchor_cache: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def untrained(cls, model: str = DEFAULT_MODEL, **kwargs) -> Detector:
        """A detector with randomly initialised weights (tests, benchmarks of speed)."""
        return cls(model=build_model(model), **kwargs)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    def anchors(self, height: int, width: int) -> torch.Tensor:
        """Anchors ``(A, 4)`` cxcywh for an ``height x width`` network input (cached)."""
        key = (height, width)
        if key not in self._anchor_cache:
            specs = self.model.anchor_specs()
            self._anchor_cache[key] = make_anchors(self.model.feature_sizes(height, width), specs).to(self.device)
        return self._anchor_cache[key]

    def run_network(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs for one preprocessed input ``(C, h, w)`` float32: ``(1, A, K)`` logits, ``(1, A, 4)`` deltas."""
        with torch.inference_mode():
            return self.model(torch.from_numpy(x)[None].to(self.device))

    def __call__(
        self, image_bgr: np.ndarray, score_threshold: float | None = None, max_detections: int | None = None
    ) -> Detections:
        """Detects in one image.

        Args:
            image_bgr: ``(H, W, 3)`` uint8 BGR (OpenCV order), ``(H, W, 4)`` BGRA or ``(H, W)`` grayscale.
            score_threshold: overrides the detector's threshold for this call.
            max_detections: overrides the detector's cap for this call.

        Returns:
            Detections in pixels of ``image_bgr``.
        """
        if not isinstance(image_bgr, np.ndarray) or image_bgr.ndim not in (2, 3) or image_bgr.size == 0:
            raise ValueError("expected a non-empty HxW or HxWxC image array")
        config = self.postprocess_config
        if score_threshold is not None or max_detections is not None:
            config = dataclasses.replace(
                config,
                score_threshold=config.score_threshold if score_threshold is None else score_threshold,
                max_detections=config.max_detections if max_detections is None else max_detections,
            )
        x, scale = to_model_input(image_bgr, self.config, self.resize)
        cls_logits, box_deltas = self.run_network(x)
        height, width = image_bgr.shape[:2]
        return postprocess(cls_logits, box_deltas, self.anchors(*x.shape[1:]), [scale], [(width, height)],
                           self.class_names, config)[0]
