"""ONNX export of the raw network, and an onnxruntime-backed :class:`~detector.inference.Detector`."""

from __future__ import annotations

import json
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detector.fileio import atomic_open
from detector.inference import Detector
from detector.models.rnnpool_face import RNNPoolFace, RNNPoolFaceConfig
from detector.postprocess import DEFAULT_NMS_IOU

__all__ = ["EXPORT_VERSION", "OnnxDetector", "export_onnx", "export_onnx_after_rnnpool", "onnx_session"]

CONFIG_KEY = "rnnpool_face_config"
PART_KEY = "part"  # which part of the network the graph holds:
PART_FULL = "full"  # all of it (export_onnx)
PART_AFTER_RNNPOOL = "after_rnnpool"  # blocks and heads (export_onnx_after_rnnpool)
# Bumped whenever the exported graph changes for the same weights (cached exports are keyed by it).
# 2: RNNPool on s x s blocks (per-step gathers and Gemms, no windows), detection heads as one convolution each.
EXPORT_VERSION = 2


def export_onnx(model: RNNPoolFace, path: str | Path, opset: int = 17) -> Path:
    """Writes the network (input ``image`` ``(1, C, H, W)`` float 0..255 at the model's fixed ``input_size``;
    outputs ``cls_logits (1, A, K)`` and ``box_deltas (1, A, 4)``) with its config in the metadata, atomically.

    The graph is the model's own forward, traced in its ONNX form (:func:`torch.onnx.is_in_onnx_export`: RNNPool's
    steps laid out for onnxruntime, see :func:`detector.nn.rnnpool._fastgrnn_blocks`), with constants folded.
    """
    model = model.cpu().eval()
    w, h = model.config.input_size
    return _export(model, torch.zeros(1, model.config.in_channels, h, w), "image", None, PART_FULL, path, opset)


class _AfterRNNPool(nn.Module):
    def __init__(self, model: RNNPoolFace) -> None:
        super().__init__()
        self.model = model

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.forward_pooled(pooled)


def export_onnx_after_rnnpool(model: RNNPoolFace, path: str | Path, opset: int = 17) -> Path:
    """Writes the network after RNNPool (:meth:`RNNPoolFace.forward_pooled`): input ``pooled`` ``(1, 4 * h2, h', w')``
    with ``h'``, ``w'`` free (any input size), the outputs of :func:`export_onnx`; for :class:`detector.native.
    NativeDetector`, which runs the front in C."""
    model = model.cpu().eval()
    w, h = model.config.input_size
    with torch.no_grad():
        pooled = model.forward_front(torch.zeros(1, model.config.in_channels, h, w))
    return _export(_AfterRNNPool(model), pooled.contiguous(), "pooled", {"pooled": {2: "height", 3: "width"}},
                   PART_AFTER_RNNPOOL, path, opset, config=model.config)


def _export(module: nn.Module, example: Tensor, input_name: str, dynamic_axes: dict | None, part: str,
            path: str | Path, opset: int, config: RNNPoolFaceConfig | None = None) -> Path:
    import onnx

    config = config or module.config
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buffer, input_names=[input_name],
                          output_names=["cls_logits", "box_deltas"], opset_version=opset, dynamo=False,
                          do_constant_folding=True, dynamic_axes=dynamic_axes)
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in ((CONFIG_KEY, json.dumps(config.to_dict())), ("export_version", str(EXPORT_VERSION)),
                       (PART_KEY, part)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path = Path(path)
    with atomic_open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return path


def onnx_session(path: Path, threads: int = 0, allow_spinning: bool = True,
                 spin_after_run: bool = True) -> tuple[Any, RNNPoolFaceConfig, str]:
    """An onnxruntime CPU session on an export of this module, with the stored config and part.

    Full graph optimisation (operator fusion, blocked NCHWc convolutions), the intra-op thread pool (``threads``; 0 =
    onnxruntime's default, one per physical core), sequential execution; worker threads spin between operators
    (``allow_spinning``), which matters for a graph of many small operators. With ``spin_after_run=False`` they stop
    spinning as soon as a run returns (``session.force_spinning_stop``), so that they do not take the cores from
    whatever the caller does next (the native backend's C threads).

    Raises:
        detector.checkpoint.WeightsError: missing file, or not an RNNPool-Face export.
    """
    import onnxruntime as ort

    from detector.checkpoint import WeightsError

    if not path.is_file():
        raise WeightsError(f"ONNX file not found: {path}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    if not spin_after_run:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        config = RNNPoolFaceConfig.from_dict(json.loads(meta[CONFIG_KEY]))
    except Exception as e:  # noqa: BLE001 - any unreadable or foreign file
        raise WeightsError(f"{path} is not an RNNPool-Face ONNX export ({str(e).splitlines()[0][:120]})") from None
    return session, config, meta.get(PART_KEY, PART_FULL)


class OnnxDetector(Detector):
    """:class:`Detector` whose network runs in onnxruntime (CPU).

    The exported graph has a fixed input shape, so images are resized to the model's ``input_size`` (``resize =
    "fixed"``) rather than to its area; decoding and NMS are the torch backend's.

    Session options: :func:`onnx_session`.

    Args:
        onnx_path: a file written by :func:`export_onnx`.
        score_threshold, nms_iou, max_detections: as for :class:`Detector`.
        threads: onnxruntime intra-op threads (0 = its default, one per physical core).
        allow_spinning: let idle pool threads spin while a run is in progress (onnxruntime's default); ``False``
            gives the cores back at once, for machines shared with other busy processes.
    """

    def __init__(self, onnx_path: str | Path, score_threshold: float = 0.5, nms_iou: float = DEFAULT_NMS_IOU,
                 max_detections: int = 750, threads: int = 0, allow_spinning: bool = True) -> None:
        from detector.checkpoint import WeightsError

        path = Path(onnx_path)
        self.session, config, part = onnx_session(path, threads, allow_spinning)
        if part != PART_FULL:
            raise WeightsError(f"{path} holds only the network after RNNPool (an export for the native backend)")
        # A weightless twin of the network for its geometry (anchors); the ONNX graph does the compute.
        super().__init__(model=RNNPoolFace(config), score_threshold=score_threshold, nms_iou=nms_iou,
                         max_detections=max_detections, resize="fixed")
        self.weights_path = path

    def run_network(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        cls_logits, box_deltas = self.session.run(None, {"image": np.ascontiguousarray(x[None], dtype=np.float32)})
        return torch.from_numpy(cls_logits), torch.from_numpy(box_deltas)
