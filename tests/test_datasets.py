"""Tests of the dataset layer: loaders (defects counted exactly), augmentation geometry, torch dataset and collate."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_data import (  # noqa: E402
    box_image,
    make_voc_tree,
    make_wider_tree,
    real_data_root,
    write_jpeg,
    write_voc_xml,
)

from detector.datasets import (  # noqa: E402
    IGNORE_LABEL,
    DetectionDataset,
    ImageRecord,
    LoadReport,
    SmallObjectZoomCrop,
    build_eval_transform,
    build_train_transform,
    collate_detection,
    load_voc,
    load_wider,
)

_COUNTERS = [name for name, value in vars(LoadReport()).items() if isinstance(value, int)]


def _assert_report(report: LoadReport, expected: dict[str, int]) -> None:
    actual = {name: getattr(report, name) for name in _COUNTERS}
    assert actual == {name: expected.get(name, 0) for name in _COUNTERS}


def _records_by_id(records: list[ImageRecord]) -> dict[str, ImageRecord]:
    return {r.image_id: r for r in records}


# ----------------------------------------------------------------------------------------------------------- VOC


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc_tree(tmp_path_factory.mktemp("voc"))


def test_voc_every_defect_counted(voc, caplog):
    with caplog.at_level(logging.INFO, logger="detector.datasets.voc"):
        records, report = load_voc(voc.root, voc.split)
    _assert_report(report, voc.expected)
    by_id = _records_by_id(records)
    assert list(by_id) == list(voc.boxes)  # split-file order, duplicates once
    for image_id, boxes in voc.boxes.items():
        rec = by_id[image_id]
        np.testing.assert_array_equal(rec.boxes_xyxy, boxes, err_msg=image_id)
        np.testing.assert_array_equal(rec.ignore_xyxy, voc.ignore[image_id], err_msg=image_id)
        assert rec.labels.tolist() == [1] * len(boxes)
        assert (rec.width, rec.height) == (160, 120)
        assert rec.path.is_file()
    # Exactly one summary line, a warning because items were dropped.
    lines = [r for r in caplog.records if r.name == "detector.datasets.voc"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "missing_annotation=1" in lines[0].getMessage() and "\n" not in report.summary()
    assert report.unknown_names == {"headdddddaaddwddd": 1}


def test_voc_split_as_file_and_all(voc, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("clean\ninverted\n")
    records, report = load_voc(voc.root, ids)
    assert [r.image_id for r in records] == ["clean", "inverted"] and report.images == 2
    records, report = load_voc(voc.root, None)  # every XML
    assert report.images == 9 and report.missing_image == 1 and report.unreadable == 1
    with pytest.raises(FileNotFoundError, match="available splits"):
        load_voc(voc.root, "nope")


def test_voc_clean_load_logs_info(voc, tmp_path, caplog):
    ids = tmp_path / "ids.txt"
    ids.write_text("clean\n")
    with caplog.at_level(logging.INFO, logger="detector.datasets.voc"):
        load_voc(voc.root, ids)
    lines = [r for r in caplog.records if r.name == "detector.datasets.voc"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO


def test_voc_several_classes_map_by_prefix_or_drop(tmp_path):
    write_jpeg(tmp_path / "JPEGImages" / "a.jpg", np.zeros((120, 160, 3), np.uint8))
    objects = [
        ("head", (0, 0, 10, 10), 0),
        ("Face", (10, 0, 20, 10), 0),  # case-insensitive exact match
        ("headdddd", (20, 0, 30, 10), 0),  # -> head
        ("facce", (30, 0, 40, 10), 0),  # shares "fac" with face -> face
        ("person", (40, 0, 50, 10), 0),  # nothing in common -> dropped
    ]
    write_voc_xml(tmp_path / "Annotations" / "a.xml", "a.jpg", (160, 120), objects)
    (tmp_path / "ids.txt").write_text("a\n")
    records, report = load_voc(tmp_path, tmp_path / "ids.txt", class_names=("head", "face"))
    assert records[0].labels.tolist() == [1, 2, 1, 2]
    assert report.renamed == 2 and report.dropped_unknown_class == 1
    assert report.unknown_names == {"headdddd": 1, "facce": 1, "person": 1}


# --------------------------------------------------------------------------------------------------------- WIDER


def test_wider_parsing_invalid_to_ignore_and_missing_images(tmp_path, caplog):
    wider = make_wider_tree(tmp_path)
    with caplog.at_level(logging.INFO, logger="detector.datasets.wider"):
        records, report = load_wider(wider.root, wider.split)
    _assert_report(report, wider.expected)
    by_id = _records_by_id(records)
    assert list(by_id) == list(wider.boxes)
    for image_id, boxes in wider.boxes.items():
        np.testing.assert_array_equal(by_id[image_id].boxes_xyxy, boxes, err_msg=image_id)
        np.testing.assert_array_equal(by_id[image_id].ignore_xyxy, wider.ignore[image_id], err_msg=image_id)
        assert by_id[image_id].labels.tolist() == [1] * len(boxes)
        assert (by_id[image_id].width, by_id[image_id].height) == (160, 120)
    lines = [r for r in caplog.records if r.name == "detector.datasets.wider"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "missing_image=1" in lines[0].getMessage()


# ---------------------------------------------------------------------------------------------------- transforms

# Non-overlapping boxes of several sizes in a 640x480 image, one of them touching the border.
_SCENE_BOXES = np.array(
    [[20, 30, 44, 54], [100, 60, 130, 96], [200, 40, 280, 120], [330, 200, 346, 216], [400, 300, 460, 370],
     [520, 100, 560, 140], [600, 420, 640, 480], [50, 380, 62, 394], [250, 250, 300, 300], [150, 200, 170, 222]],
    dtype=np.float32,
)
_SCENE_IGNORE = np.array([[470, 20, 530, 80], [60, 200, 110, 260]], dtype=np.float32)


def _scene() -> np.ndarray:
    """Black 640x480 RGB, objects filled white, ignore regions filled grey (128)."""
    boxes = np.concatenate((_SCENE_BOXES, _SCENE_IGNORE))
    values = np.array([255] * len(_SCENE_BOXES) + [128] * len(_SCENE_IGNORE))
    return box_image((640, 480), boxes, value=values)


def _inner_mean(image: np.ndarray, box: np.ndarray) -> float:
    """Mean pixel value inside ``box`` shrunk by 1 px (interpolation blurs the edges)."""
    x0, y0, x1, y1 = box
    xa, ya, xb, yb = int(np.ceil(x0 + 1)), int(np.ceil(y0 + 1)), int(np.floor(x1 - 1)), int(np.floor(y1 - 1))
    if xb <= xa or yb <= ya:
        return float("nan")
    return float(image[ya:yb, xa:xb].mean())


@pytest.mark.parametrize("grayscale", [False, True])
def test_train_transform_boxes_follow_pixels(grayscale):
    transform = build_train_transform((320, 240), grayscale=grayscale, photometric_prob=0.0, seed=0)
    image = _scene()
    labels = np.ones(len(_SCENE_BOXES), dtype=np.int64)
    checked = ignored_checked = 0
    for _ in range(60):
        img, boxes, out_labels, ignore = transform(image, _SCENE_BOXES, labels, _SCENE_IGNORE)
        assert img.shape == (240, 320, 1 if grayscale else 3) and img.dtype == np.uint8
        assert boxes.dtype == np.float32 and out_labels.dtype == np.int64 and ignore.dtype == np.float32
        assert (out_labels == 1).all()
        for b in np.concatenate((boxes, ignore)):
            assert 0 <= b[0] < b[2] <= 320 and 0 <= b[1] < b[3] <= 240, b
        for b in boxes:
            mean = _inner_mean(img, b)
            if not np.isnan(mean):
                assert mean > 200, (b, mean)
                checked += 1
        for b in ignore:
            mean = _inner_mean(img, b)
            if not np.isnan(mean):
                assert 100 < mean < 156, (b, mean)
                ignored_checked += 1
    assert checked > 60 and ignored_checked > 5


def test_train_transform_zooms_on_small_objects():
    transform = build_train_transform((320, 240), zoom_prob=1.0, random_crop_prob=0.0, seed=1)
    box = np.array([[300, 200, 340, 240]], dtype=np.float32)  # 40 px: 20 px in a plain 2x downscale
    sides = []
    for _ in range(200):
        _, boxes, _, _ = transform(box_image((640, 480), box), box, np.ones(1), None)
        assert len(boxes) == 1  # the zoomed-on object is always inside the crop
        sides.append(float(np.sqrt((boxes[0, 2] - boxes[0, 0]) * (boxes[0, 3] - boxes[0, 1]))))
    # Target 8..64 px; below 20 px the window would exceed the image, so it stays at the full-image scale.
    assert min(sides) > 18 and max(sides) < 68
    assert np.percentile(sides, 90) > 45


def test_crop_drops_objects_whose_centre_leaves_the_window():
    crop = SmallObjectZoomCrop(output_size=(320, 240))
    # albumentations-internal rows: normalized xyxy + label column; the image is 100x100, the window its top-left 50x50.
    rows = np.array(
        [[0.10, 0.10, 0.20, 0.20, 1],  # inside
         [0.40, 0.10, 0.70, 0.20, 1],  # cut, centre x = 55 outside -> dropped
         [0.30, 0.30, 0.60, 0.45, 1],  # cut, centre x = 45 inside -> kept (clipped later)
         [0.40, 0.40, 0.90, 0.90, IGNORE_LABEL]],  # ignore region, centre outside -> kept
        dtype=np.float32,
    )
    out = crop.apply_to_bboxes(rows, crop_coords=(0, 0, 50, 50), shape=(100, 100))
    assert out[:, 4].tolist() == [1, 1, IGNORE_LABEL]
    np.testing.assert_allclose(out[1, :4], [0.6, 0.6, 1.2, 0.9], atol=1e-6)


def test_flip_maps_x_exactly():
    transform = build_train_transform(
        (160, 120), zoom_prob=0.0, random_crop_prob=0.0, flip_prob=1.0, photometric_prob=0.0, seed=0
    )
    boxes = np.array([[10.5, 20, 40, 55], [90, 30, 160, 62]], dtype=np.float32)
    ignore = np.array([[0, 0, 7.25, 9]], dtype=np.float32)
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    img, out, labels, out_ignore = transform(image, boxes, np.array([1, 2]), ignore)
    np.testing.assert_array_equal(img, image[:, ::-1])
    np.testing.assert_allclose(out, np.stack([160 - boxes[:, 2], boxes[:, 1], 160 - boxes[:, 0], boxes[:, 3]], 1),
                               atol=1e-4)
    np.testing.assert_allclose(out_ignore, [[160 - 7.25, 0, 160, 9]], atol=1e-4)
    assert labels.tolist() == [1, 2]


@pytest.mark.parametrize("grayscale", [False, True])
def test_eval_transform_scales_boxes_exactly(grayscale):
    transform = build_eval_transform((320, 240), grayscale=grayscale)
    boxes = np.array([[10, 20, 40, 55], [0, 0, 200, 100]], dtype=np.float32)
    ignore = np.array([[5, 5, 15, 25]], dtype=np.float32)
    image = np.random.default_rng(0).integers(0, 256, (100, 200, 3), dtype=np.uint8)
    img, out, labels, out_ignore = transform(image, boxes, np.array([1, 1]), ignore)
    assert img.shape == (240, 320, 1 if grayscale else 3)
    scale = np.array([1.6, 2.4, 1.6, 2.4], dtype=np.float32)
    np.testing.assert_allclose(out, boxes * scale, atol=1e-3)
    np.testing.assert_allclose(out_ignore, ignore * scale, atol=1e-3)
    # Deterministic.
    np.testing.assert_array_equal(transform(image, boxes, np.array([1, 1]), ignore)[0], img)


def test_grayscale_transform_accepts_gray_input():
    transform = build_train_transform((320, 240), grayscale=True, seed=0)
    img, boxes, _, _ = transform(box_image((640, 480), _SCENE_BOXES, channels=1), _SCENE_BOXES,
                                 np.ones(len(_SCENE_BOXES)), None)
    assert img.shape == (240, 320, 1)
    with pytest.raises(ValueError, match="single-channel"):
        build_train_transform((320, 240))(np.zeros((48, 64, 1), np.uint8), np.zeros((0, 4)), np.zeros(0), None)


# ------------------------------------------------------------------------------------------------ torch dataset


def test_dataset_and_collate_shapes(voc):
    records, _ = load_voc(voc.root, voc.split)
    dataset = DetectionDataset(records, build_eval_transform((320, 240)))
    image, target = dataset[0]
    assert image.shape == (3, 240, 320) and image.dtype == torch.uint8
    assert set(target) == {"boxes_xyxy", "labels", "ignore_xyxy", "image_id", "orig_size"}
    assert target["boxes_xyxy"].dtype == torch.float32 and target["boxes_xyxy"].shape == (2, 4)
    assert target["labels"].dtype == torch.int64 and target["ignore_xyxy"].shape == (0, 4)
    assert target["image_id"] == "clean" and target["orig_size"] == (160, 120)
    torch.testing.assert_close(target["boxes_xyxy"], torch.tensor(voc.boxes["clean"]) * 2.0)

    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 240, 320) and images.dtype == torch.uint8 and len(targets) == 4
    with pytest.raises(ValueError, match="different shapes"):
        a, b = torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(3, 4, 5, dtype=torch.uint8)
        collate_detection([(a, {}), (b, {})])


def test_dataset_cache_downscales_and_scales_boxes(voc):
    records, _ = load_voc(voc.root, voc.split)
    dataset = DetectionDataset(records, transform=None, cache_max_side=64)
    dataset.warm_cache(num_threads=2, progress=False)
    assert len(dataset._cache) == len(records) and dataset.cached_bytes == len(records) * 64 * 48 * 3
    image, target = dataset[0]
    assert image.shape == (3, 48, 64)
    torch.testing.assert_close(target["boxes_xyxy"], torch.tensor(voc.boxes["clean"]) * 0.4)
    target["boxes_xyxy"] += 1  # consumers cannot corrupt the cache
    torch.testing.assert_close(dataset[0][1]["boxes_xyxy"], torch.tensor(voc.boxes["clean"]) * 0.4)
    assert target["orig_size"] == (160, 120)
    # No cache: full resolution, nothing kept.
    dataset = DetectionDataset(records, transform=None, cache_max_side=None)
    assert dataset[0][0].shape == (3, 120, 160) and dataset.cached_bytes == 0


def test_dataset_gray_source(voc):
    records, _ = load_voc(voc.root, voc.split)
    dataset = DetectionDataset(records, build_train_transform((96, 72), grayscale=True, seed=0), grayscale_source=True)
    image, target = dataset[1]
    assert image.shape == (1, 72, 96) and target["image_id"] == "size0"


def test_dataset_workers_get_distinct_augmentation(voc):
    records, _ = load_voc(voc.root, voc.split)
    dataset = DetectionDataset([records[0]] * 4, build_train_transform((96, 72), seed=0))
    dataset.warm_cache(progress=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate_detection)
    images = [batch[0][0] for batch in loader]
    # Worker 0 serves items 0 and 2, worker 1 items 1 and 3; with one shared RNG state they would be identical.
    assert not torch.equal(images[0], images[1])


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    dataset = DetectionDataset([ImageRecord("broken", bad, 10, 10), ImageRecord("gone", tmp_path / "gone.jpg", 10, 10)])
    with pytest.raises(OSError, match="broken.jpg"):
        dataset[0]
    with pytest.raises(OSError, match="gone.jpg"):
        dataset[1]


# -------------------------------------------------------------------------------------------------- real data


def _real(name: str) -> Path:
    root = real_data_root()
    if root is None or not (root / name).is_dir():
        pytest.skip(f"real dataset {name!r} not found (set RNNPOOL_DATA or provide ../shared/datasets/{name})")
    return root / name


@pytest.mark.dataset
def test_real_scut_head():
    root = _real("scut_head")
    train, train_report = load_voc(root, "partB_train")
    val, val_report = load_voc(root, "partB_val")
    assert len(train) == 2000 and len(val) == 405
    assert train_report.size_from_image + val_report.size_from_image == 60
    assert not train_report.lossy and not val_report.lossy
    assert not {r.image_id for r in train} & {r.image_id for r in val}
    for rec in train + val:
        assert rec.width > 0 and rec.height > 0
        b = rec.boxes_xyxy
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= rec.width).all() and (b[:, 3] <= rec.height).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()


@pytest.mark.dataset
def test_real_wider_sample(caplog):
    root = _real("wider_face_sample")
    with caplog.at_level(logging.INFO, logger="detector.datasets.wider"):
        records, report = load_wider(root, "val")
    assert len(records) == 4 and report.missing_image == 3226 - 4
    assert len([r for r in caplog.records if r.name == "detector.datasets.wider"]) == 1
