"""Exporters: one module per format (onnx, gguf); each writes atomically and validates."""
