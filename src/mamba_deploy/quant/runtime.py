"""Load a quantized checkpoint: build the float model, swap the modules named in
`quantization_config.modules` for their quantized twins, then load every tensor, checking names,
shapes and dtypes (nothing is inferred from the file)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError, ExportError
from . import formats
from .modules import QuantEmbedding, QuantLinear, tie_head
from .plan import validate_config

ZERO_MAX = formats.qrange(4, False)[1]  # stored zero points exist for asymmetric int4 only


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
    names = saved_names(model)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in names}


def saved_names(model) -> set:
    """The names of the tensors a quantized checkpoint of `model` stores (tied copies once)."""
    skip = set()
    if tied_quant_head(model):
        skip = {f"lm_head.{k}" for k in model.lm_head.stored()}
    elif model.config.tie_embeddings and not isinstance(model.backbone.embeddings, QuantEmbedding):
        skip = {"lm_head.weight"}
    return set(model.state_dict()) - skip


def load_quantized(path, cfg, quantization_config: dict, device="cpu", dtype=torch.float32):
    path = Path(path)
    # first on the meta device against the file headers: a config.json whose sizes were edited
    # fails on names / shapes / dtypes before a model of those sizes is allocated
    meta = _quantized_model(path, cfg, quantization_config, dtype)
    _fill(meta, path, "meta", shapes_only=True)
    # then allocated on `device`, not initialised (a random init of real memory is seconds for
    # billions of weights): _fill writes every tensor the checkpoint stores, and the tied copies
    # it does not store are re-tied to them here
    model = _quantized_model(path, cfg, meta.quantization_config, dtype).to_empty(device=device)
    _retie(model)
    _fill(model, path, device)
    model.source_path = path
    return model.eval()


def _retie(model) -> None:
    """to_empty gives tied modules a tensor each: point them back at one (what _fill writes)."""
    if tied_quant_head(model):
        tie_head(model.lm_head, model.backbone.embeddings)
    elif model.config.tie_embeddings and not isinstance(model.backbone.embeddings, QuantEmbedding) \
            and not isinstance(model.lm_head, QuantLinear):
        model.lm_head.weight = model.backbone.embeddings.weight


def _quantized_model(path: Path, cfg, quantization_config: dict, dtype):
    """MambaLM(cfg) on the meta device (nothing allocated) with the modules `quantization_config`
    names swapped for empty quantized ones; the validated config is kept as
    `model.quantization_config`."""
    from ..model import MambaLM

    with torch.device("meta"):
        model = MambaLM(cfg).to(dtype)
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    qc = validate_config(quantization_config, {n for n, _ in model.named_modules()}, layers)
    for name, spec in qc["modules"].items():
        mod = model.get_submodule(name)
        width = mod.embedding_dim if isinstance(mod, nn.Embedding) else mod.in_features  # one quantized row
        gs = spec.get("group_size")
        if spec["format"] == "int4" and (width % gs or width % 2):
            raise CheckpointError(f"{path}: quantization_config gives {name} group_size {gs}, which does not divide "
                                  f"its row length {width} (or the row is odd); the config.json was edited or does "
                                  "not belong to these weights: re-create it with `mamba-deploy quantize`")
        with torch.device("meta"):
            set_module(model, name, make_module(mod, spec, dtype))
    if tied_quant_head(model):
        if qc["modules"].get("lm_head") != qc["modules"].get("backbone.embeddings"):
            raise CheckpointError(f"{path}: tied lm_head and embeddings have different quantization specs")
        tie_head(model.lm_head, model.backbone.embeddings)
    model.quantization_config = qc
    return model


def _fill(model, path: Path, device, shapes_only: bool = False) -> None:
    """Load the checkpoint's tensors into `model` (shapes_only: check names, shapes and dtypes
    against the file headers only); CheckpointError listing what does not match."""
    from ..checkpoint import WEIGHT_DTYPES, all_finite, iter_tensors

    want = model.state_dict()
    expected = saved_names(model)
    seen, problems = set(), []
    for k, t in iter_tensors(path, shapes_only):
        if k not in expected:
            problems.append(f"unexpected tensor {k}")
            continue
        dst = want[k]
        seen.add(k)  # present: a wrong shape / dtype is reported as such, not also as missing
        # stored codes must be exactly their dtype; float tensors (scales, norms, biases) any float
        float_ok = t.dtype in WEIGHT_DTYPES if dst.dtype in WEIGHT_DTYPES else t.dtype == dst.dtype
        if tuple(t.shape) != tuple(dst.shape) or not float_ok:
            problems.append(f"{k}: file {tuple(t.shape)} {t.dtype} vs expected {tuple(dst.shape)} {dst.dtype}")
            continue
        if shapes_only:
            continue
        if t.is_floating_point() and not all_finite(t, as_float=True):
            problems.append(f"{k} has NaN or infinite values (a corrupt file)")
            continue
        if k.endswith(".zeros") and t.numel() and int(t.max()) > ZERO_MAX:  # MatMulNBits packs them in nibbles
            problems.append(f"{k} holds zero points up to {int(t.max())}, outside int4's 0..{ZERO_MAX} (a corrupt file)")
            continue
        with torch.no_grad():
            dst.copy_(t.to(device=device, dtype=dst.dtype) if dst.is_floating_point() else t.to(device))
        if dst.dtype in WEIGHT_DTYPES and not all_finite(dst):
            problems.append(f"{k} has values beyond {str(dst.dtype).removeprefix('torch.')}'s range (load the "
                            "model in float32 or bfloat16)")
    missing = sorted(expected - seen)
    if missing:
        problems.append(f"missing tensors {missing[:6]}")
    if problems:
        raise CheckpointError(f"quantized checkpoint {path} does not match its quantization_config: "
                              + "; ".join(problems[:8]) + ". Re-create it with `mamba-deploy quantize`.")
