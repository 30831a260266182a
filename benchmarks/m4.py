"""Cortex-M4 int8 export of RNNPool-Face-M4: peak RAM (frame + activations + measured stack), flash, instructions per
frame under QEMU (netduinoplus2, ``-icount shift=0``), bit-exactness (numpy int8 <-> host C <-> QEMU M4) and AP50 of
the float model vs its int8 reference on SCUT-HEAD partB_val.

Usage: python benchmarks/m4.py [--weights W] [--images N] [--calib-images 200] [--frames 2] [--write]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _default_weights() -> Path:
    shipped = REPO / "weights" / "rnnpool_face_m4.pt"
    return shipped if shipped.is_file() else REPO / "runs" / "m4_scut" / "last.pt"


def _data_root() -> Path:
    env = os.environ.get("RNNPOOL_DATA")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=None, help="default: weights/rnnpool_face_m4.pt, else "
                                                                 "runs/m4_scut/last.pt")
    p.add_argument("--images", type=int, default=0, help="partB_val images for AP50 (0 = all)")
    p.add_argument("--calib-images", type=int, default=200, help="partB_train calibration images")
    p.add_argument("--frames", type=int, default=2, help="partB_val frames checked bit-exact on host and QEMU")
    p.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = p.parse_args(argv)

    import numpy as np

    from detector.datasets.voc import load_voc
    from detector.export import m4
    from detector.export.int8_eval import compare_ap
    from detector.export.quantize import calibration_images, quantize_from_checkpoint

    weights = args.weights or _default_weights()
    data = _data_root()
    if not (data / "scut_head").is_dir():
        print(f"SCUT-HEAD not found under {data} (set RNNPOOL_DATA)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model, qm = quantize_from_checkpoint(weights, data, count=args.calib_images)
    frames = calibration_images(data / "scut_head", "partB_val", count=args.frames, seed=1,
                                input_size=qm.input_size)
    tools = m4.tools_available()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        plan = m4.generate(qm, out)
        measured: dict = {}
        exact = {"host": [], "m4": []}
        for k, frame in enumerate(frames):
            ref = m4.reference_output(qm, frame)

            def same(heads: list, ref: list = ref) -> bool:
                return len(heads) == len(ref) and all(np.array_equal(a, b) for a, b in zip(heads, ref))

            if tools["make"] and tools["cc"]:
                exact["host"].append(same(m4.parse_output(m4.run_host(out, frame))[0]))
            if tools["make"] and tools["arm-none-eabi-gcc"] and tools["qemu-system-arm"]:
                heads, stats = m4.parse_output(m4.run_m4(out, frame))
                exact["m4"].append(same(heads))
                if k == 0:
                    measured.update(stats)
                    sizes = m4.m4_sizes(out)
                    measured["flash_bytes"] = sizes["text"] + sizes["data"]
        measured["bit_exact"] = ", ".join(f"{k} {sum(v)}/{len(v)} frames" for k, v in exact.items() if v) or "not run"
    records, _ = load_voc(data / "scut_head", "partB_val", verify_images=False)
    if args.images:
        rng = np.random.default_rng(0)
        records = [records[i] for i in sorted(rng.choice(len(records), min(args.images, len(records)),
                                                         replace=False).tolist())]
    ap = compare_ap(model, qm, records)

    body = [m4.report_markdown(plan, measured).split("\n", 2)[2].strip(), "",
            "| model | AP50 partB_val | images |", "|---|---:|---:|",
            f"| float (PyTorch) | {ap['float_ap50']:.4f} | {ap['images']} |",
            f"| int8 reference (= C on host and M4, bit-exact) | {ap['int8_ap50']:.4f} | {ap['images']} |",
            f"| difference | {ap['int8_ap50'] - ap['float_ap50']:+.4f} | |", "",
            f"Weights: `{weights.relative_to(REPO) if weights.is_relative_to(REPO) else weights}`; calibration: "
            f"{args.calib_images} partB_train images; paper's area resize for AP; frames for the C checks: 320x240 "
            f"partB_val images. The stem + RNNPool run patch row by patch row (the 160x120x4 stem map never exists), "
            f"MBConv blocks expand row by row, every map is written in place over the input frame. "
            f"Total time {time.perf_counter() - t0:.0f} s."]
    text = "\n".join(body)
    print(text)
    if args.write:
        from benchmarks.report import write_section

        command = "python benchmarks/m4.py" + (" " + " ".join(argv) if argv else "")
        write_section("Cortex-M4 int8 (RNNPool-Face-M4)", command, text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
