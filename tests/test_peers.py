"""benchmarks/peers.py and benchmarks/faces.py: the peer face detectors (each skipped when its package is absent) and
the WIDER FACE side-by-side evaluation on a tiny synthetic WIDER tree."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from synthetic_data import make_wider_tree  # noqa: E402

from benchmarks import faces, peers  # noqa: E402
from detector import build_model  # noqa: E402
from detector.checkpoint import save_weights  # noqa: E402


def test_weighted_nms_blends_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], dtype=np.float64)
    scores = np.array([0.9, 0.3, 0.5])
    out, out_scores = peers.weighted_nms(boxes, scores, iou_threshold=0.3)
    np.testing.assert_allclose(out_scores, [0.9, 0.5])
    np.testing.assert_allclose(out[0], [0.25, 0, 10.25, 10])  # (0.9 * box0 + 0.3 * box1) / 1.2
    np.testing.assert_allclose(out[1], boxes[2])


@pytest.mark.parametrize("peer_cls", peers.PEERS, ids=lambda c: c.name)
def test_peer_returns_face_detections_in_image_pixels(peer_cls) -> None:  # noqa: ANN001
    reason = peer_cls.skip_reason()
    if reason:
        pytest.skip(reason)
    peer = peer_cls(threads=1, min_score=0.01)
    image = np.full((120, 200, 3), 90, np.uint8)
    image[30:90, 70:130] = 200
    dets, t = peer.timed(image)
    assert dets.class_names == ("face",) and dets.image_size == (200, 120)
    assert set(dets.labels.tolist()) <= {1}
    assert np.all(np.diff(dets.scores) <= 0) and np.all((dets.scores >= 0.01) & (dets.scores <= 1))
    assert np.all(dets.boxes_xyxy[:, [0, 2]] <= 200) and np.all(dets.boxes_xyxy[:, [1, 3]] <= 120)
    assert np.all(dets.boxes_xyxy >= 0)
    assert set(t) == {"pre", "net", "post", "total"} and t["total"] >= t["net"] > 0
    assert len(peer(image[:, :, 0])) >= 0  # grayscale input is accepted
    if hasattr(peer, "close"):
        peer.close()


def test_faces_benchmark_on_synthetic_wider(tmp_path, capsys) -> None:
    wider = make_wider_tree(tmp_path / "wider")
    weights = tmp_path / "untrained.pt"
    save_weights(weights, build_model("rnnpool_face_m4"))  # one class, "head": evaluated as the face label
    assert faces.main(["--data", str(wider.root), "--threads", "1", "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "| detector | input | AP50 |" in out and "3 images of `wider` (val), 3 faces, 1 faces flagged" in out
    for cls in peers.PEERS:
        assert (f"| {cls.name} | – | skipped:" in out) != (f"| {cls.name} | 192x192" in out), cls.name
    assert "| ours: rnnpool_face_m4 (untrained.pt, class 'head') |" in out


def test_faces_benchmark_skips_without_data(tmp_path, capsys) -> None:
    assert faces.main(["--data", str(tmp_path / "absent")]) == 0
    assert "skipped: no WIDER FACE val ground truth" in capsys.readouterr().out
