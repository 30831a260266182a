"""Builders of tiny on-disk datasets (VOC / SCUT-HEAD and WIDER FACE layouts) with known defects and exact expected
counts, plus the location of the real datasets. Reusable by any test: ``from tests.synthetic_data import ...`` or,
with ``tests`` on ``sys.path`` (pytest's rootdir insertion), ``from synthetic_data import ...``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import cv2
import numpy as np

__all__ = [
    "random_boxes",
    "SyntheticDataset",
    "box_image",
    "make_voc_tree",
    "make_wider_tree",
    "real_data_root",
    "write_jpeg",
    "write_voc_xml",
]

#: Size of every synthetic image, ``(width, height)``.
IMAGE_SIZE = (160, 120)


def real_data_root() -> Path | None:
    """Directory holding the real datasets (``scut_head``, ``wider_face_sample``), or ``None`` when absent.

    ``$RNNPOOL_DATA`` if set, else ``<repo>/../shared/datasets``.
    """
    env = os.environ.get("RNNPOOL_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    return root if root.is_dir() else None


@dataclass
class SyntheticDataset:
    """A dataset written to disk and what a loader must report for it.

    Attributes:
        root: dataset root.
        split: split name (VOC) or subset (WIDER) to load.
        expected: exact :class:`detector.datasets.LoadReport` counter values (fields not listed are 0).
        boxes: ``image_id -> (G, 4)`` expected object boxes after repair, in pixels.
        ignore: ``image_id -> (I, 4)`` expected ignore regions.
    """

    root: Path
    split: str
    expected: dict[str, int]
    boxes: dict[str, np.ndarray] = field(default_factory=dict)
    ignore: dict[str, np.ndarray] = field(default_factory=dict)


def box_image(
    size: tuple[int, int], boxes_xyxy: np.ndarray, value: int = 255, background: int = 0, channels: int = 3
) -> np.ndarray:
    """Image with filled rectangles: pixels inside each box are ``value``, the rest ``background``.

    Args:
        size: ``(width, height)``.
        boxes_xyxy: ``(N, 4)`` integer-valued pixel boxes (continuous frame: ``x0 <= x < x1``).
        value: fill value of the boxes (a ``(N,)`` array gives one value per box).
        background: value outside the boxes.
        channels: channel count of the result.

    Returns:
        uint8 ``(H, W, channels)``.
    """
    width, height = size
    img = np.full((height, width, channels), background, dtype=np.uint8)
    values = np.broadcast_to(np.asarray(value), (len(boxes_xyxy),))
    for (x0, y0, x1, y1), v in zip(np.asarray(boxes_xyxy).astype(int), values):
        img[y0:y1, x0:x1] = v
    return img


def write_jpeg(path: Path, image_rgb: np.ndarray) -> None:
    """Write an RGB (or single-channel) uint8 image as JPEG, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = image_rgb if image_rgb.ndim == 2 or image_rgb.shape[2] == 1 else cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 95]):
        raise OSError(f"could not write {path}")


