"""Detection metrics: VOC all-point AP, COCO metrics through pycocotools, and precision-recall plots.

Coordinate frame: every box here is ``xyxy`` in continuous pixel coordinates of the *original* image (the frame of
:class:`~detector.datasets.records.ImageRecord`), with no ``+1`` convention: ``(0, 0, 10, 10)`` has area 100.

Matching rules shared by :func:`voc_ap` and :func:`coco_metrics` (pycocotools implements the same ones):

* Detections of one label are visited by descending score (stable sort: ties keep record order, then the order
  inside :class:`ImagePredictions`). Each takes the *still unmatched* ground-truth box of highest IoU
  ``>= iou_threshold`` in its image and becomes a true positive (this is COCO's greedy rule; the VOC devkit instead
  calls a detection FP when its single best-IoU box is already taken).
* A detection that takes no ground-truth box is a false positive -- including duplicates of an already matched box --
  unless it lies on an ignore region: ``area(det ∩ region) / area(det) >= iou_threshold`` (intersection over the
  *detection's* area, "IoA"). Then it counts neither as TP nor FP. This is exactly how pycocotools scores detections
  against ``iscrowd=1`` annotations, and it covers both "IoU with the region >= threshold" (IoA >= IoU always) and
  "mostly inside a large region" (e.g. a crowd of unlabelled faces). Ignore regions are class-agnostic and may absorb
  any number of detections. WIDER FACE's official evaluation likewise drops detections matched to invalid faces.
* Ground-truth boxes of other labels play no part (they are neither targets nor ignore regions).

``import detector.evaluation`` needs only numpy; pycocotools and matplotlib are imported inside the functions that use
them.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from detector.datasets.records import ImageRecord

__all__ = [
    "APResult",
    "ImagePredictions",
    "Predictions",
    "all_point_ap",
    "coco_metrics",
    "match_image",
    "plot_pr_curve",
    "voc_ap",
]

# Status codes of :func:`match_image`.
FP, TP, IGNORED = 0, 1, -1


@dataclass
class ImagePredictions:
    """Detections of one image, in pixels of the original image.

    Attributes:
        boxes_xyxy: ``(K, 4)`` float boxes, xyxy pixels of the original (unresized) image.
        scores: ``(K,)`` float confidences; higher is more confident.
        labels: ``(K,)`` int64 1-based class indices; ``None`` means all ``1``.
    """

    boxes_xyxy: np.ndarray
    scores: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.boxes_xyxy = np.asarray(self.boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if self.labels is None:
            self.labels = np.ones(len(self.scores), dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if not len(self.boxes_xyxy) == len(self.scores) == len(self.labels):
            raise ValueError(
                f"{len(self.boxes_xyxy)} boxes, {len(self.scores)} scores and {len(self.labels)} labels differ"
            )

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> ImagePredictions:
        """No detections."""
        return cls(np.zeros((0, 4)), np.zeros((0,)))

    def select(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``(k, 4)`` float64 and scores ``(k,)`` of one label, in stored order."""
        keep = self.labels == label
        return self.boxes_xyxy[keep], self.scores[keep]


Predictions = Mapping[str, ImagePredictions]
"""Detections keyed by :attr:`ImageRecord.image_id`; a record without an entry has no detections.

Values may be any object with ``boxes_xyxy``, ``scores`` and ``labels`` arrays in the same frame, e.g.
``detector.detections.Detections``."""


