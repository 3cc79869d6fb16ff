"""Exporters: one module per format (onnx, gguf); each writes atomically and validates."""

from __future__ import annotations

# weight types whose values are exactly float32's: anything else was rounded before an export
EXACT_TYPES = ("fp32", "f32", "all_f32")


def source_weights(model) -> str | None:
    """The weight type of a model loaded from a GGUF when it is not float32 (q8_0, f16, ...), else
    None. Exports of such a model (ONNX, `convert`) hold its dequantized values and record this
    type, so that verify holds them to that type's limits, not fp32's. Here, not in gguf_import:
    an ONNX export or `convert` of any other checkpoint must not need the gguf package."""
    if getattr(model, "gguf_path", None) is None:
        return None
    from .gguf_import import weights_label

    label = weights_label(model.gguf_path)
    return None if label in EXACT_TYPES else label
