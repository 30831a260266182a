"""Faces: the pseudo-label loader and its ignore policy, the detector group behind ``classes``, face training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from detector import Detections, build_model
from detector.checkpoint import load_checkpoint, load_model, save_weights
from detector.cli import main
from detector.datasets.pseudo_faces import FaceLabelPolicy, face_records, read_face_labels
from detector.datasets.records import ImageRecord
from detector.detector_group import DetectorGroup, parse_classes
from detector.train import TrainConfig, load_matching_state, split_holdout, train
from synthetic_data import make_voc_tree

f32 = lambda rows: np.array(rows, dtype=np.float32).reshape(-1, 4)  # noqa: E731


def _record(heads, image_id="img") -> ImageRecord:
    return ImageRecord(image_id, f"{image_id}.jpg", 400, 300, f32(heads), np.ones(len(heads), np.int64))


# ------------------------------------------------------------------------------------------------ pseudo-labels


def test_policy_faces_ignores_and_background():
    heads = [[0, 0, 40, 40], [100, 100, 110, 110], [200, 200, 260, 260], [300, 10, 312, 22]]
    teacher = {"img": np.array([
        [10, 10, 30, 32, 0.95],    # in head 0, confident: a face
        [5, 5, 15, 15, 0.40],      # in head 0, low score: ignore
        [150, 20, 170, 40, 0.95],  # in no head, very confident: a face the head annotation missed
        [150, 200, 170, 220, 0.6], # in no head, not confident enough: ignore
        [302, 12, 310, 20, 0.8],   # in the small head 3: a face (so head 3 is not a blind spot)
        [390, 290, 420, 320, 0.99],  # partly outside the image: clipped to it, in no head: a face
    ], np.float32)}
    # head 1 (10 px, no face box) is a teacher blind spot -> ignore; head 2 (60 px, no face) -> background.
    records, report = face_records([_record(heads)], teacher, FaceLabelPolicy(0.5, 0.9, 16.0))
    rec = records[0]
    np.testing.assert_array_equal(rec.boxes_xyxy, f32([[10, 10, 30, 32], [150, 20, 170, 40], [302, 12, 310, 20],
                                                       [390, 290, 400, 300]]))
    np.testing.assert_array_equal(rec.labels, [1, 1, 1, 1])
    np.testing.assert_array_equal(rec.ignore_xyxy, f32([[5, 5, 15, 15], [150, 200, 170, 220], [100, 100, 110, 110]]))
    assert (report.images, report.faces, report.faces_outside_heads) == (1, 4, 2)
    assert (report.ignored_low_score, report.ignored_outside_heads, report.ignored_small_heads) == (1, 1, 1)


def test_policy_thresholds_move_boxes_between_faces_and_ignores():
    teacher = {"img": np.array([[10, 10, 30, 32, 0.7]], np.float32)}
    strict, _ = face_records([_record([[0, 0, 40, 40]])], teacher, FaceLabelPolicy(min_score=0.8))
    loose, _ = face_records([_record([[0, 0, 40, 40]])], teacher, FaceLabelPolicy(min_score=0.6))
    assert len(strict[0].boxes_xyxy) == 0 and len(strict[0].ignore_xyxy) == 1
    assert len(loose[0].boxes_xyxy) == 1 and len(loose[0].ignore_xyxy) == 0
    no_small, _ = face_records([_record([[0, 0, 10, 10]])], {"img": np.zeros((0, 5))}, FaceLabelPolicy(small_head_side=0))
    assert len(no_small[0].ignore_xyxy) == 0
    with pytest.raises(ValueError, match="min_score"):
        FaceLabelPolicy(min_score=1.5)


def test_image_without_labels_ignores_its_heads():
    records, report = face_records([_record([[0, 0, 40, 40]], "unseen")], {})
    assert len(records[0].boxes_xyxy) == 0
    np.testing.assert_array_equal(records[0].ignore_xyxy, f32([[0, 0, 40, 40]]))
    assert report.images_without_labels == 1


def test_read_face_labels(tmp_path):
    good = tmp_path / "faces.json"
    good.write_text(json.dumps({"teacher": "t", "faces": {"a": [[1, 2, 3, 4, 0.9]], "b": []}}))
    labels = read_face_labels(good)
    np.testing.assert_array_equal(labels["a"], np.array([[1, 2, 3, 4, 0.9]], np.float32))
    assert labels["b"].shape == (0, 5)
    for text, match in [("{", "not JSON"), ('{"x": 1}', "'faces' mapping"), ('{"faces": {"a": [[1, 2, 3]]}}', "'a'"),
                        ('{"faces": {"a": [[1, 2, 3, 4, NaN]]}}', "non-finite")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_face_labels(bad)


# ------------------------------------------------------------------------------------------------ detector group


class _Fake:
    def __init__(self, name, class_names, boxes, scores, labels):
        self.name, self.class_names = name, class_names
        self._dets = (f32(boxes), np.array(scores, np.float32), np.array(labels))
        self.calls: list[dict] = []

    def __call__(self, image_bgr, score_threshold=None, max_detections=None) -> Detections:
        self.calls.append({"threshold": score_threshold, "max_detections": max_detections})
        h, w = image_bgr.shape[:2]
        dets = Detections(*self._dets, self.class_names, (w, h)).filter(min_score=score_threshold or 0.0)
        return dets.select(slice(0, max_detections))


def _group():
    heads = _Fake("heads", ("head",), [[0, 0, 10, 10], [20, 0, 30, 10]], [0.9, 0.6], [1, 1])
    faces = _Fake("faces", ("face",), [[2, 2, 8, 8]], [0.8], [1])
    return DetectorGroup([heads, faces]), heads, faces


def test_group_runs_only_the_models_of_the_requested_classes():
    group, heads, faces = _group()
    image = np.zeros((40, 50, 3), np.uint8)
    assert group.class_names == ("head", "face") and group.default_classes == ("head",)
    dets = group(image)
    assert dets.class_names == ("head",) and dets.scores.tolist() == pytest.approx([0.9, 0.6]) and not faces.calls
    dets = group(image, classes=["face"])
    assert dets.class_names == ("face",) and dets.label_names == ["face"] and len(heads.calls) == 1
    dets = group(image, classes=["face", "head"], max_detections=2)  # group order; merged by score, then capped
    assert dets.class_names == ("head", "face") and dets.label_names == ["head", "face"]
    assert dets.scores.tolist() == pytest.approx([0.9, 0.8]) and dets.image_size == (50, 40)
    assert group(image, classes=["all"], score_threshold=0.7).label_names == ["head", "face"]
    assert group.model_names(["face"]) == ["faces"] and group.model_names(["all"]) == ["heads", "faces"]
    with pytest.raises(ValueError, match="unknown class.*cat.*available: head, face"):
        group(image, classes=["cat"])


def test_group_filters_a_two_class_model_before_capping():
    both = _Fake("both", ("head", "face"), [[0, 0, 9, 9], [1, 1, 5, 5]], [0.9, 0.7], [1, 2])
    group = DetectorGroup([both], default_classes=["face"])
    dets = group(np.zeros((20, 20, 3), np.uint8), max_detections=1)
    assert dets.label_names == ["face"] and both.calls[-1]["max_detections"] is None


def test_parse_classes_and_concat():
    assert parse_classes(" head, face,head ") == ["head", "face"] and parse_classes(None) is None
    with pytest.raises(ValueError, match="at least one"):
        parse_classes(" , ")
    a = Detections(f32([[0, 0, 1, 1]]), [0.5], [1], ("face",), (9, 9))
    b = Detections(f32([[1, 1, 2, 2], [2, 2, 3, 3]]), [0.7, 0.2], [1, 1], ("head",), (9, 9))
    merged = Detections.concat([a, b], ("head", "face"))
    assert merged.labels.tolist() == [1, 2, 1] and merged.scores.tolist() == pytest.approx([0.7, 0.5, 0.2])
    with pytest.raises(ValueError, match="not in"):
        Detections.concat([a], ("head",))


def test_cli_classes(tmp_path, capsys):
    import cv2

    image = tmp_path / "img.png"
    cv2.imwrite(str(image), np.full((60, 80, 3), 128, np.uint8))
    torch.manual_seed(0)
    head_w, face_w = tmp_path / "head.pt", tmp_path / "face.pt"
    save_weights(head_w, build_model("rnnpool_face_m4", input_size=(64, 48)))
    save_weights(face_w, build_model("rnnpool_face_m4_face", input_size=(64, 48)))
    assert main([str(image), "--weights", str(head_w), "--face-weights", str(face_w), "--classes", "head,face",
                 "--threshold", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["counts"]) == {"head", "face"} and out["model"] == "rnnpool_face_m4+rnnpool_face_m4_face"
    assert {d["label"] for d in out["detections"]} == {"head", "face"}
    assert main([str(image), "--weights", str(head_w), "--face-weights", str(face_w), "--classes", "face",
                 "--threshold", "0.99"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: 0 faces")
    assert main([str(image), "--weights", str(head_w), "--face-weights", str(face_w), "--classes", "cat"]) == 2
    assert "--classes: unknown class(es) cat" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ training


def test_split_holdout_is_seeded_and_disjoint():
    records = list(range(20))
    train_a, held_a = split_holdout(records, 5, seed=0)
    train_b, held_b = split_holdout(records, 5, seed=0)
    assert (train_a, held_a) == (train_b, held_b) and len(held_a) == 5 and sorted(train_a + held_a) == records
    assert split_holdout(records, 5, seed=1)[1] != held_a
    with pytest.raises(ValueError, match="holdout"):
        split_holdout(records, 20, seed=0)


def test_load_matching_state_skips_tensors_of_another_shape():
    torch.manual_seed(0)
    heads = build_model("rnnpool_face_m4_paper", input_size=(64, 48))
    two = build_model("rnnpool_face_m4_paper", input_size=(64, 48), class_names=("head", "face"))
    skipped = load_matching_state(two, heads.state_dict())
    assert skipped and all(".cls." in k for k in skipped)
    assert torch.equal(two.state_dict()["rnnpool.rnn1.W"], heads.state_dict()["rnnpool.rnn1.W"])
    face = build_model("rnnpool_face_m4_face", input_size=(64, 48))
    assert load_matching_state(face, heads.state_dict()) == []


def test_face_training_from_pseudo_labels_with_holdout_and_init(tmp_path):
    voc = make_voc_tree(tmp_path / "voc")
    from detector.datasets.voc import load_voc

    records, _ = load_voc(voc.root, voc.split)
    # A face box in the upper middle of every head of the synthetic images.
    faces = {r.image_id: [[x0 + (x1 - x0) * 0.2, y0 + (y1 - y0) * 0.2, x1 - (x1 - x0) * 0.2, y1 - (y1 - y0) * 0.1, 0.9]
                          for x0, y0, x1, y1 in r.boxes_xyxy.tolist()] for r in records}
    (voc.root / "faces_retinaface.json").write_text(json.dumps({"faces": faces}))
    torch.manual_seed(0)
    init = tmp_path / "heads.pt"
    save_weights(init, build_model("rnnpool_face_m4", input_size=(96, 64)))
    cfg = TrainConfig(data=str(voc.root), out=str(tmp_path / "run"), model="rnnpool_face_m4_face",
                      train_split=voc.split, val_split=None, epochs=2, batch_size=4, lr=0.02, warmup_epochs=0.5,
                      input_size=(96, 64), num_workers=0, cache_max_side=160, eval_every=1, progress=False,
                      face_labels="auto", holdout=2, init_weights=str(init))
    row = train(cfg)
    assert row["val_ap50"] is not None
    best, meta = load_model(tmp_path / "run" / "best.pt")
    assert best.config.class_names == ("face",) and meta["selected_on"] == "holdout"
    assert meta["val_ap50"] == max(json.loads(line)["val_ap50"] for line in
                                   (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert load_checkpoint(tmp_path / "run" / "last.pt")["train_config"]["face_labels"] == "auto"
    with pytest.raises(ValueError, match="one-class face model"):
        train(TrainConfig(**{**cfg.__dict__, "model": "rnnpool_face_m4", "out": str(tmp_path / "r2")}))
