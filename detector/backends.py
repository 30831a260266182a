"""Choosing an inference backend: PyTorch, onnxruntime, or C + onnxruntime, behind the same :class:`Detector`
interface."""

from __future__ import annotations

from pathlib import Path

from detector.inference import Detector
from detector.postprocess import DEFAULT_NMS_IOU

__all__ = ["BACKENDS", "cached_onnx", "load_detector"]

BACKENDS = ("torch", "onnx", "native")


def load_detector(
    weights: str | Path | None = None,
    model: str | None = None,
    backend: str = "torch",
    score_threshold: float = 0.5,
    nms_iou: float = DEFAULT_NMS_IOU,
    max_detections: int = 750,
) -> Detector:
    """A detector for the CLI, the web service and the webcam.

    Args:
        weights: torch and native: a weights file or checkpoint (default: the shipped weights of ``model``); onnx: an
            ``.onnx`` file from ``detect export onnx``, or torch weights exported on first use into
            ``~/.cache/rnnpool-face`` (default: the shipped weights).
        model: variant name for the default weights.
        backend: ``"torch"``; ``"onnx"`` (onnxruntime, fixed input size); ``"native"`` (the front in C compiled on
            first use, the rest in onnxruntime: :class:`detector.native.NativeDetector`).

    Raises:
        ValueError: unknown backend.
        detector.checkpoint.WeightsError: missing or unreadable weights.
        detector.native.NativeUnavailable: native backend without a working C compiler.
    """
    if backend == "torch":
        return Detector(weights=weights, model=model, score_threshold=score_threshold, nms_iou=nms_iou,
                        max_detections=max_detections)
    if backend == "onnx":
        from detector.export.onnx import OnnxDetector

        if weights is None or Path(weights).suffix != ".onnx":
            weights = cached_onnx(weights, model)
        return OnnxDetector(weights, score_threshold=score_threshold, nms_iou=nms_iou, max_detections=max_detections)
    if backend == "native":
        from detector.checkpoint import WeightsError
        from detector.native import NativeDetector

        if weights is not None and Path(weights).suffix == ".onnx":
            raise WeightsError("the native backend takes torch weights (.pt), not an .onnx file")
        return NativeDetector(weights=weights, model=model, score_threshold=score_threshold, nms_iou=nms_iou,
                              max_detections=max_detections)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def cached_onnx(weights: str | Path | None, model: str | None = None, part: str = "full") -> Path:
    """Exports torch weights to ONNX once, keyed by the weights file's content hash, the part of the network
    (``"full"``: :func:`~detector.export.onnx.export_onnx`; ``"after_rnnpool"``:
    :func:`~detector.export.onnx.export_onnx_after_rnnpool`) and the export format version (a newer, faster graph for
    the same weights is exported afresh)."""
    import hashlib
    import os

    from detector.checkpoint import DEFAULT_MODEL, default_weights_path, load_model
    from detector.export.onnx import (EXPORT_VERSION, PART_AFTER_RNNPOOL, PART_FULL, export_onnx,
                                      export_onnx_after_rnnpool)

    src = Path(weights) if weights is not None else default_weights_path(model or DEFAULT_MODEL)
    net, _ = load_model(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rnnpool-face"
    exporters = {PART_FULL: export_onnx, PART_AFTER_RNNPOOL: export_onnx_after_rnnpool}
    if part not in exporters:
        raise ValueError(f"unknown network part {part!r}")
    suffix = "" if part == PART_FULL else f"-{part}"
    out = cache / f"{src.stem}-{digest}-v{EXPORT_VERSION}{suffix}.onnx"
    if not out.is_file():
        exporters[part](net, out)
    return out
