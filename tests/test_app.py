"""The web service (app/): /detect on good and bad input, settings, API key, health/version/docs, the page."""

from __future__ import annotations

import asyncio
import struct
import warnings
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # newer Starlette warns that its TestClient wants httpx2; httpx works
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

import detector
from app.main import create_app, serve
from app.schemas import DetectResponse
from app.settings import Settings
from detector import Detections, Detector, build_model
from detector.checkpoint import default_weights_path, save_weights
from detector.postprocess import DEFAULT_NMS_IOU

class FakeDetector:
    """Deterministic stand-in: three boxes at fixed fractions of the image (two heads, one face)."""

    name = "fake_model"
    class_names = ("head", "face")

    def __init__(self, fail: Exception | None = None) -> None:
        self.config = SimpleNamespace(name=self.name, class_names=self.class_names, input_size=(320, 240))
        self.calls: list[dict] = []
        self.fail = fail

    def __call__(self, image_bgr, score_threshold=None, max_detections=None) -> Detections:
        try:
            asyncio.get_running_loop()
            on_event_loop = True
        except RuntimeError:
            on_event_loop = False
        self.calls.append({"shape": image_bgr.shape, "threshold": score_threshold, "max_detections": max_detections,
                           "on_event_loop": on_event_loop})
        if self.fail is not None:
            raise self.fail
        h, w = image_bgr.shape[:2]
        boxes = np.array([[0.1, 0.1, 0.3, 0.4], [0.5, 0.2, 0.7, 0.5], [0.6, 0.6, 0.9, 0.9]]) * [w, h, w, h]
        dets = Detections(boxes, [0.9, 0.7, 0.3], [1, 2, 1], self.class_names, (w, h))
        dets = dets.filter(min_score=0.5 if score_threshold is None else score_threshold)
        return dets.select(slice(0, max_detections))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Tests do not see the developer's RNNPOOL_* variables."""
    import os

    for name in list(os.environ):
        if name.startswith("RNNPOOL_"):
            monkeypatch.delenv(name)


@pytest.fixture()
def fake():
    return FakeDetector()


@pytest.fixture()
def client(fake):
    return TestClient(create_app(Settings(default_classes=["all"]), detector=fake))


def encode(ext: str, width: int = 160, height: int = 120) -> bytes:
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur((rng.random((height, width, 3)) * 255).astype(np.uint8), (5, 5), 0)
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims ``width x height`` pixels (a decompression-bomb-shaped file, cheap to make)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text
    return body["error"]


# ------------------------------------------------------------------------------------------------ /detect: success


