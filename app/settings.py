"""Service settings, read from ``RNNPOOL_*`` environment variables when :class:`Settings` is instantiated."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Configuration of the web service.

    Every field can be set with an environment variable named ``RNNPOOL_<FIELD>`` (e.g. ``RNNPOOL_API_KEY``);
    keyword arguments win over the environment.

    Attributes:
        weights: weights file (torch) or ``.onnx`` file; ``None`` = the shipped weights of ``model``.
        model: variant name whose shipped weights to load (default ``rnnpool_face_m4``).
        backend: ``"torch"``, ``"onnx"`` or ``"native"`` (see :func:`detector.backends.load_detector`).
        face_weights: weights of the face model; ``None`` = the shipped face weights when they exist.
        default_classes: classes a request without ``classes`` gets (JSON list or comma-separated); empty = heads.
        score_threshold: default minimum score when a request gives no ``threshold``.
        max_detections: default cap on boxes per image when a request gives no ``max_detections``.
        max_body_bytes: largest accepted request body (multipart envelope included); larger -> 413.
        max_pixels: largest accepted image (width x height, read from the header before decoding); larger -> 413.
        max_aspect_ratio: largest accepted ratio of the longer to the shorter image side; larger -> 422 (a
            1-pixel-high strip within ``max_pixels`` would otherwise become a huge network input).
        max_concurrency: images decoded and run through the model at the same time (worker threads); default 2,
            the number of cores of the reference machine.
        max_queue: further requests allowed to wait for a worker; when all workers are busy and the queue is full,
            ``POST /detect`` answers 503 with ``Retry-After`` at once.
        request_timeout_s: deadline of one ``POST /detect`` (reading the body, waiting in the queue, inference);
            past it: 408 while the body is still arriving, else 504.
        cors_origins: origins allowed by CORS (JSON list or comma-separated); empty = no CORS headers.
        api_key: when set, ``POST /detect`` requires the header ``X-API-Key`` with this value.
    """

    model_config = SettingsConfigDict(env_prefix="RNNPOOL_", extra="forbid")

    weights: Path | None = None
    model: str | None = None
    backend: Literal["torch", "onnx", "native"] = "torch"
    face_weights: Path | None = None
    default_classes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    score_threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_detections: int = Field(750, ge=1, le=1000)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    max_aspect_ratio: float = Field(100.0, ge=1.0)
    max_concurrency: int = Field(2, ge=1, le=256)
    max_queue: int = Field(8, ge=0, le=100_000)
    request_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_key: SecretStr | None = None

    @field_validator("cors_origins", "default_classes", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        """Accepts ``'["https://a", "https://b"]'``, ``"https://a,https://b"`` or a list."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        """An empty ``RNNPOOL_API_KEY=`` means no key, not a key that is the empty string."""
        return None if isinstance(value, str) and not value.strip() else value
