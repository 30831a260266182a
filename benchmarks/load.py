"""The web service under load: ``POST /detect`` from 1, 8 and 32 concurrent clients against a real uvicorn server.

Starts ``python -m uvicorn app.main:create_app --factory`` on 127.0.0.1 (a free port; settings from ``RNNPOOL_*``
variables), drives it with ``httpx.AsyncClient`` for a fixed time per client count, then stops it. Every client
sends one request at a time (a closed loop); after a 503 ``server_busy`` (the queue bound, deliberate) it waits
``Retry-After`` seconds as a well-behaved client would. Only loopback traffic; every loop is bounded by time and by
count, and the script stops by itself.

Usage: python benchmarks/load.py [--weights W] [--duration 10] [--clients 1 8 32] [--max-concurrency N]
                                 [--max-queue N] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SECTION = "Web service under load"
MAX_REQUESTS_PER_CLIENT = 100_000  # a bound on every client loop besides the duration
STARTUP_TIMEOUT_S = 120.0


@dataclass
class LoadResult:
    """What one run at a fixed number of clients saw.

    Attributes:
        clients: concurrent clients.
        elapsed_s: wall time of the run.
        latencies_ms: latency of every 200 response.
        statuses: responses by HTTP status (200, 503, ...).
        busy: 503 ``server_busy`` answers (the queue bound at work; deliberate, not errors).
        errors: everything else that is not a 200: other statuses and transport failures, by name.
    """

    clients: int
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    busy: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def requests_per_s(self) -> float:
        """Successful (200) requests per second."""
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the successful requests' latency; NaN without any."""
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def row(self) -> str:
        """One Markdown table row."""
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "0"
        return (f"| {self.clients} | {self.ok + self.busy + self.error_count} | {self.requests_per_s:.1f} | "
                f"{self.percentile_ms(0.5):.1f} | {self.percentile_ms(0.99):.1f} | {self.busy} | {errors} |")


TABLE_HEADER = ("| clients | requests | ok/s | p50 ms | p99 ms | 503 busy (deliberate) | errors |\n"
                "| ---: | ---: | ---: | ---: | ---: | ---: | --- |")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_weights(weights: str | None, tmpdir: Path) -> tuple[Path, str]:
    """The weights to serve and a note on where they come from.

    ``weights`` when given; else the shipped weights when present; else random weights written to ``tmpdir`` (the
    speed is the same, the boxes are meaningless).
    """
    if weights is not None:
        return Path(weights), f"weights {Path(weights).name}"
    from detector.checkpoint import default_weights_path

    shipped = default_weights_path()
    if shipped.is_file():
        return shipped, f"the shipped weights ({shipped.name})"
    import torch

    from detector.checkpoint import save_weights
    from detector.models import build_model

    torch.manual_seed(0)
    path = tmpdir / "untrained_rnnpool_face_m4.pt"
    save_weights(path, build_model("rnnpool_face_m4"))
    return path, "untrained random weights (no shipped weights found; same speed, meaningless boxes)"