def test_multipart_upload_returns_the_schema(client, fake):
    r = client.post("/detect", files={"file": ("photo.jpg", encode(".jpg", 200, 100), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    DetectResponse.model_validate(body)
    assert set(body) == {"model", "count", "counts", "image_width", "image_height", "inference_ms", "detections"}
    assert body["model"] == "fake_model" and (body["image_width"], body["image_height"]) == (200, 100)
    assert body["count"] == 2 and body["counts"] == {"head": 1, "face": 1} and body["inference_ms"] >= 0
    first = body["detections"][0]
    assert first == {"box_xyxy": [20.0, 10.0, 60.0, 40.0], "score": 0.9, "label": "head"}  # original pixels
    assert r.headers["x-detections-count"] == "2" and r.headers["x-model"] == "fake_model"
    assert fake.calls[-1]["shape"] == (100, 200, 3) and fake.calls[-1]["on_event_loop"] is False


@pytest.mark.parametrize(("ext", "media_type"), [(".jpg", "image/jpeg"), (".png", "image/png"),
                                                 (".bmp", "image/bmp"), (".webp", "image/webp")])
def test_raw_body_each_format(client, ext, media_type):
    r = client.post("/detect", content=encode(ext, 64, 48), headers={"Content-Type": media_type})
    assert r.status_code == 200, r.text
    assert (r.json()["image_width"], r.json()["image_height"]) == (64, 48)


def test_threshold_and_max_detections(client, fake):
    jpeg = encode(".jpg")
    post = lambda **params: client.post("/detect", content=jpeg, params=params,  # noqa: E731
                                        headers={"Content-Type": "image/jpeg"}).json()
    assert post()["count"] == 2 and fake.calls[-1]["threshold"] == 0.5  # the settings' default
    assert post(threshold=0.2)["count"] == 3
    assert post(threshold=0.95)["count"] == 0
    assert post(threshold=0.2, max_detections=1)["count"] == 1 and fake.calls[-1]["max_detections"] == 1
    scores = [d["score"] for d in post(threshold=0.0)["detections"]]
    assert scores == sorted(scores, reverse=True)


def test_default_threshold_comes_from_settings(fake):
    client = TestClient(create_app(Settings(score_threshold=0.25, max_detections=2, default_classes="all"), detector=fake))
    body = client.post("/detect", content=encode(".png"), headers={"Content-Type": "image/png"}).json()
    assert body["count"] == 2 and fake.calls[-1]["threshold"] == 0.25 and fake.calls[-1]["max_detections"] == 2


def test_default_classes_are_heads_unless_configured(fake):
    jpeg, headers = encode(".jpg"), {"Content-Type": "image/jpeg"}
    body = TestClient(create_app(Settings(), detector=fake)).post("/detect", content=jpeg, headers=headers).json()
    assert body["counts"] == {"head": 1} and [d["label"] for d in body["detections"]] == ["head"]
    client = TestClient(create_app(Settings(default_classes="face"), detector=fake))
    assert client.post("/detect", content=jpeg, headers=headers).json()["counts"] == {"face": 1}
    assert client.get("/version").json()["default_classes"] == ["face"]
    body = client.post("/detect", content=jpeg, headers=headers, params={"classes": "all"}).json()
    assert body["counts"] == {"head": 1, "face": 1}


def test_classes_filter(client):
    jpeg, headers = encode(".jpg"), {"Content-Type": "image/jpeg"}
    body = client.post("/detect", content=jpeg, headers=headers, params={"classes": "face"}).json()
    assert [d["label"] for d in body["detections"]] == ["face"]
    body = client.post("/detect", content=jpeg, headers=headers, params={"classes": "face", "max_detections": 1}).json()
    assert [d["label"] for d in body["detections"]] == ["face"]  # the cap applies after the class filter
    body = client.post("/detect", content=jpeg, headers=headers, params={"classes": "head, face"}).json()
    assert body["count"] == 2
    assert_error(client.post("/detect", content=jpeg, headers=headers, params={"classes": "cat,head"}), 422,
                 "unknown_class")
    assert_error(client.post("/detect", content=jpeg, headers=headers, params={"classes": " , "}), 422,
                 "validation_error")


def test_annotate_returns_a_jpeg(client):
    r = client.post("/detect", params={"annotate": "true"}, files={"file": ("a.png", encode(".png", 120, 90))})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    image = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (90, 120, 3)
    assert r.headers["x-detections-count"] == "2"


def test_untrained_real_detector_end_to_end():
    torch.manual_seed(0)
    client = TestClient(create_app(Settings(score_threshold=0.0), detector=Detector.untrained()))
    body = client.post("/detect", content=encode(".jpg", 160, 120), headers={"Content-Type": "image/jpeg"},
                       params={"max_detections": 5}).json()
    assert body["model"] == "rnnpool_face_m4" and body["count"] == 5
    boxes = np.array([d["box_xyxy"] for d in body["detections"]])
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 160).all() and (boxes[:, [1, 3]] <= 120).all()


# ------------------------------------------------------------------------------------------------ /detect: bad input


def test_empty_body(client, fake):
    assert_error(client.post("/detect", content=b"", headers={"Content-Type": "image/jpeg"}), 400, "empty_body")
    assert_error(client.post("/detect", files={"file": ("a.jpg", b"", "image/jpeg")}), 400, "empty_body")
    assert not fake.calls


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b"hello, this is text", "image/jpeg", 400, "invalid_image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "image/jpeg", 400, "truncated_image"),  # a JPEG start, then junk
        (b"GIF89a" + b"\x00" * 40, "image/png", 415, "unsupported_media_type"),  # an image, but not one we take
        (b"hello", "text/plain", 415, "unsupported_media_type"),
        (b"hello", "application/octet-stream", 415, "unsupported_media_type"),
        (b"hello", "", 415, "unsupported_media_type"),
    ],
)
def test_not_an_image_or_unsupported(client, fake, content, content_type, status, code):
    assert_error(client.post("/detect", content=content, headers={"Content-Type": content_type}), status, code)
    assert not fake.calls


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_truncated_image(client, fake, ext):
    data = encode(ext, 200, 150)
    cut = data[: len(data) * 2 // 3]
    assert_error(client.post("/detect", content=cut, headers={"Content-Type": "image/jpeg"}), 400, "truncated_image")
    assert_error(client.post("/detect", files={"file": ("a", cut)}), 400, "truncated_image")
    assert not fake.calls


def test_jpeg_missing_only_its_end_marker_is_rejected(client, fake, monkeypatch):
    """Even when the decoder would return a (partial) image, a JPEG without EOI after its last scan is refused."""
    import detector.image_io

    data = encode(".jpg")
    assert data.endswith(b"\xff\xd9")
    decoded = []
    monkeypatch.setattr(detector.image_io.cv2, "imdecode", lambda *a: decoded.append(1) or np.zeros((4, 4, 3), np.uint8))
    assert_error(client.post("/detect", content=data[:-2], headers={"Content-Type": "image/jpeg"}), 400,
                 "truncated_image")
    assert not decoded and not fake.calls


def test_body_too_large_is_413(fake):
    client = TestClient(create_app(Settings(max_body_bytes=1000), detector=fake))
    big = encode(".png", 64, 64)  # ~12 KB of noise
    assert len(big) > 1000
    assert_error(client.post("/detect", content=big, headers={"Content-Type": "image/png"}), 413, "payload_too_large")
    assert_error(client.post("/detect", files={"file": ("a.png", big)}), 413, "payload_too_large")
    # No Content-Length (chunked upload): the limit applies while reading.
    chunks = iter([big[i: i + 500] for i in range(0, len(big), 500)])
    r = client.post("/detect", content=chunks, headers={"Content-Type": "image/png"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "payload_too_large")
    assert not fake.calls


def test_413_from_content_length_before_reading_the_body(fake):
    """A declared Content-Length over the limit is refused without reading a byte of the body."""
    app = create_app(Settings(max_body_bytes=1000), detector=fake)
    received: list[dict] = []
    sent: list[dict] = []

    async def receive():
        received.append({})
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/detect", "raw_path": b"/detect", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"test"), (b"content-type", b"image/jpeg"), (b"content-length", b"50000000")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert b"payload_too_large" in b"".join(m.get("body", b"") for m in sent[1:])
    assert not received and not fake.calls


def test_decompression_bomb_is_413_before_decoding(client, fake, monkeypatch):
    import detector.image_io

    decoded = []
    monkeypatch.setattr(detector.image_io.cv2, "imdecode", lambda *a: decoded.append(1))
    bomb = png_header(50_000, 50_000)
    assert len(bomb) < 200
    error = assert_error(client.post("/detect", content=bomb, headers={"Content-Type": "image/png"}), 413,
                         "image_too_large")
    assert "pixels" in error["message"]
    error = assert_error(client.post("/detect", files={"file": ("b.png", png_header(10_000, 5_000))}), 413,
                         "image_too_large")
    assert "10000x5000" in error["message"] and "40000000" in error["message"]
    assert not decoded and not fake.calls


def test_max_pixels_setting(fake):
    client = TestClient(create_app(Settings(max_pixels=100 * 100), detector=fake))
    ok = client.post("/detect", content=encode(".jpg", 100, 100), headers={"Content-Type": "image/jpeg"})
    assert ok.status_code == 200
    assert_error(client.post("/detect", content=encode(".jpg", 101, 100), headers={"Content-Type": "image/jpeg"}),
                 413, "image_too_large")


@pytest.mark.parametrize(
    "params",
    [{"threshold": "-0.1"}, {"threshold": "1.5"}, {"threshold": "abc"}, {"max_detections": "0"},
     {"max_detections": "1001"}, {"annotate": "maybe"}, {"treshold": "0.3"}],  # the last: unknown, not ignored
)
def test_bad_query_parameters_are_422(client, fake, params):
    r = client.post("/detect", content=encode(".jpg"), params=params, headers={"Content-Type": "image/jpeg"})
    error = assert_error(r, 422, "validation_error")
    assert error["details"][0]["loc"] == ["query", next(iter(params))]
    assert not fake.calls


def test_bad_multipart(client, fake):
    # A form without the "file" field.
    r = client.post("/detect", files={"image": ("a.jpg", encode(".jpg"), "image/jpeg")})
    assert_error(r, 422, "missing_file")
    r = client.post("/detect", data={"file": "not a file"}, files={"other": ("x", b"y")})
    assert_error(r, 422, "missing_file")
    # No boundary / garbage.
    r = client.post("/detect", content=b"garbage", headers={"Content-Type": "multipart/form-data"})
    assert_error(r, 400, "invalid_multipart")
    assert not fake.calls


def test_unexpected_error_is_a_bare_500():
    client = TestClient(create_app(Settings(), detector=FakeDetector(fail=RuntimeError("secret internals"))),
                        raise_server_exceptions=False)
    r = client.post("/detect", content=encode(".jpg"), headers={"Content-Type": "image/jpeg"})
    assert_error(r, 500, "internal_error")
    assert "secret" not in r.text


def test_routing_errors_are_json(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/detect"), 405, "method_not_allowed")


# ------------------------------------------------------------------------------------------------ API key


def test_api_key(fake):
    client = TestClient(create_app(Settings(api_key="s3cret"), detector=fake))
    jpeg, ct = encode(".jpg"), {"Content-Type": "image/jpeg"}
    error = assert_error(client.post("/detect", content=jpeg, headers=ct), 401, "unauthorized")
    assert "X-API-Key" in error["message"]
    assert_error(client.post("/detect", content=jpeg, headers={**ct, "X-API-Key": "wrong"}), 401, "unauthorized")
    # Authentication comes before parameter validation.
    assert_error(client.post("/detect", content=jpeg, headers=ct, params={"threshold": 7}), 401, "unauthorized")
    assert not fake.calls
    r = client.post("/detect", content=jpeg, headers={**ct, "X-API-Key": "s3cret"})
    assert r.status_code == 200 and r.json()["count"] == 1  # default classes: heads
    assert client.get("/health").status_code == 200  # only /detect is protected
    assert "APIKeyHeader" in client.get("/openapi.json").json()["components"]["securitySchemes"]


def test_no_api_key_by_default(client):
    assert Settings().api_key is None
    assert client.post("/detect", content=encode(".jpg"), headers={"Content-Type": "image/jpeg"}).status_code == 200


# ------------------------------------------------------------------------------------------------ other endpoints


def test_health_version_docs_and_page(client):
    assert client.get("/health").json() == {"status": "ok", "model_loaded": True, "model": "fake_model",
                                            "detail": None}
    assert client.get("/version").json() == {"version": detector.__version__, "model": "fake_model",
                                             "backend": "torch", "classes": ["head", "face"],
                                             "default_classes": ["head", "face"], "default_threshold": 0.5}
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/detect"]["post"]
    assert {"multipart/form-data", "image/jpeg", "image/png"} <= set(post["requestBody"]["content"])
    assert {"application/json", "image/jpeg"} <= set(post["responses"]["200"]["content"])
    assert {"400", "413", "415", "422"} <= set(post["responses"])
    assert {"threshold", "max_detections", "annotate", "classes"} == {p["name"] for p in post["parameters"]}
    assert {"/health", "/version"} <= set(spec["paths"]) and "/" not in spec["paths"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "static/app.js" in page.text and "getUserMedia" not in page.text
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "getUserMedia" in js.text and "window.lastResult" in js.text
    assert client.get("/static/style.css").status_code == 200


def test_page_uses_no_external_resources(client):
    import re

    external = re.compile(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|fetch\(\s*[`"']https?:""")
    for path in ("/", "/static/app.js", "/static/style.css"):
        assert not external.search(client.get(path).text), path


# ------------------------------------------------------------------------------------------------ startup, settings


def test_model_loads_once_at_startup(tmp_path, monkeypatch):
    import detector.backends

    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    save_weights(weights, build_model("rnnpool_face_m4"))
    calls = []
    real = detector.backends.load_detector
    monkeypatch.setattr(detector.backends, "load_detector", lambda **kw: calls.append(kw) or real(**kw))
    app = create_app(Settings(weights=weights, score_threshold=0.3))
    assert not calls  # nothing happens before startup
    with TestClient(app) as client:
        assert client.get("/health").json()["model_loaded"] is True
        for _ in range(2):
            r = client.post("/detect", content=encode(".jpg", 96, 64), headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200 and r.json()["model"] == "rnnpool_face_m4"
    face_shipped = default_weights_path("rnnpool_face_m4_face").is_file()  # loaded beside the head model
    assert len(calls) == 1 + face_shipped
    assert calls[0] == {"weights": weights, "model": None, "backend": "torch", "score_threshold": 0.3,
                        "nms_iou": DEFAULT_NMS_IOU, "max_detections": 750}


def test_missing_weights_keep_the_service_up_and_say_so(tmp_path):
    with TestClient(create_app(Settings(weights=tmp_path / "missing.pt"))) as client:
        r = client.get("/health")
        assert r.status_code == 503
        assert r.json()["model_loaded"] is False and "not found" in r.json()["detail"]
        error = assert_error(client.post("/detect", content=encode(".jpg"), headers={"Content-Type": "image/jpeg"}),
                             503, "model_unavailable")
        assert "missing.pt" in error["message"]
        assert client.get("/version").json()["model"] is None


def test_settings_from_environment(monkeypatch, fake):
    import app.main

    # The environment is read when the app is created, not when the module is imported.
    assert app.main.create_app is create_app
    monkeypatch.setenv("RNNPOOL_SCORE_THRESHOLD", "0.2")
    monkeypatch.setenv("RNNPOOL_MAX_BODY_BYTES", "123")
    monkeypatch.setenv("RNNPOOL_MAX_PIXELS", "4567")
    monkeypatch.setenv("RNNPOOL_BACKEND", "onnx")
    monkeypatch.setenv("RNNPOOL_API_KEY", "k")
    monkeypatch.setenv("RNNPOOL_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("RNNPOOL_WEIGHTS", "/x/y.onnx")
    s = Settings()
    assert (s.score_threshold, s.max_body_bytes, s.max_pixels, s.backend) == (0.2, 123, 4567, "onnx")
    assert s.api_key.get_secret_value() == "k" and str(s.weights) == "/x/y.onnx"
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    monkeypatch.setenv("RNNPOOL_CORS_ORIGINS", '["https://c.example"]')
    assert Settings().cors_origins == ["https://c.example"]
    monkeypatch.setenv("RNNPOOL_API_KEY", "")
    assert Settings().api_key is None
    d = Settings.model_fields
    assert d["max_body_bytes"].default == 10 * 1024 * 1024 and d["max_pixels"].default == 40_000_000
    # create_app() without settings reads them.
    client = TestClient(create_app(detector=fake))
    assert client.get("/version").json()["default_threshold"] == 0.2
    monkeypatch.setenv("RNNPOOL_BACKEND", "tensorflow")
    with pytest.raises(ValueError):
        Settings()


def test_cors(fake):
    no_cors = TestClient(create_app(Settings(), detector=fake))
    assert "access-control-allow-origin" not in no_cors.get("/health", headers={"Origin": "https://a.example"}).headers
    client = TestClient(create_app(Settings(cors_origins=["https://a.example"]), detector=fake))
    r = client.options("/detect", headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers": "X-API-Key, Content-Type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://a.example"
    r = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_serve_runs_uvicorn_with_the_factory(monkeypatch):
    import uvicorn

    runs = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append((app, kw)))
    serve(port=8123, score_threshold=0.35, weights=None)
    factory, kw = runs[0]
    assert kw == {"factory": True, "host": "127.0.0.1", "port": 8123}
    assert factory.func is create_app
    built = factory()
    assert TestClient(built).get("/version").json()["default_threshold"] == 0.35  # no model: not started
    with pytest.raises(ValueError, match="score_threshold"):
        serve(score_threshold=3)
    with pytest.raises(ValueError, match="colour"):
        serve(colour="blue")
