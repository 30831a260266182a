"""Export ground truth and detections in COCO json form (for pycocotools and other COCO tooling).

Boxes go from :class:`~detector.datasets.records.ImageRecord`'s ``xyxy`` pixels to COCO's ``[x, y, w, h]`` pixels of
the same (original) image, continuous coordinates, no ``+1``. Image ids are integers ``1..N`` in record order (see
:func:`coco_image_ids`); the record's own string id is kept in each image entry as ``"image_key"``. Category ids are
the records' 1-based labels.

Command line::

    python -m detector.datasets.coco --data DIR --split NAME --out file.json [--format voc|wider]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detector.datasets.records import ImageRecord
from detector.fileio import atomic_open

if TYPE_CHECKING:
    from detector.evaluation import ImagePredictions

__all__ = ["coco_image_ids", "main", "predictions_to_coco", "records_to_coco", "write_coco_json"]


def coco_image_ids(records: Sequence[ImageRecord]) -> dict[str, int]:
    """Integer COCO image id of each record: ``1 + position`` in ``records``.

    Raises:
        ValueError: if two records share an ``image_id``.
    """
    ids = {r.image_id: i + 1 for i, r in enumerate(records)}
    if len(ids) != len(records):
        raise ValueError("records contain duplicate image_id values")
    return ids


def _xywh(boxes_xyxy: np.ndarray) -> list[list[float]]:
    """``(N, 4)`` xyxy pixels -> list of ``[x, y, w, h]`` Python floats (exact values of the float32 input)."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
    return xywh.tolist()


def _file_name(path: Path, image_root: Path | None) -> str:
    if image_root is not None:
        try:
            return path.relative_to(image_root).as_posix()
        except ValueError:
            pass
    return path.name


def records_to_coco(
    records: Sequence[ImageRecord],
    class_names: Sequence[str] = ("head",),
    image_root: str | Path | None = None,
) -> dict[str, Any]:
    """Ground truth as a COCO detection dataset dict.

    * ``images``: ``id`` (see :func:`coco_image_ids`), ``file_name`` (path relative to ``image_root`` when given and
      possible, else the bare file name), ``width``, ``height``, and ``image_key`` (the record's ``image_id``).
    * ``annotations``: one per box with ``bbox`` ``[x, y, w, h]`` pixels, ``area = w * h``, ``iscrowd = 0``,
      ``category_id`` = the 1-based label, and a rectangle polygon as ``segmentation`` (for tools that expect one).
      Each ignore region becomes an ``iscrowd = 1`` annotation *for every category* (ignore regions are
      class-agnostic), which pycocotools scores by intersection over detection area and ignores matched detections.
    * ``categories``: ``{"id": i + 1, "name": class_names[i]}``.

    Args:
        records: ground truth.
        class_names: name of label ``i + 1`` at index ``i``.
        image_root: folder that ``file_name`` is relative to.

    Returns:
        A json-serialisable dict with ``info``, ``licenses``, ``images``, ``annotations``, ``categories``.

    Raises:
        ValueError: on duplicate image ids or labels outside ``1..len(class_names)``.
    """
    root = Path(image_root) if image_root is not None else None
    ids = coco_image_ids(records)
    n_cls = len(class_names)
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []

    def add(image_id: int, xywh: list[float], category: int, crowd: int) -> None:
        x, y, w, h = xywh
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": category,
                "bbox": [x, y, w, h],
                "area": max(w, 0.0) * max(h, 0.0),
                "iscrowd": crowd,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            }
        )

    for rec in records:
        iid = ids[rec.image_id]
        images.append(
            {
                "id": iid,
                "file_name": _file_name(rec.path, root),
                "width": int(rec.width),
                "height": int(rec.height),
                "image_key": rec.image_id,
            }
        )
        if len(rec.labels) and (rec.labels.min() < 1 or rec.labels.max() > n_cls):
            raise ValueError(f"{rec.image_id}: labels must be in 1..{n_cls}, got {sorted(set(rec.labels.tolist()))}")
        for xywh, lab in zip(_xywh(rec.boxes_xyxy), rec.labels.tolist(), strict=True):
            add(iid, xywh, int(lab), 0)
        for xywh in _xywh(rec.ignore_xyxy):
            for cat in range(1, n_cls + 1):
                add(iid, xywh, cat, 1)

    return {
        "info": {"description": "RNNPool-Face ground truth", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": i + 1, "name": str(n), "supercategory": "object"} for i, n in enumerate(class_names)],
    }


def predictions_to_coco(
    records: Sequence[ImageRecord], predictions: Mapping[str, ImagePredictions]
) -> list[dict[str, Any]]:
    """Detections as a COCO results list (what ``COCO.loadRes`` takes).

    Args:
        records: the ground truth the detections belong to; fixes the integer image ids.
        predictions: detections keyed by record ``image_id``, xyxy pixels of the original image (``ImagePredictions``
            or anything with ``boxes_xyxy``/``scores``/``labels``, e.g. ``detector.detections.Detections``).

    Returns:
        ``[{"image_id": int, "category_id": label, "bbox": [x, y, w, h], "score": float}, ...]`` in record order,
        then stored order.

    Raises:
        ValueError: for predictions of an image id that has no record.
    """
    ids = coco_image_ids(records)
    unknown = [k for k in predictions if k not in ids]
    if unknown:
        raise ValueError(f"predictions for {len(unknown)} image(s) without a record, e.g. {unknown[0]!r}")
    out: list[dict[str, Any]] = []
    for rec in records:
        pred = predictions.get(rec.image_id)
        if pred is None:
            continue
        iid = ids[rec.image_id]
        scores = np.asarray(pred.scores, dtype=np.float64).reshape(-1).tolist()
        labels = [1] * len(scores) if pred.labels is None else np.asarray(pred.labels).reshape(-1).tolist()
        for xywh, lab, score in zip(_xywh(pred.boxes_xyxy), labels, scores, strict=True):
            out.append({"image_id": iid, "category_id": int(lab), "bbox": xywh, "score": float(score)})
    return out


def _atomic_write_json(obj: Any, path: Path, indent: int | None) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)


