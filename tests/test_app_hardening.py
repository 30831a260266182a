"""The web service under hostile input and overload: limits, timeouts, CORS, error leaks, access log, schema fuzzing.

Concurrency is exercised in-process (``httpx.AsyncClient`` over ``ASGITransport``, or raw ASGI calls) with detectors
that block on an event, so every test is quick and deterministic; the real server under load is in test_load.py.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # newer Starlette warns that its TestClient wants httpx2; httpx works
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from app.access_log import ACCESS_LOGGER, ensure_log_output
from app.errors import redact_paths
from app.limits import InferencePool, PoolFull
from app.main import create_app
from app.settings import Settings
from detector import Detections, Detector

REPO = Path(__file__).resolve().parents[1]
JPEG = {"Content-Type": "image/jpeg"}
LEAKS = ("Traceback", "site-packages", str(REPO), "/work/", 'File "')


class GateDetector:
    """A detector that finds nothing, optionally after waiting for ``gate``; records how many calls overlap."""

    name = "gate_model"
    class_names = ("head",)

    def __init__(self, gate: threading.Event | None = None, delay_s: float = 0.0) -> None:
        self.gate = gate
        self.delay_s = delay_s
        self.calls = 0
        self.active = 0
        self.peak = 0
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, image_bgr: np.ndarray, score_threshold: float | None = None,
                 max_detections: int | None = None) -> Detections:
        with self._lock:
            self.calls += 1
            self.active += 1
            self.peak = max(self.peak, self.active)
        self.entered.set()
        try:
            if self.gate is not None:
                assert self.gate.wait(10), "test gate never opened"
            if self.delay_s:
                time.sleep(self.delay_s)
            h, w = image_bgr.shape[:2]
            return Detections(np.zeros((0, 4)), [], [], self.class_names, (w, h))
        finally:
            with self._lock:
                self.active -= 1


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests do not see the developer's RNNPOOL_* variables."""
    import os

    for name in list(os.environ):
        if name.startswith("RNNPOOL_"):
            monkeypatch.delenv(name)


