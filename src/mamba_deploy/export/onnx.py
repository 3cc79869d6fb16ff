"""`mamba-deploy export onnx MODEL OUT_DIR`: one ONNX graph with the recurrent state as inputs and
outputs, serving prefill of any length (from a zero or given state) and one-token decode.

OUT_DIR holds model.onnx (+ model.onnx.data above 2 GB), the tokenizer files and manifest.json.
The graph itself is built in `onnx_graph.py`; this module checks, validates against PyTorch and
writes the folder atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import operator
import os
from pathlib import Path

import numpy as np
import torch

from ..argtypes import check_switch
from ..argtypes import opset as opset_arg
from ..argtypes import scan_chunk as scan_chunk_arg
from ..atomic import atomic_dir, output_path, prepare_output_dir, read_tagged_json, write_json
from ..checkpoint import config_file
from ..config import MambaConfig
from ..errors import BackendUnavailableError, ConfigError, ExportError, ModelNotFoundError
from ..extras import install_hint
from ..progress import Stages, progress_wanted
from ..state import State
from .onnx_meta import (DATA_FILE, GRAPH_FILE, IDS, KEEP, LOGITS, MANIFEST_FILE, MASK, PAST_CONV, PAST_SSM, PRESENT_CONV,
                        PRESENT_SSM, WEIGHTS_KEY, read_metadata, set_weights_label, weights_label)

MANIFEST_VERSION = 1
DEFAULT_OPSET = 17
MIN_OPSET = 14  # Trilu (14) and Split/ReduceSum/Squeeze with tensor arguments (13)
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps a file at 2 GB: weights move to model.onnx.data
DTYPES = {"fp32": np.float32, "fp16": np.float16}
# Standard-domain operators the exported graph may use (TensorRT's ONNX parser supports all of
# them); a test checks the graph against this list, so a new op is a deliberate decision.
ALLOWED_OPS = frozenset({
    "Add", "And", "Cast", "Clip", "Concat", "ConstantOfShape", "CumSum", "Div", "Equal", "Exp", "Expand",
    "Gather", "Greater", "Identity", "If", "Log", "MatMul", "Max", "Min", "Mul", "Pad", "Pow", "Reciprocal", "ReduceMean",
    "ReduceMin", "ReduceSum", "Reshape", "Scan", "Shape", "Sigmoid", "Slice", "Softplus", "Split", "Sqrt", "Squeeze",
    "Sub", "Transpose", "Trilu", "Unsqueeze", "Where",
})
# Validation: max |onnx - torch| / max |torch| per output kind and export dtype. fp16: 3x the
# stated fp16 tolerance (1e-2), since this check runs on every export, of any depth and width,
# and fp16 rounding grows with both; tests/test_onnx.py holds the tiny and demo models to 1e-2
# (measured 3e-4..1.5e-3), a broken graph is off by far more.
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2}
VALIDATE_LENGTHS = (None, 1, 3)  # prefill one chunk + 3 tokens from zero, one decode step, 3 more
VALIDATE_BATCH = 2
FP32_SLACK = 3.0  # fp32 export vs float64 may be this many times PyTorch fp32's own error (see validate_export)
# Mamba1 prefill tokens per Scan iteration (onnx_graph._chunk_body). Each iteration holds a few
# (batch, Q, Q, d_state, d_inner) float32 tensors, 4 Q^2 d_state d_inner bytes each per batch row:
# at Q = 64, 403 MB on 130m shapes and 1.3 GB on 2.8b (d_inner 5120). Measured on an H200 (docs/measurements.md,
# ONNX Runtime's CUDA execution provider): Q = 16-32 fastest, Q = 64 slower again.
MAX_SCAN_CHUNK = 64


# ----------------------------------------------------------------------------- public API

def export_onnx(model_or_path, out_dir, dtype: str = "fp32", opset: int | None = None,
                validate: bool = True, accuracy_level: int | None = None, scan_chunk: int = 1) -> Path:
    """Export a MambaLM (or a checkpoint path / hub id) to OUT_DIR/model.onnx; returns OUT_DIR.

    accuracy_level: for a quantized model only, ORT's MatMulNBits compute type (0/1 fp32,
    2 fp16, 3 bf16, 4 int8 activations; default 4, see quant/onnx_nbits.py).
    scan_chunk: Mamba1 only, tokens per prefill Scan iteration (1 = one token, the default; Q > 1
    = the SSD dual form over chunks of Q, faster on GPU execution providers, slower on the CPU
    one; see onnx_graph.py). Quantized Mamba1 checkpoints take it too."""
    import onnx

    from ..tokenizer_files import tokenizer_source, write_tokenizer_files
    from ..runners.base import release_freed_memory
    from . import as_model, source_weights
    from .onnx_graph import MambaGraph

    if dtype not in DTYPES:
        raise ConfigError(f"unsupported ONNX export dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:  # not int(): int(17.9) would quietly write opset 17
        opset = DEFAULT_OPSET if opset is None else operator.index(opset)
    except TypeError:
        raise ConfigError(f"opset {opset!r} must be an integer (default {DEFAULT_OPSET})") from None
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise ConfigError(f"opset {opset} is not supported; choose {MIN_OPSET}..{max_opset} (default {DEFAULT_OPSET})")
    scan_chunk = check_scan_chunk(scan_chunk)
    check_switch("validate", validate)
    if validate and importlib.util.find_spec("onnxruntime") is None:  # said before minutes of export
        raise BackendUnavailableError(f"validating the export runs it in ONNX Runtime, which is not installed: "
                                      f"{install_hint('onnxruntime')}; or export without the check (--no-validate; "
                                      "validate=False) and run it with another backend, such as openvino")
    out_dir = output_path(out_dir)
    prepare_output_dir(out_dir, ExportError)  # before loading a large model, not after
    model = as_model(model_or_path)
    if not isinstance(model_or_path, (str, os.PathLike)):  # edited, maybe, since load_model checked it
        from ..checkpoint import refuse_nonfinite

        refuse_nonfinite(model, "ONNX export", ExportError)
    cfg = model.config
    if cfg.arch == "mamba2" and scan_chunk != 1:
        raise ExportError(f"--scan-chunk {scan_chunk} applies to Mamba1 only: this is a Mamba2 model, whose prefill "
                          f"is already chunked (a loop-free SSD over chunks of its chunk_size, {cfg.chunk_size} tokens); "
                          "drop --scan-chunk")
    if getattr(model, "quantization_config", None):
        # weight-only int8 / int4 become ORT's MatMulNBits (a separate, ORT-only graph)
        from ..quant.onnx_nbits import ACCURACY_LEVEL, export_quantized_onnx

        bad = [f for f, wrong in ((f"--dtype {dtype}", dtype != "fp32"), (f"--opset {opset}", opset != DEFAULT_OPSET))
               if wrong]
        if bad:  # only the flags actually at fault are named
            raise ExportError(f"a quantized model exports with fp32 activations and opset {DEFAULT_OPSET} only "
                              f"(got {', '.join(bad)}); drop {'that flag' if len(bad) == 1 else 'those flags'}")
        level = ACCURACY_LEVEL if accuracy_level is None else accuracy_level
        return export_quantized_onnx(model, out_dir, validate=validate, accuracy_level=level, scan_chunk=scan_chunk)
    if accuracy_level is not None:
        raise ExportError(f"--accuracy-level {accuracy_level} applies to quantized checkpoints (MatMulNBits) only; "
                          "drop it, or export the output of `mamba-deploy quantize`")
    weights_label, tokenizer_src = source_weights(model), tokenizer_source(model)
    # a model loaded here is freed once the graph holds its weights: the reference outputs (which
    # need only the ids) first; then saving holds the proto and its serialized bytes, not the model
    # too (a 998 MB checkpoint peaked at 4.4 GB); a model past 2 GB has its weights written to
    # model.onnx.data as the graph is built, so the proto never holds them; ONNX Runtime's session
    # later holds ~2x the weights.
    # A float64 copy is loaded again, only for a second opinion.
    float64_twin = ((lambda m=model: _float_copy(m, torch.float64)) if model is model_or_path
                    else (lambda: as_model(model_or_path, dtype=torch.float64)))
    names = (["reference outputs"] if validate else []) + ["building the graph", "saving", "checking the graph"]
    # a bar for large models (minutes); closed before validation prints its report
    stage = Stages("export onnx", names, progress_wanted(model))
    with atomic_dir(out_dir, ExportError) as tmp:
        with stage:
            if validate:
                stage("reference outputs")
            reference = torch_reference(None, model, scan_chunk=scan_chunk) if validate else None
            stage("building the graph")
            weights = dict(model.state_dict())
            itemsize = np.dtype(DTYPES[dtype]).itemsize  # matrices in the export dtype, vectors float32
            nbytes = sum(t.numel() * (itemsize if t.dim() >= 2 else 4) for t in weights.values())
            with streamed_weights(tmp, nbytes) as ext:
                proto = MambaGraph(cfg, weights, DTYPES[dtype], opset, scan_chunk=scan_chunk, external=ext).build()
            del model, weights
            release_freed_memory()
            stage("saving")
            _save(proto, tmp, label=weights_label or dtype)  # what the manifest's source_weights / dtype say
            del proto  # check_graph loads the file again, and validation opens it in ONNX Runtime
            release_freed_memory()
            stage("checking the graph")
            check_graph(tmp / GRAPH_FILE)
            write_tokenizer_files(tokenizer_src, tmp, out_dir)
            write_manifest(tmp, cfg, opset, dtype, source_weights=weights_label, scan_chunk=scan_chunk)
        if validate:
            validate_against_reference(tmp, reference, dtype, float64_twin)
    return Path(out_dir)


def check_scan_chunk(value) -> int:
    """scan_chunk as an int in 1..MAX_SCAN_CHUNK, or a ConfigError saying why."""
    try:  # not int(): int(8.5) would quietly chunk by 8
        if isinstance(value, bool):
            raise TypeError
        q = operator.index(value)
    except TypeError:
        raise ConfigError(f"scan_chunk {value!r} must be an integer >= 1 (1 = one token per Scan iteration)") from None
    if q < 1:
        raise ConfigError(f"scan_chunk {q} must be >= 1 (1 = one token per Scan iteration, the default)")
    if q > MAX_SCAN_CHUNK:
        raise ConfigError(f"scan_chunk {q} is above {MAX_SCAN_CHUNK} (memory): each prefill Scan iteration holds a "
                          "few (batch, Q, Q, d_state, d_inner) float32 tensors, 4*Q*Q*d_state*d_inner bytes each per "
                          f"batch row ({4 * q * q * 16 * 1536 / 1e9:.1f} GB at Q={q} on 130m shapes, "
                          f"{4 * q * q * 16 * 5120 / 1e9:.1f} GB on 2.8b); on an H200, Q=16-32 was fastest")
    return q


@contextlib.contextmanager
def streamed_weights(folder: Path, nbytes: int):
    """An ExternalData writing model.onnx.data in folder while the graph is built, when the
    weights (about nbytes) would pass EXTERNAL_DATA_BYTES; else None (one self-contained file)."""
    from .onnx_builder import ExternalData

    if nbytes <= EXTERNAL_DATA_BYTES:
        yield None
        return
    ext = ExternalData(folder)
    try:
        yield ext
    finally:
        ext.close()


def _save(proto, folder: Path, label: str) -> None:
    """model.onnx (+ model.onnx.data above 2 GB, unless streamed_weights already wrote the weights
    there), recording the weights' type `label` in it."""
    import onnx

    set_weights_label(proto, label)
    big = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(folder / GRAPH_FILE), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)