def test_image() -> bytes:
    """A 640x480 JPEG (the demo image when present, else a synthetic scene): a webcam frame's size."""
    import cv2
    import numpy as np

    sample = cv2.imread(str(REPO / "data" / "samples" / "astronaut.png"))
    if sample is None:
        yy, xx = np.mgrid[0:480, 0:640]
        sample = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    frame = cv2.resize(sample, (640, 480), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


@contextlib.contextmanager
def running_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """Runs uvicorn with the service on 127.0.0.1 until the block ends; yields its base URL.

    Args:
        env: extra environment variables (``RNNPOOL_*`` settings).
        log_path: where the server's output goes (a pipe nobody reads would block it).

    Raises:
        RuntimeError: the server exited or did not report a loaded model within the startup timeout.
    """
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--no-access-log"]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited with {server.returncode}:\n{_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start in {STARTUP_TIMEOUT_S:.0f} s:\n{_tail(log_path)}")
                try:
                    health = httpx.get(f"{url}/health", timeout=2)
                    if health.status_code == 200:
                        break
                    if health.status_code == 503 and health.json().get("detail") != "starting up":
                        raise RuntimeError(f"the model did not load: {health.json().get('detail')}")
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(5)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def drive(url: str, image: bytes, clients: int, duration_s: float,
                request_timeout_s: float = 60.0) -> LoadResult:
    """``clients`` concurrent closed-loop clients posting ``image`` to ``url/detect`` for ``duration_s`` seconds."""
    import httpx

    result = LoadResult(clients)
    headers = {"Content-Type": "image/jpeg"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    start = time.perf_counter()
    deadline = start + duration_s

    async with httpx.AsyncClient(base_url=url, timeout=request_timeout_s, limits=limits) as client:

        async def one_client() -> None:
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if time.perf_counter() >= deadline:
                    return
                t0 = time.perf_counter()
                try:
                    r = await client.post("/detect", content=image, headers=headers)
                except httpx.HTTPError as e:
                    result.errors[type(e).__name__] += 1
                    continue
                latency_ms = (time.perf_counter() - t0) * 1000.0
                result.statuses[r.status_code] += 1
                if r.status_code == 200:
                    result.latencies_ms.append(latency_ms)
                elif r.status_code == 503 and _error_code(r) == "server_busy":
                    result.busy += 1
                    wait = _retry_after(r)
                    await asyncio.sleep(max(0.0, min(wait, deadline - time.perf_counter())))
                else:
                    result.errors[f"HTTP {r.status_code} {_error_code(r) or ''}".strip()] += 1

        await asyncio.gather(*(one_client() for _ in range(clients)))
    result.elapsed_s = time.perf_counter() - start
    return result


def _error_code(response: object) -> str | None:
    try:
        return str(response.json()["error"]["code"])  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not the JSON error shape
        return None


def _retry_after(response: object) -> float:
    try:
        return float(response.headers.get("retry-after", "1"))  # type: ignore[attr-defined]
    except ValueError:
        return 1.0


def run(
    weights: str | None = None,
    clients: Sequence[int] = (1, 8, 32),
    duration_s: float = 10.0,
    max_concurrency: int | None = None,
    max_queue: int | None = None,
    warmup_requests: int = 5,
    log: bool = True,
) -> tuple[list[LoadResult], str]:
    """Starts the server, runs every client count in turn, stops the server.

    Args:
        weights: weights file to serve (default: shipped weights, else untrained ones written to a temp dir).
        clients: the client counts to run, each for ``duration_s``.
        duration_s: seconds per client count.
        max_concurrency: ``RNNPOOL_MAX_CONCURRENCY`` for the server (default: the server's default).
        max_queue: ``RNNPOOL_MAX_QUEUE`` for the server (default: the server's default).
        warmup_requests: sequential requests before measuring (first inferences are slower).
        log: print progress.

    Returns:
        The results and a note on the weights served.
    """
    import httpx

    image = test_image()
    results: list[LoadResult] = []
    with tempfile.TemporaryDirectory(prefix="rnnpool-load-") as tmp:
        tmpdir = Path(tmp)
        weights_path, note = resolve_weights(weights, tmpdir)
        if log:
            print(f"serving {note}", flush=True)
        env = {"RNNPOOL_WEIGHTS": str(weights_path)}
        if max_concurrency is not None:
            env["RNNPOOL_MAX_CONCURRENCY"] = str(max_concurrency)
        if max_queue is not None:
            env["RNNPOOL_MAX_QUEUE"] = str(max_queue)
        with running_server(env, tmpdir / "server.log") as url:
            for _ in range(warmup_requests):
                httpx.post(f"{url}/detect", content=image, headers={"Content-Type": "image/jpeg"}, timeout=60)
            for n in clients:
                result = asyncio.run(drive(url, image, n, duration_s))
                results.append(result)
                if log:
                    print(result.row(), flush=True)
    return results, note


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry; returns the exit code (1 when a run saw errors other than deliberate 503s)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="weights file (default: the shipped weights, else untrained ones)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per client count (default 10)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="client counts (default 1 8 32)")
    ap.add_argument("--max-concurrency", type=int, help="server setting (default: the server's, 2)")
    ap.add_argument("--max-queue", type=int, help="server setting (default: the server's, 8)")
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.duration > 600 or any(n < 1 or n > 256 for n in args.clients):
        ap.error("--duration must be in (0, 600] and each client count in [1, 256]")

    from app.settings import Settings

    defaults = Settings.model_fields
    concurrency = args.max_concurrency or defaults["max_concurrency"].default
    queue = args.max_queue if args.max_queue is not None else defaults["max_queue"].default
    results, note = run(args.weights, args.clients, args.duration, args.max_concurrency, args.max_queue)
    body = "\n".join([TABLE_HEADER, *(r.row() for r in results)])
    body += (
        f"\n\n`POST /detect` of a 640x480 JPEG to `uvicorn app.main:create_app --factory` on loopback, "
        f"{args.duration:g} s per row, {note}; server settings max_concurrency={concurrency}, max_queue={queue} "
        "(defaults unless given). Each client sends one request at a time; ok/s counts 200s, latencies are of "
        "200s. A 503 `server_busy` is the queue bound refusing work on purpose (the client then waits "
        "`Retry-After`); errors are anything else. Client and server share the machine's cores."
    )
    print()
    print(body)
    if args.write:
        from benchmarks.report import write_section

        write_section(SECTION, "python benchmarks/load.py --write", body)
        print(f"\nwrote the '{SECTION}' section of BENCHMARKS.md")
    return 1 if any(r.error_count for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