@dataclass
class APResult:
    """Outcome of :func:`voc_ap` for one label at one IoU threshold.

    The curve arrays have one entry per *counted* detection (TP or FP; ignored ones are dropped), sorted by descending
    score: entry ``i`` describes the operating point "keep the ``i + 1`` highest-scoring counted detections".

    Attributes:
        ap: all-point interpolated average precision in ``[0, 1]``; ``0.0`` when there is no ground truth.
        precision: ``(N,)`` float64 raw (not interpolated) precision ``tp / (tp + fp)``.
        recall: ``(N,)`` float64 recall ``tp / num_gt``; empty when ``num_gt == 0``.
        scores: ``(N,)`` float64 score of each counted detection (the threshold of each operating point).
        num_gt: ground-truth boxes of the label over all images (ignore regions excluded).
        num_det: detections of the label over all images, ignored ones included.
        tp: true positives in total.
        fp: false positives in total.
        num_ignored: detections that fell on ignore regions (``num_det == tp + fp + num_ignored``).
        iou_threshold: the IoU threshold used.
        label: the evaluated label.
    """

    ap: float
    precision: np.ndarray
    recall: np.ndarray
    num_gt: int
    num_det: int
    tp: int
    fp: int
    num_ignored: int = 0
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,)))
    iou_threshold: float = 0.5
    label: int = 1


# --------------------------------------------------------------------------------------------------------------------
# Box math (numpy, float64)


def _area(boxes: np.ndarray) -> np.ndarray:
    """Areas ``(N,)`` of xyxy boxes ``(N, 4)``; inverted boxes count as 0."""
    wh = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None)
    return wh[:, 0] * wh[:, 1]


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection areas ``(N, M)`` of xyxy boxes ``(N, 4)`` and ``(M, 4)``."""
    iw = np.minimum(a[:, 2, None], b[None, :, 2]) - np.maximum(a[:, 0, None], b[None, :, 0])
    ih = np.minimum(a[:, 3, None], b[None, :, 3]) - np.maximum(a[:, 1, None], b[None, :, 1])
    np.maximum(iw, 0.0, out=iw)
    np.maximum(ih, 0.0, out=ih)
    return iw * ih


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with 0 where ``den <= 0``."""
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape))
    np.divide(num, den, out=out, where=np.broadcast_to(den > 0, out.shape))
    return out


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``(N, M)`` of xyxy boxes ``(N, 4)`` and ``(M, 4)``; 0 where the union is empty."""
    inter = _intersection(a, b)
    return _safe_div(inter, _area(a)[:, None] + _area(b)[None, :] - inter)


def _pairwise_ioa(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the area of ``a``: ``(N, M)``; 0 for empty ``a`` boxes."""
    return _safe_div(_intersection(a, b), _area(a)[:, None])


# --------------------------------------------------------------------------------------------------------------------
# Matching and AP


