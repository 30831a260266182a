"""Model registry and the RNNPool-Face family."""

from detector.models import variants as _variants  # noqa: F401  (registers the variants)
from detector.models.registry import build_model, list_models, register_model
from detector.models.rnnpool_face import BlockSpec, RNNPoolFace, RNNPoolFaceConfig

__all__ = ["BlockSpec", "RNNPoolFace", "RNNPoolFaceConfig", "build_model", "list_models", "register_model"]
