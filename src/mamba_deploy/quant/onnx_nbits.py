"""Quantized ONNX: the graph of `onnx_graph.MambaGraph`, built from the quantized model itself,
with each int8 / int4 weight-only linear layer written as ONNX Runtime's
`com.microsoft::MatMulNBits` carrying the *same* codes and scales as the PyTorch quantized model
(`NBitsLinears`, MambaGraph's linear hook). With accuracy_level=0 the two agree up to float
rounding; the default (4) lets ORT's CPU kernel round the activations to int8 blocks too (its
fast path), which moves logits by ~1e-2 relative on the demo models (`verify`'s int8 / int4 rows
allow for it). The export checks the graph against the quantized model, first at level 0 (to
fp32's 1e-4: the layout is exact), then at the level it keeps (LEVEL_TOLERANCE). This is the one
non-standard op the project allows, and it lives only in this separate quantized graph, which
`export_onnx` (and `mamba-deploy export onnx`) writes when given a quantized checkpoint.

MatMulNBits layout (ORT contrib op): B uint8 [N, K/block, block*bits/8], codes unsigned,
low nibble first; scales float [N * K/block]; zero_points uint8 packed [N, ceil(K/block*bits/8)]
(default 2^(bits-1) when absent); weight = (code - zero) * scale.
Formats not expressible this way (w8a8, fp8, fp16) keep a float MatMul with dequantized weights
(W8A8's per-token activation rounding is not in the graph: ~1e-2 from the PyTorch W8A8 model).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_dir, output_path
from ..errors import ExportError, QuantizationError
from ..export.onnx_meta import GRAPH_FILE, MANIFEST_FILE, node_subgraphs, weights_label
from .formats import codes_digest, unpack_int4
from .modules import QuantEmbedding, QuantLinear
from .plan import module_formats

NBITS_FORMATS = {"int8": 8, "int4": 4}
NBITS_DOMAIN = "com.microsoft"
BLOCKS = (256, 128, 64, 32, 16)  # block sizes ORT's MatMulNBits CPU kernel accepts
ACCURACY_LEVEL = 4  # let ORT's CPU kernel quantize activations to int8 (its fast path); 0 = fp32
# ORT's compute type per accuracy level (0 unset = fp32, 1 fp32, 2 fp16, 3 bf16, 4 int8) -> the
# logits / state error allowed against the PyTorch quantized model. Level 0 is checked first at
# fp32's 1e-4: it proves codes, scales and zero points were laid out right, so the looser check
# at the chosen level only measures ORT's activation rounding (~1e-2 at level 4 on the demo models).
LEVEL_TOLERANCE = {0: 1e-4, 1: 1e-4, 2: 1e-2, 3: 3e-2, 4: 5e-2}
ROUNDING = {2: "fp16", 3: "bf16", 4: "int8 blocks"}  # what each level rounds the activations to
# verify's tolerance row for an export against the very checkpoint it came from (manifest
# "codes_sha256" equal to the checkpoint's): the activation rounding of each level, nothing else
LEVEL_ROW = {0: "fp32", 1: "fp32", 2: "fp16", 3: "bf16", 4: "int8"}


def export_quantized_onnx(qmodel_or_path, out_dir, validate: bool = True,
                          accuracy_level: int = ACCURACY_LEVEL, scan_chunk: int = 1) -> Path:
    """A quantized model (or checkpoint folder) -> ONNX folder with MatMulNBits layers.
    scan_chunk: as for export_onnx (Mamba1's prefill Scan over chunks of Q tokens); only linear
    layers become MatMulNBits, never the Scan body's products, so it applies unchanged.

    The graph is built from the quantized model itself: each layer's codes go straight into its
    MatMulNBits, and a layer kept in float is dequantized when the graph reaches it, so no float
    copy of the model exists (the float twin exported and rewritten before held 5.1 GB for a
    472 MB int4 checkpoint). The reference is the quantized model computing with its dequantized
    weights (`_float_function`), not a copy of it, so a wrong copy cannot hide a wrong graph."""
    from onnx import helper

    from ..checkpoint import load_model, saved_source_weights
    from ..tokenizer_files import tokenizer_source, write_tokenizer_files
    from .runtime import saved_names
    from ..export.onnx import (ALLOWED_OPS, DEFAULT_OPSET, _save, check_graph, streamed_weights, torch_reference,
                               write_manifest)
    from ..export.onnx_graph import MambaGraph
    from ..runners.base import release_freed_memory

    if isinstance(accuracy_level, bool) or accuracy_level not in LEVEL_TOLERANCE:  # True == 1
        raise ExportError(f"accuracy_level {accuracy_level!r} is not one of ORT's MatMulNBits levels "
                          f"{sorted(LEVEL_TOLERANCE)}; use 0 (fp32) or 4 (int8 activations, the default)")
    qmodel = qmodel_or_path if isinstance(qmodel_or_path, torch.nn.Module) else load_model(qmodel_or_path)
    qc = getattr(qmodel, "quantization_config", None)
    if not qc:
        raise QuantizationError("export_quantized_onnx needs a quantized model; run quantize() first")
    out_dir = output_path(out_dir)
    state = qmodel.state_dict()
    # what the checkpoint stores (a tied lm_head's codes once), so the digest equals the folder's
    stored = saved_names(qmodel)
    codes = codes_digest((k, v) for k, v in state.items() if k in stored)
    reference = None
    if validate:  # PyTorch's outputs once, for every level checked
        with _float_function(qmodel):
            reference = torch_reference(None, qmodel, scan_chunk=scan_chunk)
    with atomic_dir(out_dir, ExportError) as tmp:
        linears = NBitsLinears(qmodel)
        # an upper bound of the graph's bytes: a layer kept float (no MatMulNBits form) is written as
        # float32 dequantized weights, 4 bytes per value, and a packed int4 byte holds two values
        nbytes = sum(t.numel() * (4 if t.is_floating_point() else 8) for t in state.values())
        with streamed_weights(tmp, nbytes) as ext:
            proto = MambaGraph(graph_config(qmodel), FloatWeights(qmodel), np.float32, DEFAULT_OPSET,
                               scan_chunk=scan_chunk, linear_hook=linears, external=ext).build()
        proto.opset_import.append(helper.make_opsetid(NBITS_DOMAIN, 1))
        _save(proto, tmp, label=weights_label({"quantization": qc}))  # as the manifest will say
        del proto
        release_freed_memory()
        check_graph(tmp / GRAPH_FILE, allowed=ALLOWED_OPS | {f"{NBITS_DOMAIN}::MatMulNBits"})
        write_tokenizer_files(tokenizer_source(qmodel), tmp, out_dir)
        # a checkpoint quantized from a quantized GGUF holds that type's rounding too (verify's limits)
        write_manifest(tmp, qmodel.config, DEFAULT_OPSET, "fp32", scan_chunk=scan_chunk,
                       source_weights=saved_source_weights(qmodel))
        report = {**linears.report, "accuracy_level": 0}
        _warn_kept_float(report)
        if validate:
            _update_manifest(tmp, qc, report, codes)  # the runner checks the graph's hash against it
            report["validation"] = {"accuracy_level_0": _validate(tmp, reference, qmodel, 0)}
        if accuracy_level and linears.report["rewritten"]:  # no MatMulNBits (all kept float): no level to set
            set_accuracy_level(tmp / GRAPH_FILE, accuracy_level)
            report["accuracy_level"] = accuracy_level
            if validate:
                _update_manifest(tmp, qc, report, codes)
                report["validation"][f"accuracy_level_{accuracy_level}"] = _validate(tmp, reference, qmodel,
                                                                                    accuracy_level)
        # the files were hashed for the last validation, if any, and have not changed since
        _update_manifest(tmp, qc, report, codes, rehash=not validate)
    return Path(out_dir)


def _warn_kept_float(report: dict) -> None:
    """Said, not only recorded in manifest.json: a SmoothQuant / FP8 checkpoint exported silently
    as a graph of float32 weights, twice the int4 export's size and no faster than a float one."""
    kept = report["kept_float"]
    if kept:
        import collections
        import warnings

        reasons = "; ".join(f"{n} x {why}" for why, n in collections.Counter(kept.values()).items())
        fixable = any(not why.startswith("int8 rows") for why in kept.values())  # a row length is the model's
        advice = (f". For MatMulNBits layers, quantize with --method int8, int4, gptq or awq (group sizes "
                  f"{', '.join(map(str, sorted(BLOCKS)))})" if fixable else "")
        warnings.warn(f"{len(kept)} of {len(kept) + len(report['rewritten'])} quantized linear layers stay float32 in "
                      f"the ONNX graph (their dequantized weights): {reasons}{advice}", stacklevel=3)


def _validate(folder: Path, reference: tuple, qmodel, level: int) -> float:
    """The graph against the quantized model (`reference`: torch_reference of it computing with its
    dequantized weights) at ORT's accuracy `level`, to LEVEL_TOLERANCE[level]; ExportError beyond
    it, which at a rounding level names level 0 (a deep random model amplified level 4's int8
    activations to 0.7 relative, where level 0 passed). Level 0 comes first: to fp32's 1e-4 it
    proves the codes / scales / zero points layout exact, so a later, looser level only measures
    ORT's activation rounding. -> worst relative error."""
    from ..export.onnx import validate_against_reference

    rounds = level >= 2  # levels 0 and 1 compute in fp32: the export's own limit and float64 second opinion
    what = "ORT's activation rounding" if rounds else "fp32 compute"
    float64_twin = lambda: _dequantized_copy(qmodel, torch.float64)  # noqa: E731
    try:
        errs = validate_against_reference(folder, reference, "fp32", float64_twin,
                                          tolerance=LEVEL_TOLERANCE[level] if rounds else None,
                                          label=f"MatMulNBits, accuracy_level {level}: {what}")
    except ExportError as e:
        if not rounds:
            raise
        raise ExportError(f"{e}, at accuracy_level {level}: ONNX Runtime rounds this model's activations to "
                          f"{ROUNDING[level]} beyond what it tolerates (accuracy_level 0 passed). Export with "
                          "--accuracy-level 0 (fp32 activations; accuracy_level=0 in Python)") from e
    return max(errs.values())


def set_accuracy_level(onnx_path: Path, level: int) -> None:
    """In place: every MatMulNBits node (subgraphs too) computes at `level`. The weights stay
    where they are (external data is not loaded, so they are not rewritten)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    for g in _graphs_children_first(model.graph):
        for n in g.node:
            if n.op_type == "MatMulNBits":
                kept = [a for a in n.attribute if a.name != "accuracy_level"]
                del n.attribute[:]
                n.attribute.extend(kept + [helper.make_attribute("accuracy_level", level)])
    tmp = onnx_path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(onnx_path)


def graph_config(qmodel):
    """The config the graph (and a float copy) is built with: untied where the quantized model's
    embeddings and lm_head no longer share one float matrix (either is quantized: a tied model
    with only lm_head quantized looked its tokens up in the dequantized lm_head before)."""
    cfg = qmodel.config
    quantized = isinstance(qmodel.lm_head, QuantLinear) or isinstance(qmodel.backbone.embeddings, QuantEmbedding)
    return cfg.replace(tie_embeddings=False) if cfg.tie_embeddings and quantized else cfg


class FloatWeights(Mapping):
    """Checkpoint key -> float tensor, as MambaGraph reads a float model's state dict, for a
    quantized model: a quantized module's '<name>.weight' is its dequantized weight (times its
    SmoothQuant input_scale: (x * s) W^T = x (W diag(s))^T), made only when asked for."""

    def __init__(self, qmodel):
        self.sd = qmodel.state_dict()  # references to the model's tensors (a float lm_head's too), no copies
        self.quant = {n: m for n, m in qmodel.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}

    def _module(self, key: str):
        return self.quant.get(key[: -len(".weight")]) if key.endswith(".weight") else None

    def __getitem__(self, key: str) -> torch.Tensor:
        mod = self._module(key)
        if mod is None:
            return self.sd[key]
        w = mod.weight.float()
        scale = getattr(mod, "input_scale", None)
        return w * scale.float() if scale is not None else w

    def __contains__(self, key) -> bool:
        return key in self.sd or self._module(key) is not None

    def _keys(self) -> set:
        return set(self.sd) | {n + ".weight" for n in self.quant}

    def __iter__(self):
        return iter(sorted(self._keys()))

    def __len__(self) -> int:
        return len(self._keys())


class NBitsLinears:
    """MambaGraph's linear_hook: a quantized layer whose format MatMulNBits expresses becomes
    [Mul(x, input_scale)] -> MatMulNBits on its own codes (top-level initializers, written once
    however many branches use them); any other layer is left to the plain MatMul (None), which
    reads its dequantized weight from FloatWeights. `report`: what was rewritten and why not."""

    def __init__(self, qmodel):
        self.qmodel, self.specs = qmodel, qmodel.quantization_config["modules"]
        self.report: dict = {"rewritten": [], "kept_float": {}}
        self._attrs: dict[str, dict] = {}  # module -> its node's attributes, once its tensors are in

    def __call__(self, graph, x: str, key: str, out: str | None):
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        spec = self.specs.get(name) if name else None
        if spec is None or name in self.report["kept_float"]:
            return None
        mod = self.qmodel.get_submodule(name)
        if name not in self._attrs and not self._add_tensors(graph, mod, name, spec):
            return None
        g, ins = graph.g, [x, name + ".qweight", name + ".scales"]
        if "zp" in self._attrs[name]:
            ins.append(name + ".zeros")
        if getattr(mod, "input_scale", None) is not None:
            ins[0] = g.op("Mul", x, name + ".input_scale")
        attrs = {k: v for k, v in self._attrs[name].items() if k != "zp"}
        if out:
            return g.op_to(out, "MatMulNBits", *ins, domain=NBITS_DOMAIN, **attrs)
        return g.op("MatMulNBits", *ins, domain=NBITS_DOMAIN, **attrs)

    def _add_tensors(self, graph, mod, name: str, spec: dict) -> bool:
        t = nbits_tensors(mod)
        if t is None:
            self.report["kept_float"][name] = kept_float_reason(mod)
            return False
        for suffix, array in (("qweight", t["B"]), ("scales", t["scales"]), ("zeros", t["zp"])):
            if array is not None:
                graph.weight(f"{name}.{suffix}", lambda a=array: a)
        if getattr(mod, "input_scale", None) is not None:
            graph.weight(name + ".input_scale", lambda: mod.input_scale.float().numpy())
        self._attrs[name] = dict(K=t["K"], N=t["N"], bits=t["bits"], block_size=t["block"], accuracy_level=0,
                                 **({"zp": True} if t["zp"] is not None else {}))
        self.report["rewritten"].append(name)
        return True


@contextlib.contextmanager
def _float_function(qmodel):
    """Within: every quantized linear layer computes (x * input_scale) @ dequantized(W)^T + bias
    in float32, the function the graph's float layers and (at accuracy level 0) its MatMulNBits
    compute. W8A8's per-token activation rounding, which no ONNX layer here does, is left out."""
    mods = [m for m in qmodel.modules() if isinstance(m, QuantLinear)]

    def float_forward(mod):
        def forward(x):
            if mod.input_scale is not None:
                x = x * mod.input_scale.to(x.dtype)
            bias = None if mod.bias is None else mod.bias.to(x.dtype)
            return F.linear(x, mod.weight.to(x.dtype), bias)
        return forward

    for m in mods:
        m.forward = float_forward(m)
    try:
        yield qmodel
    finally:
        for m in mods:
            del m.forward