def match_image(
    det_xyxy: np.ndarray, gt_xyxy: np.ndarray, ignore_xyxy: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """Classify the detections of one image (one label) as TP, FP or ignored.

    Args:
        det_xyxy: ``(K, 4)`` detections, already sorted by descending score (the greedy order).
        gt_xyxy: ``(G, 4)`` ground-truth boxes of the same label.
        ignore_xyxy: ``(I, 4)`` ignore regions.
        iou_threshold: a match needs IoU ``>=`` this (and IoA ``>=`` this for ignore regions).

    Returns:
        ``(K,)`` int8 status per detection: ``1`` TP, ``0`` FP, ``-1`` ignored (see the module docstring).
    """
    status = np.full(len(det_xyxy), FP, dtype=np.int8)
    if len(det_xyxy) == 0:
        return status
    if len(gt_xyxy):
        iou = _pairwise_iou(det_xyxy, gt_xyxy)
        cand = iou >= iou_threshold
        pk, pj = np.nonzero(cand)  # candidate (detection, gt) pairs
        if len(pk):
            status[pk] = TP
            # A detection whose candidates nobody else wants gets its best one regardless of order; only detections
            # touching a contested box need the sequential greedy pass (exclusive boxes never get taken by others).
            contested = cand.sum(axis=0)[pj] > 1
            rows = np.unique(pk[contested])
            if len(rows):
                status[rows] = FP
                sel = np.isin(pk, rows)
                rk, rj = pk[sel], pj[sel]
                order = np.lexsort((-iou[rk, rj], rk))  # by detection (= score order), then IoU descending
                taken: set[int] = set()
                cur, done = -1, False
                for kk, jj in zip(rk[order].tolist(), rj[order].tolist(), strict=True):
                    if kk != cur:
                        cur, done = kk, False
                    if not done and jj not in taken:
                        taken.add(jj)
                        status[kk] = TP
                        done = True
    if len(ignore_xyxy):
        un = np.flatnonzero(status == FP)
        if len(un):
            ioa = _pairwise_ioa(det_xyxy[un], ignore_xyxy)
            status[un[ioa.max(axis=1) >= iou_threshold]] = IGNORED
    return status


def all_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+ all-point interpolated average precision.

    Precision is first made monotone (each point takes the highest precision at equal or higher recall), then
    integrated exactly over recall as a step function from recall 0: ``sum_i (r_i - r_{i-1}) * p_interp(r_i)``.
    Recall beyond the last point contributes nothing.

    Args:
        recall: ``(N,)`` non-decreasing recall per operating point.
        precision: ``(N,)`` precision per operating point.

    Returns:
        AP in ``[0, 1]``; ``0.0`` for empty input.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if recall.size == 0:
        return 0.0
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(recall, prepend=0.0)
    return float(np.sum(steps * envelope))


def _select(pred: ImagePredictions, label: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``(k, 4)`` and scores ``(k,)`` (float64) of one label from anything with ``boxes_xyxy/scores/labels``."""
    labels = pred.labels
    scores = np.asarray(pred.scores, dtype=np.float64).reshape(-1)
    boxes = np.asarray(pred.boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    keep = np.ones(len(scores), dtype=bool) if labels is None else np.asarray(labels).reshape(-1) == label
    return boxes[keep], scores[keep]


def _check_predictions(records: Sequence[ImageRecord], predictions: Predictions) -> None:
    ids = {r.image_id for r in records}
    if len(ids) != len(records):
        raise ValueError("records contain duplicate image_id values")
    unknown = [k for k in predictions if k not in ids]
    if unknown:
        raise ValueError(f"predictions for {len(unknown)} image(s) without a record, e.g. {unknown[0]!r}")


def voc_ap(
    records: Sequence[ImageRecord],
    predictions: Predictions,
    iou_threshold: float = 0.5,
    label: int = 1,
) -> APResult:
    """PASCAL VOC (2010+) all-point interpolated average precision of one label.

    Matching follows the module docstring: greedy by descending score across the whole set, each detection taking the
    unmatched ground-truth box of highest IoU ``>= iou_threshold`` in its image; duplicates are FP; unmatched
    detections on ignore regions (IoA ``>= iou_threshold``) are dropped.

    With no ground truth of ``label`` in ``records`` AP is undefined; it is reported as ``0.0`` with an empty
    ``recall`` and ``precision`` (``fp`` still counts the detections), so that an empty class never inflates a mean.

    Args:
        records: ground truth, boxes in original-image pixels.
        predictions: detections keyed by image id, same frame; images without an entry have no detections.
        iou_threshold: IoU needed for a match, in ``(0, 1]``.
        label: the 1-based class to evaluate.

    Returns:
        The AP and its precision-recall curve.

    Raises:
        ValueError: on duplicate record ids, predictions for unknown images, or a threshold outside ``(0, 1]``.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    _check_predictions(records, predictions)

    num_gt = 0
    all_scores: list[np.ndarray] = []
    all_status: list[np.ndarray] = []
    for rec in records:
        gt = rec.boxes_xyxy[rec.labels == label].astype(np.float64)
        num_gt += len(gt)
        pred = predictions.get(rec.image_id)
        if pred is None:
            continue
        boxes, scores = _select(pred, label)
        if len(scores) == 0:
            continue
        order = np.argsort(-scores, kind="stable")
        boxes, scores = boxes[order], scores[order]
        all_scores.append(scores)
        all_status.append(match_image(boxes, gt, rec.ignore_xyxy.astype(np.float64), iou_threshold))

    scores = np.concatenate(all_scores) if all_scores else np.zeros((0,))
    status = np.concatenate(all_status) if all_status else np.zeros((0,), dtype=np.int8)
    num_det = len(status)
    counted = status != IGNORED
    # Stable sort over the per-image sorted lists keeps each image's greedy order and breaks ties by record order.
    order = np.argsort(-scores[counted], kind="stable")
    scores, is_tp = scores[counted][order], status[counted][order] == TP
    tp_cum = np.cumsum(is_tp, dtype=np.float64)
    fp_cum = np.cumsum(~is_tp, dtype=np.float64)
    tp, fp = int(is_tp.sum()), int((~is_tp).sum())

    if num_gt == 0:
        precision = recall = np.zeros((0,))
        ap = 0.0
    else:
        recall = tp_cum / num_gt
        precision = tp_cum / np.maximum(tp_cum + fp_cum, 1.0)
        ap = all_point_ap(recall, precision)
    return APResult(
        ap=ap,
        precision=precision,
        recall=recall,
        num_gt=num_gt,
        num_det=num_det,
        tp=tp,
        fp=fp,
        num_ignored=num_det - tp - fp,
        scores=scores if num_gt else np.zeros((0,)),
        iou_threshold=float(iou_threshold),
        label=label,
    )


# --------------------------------------------------------------------------------------------------------------------
# COCO


DEFAULT_MAX_DETS = (1, 100, 1000)


def coco_metrics(
    records: Sequence[ImageRecord],
    predictions: Predictions,
    label: int = 1,
    max_dets: tuple[int, int, int] = DEFAULT_MAX_DETS,
    verbose: bool = False,
) -> dict[str, float]:
    """COCO box metrics of one label, computed by pycocotools.

    Ground truth goes through :func:`detector.datasets.coco.records_to_coco`: ignore regions become ``iscrowd=1``
    annotations, which pycocotools matches by intersection over the detection's area and whose matched detections it
    ignores -- the same rule as :func:`voc_ap`.

    ``params.maxDets`` is ``max_dets`` (default ``(1, 100, 1000)`` instead of COCO's ``(1, 10, 100)``): crowded
    scenes (SCUT-HEAD, WIDER) hold 100+ objects per image, and capping detections at 100 would cap recall. Every AP
    below, and ``AR``, use the largest cap. (pycocotools' own ``summarize()`` reports AP@[.5:.95] at a hard-coded
    100 detections, so the numbers are read from ``COCOeval.eval`` directly instead.)

    AP uses COCO's 101-point interpolated precision, so ``AP50`` differs slightly from ``voc_ap(..., 0.5).ap``
    (all-point) even on identical matches.

    Args:
        records: ground truth, boxes in original-image pixels.
        predictions: detections keyed by image id, same frame.
        label: the 1-based class to evaluate (a COCO category id).
        max_dets: three increasing per-image detection caps.
        verbose: let pycocotools print its progress and print a summary; otherwise all output is swallowed.

    Returns:
        ``AP`` (IoU .50:.05:.95), ``AP50``, ``AP75``, ``AP_small``, ``AP_medium``, ``AP_large``, ``AR`` (at the
        largest cap), ``AR@<n>`` for each cap, ``AR_small``, ``AR_medium``, ``AR_large``; all in ``[0, 1]``. With no
        ground truth of ``label`` at all every value is ``0.0`` (as in :func:`voc_ap`); an area range without ground
        truth gives ``nan``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from detector.datasets.coco import predictions_to_coco, records_to_coco

    _check_predictions(records, predictions)
    if len(max_dets) != 3 or list(max_dets) != sorted(max_dets):
        raise ValueError(f"max_dets must be three increasing caps, got {max_dets}")
    keys = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR"]
    keys += [f"AR@{m}" for m in max_dets] + ["AR_small", "AR_medium", "AR_large"]

    num_gt = sum(int((r.labels == label).sum()) for r in records)
    results = [d for d in predictions_to_coco(records, predictions) if d["category_id"] == label]
    if num_gt == 0 or not results:
        # pycocotools cannot load an empty result list; without ground truth the metrics are undefined (-> 0).
        out = dict.fromkeys(keys, 0.0)
        if num_gt == 0:
            return out
        # Detections absent but ground truth present: AP/AR are 0 wherever the area range has ground truth.
        for rng in ("small", "medium", "large"):
            if not _has_gt_in_range(records, label, rng):
                out[f"AP_{rng}"] = out[f"AR_{rng}"] = math.nan
        return out

    n_classes = max(label, max((int(r.labels.max()) for r in records if len(r.labels)), default=1))
    gt_dict = records_to_coco(records, class_names=tuple(f"class{i}" for i in range(1, n_classes + 1)))
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.catIds = [label]
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()

    p = ev.params
    prec = ev.eval["precision"][:, :, 0, :, -1]  # (T, R, A) at the largest cap
    rec = ev.eval["recall"][:, 0, :, :]  # (T, A, M)
    area = {lbl: i for i, lbl in enumerate(p.areaRngLbl)}
    t50 = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.5)))
    t75 = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.75)))

    def mean(x: np.ndarray) -> float:
        valid = x[x > -1]
        return float(valid.mean()) if valid.size else math.nan

    out = {
        "AP": mean(prec[:, :, area["all"]]),
        "AP50": mean(prec[t50, :, area["all"]]),
        "AP75": mean(prec[t75, :, area["all"]]),
        "AP_small": mean(prec[:, :, area["small"]]),
        "AP_medium": mean(prec[:, :, area["medium"]]),
        "AP_large": mean(prec[:, :, area["large"]]),
        "AR": mean(rec[:, area["all"], -1]),
    }
    for i, m in enumerate(max_dets):
        out[f"AR@{m}"] = mean(rec[:, area["all"], i])
    for rng in ("small", "medium", "large"):
        out[f"AR_{rng}"] = mean(rec[:, area[rng], -1])
    if verbose:
        for k in keys:
            print(f"{k:>10s} = {out[k]:.4f}")
    return out


_AREA_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e10)}


def _has_gt_in_range(records: Sequence[ImageRecord], label: int, rng: str) -> bool:
    """Whether any ground-truth box of ``label`` has a COCO area within the named range (bounds inclusive)."""
    lo, hi = _AREA_RANGES[rng]
    for r in records:
        a = _area(r.boxes_xyxy[r.labels == label].astype(np.float64))
        if np.any((a >= lo) & (a <= hi)):
            return True
    return False


# --------------------------------------------------------------------------------------------------------------------
# Plotting


def plot_pr_curve(
    results: Mapping[str, APResult] | APResult,
    path: str | Path,
    title: str = "Precision-recall",
) -> Path:
    """Draw precision-recall curves into a PNG.

    Each curve is the raw precision against recall (one point per counted detection), with the AP in the legend.
    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch).

    Args:
        results: one result, or several keyed by legend name (e.g. model or IoU threshold).
        path: output ``.png``; parent folders are created.
        title: figure title.

    Returns:
        The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(results, APResult):
        results = {f"IoU {results.iou_threshold:g}": results}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, res in results.items():
        # Start the curve at recall 0 with the first precision so a single point still draws a line.
        r = np.concatenate([[0.0], res.recall]) if res.recall.size else res.recall
        p = np.concatenate([res.precision[:1], res.precision]) if res.precision.size else res.precision
        ax.plot(r, p, drawstyle="steps-post", label=f"{name} (AP={res.ap:.3f}, n_gt={res.num_gt})")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
