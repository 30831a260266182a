"""The C front (detector/native.py, detector/csrc/rnnpool_front.c) against torch."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from detector import native
from detector.models import build_model
from detector.native import NativeFront, NativeUnavailable

pytestmark = pytest.mark.skipif(
    shutil.which((shlex.split(os.environ.get("CC", "")) or ["cc"])[0]) is None,
    reason="no C compiler (cc or $CC) to build the native RNNPool front",
)

VARIANTS = ["rnnpool_face_m4", "rnnpool_face_m4_paper", "rnnpool_face_quant", "rnnpool_face_c"]
TRAINED = Path(__file__).resolve().parents[1] / "weights" / "rnnpool_face_m4.pt"
TOL = 1e-4


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return native.build_library(tmp_path_factory.mktemp("native-cache"))


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random stem and RNNPool parameters (zeta, nu and the biases included) and BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("stem", "rnnpool")):
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name.startswith("rnnpool") else 0.3))
        for m in model.stem.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def torch_front(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        t = torch.from_numpy(x)
        return model.rnnpool(model.stem((t - model.pixel_mean) / model.pixel_std)).contiguous().numpy()


def image(channels: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (1, channels, height, width)).astype(np.float32)


def check(model: torch.nn.Module, x: np.ndarray, library: Path) -> np.ndarray:
    """Parity with torch at 1 thread, and the same output from 2 and 3 threads (barriers of 2 and 3)."""
    ref = torch_front(model, x)
    out1 = NativeFront(model, threads=1, library=library)(x)
    assert out1.shape == ref.shape and out1.dtype == np.float32 and out1.flags.c_contiguous
    err = float(np.abs(out1 - ref).max())
    assert err <= TOL, f"max abs error {err:.2e}"
    for threads in (2, 3):
        assert np.array_equal(NativeFront(model, threads=threads, library=library)(x), out1), f"{threads} threads"
    return out1


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("size", [(40, 72), (37, 50)])
def test_variants_random_weights(name: str, size: tuple[int, int], library: Path) -> None:
    model = randomize(build_model(name), seed=1)
    check(model, image(model.config.in_channels, *size, seed=2), library)


@pytest.mark.parametrize(
    ("patch", "stride", "hidden", "stem"),
    [
        ((6, 4), (3, 2), (12, 5), ((3, 1), (5, 2))),  # non-square, hidden sizes off the fast paths, two stem convs
        ((5, 7), (2, 3), (8, 16), ()),  # no stem
        ((3, 3), (5, 5), (16, 8), ((4, 2),)),  # stride larger than the patch
    ],
)
def test_other_geometries(patch: tuple[int, int], stride: tuple[int, int], hidden: tuple[int, int],
                          stem: tuple[tuple[int, int], ...], library: Path) -> None:
    model = randomize(build_model("rnnpool_face_m4", rnnpool_patch=patch, rnnpool_stride=stride,
                                  rnnpool_hidden=hidden, stem=stem), seed=3)
    check(model, image(1, 37, 50, seed=4), library)
    check(model, image(1, 1, 2, seed=5), library)  # smaller than a patch


def test_large_bias_difference(library: Path) -> None:
    """|bias_update - bias_gate| > 10 takes the C code's two-exp path."""
    model = randomize(build_model("rnnpool_face_m4"), seed=6)
    with torch.no_grad():
        model.rnnpool.rnn1.bias_update[0] += 25.0
        model.rnnpool.rnn2.bias_gate[3] -= 30.0
    check(model, image(1, 37, 50, seed=7), library)


@pytest.mark.skipif(not TRAINED.is_file(), reason=f"{TRAINED.name} not found")
def test_trained_m4_320x240(library: Path) -> None:
    from detector.checkpoint import load_model

    model, _ = load_model(TRAINED)
    model.eval()
    x = image(1, 240, 320, seed=8)
    out = check(model, x, library)
    assert out.shape == (1, 64, 30, 40)
    # (C, H, W) input and a non-contiguous float64 one give the same result
    front = NativeFront(model, threads=2, library=library)
    assert np.array_equal(front(x[0]), out)
    assert np.array_equal(front(np.asfortranarray(x.astype(np.float64))), out)


def test_activations(library: Path) -> None:
    model = build_model("rnnpool_face_m4").eval()
    x = np.linspace(-30, 30, 200001, dtype=np.float32)
    tanh, sigmoid = NativeFront(model, threads=1, library=library).activations(x)
    xd = x.astype(np.float64)
    assert np.abs(tanh - np.tanh(xd)).max() < 3e-7
    assert np.abs(sigmoid - 1 / (1 + np.exp(-xd))).max() < 3e-7
    far = np.abs(xd) >= 0.05
    assert (np.abs(tanh - np.tanh(xd)) / np.abs(np.tanh(xd)))[far].max() < 2e-6
    unsat = xd >= -20
    assert (np.abs(sigmoid - 1 / (1 + np.exp(-xd))) / (1 / (1 + np.exp(-xd))))[unsat].max() < 2e-6


def test_bad_input(library: Path) -> None:
    front = NativeFront(build_model("rnnpool_face_m4").eval(), library=library)
    with pytest.raises(ValueError, match="expected"):
        front(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="one image"):
        front(np.zeros((2, 1, 8, 8), np.float32))


def test_broken_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CC", "false")
    with pytest.raises(NativeUnavailable, match="false") as info:
        native.build_library(tmp_path)
    assert "\n" not in str(info.value)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(NativeUnavailable, match="no C compiler"):
        native.build_library(tmp_path)
    assert not list(tmp_path.glob("*.so*"))


def test_compile_error(tmp_path: Path) -> None:
    src = tmp_path / "broken.c"
    src.write_text("int f(void) { return missing; }\n")
    with pytest.raises(NativeUnavailable, match="failed") as info:
        native.build_library(tmp_path / "cache", source=src)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache").glob("*"))  # no partial library left behind