def check_graph(path: Path, allowed=ALLOWED_OPS) -> None:
    """onnx.checker + strict shape inference + the operator allow-list; ExportError on failure."""
    import onnx

    from ..pathnames import text_path

    try:
        with text_path(path) as name:  # onnx's C++ checker takes the path as UTF-8 text only
            onnx.checker.check_model(name, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path} fails onnx.checker: {e}") from e
    model = onnx.load(str(path), load_external_data=False)
    bad = sorted(graph_op_types(model) - allowed)
    if bad:
        raise ExportError(f"{path} uses operators outside the allow-list: {bad}")


def graph_op_types(model) -> set[str]:
    """Every op type in the graph and its subgraphs; custom domains are reported as domain::op."""
    ops: set[str] = set()

    def walk(graph):
        for node in graph.node:
            ops.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                if attr.g.node:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return ops


# ----------------------------------------------------------------------------- manifest

def io_spec(cfg) -> dict:
    """Names, shapes (str = dynamic dim), dtypes and roles of the graph's inputs and outputs."""
    conv, ssm = list(cfg.conv_state_shape), list(cfg.ssm_state_shape)
    inputs = [
        {"name": IDS, "shape": ["batch", "seq"], "dtype": "int64", "role": "tokens"},
        {"name": MASK, "shape": ["batch", "seq"], "dtype": "int64", "role": "mask",
         "optional": True, "doc": "1 = token, 0 = left padding; only with a zero state"},
        {"name": KEEP, "shape": [1], "dtype": "int64", "role": "option", "optional": True,
         "doc": "logits for the last N positions only; 0 (default) = all"},
    ]
    outputs = [{"name": LOGITS, "shape": ["batch", "logits_seq", cfg.padded_vocab_size], "dtype": "float32",
                "role": "logits"}]
    kinds = (("conv", conv, PAST_CONV, PRESENT_CONV), ("ssm", ssm, PAST_SSM, PRESENT_SSM))
    for i in range(cfg.n_layer):
        for kind, shape, past, present in kinds:
            spec = {"shape": ["batch", *shape], "dtype": "float32", "role": f"state_{kind}", "layer": i}
            inputs.append({"name": past.format(i), **spec})
            outputs.append({"name": present.format(i), **spec})
    return {"inputs": inputs, "outputs": outputs}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """A file's entry in manifest.json's "files": its size and sha256 (re-record a graph edited
    after export with it)."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(folder: Path, cfg, opset: int, dtype: str, source_weights: str | None = None,
                   scan_chunk: int = 1) -> None:
    """scan_chunk: Mamba1 prefill tokens per Scan iteration (absent from manifests written before it
    existed, which mean 1); informational, the graph's inputs and outputs do not depend on it."""
    files = sorted(p for p in folder.iterdir() if p.name.startswith(GRAPH_FILE))
    manifest = {
        "format": "mamba-deploy-onnx", "version": MANIFEST_VERSION, "config": cfg.to_dict(), "opset": opset,
        "dtype": dtype, "state_dtype": "float32", "scan_chunk": scan_chunk, "graph": GRAPH_FILE, **io_spec(cfg),
        "files": {p.name: file_record(p) for p in files},
    }
    if source_weights:
        manifest["source_weights"] = source_weights
    write_json(folder / MANIFEST_FILE, manifest)


