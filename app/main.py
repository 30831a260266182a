"""The web service: ``POST /detect`` (JSON or an annotated JPEG), health/version, and a webcam page at ``/``.

Run it with ``uvicorn app.main:create_app --factory`` (settings from ``RNNPOOL_*`` environment variables) or
:func:`serve` (what ``detect serve`` calls).

Hostile or excessive input is bounded before it costs much: the body size (while streaming), the image's pixels and
aspect ratio (from its header, before decoding), the work in progress (``max_concurrency`` worker threads and
``max_queue`` waiting requests, then an immediate 503 with ``Retry-After``) and the time per request
(``request_timeout_s``). Every response to an error is ``{"error": {"code", "message"}}``; every request is logged
as one JSON line on the logger ``app.access``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import cv2
from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from app.access_log import AccessLogMiddleware, ensure_log_output
from app.errors import APIError, error_response, install_error_handlers, redact_paths
from detector.image_io import MEDIA_TYPES, ImageDecodeError, decode_image
from app.limits import InferencePool, PoolFull
from app.schemas import DetectParams, DetectResponse, ErrorResponse, HealthResponse, VersionResponse
from app.settings import Settings

if TYPE_CHECKING:
    from detector.detections import Detections
    from detector.detector_group import DetectorGroup
    from detector.inference import Detector

__all__ = ["STATIC_DIR", "create_app", "serve"]

log = logging.getLogger("uvicorn.error")  # startup messages next to uvicorn's own

STATIC_DIR = Path(__file__).resolve().parent / "static"
API_KEY_HEADER = "X-API-Key"
MULTIPART = "multipart/form-data"
RETRY_AFTER_S = 1  # what a 503 "server_busy" tells clients to wait (seconds)
_BINARY = {"type": "string", "format": "binary"}
_api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="required when the server has a key")

# /detect's request body is read by hand (to enforce the size limit while streaming), so describe it for the docs.
_DETECT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "the image: a multipart form with a file field named `file`, or the raw bytes with an "
        "image Content-Type (JPEG, PNG, BMP or WebP)",
        "content": {
            MULTIPART: {"schema": {"type": "object", "required": ["file"], "properties": {"file": _BINARY}}},
            **{t: {"schema": _BINARY} for t in ("image/jpeg", "image/png", "image/bmp", "image/webp")},
        },
    }
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


_DETECT_ERRORS: dict[int | str, dict[str, Any]] = {
    **_errors(400, 401, 413, 415, 422),
    408: {"model": ErrorResponse, "description": "the request body did not arrive within the request timeout"},
    503: {
        "model": ErrorResponse,
        "description": "`server_busy`: every inference worker is busy and the queue is full (retry after "
        "`Retry-After` seconds); `model_unavailable`: the model is not loaded",
        "headers": {"Retry-After": {"description": "seconds to wait before retrying (with `server_busy`)",
                                    "schema": {"type": "integer"}}},
    },
    504: {"model": ErrorResponse, "description": "no result within the request timeout"},
}


class _CORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, answering a refused preflight request in the JSON error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        message = bytes(response.body).decode("utf-8", "replace")  # e.g. "Disallowed CORS origin"
        return error_response(response.status_code, "cors_rejected", message, headers=headers)


def _server_busy() -> APIError:
    return APIError(503, "server_busy", "the server is busy (every worker taken, the queue full); retry later",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def _parse_classes(classes: str | None, group: DetectorGroup) -> tuple[str, ...]:
    """``"head,face"`` -> ``("head", "face")`` (the group's order); ``None`` -> the group's default classes.

    Raises:
        APIError: 422 for an empty list or a class no loaded model detects.
    """
    from detector.detector_group import parse_classes

    try:
        wanted = parse_classes(classes)
    except ValueError as e:
        raise APIError(422, "validation_error", str(e)) from None
    try:
        return group.resolve(wanted)
    except ValueError as e:
        raise APIError(422, "unknown_class", str(e)) from None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes: up front from Content-Length, else while reading."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise APIError(400, "bad_request", "invalid Content-Length header") from None
        if size > limit:
            raise APIError(413, "payload_too_large", f"request body is {size} bytes; the limit is {limit}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, "payload_too_large", f"request body is larger than the limit of {limit} bytes")
    except ClientDisconnect:
        raise APIError(400, "client_disconnected", "the client closed the connection") from None
    return bytes(body)


async def _multipart_file(headers: Headers, body: bytes) -> bytes:
    """The bytes of the ``file`` field of a multipart body already read into memory."""

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=1, max_fields=16).parse()
    except MultiPartException as e:
        raise APIError(400, "invalid_multipart", f"malformed multipart body: {e.message}") from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(422, "missing_file", 'the multipart body needs a file field named "file"')
        return await upload.read()
    finally:
        await form.close()


def create_app(settings: Settings | None = None, detector: Detector | DetectorGroup | None = None) -> FastAPI:
    """Builds the service.

    Args:
        settings: configuration; default: :class:`Settings` read from the environment now.
        detector: an already built detector or detector group (tests); default: the head model and, when shipped,
            the face model, loaded once at startup from ``settings``.

    Returns:
        The FastAPI application (an ASGI app).
    """
    import detector as detector_package

    settings = settings if settings is not None else Settings()
    ensure_log_output()
    pool = InferencePool(settings.max_concurrency, settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if app.state.detector is None:
            await run_in_threadpool(_load_into, app, settings)
        try:
            yield
        finally:
            pool.shutdown()

    app = FastAPI(
        title="RNNPool-Face",
        version=detector_package.__version__,
        summary="Head detection with a model small enough for a microcontroller.",
        lifespan=lifespan,
    )
    if detector is not None and not hasattr(detector, "resolve"):
        from detector.detector_group import DetectorGroup

        detector = DetectorGroup([detector], settings.default_classes or None)
    app.state.detector = detector
    app.state.load_error = None
    app.state.pool = pool
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            _CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", API_KEY_HEADER],
            expose_headers=["X-Detections-Count", "X-Inference-Ms", "X-Model", "Retry-After"],
        )
    app.add_middleware(AccessLogMiddleware)  # added last: outermost, so it also sees CORS answers

    async def require_api_key(key: Annotated[str | None, Depends(_api_key_header)]) -> None:
        expected = settings.api_key.get_secret_value().encode() if settings.api_key else None
        if expected is not None and (key is None or not secrets.compare_digest(key.encode(), expected)):
            raise APIError(401, "unauthorized", f"missing or wrong {API_KEY_HEADER} header",
                           headers={"WWW-Authenticate": "APIKey"})

    def loaded_detector() -> DetectorGroup:
        det = app.state.detector
        if det is None:
            reason = app.state.load_error or "starting up"
            raise APIError(503, "model_unavailable", f"the model is not loaded: {reason}")
        return det

    @app.post(
        "/detect",
        response_model=DetectResponse,
        summary="Detect heads (and, with classes, faces) in one image",
        dependencies=[Depends(require_api_key)] if settings.api_key else [],
        openapi_extra=_DETECT_BODY,
        responses={
            200: {"content": {"image/jpeg": {"schema": _BINARY}},
                  "description": "the detections; with `annotate=true`, a JPEG with the boxes drawn"},
            **_DETECT_ERRORS,
        },
    )
    async def detect(request: Request, params: Annotated[DetectParams, Query()]) -> Any:
        det = loaded_detector()
        wanted = _parse_classes(params.classes, det)
        media_type = _media_type(request)
        if media_type != MULTIPART and media_type not in MEDIA_TYPES:
            shown = media_type or "none"
            raise APIError(415, "unsupported_media_type",
                           f"Content-Type {shown} is not supported: send multipart/form-data (field 'file') or "
                           "image/jpeg, image/png, image/bmp or image/webp")
        if pool.full:  # refuse before reading a byte of the body
            raise _server_busy()
        score = settings.score_threshold if params.threshold is None else params.threshold
        cap = settings.max_detections if params.max_detections is None else params.max_detections
        timeout = settings.request_timeout_s
        reading = True
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                body = await _read_body(request, settings.max_body_bytes)
                if not body:
                    raise APIError(400, "empty_body", "the request body is empty")
                data = await _multipart_file(request.headers, body) if media_type == MULTIPART else body
                del body
                reading = False
                try:
                    dets, ms, jpeg = await pool.run(
                        _process, det, data, settings.max_pixels, settings.max_aspect_ratio, score, cap, wanted,
                        params.annotate,
                    )
                except PoolFull:
                    raise _server_busy() from None
        except TimeoutError:
            if not deadline.expired():
                raise
            if reading:
                raise APIError(408, "request_timeout",
                               f"the request body did not arrive within {timeout:g} s") from None
            raise APIError(504, "timeout", f"no result within {timeout:g} s; the server is overloaded") from None
        model = "+".join(det.model_names(wanted))
        headers = {"X-Detections-Count": str(len(dets)), "X-Inference-Ms": f"{ms:.2f}", "X-Model": model}
        if jpeg is not None:
            return Response(jpeg, media_type="image/jpeg", headers=headers)
        return _json_result(model, dets, ms, headers)

    @app.get("/health", response_model=HealthResponse, summary="Liveness and model status",
             responses={503: {"model": HealthResponse, "description": "the model is not loaded"}})
    async def health() -> Any:
        det = app.state.detector
        if det is None:
            reason = app.state.load_error or "starting up"
            body = HealthResponse(status="unavailable", model_loaded=False, detail=reason)
            return Response(body.model_dump_json(), status_code=503, media_type="application/json")
        return HealthResponse(status="ok", model_loaded=True, model=det.name)

    @app.get("/version", response_model=VersionResponse, summary="Package version and model")
    async def version() -> VersionResponse:
        det = app.state.detector
        return VersionResponse(
            version=detector_package.__version__,
            model=det.name if det is not None else None,
            backend=settings.backend,
            classes=list(det.class_names) if det is not None else [],
            default_classes=list(det.default_classes) if det is not None else [],
            default_threshold=settings.score_threshold,
        )

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _load_into(app: FastAPI, settings: Settings) -> None:
    """Loads the detector once at startup; on failure the service stays up and reports it (health: 503)."""
    from detector.checkpoint import WeightsError
    from detector.detector_group import load_detector_group
    from detector.native import NativeUnavailable

    try:
        app.state.detector = load_detector_group(
            weights=settings.weights,
            model=settings.model,
            backend=settings.backend,
            face_weights=settings.face_weights,
            default_classes=settings.default_classes or None,
            score_threshold=settings.score_threshold,
            max_detections=settings.max_detections,
        )
        log.info("loaded %s (%s backend; classes %s, default %s)", app.state.detector.name, settings.backend,
                 ",".join(app.state.detector.class_names), ",".join(app.state.detector.default_classes))
    except (WeightsError, NativeUnavailable, ValueError, OSError, ImportError) as e:
        log.error("model not loaded: %s", e)  # the full message (paths included) for the operator
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        app.state.load_error = redact_paths(first)  # what clients see
    except Exception as e:  # noqa: BLE001 - keep serving /health so the failure is visible
        app.state.load_error = f"unexpected {type(e).__name__} (see the server log)"
        log.exception("model not loaded")


def _process(
    det: DetectorGroup,
    data: bytes,
    max_pixels: int,
    max_aspect_ratio: float,
    threshold: float,
    max_detections: int,
    classes: tuple[str, ...],
    annotate: bool,
) -> tuple[Detections, float, bytes | None]:
    """Runs in a worker thread of the inference pool: decode, inference and (``annotate``) the JPEG, all CPU work.

    Returns:
        The detections, the detector's milliseconds, and the annotated JPEG (``None`` unless ``annotate``).
    """
    try:
        image = decode_image(data, max_pixels, max_aspect_ratio)
    except ImageDecodeError as e:
        raise APIError(e.status_code, e.code, e.message) from None
    start = time.perf_counter()
    dets = det(image, score_threshold=threshold, max_detections=max_detections, classes=classes)
    ms = (time.perf_counter() - start) * 1000.0
    return dets, ms, _annotated_jpeg(dets, image) if annotate else None


def _annotated_jpeg(dets: Detections, image: Any) -> bytes:
    ok, buf = cv2.imencode(".jpg", dets.draw(image), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _json_result(model: str, dets: Detections, ms: float, headers: dict[str, str]) -> Response:
    payload = DetectResponse(model=model, inference_ms=round(ms, 2), **dets.to_dict())
    return Response(payload.model_dump_json(), media_type="application/json", headers=headers)


def serve(host: str = "127.0.0.1", port: int = 8000, **overrides: Any) -> None:
    """Runs the service with uvicorn (blocks until interrupted).

    Args:
        host: interface to bind (``0.0.0.0`` for every interface).
        port: TCP port.
        **overrides: :class:`Settings` fields (``weights``, ``model``, ``backend``, ``score_threshold``, ...); ``None``
            values are ignored, the rest of the settings come from ``RNNPOOL_*`` environment variables.

    Raises:
        ValueError: an unknown or invalid setting (one readable line).
    """
    import uvicorn

    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        raise ValueError(f"invalid setting {where}: {first.get('msg', 'invalid value')}") from None
    # The same factory as `uvicorn app.main:create_app --factory`, with these settings bound.
    uvicorn.run(partial(create_app, settings), factory=True, host=host, port=port)
