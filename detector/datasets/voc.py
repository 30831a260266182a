"""Pascal VOC layout loader (SCUT-HEAD Part B) that repairs the annotation defects of the real release.

Layout::

    root/JPEGImages/<id>.jpg
    root/Annotations/<id>.xml
    root/ImageSets/Main/<split>.txt     # one id per line

Box convention: VOC ``bndbox`` values are taken as continuous pixel coordinates as they are (no ``-1`` shift):
SCUT-HEAD boxes touch both ``0`` and the image width, so the 1-based VOC convention is not followed by the data.

Defects are repaired or skipped, never raised, and each one is counted in a :class:`LoadReport`; the loader logs
exactly one summary line per call.
"""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from detector.datasets.records import ImageRecord

__all__ = ["LoadReport", "load_voc", "read_image_size", "sanitize_boxes"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_BNDBOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class LoadReport:
    """Counts of what a loader kept, repaired and skipped; shared by all annotation loaders.

    Box counters count boxes of both kinds (objects and ignore regions).

    Attributes:
        source: what was loaded, e.g. ``"voc scut_head/partB_train"``.
        images: records returned.
        boxes: object boxes in the returned records.
        ignored: ignore regions in the returned records (VOC ``difficult``, WIDER ``invalid``).
        empty_images: returned records without any object box (kept as negatives).
        size_from_image: annotations whose ``<size>`` was 0x0/missing, replaced by the image's size.
        size_mismatch: annotations whose non-zero ``<size>`` disagreed with the image (the image wins).
        renamed: objects with an unknown class name mapped to a known class.
        swapped: boxes with ``max < min`` on an axis, repaired by swapping.
        clipped: boxes partly outside the image, clipped to it.
        dropped_degenerate: boxes of zero width or height (after clipping), dropped.
        dropped_unknown_class: objects whose class name could not be mapped, dropped.
        malformed: objects or lines with missing/non-numeric coordinates, dropped.
        missing_annotation: ids without an annotation file, skipped.
        missing_image: ids/entries without an image file, skipped.
        unreadable: annotation or image files that exist but cannot be parsed, skipped.
        duplicate_ids: repeated ids in the split file, loaded once.
        unknown_names: raw class names that were renamed or dropped, with counts.
    """

    source: str = ""
    images: int = 0
    boxes: int = 0
    ignored: int = 0
    empty_images: int = 0
    size_from_image: int = 0
    size_mismatch: int = 0
    renamed: int = 0
    swapped: int = 0
    clipped: int = 0
    dropped_degenerate: int = 0
    dropped_unknown_class: int = 0
    malformed: int = 0
    missing_annotation: int = 0
    missing_image: int = 0
    unreadable: int = 0
    duplicate_ids: int = 0
    unknown_names: Counter[str] = field(default_factory=Counter)

    # Counters that mean data was lost (a warning), as opposed to repaired (info).
    _LOSSY = ("dropped_degenerate", "dropped_unknown_class", "malformed", "missing_annotation", "missing_image",
              "unreadable")
    _KEPT = ("images", "boxes", "ignored", "empty_images")

    @property
    def lossy(self) -> bool:
        """True when any annotation or image was dropped or skipped."""
        return any(getattr(self, name) for name in self._LOSSY)

    def summary(self) -> str:
        """One line: what was kept, then every non-zero repair/skip counter."""
        kept = ", ".join(f"{getattr(self, name)} {name.replace('_', ' ')}" for name in self._KEPT)
        defects = [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if f.type in ("int", int) and f.name not in self._KEPT and getattr(self, f.name)
        ]
        line = f"{self.source}: {kept}"
        if defects:
            line += " | " + " ".join(defects)
        if self.unknown_names:
            names = ", ".join(f"{name!r}x{n}" for name, n in self.unknown_names.most_common(5))
            line += f" | unknown class names: {names}"
        return line

    def log(self, log: logging.Logger) -> None:
        """Emit the single summary line: WARNING if data was lost, INFO otherwise."""
        log.log(logging.WARNING if self.lossy else logging.INFO, "%s", self.summary())


def read_image_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` of an image file, or ``None`` when it is missing or unreadable.

    Reads only the header with Pillow when it is installed; falls back to a full cv2 decode. The size is that of the
    stored pixel array (EXIF orientation is not applied, matching how :mod:`detector.datasets.dataset` decodes).
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with the train extra (matplotlib)
        import cv2

        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        return None if img is None else (int(img.shape[1]), int(img.shape[0]))
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, ValueError, SyntaxError):
        return None
    return int(width), int(height)


def sanitize_boxes(
    boxes_xyxy: np.ndarray, width: float | np.ndarray, height: float | np.ndarray, report: LoadReport
) -> np.ndarray:
    """Repair boxes against the image and count every change in ``report``.

    Inverted axes are swapped, boxes are clipped to ``[0, width] x [0, height]``, and boxes of zero width or height
    after clipping are dropped.

    Args:
        boxes_xyxy: ``(N, 4)`` pixel boxes in the image frame, possibly inverted or outside the image.
        width: image width in pixels, a scalar or ``(N,)`` (one per box, for boxes of several images at once).
        height: image height in pixels, like ``width``.
        report: counters ``swapped``, ``clipped``, ``dropped_degenerate`` are incremented.

    Returns:
        ``(N,)`` bool mask of the boxes to keep; ``boxes_xyxy`` is repaired in place.
    """
    b = boxes_xyxy
    inverted = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    report.swapped += int(inverted.sum())
    x0, x1 = np.minimum(b[:, 0], b[:, 2]), np.maximum(b[:, 0], b[:, 2])
    y0, y1 = np.minimum(b[:, 1], b[:, 3]), np.maximum(b[:, 1], b[:, 3])
    b[:] = np.stack((x0, y0, x1, y1), axis=1)
    clipped = np.stack(
        (np.clip(x0, 0, width), np.clip(y0, 0, height), np.clip(x1, 0, width), np.clip(y1, 0, height)), axis=1
    )
    changed = np.any(clipped != b, axis=1)
    b[:] = clipped
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    report.clipped += int((changed & keep).sum())
    report.dropped_degenerate += int((~keep).sum())
    return keep


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    for ca, cb in zip(a, b):
        if ca != cb:
            break
        n += 1
    return n


def _class_mapper(class_names: tuple[str, ...]):
    """Build ``name -> (label or None, renamed)`` with a cache over the (few) distinct raw names."""
    known = {name.strip().lower(): i + 1 for i, name in enumerate(class_names)}
    cache: dict[str, tuple[int | None, bool]] = {}

    def map_name(raw: str) -> tuple[int | None, bool]:
        if raw in cache:
            return cache[raw]
        name = raw.strip().lower()
        if name in known:
            result: tuple[int | None, bool] = (known[name], False)
        elif len(known) == 1:
            result = (1, True)  # single-class dataset: any name is the class (misspellings like 'headddd')
        else:
            # Several classes: the unique class sharing the longest prefix (at least 3 chars or the whole class name).
            scores = {lab: _common_prefix_len(name, k) for k, lab in known.items()}
            best = max(scores.values(), default=0)
            winners = [lab for lab, s in scores.items() if s == best]
            min_len = min(3, *(len(k) for k, lab in known.items() if lab in winners))
            result = (winners[0], True) if len(winners) == 1 and best >= min_len else (None, False)
        cache[raw] = result
        return result

    return map_name


def _split_ids(root: Path, split: str | Path | None, report: LoadReport) -> list[str]:
    if split is None:
        return sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    path = Path(split)
    if not path.is_file():
        path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        available = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt"))
        raise FileNotFoundError(f"split {split!r}: neither a file nor {path}; available splits: {available}")
    ids: list[str] = []
    seen: set[str] = set()
    for line in path.read_text().splitlines():
        tokens = line.split()
        if not tokens:
            continue
        image_id = tokens[0]  # class-specific VOC split files carry a second "1/-1" column
        if image_id in seen:
            report.duplicate_ids += 1
            continue
        seen.add(image_id)
        ids.append(image_id)
    return ids


def _find_image(image_dir: Path, names: set[str], image_id: str, filename: str | None) -> Path | None:
    """The image of ``image_id`` among ``names`` (the listing of ``image_dir``): ``<id>.<ext>`` or ``<filename>``."""
    candidates = [f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES]
    if filename:
        candidates.insert(1, Path(filename).name)
    for candidate in candidates:
        if candidate in names:
            return image_dir / candidate
    return None


def _xml_int(node: ET.Element | None, tag: str) -> int:
    text = node.findtext(tag) if node is not None else None
    try:
        return int(float(text)) if text is not None else 0
    except ValueError:
        return 0


def load_voc(
    root: str | Path,
    split: str | Path | None,
    class_names: tuple[str, ...] = ("head",),
    verify_images: bool = True,
) -> tuple[list[ImageRecord], LoadReport]:
    """Load a Pascal VOC tree, repairing or skipping every defect and counting it.

    Repairs: ``<size>`` of 0x0 (or, with ``verify_images``, different from the image) is replaced by the image's
    header size; an unknown class name becomes the class when there is one class, or the class with the longest
    shared prefix when there are several (else the object is dropped); inverted boxes are swapped; boxes are clipped to
    the image. Skips: ids without XML, without image, or with an unparsable XML/image; boxes of zero area; objects
    without numeric coordinates. ``difficult=1`` objects become ignore regions.

    Args:
        root: dataset root with ``JPEGImages``, ``Annotations`` and ``ImageSets/Main``.
        split: a split name (``root/ImageSets/Main/<split>.txt``), a path to a file of ids (one per line), or
            ``None`` for every XML in ``Annotations``.
        class_names: class names in label order; label ``i + 1`` is ``class_names[i]``. Matching is case-insensitive.
        verify_images: read every image header (cheap) to detect missing/unreadable images and wrong sizes. When
            False, only existence is checked and only 0x0 sizes are read from the image.

    Returns:
        ``(records, report)``: records in split-file order with boxes in pixels of the image file; the report counts
        kept items and defects (its summary is logged once).

    Raises:
        FileNotFoundError: ``split`` names neither a file nor a split of ``root`` (a usage error, not a data defect).
    """
    root = Path(root)
    split_name = "all" if split is None else Path(split).stem if Path(split).suffix else str(split)
    report = LoadReport(source=f"voc {root.name}/{split_name}")
    ids = _split_ids(root, split, report)
    map_name = _class_mapper(tuple(class_names))
    image_dir = root / "JPEGImages"
    # One directory listing instead of a stat per id.
    image_names = {e.name for e in os.scandir(image_dir) if e.is_file()} if image_dir.is_dir() else set()
    records: list[ImageRecord] = []
    # Accumulated over all images: boxes are repaired in one vectorised pass at the end.
    images: list[tuple[str, Path, int, int]] = []
    coords: list[tuple[float, float, float, float]] = []
    labels: list[int] = []
    difficult: list[bool] = []
    counts: list[int] = []

    for image_id in ids:
        xml_path = root / "Annotations" / f"{image_id}.xml"
        try:
            ann = ET.parse(xml_path).getroot()
        except FileNotFoundError:
            report.missing_annotation += 1
            continue
        except (ET.ParseError, OSError):
            report.unreadable += 1
            continue

        image_path = _find_image(image_dir, image_names, image_id, ann.findtext("filename"))
        if image_path is None:
            report.missing_image += 1
            continue
        size_node = ann.find("size")
        width, height = _xml_int(size_node, "width"), _xml_int(size_node, "height")
        size_ok = width > 0 and height > 0
        if verify_images or not size_ok:
            actual = read_image_size(image_path)
            if actual is None:
                report.unreadable += 1
                continue
            if not size_ok:
                report.size_from_image += 1
            elif actual != (width, height):
                report.size_mismatch += 1
            width, height = actual

        start = len(coords)
        for obj in ann.iter("object"):
            raw_name = (obj.findtext("name") or "").strip()
            label, renamed = map_name(raw_name)
            if label is None:
                report.dropped_unknown_class += 1
                report.unknown_names[raw_name] += 1
                continue
            box = obj.find("bndbox")
            try:
                xyxy = tuple(float(box.findtext(k)) for k in _BNDBOX_TAGS)  # type: ignore[union-attr,arg-type]
            except (AttributeError, TypeError, ValueError):  # no <bndbox>, a missing tag, or not a number
                report.malformed += 1
                continue
            if not all(map(math.isfinite, xyxy)):
                report.malformed += 1
                continue
            if renamed:
                report.renamed += 1
                report.unknown_names[raw_name] += 1
            coords.append(xyxy)  # type: ignore[arg-type]
            labels.append(label)
            difficult.append((obj.findtext("difficult") or "0").strip() in ("1", "true", "True"))
        images.append((image_id, image_path, width, height))
        counts.append(len(coords) - start)

    # Repair all boxes in one vectorised pass, then split them per image.
    boxes = np.asarray(coords, dtype=np.float32).reshape(-1, 4)
    sizes = np.repeat(np.asarray([im[2:] for im in images], dtype=np.float32).reshape(-1, 2), counts, axis=0)
    keep = sanitize_boxes(boxes, sizes[:, 0], sizes[:, 1], report)
    is_ignore = np.asarray(difficult, dtype=bool)
    label_arr = np.asarray(labels, dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
    for (image_id, image_path, width, height), a, b in zip(images, offsets[:-1], offsets[1:]):
        obj_mask, ign_mask = keep[a:b] & ~is_ignore[a:b], keep[a:b] & is_ignore[a:b]
        record = ImageRecord(
            image_id=image_id,
            path=image_path,
            width=width,
            height=height,
            boxes_xyxy=boxes[a:b][obj_mask],
            labels=label_arr[a:b][obj_mask],
            ignore_xyxy=boxes[a:b][ign_mask],
        )
        records.append(record)
        report.boxes += len(record.boxes_xyxy)
        report.ignored += len(record.ignore_xyxy)
        report.empty_images += int(len(record.boxes_xyxy) == 0)
    report.images = len(records)

    report.log(logger)
    return records, report