def open_export_folder(path, check_hash: bool = False) -> tuple[Path, dict]:
    """An export folder (or its model.onnx) -> (folder, manifest), after checking that the
    files the manifest lists are there with their recorded size (and sha256 for the graph, or
    for every file with check_hash). Shared by every runner that reads our ONNX exports."""
    check_switch("check_hash", check_hash)
    folder = Path(path)
    if folder.suffix == ".onnx" and not folder.is_dir():  # its model.onnx; an export folder may be named x.onnx
        folder = folder.parent
    if not (folder / GRAPH_FILE).exists():
        if config_file(folder) is not None:  # a checkpoint: the export goes to a new folder
            raise ModelNotFoundError(f"{folder} is a checkpoint, not an ONNX export; export it with `mamba-deploy "
                                     f"export onnx {folder} {folder}-onnx` and pass {folder}-onnx")
        if folder.is_file():  # a .gguf or a weights file: the export goes beside it, not over it
            out = folder.with_name(folder.stem + "-onnx")
            raise ModelNotFoundError(f"{folder} is a file, not an ONNX export folder; export it with `mamba-deploy "
                                     f"export onnx {folder} {out}` and pass {out}")
        raise ModelNotFoundError(f"no model.onnx in {folder}; export one with `mamba-deploy export onnx MODEL {folder}`")
    manifest = read_manifest(folder)
    _check_fields(manifest, folder)
    _check_files(manifest, folder, check_hash)
    _check_weights_label(manifest, folder)
    _check_config(manifest, folder)
    return folder, manifest


