"""Exporters: ONNX (``detector.export.onnx``)."""
