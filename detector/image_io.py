"""Turning untrusted image bytes into a BGR image: format sniffing, size limits before decoding, truncation.

Shared by the web service (uploads) and the ``detect`` command (files).

The order matters: the header is read first (Pillow, lazily: no pixel data is decoded) so that a decompression
bomb (a small file claiming a huge image) is rejected before OpenCV allocates anything.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image


__all__ = ["MEDIA_TYPES", "SUPPORTED_FORMATS", "ImageDecodeError", "decode_image", "image_size", "sniff_format"]


class ImageDecodeError(ValueError):
    """Bytes that are not an acceptable image; ``status_code`` and ``code`` say why (the service's HTTP status).

    Args:
        status_code: 400 empty/not an image/truncated, 413 too many pixels, 415 unsupported format, 422 too elongated.
        code: stable ``snake_case`` reason.
        message: human-readable explanation, safe to show to users.
    """

    def __init__(self, status_code: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message

SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")

# Content-Type of a raw body -> format; the bytes are sniffed anyway (clients mislabel images).
MEDIA_TYPES = {
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/png": "PNG",
    "image/bmp": "BMP",
    "image/x-bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/webp": "WEBP",
}

# Images we recognise but do not accept (-> 415 rather than "not an image").
_OTHER_IMAGE_MAGIC = {
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"\x00\x00\x01\x00": "ICO",
}

_ACCEPTED = "send JPEG, PNG, BMP or WebP"


def sniff_format(data: bytes) -> str | None:
    """``"JPEG"``, ``"PNG"``, ``"BMP"`` or ``"WEBP"`` from the magic bytes, else ``None``."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"BM") and len(data) >= 26:
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _other_format(data: bytes) -> str | None:
    """Name of a recognised but unsupported image format (GIF, TIFF, HEIF/AVIF, ...), else ``None``."""
    for magic, name in _OTHER_IMAGE_MAGIC.items():
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis"):
        return "HEIF/AVIF"
    return None


def image_size(data: bytes, fmt: str) -> tuple[int, int]:
    """``(width, height)`` from the image header, without decoding the pixels.

    Raises:
        ImageDecodeError: 413 when Pillow itself flags a decompression bomb, 400 when the header is unreadable.
    """
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's warning (above ~89 MP) would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                return im.size
    except Image.DecompressionBombError:
        raise ImageDecodeError(413, "image_too_large", "image has far too many pixels (a decompression bomb?)") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types on malformed headers
        raise ImageDecodeError(400, "invalid_image", f"cannot read the {fmt} image header (corrupt file?)") from None


def _is_complete(data: bytes, fmt: str) -> bool:
    """Whether the file looks complete (OpenCV can decode some truncated files partially, silently)."""
    if fmt == "JPEG":
        # The last scan (SOS, FFDA) must be followed by an end-of-image marker (FFD9). Entropy-coded data
        # never contains FFDA/FFD9, and an EXIF thumbnail's own EOI comes before the main image's last SOS.
        last_sos = data.rfind(b"\xff\xda")
        return last_sos >= 0 and data.rfind(b"\xff\xd9") > last_sos
    if fmt == "PNG":
        # Pillow's verify walks every chunk up to IEND and checks the CRCs (no decompression).
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                im.verify()
        except Exception:  # noqa: BLE001
            return False
        return True
    if fmt == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 <= len(data)
    if fmt == "BMP":
        declared = int.from_bytes(data[2:6], "little")  # some writers leave 0 here
        return declared <= len(data)
    return True


def decode_image(data: bytes, max_pixels: int, max_aspect_ratio: float | None = None) -> np.ndarray:
    """Validates and decodes an uploaded image.

    Args:
        data: the file's bytes.
        max_pixels: largest accepted ``width * height``.
        max_aspect_ratio: largest accepted ``longer side / shorter side``; ``None``: any.

    Returns:
        ``(H, W, 3)`` uint8 BGR image (EXIF orientation applied, as OpenCV does).

    Raises:
        ImageDecodeError: 400 empty / not an image / truncated or corrupt, 413 too many pixels, 415 unsupported format,
            422 too elongated.
    """
    if not data:
        raise ImageDecodeError(400, "empty_body", f"no image data: {_ACCEPTED}")
    fmt = sniff_format(data)
    if fmt is None:
        other = _other_format(data)
        if other is not None:
            raise ImageDecodeError(415, "unsupported_media_type", f"{other} images are not supported: {_ACCEPTED}")
        raise ImageDecodeError(400, "invalid_image", "not a JPEG, PNG, BMP or WebP image")
    try:
        width, height = image_size(data, fmt)
    except ImageDecodeError as e:
        if e.status_code == 400 and not _is_complete(data, fmt):  # e.g. a WebP cut short: say so
            raise ImageDecodeError(400, "truncated_image", f"the {fmt} file is truncated or corrupt") from None
        raise
    if width <= 0 or height <= 0:
        raise ImageDecodeError(400, "invalid_image", "image has no pixels")
    if width * height > max_pixels:
        raise ImageDecodeError(
            413, "image_too_large", f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * min(width, height):
        raise ImageDecodeError(
            422, "unsupported_aspect_ratio",
            f"image is {width}x{height}; the longer side may be at most {max_aspect_ratio:g} times the shorter",
        )
    if not _is_complete(data, fmt):
        raise ImageDecodeError(400, "truncated_image", f"the {fmt} file is truncated or corrupt")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageDecodeError(400, "invalid_image", f"cannot decode the {fmt} image (corrupt file?)")
    return image