def _check_weights_label(manifest: dict, folder: Path) -> None:
    """The weight type the manifest claims against the one model.onnx was exported with (its
    metadata, under the hash just checked; see export/onnx_meta.py). Exports without it pass."""
    recorded = read_metadata(folder / GRAPH_FILE).get(WEIGHTS_KEY)
    claimed = weights_label(manifest)
    if recorded is not None and recorded != claimed:
        raise ExportError(f"{folder}/manifest.json says the weights are {claimed!r} but model.onnx was exported as "
                          f"{recorded!r}: the manifest was edited (verify would judge the graph by the wrong type's "
                          "limits); re-export the model, or restore the manifest")


# manifest key -> the values an export writes (a key may be absent: older exports); verify reads
# "dtype" for its limits, so an edited "int8" would loosen them without a word
MANIFEST_VALUES = {"dtype": tuple(DTYPES), "state_dtype": ("float32",), "graph": (GRAPH_FILE,)}


def _check_fields(manifest: dict, folder: Path) -> None:
    where, fix = f"{folder}/manifest.json", "the manifest was edited: re-export the model"
    version = manifest.get("version")
    if not (_is_size(version) and 1 <= version):
        raise ExportError(f"{where}: version must be an integer >= 1, not {version!r:.40}; {fix}")
    if version > MANIFEST_VERSION:
        raise ExportError(f"{where} is version {version}, newer than this mamba-deploy reads ({MANIFEST_VERSION}); "
                          "upgrade mamba-deploy, or re-export the model with this one")
    for key, allowed in MANIFEST_VALUES.items():
        if key in manifest and manifest[key] not in allowed:
            raise ExportError(f"{where}: {key} must be one of {list(allowed)}, not {manifest[key]!r:.40}; {fix}")
    label = manifest.get("source_weights")  # a GGUF source's type (q8_0, f16, ...): verify's limits
    if label is not None and not (isinstance(label, str) and label and label.replace("_", "").isalnum()):
        raise ExportError(f"{where}: source_weights must be a weight type such as q8_0, not {label!r:.40}; {fix}")
    scan_chunk = manifest.get("scan_chunk", 1)  # absent: an export from before the option, per-token Scan
    if not (_is_size(scan_chunk) and scan_chunk >= 1):
        raise ExportError(f"{where}: scan_chunk must be an integer >= 1, not {scan_chunk!r:.40}; {fix}")