def test_cache_key(tmp_path: Path, library: Path) -> None:
    cache = library.parent
    assert native.library_path(cache) == library
    mtime = library.stat().st_mtime_ns
    assert native.build_library(cache) == library and library.stat().st_mtime_ns == mtime  # cached, not rebuilt
    edited = tmp_path / native.SOURCE.name
    edited.write_text(native.SOURCE.read_text() + "\n/* edited */\n")
    assert native.library_path(cache, source=edited) != library


def test_nothing_compiled_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("a subprocess ran at import time")

    monkeypatch.setattr("subprocess.run", no_subprocess)
    spec = importlib.util.spec_from_file_location("_native_import_probe", native.__file__)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # a fresh copy; detector.native stays as it is


# --- the native backend: C front + onnxruntime after RNNPool ---------------------------------------------------------


@pytest.fixture(scope="module")
def native_setup(tmp_path_factory: pytest.TempPathFactory, library: Path):
    """A seeded default M4 (2x2 sub-cell anchors on the first head) saved as weights, and its after-RNNPool export."""
    pytest.importorskip("onnxruntime")
    from detector.checkpoint import save_weights
    from detector.export.onnx import export_onnx_after_rnnpool

    torch.manual_seed(0)
    model = randomize(build_model("rnnpool_face_m4_paper"), seed=5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    d = tmp_path_factory.mktemp("native-backend")
    weights = d / "w.pt"
    save_weights(weights, model)
    onnx = export_onnx_after_rnnpool(model, d / "after.onnx")
    return model, weights, onnx


def test_native_detector_matches_torch_at_any_input_size(native_setup, monkeypatch: pytest.MonkeyPatch,
                                                        library: Path) -> None:
    from detector.inference import Detector
    from detector.native import NativeDetector

    model, weights, onnx = native_setup
    monkeypatch.setattr(native, "build_library", lambda *a, **k: library)
    det = NativeDetector(weights=weights, onnx_path=onnx, score_threshold=0.0, max_detections=50)
    ref = Detector(weights=weights, score_threshold=0.0, max_detections=50)
    assert det.resize == "area"  # the paper's protocol, like torch (the onnx backend needs a fixed size)
    # onnxruntime's pool has the front's threads and stops spinning when a run returns (it would slow the next front)
    opts = det.session.get_session_options()
    assert opts.intra_op_num_threads == det.front.threads == 2
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    rng = np.random.default_rng(1)
    for h, w in ((240, 320), (200, 360), (97, 131)):
        x = rng.uniform(0, 255, (1, h, w)).astype(np.float32)
        for a, b in zip(det.run_network(x), ref.run_network(x)):
            assert a.shape == b.shape
            assert float((a - b).abs().max()) < 1e-4
    img = (rng.uniform(0, 255, (180, 260, 3))).astype(np.uint8)
    d1, d2 = det(img), ref(img)
    assert len(d1) == len(d2) == 50
    np.testing.assert_allclose(d1.boxes_xyxy, d2.boxes_xyxy, atol=1e-2)


def test_native_backend_refuses_wrong_files(native_setup, tmp_path: Path) -> None:
    from detector.backends import load_detector
    from detector.checkpoint import WeightsError
    from detector.export.onnx import OnnxDetector

    _, _, onnx = native_setup
    with pytest.raises(WeightsError, match="after RNNPool"):
        OnnxDetector(onnx)  # the partial graph is no model for the onnx backend
    with pytest.raises(WeightsError, match="not an .onnx file"):
        load_detector(weights=onnx, backend="native")


def test_cli_native_backend_and_missing_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import cv2

    from detector.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    img = tmp_path / "blank.png"
    cv2.imwrite(str(img), np.full((60, 80, 3), 127, np.uint8))
    assert main([str(img), "--backend", "native", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"count"' in out
    monkeypatch.setenv("CC", "false")
    assert main([str(img), "--backend", "native"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("detect: error: ") and "compil" in err[0]


def test_service_on_native_backend_under_concurrent_requests(native_setup, monkeypatch: pytest.MonkeyPatch,
                                                             library: Path) -> None:
    """Concurrent POST /detect on the native backend (worker threads share one C front, with one workspace per input
    size, and one onnxruntime session): every response equals the detector's own result for its image. The images
    differ but have one size, so that calls that overlapped in the workspace would mix them up."""
    import asyncio

    import cv2
    import httpx

    from app.main import create_app
    from app.settings import Settings
    from detector.native import NativeDetector

    _, weights, onnx = native_setup
    monkeypatch.setattr(native, "build_library", lambda *a, **k: library)
    det = NativeDetector(weights=weights, onnx_path=onnx, score_threshold=0.3, max_detections=20)
    rng = np.random.default_rng(9)
    images = [rng.uniform(0, 255, (240, 320, 3)).astype(np.uint8) for _ in range(4)]
    bodies = [cv2.imencode(".png", im)[1].tobytes() for im in images]
    expected = [[[round(float(v), 2) for v in box] for box in det(im).boxes_xyxy] for im in images]
    assert all(expected) and len({str(e) for e in expected}) == 4, "the test needs distinct, non-empty results"
    app = create_app(Settings(max_concurrency=3, max_queue=64, score_threshold=0.3, max_detections=20), detector=det)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return await asyncio.gather(*(client.post("/detect", content=bodies[i % 4],
                                                      headers={"Content-Type": "image/png"}) for i in range(32)))

    for i, r in enumerate(asyncio.run(run())):
        assert r.status_code == 200, r.text
        assert [d["box_xyxy"] for d in r.json()["detections"]] == expected[i % 4], f"request {i}"
