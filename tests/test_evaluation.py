"""Tests of detector.evaluation and detector.datasets.coco on hand-built records with hand-computed answers."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from detector.datasets.coco import (
    coco_image_ids,
    main as coco_main,
    predictions_to_coco,
    records_to_coco,
    write_coco_json,
)
from detector.datasets.records import ImageRecord
from detector.evaluation import (
    APResult,
    ImagePredictions,
    all_point_ap,
    coco_metrics,
    match_image,
    plot_pr_curve,
    voc_ap,
)


def rec(image_id: str, boxes=(), ignore=(), labels=None, size=(640, 480)) -> ImageRecord:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.ones(len(boxes), dtype=np.int64) if labels is None else labels
    return ImageRecord(image_id, Path(f"/data/img/{image_id}.jpg"), size[0], size[1], boxes, labels, ignore)


def pred(boxes=(), scores=(), labels=None) -> ImagePredictions:
    return ImagePredictions(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), scores, labels)


def shift(box, dx=0.0, dy=0.0):
    x0, y0, x1, y1 = box
    return (x0 + dx, y0 + dy, x1 + dx, y1 + dy)


A, B, C = (0, 0, 100, 100), (200, 0, 300, 100), (0, 0, 100, 100)
FAR = (500, 300, 600, 400)


@pytest.fixture
def three_gt_case():
    """3 GTs in 2 images, 5 detections whose score order is TP, FP, TP, FP, TP.

    TPs are GT boxes shifted 10 px in x: IoU = 90*100 / (2*100*100 - 90*100) = 9/11 ~ 0.818 (TP up to IoU 0.8).
    """
    records = [rec("a", [A, B]), rec("b", [C])]
    preds = {
        "a": pred([shift(A, 10), FAR, shift(B, 10)], [0.9, 0.6, 0.5]),
        "b": pred([FAR, shift(C, 10)], [0.8, 0.7]),
    }
    return records, preds


# ---------------------------------------------------------------------------------------------------------------------
# voc_ap


def test_voc_ap_hand_computed(three_gt_case):
    records, preds = three_gt_case
    res = voc_ap(records, preds, 0.5)
    # Order TP FP TP FP TP:  precision 1, 1/2, 2/3, 2/4, 3/5;  recall 1/3, 1/3, 2/3, 2/3, 1.
    # Monotone envelope: 1, 2/3, 2/3, 3/5, 3/5.  Recall steps of 1/3 at ranks 1, 3, 5:
    # AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = 1/3 + 2/9 + 1/5 = 34/45 ~ 0.7556.
    assert res.ap == pytest.approx(34 / 45, abs=1e-9)
    np.testing.assert_allclose(res.precision, [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
    np.testing.assert_allclose(res.recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(res.scores, [0.9, 0.8, 0.7, 0.6, 0.5])
    assert (res.num_gt, res.num_det, res.tp, res.fp, res.num_ignored) == (3, 5, 3, 2, 0)
    # Above the TPs' IoU (9/11) every detection is FP.
    strict = voc_ap(records, preds, 0.85)
    assert strict.ap == 0.0 and strict.tp == 0 and strict.fp == 5


def test_all_point_ap_matches_voc_devkit_formulation():
    rng = np.random.default_rng(0)
    for _ in range(20):
        is_tp = rng.random(30) < 0.5
        n_gt = int(is_tp.sum()) + 3
        tp, fp = np.cumsum(is_tp), np.cumsum(~is_tp)
        rec_, prec = tp / n_gt, tp / (tp + fp)
        # Reference: sentinel-padded envelope, sum over points where recall changes (VOC2010 devkit semantics).
        mrec = np.concatenate([[0.0], rec_, [1.0]])
        mpre = np.concatenate([[0.0], prec, [0.0]])
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = max(mpre[i], mpre[i + 1])
        idx = np.flatnonzero(mrec[1:] != mrec[:-1])
        ref = float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))
        assert all_point_ap(rec_, prec) == pytest.approx(ref, abs=1e-12)
    assert all_point_ap(np.zeros(0), np.zeros(0)) == 0.0


def test_perfect_detections_give_one():
    records = [rec("a", [A, B]), rec("b", [C]), rec("empty")]
    preds = {"a": pred([A, B], [0.3, 0.9]), "b": pred([C], [0.5])}
    res = voc_ap(records, preds)
    assert res.ap == pytest.approx(1.0, abs=1e-12)
    assert (res.tp, res.fp) == (3, 0)


def test_no_detections_gives_zero():
    records = [rec("a", [A, B]), rec("b", [C])]
    for preds in ({}, {"a": ImagePredictions.empty()}):
        res = voc_ap(records, preds)
        assert res.ap == 0.0
        assert res.num_gt == 3 and res.num_det == 0 and res.recall.size == 0


def test_no_ground_truth_is_zero_with_empty_recall():
    records = [rec("a"), rec("b")]
    res = voc_ap(records, {"a": pred([A], [0.9])})
    assert res.ap == 0.0 and res.num_gt == 0 and res.recall.size == 0 and res.precision.size == 0
    assert res.fp == 1


def test_detections_on_ignore_regions_do_not_count():
    ignore_small = (300, 300, 340, 340)  # a region the size of a face
    ignore_big = (0, 200, 400, 480)  # a crowd
    records = [rec("a", [A], ignore=[ignore_small, ignore_big])]
    preds = {
        "a": pred(
            [
                shift(ignore_small, 4),  # IoU with region 36/44 ~ 0.82 -> ignored
                (10, 210, 50, 250),  # IoU with the crowd ~0.01 but fully inside it (IoA 1) -> ignored
                A,  # the real TP, scored below the ignored ones
            ],
            [0.99, 0.98, 0.5],
        )
    }
    res = voc_ap(records, preds)
    assert res.ap == pytest.approx(1.0, abs=1e-12)
    assert (res.num_det, res.tp, res.fp, res.num_ignored) == (3, 1, 0, 2)

    # Mostly outside the region: IoA = 20*40 / (40*40) = 0.5 counts at 0.5, not at 0.6.
    records = [rec("a", [A], ignore=[ignore_small])]
    half = pred([(320, 300, 360, 340)], [0.9])
    assert voc_ap(records, {"a": half}, 0.5).num_ignored == 1
    r6 = voc_ap(records, {"a": half}, 0.6)
    assert (r6.num_ignored, r6.fp) == (0, 1)


def test_duplicates_are_false_positives():
    records = [rec("a", [A, B])]
    preds = {"a": pred([A, shift(A, 5), B], [0.9, 0.8, 0.7])}
    res = voc_ap(records, preds)
    # TP FP TP: precision 1, 1/2, 2/3; recall 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert res.ap == pytest.approx(5 / 6, abs=1e-9)
    assert (res.tp, res.fp) == (2, 1)


def test_greedy_takes_next_unmatched_gt():
    # Two overlapping GTs; det 2's best GT is taken by det 1, but it still overlaps the other one >= 0.5.
    g1, g2 = (0, 0, 100, 100), (20, 0, 120, 100)
    d1, d2 = (0, 0, 100, 100), (5, 0, 105, 100)  # d2: IoU(g1) = 95/105, IoU(g2) = 85/115 ~ 0.74
    status = match_image(np.array([d1, d2], float), np.array([g1, g2], float), np.zeros((0, 4)), 0.5)
    assert status.tolist() == [1, 1]
    status = match_image(np.array([d1, d2], float), np.array([g1, g2], float), np.zeros((0, 4)), 0.75)
    assert status.tolist() == [1, 0]


def _naive_match(det, gt, ign, t):
    """Reference: the greedy rule written out with plain loops."""

    def inter(a, b):
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    def area(a):
        return max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])

    taken, out = set(), []
    for d in det:
        best, best_iou = None, -1.0
        for j, g in enumerate(gt):
            u = area(d) + area(g) - inter(d, g)
            iou = inter(d, g) / u if u > 0 else 0.0
            if j not in taken and iou >= t and iou > best_iou:
                best, best_iou = j, iou
        if best is not None:
            taken.add(best)
            out.append(1)
        elif any(area(d) > 0 and inter(d, r) / area(d) >= t for r in ign):
            out.append(-1)
        else:
            out.append(0)
    return out


def test_match_image_agrees_with_naive_greedy():
    rng = np.random.default_rng(2)
    for _ in range(200):
        g = int(rng.integers(0, 12))
        xy = rng.uniform(0, 100, (g, 2))
        gt = np.concatenate([xy, xy + rng.uniform(10, 40, (g, 2))], 1)
        near = gt[rng.integers(0, g, int(rng.integers(0, 25)))] if g else np.zeros((0, 4))
        near = near + rng.normal(0, 5, near.shape)
        xy = rng.uniform(0, 120, (int(rng.integers(0, 10)), 2))
        far = np.concatenate([xy, xy + rng.uniform(5, 40, xy.shape)], 1)
        det = rng.permutation(np.concatenate([near, far]))
        xy = rng.uniform(0, 100, (int(rng.integers(0, 3)), 2))
        ign = np.concatenate([xy, xy + rng.uniform(10, 60, xy.shape)], 1)
        t = float(rng.choice([0.3, 0.5, 0.7]))
        assert match_image(det, gt, ign, t).tolist() == _naive_match(det, gt, ign, t)


def test_false_positives_on_image_without_gt_lower_precision():
    records = [rec("a", [A]), rec("bg")]
    clean = voc_ap(records, {"a": pred([A], [0.9])})
    noisy = voc_ap(records, {"a": pred([A], [0.9]), "bg": pred([FAR, B], [0.95, 0.1])})
    assert clean.ap == pytest.approx(1.0)
    # Order FP TP FP: precision 0, 1/2, 1/3; recall 0, 1, 1 -> AP = 1 * 1/2.
    assert noisy.ap == pytest.approx(0.5, abs=1e-9)
    np.testing.assert_allclose(noisy.precision, [0, 1 / 2, 1 / 3])


def test_labels_filter_detections_and_gt():
    records = [rec("a", [A, B], labels=np.array([1, 2]))]
    preds = {"a": pred([A, B, FAR], [0.9, 0.8, 0.7], labels=[1, 2, 2])}
    r1, r2 = voc_ap(records, preds, label=1), voc_ap(records, preds, label=2)
    assert (r1.ap, r1.num_gt, r1.num_det) == (pytest.approx(1.0), 1, 1)
    assert (r2.num_gt, r2.tp, r2.fp) == (1, 1, 1)


def test_accepts_detections_like_objects():
    records = [rec("a", [A, B])]
    like = types.SimpleNamespace(
        boxes_xyxy=np.array([A, B], np.float32), scores=np.array([0.9, 0.8], np.float32), labels=np.array([1, 1])
    )
    assert voc_ap(records, {"a": like}).ap == pytest.approx(1.0)
    assert coco_metrics(records, {"a": like})["AP"] == pytest.approx(1.0)


def test_unknown_image_and_bad_threshold_raise():
    with pytest.raises(ValueError, match="without a record"):
        voc_ap([rec("a", [A])], {"zzz": pred([A], [1.0])})
    with pytest.raises(ValueError):
        voc_ap([rec("a", [A])], {}, iou_threshold=0.0)
    with pytest.raises(ValueError):
        ImagePredictions(np.zeros((2, 4)), np.zeros(3))


def test_voc_ap_is_fast_on_a_test_set_sized_input():
    rng = np.random.default_rng(1)
    records, preds = [], {}
    for i in range(405):
        xy = rng.uniform(0, 560, (60, 2))
        wh = rng.uniform(15, 80, (60, 2))
        gt = np.concatenate([xy, xy + wh], 1)
        records.append(rec(f"img{i}", gt, ignore=[(0, 0, 30, 30)]))
        jitter = gt[:, None, :] + rng.normal(0, 4, (60, 2, 4))  # two detections per GT -> duplicates
        xy2 = rng.uniform(0, 600, (180, 2))
        noise = np.concatenate([xy2, xy2 + rng.uniform(10, 60, (180, 2))], 1)
        boxes = np.concatenate([jitter.reshape(-1, 4), noise])
        preds[f"img{i}"] = pred(boxes, rng.random(len(boxes)))
    t0 = time.perf_counter()
    res = voc_ap(records, preds)
    elapsed = time.perf_counter() - t0
    assert res.num_det == 405 * 300 and 0.0 < res.ap < 1.0
    assert elapsed < 1.0, f"voc_ap took {elapsed:.3f} s"


# ---------------------------------------------------------------------------------------------------------------------
# coco_metrics


def test_coco_metrics_perfect_is_one():
    records = [rec("a", [A, B]), rec("b", [C]), rec("empty")]
    preds = {"a": pred([A, B], [0.3, 0.9]), "b": pred([C], [0.5])}
    m = coco_metrics(records, preds)
    for k in ("AP", "AP50", "AP75", "AR", "AR@100", "AR@1000"):
        assert m[k] == pytest.approx(1.0, abs=1e-12), k
    assert m["AR@1"] == pytest.approx(2 / 3)  # one detection per image: 2 of 3 GTs
    assert math.isnan(m["AP_small"])  # no GT below 32^2 px


def test_coco_metrics_shifted_boxes_agree_with_voc(three_gt_case, capsys):
    records, preds = three_gt_case
    m = coco_metrics(records, preds)
    assert capsys.readouterr().out == ""  # pycocotools' prints are swallowed
    voc50 = voc_ap(records, preds, 0.5).ap
    # Same matches, different integration: pycocotools samples the envelope (1, 2/3, 3/5 over recall thirds) at the
    # 101 recall points 0, .01, ..., 1 -> (34 * 1 + 33 * 2/3 + 34 * 3/5) / 101 = 76.4 / 101 ~ 0.7564, while VOC
    # integrates exactly -> 34/45 ~ 0.7556. They agree to within the 1/101 sampling step.
    assert m["AP50"] == pytest.approx(76.4 / 101, abs=1e-9)
    assert m["AP50"] == pytest.approx(voc50, abs=0.01)
    # IoU of the TPs is 9/11: TP at thresholds .50 ... .80 (7 of 10), all FP at .85 .90 .95.
    assert m["AP75"] == pytest.approx(76.4 / 101, abs=1e-9)
    assert m["AP"] == pytest.approx(0.7 * 76.4 / 101, abs=1e-9)
    assert m["AR"] == pytest.approx(0.7, abs=1e-9)


def test_coco_metrics_ignores_detections_on_crowd_regions():
    records = [rec("a", [A], ignore=[(0, 200, 400, 480)])]
    preds = {"a": pred([(10, 210, 50, 250), A], [0.99, 0.5])}
    assert coco_metrics(records, preds)["AP"] == pytest.approx(1.0)
    assert voc_ap(records, preds).ap == pytest.approx(1.0)


def test_coco_metrics_degenerate_inputs():
    records = [rec("a", [A])]
    assert coco_metrics(records, {})["AP"] == 0.0
    assert coco_metrics([rec("a")], {"a": pred([A], [0.9])})["AP"] == 0.0


def test_coco_metrics_verbose_prints(three_gt_case, capsys):
    records, preds = three_gt_case
    coco_metrics(records, preds, verbose=True)
    assert "AP50" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# COCO json


def test_records_to_coco_fields():
    records = [
        rec("x/a", [(10, 20, 50, 80), (0, 0, 5, 5)], ignore=[(100, 100, 200, 150)]),
        rec("x/b", size=(320, 240)),
    ]
    d = records_to_coco(records, class_names=("head",))
    assert [im["id"] for im in d["images"]] == [1, 2]
    assert d["images"][1] == {"id": 2, "file_name": "b.jpg", "width": 320, "height": 240, "image_key": "x/b"}
    assert d["categories"] == [{"id": 1, "name": "head", "supercategory": "object"}]
    a0, a1, crowd = d["annotations"]
    assert a0["bbox"] == [10, 20, 40, 60] and a0["area"] == 2400 and a0["iscrowd"] == 0 and a0["category_id"] == 1
    assert a1["bbox"] == [0, 0, 5, 5] and a1["image_id"] == 1
    assert crowd["bbox"] == [100, 100, 100, 50] and crowd["iscrowd"] == 1
    assert len({a["id"] for a in d["annotations"]}) == 3
    json.dumps(d)  # serialisable: no numpy scalars
    rel = records_to_coco(records, image_root="/data")
    assert rel["images"][0]["file_name"] == "img/x/a.jpg"
    with pytest.raises(ValueError, match="labels"):
        records_to_coco([rec("c", [A], labels=np.array([2]))], class_names=("head",))
    with pytest.raises(ValueError, match="duplicate"):
        coco_image_ids([rec("a"), rec("a")])


def test_predictions_to_coco():
    records = [rec("a", [A]), rec("b", [C])]
    res = predictions_to_coco(records, {"b": pred([(1, 2, 11, 22)], [0.5])})
    assert res == [{"image_id": 2, "category_id": 1, "bbox": [1, 2, 10, 20], "score": 0.5}]
    json.dumps(res)


def test_round_trip_through_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    records = [rec("a", [A, B], ignore=[FAR]), rec("b", [(0.5, 1.25, 33.5, 40.75)]), rec("c")]
    path = write_coco_json(records, tmp_path / "sub" / "gt.json")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [1, 2, 3]
    assert coco.getCatIds() == [1]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1], iscrowd=None))
    assert sorted(a["iscrowd"] for a in anns) == [0, 0, 1]
    (b,) = coco.loadAnns(coco.getAnnIds(imgIds=[2]))
    x, y, w, h = b["bbox"]
    np.testing.assert_allclose([x, y, x + w, y + h], records[1].boxes_xyxy[0], atol=1e-5)
    assert coco.imgs[3]["width"] == 640 and coco.imgs[3]["image_key"] == "c"


# ---------------------------------------------------------------------------------------------------------------------
# Plot


def test_plot_pr_curve_writes_png(tmp_path, three_gt_case):
    records, preds = three_gt_case
    results = {"iou 0.5": voc_ap(records, preds, 0.5), "iou 0.85": voc_ap(records, preds, 0.85)}
    out = plot_pr_curve(results, tmp_path / "plots" / "pr.png", title="test")
    assert out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    single = plot_pr_curve(results["iou 0.5"], tmp_path / "one.png")
    assert single.stat().st_size > 1000
    empty = APResult(0.0, np.zeros(0), np.zeros(0), 0, 0, 0, 0)
    assert plot_pr_curve(empty, tmp_path / "empty.png").stat().st_size > 1000


def test_import_stays_light():
    # Load the module file on its own (the package __init__ pulls in torch, which is not this module's doing).
    path = Path(__file__).resolve().parents[1] / "detector" / "evaluation.py"
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('evaluation_alone', {str(path)!r}); "
        "mod = sys.modules['evaluation_alone'] = importlib.util.module_from_spec(spec); "
        "spec.loader.exec_module(mod); "
        "print(any(m.split('.')[0] in ('matplotlib', 'pycocotools', 'torch') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------------------------
# Command line


@pytest.mark.parametrize(
    "fmt,module,func,name", [("voc", "voc", "load_voc", "head"), ("wider", "wider", "load_wider", "face")]
)
def test_main_with_stub_loader(tmp_path, monkeypatch, fmt, module, func, name):
    calls = []

    def loader(root, split):
        calls.append((Path(root), split))
        return [rec("a", [A], ignore=[FAR]), rec("b")], None

    stub = types.ModuleType(f"detector.datasets.{module}")
    setattr(stub, func, loader)
    monkeypatch.setitem(sys.modules, f"detector.datasets.{module}", stub)
    out = tmp_path / "gt.json"
    assert coco_main(["--data", str(tmp_path), "--split", "test", "--out", str(out), "--format", fmt]) == 0
    assert calls == [(tmp_path, "test")]
    d = json.loads(out.read_text())
    assert len(d["images"]) == 2 and len(d["annotations"]) == 2
    assert d["categories"][0]["name"] == name


@pytest.mark.skipif(importlib.util.find_spec("detector.datasets.voc") is None, reason="VOC loader not written yet")
def test_main_with_real_voc_loader(tmp_path):
    import cv2

    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "JPEGImages").mkdir(parents=True)
    cv2.imwrite(str(root / "JPEGImages" / "img1.jpg"), np.zeros((48, 64, 3), np.uint8))
    (root / "ImageSets" / "Main" / "test.txt").write_text("img1\n")
    (root / "Annotations" / "img1.xml").write_text(
        "<annotation><filename>img1.jpg</filename><size><width>64</width><height>48</height><depth>3</depth></size>"
        "<object><name>person</name><difficult>0</difficult>"
        "<bndbox><xmin>11</xmin><ymin>6</ymin><xmax>30</xmax><ymax>25</ymax></bndbox></object></annotation>"
    )
    out = tmp_path / "gt.json"
    assert coco_main(["--data", str(root), "--split", "test", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert len(d["images"]) == 1 and d["images"][0]["width"] == 64
    assert len([a for a in d["annotations"] if not a["iscrowd"]]) == 1


@pytest.mark.skipif(importlib.util.find_spec("detector.datasets.wider") is None, reason="WIDER loader not written yet")
def test_main_with_real_wider_loader(tmp_path):
    import cv2

    root = tmp_path / "wider"
    (root / "WIDER_val" / "images" / "0--Parade").mkdir(parents=True)
    (root / "wider_face_split").mkdir()
    cv2.imwrite(str(root / "WIDER_val" / "images" / "0--Parade" / "0_Parade_1.jpg"), np.zeros((48, 64, 3), np.uint8))
    (root / "wider_face_split" / "wider_face_val_bbx_gt.txt").write_text(
        "0--Parade/0_Parade_1.jpg\n2\n"
        "10 5 20 20 0 0 0 0 0 0\n"  # valid face
        "40 10 8 8 2 0 0 1 0 0\n"  # invalid -> ignore region
    )
    out = tmp_path / "gt.json"
    assert coco_main(["--data", str(root), "--split", "val", "--out", str(out), "--format", "wider"]) == 0
    d = json.loads(out.read_text())
    assert d["images"][0]["image_key"] == "0--Parade/0_Parade_1" and d["categories"][0]["name"] == "face"
    assert sorted((a["iscrowd"], a["bbox"][2]) for a in d["annotations"]) == [(0, 20), (1, 8)]
