"""Saving and loading weights and training checkpoints: atomic writes, ``weights_only`` loads, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from detector.fileio import atomic_open
from detector.models.rnnpool_face import RNNPoolFace, RNNPoolFaceConfig

__all__ = [
    "DEFAULT_MODEL",
    "WeightsError",
    "atomic_save",
    "default_weights_path",
    "load_checkpoint",
    "load_model",
    "save_weights",
]

DEFAULT_MODEL = "rnnpool_face_m4"
FORMAT = "rnnpool-face"


class WeightsError(RuntimeError):
    """A weights or checkpoint file that is missing, unreadable or not ours; the message is user-facing."""


def default_weights_path(model: str = DEFAULT_MODEL) -> Path:
    """The shipped weights of ``model``: ``<repo>/weights/<model>.pt``."""
    return Path(__file__).resolve().parents[1] / "weights" / f"{model}.pt"


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (see :mod:`detector.fileio`)."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_weights(path: str | Path, model: RNNPoolFace, meta: dict[str, Any] | None = None) -> None:
    """Writes inference weights: the model config, its state dict (float32) and ``meta`` (plain types)."""
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    atomic_save({"format": FORMAT, "kind": "weights", "model_config": model.config.to_dict(),
                 "state_dict": state, "meta": meta or {}}, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a weights file or a training checkpoint safely (``weights_only=True``).

    Raises:
        WeightsError: missing, truncated, corrupt, or not an RNNPool-Face file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises anything from KeyError to UnpicklingError on junk
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"cannot read weights {path}: truncated, corrupt or not a safe PyTorch file ({first[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model_config" not in ckpt:
        raise WeightsError(f"{path} is not an RNNPool-Face weights file or checkpoint")
    return ckpt


def load_model(path: str | Path, ema: bool = True) -> tuple[RNNPoolFace, dict[str, Any]]:
    """Builds the model stored in ``path`` (weights or checkpoint) in eval mode.

    Args:
        ema: for training checkpoints holding an EMA copy of the weights, load that copy.

    Returns:
        The model and the file's ``meta`` dict.
    """
    ckpt = load_checkpoint(path)
    try:
        config = RNNPoolFaceConfig.from_dict(ckpt["model_config"])
        model = RNNPoolFace(config)
        state = ckpt.get("ema_state_dict") if ema and ckpt.get("ema_state_dict") else ckpt["state_dict"]
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path}: weights do not fit the stored model config ({str(e).splitlines()[0][:160]})") from None
    return model.eval(), dict(ckpt.get("meta", {}))
