"""GGUF export for llama.cpp and Ollama: `export_gguf(model_or_path, out_path, outtype, ...)`.

The file is written with the `gguf` package (its GGUFWriter refuses header / kv / tensor calls
out of order). F32/F16/BF16 and the legacy block quants (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) are
quantized in Python by `gguf.quants`; K-quants go through llama.cpp's own quantizer
(`llama_cpp.llama_model_quantize`, the optional llama-cpp-python extra) applied to an F32 GGUF.
All format facts live in `gguf_tables.py`; the tokenizer part in `gguf_vocab.py`.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from ..argtypes import threads_or_all
from ..atomic import atomic_file, prepare_output_file, renames_together, scratch_file, write_in_place, write_text
from ..errors import BackendUnavailableError, ExportError, OutputPathError
from ..extras import install_hint
from ..pathnames import is_gguf
from ..progress import human_bytes, progress_bar, progress_wanted
from ..quant.runtime import refuse_quantized
from ..runners.base import check_threads, release_freed_memory
from . import as_model, source_weights
from .gguf_tables import (
    CONFIG_KEYS,
    FALLBACK,
    FINAL_FALLBACK,
    FIXED_KEYS,
    GGUF_ARCH,
    LLAMACPP_MAIN_TYPE,
    MODELFILE_NAME,
    NAME_KEY,
    OUTTYPES,
    OWN_KEYS,
    OWN_PREFIX,
    SOURCE_WEIGHTS_KEY,
    TENSORS,
    keep_f32,
)
from .gguf_vocab import Vocab, add_carried, add_vocab, find_tokenizer_file, read_vocab, vocab_from_gguf

# ----------------------------------------------------------------------------- entry point

def _refuse_source_file(src, out: Path) -> None:
    """The source GGUF itself, or an existing non-GGUF file in the source checkpoint's folder (weights,
    config, tokenizer): a slip of the output path must not replace it."""
    if not isinstance(src, (str, os.PathLike)) or not out.is_file():
        return
    if Path(src).is_file() and out.resolve() == Path(src).resolve():
        raise OutputPathError(f"output {out} is the GGUF being exported; write to a new path "
                              f"(e.g. {out.with_name(out.stem + '-out.gguf')})")
    if is_gguf(out):
        return
    folder = Path(src) if Path(src).is_dir() else Path(src).parent
    if folder.exists() and out.resolve().parent == folder.resolve():
        raise OutputPathError(f"output {out} is a file of the model being exported ({src}); write the GGUF to a "
                              f"new .gguf path (e.g. {folder / 'model.gguf'})")


def export_gguf(model_or_path, out_path, outtype: str = "f32", tokenizer=None, ollama: bool = False,
                n_threads: int = 0) -> Path:
    """Write `out_path` (.gguf) for llama.cpp; with `ollama=True` also a Modelfile beside it.

    `tokenizer`: folder / tokenizer.json / SentencePiece model file / hub id, for checkpoints that
    ship none (a byte-level BPE tokenizer.json becomes llama.cpp's "gpt2" vocabulary, a SentencePiece
    BPE model, e.g. Mamba-Codestral's tokenizer.model.v3, its "llama" one).
    `n_threads`: threads for llama.cpp's quantizer (0 = all cores); K-quants only.
    """
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        raise ExportError(f"tokenizer takes a folder, tokenizer file or hub id (str or Path), got "
                          f"{type(tokenizer).__name__} {tokenizer!r:.60}")
    outtype = str(outtype).lower()
    if outtype not in OUTTYPES:
        raise ExportError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    ftype, qtype = OUTTYPES[outtype]
    if not isinstance(ollama, bool):  # "no" would be true
        raise ExportError(f"ollama must be True or False, got {ollama!r:.40}")
    n_threads = 0 if n_threads is None else n_threads
    quantize_fn = _llamacpp_quantizer(outtype) if qtype is None else None  # fail before any work
    if n_threads != 0:
        check_threads(n_threads)
    out = prepare_output_file(out_path)
    _refuse_source_file(model_or_path, out)  # the more precise refusal first
    if not is_gguf(out):  # an existing notes.txt was overwritten; the llama.cpp backend goes by the suffix
        raise OutputPathError(f"GGUF output {out} must end in .gguf (the llama.cpp backend and Ollama go by it"
                              f"{'; that file exists and is kept' if out.exists() else ''}); e.g. "
                              f"{out.with_suffix('.gguf')}")
    if ollama:
        _check_modelfile(out)
    elif _our_modelfile(out):  # ours for the GGUF being replaced: left as it was it would describe the old one
        warnings.warn(f"{out.parent / MODELFILE_NAME} was written by mamba-deploy for the earlier {out.name}; it is "
                      "rewritten for the new one (as --ollama does)", stacklevel=2)
        ollama = True
    if out.exists() and not write_in_place(out):  # as cp does, but said: it may be another model's file
        warnings.warn(f"{out} exists ({human_bytes(out.stat().st_size)}); it is replaced once the new GGUF is "
                      "complete", stacklevel=2)
    model = _as_model(model_or_path)
    refuse_quantized(model, "GGUF export", "pass the unquantized checkpoint and let GGUF quantize it "
                     "(--outtype q8_0, q4_k_m, ...)")
    if not isinstance(model_or_path, (str, os.PathLike)):  # edited, maybe, since load_model checked it
        from ..checkpoint import refuse_nonfinite

        refuse_nonfinite(model, "GGUF export", ExportError)
    cfg = model.config
    check_exportable(cfg)
    vocab = _vocab_for(model_or_path, model, tokenizer)
    # unique temporary names (not one per pid): two threads exporting to one path must not share them.
    # The Modelfile is written beside the GGUF's temporary file and renamed after it: a full disk
    # fails both before either replaces its earlier version
    mf = out.parent / MODELFILE_NAME
    with renames_together() as hold, (atomic_file(mf) if ollama else contextlib.nullcontext()) as mf_tmp, \
            atomic_file(out) as tmp, scratch_file(out, "f32") as f32_tmp:
        if quantize_fn is None:
            write_gguf(model, vocab, tmp, ftype, qtype, name=_model_name(model, out))
        else:
            _warn_fallbacks(model, LLAMACPP_MAIN_TYPE[outtype])
            write_gguf(model, vocab, f32_tmp, OUTTYPES["f32"][0], OUTTYPES["f32"][1], name=_model_name(model, out))
            if model is not model_or_path:  # loaded here: llama.cpp's quantizer reads the f32 file, not the model
                del model  # (a 727M model held 3.1 GB through llama.cpp's whole stage)
                release_freed_memory()
            quantize_fn(f32_tmp, tmp, int(ftype), n_threads)
        if ollama:
            mf_tmp.write_text(modelfile_text(out, vocab), encoding="utf-8")
        # a Ctrl-C now waits for both renames: never a new GGUF beside the old Modelfile
        hold(out, *([mf] if ollama else []))
    return out


def _as_model(model_or_path):
    return as_model(model_or_path, dtype=torch.float32)


def _vocab_for(model_or_path, model, tokenizer) -> Vocab:
    """A .gguf source keeps its own vocab (re-quantization), whether given by path or as a model
    load_model read from it; otherwise the tokenizer file."""
    cfg = model.config
    gguf = model_or_path if isinstance(model_or_path, (str, os.PathLike)) else getattr(model, "gguf_path", None)
    if tokenizer is None and gguf is not None and is_gguf(gguf):
        vocab = vocab_from_gguf(gguf)
        if len(vocab.tokens) == cfg.padded_vocab_size:
            return vocab
    return read_vocab(find_tokenizer_file(tokenizer, model.source_path), cfg.padded_vocab_size,
                      {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id})


def _model_name(model, out: Path) -> str:
    """general.name of a model that has none of its own (a GGUF source keeps its own: write_gguf)."""
    src = getattr(model, "source_path", None)
    return Path(src).name if src is not None else out.stem


def source_general(model) -> dict:
    """The general.* keys of the model's GGUF source (license, author, base model...; see
    gguf_import.carried_fields), which a re-export writes back; {} for other sources."""
    if getattr(model, "gguf_path", None) is None:
        return {}
    from .gguf_import import carried_fields, open_reader

    return carried_fields(open_reader(model.gguf_path), "general.")


def check_exportable(cfg) -> None:
    """Variants llama.cpp's mamba / mamba2 graphs cannot express."""
    problems = []
    if cfg.bias:
        problems.append("in_proj/out_proj biases (use_bias=True)")
    if cfg.arch == "mamba1" and cfg.d_inner != 2 * cfg.d_model:  # llama.cpp: "only an expansion factor of 2"
        problems.append(f"a Mamba1 expansion factor other than 2 (d_inner {cfg.d_inner}, d_model {cfg.d_model})")
    if cfg.arch == "mamba2" and not cfg.rmsnorm:
        problems.append("Mamba2 without the gated RMSNorm (rms_norm=False)")
    if cfg.arch == "mamba2" and cfg.norm_before_gate:
        problems.append("Mamba2 with norm_before_gate=True (llama.cpp gates before the norm)")
    if problems:
        raise ExportError(f"llama.cpp cannot run this {cfg.arch} model: {'; '.join(problems)}; "
                          "export it to ONNX instead (mamba-deploy export onnx)")
    for why in llama_cpp_differences(cfg):
        warnings.warn(f"{why} (`mamba-deploy verify MODEL OUT.gguf` measures by how much)", stacklevel=3)


