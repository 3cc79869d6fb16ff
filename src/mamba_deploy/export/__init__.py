"""Exporters: one module per format (onnx, gguf); each writes atomically and validates."""

from __future__ import annotations

import os

# weight types whose values are exactly float32's: anything else was rounded before an export
EXACT_TYPES = ("fp32", "f32", "all_f32")


def source_weights(model) -> str | None:
    """The weight type of a model loaded from a GGUF when it is not float32 (q8_0, f16, ...), or
    the one a checkpoint converted from such a GGUF records (config.json source_weights), else
    None. Exports of such a model (ONNX, `convert`) hold its dequantized values and record this
    type, so that verify holds them to that type's limits, not fp32's. Here, not in gguf_import:
    an ONNX export or `convert` of any other checkpoint must not need the gguf package."""
    if getattr(model, "gguf_path", None) is None:
        return getattr(model, "source_weights", None)
    from .gguf_import import weights_label

    label = weights_label(model.gguf_path)
    return None if label in EXACT_TYPES else label


def as_model(model_or_path, **load_options):
    """A MambaLM, or a checkpoint path / hub id / .gguf loaded with load_model(**load_options). Any
    other module or object is an ExportError: its missing .config would fail deep in the export."""
    from ..errors import ExportError
    from ..model import MambaLM

    if isinstance(model_or_path, MambaLM):
        from ..tp import refuse_sharded

        refuse_sharded(model_or_path, "exporting", "export the checkpoint in one process (without torchrun)",
                       ExportError)
        return model_or_path
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise ExportError(f"export takes a mamba_deploy model (mamba_deploy.load_model(path)) or a checkpoint path, "
                          f"got {type(model_or_path).__name__} {model_or_path!r:.60}")
    from ..checkpoint import load_model

    return load_model(model_or_path, **load_options)
