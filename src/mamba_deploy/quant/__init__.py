"""Quantization: offline `quantize(model, method, **options)` swaps quantized modules in,
`save_quantized(model, out_dir)` writes a checkpoint that `load_model(out_dir)` loads back
(through `runtime.load_quantized`). Methods and formats are tables in plan.py / formats.py."""

from .plan import METHODS
from .quantizer import quantize, save_quantized

__all__ = ["METHODS", "quantize", "save_quantized"]