def llama_cpp_differences(cfg) -> list[str]:
    """What llama.cpp computes differently for this model (it runs, with other outputs): said at
    export and again when the llama.cpp backend opens the file (the torch backend applies them)."""
    out = []
    if cfg.arch == "mamba2" and cfg.dt_limit != (0.0, float("inf")):
        out.append(f"llama.cpp ignores Mamba2 dt_limit={cfg.dt_limit}; its outputs can differ where dt is clamped")
    if cfg.dt_bc_rms and cfg.mixer_rms_eps != cfg.rms_norm_eps:
        out.append(f"llama.cpp normalises Falcon-Mamba's dt/B/C with the layer eps {cfg.rms_norm_eps:g}, not "
                   f"mixer_rms_eps={cfg.mixer_rms_eps:g}; its outputs can differ where dt/B/C are small")
    return out


# ----------------------------------------------------------------------------- writing

def write_gguf(model, vocab: Vocab, path: Path, ftype, qtype, name: str = "mamba") -> None:
    """Stream the GGUF: header, metadata and tensor infos first (from the tensors' shapes and
    types), then each tensor converted only as it is written, so at most one converted tensor
    (and its float32 source) is alive beside the model, not the whole converted model. `name`:
    general.name, unless the model comes from a GGUF, which keeps its own (its folder's name says
    nothing about the model) with its other general.* keys."""
    import gguf

    cfg = model.config
    plan, fallbacks = _tensor_plan(model, qtype)
    _fallback_warning(fallbacks)
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH[cfg.arch])
    try:
        general = source_general(model)
        own = general.get(NAME_KEY, (None,))[0]
        writer.add_name(own if isinstance(own, str) and own else name)
        writer.add_file_type(int(ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value, kind in metadata_items(cfg):
            _add_kv(writer, key, value, kind)
        label = source_weights(model)
        if label:
            writer.add_string(SOURCE_WEIGHTS_KEY, label)
        add_vocab(writer, vocab)
        add_carried(writer, general)
        for gname, shape, t in plan:
            stored_shape, dtype = _stored_layout(shape, t)
            writer.add_tensor_info(gname, stored_shape, dtype, _nbytes(shape, t),
                                   raw_dtype=None if dtype != np.uint8 else t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensor_data(writer, model, plan)
    finally:
        writer.close()


def _tensor_plan(model, qtype):
    """([(gguf name, GGUF shape, stored type)] in file order, [fallbacks for _fallback_warning]);
    each float32 array is dropped once its shape is known (converted later, in _write_tensor_data)."""
    from gguf import GGMLQuantizationType as QT

    plan, fallbacks = [], []
    for gname, array in _gguf_tensors(model):
        t = tensor_type(gname, array.shape, qtype)
        if t != qtype and not keep_f32(gname, array.ndim) and qtype != QT.F32:
            fallbacks.append((gname, array.shape[-1], qtype, t))
        plan.append((gname, array.shape, t))
    return plan, fallbacks


def _stored_layout(shape, t):
    """(numpy shape, numpy dtype) of a tensor of GGUF `shape` converted to type `t`, as
    GGUFWriter.add_tensor takes them: float arrays for F32 / F16, else the quantized blocks as
    uint8 rows of shape[-1] // block * block bytes (the writer maps that back to the element shape)."""
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import quant_shape_to_byte_shape

    if t == QT.F32:
        return tuple(shape), np.dtype(np.float32)
    if t == QT.F16:
        return tuple(shape), np.dtype(np.float16)
    return quant_shape_to_byte_shape(shape, t), np.dtype(np.uint8)


def _nbytes(shape, t) -> int:
    stored_shape, dtype = _stored_layout(shape, t)
    return math.prod(stored_shape) * dtype.itemsize


def _converted(array: np.ndarray, t) -> np.ndarray:
    """A float32 GGUF-layout array in the stored type `t`."""
    import gguf
    from gguf import GGMLQuantizationType as QT

    if t == QT.F32:
        return array
    with np.errstate(over="ignore"):  # values past float16's range: _refuse_overflow says which tensor
        if t == QT.F16:
            return array.astype(np.float16)
        return gguf.quants.quantize(array, t)


FP16_MAX = 65504.0  # the largest finite float16


def _refuse_overflow(gname: str, array: np.ndarray, data: np.ndarray, t) -> None:
    """F16 stores values, and the block types (Q8_0, Q4_0, ...) their block scales, in float16: a
    tensor with values past 65504 would be written as inf and llama.cpp would generate nothing.
    Only such tensors are checked (a scale is at most its block's largest |value|)."""
    import gguf
    from gguf import GGMLQuantizationType as QT

    if t == QT.F32 or not array.size:
        return
    amax = max(float(array.max()), -float(array.min()))  # np.abs would hold a second copy of the tensor
    if amax <= FP16_MAX:
        return
    with np.errstate(over="ignore", invalid="ignore"):  # inf scale x 0 code
        stored = data if t == QT.F16 else gguf.quants.dequantize(data, t)
    if not np.isfinite(stored).all():
        raise ExportError(f"{gname} has values up to {amax:.4g}, beyond float16's range (65504), in which GGUF type "
                          f"{t.name} stores {'them' if t == QT.F16 else 'its block scales'}: they would be written as "
                          "inf; export with --outtype bf16 or f32")


def _write_tensor_data(writer, model, plan) -> None:
    """Convert and write each tensor in `plan`'s order (that of the tensor infos already written);
    a bar over the bytes for a large model (stderr)."""
    total = sum(_nbytes(shape, t) for _, shape, t in plan)
    with progress_bar(total, "writing GGUF", progress_wanted(model)) as bar:
        for (gname, array), (planned, shape, t) in zip(_gguf_tensors(model), plan, strict=True):
            if gname != planned or array.shape != shape:  # the model changed between the two passes
                raise ExportError(f"GGUF export: {gname} {array.shape} differs from the planned {planned} {shape}")
            data = _converted(array, t)
            _refuse_overflow(gname, array, data, t)
            del array  # the float32 copy (when it is one), before the next is made
            writer.write_tensor_data(data)
            bar.update(data.nbytes)
            del data


def metadata_items(cfg):
    """[(key, value, kind)] for the config: llama.cpp's keys, then ours (OWN_KEYS)."""
    arch = GGUF_ARCH[cfg.arch]
    items = [(k.format(arch=arch), v, "u32") for k, v in FIXED_KEYS.items()]
    for key, attr, kind, arches in CONFIG_KEYS:
        if cfg.arch in arches:
            value = attr(cfg) if callable(attr) else getattr(cfg, attr)
            items.append((key.format(arch=arch), value, kind))
    for field, kind in OWN_KEYS:
        value = cfg.vocab_size if field == "vocab_size" else getattr(cfg, field)
        if value is not None:
            items.append((OWN_PREFIX + field, value, kind))
    return items


def _add_kv(writer, key, value, kind):
    if kind == "u32":
        writer.add_uint32(key, int(value))
    elif kind == "f32":
        writer.add_float32(key, float(value))
    elif kind == "bool":
        writer.add_bool(key, bool(value))
    elif kind == "f32x2":
        writer.add_array(key, [float(v) for v in value])
    else:
        raise AssertionError(f"unknown metadata kind {kind}")


def _gguf_tensors(model):
    """Yield (gguf name, float32 numpy array in the GGUF layout)."""
    cfg = model.config
    params = {k: v for k, v in model.state_dict().items()}
    for ours, gname, to_gguf, _, arches in TENSORS:
        if cfg.arch not in arches:
            continue
        for bid in range(cfg.n_layer) if "{bid}" in ours else [None]:
            key = ours.format(bid=bid)
            if key == "lm_head.weight" and cfg.tie_embeddings:
                continue  # llama.cpp reuses token_embd when output.weight is absent
            if key not in params:
                if key.endswith("conv1d.bias"):  # llama.cpp requires the conv bias; zero = none
                    params[key] = torch.zeros(cfg.conv_dim)
                else:
                    raise ExportError(f"model has no parameter {key!r}; it is not a {cfg.arch} MambaLM")
            array = params[key].detach().to("cpu", torch.float32).numpy()
            yield gname.format(bid=bid), np.ascontiguousarray(to_gguf(array, cfg), dtype=np.float32)


def tensor_type(gname: str, shape, qtype):
    """The type a tensor is stored as, with llama.cpp's fallback when rows do not fit the block."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as QT

    if keep_f32(gname, len(shape)) or qtype == QT.F32:
        return QT.F32
    t = qtype
    if shape[-1] % GGML_QUANT_SIZES[t][0]:
        t = FALLBACK.get(t, FINAL_FALLBACK)
    if shape[-1] % GGML_QUANT_SIZES[t][0]:
        t = FINAL_FALLBACK  # block size 1: always fits
    return t


def _fallback_warning(fallbacks: list) -> None:
    """One warning per (row length, wanted type, type used) for the tensors written in another
    type than asked (usually one per export): fallbacks [(gguf name, row length, wanted, used)]."""
    from gguf import GGML_QUANT_SIZES

    groups: dict = {}
    for gname, row, want, got in fallbacks:
        groups.setdefault((row, want, got), []).append(gname)
    for (row, want, got), names in groups.items():
        which = names[0] if len(names) == 1 else f"{len(names)} tensors ({names[0]} ... {names[-1]})"
        warnings.warn(f"{which}: row length {row} is not a multiple of the {want.name} block "
                      f"({GGML_QUANT_SIZES[want][0]}); using {got.name}, as llama.cpp does", stacklevel=3)


def _warn_fallbacks(model, main_type):
    """Before llama.cpp quantizes: tensors whose rows do not fit the outtype's main type (its
    K-quant mix may still pick other types for some tensors, e.g. output.weight)."""
    _fallback_warning(_tensor_plan(model, main_type)[1])


# ----------------------------------------------------------------------------- llama.cpp quantizer

def _llamacpp_quantizer(outtype: str):
    try:
        import llama_cpp
    except ImportError as e:
        python_types = ", ".join(k for k, (_, q) in OUTTYPES.items() if q is not None)
        raise BackendUnavailableError(
            f"outtype {outtype!r} is quantized by llama.cpp's own quantizer, which needs the optional "
            f"package llama-cpp-python: {install_hint('llama_cpp')}; or choose one of {python_types}, "
            "which are quantized in Python"
        ) from e

    def quantize(src: Path, dst: Path, ftype: int, n_threads: int) -> None:
        from ..runners.llamacpp_runner import llama_log, log_tail

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = int(n_threads)
        # its log (a line per tensor and the whole metadata) is kept, not printed: the last of it
        # says why when the quantizer fails. Paths as their bytes: a name that is not UTF-8 is fine
        with _deferred_interrupt(), llama_log(llama_cpp, forward=False) as log:
            rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), params)
        if rc != 0 or not dst.exists():
            said = " | ".join(log_tail(log))
            # not the paths: both are temporary files, gone once this error is raised
            raise ExportError(f"llama.cpp's quantizer failed to write {outtype} (return code {rc}); its log ended: "
                              f"{said or '(nothing)'}. Where it names inf or nan values, the weights (or their "
                              "K-quant block scales, which are float16) are beyond float16's range: export with "
                              "--outtype bf16 or f32, or check the model's weights")

    return quantize


@contextlib.contextmanager
def _deferred_interrupt():
    """Ctrl-C during a long C call: Python's default handler raises KeyboardInterrupt inside
    llama-cpp-python's log callback, where ctypes prints and drops it, and the export would go on
    to write its file. Record the signal instead and raise it once the call returns."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit = []
    signals = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())
    previous = [signal.signal(s, lambda signum, _: hit.append(signum)) for s in signals]
    try:
        yield
    finally:
        for s, handler in zip(signals, previous):
            signal.signal(s, handler)
    for signum in dict.fromkeys(hit):  # now through the caller's handlers, in Python code (an
        signal.raise_signal(signum)  # ignored one, e.g. SIGHUP under nohup, passes to the next)


# ----------------------------------------------------------------------------- Ollama

_MODELFILE_MARK = "# Written by mamba-deploy."


def _check_modelfile(gguf_path: Path) -> None:
    """Before any work: the Modelfile beside the GGUF may be replaced only if it is ours, written
    for this same GGUF (a re-export); someone's own Modelfile, or ours for another GGUF of the
    folder, is kept and the export refused."""
    mf = gguf_path.parent / MODELFILE_NAME
    if (not mf.exists() and not mf.is_symlink()) or _our_modelfile(gguf_path):
        return
    what = next((ln for ln in _modelfile_lines(mf) if ln.startswith("FROM ")), None)
    raise OutputPathError(f"{mf} already exists and was not written by mamba-deploy for {gguf_path.name}"
                          + (f" (it says {what!r})" if what else "") + "; --ollama would replace it. Export into "
                          "another folder, or move that Modelfile away first")


def _modelfile_lines(mf: Path) -> list[str]:
    try:
        return mf.read_text(encoding="utf-8").splitlines() if mf.is_file() and not mf.is_symlink() else []
    except (OSError, UnicodeDecodeError):
        return []


def _our_modelfile(gguf_path: Path) -> bool:
    """Is the Modelfile beside the GGUF one write_modelfile wrote for this GGUF's name?"""
    lines = _modelfile_lines(gguf_path.parent / MODELFILE_NAME)
    return lines[:1] == [_MODELFILE_MARK + " Create the model with:"] and f"FROM {_modelfile_source(gguf_path)}" in lines


def _modelfile_source(gguf_path: Path) -> str:
    source = f"./{gguf_path.name}"  # a path with spaces is quoted (Ollama's parser strips the quotes)
    return f'"{source}"' if re.search(r"\s", source) else source


def write_modelfile(gguf_path: Path, vocab: Vocab) -> Path:
    """An Ollama Modelfile beside the GGUF: `ollama create NAME -f Modelfile`."""
    return write_text(gguf_path.parent / MODELFILE_NAME, modelfile_text(gguf_path, vocab))


def modelfile_text(gguf_path: Path, vocab: Vocab) -> str:
    """The Modelfile for `gguf_path`. The model is a plain LM, so the template passes the prompt
    through; generation stops at eos."""
    # Ollama model names: lower-case letters, digits, '.', '-' and '_', at most 80 of them; a FROM
    # path with spaces is quoted (Ollama's parser strips the quotes and knows no escapes)
    name = re.sub(r"[^a-z0-9._-]+", "-", gguf_path.stem.lower()).strip("-.")[:80] or "mamba"
    source = _modelfile_source(gguf_path)
    if source.startswith('"') and '"' in source[1:-1]:
        warnings.warn(f"Ollama cannot read a FROM path holding both spaces and '\"' ({source!r}); rename "
                      "the GGUF before `ollama create`")
    lines = [
        _MODELFILE_MARK + " Create the model with:",
        f"#   ollama create {name} -f {MODELFILE_NAME}",
        f"FROM {source}",
        'TEMPLATE """{{ .Prompt }}"""',
    ]
    eos = vocab.special.get("eos")
    if eos is not None:
        lines.append(f'PARAMETER stop "{vocab.tokens[eos]}"')
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI

def register(subparsers) -> None:
    p = subparsers.add_parser("gguf", help="export to GGUF for llama.cpp / Ollama")
    p.add_argument("model", help="checkpoint folder, hub id or .gguf")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--outtype", default="f32", type=str.lower, choices=list(OUTTYPES),
                   help="type of the weight matrices (default f32; norms, biases, A, D and the conv stay F32); f32, f16, bf16, "
                        "q8_0, q4_0, q4_1, q5_0 and q5_1 are written in Python, the K-quants (q2_k, q3_k_m, q4_k_m, "
                        "q5_k_m, q6_k) by llama.cpp's quantizer, which needs llama-cpp-python")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder / tokenizer.json / SentencePiece tokenizer.model / hub id, "
                   "if the model has none")
    p.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile beside the GGUF")
    p.add_argument("--threads", type=threads_or_all, default=0, help="threads for llama.cpp's K-quant quantizer (0 = all)")
    p.set_defaults(func=_cmd)


def _cmd(args) -> None:
    out = export_gguf(args.model, args.out, outtype=args.outtype, tokenizer=args.tokenizer,
                      ollama=args.ollama, n_threads=args.threads)
    print(f"wrote {out} ({human_bytes(out.stat().st_size)}, {args.outtype})")
    if args.ollama:
        print(f"wrote {out.parent / MODELFILE_NAME}")


__all__ = ["export_gguf", "write_gguf", "write_modelfile", "register"]