def _head_image(boxes_xyxy: np.ndarray, size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """A dark scene with a light ellipse ("head") in each box that lies inside the image."""
    width, height = size
    img = np.full((height, width, 3), 40, dtype=np.uint8)
    for x0, y0, x1, y1 in np.asarray(boxes_xyxy, dtype=float).reshape(-1, 4):
        xa, xb = sorted((x0, x1))
        ya, yb = sorted((y0, y1))
        if xb - xa < 2 or yb - ya < 2:
            continue
        centre = (int((xa + xb) / 2), int((ya + yb) / 2))
        axes = (max(1, int((xb - xa) / 2)), max(1, int((yb - ya) / 2)))
        cv2.ellipse(img, centre, axes, 0, 0, 360, (210, 180, 150), thickness=-1)
    return img


def write_voc_xml(
    path: Path,
    filename: str,
    size: tuple[int, int],
    objects: list[tuple[str, tuple[float | str, float | str, float | str, float | str], int]],
) -> None:
    """Write a Pascal VOC annotation.

    Args:
        path: XML file to write (parents created).
        filename: ``<filename>`` value.
        size: ``(width, height)`` written to ``<size>`` (``(0, 0)`` reproduces the SCUT-HEAD defect).
        objects: ``(name, (xmin, ymin, xmax, ymax), difficult)`` per object; coordinates are written verbatim.
    """
    parts = [
        "<annotation>",
        "\t<folder>JPEGImages</folder>",
        f"\t<filename>{escape(filename)}</filename>",
        f"\t<size>\n\t\t<width>{size[0]}</width>\n\t\t<height>{size[1]}</height>\n\t\t<depth>3</depth>\n\t</size>",
    ]
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(
            f"\t<object>\n\t\t<name>{escape(name)}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>"
            f"\n\t\t<difficult>{difficult}</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>"
            f"\n\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>"
        )
    parts.append("</annotation>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


def make_voc_tree(root: Path) -> SyntheticDataset:
    """Write a SCUT-HEAD-like VOC tree (160x120 JPEGs) with one defect per image, split ``"train"``.

    Ids and their defect: ``clean`` (2 heads), ``size0`` (``<size>`` 0x0), ``misspelled`` (class
    ``headdddddaaddwddd``), ``inverted`` (xmax < xmin), ``outside`` (a box half outside -> clipped, a box fully
    outside -> dropped), ``zero_area`` (xmin == xmax -> dropped, plus a valid head), ``difficult`` (a difficult box
    -> ignore region, plus a valid head), ``empty`` (no objects), ``malformed`` (non-numeric coordinate -> dropped,
    plus a valid head), ``no_xml`` (image without XML), ``no_image`` (XML without image), ``corrupt_xml``
    (unparsable XML), and a duplicated ``clean`` line in the split file.

    Returns:
        The dataset with the exact expected report counters and boxes per returned id.
    """
    root = Path(root)
    w, h = IMAGE_SIZE
    head = "head"
    objects: dict[str, list] = {
        "clean": [(head, (10, 20, 40, 55), 0), (head, (90, 30, 120, 62), 0)],
        "size0": [(head, (50, 40, 80, 75), 0)],
        "misspelled": [("headdddddaaddwddd", (20, 20, 50, 50), 0)],
        "inverted": [(head, (70, 60, 40, 30), 0)],
        "outside": [(head, (140, 10, 180, 40), 0), (head, (170, 50, 200, 80), 0)],
        "zero_area": [(head, (30, 30, 30, 60), 0), (head, (60, 60, 90, 95), 0)],
        "difficult": [(head, (10, 10, 35, 40), 1), (head, (100, 50, 130, 85), 0)],
        "empty": [],
        "malformed": [(head, ("12", "abc", "40", "50"), 0), (head, (80, 20, 110, 52), 0)],
        "no_image": [(head, (10, 10, 40, 40), 0)],
    }
    for image_id, objs in objects.items():
        size = (0, 0) if image_id == "size0" else (w, h)
        write_voc_xml(root / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", size, objs)
        if image_id != "no_image":
            numeric = [b for _, b, _ in objs if all(isinstance(v, int) for v in b)]
            write_jpeg(root / "JPEGImages" / f"{image_id}.jpg", _head_image(np.array(numeric).reshape(-1, 4)))
    write_jpeg(root / "JPEGImages" / "no_xml.jpg", _head_image(np.array([[10, 10, 40, 40]])))
    write_jpeg(root / "JPEGImages" / "corrupt_xml.jpg", _head_image(np.zeros((0, 4))))
    (root / "Annotations" / "corrupt_xml.xml").write_text("<annotation><size><width>160</wid")

    ids = [*objects, "no_xml", "corrupt_xml", "clean"]
    split_file = root / "ImageSets" / "Main" / "train.txt"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text("\n".join(ids) + "\n\n")

    f32 = lambda rows: np.array(rows, dtype=np.float32).reshape(-1, 4)  # noqa: E731
    boxes = {
        "clean": f32([[10, 20, 40, 55], [90, 30, 120, 62]]),
        "size0": f32([[50, 40, 80, 75]]),
        "misspelled": f32([[20, 20, 50, 50]]),
        "inverted": f32([[40, 30, 70, 60]]),
        "outside": f32([[140, 10, 160, 40]]),
        "zero_area": f32([[60, 60, 90, 95]]),
        "difficult": f32([[100, 50, 130, 85]]),
        "empty": f32([]),
        "malformed": f32([[80, 20, 110, 52]]),
    }
    ignore = {image_id: f32([]) for image_id in boxes}
    ignore["difficult"] = f32([[10, 10, 35, 40]])
    expected = {
        "images": 9,
        "boxes": 9,
        "ignored": 1,
        "empty_images": 1,
        "size_from_image": 1,
        "renamed": 1,
        "swapped": 1,
        "clipped": 1,
        "dropped_degenerate": 2,  # the zero-area box and the box entirely right of the image
        "malformed": 1,
        "missing_annotation": 1,
        "missing_image": 1,
        "unreadable": 1,
        "duplicate_ids": 1,
    }
    return SyntheticDataset(root=root, split="train", expected=expected, boxes=boxes, ignore=ignore)


def make_wider_tree(root: Path, subset: str = "val") -> SyntheticDataset:
    """Write a WIDER FACE tree (160x120 JPEGs) with its defects.

    Entries: ``0--Parade/0_Parade_a`` (a valid face, an ``invalid`` face -> ignore, a zero-width face -> dropped),
    ``1--Handshaking/1_Handshaking_b`` (no faces: count 0 and a line of zeros), ``1--Handshaking/1_Handshaking_c``
    (listed, image file missing -> skipped), ``2--Demonstration/2_Demonstration_d`` (two faces, one crossing the
    right border -> clipped).

    Returns:
        The dataset (``split`` is the subset) with exact expected report counters and boxes per returned id.
    """
    root = Path(root)
    images = root / f"WIDER_{subset}" / "images"
    gt_lines = [
        "0--Parade/0_Parade_a.jpg",
        "3",
        "10 20 30 35 0 0 0 0 0 0 ",
        "80 20 25 30 2 0 0 1 0 0 ",
        "120 40 0 10 0 0 0 0 0 0 ",
        "1--Handshaking/1_Handshaking_b.jpg",
        "0",
        "0 0 0 0 0 0 0 0 0 0 ",
        "1--Handshaking/1_Handshaking_c.jpg",
        "1",
        "5 5 20 20 0 0 0 0 0 0 ",
        "2--Demonstration/2_Demonstration_d.jpg",
        "2",
        "30 30 40 45 1 0 0 0 1 0",
        "140 60 40 30 0 0 1 0 0 1",
    ]
    gt = root / "wider_face_split" / f"wider_face_{subset}_bbx_gt.txt"
    gt.parent.mkdir(parents=True, exist_ok=True)
    gt.write_text("\n".join(gt_lines) + "\n")
    write_jpeg(images / "0--Parade/0_Parade_a.jpg", _head_image(np.array([[10, 20, 40, 55], [80, 20, 105, 50]])))
    write_jpeg(images / "1--Handshaking/1_Handshaking_b.jpg", _head_image(np.zeros((0, 4))))
    write_jpeg(images / "2--Demonstration/2_Demonstration_d.jpg", _head_image(np.array([[30, 30, 70, 75]])))

    f32 = lambda rows: np.array(rows, dtype=np.float32).reshape(-1, 4)  # noqa: E731
    boxes = {
        "0--Parade/0_Parade_a": f32([[10, 20, 40, 55]]),
        "1--Handshaking/1_Handshaking_b": f32([]),
        "2--Demonstration/2_Demonstration_d": f32([[30, 30, 70, 75], [140, 60, 160, 90]]),
    }
    ignore = {image_id: f32([]) for image_id in boxes}
    ignore["0--Parade/0_Parade_a"] = f32([[80, 20, 105, 50]])
    expected = {
        "images": 3,
        "boxes": 3,
        "ignored": 1,
        "empty_images": 1,
        "clipped": 1,
        "dropped_degenerate": 1,
        "missing_image": 1,
    }
    return SyntheticDataset(root=root, split=subset, expected=expected, boxes=boxes, ignore=ignore)


def random_boxes(seed: int, n: int = 60):
    """``n`` random xyxy boxes in a 70x70 px area (sides 1-21 px) and scores rounded to 0.1 (ties on purpose), from a
    seeded torch generator: ``(boxes (n, 4), scores (n,), generator)``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    wh = torch.rand(n, 2, generator=g) * 20 + 1
    boxes = torch.cat((xy, xy + wh), dim=1)
    scores = torch.rand(n, generator=g).round(decimals=1)
    return boxes, scores, g
