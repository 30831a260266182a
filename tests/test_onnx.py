"""ONNX export and the onnxruntime backend agree with PyTorch."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from detector import build_model  # noqa: E402
from detector.checkpoint import WeightsError, default_weights_path, load_model, save_weights  # noqa: E402
from detector.cli import main  # noqa: E402
from detector.export.onnx import OnnxDetector, export_onnx  # noqa: E402
from detector.inference import Detector  # noqa: E402
from detector.preprocess import to_model_input  # noqa: E402
from synthetic_data import real_data_root  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _real_images() -> list[np.ndarray]:
    images = [cv2.imread(str(REPO / "data" / "samples" / "astronaut.png"))]
    root = real_data_root()
    if root is not None and (root / "scut_head" / "JPEGImages").is_dir():
        images += [cv2.imread(str(p)) for p in sorted((root / "scut_head" / "JPEGImages").glob("*.jpg"))[:3]]
    return images


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("rnnpool_face_m4").eval()
    # Non-trivial BN statistics, as in a trained model.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    d = tmp_path_factory.mktemp("onnx")
    save_weights(d / "w.pt", model)
    return model, d / "w.pt", export_onnx(model, d / "m.onnx")


def test_raw_outputs_match_torch_on_real_images(exported):
    model, _, path = exported
    det = OnnxDetector(path)
    for image in _real_images():
        x, _ = to_model_input(image, model.config, mode="fixed")
        with torch.no_grad():
            ref = model(torch.from_numpy(x)[None])
        got = det.run_network(x)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.skipif(not default_weights_path().is_file(), reason="needs the shipped (trained) weights")
def test_detections_match_torch_backend_with_shipped_weights(tmp_path):
    model, _ = load_model(default_weights_path())
    onnx_det = OnnxDetector(export_onnx(model, tmp_path / "shipped.onnx"), score_threshold=0.3)
    torch_det = Detector(score_threshold=0.3, resize="fixed")
    for image in _real_images():
        a, b = torch_det(image), onnx_det(image)
        assert len(a) == len(b)
        np.testing.assert_allclose(a.boxes_xyxy, b.boxes_xyxy, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def test_export_cli_and_onnx_backend_cli(exported, tmp_path, capsys):
    _, weights, _ = exported
    out = tmp_path / "cli.onnx"
    assert main(["export", "onnx", "--weights", str(weights), "--out", str(out)]) == 0
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), _real_images()[0])
    assert main([str(img), "--backend", "onnx", "--weights", str(out), "--json"]) == 0
    assert '"model": "rnnpool_face_m4"' in capsys.readouterr().out


def test_foreign_onnx_file_is_a_clear_error(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="not an RNNPool-Face ONNX"):
        OnnxDetector(tmp_path / "x.onnx")


def test_session_options_and_versioned_export_cache(exported, tmp_path, monkeypatch):
    model, weights, path = exported
    x, _ = to_model_input(_real_images()[0], model.config, mode="fixed")
    ref = OnnxDetector(path).run_network(x)
    got = OnnxDetector(path, threads=1, allow_spinning=False).run_network(x)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # The cached export of torch weights is keyed by the export format version: a changed graph is re-exported.
    from detector.backends import load_detector
    from detector.export.onnx import EXPORT_VERSION

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    det = load_detector(weights=weights, backend="onnx")
    assert det.weights_path.parent == tmp_path / "rnnpool-face"
    assert det.weights_path.name.endswith(f"-v{EXPORT_VERSION}.onnx")
    meta = det.session.get_modelmeta().custom_metadata_map
    assert meta["export_version"] == str(EXPORT_VERSION)