def _dequantized_copy(qmodel, dtype=torch.float32):
    """A float MambaLM computing what the graph does (dequantized weights; for the float64 check)."""
    from ..model import MambaLM

    weights = FloatWeights(qmodel)
    fp = MambaLM(graph_config(qmodel)).to(dtype)
    fp.load_state_dict({k: weights[k] for k in fp.state_dict()})  # copy_ casts each tensor to dtype
    return fp.eval()


def kept_float_reason(mod) -> str:
    """Why nbits_tensors has no MatMulNBits form for `mod` (its format, or a block size ORT lacks)."""
    blocks = "/".join(map(str, sorted(BLOCKS)))
    if mod.fmt == "int8":  # per channel: any block dividing the row would do
        return f"int8 rows of {mod.in_features} inputs, which no MatMulNBits block ({blocks}) divides"
    if mod.fmt == "int4":
        return f"int4 group {mod.group_size}, not a MatMulNBits block ({blocks})"
    return f"format {mod.fmt}, which MatMulNBits cannot hold (int8 / int4 only)"


def nbits_tensors(mod) -> dict | None:
    """QuantLinear -> MatMulNBits inputs/attributes, or None when the format cannot be expressed."""
    bits = NBITS_FORMATS.get(mod.fmt)
    N, K = mod.out_features, mod.in_features
    block = mod.group_size
    if bits == 8:  # one scale per row = the same scale repeated over every block of the row
        block = next((b for b in BLOCKS if K % b == 0), 0)
    if bits is None or block not in BLOCKS:
        return None
    nb = K // block
    scales = mod.scales.float().repeat_interleave(nb // mod.scales.shape[1], dim=1).reshape(N * nb).numpy()
    if bits == 8:  # signed per-channel codes -> unsigned with the default zero point 128
        B = (mod.qweight.to(torch.int32) + 128).to(torch.uint8).reshape(N, nb, block).numpy()
        return dict(B=B, scales=scales, zp=None, bits=8, block=block, K=K, N=N)
    if mod.symmetric:  # signed nibbles -> unsigned with the default zero point 8
        codes = unpack_int4(mod.qweight, True) + 8
        packed = ((codes[:, 0::2]) | (codes[:, 1::2] << 4)).to(torch.uint8)
        zp = None
    else:
        packed = mod.qweight
        z = mod.zeros.to(torch.int32)  # (N, nb)
        if nb % 2:
            z = torch.cat([z, torch.zeros(N, 1, dtype=torch.int32)], 1)
        zp = (z[:, 0::2] | (z[:, 1::2] << 4)).to(torch.uint8).reshape(-1).numpy()
    B = packed.reshape(N, nb, block // 2).numpy()
    return dict(B=B, scales=scales, zp=zp, bits=4, block=block, K=K, N=N)


def _graphs_children_first(graph) -> list:
    """graph and all its subgraphs (If branches, Scan bodies), every subgraph before its parent."""
    out = []
    for n in graph.node:
        for sub in node_subgraphs(n):
            out += _graphs_children_first(sub)
    return out + [graph]


def _update_manifest(folder: Path, qc: dict, report: dict, codes: str | None, rehash: bool = True) -> None:
    """The quantization report into manifest.json; with `rehash`, the sizes and hashes of the
    graph files too (a full read of the weights: only after the graph changed)."""
    from ..export.onnx import _sha256

    m = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    if rehash:
        m["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                      for p in sorted(folder.iterdir()) if p.name.startswith(GRAPH_FILE)}
    # formats: verify's row for a mixed-precision export is its lowest-precision format's (as for
    # the checkpoint's config.json); codes_sha256: which checkpoint's codes the graph holds
    m["quantization"] = {"method": qc["method"], "op": "com.microsoft::MatMulNBits",
                         "formats": sorted(module_formats(qc)), "codes_sha256": codes, **report}
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(m, indent=2))
    tmp.replace(folder / MANIFEST_FILE)
