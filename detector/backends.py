"""Choosing an inference backend: PyTorch or onnxruntime, behind the same :class:`Detector` interface."""

from __future__ import annotations

from pathlib import Path

from detector.inference import Detector

__all__ = ["BACKENDS", "load_detector"]

BACKENDS = ("torch", "onnx")


def load_detector(
    weights: str | Path | None = None,
    model: str | None = None,
    backend: str = "torch",
    score_threshold: float = 0.5,
    nms_iou: float = 0.3,
    max_detections: int = 750,
) -> Detector:
    """A detector for the CLI, the web service and the webcam.

    Args:
        weights: torch: a weights file or checkpoint (default: the shipped weights of ``model``); onnx: an ``.onnx``
            file from ``detect export onnx`` (default: the shipped weights exported next to them, on first use,
            into ``~/.cache/rnnpool-face``).
        model: variant name for the default weights.
        backend: ``"torch"`` or ``"onnx"``.

    Raises:
        ValueError: unknown backend.
        detector.checkpoint.WeightsError: missing or unreadable weights.
    """
    if backend == "torch":
        return Detector(weights=weights, model=model, score_threshold=score_threshold, nms_iou=nms_iou,
                        max_detections=max_detections)
    if backend == "onnx":
        from detector.export.onnx import OnnxDetector

        if weights is None or Path(weights).suffix != ".onnx":
            weights = _cached_onnx(weights, model)
        return OnnxDetector(weights, score_threshold=score_threshold, nms_iou=nms_iou, max_detections=max_detections)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _cached_onnx(weights: str | Path | None, model: str | None) -> Path:
    """Exports torch weights to ONNX once, keyed by the weights file's content hash and the export format version
    (a newer, faster graph for the same weights is exported afresh)."""
    import hashlib
    import os

    from detector.checkpoint import DEFAULT_MODEL, default_weights_path, load_model
    from detector.export.onnx import EXPORT_VERSION, export_onnx

    src = Path(weights) if weights is not None else default_weights_path(model or DEFAULT_MODEL)
    net, _ = load_model(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rnnpool-face"
    out = cache / f"{src.stem}-{digest}-v{EXPORT_VERSION}.onnx"
    if not out.is_file():
        export_onnx(net, out)
    return out
