"""RNNPool-Face: a face/head detector small enough for a microcontroller."""

from detector.detections import Detections
from detector.inference import Detector
from detector.models import build_model, list_models

__all__ = ["Detections", "Detector", "build_model", "list_models"]
__version__ = "0.1.0"