def _check_config(manifest: dict, folder: Path) -> None:
    """The manifest's config must imply exactly the inputs / outputs it lists (the runners size
    the states from the config; `check_session` then holds the graph to those lists)."""
    try:
        cfg = MambaConfig.from_own_dict(manifest["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{folder}/manifest.json has no valid config ({type(e).__name__}: {e}); "
                          "re-export the model") from e
    what = f"{folder}/manifest.json: its config ({cfg.arch}, n_layer={cfg.n_layer}, d_state={cfg.d_state})"
    fix = "the manifest was edited or belongs to another model: re-export the model"
    listed = manifest.get("inputs")
    if isinstance(listed, list) and cfg.n_layer > len(listed):  # before io_spec: n_layer 2_000_000 took 5.9 GB
        raise ExportError(f"{what} implies {2 * cfg.n_layer} state inputs, the manifest lists {len(listed)} inputs in "
                          f"all; {fix}")
    want = json.loads(json.dumps(io_spec(cfg)))
    for kind in ("inputs", "outputs"):
        listed = manifest.get(kind, [])
        if not (isinstance(listed, list) and all(isinstance(d, dict) for d in listed)):
            raise ExportError(f"{folder}/manifest.json: {kind!r} must be a list of objects, not {listed!r:.80}; {fix}")
        got = {d.get("name"): d for d in listed}
        names = {s["name"] for s in want[kind]}
        if set(got) != names:
            raise ExportError(f"{what} does not imply the {kind} it lists (listed only: {sorted(set(got) - names)}, "
                              f"implied only: {sorted(names - set(got))}); {fix}")
        for spec in want[kind]:
            if got[spec["name"]] != spec:
                raise ExportError(f"{what} implies {kind[:-1]} {spec}, the manifest lists {got[spec['name']]}; {fix}")


def _check_files(manifest: dict, folder: Path, check_hash: bool) -> None:
    files = manifest.get("files")
    where = f"{folder}/manifest.json"
    if files is None:  # without it nothing would be checked
        raise ExportError(f"{where} has no 'files' key (the size and sha256 of each model file); re-export the model")
    if not isinstance(files, dict) or GRAPH_FILE not in files:
        raise ExportError(f"{where}: 'files' must map each file name (model.onnx at least) to its bytes and "
                          f"sha256, not {files!r:.80}; the manifest was edited: re-export the model")
    for name, info in files.items():
        if not (isinstance(info, dict) and _is_size(info.get("bytes")) and isinstance(info.get("sha256"), str)):
            raise ExportError(f"{where}: files[{name!r}] must be {{\"bytes\": N, \"sha256\": \"...\"}}, not "
                              f"{info!r:.80}; the manifest was edited: re-export the model")
        if Path(name).is_absolute() or ".." in Path(name).parts:  # stat'ed and hashed: nothing outside the folder
            raise ExportError(f"{where}: files names {name!r}, outside the export folder; the manifest was edited: "
                              "re-export the model")
        p = folder / name
        if not p.exists():
            raise ModelNotFoundError(f"{p} is missing (listed in manifest.json); re-export the model")
        if p.stat().st_size != info["bytes"] or ((check_hash or name == GRAPH_FILE) and _sha256(p) != info["sha256"]):
            raise ExportError(f"{p} does not match manifest.json (size or sha256 differ): the file was "
                              "modified or truncated; re-export the model")


def _is_size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        raise ModelNotFoundError(f"{folder} has no manifest.json; export it with `mamba-deploy export onnx`")
    return read_tagged_json(path, "mamba-deploy-onnx", "ONNX manifest", "re-export the model")


# ----------------------------------------------------------------------------- validation

def validate_export(folder: Path, model, dtype: str, seed: int = 0, verbose: bool = True,
                    tolerance: float | None = None, label: str | None = None) -> dict:
    """Prefill + decode on random ids through ONNX Runtime and PyTorch; ExportError beyond tolerance.

    `tolerance` replaces TOLERANCE[dtype] where the graph rounds on purpose (a MatMulNBits graph
    at ORT's int8 accuracy level); then there is no float64 second opinion, since float64 math
    does not make that rounding go away. `label` names the graph in the printed report.

    fp32 beyond TOLERANCE: deep models with random or badly scaled weights can amplify rounding
    past 1e-4 in any fp32 implementation (a random 24-layer 130m-shaped Mamba1: transformers'
    own fp32 logits are 1.4e-4 from float64). So both are then compared with float64 math; the
    export passes if its error is within FP32_SLACK times PyTorch fp32's own. A wrong graph is
    orders of magnitude beyond that (a 1% weight change: ~1e-2)."""
    return validate_against_reference(folder, torch_reference(folder, model, seed), dtype,
                                      lambda: _float_copy(model, torch.float64), verbose, tolerance, label)


def torch_reference(folder: Path | None, model, seed: int = 0, scan_chunk: int | None = None) -> tuple:
    """(batches, (PyTorch logits, state)) for validation: the random ids of `folder`'s export (or
    of an export with `scan_chunk`, before it is written) and the model's outputs on them,
    computed before ONNX Runtime opens the graph (a caller that owns the model can free it
    first: the session holds ~2x the weights)."""
    q = read_manifest(folder).get("scan_chunk", 1) if scan_chunk is None else scan_chunk
    batches = _validate_ids(model.config, seed, q)
    ref_model = model if model.dtype == torch.float32 else _float_copy(model)
    return batches, _reference(ref_model, batches)


def validate_against_reference(folder: Path, reference: tuple, dtype: str, float64_twin, verbose: bool = True,
                               tolerance: float | None = None, label: str | None = None) -> dict:
    """validate_export's checks of the ONNX graph against `reference` (torch_reference's);
    float64_twin() builds the model in float64 for the second opinion (only then: 2x the model)."""
    from ..runners.onnx_runner import open_onnx

    batches, want = reference
    # prepacked as users run it: MatMulNBits at accuracy level 4 computes in int8 only when packed
    with open_onnx(folder) as runner:  # closed on an error too: the session holds ~2x the weights
        got, ort_state = [], runner.new_state(VALIDATE_BATCH)
        for ids in batches:
            logits, ort_state = runner.prefill(ids, ort_state)
            got.append(logits)
        got_state = runner.to_torch_state(ort_state)
    del runner, ort_state
    errs = _errors(got, got_state, *want, batches)
    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    if verbose:
        print(f"ONNX validation ({label or dtype}, tolerance {tol:g} relative to max |torch|):")
        for k, v in errs.items():
            print(f"  {k:<22} {v:.3e}")
    over = {k: v for k, v in errs.items() if not v <= tol}  # NaN is never <= tol
    if not over:
        return errs
    worst = _worst(over)
    msg = f"ONNX export disagrees with PyTorch: {worst} relative error {errs[worst]:.3e} > {tol:g}"
    if dtype != "fp32" or tolerance is not None or math.isnan(errs[worst]):  # no float64 second opinion
        raise ExportError(msg)
    _check_float64_fits(folder, msg)
    try:
        exact = _reference(float64_twin(), batches)
    except (MemoryError, RuntimeError) as e:  # a float64 copy of a large model may not fit
        raise ExportError(f"{msg} (no float64 check: {type(e).__name__}); re-run with --no-validate "
                          "to keep the export unchecked") from e
    export_errs, torch_errs = _errors(got, got_state, *exact, batches), _errors(*want, *exact, batches)
    export_err, torch_err = export_errs[_worst(export_errs)], torch_errs[_worst(torch_errs)]
    if verbose:
        print(f"  against float64 math: export {export_err:.3e}, PyTorch fp32 {torch_err:.3e}")
    if not export_err <= max(tol, FP32_SLACK * torch_err):
        raise ExportError(f"{msg}; against float64 math the export's error is {export_err:.3e}, more than "
                          f"{FP32_SLACK:g}x PyTorch fp32's own ({torch_err:.3e})")
    if verbose:
        print(f"  accepted: within {FP32_SLACK:g}x of PyTorch fp32's own rounding error")
    return errs


def _check_float64_fits(folder: Path, msg: str) -> None:
    """ExportError before building the float64 twin where it cannot fit: twice the fp32 graph's
    weights, beside what is held now. Linux's out-of-memory killer ends the process instead of
    raising MemoryError, which lost a complete 2.7 GB export (a 727M model: 9.9 GB at the kill)."""
    from ..runners.onnx_runner import available_memory

    need = 2 * sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    free = available_memory()
    if free is not None and need > free:
        raise ExportError(f"{msg}; the float64 check that would tell PyTorch's own fp32 rounding from an export "
                          f"error needs ~{need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is available: re-run with "
                          "--no-validate to keep the export unchecked, or on a machine with more memory")


def _validate_ids(cfg, seed: int, q: int) -> list:
    """Random ids (VALIDATE_BATCH, length) per VALIDATE_LENGTHS. The first prefill crosses chunk
    boundaries and ends inside a chunk: Mamba2's SSD chunk, or the Q = scan_chunk tokens per Scan
    iteration of a chunked Mamba1 graph (2Q + 3 tokens when that is above 35)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for length in VALIDATE_LENGTHS:
        length = length or (min(cfg.chunk_size, 256) if cfg.arch == "mamba2" else max(32, 2 * q)) + 3
        batches.append(torch.randint(0, cfg.vocab_size, (VALIDATE_BATCH, length), generator=gen))
    return batches


def _reference(model, batches):
    """PyTorch logits per batch of ids (one state carried through) and the final state. The SSM
    state is full precision (float32 like the graph's; float64 for the float64 reference),
    whatever `set_state_dtype` says for this model."""
    state = model.new_state(VALIDATE_BATCH, ssm_dtype=model.full_ssm_dtype)
    dev = model.device  # a model on a GPU: its ids there, its outputs back beside ONNX Runtime's
    with torch.inference_mode():
        logits = [model(ids.to(dev), state).logits.cpu() for ids in batches]
    return logits, State(state.conv.cpu(), state.ssm.cpu())


def _worst(errs: dict) -> str:
    """The key of the largest error, a NaN one first (max() on the values alone may skip a NaN)."""
    return max(errs, key=lambda k: (math.isnan(errs[k]), errs[k]))


def _errors(got, got_state, want, want_state, batches) -> dict:
    errs = {f"logits[{t}] len={ids.shape[1]}": _rel(g, w) for t, (ids, g, w) in enumerate(zip(batches, got, want))}
    errs["conv_state"], errs["ssm_state"] = _rel(got_state.conv, want_state.conv), _rel(got_state.ssm, want_state.ssm)
    return errs


def _float_copy(model, dtype=torch.float32):
    """A twin of the model in dtype: fp16/bf16 models are validated against their float32 twin (the
    export's fp32 math), fp32 exports past tolerance against float64. Built and loaded rather than
    deep-copied: a model that ran on CPU holds ctypes handles of the C kernels, which cannot be copied."""
    from ..model import MambaLM

    with torch.device(model.device):
        twin = MambaLM(model.config).to(dtype)
    twin.load_state_dict(model.state_dict())  # copy_ casts each tensor to dtype
    return twin.eval()


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if not b.numel():  # d_conv 1: no conv state to differ
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------- CLI

def register(subparsers) -> None:
    s = subparsers.add_parser("onnx", help="ONNX graph with the recurrent state as inputs/outputs")
    s.add_argument("model", help="checkpoint folder, hub id or .gguf file")
    s.add_argument("out_dir", help="new or empty folder for model.onnx (weights in model.onnx.data when large), "
                                   "manifest.json and the tokenizer files")
    s.add_argument("--dtype", type=str.lower, choices=sorted(DTYPES), default="fp32",
                   help="fp16: the linear, embedding and lm_head weights are stored and multiplied in fp16; norms, "
                        "the SSM scan, the state and the graph's inputs and outputs stay fp32 (a quantized "
                        "checkpoint takes fp32 only)")
    s.add_argument("--opset", type=opset_arg, default=None,
                   help=f"ONNX opset (default {DEFAULT_OPSET}; a quantized checkpoint exports at {DEFAULT_OPSET} only)")
    s.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch")
    s.add_argument("--accuracy-level", type=int, choices=range(5), default=None,
                   help="quantized checkpoints: ONNX Runtime MatMulNBits compute type, 0/1 fp32, 2 fp16, 3 bf16, "
                        "4 int8 activations (default 4, its fast path)")
    s.add_argument("--scan-chunk", type=scan_chunk_arg, default=1, metavar="Q",
                   help="Mamba1 only: Q tokens per prefill Scan iteration in the stable SSD dual form (default 1, "
                        "one token); faster on GPU execution providers (ONNX Runtime CUDA on an H200: about 3x at "
                        "Q=16-32), slower on the CPU provider; memory per iteration grows as Q*Q*d_inner*d_state "
                        f"(Q <= {MAX_SCAN_CHUNK})")
    s.set_defaults(func=_cmd)


def _cmd(args) -> None:
    out = export_onnx(args.model, args.out_dir, dtype=args.dtype, opset=args.opset, validate=not args.no_validate,
                      accuracy_level=args.accuracy_level, scan_chunk=args.scan_chunk)
    print(f"wrote {out / GRAPH_FILE}")
