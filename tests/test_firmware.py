"""The generated C network: memory plan, host build (gcc, also under ASan/UBSan) and Cortex-M4 build under QEMU,
bit-exact with the numpy int8 reference; the linker script refuses a too-small RAM budget.

Real SCUT-HEAD frames are used when ``$RNNPOOL_DATA`` has them (synthetic frames otherwise); trained weights when
``weights/rnnpool_face_m4.pt`` (or ``$RNNPOOL_WEIGHTS``) exists (a seeded untrained model otherwise). Tests that need a
compiler, the ARM toolchain or QEMU skip with a reason when it is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.export import m4
from detector.export.quantize import calibrate, calibration_images, quantize_model
from detector.models import build_model

try:
    from synthetic_data import real_data_root
except ImportError:  # pragma: no cover
    from tests.synthetic_data import real_data_root

REPO = Path(__file__).resolve().parents[1]
HAVE_HOST = shutil.which("make") is not None and shutil.which("cc") is not None
HAVE_ARM = shutil.which("arm-none-eabi-gcc") is not None and HAVE_HOST
HAVE_QEMU = shutil.which("qemu-system-arm") is not None
needs_host = pytest.mark.skipif(not HAVE_HOST, reason="needs make and a host C compiler (cc)")
needs_arm = pytest.mark.skipif(not HAVE_ARM, reason="needs arm-none-eabi-gcc (apt-get install gcc-arm-none-eabi "
                                                    "libnewlib-arm-none-eabi)")
needs_qemu = pytest.mark.skipif(not (HAVE_ARM and HAVE_QEMU), reason="needs arm-none-eabi-gcc and qemu-system-arm")


def _frames(n: int) -> list[np.ndarray]:
    root = real_data_root()
    if root is not None and (root / "scut_head").is_dir():
        return calibration_images(root / "scut_head", "partB_val", count=n, seed=3)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    out = []
    for _ in range(n):
        img = 120 + 0.2 * xx - 0.1 * yy + rng.normal(0, 25, (240, 320))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """``(qmodel, out_dir, plan, frames)``: a generated C project."""
    env = os.environ.get("RNNPOOL_WEIGHTS")
    weights = Path(env) if env else REPO / "weights" / "rnnpool_face_m4.pt"
    if weights.is_file():
        from detector.checkpoint import load_model

        model, _ = load_model(weights)
    else:
        torch.manual_seed(0)
        model = build_model("rnnpool_face_m4")
    model = model.eval()
    frames = _frames(3)
    qm = quantize_model(model, calibrate(model, frames))
    out = tmp_path_factory.mktemp("m4_project")
    plan = m4.generate(qm, out)
    return qm, out, plan, frames


def test_memory_plan_and_sources(project):
    qm, out, plan, _ = project
    assert plan.frame == 320 * 240
    assert plan.arena <= 100 * 1024  # frame + shared scratch: the 160x120x4 stem map never exists
    assert plan.stage_scratch["stem+rnnpool"] < 160 * 120 * 4 // 3
    header = (out / "model.h").read_text()
    assert f"#define RP_SCRATCH_BYTES {plan.scratch}" in header and "RP_ARENA_BYTES" in header
    weights = (out / "weights.c").read_text()
    assert "static const int32_t" in weights and "const uint64_t" in weights
    network = (out / "network.c").read_text()
    assert network.count("mbconv_run(") == 4 and network.count("head_run(") == 4
    for name in ("kernels.c", "rnnpool_int8.h", "startup_m4.c", "m4.ld", "Makefile", "main_host.c", "main_m4.c"):
        assert (out / name).is_file()
    report = m4.report_markdown(plan, {})
    assert "RP_ARENA_BYTES" in report and "multiply-adds" in report


def test_memory_plan_rejects_unsupported_sizes(project):
    qm, *_ = project
    import copy

    bad = copy.deepcopy(qm)
    bad.input_size = (328, 240)
    with pytest.raises(ValueError):
        m4.memory_plan(bad)


@needs_host
def test_host_build_is_bit_exact_with_the_int8_reference(project):
    qm, out, _, frames = project
    for frame in frames[:2]:
        heads, stats = m4.parse_output(m4.run_host(out, frame, "host"))
        ref = m4.reference_output(qm, frame)
        assert [h.shape for h in heads] == [r.shape for r in ref]
        for h, r in zip(heads, ref):
            np.testing.assert_array_equal(h, r)
        assert stats["arena_bytes"] > 0


@needs_host
def test_host_build_under_sanitizers(project):
    qm, out, _, frames = project
    heads, _ = m4.parse_output(m4.run_host(out, frames[2], "asan"))
    for h, r in zip(heads, m4.reference_output(qm, frames[2])):
        np.testing.assert_array_equal(h, r)


@needs_host
@pytest.mark.parametrize("kind", ["noise", "zeros", "saturated", "checkerboard"])
def test_sanitizer_build_on_adversarial_frames(project, kind):
    """ASan/UBSan (global redzones around the static arena catch any write outside it) on inputs far from the
    calibration images; the output stays bit-exact with the reference."""
    qm, out, _, _ = project
    rng = np.random.default_rng(7)
    frame = {
        "noise": lambda: rng.integers(0, 256, (240, 320), dtype=np.uint8),
        "zeros": lambda: np.zeros((240, 320), np.uint8),
        "saturated": lambda: np.full((240, 320), 255, np.uint8),
        "checkerboard": lambda: ((np.indices((240, 320)).sum(axis=0) % 2) * 255).astype(np.uint8),
    }[kind]()
    heads, _ = m4.parse_output(m4.run_host(out, frame, "asan"))
    for h, r in zip(heads, m4.reference_output(qm, frame)):
        np.testing.assert_array_equal(h, r)


@needs_host
def test_generated_c_never_writes_outside_its_arena(project):
    """256 guard bytes on each side of the arena keep their fill pattern on every kind of frame; a build that
    writes one byte past the arena on purpose is caught."""
    import subprocess

    qm, out, _, frames = project
    rng = np.random.default_rng(11)
    for frame in (frames[0], rng.integers(0, 256, (240, 320), dtype=np.uint8), np.full((240, 320), 255, np.uint8)):
        text = m4.run_host(out, frame, "guard")
        assert "# guard_bytes_touched 0" in text
        heads, _ = m4.parse_output(text)
        for h, r in zip(heads, m4.reference_output(qm, frame)):
            np.testing.assert_array_equal(h, r)
    selftest = subprocess.run([str(out / "build" / "detect_guard_selftest"), str(out / "frame.raw")],
                              capture_output=True, text=True)
    assert selftest.returncode == 3 and "# guard_bytes_touched 1" in selftest.stdout


@needs_qemu
def test_m4_build_under_qemu_is_bit_exact_with_host(project):
    qm, out, _, frames = project
    text = m4.run_m4(out, frames[0], timeout=300)
    heads, stats = m4.parse_output(text)
    host, _ = m4.parse_output(m4.run_host(out, frames[0], "host"))
    ref = m4.reference_output(qm, frames[0])
    assert len(heads) == len(ref) == 4
    for a, b, c in zip(heads, host, ref):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(a, b)
    assert 50e6 < stats["instructions"] < 400e6
    assert 0 < stats["stack_peak_bytes"] <= stats["stack_reserved_bytes"]
    sizes = m4.m4_sizes(out)
    assert sizes["data"] + sizes["bss"] <= 128 * 1024


@needs_arm
def test_link_fails_when_ram_budget_is_too_small(project):
    _, out, plan, _ = project
    small = subprocess.run(["make", "-s", "m4", "RAM_BUDGET=65536", "ELF=build/too_small.elf"], cwd=out,
                           capture_output=True, text=True)
    assert small.returncode != 0
    assert "RAM budget exceeded" in small.stderr + small.stdout
    assert not (out / "build" / "too_small.elf").exists()
    ok = subprocess.run(["make", "-s", "m4", f"RAM_BUDGET={plan.arena + 8192}", "ELF=build/fits.elf"], cwd=out,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.skipif(real_data_root() is None, reason="real SCUT-HEAD data not found ($RNNPOOL_DATA)")
def test_export_m4_command(tmp_path):
    """``detect export m4`` end to end (few calibration images; measures when the tools exist)."""
    torch.manual_seed(0)
    from detector.checkpoint import save_weights

    weights = tmp_path / "w.pt"
    save_weights(weights, build_model("rnnpool_face_m4"))
    out = tmp_path / "c"
    argv = ["--weights", str(weights), "--out", str(out), "--data", str(real_data_root()), "--calib-images", "4"]
    if not (HAVE_ARM and HAVE_QEMU):
        argv.append("--no-measure")
    assert m4.main(argv) == 0
    report = (out / "report.md").read_text()
    assert "activation arena" in report
    if HAVE_ARM and HAVE_QEMU:
        assert "Instructions per frame" in report and "peak RAM" in report
    assert m4.main(["--weights", str(tmp_path / "missing.pt"), "--out", str(out), "--data",
                    str(real_data_root())]) == 2
