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

__all__ = ["OnnxDetector", "export_onnx"]

CONFIG_KEY = "rnnpool_face_config"


def export_onnx(model: RNNPoolFace, path: str | Path, opset: int = 17) -> Path:
    """Writes the network (input ``image`` ``(1, C, H, W)`` float 0..255 at the model's fixed ``input_size``;
    outputs ``cls_logits (1, A, K)`` and ``box_deltas (1, A, 4)``) with its config in the metadata, atomically."""
    import onnx

    model = model.cpu().eval()
    w, h = model.config.input_size
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, model.config.in_channels, h, w),), buffer, input_names=["image"],
                          output_names=["cls_logits", "box_deltas"], opset_version=opset, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = CONFIG_KEY, json.dumps(model.config.to_dict())
    path = Path(path)
    with atomic_open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return path


class OnnxDetector(Detector):
    """:class:`Detector` whose network runs in onnxruntime (CPU).

    The exported graph has a fixed input shape, so images are resized to the model's ``input_size`` (``resize =
    "fixed"``) rather than to its area; decoding and NMS are the torch backend's.

    Args:
        onnx_path: a file written by :func:`export_onnx`.
        score_threshold, nms_iou, max_detections: as for :class:`Detector`.
        threads: onnxruntime intra-op threads (0 = its default).
    """

    def __init__(self, onnx_path: str | Path, score_threshold: float = 0.5, nms_iou: float = 0.3,
                 max_detections: int = 750, threads: int = 0) -> None:
        import onnxruntime as ort

        from detector.checkpoint import WeightsError

        path = Path(onnx_path)
        if not path.is_file():
            raise WeightsError(f"ONNX file not found: {path}")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
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
        cls_logits, box_deltas = self.session.run(None, {"image": x[None].astype(np.float32)})
        return torch.from_numpy(cls_logits), torch.from_numpy(box_deltas)
