"""Query parameters and response bodies of the web service (they also document the API in ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MAX_DETECTIONS",
    "DetectParams",
    "DetectResponse",
    "Detection",
    "ErrorBody",
    "ErrorResponse",
    "HealthResponse",
    "VersionResponse",
]

MAX_DETECTIONS = 1000
"""The largest ``max_detections`` a request may ask for."""


class DetectParams(BaseModel):
    """Query parameters of ``POST /detect``. Unknown ones are refused (422), so that a misspelt ``treshold`` is not
    silently ignored."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(default=None, ge=0.0, le=1.0, description="minimum score")
    max_detections: int | None = Field(default=None, ge=1, le=MAX_DETECTIONS, description="box cap")
    annotate: bool = Field(default=False, description="return image/jpeg with the boxes drawn instead of JSON")
    classes: str | None = Field(
        default=None,
        description="what to detect: comma-separated class names (`head`, `face`) or `all`; default: the server's "
                    "default classes (`head`, see GET /version)")


class Detection(BaseModel):
    """One detected object."""

    box_xyxy: list[float] = Field(
        min_length=4, max_length=4, description="[x0, y0, x1, y1] in pixels of the uploaded image (0.01 px)",
        examples=[[12.5, 30.0, 80.25, 101.0]],
    )
    score: float = Field(ge=0.0, le=1.0, description="confidence", examples=[0.93])
    label: str = Field(description="class name", examples=["head"])


class DetectResponse(BaseModel):
    """Result of ``POST /detect``: the same fields as ``detect IMAGE --json``, plus the timing."""

    model: str = Field(description="model variant", examples=["rnnpool_face_m4"])
    count: int = Field(ge=0, description="number of detections")
    counts: dict[str, int] = Field(description="detections per class name (every class listed)")
    image_width: int = Field(ge=1, description="width of the uploaded image in pixels")
    image_height: int = Field(ge=1, description="height of the uploaded image in pixels")
    inference_ms: float = Field(ge=0.0, description="time spent in the detector (preprocess, network, NMS)")
    detections: list[Detection] = Field(description="sorted by descending score")


class ErrorBody(BaseModel):
    """What went wrong; ``code`` is stable, ``message`` is for people."""

    code: str = Field(examples=["payload_too_large"])
    message: str = Field(examples=["request body is larger than 10485760 bytes"])
    details: list[dict[str, Any]] | None = Field(
        default=None, description="for validation errors: the offending parameters"
    )


class ErrorResponse(BaseModel):
    """Every error response (4xx/5xx) has this shape."""

    error: ErrorBody


class HealthResponse(BaseModel):
    """``GET /health``."""

    status: str = Field(description='"ok", or "unavailable" when the model failed to load', examples=["ok"])
    model_loaded: bool
    model: str | None = Field(default=None, description="model variant, when loaded")
    detail: str | None = Field(default=None, description="why the model is not loaded")


class VersionResponse(BaseModel):
    """``GET /version``."""

    version: str = Field(description="package version", examples=["0.1.0"])
    model: str | None = Field(description="loaded model variant(s), joined by +, when loaded")
    backend: str = Field(examples=["torch"])
    classes: list[str] = Field(description="class names the loaded models detect (`classes` of POST /detect)")
    default_classes: list[str] = Field(description="classes returned when a request names none")
    default_threshold: float = Field(description="score threshold used when a request gives none")
