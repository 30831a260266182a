"""ONNX export of the raw network, and an onnxruntime-backed :class:`~detector.inference.Detector`."""

from __future__ import annotations

import json
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from detector.fileio import atomic_open
from detector.inference import Detector
from detector.models.rnnpool_face import RNNPoolFace, RNNPoolFaceConfig

__all__ = ["EXPORT_VERSION", "OnnxDetector", "export_onnx"]

CONFIG_KEY = "rnnpool_face_config"
# Bumped whenever the exported graph changes for the same weights (cached exports are keyed by it).
# 2: RNNPool on s x s blocks (per-step gathers and Gemms, no windows), detection heads as one convolution each.
EXPORT_VERSION = 2


def export_onnx(model: RNNPoolFace, path: str | Path, opset: int = 17) -> Path:
    """Writes the network (input ``image`` ``(1, C, H, W)`` float 0..255 at the model's fixed ``input_size``;
    outputs ``cls_logits (1, A, K)`` and ``box_deltas (1, A, 4)``) with its config in the metadata, atomically.

    The graph is the model's own forward, traced in its ONNX form (:func:`torch.onnx.is_in_onnx_export`: RNNPool's
    steps laid out for onnxruntime, see :func:`detector.nn.rnnpool._fastgrnn_blocks`), with constants folded.
    """
    import onnx

    model = model.cpu().eval()
    w, h = model.config.input_size
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, model.config.in_channels, h, w),), buffer, input_names=["image"],
                          output_names=["cls_logits", "box_deltas"], opset_version=opset, dynamo=False,
                          do_constant_folding=True)
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in ((CONFIG_KEY, json.dumps(model.config.to_dict())), ("export_version", str(EXPORT_VERSION))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path = Path(path)
    with atomic_open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return path


class OnnxDetector(Detector):
    """:class:`Detector` whose network runs in onnxruntime (CPU).

    The exported graph has a fixed input shape, so images are resized to the model's ``input_size`` (``resize =
    "fixed"``) rather than to its area; decoding and NMS are the torch backend's.

    The session uses onnxruntime's full graph optimisation (operator fusion, blocked NCHWc convolutions) and its
    intra-op thread pool, sequential execution; worker threads spin between operators (``allow_spinning``), which
    matters for a graph of many small operators.

    Args:
        onnx_path: a file written by :func:`export_onnx`.
        score_threshold, nms_iou, max_detections: as for :class:`Detector`.
        threads: onnxruntime intra-op threads (0 = its default, one per physical core).
        allow_spinning: let idle pool threads spin while a run is in progress (onnxruntime's default); ``False``
            gives the cores back at once, for machines shared with other busy processes.
    """

    def __init__(self, onnx_path: str | Path, score_threshold: float = 0.5, nms_iou: float = 0.3,
                 max_detections: int = 750, threads: int = 0, allow_spinning: bool = True) -> None:
        import onnxruntime as ort

        from detector.checkpoint import WeightsError

        path = Path(onnx_path)
        if not path.is_file():
            raise WeightsError(f"ONNX file not found: {path}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads:
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
            config = RNNPoolFaceConfig.from_dict(json.loads(meta[CONFIG_KEY]))
        except Exception as e:  # noqa: BLE001 - any unreadable or foreign file
            raise WeightsError(f"{path} is not an RNNPool-Face ONNX export ({str(e).splitlines()[0][:120]})") from None
        # A weightless twin of the network for its geometry (anchors); the ONNX graph does the compute.
        super().__init__(model=RNNPoolFace(config), score_threshold=score_threshold, nms_iou=nms_iou,
                         max_detections=max_detections, resize="fixed")
        self.weights_path = path

    def run_network(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        cls_logits, box_deltas = self.session.run(None, {"image": np.ascontiguousarray(x[None], dtype=np.float32)})
        return torch.from_numpy(cls_logits), torch.from_numpy(box_deltas)
