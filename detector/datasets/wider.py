"""WIDER FACE loader (official layout).

Layout::

    root/WIDER_<subset>/images/<event>/<file>.jpg
    root/wider_face_split/wider_face_<subset>_bbx_gt.txt

Ground-truth format, per image: the relative file path, the face count ``n``, then ``n`` lines
``x y w h blur expression illumination invalid occlusion pose`` (pixels, top-left + size); an image with no faces
has ``n = 0`` followed by one line of zeros.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from detector.datasets.records import ImageRecord
from detector.datasets.voc import IMAGE_SUFFIXES, LoadReport, read_image_size, sanitize_boxes

__all__ = ["load_wider", "parse_wider_gt"]

logger = logging.getLogger(__name__)

_INVALID_COLUMN = 7


def _is_file_line(line: str) -> bool:
    return line.lower().endswith(IMAGE_SUFFIXES)


def parse_wider_gt(gt_path: str | Path, report: LoadReport | None = None) -> list[tuple[str, np.ndarray]]:
    """Parse a ``wider_face_*_bbx_gt.txt`` file.

    Tolerates a wrong face count (resynchronises on the next line that names an image) and non-numeric face lines
    (counted as ``malformed`` in ``report``).

    Args:
        gt_path: the ground-truth text file.
        report: optional counters to update (``malformed``).

    Returns:
        ``[(relative_image_path, faces), ...]`` in file order; ``faces`` is ``(n, 10)`` float32 with the raw columns
        ``x y w h blur expression illumination invalid occlusion pose``.
    """
    lines = [line.strip() for line in Path(gt_path).read_text().splitlines()]
    lines = [line for line in lines if line]
    entries: list[tuple[str, np.ndarray]] = []
    i = 0
    while i < len(lines):
        name = lines[i]
        i += 1
        if not _is_file_line(name):
            if report is not None:
                report.malformed += 1
            continue
        count = 0
        if i < len(lines) and not _is_file_line(lines[i]):
            try:
                count = int(lines[i])
                i += 1
            except ValueError:
                count = 0
        rows: list[list[float]] = []
        # n = 0 is followed by a placeholder line of zeros; read it like a face (it is dropped as zero-size).
        expected = max(count, 1)
        while expected > 0 and i < len(lines) and not _is_file_line(lines[i]):
            values = lines[i].split()
            i += 1
            expected -= 1
            try:
                row = [float(v) for v in values[:10]]
            except ValueError:
                row = []
            if len(row) < 4:
                if report is not None:
                    report.malformed += 1
                continue
            row += [0.0] * (10 - len(row))
            if count == 0 and not any(row[2:4]):
                continue  # the placeholder itself
            rows.append(row)
        entries.append((name, np.asarray(rows, dtype=np.float32).reshape(-1, 10)))
    return entries


def load_wider(root: str | Path, subset: str = "val") -> tuple[list[ImageRecord], LoadReport]:
    """Load a WIDER FACE subset, skipping entries whose image file is absent.

    Faces flagged ``invalid`` become ignore regions; faces of zero width or height are dropped (counted as
    ``dropped_degenerate``); boxes are clipped to the image, whose size is read from the image header. Missing images
    are counted and reported in the single summary line (a WARNING), not one warning each.

    Args:
        root: WIDER FACE root holding ``WIDER_<subset>/images`` and ``wider_face_split``.
        subset: ``"train"`` or ``"val"`` (the test subset has no ground truth).

    Returns:
        ``(records, report)``: records in ground-truth file order; ``image_id`` is ``"<event>/<stem>"``, boxes are
        pixels of the image file, label 1 = face.

    Raises:
        FileNotFoundError: the ground-truth file does not exist (a usage error, not a data defect).
    """
    root = Path(root)
    gt_path = root / "wider_face_split" / f"wider_face_{subset}_bbx_gt.txt"
    if not gt_path.is_file():
        raise FileNotFoundError(f"WIDER FACE ground truth not found: {gt_path}")
    report = LoadReport(source=f"wider {root.name}/{subset}")
    image_dir = root / f"WIDER_{subset}" / "images"
    records: list[ImageRecord] = []

    for rel_path, faces in parse_wider_gt(gt_path, report):
        image_path = image_dir / rel_path
        if not image_path.is_file():
            report.missing_image += 1
            continue
        size = read_image_size(image_path)
        if size is None:
            report.unreadable += 1
            continue
        width, height = size
        boxes = np.concatenate((faces[:, :2], faces[:, :2] + faces[:, 2:4]), axis=1)
        positive_size = (faces[:, 2] > 0) & (faces[:, 3] > 0)
        report.dropped_degenerate += int((~positive_size).sum())
        boxes, invalid = boxes[positive_size], faces[positive_size, _INVALID_COLUMN] > 0
        keep = sanitize_boxes(boxes, width, height, report)
        rel = Path(rel_path)
        record = ImageRecord(
            image_id=f"{rel.parent.as_posix()}/{rel.stem}" if rel.parent.name else rel.stem,
            path=image_path,
            width=width,
            height=height,
            boxes_xyxy=boxes[keep & ~invalid],
            labels=np.ones(int((keep & ~invalid).sum()), dtype=np.int64),
            ignore_xyxy=boxes[keep & invalid],
        )
        records.append(record)
        report.images += 1
        report.boxes += len(record.boxes_xyxy)
        report.ignored += len(record.ignore_xyxy)
        report.empty_images += int(len(record.boxes_xyxy) == 0)

    report.log(logger)
    return records, report
