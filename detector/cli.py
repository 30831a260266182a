"""The ``detect`` command.

``detect IMAGE [IMAGE ...]`` runs the shipped weights; ``detect train|eval|models`` train, evaluate and list the
variants. Every user error ends with one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main"]

SUBCOMMANDS = ("train", "eval", "export", "serve", "models")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
EXIT_USAGE, EXIT_FAILURE = 2, 1


class CLIError(Exception):
    """A user-facing failure: its message is printed as ``detect: error: <message>``."""


# ------------------------------------------------------------------------------------------------ detect images


def _detect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="detect",
        description="Detect heads in images with RNNPool-Face. Subcommands: "
        + ", ".join(SUBCOMMANDS) + " (see 'detect SUBCOMMAND --help').",
    )
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_VIDEO",
                   help="image files (JPEG, PNG, BMP, WebP) or video files (" + ", ".join(VIDEO_SUFFIXES) + ")")
    p.add_argument("--webcam", type=int, metavar="N", help="read frames from camera N (OpenCV index)")
    p.add_argument("--weights", help="weights file, checkpoint or .onnx (default: the shipped weights)")
    p.add_argument("--model", help="variant whose shipped weights to use (default rnnpool_face_m4)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "native"],
                   help="inference backend: torch (default); onnx (onnxruntime, fixed input size); native (stem and "
                        "RNNPool in C compiled on first use, the rest in onnxruntime; fastest)")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum score (default 0.5)")
    p.add_argument("--classes", default=None, metavar="NAMES",
                   help="what to detect: head (default), face, 'head,face' or all; faces use the shipped face model "
                        "(or --face-weights)")
    p.add_argument("--face-weights", default=None, help="weights of the face model (default: the shipped ones)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image / frame")
    p.add_argument("--save", metavar="DIR", help="write annotated images (or the annotated video) to DIR")
    p.add_argument("--max-frames", type=int, default=None, help="videos/webcam: stop after N frames")
    return p


def _read_image(path: str, max_pixels: int = 100_000_000):
    """Decodes an image file to BGR, validating it first (format, header size, truncation): see
    :func:`detector.image_io.decode_image`."""
    from detector.image_io import ImageDecodeError, decode_image

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"no such file: {path}")
    try:
        return decode_image(p.read_bytes(), max_pixels=max_pixels)
    except ImageDecodeError as e:
        raise CLIError(f"{path}: {e.message}") from None


def _threshold(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise CLIError(f"--threshold must be between 0 and 1, got {value}")
    return value


def _load_group(args: argparse.Namespace):
    """The detector group of ``detect`` with the requested classes checked (one clear error if unavailable)."""
    from detector.detector_group import load_detector_group, parse_classes

    try:
        classes = parse_classes(args.classes)
    except ValueError as e:
        raise CLIError(f"--classes: {e}") from None
    group = load_detector_group(weights=args.weights, model=args.model, backend=args.backend,
                                face_weights=args.face_weights, score_threshold=_threshold(args.threshold))
    try:
        group.default_classes = group.resolve(classes)
    except ValueError as e:
        raise CLIError(f"--classes: {e}") from None
    return group


def run_detect(args: argparse.Namespace) -> int:
    if not args.inputs and args.webcam is None:
        raise CLIError("give image or video files, or --webcam N (see 'detect --help')")
    if args.inputs and args.webcam is not None:
        raise CLIError("give either files or --webcam, not both")
    detector = _load_group(args)
    save_dir = Path(args.save) if args.save else None
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
    if args.webcam is not None:
        return _run_stream(detector, args.webcam, f"webcam{args.webcam}", args, save_dir)
    videos = [p for p in args.inputs if Path(p).suffix.lower() in VIDEO_SUFFIXES]
    images = [(p, _read_image(p)) for p in args.inputs if p not in videos]  # fail before any work on a bad path
    for p in videos:
        if not Path(p).is_file():
            raise CLIError(f"no such file: {p}")
    for path, image in images:
        _report_image(detector, path, image, args, save_dir)
    for path in videos:
        _run_stream(detector, path, Path(path).stem, args, save_dir)
    return 0


def _report_image(detector, path: str, image, args: argparse.Namespace, save_dir: Path | None) -> None:
    import cv2

    dets = detector(image)
    if args.json:
        print(json.dumps({"image": path, "model": "+".join(detector.model_names()), **dets.to_dict()}))
    else:
        print(f"{path}: {_count_text(dets)}")
        for box, score, name in zip(dets.boxes_xyxy, dets.scores, dets.label_names):
            x0, y0, x1, y1 = box
            print(f"  {name:5s} {score:.3f}  x0={x0:7.1f} y0={y0:7.1f} x1={x1:7.1f} y1={y1:7.1f}")
    if save_dir:
        out = save_dir / f"{Path(path).stem}_detections.jpg"
        cv2.imwrite(str(out), dets.draw(image))
        if not args.json:
            print(f"  saved {out}")


def _count_text(dets) -> str:
    """``"3 heads"``, ``"1 head, 2 faces"``."""
    return ", ".join(f"{n} {name}{'s' if n != 1 else ''}" for name, n in dets.counts().items())


def _open_window() -> bool:
    """True when OpenCV can show a window here (a display and a GUI build of OpenCV)."""
    import cv2

    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform in ("darwin", "win32")):
        return False
    try:
        cv2.namedWindow("detect", cv2.WINDOW_NORMAL)
        return True
    except cv2.error:  # opencv-python-headless has no GUI
        return False


def _run_stream(detector, source: str | int, name: str, args: argparse.Namespace, save_dir: Path | None) -> int:
    """Frames from a video file or camera: window with boxes, count and FPS when possible, else per-frame counts
    (and the annotated video with --save). Ctrl-C stops cleanly, keeping what was written."""
    import time

    import cv2

    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise CLIError(f"cannot open {'camera' if isinstance(source, int) else 'video'} {source}")
    window = _open_window()
    writer = None
    frames, start, fps = 0, time.perf_counter(), 0.0
    try:
        while args.max_frames is None or frames < args.max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            t0 = time.perf_counter()
            dets = detector(frame)
            fps = 0.9 * fps + 0.1 / max(time.perf_counter() - t0, 1e-6) if frames else 1 / max(time.perf_counter() - t0, 1e-6)
            frames += 1
            if args.json:
                print(json.dumps({"source": str(source), "frame": frames - 1, **dets.to_dict()}), flush=True)
            else:
                print(f"{name} frame {frames - 1}: {_count_text(dets)} ({fps:.1f} FPS)", flush=True)
            if window or save_dir:
                annotated = dets.draw(frame)
                cv2.putText(annotated, f"{fps:.1f} FPS", (8, 48), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2)
                if save_dir:
                    if writer is None:
                        rate = cap.get(cv2.CAP_PROP_FPS) or 25.0
                        out = save_dir / f"{name}_detections.mp4"
                        writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), rate,
                                                 (frame.shape[1], frame.shape[0]))
                    writer.write(annotated)
                if window:
                    cv2.imshow("detect", annotated)
                    if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                        break
    except KeyboardInterrupt:
        print(f"{name}: interrupted after {frames} frames", file=sys.stderr)
    finally:
        cap.release()
        if writer is not None:
            writer.release()
        if window:
            cv2.destroyAllWindows()
    if frames == 0:
        raise CLIError(f"no frames could be read from {source}")
    elapsed = time.perf_counter() - start
    print(f"{name}: {frames} frames in {elapsed:.1f} s ({frames / elapsed:.1f} FPS)"
          + (f", saved {save_dir / f'{name}_detections.mp4'}" if save_dir else ""), file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------ train


def _train_parser() -> argparse.ArgumentParser:
    from detector.train import TrainConfig

    d = TrainConfig(data="", out="")
    p = argparse.ArgumentParser(prog="detect train", description="Train an RNNPool-Face variant.")
    p.add_argument("--model", default=d.model, help=f"variant (default {d.model}; see 'detect models')")
    p.add_argument("--data", required=True, help="dataset root (SCUT-HEAD VOC layout or WIDER FACE layout)")
    p.add_argument("--format", default=d.format, choices=["voc", "wider"], help="dataset layout (default voc)")
    p.add_argument("--train-split", default=d.train_split, help="split name in ImageSets/Main or a file of ids")
    p.add_argument("--val-split", default=d.val_split, help="validation split ('none' to skip)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak SGD learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="0 disables the weight EMA")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="epochs between val AP50 evaluations")
    p.add_argument("--workers", type=int, default=d.num_workers, help="data loader processes")
    p.add_argument("--device", default=d.device, help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-train-images", type=int, default=None, help="use only the first N training images")
    p.add_argument("--face-labels", default=None, metavar="JSON",
                   help="train a face model from teacher face boxes on the VOC images ('auto': DATA/faces_retinaface.json)")
    p.add_argument("--face-min-score", type=float, default=d.face_min_score,
                   help="teacher score that makes a face; lower-scored teacher boxes are ignore regions")
    p.add_argument("--holdout", type=int, default=0,
                   help="hold out N training images (seeded draw) for model selection instead of --val-split; "
                        "OUT/best.pt keeps the best of them")
    p.add_argument("--init-weights", default=None, help="start from these weights (matching tensors) with a fresh schedule")
    p.add_argument("--compile", action="store_true", help="torch.compile RNNPool (several times faster on CPU)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, curves.png")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run_train(argv: Sequence[str]) -> int:
    from detector.train import TrainConfig, train

    a = _train_parser().parse_args(argv)
    if a.epochs < 1 or a.batch_size < 1:
        raise CLIError("--epochs and --batch-size must be positive")
    if not Path(a.data).is_dir():
        raise CLIError(f"dataset folder not found: {a.data}")
    cfg = TrainConfig(
        data=a.data, out=a.out, model=a.model, format=a.format, train_split=a.train_split,
        val_split=None if str(a.val_split).lower() == "none" else a.val_split, epochs=a.epochs,
        batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, warmup_epochs=a.warmup_epochs,
        ema_decay=a.ema_decay, eval_every=a.eval_every, num_workers=a.workers, device=a.device, seed=a.seed,
        max_train_images=a.max_train_images, holdout=a.holdout, face_labels=a.face_labels, face_min_score=a.face_min_score,
        init_weights=a.init_weights, compile=a.compile,
        progress=not a.no_progress,
    )
    row = train(cfg, resume=a.resume)
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 reports
        return 0
    print(f"done: {a.out}/final.pt (last epoch: {json.dumps({k: row[k] for k in ('epoch', 'loss', 'val_ap50')})})")
    return 0


# ------------------------------------------------------------------------------------------------ eval


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detect eval", description="Evaluate weights: AP50 (VOC), COCO AP and AR.")
    p.add_argument("--weights", help="weights file or checkpoint (default: the shipped weights)")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--format", default="auto", choices=["auto", "voc", "wider"],
                   help="dataset layout (auto: wider if DATA/wider_face_split exists)")
    p.add_argument("--split", default=None, help="VOC split name or id file (default partB_val); WIDER subset (val)")
    p.add_argument("--face-labels", default=None, metavar="JSON",
                   help="score faces against teacher face boxes on the VOC images ('auto': DATA/faces_retinaface.json; "
                        "agreement with the teacher, not accuracy)")
    p.add_argument("--pr-curve", default=None, metavar="PNG", help="where to write the PR curve (default: none)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "native", "int8"],
                   help="torch (default); onnx (onnxruntime, fixed input size); native (C front + onnxruntime); int8 "
                        "(the integer-only reference of the microcontroller build, calibrated on 200 partB_train "
                        "images)")
    p.add_argument("--device", default="auto")
    return p


def run_eval(argv: Sequence[str]) -> int:
    import torch

    from detector.backends import load_detector
    from detector.engine import EvalSet, evaluate
    from detector.evaluation import plot_pr_curve
    from detector.train import _device, load_records

    a = _eval_parser().parse_args(argv)
    data = Path(a.data)
    if not data.is_dir():
        raise CLIError(f"dataset folder not found: {a.data}")
    fmt = a.format if a.format != "auto" else ("wider" if (data / "wider_face_split").is_dir() else "voc")
    split = a.split or ("val" if fmt == "wider" else "partB_val")
    device = _device(a.device) if a.backend == "torch" else torch.device("cpu")
    runner = None
    if a.backend == "int8":
        from detector.checkpoint import default_weights_path
        from detector.export.m4 import Int8Detector

        detector = Int8Detector.from_weights(a.weights or default_weights_path())
        runner = detector.run_network
    else:
        detector = load_detector(weights=a.weights, backend=a.backend)
        runner = detector.run_network if a.backend in ("onnx", "native") else None
    model = detector.model.to(device)
    records = load_records(data, fmt, split, face_labels=a.face_labels)
    eval_set = EvalSet.build(records, model, resize=detector.resize, progress=sys.stderr.isatty())
    m = evaluate(model, eval_set, device, runner=runner)
    if a.pr_curve:
        plot_pr_curve({f"{model.config.name} ({split})": m["pr"]}, a.pr_curve, title=f"PR curve, IoU 0.5 - {data.name}")
    result = {"model": model.config.name, "backend": a.backend, "weights": str(detector.weights_path), "data": str(data), "split": split,
              "images": m["images"], "ap50": round(m["ap50"], 4), "ap": round(m["ap"], 4),
              "coco_ap50": round(m["coco_ap50"], 4), "ar": round(m["ar"], 4),
              "images_per_s": round(m["images_per_s"], 1)}
    print(f"{result['model']} ({a.backend}) on {data.name}/{split} ({result['images']} images)")
    print(f"  AP50 (VOC, IoU 0.5)   {result['ap50']:.4f}")
    print(f"  COCO AP@[.5:.95]      {result['ap']:.4f}")
    print(f"  COCO AP50             {result['coco_ap50']:.4f}")
    print(f"  COCO AR (1000 dets)   {result['ar']:.4f}")
    print(f"  speed                 {result['images_per_s']:.1f} images/s (network + postprocess)")
    if a.pr_curve:
        print(f"  PR curve              {a.pr_curve}")
    if a.json:
        print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------ export


def run_export(argv: Sequence[str]) -> int:
    if argv and argv[0] == "m4":  # int8 C for the Cortex-M4: its own options (detect export m4 --help)
        from detector.export.m4 import main as export_m4

        return export_m4(list(argv[1:]))
    p = argparse.ArgumentParser(prog="detect export", description="Export trained weights: 'onnx', or 'm4' (int8 "
                                "C for a Cortex-M4; see 'detect export m4 --help').")
    p.add_argument("format", choices=["onnx", "m4"], help="onnx: the raw network for onnxruntime")
    p.add_argument("--weights", help="weights file or checkpoint (default: the shipped weights)")
    p.add_argument("--out", required=True, help="output file")
    a = p.parse_args(argv)
    from detector.checkpoint import default_weights_path, load_model
    from detector.export.onnx import export_onnx

    model, _ = load_model(a.weights or default_weights_path())
    path = export_onnx(model, a.out)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, input 1x{model.config.in_channels}x"
          f"{model.config.input_size[1]}x{model.config.input_size[0]})")
    return 0


# ------------------------------------------------------------------------------------------------ serve


def run_serve(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="detect serve", description="Start the web service (FastAPI + uvicorn).")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for the local network)")
    p.add_argument("--port", type=int, default=8000)
    a = p.parse_args(argv)
    from app.main import serve

    serve(host=a.host, port=a.port)
    return 0


# ------------------------------------------------------------------------------------------------ models


def run_models(argv: Sequence[str]) -> int:
    from detector.complexity import count_madds, count_params
    from detector.models import build_model, list_models

    argparse.ArgumentParser(prog="detect models", description="List the model variants.").parse_args(argv)
    print(f"{'model':22s} {'input':>12s} {'params':>10s} {'MAdds':>10s}")
    for name in list_models():
        m = build_model(name)
        w, h = m.config.input_size
        madds = count_madds(m, (m.config.in_channels, h, w))
        print(f"{name:22s} {f'{w}x{h}x{m.config.in_channels}':>12s} {count_params(m):>10,d} {madds / 1e6:>9.1f}M")
    return 0


# ------------------------------------------------------------------------------------------------ entry


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``detect`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # errors are reported once, by us
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    handlers: dict[str, Any] = {"train": run_train, "eval": run_eval, "export": run_export, "serve": run_serve,
                                "models": run_models}
    try:
        if argv and argv[0] in handlers:
            return handlers[argv[0]](argv[1:])
        return run_detect(_detect_parser().parse_args(argv))
    except CLIError as e:
        print(f"detect: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("detect: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's promise: one line, no traceback
        from detector.checkpoint import WeightsError
        from detector.native import NativeUnavailable

        expected = (WeightsError, NativeUnavailable, ValueError, KeyError, OSError)
        kind = "error" if isinstance(e, expected) else f"error ({type(e).__name__})"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"detect: {kind}: {msg}", file=sys.stderr)
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
