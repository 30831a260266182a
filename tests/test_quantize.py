"""Post-training int8 quantisation: fixed-point helpers, BatchNorm folding, the integer reference against the float
model, :class:`Int8Detector`, and (with the real data and trained weights) AP50 int8 vs float on partB_val."""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.export.int8_ref import dequantize_heads, run_int8, run_int8_heads
from detector.export.quantize import (
    calibrate,
    fold_bn,
    quantize_model,
    quantize_multiplier,
    requant,
    sigmoid_lut,
    tanh_lut,
)
from detector.models import build_model
from detector.nn.layers import ConvBNAct

try:
    from synthetic_data import real_data_root
except ImportError:  # pragma: no cover - run from the repository root
    from tests.synthetic_data import real_data_root

REPO = Path(__file__).resolve().parents[1]


def _images(n: int, size: tuple[int, int] = (320, 240), seed: int = 0) -> list[np.ndarray]:
    """Smooth random grayscale frames (blobs on gradients) ``(H, W)`` uint8."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        img = rng.uniform(40, 200) + rng.uniform(-0.3, 0.3) * xx + rng.uniform(-0.3, 0.3) * yy
        for _ in range(12):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 30)
            img += rng.uniform(-80, 80) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        out.append(np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module", params=["rnnpool_face_m4", "rnnpool_face_m4_paper"])
def float_and_int8(request):
    torch.manual_seed(0)
    model = build_model(request.param).eval()
    images = _images(6)
    qm = quantize_model(model, calibrate(model, images[:4]))
    return model, qm, images


def test_quantize_multiplier_is_accurate():
    scales = np.array([1e-5, 0.003, 0.1, 0.26, 0.9, 1.7, 37.0])
    m, n = quantize_multiplier(scales)
    assert np.all((m >= 2**30) & (m < 2**31))
    np.testing.assert_allclose(m / 2.0**n, scales, rtol=2**-30)
    with pytest.raises(ValueError):
        quantize_multiplier(np.array([0.0]))


def test_requant_rounds_half_up_exactly():
    rng = np.random.default_rng(1)
    acc = rng.integers(-2**30, 2**30, size=500)
    m, n = quantize_multiplier(np.array([0.00123]))
    got = requant(acc, m, n)
    for a, g in zip(acc[:200].tolist(), got[:200].tolist()):
        exact = Fraction(a * int(m[0]), 2 ** int(n[0]))
        assert g == math.floor(exact + Fraction(1, 2))
    # ties round up
    assert requant(np.array([1, -1, 3]), 1 << 30, 31).tolist() == [1, 0, 2]


def test_lookup_tables():
    sig, tanh = sigmoid_lut().astype(np.float64) / 32768, tanh_lut().astype(np.float64) / 32768
    v = (np.arange(4096) - 2048) / 256
    assert np.abs(sig - 1 / (1 + np.exp(-v))).max() < 1e-4
    assert np.abs(tanh - np.tanh(v)).max() < 1e-4


def test_fold_bn_matches_module():
    torch.manual_seed(0)
    layer = ConvBNAct(8, 6, 3, 2, act=None)
    with torch.no_grad():
        bn = layer[1]
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    layer.eval()
    x = torch.randn(2, 8, 11, 9)
    w, b = fold_bn(layer)
    ref = torch.nn.functional.conv2d(x.double(), torch.from_numpy(w), torch.from_numpy(b), stride=2, padding=1)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_int8_reference_tracks_float(float_and_int8):
    model, qm, images = float_and_int8
    for img in images[4:]:
        cls_q, box_q = run_int8(qm, img)
        with torch.no_grad():
            cls_f, box_f = model(torch.from_numpy(img.astype(np.float32))[None, None])
        a = model.num_anchors(240, 320)
        assert cls_q.shape == cls_f.shape == (1, a, 2) and box_q.shape == box_f.shape == (1, a, 4)
        for q, f in ((cls_q, cls_f), (box_q, box_f)):
            err = (q - f).abs()
            spread = f.std()
            assert float(err.mean()) < 0.1 * float(spread) + 1e-3, (float(err.mean()), float(spread))
            corr = np.corrcoef(q.flatten().numpy(), f.flatten().numpy())[0, 1]
            assert corr > 0.98


def test_int8_reference_is_integer_only_and_deterministic(float_and_int8):
    model, qm, images = float_and_int8
    a = run_int8_heads(qm, images[0])
    b = run_int8_heads(qm, images[0].copy())
    assert [x.dtype for x in a] == [np.int32] * 4
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    cls, box = dequantize_heads(qm, a)
    assert torch.isfinite(cls).all() and torch.isfinite(box).all()
    # any input size that is a multiple of 16 works (area resize)
    cls, _ = run_int8(qm, _images(1, (336, 256))[0])
    assert cls.shape[1] == model.num_anchors(256, 336)


def test_int8_detector(float_and_int8):
    from detector.export.m4 import Int8Detector

    model, qm, images = float_and_int8
    det = Int8Detector(qm, model, score_threshold=0.0, max_detections=5)
    dets = det(np.stack([images[0]] * 3, axis=-1))
    assert len(dets) <= 5


def _trained_weights() -> Path | None:
    env = os.environ.get("RNNPOOL_WEIGHTS")
    path = Path(env) if env else REPO / "weights" / "rnnpool_face_m4.pt"
    return path if path.is_file() else None


@pytest.mark.skipif(real_data_root() is None, reason="real SCUT-HEAD data not found ($RNNPOOL_DATA)")
@pytest.mark.skipif(_trained_weights() is None, reason="trained weights not found (weights/rnnpool_face_m4.pt or "
                                                       "$RNNPOOL_WEIGHTS)")
def test_int8_ap50_within_001_of_float_on_partb_val():
    """AP50 of the int8 reference vs float on partB_val (``$RNNPOOL_AP_IMAGES`` images, default 80, calibration on 48
    partB_train images, to keep the test short; ``benchmarks/m4.py`` runs the whole split with 200)."""
    from detector.datasets.voc import load_voc
    from detector.export.int8_eval import compare_ap
    from detector.export.quantize import quantize_from_checkpoint

    root = real_data_root()
    model, qm = quantize_from_checkpoint(_trained_weights(), root, count=48)
    records, _ = load_voc(root / "scut_head", "partB_val", verify_images=False)
    n = int(os.environ.get("RNNPOOL_AP_IMAGES", "80"))
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(records), size=min(n, len(records)), replace=False).tolist())
    res = compare_ap(model, qm, [records[i] for i in pick])
    assert abs(res["int8_ap50"] - res["float_ap50"]) <= 0.01, res