def encode(ext: str = ".jpg", width: int = 64, height: int = 48) -> bytes:
    image = np.full((height, width, 3), 128, np.uint8)
    cv2.circle(image, (width // 2, height // 2), min(width, height) // 3, (30, 60, 200), -1)
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert_no_leak(response.text)
    return body["error"]


def assert_no_leak(text: str) -> None:
    for needle in LEAKS:
        assert needle not in text, f"{needle!r} in response: {text[:300]}"


async def post_concurrently(app: Any, n: int, wait_done: int, gate: threading.Event | None,
                            **kwargs: Any) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """Sends ``n`` POST /detect at once; waits until ``wait_done`` have answered (gate still closed), then opens
    ``gate`` and collects the rest. Returns (answered before the gate opened, answered after)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=20) as client:
        tasks = [asyncio.create_task(client.post("/detect", content=encode(), headers=JPEG, **kwargs))
                 for _ in range(n)]
        deadline = time.monotonic() + 10
        while sum(t.done() for t in tasks) < wait_done and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        early = [t.result() for t in tasks if t.done()]
        if gate is not None:
            gate.set()
        late = [r for r in await asyncio.gather(*tasks) if all(r is not e for e in early)]
    return early, late


def asgi_request(app: Any, path: str = "/detect", headers: list[tuple[bytes, bytes]] | None = None,
                 chunks: list[bytes] | None = None, stall_s: float = 0.0,
                 method: str = "POST") -> tuple[int, dict[str, str], bytes, int]:
    """One raw ASGI request; after the chunks the client stalls ``stall_s`` seconds (a slow upload).

    Returns:
        status, response headers, response body, and how many times the app asked for the request body.
    """
    chunks = chunks if chunks is not None else [b""]
    received: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        i = len(received)
        received.append(i)
        if i < len(chunks):
            return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks) or stall_s > 0}
        await asyncio.sleep(stall_s)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"test"), *(headers or [])], "client": ("127.0.0.1", 1), "server": ("test", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    response_headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], response_headers, body, len(received)


# ------------------------------------------------------------------------------------------------ settings


def test_new_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert (s.max_concurrency, s.max_queue, s.request_timeout_s, s.max_aspect_ratio) == (2, 8, 30.0, 100.0)
    assert s.cors_origins == [] and s.api_key is None  # closed by default
    monkeypatch.setenv("RNNPOOL_MAX_CONCURRENCY", "3")
    monkeypatch.setenv("RNNPOOL_MAX_QUEUE", "0")
    monkeypatch.setenv("RNNPOOL_REQUEST_TIMEOUT_S", "2.5")
    monkeypatch.setenv("RNNPOOL_MAX_ASPECT_RATIO", "10")
    s = Settings()
    assert (s.max_concurrency, s.max_queue, s.request_timeout_s, s.max_aspect_ratio) == (3, 0, 2.5, 10.0)
    for field, bad in (("max_concurrency", 0), ("max_queue", -1), ("request_timeout_s", 0), ("max_aspect_ratio", 0.5)):
        with pytest.raises(ValueError, match=field):
            Settings(**{field: bad})


# ------------------------------------------------------------------------------------------------ the pool


def test_inference_pool_bounds_and_releases_slots() -> None:
    pool = InferencePool(max_concurrency=1, max_queue=1)
    gate = threading.Event()
    running = pool.submit(gate.wait, 10)
    queued = pool.submit(lambda: "queued ran")
    assert pool.admitted == 2 and pool.full
    with pytest.raises(PoolFull):
        pool.submit(lambda: None)
    assert queued.cancel() and pool.admitted == 1  # a job that never started frees its slot when cancelled
    failing = pool.submit(lambda: 1 / 0)
    gate.set()
    assert running.result(5) is True
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    deadline = time.monotonic() + 5
    while pool.admitted and time.monotonic() < deadline:  # done callbacks run right after the job
        time.sleep(0.005)
    assert pool.admitted == 0 and not pool.full
    assert asyncio.run(pool.run(lambda x: x * 2, 21)) == 42
    pool.shutdown()
    assert pool.submit(lambda: 7).result(5) == 7  # a shut-down pool starts a fresh executor
    pool.shutdown()
    with pytest.raises(ValueError):
        InferencePool(0, 1)


# ------------------------------------------------------------------------------------------------ overload


def test_full_queue_answers_503_with_retry_after_at_once() -> None:
    gate = threading.Event()
    det = GateDetector(gate)
    app = create_app(Settings(max_concurrency=1, max_queue=1), detector=det)
    early, late = asyncio.run(post_concurrently(app, 6, wait_done=4, gate=gate))
    # While the one worker is blocked, exactly 1 running + 1 queued are admitted; the 4 others are refused at once.
    assert len(early) == 4 and len(late) == 2
    for r in early:
        error = assert_error(r, 503, "server_busy")
        assert r.headers["retry-after"] == "1" and "busy" in error["message"]
    assert [r.status_code for r in late] == [200, 200]
    assert det.calls == 2 and det.peak == 1 and app.state.pool.admitted == 0
    assert TestClient(app).post("/detect", content=encode(), headers=JPEG).status_code == 200


def test_refused_before_reading_the_body_when_full() -> None:
    app = create_app(Settings(max_concurrency=1, max_queue=0), detector=GateDetector())
    gate = threading.Event()
    app.state.pool.submit(gate.wait, 10)  # the only slot is taken
    try:
        status, headers, body, reads = asgi_request(app, headers=[(b"content-type", b"image/jpeg")],
                                                    chunks=[encode()])
    finally:
        gate.set()
    assert status == 503 and headers["retry-after"] == "1" and json.loads(body)["error"]["code"] == "server_busy"
    assert reads == 0


def test_concurrent_inferences_never_exceed_max_concurrency() -> None:
    det = GateDetector(delay_s=0.03)
    app = create_app(Settings(max_concurrency=2, max_queue=8), detector=det)
    early, late = asyncio.run(post_concurrently(app, 10, wait_done=10, gate=None))
    assert [r.status_code for r in early + late] == [200] * 10
    assert det.calls == 10 and det.peak == 2


def test_timeout_is_504_and_cancels_queued_work() -> None:
    gate = threading.Event()
    det = GateDetector(gate)
    app = create_app(Settings(max_concurrency=1, max_queue=1, request_timeout_s=0.3), detector=det)
    start = time.monotonic()
    early, late = asyncio.run(post_concurrently(app, 2, wait_done=2, gate=None))
    assert time.monotonic() - start < 5
    for r in early:
        assert "0.3 s" in assert_error(r, 504, "timeout")["message"]
    # The queued request's job was cancelled; the running one keeps its slot until its thread is done.
    assert det.calls == 1 and app.state.pool.admitted == 1
    gate.set()
    deadline = time.monotonic() + 5
    while app.state.pool.admitted and time.monotonic() < deadline:
        time.sleep(0.005)
    assert app.state.pool.admitted == 0
    assert TestClient(app).post("/detect", content=encode(), headers=JPEG).status_code == 200


def test_slow_upload_is_408() -> None:
    det = GateDetector()
    app = create_app(Settings(request_timeout_s=0.2), detector=det)
    status, _, body, _ = asgi_request(app, headers=[(b"content-type", b"image/jpeg")], chunks=[encode()[:100]],
                                      stall_s=30)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert det.calls == 0 and app.state.pool.admitted == 0


def test_elongated_image_is_422_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    import detector.image_io

    det = GateDetector()
    client = TestClient(create_app(Settings(), detector=det))
    strip = encode(".png", 2000, 2)  # 4000 pixels, but a network input ~ 16 x 17000
    decoded: list[int] = []
    real = detector.image_io.cv2.imdecode
    monkeypatch.setattr(detector.image_io.cv2, "imdecode", lambda *a: decoded.append(1) or real(*a))
    error = assert_error(client.post("/detect", content=strip, headers={"Content-Type": "image/png"}), 422,
                         "unsupported_aspect_ratio")
    assert "2000x2" in error["message"] and not decoded and det.calls == 0
    relaxed = TestClient(create_app(Settings(max_aspect_ratio=1000), detector=det))
    assert relaxed.post("/detect", content=strip, headers={"Content-Type": "image/png"}).status_code == 200


# ------------------------------------------------------------------------------------------------ leaks


def test_error_responses_leak_no_traceback_or_path(tmp_path: Path) -> None:
    client = TestClient(create_app(Settings(max_body_bytes=50_000), detector=GateDetector()),
                        raise_server_exceptions=False)
    png = encode(".png")
    cases = [
        client.get("/nope"),
        client.get("/static/%2e%2e/main.py"),
        client.get("/static/..%2f..%2fpyproject.toml"),
        client.put("/detect"),
        client.delete("/health"),
        client.post("/detect", content=b"x" * 60_000, headers=JPEG),
        client.post("/detect", content=png, headers={"Content-Type": "text/html"}),
        client.post("/detect", content=png, headers={"Content-Type": "image/png"}, params={"threshold": "nan"}),
        client.post("/detect", content=png, headers={"Content-Type": "image/png"}, params={"classes": "\x00\n<b>"}),
        client.post("/detect", files={"file": ("../../../etc/passwd", b"root:x:0:0")}),
        client.post("/detect", content=b"--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
                    headers={"Content-Type": "multipart/form-data; boundary=x"}),
        client.post("/detect", content=b"\x89PNG\r\n\x1a\n" + b"\xff" * 300, headers=JPEG),
    ]
    for r in cases:
        assert 400 <= r.status_code < 500, (r.request.url, r.status_code, r.text)
        assert r.json()["error"]["code"], r.text
        assert_no_leak(r.text)
    odd = client.post("/detect", content=png, headers={"Content-Type": "image/png; charset=../../etc"})
    assert odd.status_code == 200  # parameters of the media type are ignored
    status, _, body, _ = asgi_request(client.app, headers=[(b"content-type", b"image/png"),
                                                           (b"content-length", b"12abc")], chunks=[png])
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"

    class Exploding(GateDetector):
        def __call__(self, *a: Any, **k: Any) -> Detections:
            raise RuntimeError(f"boom in {__file__} at {REPO}/detector/inference.py")

    bad = TestClient(create_app(Settings(), detector=Exploding()), raise_server_exceptions=False)
    r = bad.post("/detect", content=png, headers={"Content-Type": "image/png"})
    assert_error(r, 500, "internal_error")
    assert "boom" not in r.text


def test_model_load_errors_show_no_server_paths(tmp_path: Path) -> None:
    weights = tmp_path / "secret_dir" / "missing.pt"
    with TestClient(create_app(Settings(weights=weights))) as client:
        health = client.get("/health")
        assert health.status_code == 503 and "missing.pt" in health.json()["detail"]
        detect = client.post("/detect", content=encode(), headers=JPEG)
        error = assert_error(detect, 503, "model_unavailable")
        assert "missing.pt" in error["message"] and "retry-after" not in detect.headers
        for text in (health.text, detect.text):
            assert "secret_dir" not in text and str(tmp_path) not in text


def test_redact_paths() -> None:
    assert redact_paths("weights file not found: /srv/models/m4.pt") == "weights file not found: m4.pt"
    assert redact_paths("cannot read ~/.cache/rnnpool-face/x.onnx (C:\\Users\\me\\w.pt)") == \
        "cannot read x.onnx (w.pt)"
    assert redact_paths("a 3/4 ratio, runs/m4/final.pt and http://host/x stay") == \
        "a 3/4 ratio, runs/m4/final.pt and http://host/x stay"


# ------------------------------------------------------------------------------------------------ CORS


def test_no_cors_headers_by_default() -> None:
    client = TestClient(create_app(Settings(), detector=GateDetector()))
    origin = {"Origin": "https://a.example"}
    responses = [
        client.get("/health", headers=origin),
        client.post("/detect", content=encode(), headers={**JPEG, **origin}),
        client.options("/detect", headers={**origin, "Access-Control-Request-Method": "POST"}),
    ]
    assert [r.status_code for r in responses] == [200, 200, 405]
    assert responses[2].json()["error"]["code"] == "method_not_allowed"
    for r in responses:
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], dict(r.headers)


def test_cors_for_a_configured_origin_only() -> None:
    client = TestClient(create_app(Settings(cors_origins=["https://a.example"]), detector=GateDetector()))
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,x-api-key"}
    r = client.options("/detect", headers={"Origin": "https://a.example", **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://a.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
    r = client.post("/detect", content=encode(), headers={**JPEG, "Origin": "https://a.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://a.example"
    assert "X-Detections-Count" in r.headers["access-control-expose-headers"]
    # Another origin: no grant; a refused preflight is a JSON error like every other.
    r = client.options("/detect", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in r.headers
    assert_error(r, 400, "cors_rejected")
    r = client.post("/detect", content=encode(), headers={**JPEG, "Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# ------------------------------------------------------------------------------------------------ access log


def test_one_structured_log_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    client = TestClient(create_app(Settings(max_body_bytes=5000), detector=GateDetector()))
    jpeg = encode()
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    client.post("/detect", content=jpeg, headers=JPEG)
    asgi_request(client.app, path='/no/such\n"path', method="GET")  # bytes no HTTP client would send
    client.post("/detect", content=b"x" * 6000, headers=JPEG)
    records = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(records) == 3
    lines = [json.loads(r.getMessage()) for r in records]
    assert all("\n" not in r.getMessage() for r in records)  # a hostile path cannot forge a second line
    ok, missing, too_big = lines
    assert set(ok) == {"method", "path", "status", "latency_ms", "bytes_in", "bytes_out", "client"}
    assert (ok["method"], ok["path"], ok["status"], ok["bytes_in"]) == ("POST", "/detect", 200, len(jpeg))
    assert ok["latency_ms"] >= 0 and ok["bytes_out"] > 50 and ok["client"] == "testclient"
    assert (missing["method"], missing["path"], missing["status"]) == ("GET", '/no/such\n"path', 404)
    assert missing["client"] == "127.0.0.1"
    assert too_big["status"] == 413 and too_big["bytes_in"] == 0  # refused from Content-Length, unread
    assert records[0].access == ok and records[0].levelno == logging.INFO


def test_access_log_reaches_stderr_when_nothing_configures_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("app_test_logger")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logger, "handlers", [])
    ensure_log_output("app_test_logger")
    ensure_log_output("app_test_logger")
    assert len(logger.handlers) == 1 and logger.getEffectiveLevel() == logging.INFO
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])
    other = logging.getLogger("app_test_logger2")
    ensure_log_output("app_test_logger2")  # the application configured logging: leave it alone
    assert other.handlers == []


# ------------------------------------------------------------------------------------------------ schema


def test_openapi_documents_the_new_errors() -> None:
    spec = TestClient(create_app(Settings(), detector=GateDetector())).get("/openapi.json").json()
    responses = spec["paths"]["/detect"]["post"]["responses"]
    assert {"408", "503", "504"} <= set(responses)
    assert "Retry-After" in responses["503"]["headers"]


try:
    import schemathesis
except ImportError:  # the dev extra is not installed
    schemathesis = None

SEEN: collections.Counter[tuple[str, str, int]] = collections.Counter()


def _no_leak_check(ctx: Any, response: Any, case: Any) -> None:
    """An extra schemathesis check: no traceback or path in any response, every error in the JSON shape."""
    assert_no_leak(response.content.decode("utf-8", "replace"))  # the annotated JPEG is bytes
    if response.status_code >= 400:
        assert set(json.loads(response.text)) == {"error"}, response.text


if schemathesis is not None:
    from hypothesis import HealthCheck, settings
    from schemathesis.checks import positive_data_acceptance
    from schemathesis.core.parameters import ParameterLocation

    schemathesis.serializer.alias("image/bmp", "application/octet-stream")  # send the generated bytes as they are
    torch.manual_seed(0)
    _FUZZ_APP = create_app(Settings(api_key="fuzz-key", score_threshold=0.3), detector=Detector.untrained())
    _SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", _FUZZ_APP)

    @_SCHEMA.parametrize()
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def test_schema_fuzzing(case: Any) -> None:
        """Generated requests, valid and invalid, against the app's own schema (in-process ASGI, a real untrained
        model, an API key): no 5xx, responses conform to the schema, nothing leaks.

        Every built-in check runs (status codes, content types, bodies and headers against the schema, invalid
        input refused, auth enforced, unsupported methods, ...) except ``positive_data_acceptance``: a schema cannot
        say "a decodable JPEG" or "a class this model knows", so a schema-valid body of random bytes is rightly
        refused with 400 and ``classes=cat`` with 422.
        """
        # The real key, sent as the call's explicit auth (schemathesis then probes that the API enforces it), except
        # in cases generated with a broken or missing key header: those must be refused, and re-adding the key
        # would turn them into valid requests that schemathesis still expects to be rejected.
        headers = {} if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER) else {
            "X-API-Key": "fuzz-key"}
        response = case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance],
                                          additional_checks=[_no_leak_check])
        SEEN[(case.method, case.path, response.status_code)] += 1

    def test_schema_fuzzing_reached_the_model() -> None:
        """The fuzzing above sent images the model actually ran on (schemathesis sends real sample images)."""
        if not SEEN:
            pytest.skip("runs after test_schema_fuzzing")
        assert SEEN[("POST", "/detect", 200)] > 0, SEEN
        assert not [key for key in SEEN if key[2] >= 500], SEEN
else:

    @pytest.mark.skip(reason="schemathesis is not installed (dev extra)")
    def test_schema_fuzzing() -> None:
        """Placeholder."""