def write_coco_json(
    records: Sequence[ImageRecord],
    path: str | Path,
    class_names: Sequence[str] = ("head",),
    image_root: str | Path | None = None,
    indent: int | None = None,
) -> Path:
    """Write :func:`records_to_coco` to ``path`` atomically (temporary file in the same folder, then ``os.replace``).

    Returns:
        The written path.
    """
    path = Path(path)
    _atomic_write_json(records_to_coco(records, class_names, image_root), path, indent)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Convert a VOC-style (SCUT-HEAD) or WIDER FACE split to a COCO ground-truth json.

    Returns:
        Process exit status (0 on success).
    """
    ap = argparse.ArgumentParser(prog="python -m detector.datasets.coco", description=main.__doc__)
    ap.add_argument("--data", required=True, type=Path, help="dataset root folder")
    ap.add_argument("--split", required=True, help="VOC image set (e.g. test) or WIDER subset (e.g. val)")
    ap.add_argument("--out", required=True, type=Path, help="output .json")
    ap.add_argument("--format", choices=("voc", "wider"), default="voc", help="dataset layout (default: voc)")
    ap.add_argument("--class-name", default=None, help="category name (default: head for voc, face for wider)")
    ap.add_argument("--image-root", type=Path, default=None, help="make file_name relative to this folder")
    ap.add_argument("--indent", type=int, default=None, help="pretty-print the json")
    args = ap.parse_args(argv)

    if args.format == "voc":
        from detector.datasets.voc import load_voc

        records, report = load_voc(args.data, args.split)
        name = args.class_name or "head"
    else:
        from detector.datasets.wider import load_wider

        records, report = load_wider(args.data, args.split)
        name = args.class_name or "face"

    summary = getattr(report, "summary", None)
    if callable(summary):
        print(summary(), file=sys.stderr)
    path = write_coco_json(records, args.out, class_names=(name,), image_root=args.image_root, indent=args.indent)
    n_box = sum(len(r.boxes_xyxy) for r in records)
    n_ign = sum(len(r.ignore_xyxy) for r in records)
    print(f"wrote {path}: {len(records)} images, {n_box} boxes, {n_ign} ignore regions", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
