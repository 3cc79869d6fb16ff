"""Load a quantized checkpoint: build the float model, swap the modules named in
`quantization_config.modules` for their quantized twins, then load every tensor, checking names,
shapes and dtypes (nothing is inferred from the file)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError, ExportError
from .modules import QuantEmbedding, QuantLinear, tie_head
from .plan import validate_config


def refuse_quantized(model: nn.Module, action: str, fix: str, error=ExportError) -> None:
    """Raise `error` when `model` was loaded from a quantized checkpoint: paths that read float
    weights (re-saving, GGUF, the standard ONNX graph) would otherwise fail on a missing key."""
    qc = getattr(model, "quantization_config", None)
    if qc:
        src = getattr(model, "source_path", None)
        where = src or "this model"
        if getattr(model, "quantized_in_memory", False):  # src, if any, holds the float checkpoint
            where = "this model (quantized in memory" + (f" from {src})" if src else ")")
        raise error(f"{where} is quantized (method {qc.get('method', '?')!r}); {action} needs the float "
                    f"model: {fix}")


def make_module(old: nn.Module, spec: dict, compute_dtype) -> nn.Module:
    """An empty quantized module with the shapes `spec` implies for `old`."""
    common = dict(group_size=spec.get("group_size"), symmetric=spec.get("symmetric", True),
                  fp8_scaling=spec.get("fp8_scaling", "channel"))
    if isinstance(old, nn.Embedding):
        return QuantEmbedding(old.num_embeddings, old.embedding_dim, spec["format"], compute_dtype=compute_dtype,
                              **common)
    return QuantLinear(old.in_features, old.out_features, spec["format"], bias=old.bias is not None,
                       input_scale=bool(spec.get("input_scale")), compute_dtype=compute_dtype, **common)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def tied_quant_head(model) -> bool:
    """Tied embeddings quantized together: lm_head has no tensors of its own."""
    return (model.config.tie_embeddings and isinstance(model.lm_head, QuantLinear)
            and isinstance(model.backbone.embeddings, QuantEmbedding))


def saved_tensors(model) -> dict:
    """name -> CPU tensor for everything a quantized checkpoint stores (tied copies once)."""
    skip = set()
    if tied_quant_head(model):
        skip = {f"lm_head.{k}" for k in model.lm_head.stored()}
    elif model.config.tie_embeddings and not isinstance(model.backbone.embeddings, QuantEmbedding):
        skip = {"lm_head.weight"}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in skip}


def load_quantized(path, cfg, quantization_config: dict, device="cpu", dtype=torch.float32):
    from ..checkpoint import iter_tensors
    from ..model import MambaLM

    path = Path(path)
    with torch.device(device):
        model = MambaLM(cfg).to(dtype)
    qc = validate_config(quantization_config, {n for n, _ in model.named_modules()})
    for name, spec in qc["modules"].items():
        mod = model.get_submodule(name)
        width = mod.embedding_dim if isinstance(mod, nn.Embedding) else mod.in_features  # one quantized row
        gs = spec.get("group_size")
        if spec["format"] == "int4" and (width % gs or width % 2):
            raise CheckpointError(f"{path}: quantization_config gives {name} group_size {gs}, which does not divide "
                                  f"its row length {width} (or the row is odd); the config.json was edited or does "
                                  "not belong to these weights: re-create it with `mamba-deploy quantize`")
        set_module(model, name, make_module(mod, spec, dtype).to(device))
    if tied_quant_head(model):
        if qc["modules"].get("lm_head") != qc["modules"].get("backbone.embeddings"):
            raise CheckpointError(f"{path}: tied lm_head and embeddings have different quantization specs")
        tie_head(model.lm_head, model.backbone.embeddings)
    want = model.state_dict()
    expected = set(saved_tensors(model))
    seen, problems = set(), []
    for k, t in iter_tensors(path):
        if k not in expected:
            problems.append(f"unexpected tensor {k}")
            continue
        dst = want[k]
        if tuple(t.shape) != tuple(dst.shape) or (not dst.is_floating_point() and t.dtype != dst.dtype) \
                or (dst.dtype == torch.float8_e4m3fn and t.dtype != dst.dtype):
            problems.append(f"{k}: file {tuple(t.shape)} {t.dtype} vs expected {tuple(dst.shape)} {dst.dtype}")
            continue
        if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            problems.append(f"{k} has NaN or infinite values (a corrupt file)")
            seen.add(k)
            continue
        with torch.no_grad():
            dst.copy_(t.to(device=device, dtype=dst.dtype) if dst.is_floating_point() else t.to(device))
        seen.add(k)
    missing = sorted(expected - seen)
    if missing:
        problems.append(f"missing tensors {missing[:6]}")
    if problems:
        raise CheckpointError(f"quantized checkpoint {path} does not match its quantization_config: "
                              + "; ".join(problems[:8]) + ". Re-create it with `mamba-deploy quantize`.")
    model.source_path = path
    model.quantization_config = qc
    return model.eval()
