"""Quantized ONNX: export the dequantized float graph with `export_onnx`, then rewrite each
`MatMul(x, W)` whose initializer W belongs to an int8 / int4 weight-only module into ONNX
Runtime's `com.microsoft::MatMulNBits` carrying the *same* codes and scales as the PyTorch
quantized model. With accuracy_level=0 the two agree up to float rounding; the default (4) lets
ORT's CPU kernel round the activations to int8 blocks too (its fast path), which moves logits by
~1e-2 relative on the demo models (`verify`'s int8 / int4 rows allow for it). The export checks
the rewritten graph itself against the quantized model, first at level 0 (to fp32's 1e-4: the
layout is exact), then at the level it keeps (LEVEL_TOLERANCE). This is the one
non-standard op the project allows, and it lives only in this separate quantized graph, which
`export_onnx` (and `mamba-deploy export onnx`) writes when given a quantized checkpoint.

MatMulNBits layout (ORT contrib op): B uint8 [N, K/block, block*bits/8], codes unsigned,
low nibble first; scales float [N * K/block]; zero_points uint8 packed [N, ceil(K/block*bits/8)]
(default 2^(bits-1) when absent); weight = (code - zero) * scale.
Formats not expressible this way (w8a8, fp8, fp16) keep a float MatMul with dequantized weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import atomic_dir, output_path
from ..errors import ExportError, QuantizationError
from ..export.onnx_meta import set_weights_label, weights_label
from .formats import unpack_int4

NBITS_FORMATS = {"int8": 8, "int4": 4}
BLOCKS = (256, 128, 64, 32, 16)  # block sizes ORT's MatMulNBits CPU kernel accepts
ACCURACY_LEVEL = 4  # let ORT's CPU kernel quantize activations to int8 (its fast path); 0 = fp32
# ORT's compute type per accuracy level (0 unset = fp32, 1 fp32, 2 fp16, 3 bf16, 4 int8) -> the
# logits / state error allowed against the PyTorch quantized model. Level 0 is checked first at
# fp32's 1e-4: it proves codes, scales and zero points were laid out right, so the looser check
# at the chosen level only measures ORT's activation rounding (~1e-2 at level 4 on the demo models).
LEVEL_TOLERANCE = {0: 1e-4, 1: 1e-4, 2: 1e-2, 3: 3e-2, 4: 5e-2}


def export_quantized_onnx(qmodel_or_path, out_dir, validate: bool = True,
                          accuracy_level: int = ACCURACY_LEVEL, scan_chunk: int = 1) -> Path:
    """A quantized model (or checkpoint folder) -> ONNX folder with MatMulNBits layers.
    scan_chunk: as for export_onnx (Mamba1's prefill Scan over chunks of Q tokens); the rewrite
    only touches MatMuls against weights, never the Scan body's, so it applies unchanged."""
    from ..checkpoint import load_model
    from ..export.onnx import export_onnx, torch_reference

    if isinstance(accuracy_level, bool) or accuracy_level not in LEVEL_TOLERANCE:  # True == 1
        raise ExportError(f"accuracy_level {accuracy_level!r} is not one of ORT's MatMulNBits levels "
                          f"{sorted(LEVEL_TOLERANCE)}; use 0 (fp32) or 4 (int8 activations, the default)")
    qmodel = qmodel_or_path if isinstance(qmodel_or_path, torch.nn.Module) else load_model(qmodel_or_path)
    qc = getattr(qmodel, "quantization_config", None)
    if not qc:
        raise QuantizationError("export_quantized_onnx needs a quantized model; run quantize() first")
    out_dir = output_path(out_dir)
    with atomic_dir(out_dir, ExportError) as tmp:
        twin = _dequantized_copy(qmodel)  # the quantized model's function, in float weights
        folder = export_onnx(twin, tmp / "onnx", validate=False, scan_chunk=scan_chunk)  # checked below, once rewritten
        report = rewrite(folder / "model.onnx", qmodel, 0)
        report["accuracy_level"] = 0
        _warn_kept_float(report)
        # PyTorch's outputs once for both levels; the twin is then freed rather than held beside
        # ONNX Runtime's sessions (~2x the weights each), and rebuilt only for a float64 check
        reference = torch_reference(folder, twin) if validate else None
        del twin
        if validate:
            _update_manifest(folder, qc, report)  # the runner checks the graph's hash against it
            report["validation"] = {"accuracy_level_0": _validate(folder, reference, qmodel, 0)}
        if accuracy_level:
            set_accuracy_level(folder / "model.onnx", accuracy_level)
            report["accuracy_level"] = accuracy_level
            if validate:
                _update_manifest(folder, qc, report)
                report["validation"][f"accuracy_level_{accuracy_level}"] = _validate(folder, reference, qmodel,
                                                                                    accuracy_level)
        # the files were hashed for the last validation, if any, and have not changed since
        _update_manifest(folder, qc, report, rehash=not validate)
        for f in folder.iterdir():
            f.rename(tmp / f.name)
        folder.rmdir()
    return Path(out_dir)


def _warn_kept_float(report: dict) -> None:
    """Said, not only recorded in manifest.json: a SmoothQuant / FP8 checkpoint exported silently
    as a graph of float32 weights, twice the int4 export's size and no faster than a float one."""
    kept = report["kept_float"]
    if kept:
        import collections
        import warnings

        reasons = "; ".join(f"{n} x {why}" for why, n in collections.Counter(kept.values()).items())
        warnings.warn(f"{len(kept)} of {len(kept) + len(report['rewritten'])} quantized linear layers stay float32 in "
                      f"the ONNX graph (their dequantized weights): {reasons}. For MatMulNBits layers, quantize "
                      f"with --method int8, int4, gptq or awq (group sizes {', '.join(map(str, sorted(BLOCKS)))})",
                      stacklevel=3)


def _validate(folder: Path, reference: tuple, qmodel, level: int) -> float:
    """The rewritten graph against the quantized model (`reference`: torch_reference of its float
    twin, the same dequantized weights) at ORT's accuracy `level`, to LEVEL_TOLERANCE[level];
    ExportError beyond it. Level 0 comes first: to fp32's 1e-4 it proves the codes / scales / zero
    points layout exact, so a later, looser level only measures ORT's activation rounding.
    -> worst relative error."""
    from ..export.onnx import _float_copy, validate_against_reference

    rounds = level >= 2  # levels 0 and 1 compute in fp32: the export's own limit and float64 second opinion
    what = "ORT's activation rounding" if rounds else "fp32 compute"
    float64_twin = lambda: _float_copy(_dequantized_copy(qmodel), torch.float64)  # noqa: E731
    errs = validate_against_reference(folder, reference, "fp32", float64_twin,
                                      tolerance=LEVEL_TOLERANCE[level] if rounds else None,
                                      label=f"MatMulNBits, accuracy_level {level}: {what}")
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


def _dequantized_copy(qmodel):
    """A float MambaLM with every quantized weight replaced by its dequantized value."""
    from ..model import MambaLM

    fp = MambaLM(qmodel.config)
    sd = {}
    for name, mod in qmodel.named_modules():
        if hasattr(mod, "fmt"):
            w = mod.weight.float()
            if getattr(mod, "input_scale", None) is not None:
                w = w * mod.input_scale.float()  # y = (x * s) W^T = x (W diag(s))^T
            sd[name + ".weight"] = w
    for k, v in qmodel.state_dict().items():
        if k.rsplit(".", 1)[-1] in ("qweight", "scales", "zeros", "input_scale"):
            continue
        sd[k] = v.float()
    missing, unexpected = fp.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if qmodel.config.tie_embeddings else set()
    assert not unexpected and set(missing) <= tied, (missing, unexpected)  # internal: every weight mapped
    fp.source_path = getattr(qmodel, "source_path", None)
    fp.gguf_path = getattr(qmodel, "gguf_path", None)  # checkpoint.tokenizer_source
    return fp.eval()


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


def rewrite(onnx_path: Path, qmodel, accuracy_level: int = ACCURACY_LEVEL) -> dict:
    """In place: MatMul(x, '<module>.weight') -> [Mul(x, input_scale)] -> MatMulNBits, in the
    graph and every subgraph (the If branches of our export both use the top-level weights).
    Returns {'rewritten': [...], 'kept_float': {module: reason}}."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path))
    top = model.graph
    graphs = _graphs_children_first(top)
    inits = {t.name: t for t in top.initializer}
    consumers: dict[str, int] = {}
    for g in graphs:
        for n in g.node:
            for i in n.input:
                consumers[i] = consumers.get(i, 0) + 1
    report = {"rewritten": [], "kept_float": {}}
    for g in graphs:  # children first: extend() below copies a node together with its subgraphs
        new_nodes = []
        for node in g.node:
            key = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
            mod_name = key[: -len(".weight")] if key and key.endswith(".weight") and key in inits else None
            spec = qmodel.quantization_config["modules"].get(mod_name) if mod_name else None
            t = nbits_tensors(qmodel.get_submodule(mod_name)) if spec is not None else None
            if spec is not None and t is None:
                report["kept_float"][mod_name] = f"format {spec['format']} / group {spec.get('group_size')} has no MatMulNBits form"
            if t is None:
                new_nodes.append(node)
                continue
            new_nodes += _nbits_nodes(node, qmodel.get_submodule(mod_name), mod_name, t, top, accuracy_level)
            consumers[key] -= 1
            if consumers[key] == 0:
                top.initializer.remove(inits[key])
            if mod_name not in report["rewritten"]:
                report["rewritten"].append(mod_name)
        del g.node[:]
        g.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    set_weights_label(model, weights_label({"quantization": qmodel.quantization_config}))  # as the manifest will say
    tmp = onnx_path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(onnx_path)
    return report


def _graphs_children_first(graph) -> list:
    """graph and all its subgraphs (If branches, Scan bodies), every subgraph before its parent."""
    out = []
    for n in graph.node:
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out += _graphs_children_first(sub)
    return out + [graph]


def _nbits_nodes(node, mod, mod_name: str, t: dict, top, accuracy_level: int) -> list:
    """[Mul(x, input_scale)], MatMulNBits replacing `node`; the quantized tensors become
    top-level initializers (once, however many branches use the module)."""
    from onnx import helper, numpy_helper

    have = {i.name for i in top.initializer}

    def add(name, array):
        if name not in have:
            top.initializer.append(numpy_helper.from_array(array, name))
            have.add(name)

    nodes, x = [], node.input[0]
    if getattr(mod, "input_scale", None) is not None:
        add(mod_name + ".input_scale", mod.input_scale.float().numpy())
        scaled = f"{x}_scaled_{mod_name}"
        nodes.append(helper.make_node("Mul", [x, mod_name + ".input_scale"], [scaled], name=f"{node.name}.scale"))
        x = scaled
    ins = [x, mod_name + ".qweight", mod_name + ".scales"]
    add(ins[1], t["B"])
    add(ins[2], t["scales"])
    if t["zp"] is not None:
        ins.append(mod_name + ".zeros")
        add(ins[3], t["zp"])
    nodes.append(helper.make_node("MatMulNBits", ins, list(node.output), name=f"{node.name}.nbits",
                                  domain="com.microsoft", K=t["K"], N=t["N"], bits=t["bits"],
                                  block_size=t["block"], accuracy_level=accuracy_level))
    return nodes


def _update_manifest(folder: Path, qc: dict, report: dict, rehash: bool = True) -> None:
    """The quantization report into manifest.json; with `rehash`, the sizes and hashes of the
    graph files too (a full read of the weights: only after the graph changed)."""
    from ..export.onnx import _sha256

    m = json.loads((folder / "manifest.json").read_text())
    if rehash:
        m["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                      for p in sorted(folder.iterdir()) if p.name.startswith("model.onnx")}
    m["quantization"] = {"method": qc["method"], "op": "com.microsoft::MatMulNBits", **report}
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(m, indent=2))
    tmp.replace(folder / "manifest.json")
