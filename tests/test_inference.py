"""Detector, Detections and the `detect` command on images."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector import Detections, Detector, build_model
from detector.checkpoint import WeightsError, default_weights_path, load_model, save_weights
from detector.cli import main
from detector.preprocess import input_size_for, to_model_input

REPO = Path(__file__).resolve().parents[1]
SHIPPED = default_weights_path()
needs_shipped = pytest.mark.skipif(not SHIPPED.is_file(), reason=f"no shipped weights at {SHIPPED}")


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "random.pt"
    save_weights(path, build_model("rnnpool_face_m4"), {"note": "untrained"})
    return path


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), (np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8))
    return path


def test_input_size_keeps_area_and_divisor():
    cfg = build_model("rnnpool_face_m4").config
    assert input_size_for(640, 480, cfg) == (320, 240)
    assert input_size_for(1280, 720, cfg) == (368, 208)  # 16:9 at ~320*240 pixels, multiples of 16
    assert input_size_for(50, 40, cfg, mode="fixed") == (320, 240)
    x, (sx, sy) = to_model_input(np.zeros((480, 640, 3), np.uint8), cfg)
    assert x.shape == (1, 240, 320) and x.dtype == np.float32 and (sx, sy) == (0.5, 0.5)


def test_detections_api():
    d = Detections(np.array([[1, 2, 11, 22], [5, 5, 9, 9]]), np.array([0.9, 0.4]), np.array([1, 1]),
                   ("head",), (40, 30))
    assert len(d) == 2 and d.counts() == {"head": 2}
    assert len(d.filter(min_score=0.5)) == 1
    out = d.to_dict()
    assert out["count"] == 2 and out["detections"][0] == {"box_xyxy": [1.0, 2.0, 11.0, 22.0], "score": 0.9,
                                                           "label": "head"}
    drawn = d.draw(np.zeros((30, 40, 3), np.uint8))
    assert drawn.shape == (30, 40, 3) and drawn.any()
    with pytest.raises(ValueError, match="unknown classes"):
        d.filter(classes=["face"])


def test_detector_boxes_are_in_original_pixels(random_weights):
    det = Detector(weights=random_weights, score_threshold=0.0, max_detections=50)
    img = (np.random.default_rng(1).random((300, 500, 3)) * 255).astype(np.uint8)
    out = det(img)
    assert 0 < len(out) <= 50 and out.image_size == (500, 300)
    assert (out.boxes_xyxy[:, [0, 2]] <= 500).all() and (out.boxes_xyxy[:, [1, 3]] <= 300).all()
    assert (out.boxes_xyxy >= 0).all() and np.all(np.diff(out.scores) <= 1e-6)
    assert len(det(img[:, :, 0])) > 0  # grayscale input works too


def test_bad_weights_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_model(tmp_path / "junk.pt")
    torch.save({"some": "thing"}, tmp_path / "foreign.pt")
    with pytest.raises(WeightsError, match="not an RNNPool-Face"):
        load_model(tmp_path / "foreign.pt")


def test_truncated_weights_are_a_clear_error(random_weights, tmp_path):
    data = random_weights.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cannot read"):
        load_model(tmp_path / "trunc.pt")


def test_cli_json_and_save(random_weights, image_file, tmp_path, capsys):
    code = main([str(image_file), "--weights", str(random_weights), "--json", "--threshold", "0.0",
                 "--save", str(tmp_path / "out")])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert result["image"] == str(image_file) and result["count"] == len(result["detections"]) > 0
    assert result["image_width"] == 130 and result["image_height"] == 90
    assert cv2.imread(str(tmp_path / "out" / "img_detections.jpg")).shape == (90, 130, 3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["does_not_exist.jpg"], "no such file"),
        (["{not_image}"], "not a JPEG, PNG, BMP or WebP image"),
        (["{image}", "--threshold", "3"], "--threshold"),
        (["{image}", "--weights", "{not_image}"], "cannot read weights"),
    ],
)
def test_cli_errors_are_one_line(args, message, random_weights, image_file, tmp_path, capsys):
    not_image = tmp_path / "fake.jpg"
    not_image.write_text("hello")
    args = [a.format(image=image_file, not_image=not_image) for a in args]
    if "--weights" not in args:
        args += ["--weights", str(random_weights)]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err


@needs_shipped
def test_shipped_weights_find_nothing_in_an_image_without_heads():
    det = Detector()
    assert len(det(np.full((240, 320, 3), 128, np.uint8))) == 0
    assert len(det(np.zeros((480, 640, 3), np.uint8))) == 0


@needs_shipped
def test_shipped_weights_find_the_astronaut():
    det = Detector()
    out = det(cv2.imread(str(REPO / "data" / "samples" / "astronaut.png")))
    assert len(out) >= 1


def test_cli_video_writes_annotated_video_and_counts(random_weights, tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (160, 120))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write mp4v")
    rng = np.random.default_rng(0)
    for _ in range(5):
        writer.write((rng.random((120, 160, 3)) * 255).astype(np.uint8))
    writer.release()
    code = main([str(video), "--weights", str(random_weights), "--save", str(tmp_path / "out"), "--max-frames", "4"])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " frame " in line]
    assert len(lines) == 4 and lines[0].startswith("clip frame 0: ")
    cap = cv2.VideoCapture(str(tmp_path / "out" / "clip_detections.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 4


def test_cli_missing_camera_is_a_clear_error(random_weights, capsys):
    assert main(["--webcam", "97", "--weights", str(random_weights)]) != 0
    assert "cannot open camera 97" in capsys.readouterr().err
