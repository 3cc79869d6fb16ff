"""GGUF import: `load_gguf(path)` -> MambaLM, from our files or llama.cpp's own converter's.

The config is rebuilt from GGUF metadata (llama.cpp's keys in `gguf_tables.CONFIG_KEYS`, plus
our `mamba_deploy.*` keys when present); tensors are dequantized with `gguf.quants.dequantize`
and mapped back through the inverse transforms of `gguf_tables.TENSORS`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..config import MambaConfig, check_values
from ..errors import CheckpointError, ConfigError, ModelNotFoundError, UnsupportedArchitectureError
from .gguf_tables import (ARCH_FROM_GGUF, ARCH_KEY, CONFIG_KEYS, EMBED_TENSOR, FILE_TYPE_KEY,
                          GGUF_ARCH, NOT_WEIGHT_TYPES, OUTPUT_TENSOR, OWN_KEYS, OWN_PREFIX, SPECIAL_KEYS, TENSORS,
                          TIME_STEP_RANK_KEY)

_MISSING = object()


def open_reader(path):
    """The GGUF file's metadata and tensor infos (gguf_reader.GGUFFile), its tensor layout checked;
    typed errors for missing, truncated or non-GGUF files."""
    from .gguf_reader import GGUFFile

    reader = GGUFFile(path)
    _check_layout(reader, path)
    return reader


def _check_layout(reader, path) -> None:
    """Tensor data where llama.cpp's loader expects it: in the order of the tensor infos, each
    tensor at the previous one's end rounded up to the file's alignment. gguf-py reads whatever
    bytes an offset names, so a file whose offset was edited loaded shifted weights, and one whose
    type code was edited (F32 -> Q4_0: fewer bytes) loaded other bytes as weights, silently."""
    align = reader.alignment
    expected, prev = 0, None
    for t in reader.tensors:
        start = int(t.data_offset) - reader.data_offset
        if start % align:
            problem = f"tensor {t.name!r} starts at data offset {start}, not a multiple of the file's alignment {align}"
        elif start < expected and prev is not None:
            problem = f"tensor {t.name!r} (at data offset {start}) overlaps {prev!r}, which ends at {expected}"
        elif start != expected:
            problem = (f"tensor {t.name!r} starts at data offset {start}, where the tensors before it end at "
                       f"{expected} (a tensor's type or shape does not match its bytes)")
        else:
            expected, prev = start + -(-int(t.n_bytes) // align) * align, t.name
            continue
        raise CheckpointError(f"GGUF file {path} is corrupt: {problem}; re-export it (mamba-deploy export gguf) or "
                              "re-download it")


def field(reader, key: str, default=_MISSING):
    f = reader.get_field(key)
    if f is None:
        if default is _MISSING:
            raise ConfigError(f"GGUF file lacks metadata key {key!r}; it was not written for llama.cpp's "
                              "mamba/mamba2 architecture, re-export it with mamba-deploy export gguf")
        return default
    value = f.contents()
    if isinstance(value, float):  # stored as float32: back to the shortest decimal (1e-5, not 9.99e-6)
        value = float(str(np.float32(value)))
    elif isinstance(value, list) and value and isinstance(value[0], float):
        value = [float(str(np.float32(v))) for v in value]
    return value


def carried_fields(reader, prefix: str) -> dict:
    """key -> (value, GGUFValueType, array item type or None) of the reader's keys under `prefix`
    that a re-export writes back as they were (gguf_tables.CARRIED_PREFIXES, less NOT_CARRIED).
    Empty and nested arrays are left out: gguf-py cannot write them."""
    from gguf import GGUFValueType as VT

    from .gguf_tables import CARRIED_PREFIXES, NOT_CARRIED

    out = {}
    for key, f in reader.fields.items():
        if not key.startswith(prefix) or not key.startswith(CARRIED_PREFIXES) or key in NOT_CARRIED:
            continue
        if f.type == VT.ARRAY and (f.item_type == VT.ARRAY or not f.count):
            continue
        out[key] = (f.contents(), f.type, f.item_type)
    return out


def read_config(reader, tensor_shapes: dict) -> MambaConfig:
    """MambaConfig from GGUF metadata; `tensor_shapes` (name -> numpy shape) fills the gaps."""
    gguf_arch = field(reader, ARCH_KEY)
    if not isinstance(gguf_arch, str) or gguf_arch not in ARCH_FROM_GGUF:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {gguf_arch!r} is not supported; this toolkit loads "
            f"{', '.join(sorted(ARCH_FROM_GGUF))} GGUF files (use llama.cpp itself for other models)"
        )
    arch = ARCH_FROM_GGUF[gguf_arch]
    v = {}
    for key, attr, _kind, arches in CONFIG_KEYS:
        if arch in arches:
            name = "time_step_rank" if callable(attr) else attr
            v[name] = field(reader, key.format(arch=gguf_arch), False if attr == "dt_bc_rms" else _MISSING)
    own = {f: field(reader, OWN_PREFIX + f, None) for f, _ in OWN_KEYS}
    rows = tensor_shapes.get(EMBED_TENSOR, (None,))[0]
    if rows is None:
        raise CheckpointError(f"GGUF file has no {EMBED_TENSOR} tensor; it is not a complete Mamba model")
    # before any arithmetic on them: a 0 or a string in the metadata is a ConfigError naming its key
    v["dt_rank" if arch == "mamba1" else "nheads"] = v.pop("time_step_rank")
    dt_bc_rms = bool(v.pop("dt_bc_rms", False))  # other converters may store it as an integer
    keys = {attr: key.format(arch=gguf_arch) for key, attr, _kind, _ in CONFIG_KEYS if not callable(attr)}
    rank_key = TIME_STEP_RANK_KEY.format(arch=gguf_arch)
    keys.update(dt_rank=rank_key, nheads=rank_key,
                **{f: OWN_PREFIX + f for f, _ in OWN_KEYS})
    fix = "the file's metadata is corrupt: re-export it (mamba-deploy export gguf) or re-download it"
    v = check_values(v, "GGUF metadata", fix, keys)
    own = check_values({f: x for f, x in own.items() if x is not None}, "GGUF metadata", fix, keys)
    own = {f: own.get(f) for f, _ in OWN_KEYS}
    d_model, d_inner = v["d_model"], v["d_inner"]
    kw = dict(
        arch=arch, d_model=d_model, n_layer=int(v["n_layer"]), d_state=int(v["d_state"]), d_conv=int(v["d_conv"]),
        expand=d_inner // d_model if d_inner % d_model == 0 else 2,
        d_inner_override=None if d_inner % d_model == 0 else d_inner,
        rms_norm_eps=float(v["rms_norm_eps"]), conv_bias=True, bias=False,
        tie_embeddings=OUTPUT_TENSOR not in tensor_shapes,
        vocab_size=int(own["vocab_size"] or rows),
        pad_vocab_size_multiple=int(own["pad_vocab_size_multiple"] or 1),
        residual_in_fp32=True if own["residual_in_fp32"] is None else bool(own["residual_in_fp32"]),
        source="gguf",
    )
    for kind, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "pad_token_id")):
        kw[attr] = own[attr]
        if own[attr] is None:
            special = {attr: field(reader, SPECIAL_KEYS[kind], None)}
            kw.update(check_values(special, "GGUF metadata", fix, {attr: SPECIAL_KEYS[kind]}))
        if kw[attr] is not None and not 0 <= kw[attr] < kw["vocab_size"]:  # llama.cpp loads such a file too;
            kw[attr] = None  # vocab_from_gguf, which reads these keys for the tokenizer, warns
    if arch == "mamba1":
        kw.update(dt_rank=v["dt_rank"], dt_bc_rms=dt_bc_rms,
                  hf_model_type="falcon_mamba" if dt_bc_rms else "mamba",
                  # llama.cpp normalises dt/B/C with the layer eps; files from elsewhere get that
                  mixer_rms_eps=float(own["mixer_rms_eps"] if own["mixer_rms_eps"] is not None else v["rms_norm_eps"]))
    else:
        nheads = v["nheads"]
        if d_inner % nheads:
            raise ConfigError(f"GGUF mamba2 ssm.time_step_rank (head count) {nheads} does not divide "
                              f"ssm.inner_size {d_inner}; the file's metadata is inconsistent, re-export it")
        kw.update(headdim=d_inner // nheads, ngroups=int(v["ngroups"]), hf_model_type="mamba2",
                  chunk_size=int(own["chunk_size"] or MambaConfig.chunk_size))
        if own["dt_limit"] is not None:
            kw["dt_limit"] = tuple(float(x) for x in own["dt_limit"])
    return MambaConfig(**kw)


def _dequantized(t) -> np.ndarray:
    """ReaderTensor -> float32 numpy array in the GGUF (row-major, reversed ne) shape."""
    from gguf.quants import dequantize

    shape = tuple(reversed(t.shape))
    try:
        data = dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"GGUF tensor {t.name} has type {t.tensor_type.name}, which the gguf package "
                              f"cannot dequantize; re-export it with another --outtype") from e
    return np.array(data, dtype=np.float32, copy=True).reshape(shape)  # the reader's memmap is read-only


def open_gguf(path):
    """A GGUF file's metadata and tensor headers, checked, no weight read -> (reader, {name: tensor},
    {name: shape (outermost first)}, MambaConfig)."""
    reader = open_reader(path)
    tensors = {t.name: t for t in reader.tensors}
    bad = [(n, t.tensor_type.name) for n, t in tensors.items() if t.tensor_type in NOT_WEIGHT_TYPES]
    if bad:
        raise CheckpointError(f"GGUF file {path}: tensor {bad[0][0]} is stored as {bad[0][1]}"
                              f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; a Mamba model's tensors are "
                              "F32, F16, BF16 or a llama.cpp quantized type. The file is corrupt or not a model: "
                              "re-export it (mamba-deploy export gguf) or re-download it")
    shapes = {n: tuple(reversed(t.shape)) for n, t in tensors.items()}
    cfg = read_config(reader, shapes)
    check_sizes(shapes, cfg, path)  # before a model of the metadata's sizes is allocated
    return reader, tensors, shapes, cfg


def load_gguf(path, device="cpu", dtype: torch.dtype = torch.float32):
    """A GGUF file (mamba / mamba2) -> MambaLM on `device` in `dtype` (weights dequantized)."""
    from ..checkpoint import _unfilled_model

    reader, tensors, shapes, cfg = open_gguf(path)
    # allocated on `device` in `dtype`, not initialised: every tensor is copied in below (a random
    # init would take seconds for billions of weights; a float32 model cast at the end, 3x the
    # 16-bit model at the peak)
    model = _unfilled_model(cfg, device, dtype)
    problems, nonfinite, overflow = _fill(model, tensors, shapes, cfg)
    if problems:
        raise CheckpointError(f"GGUF file {path} does not match its own metadata ({cfg.arch}, d_model={cfg.d_model}, "
                              f"n_layer={cfg.n_layer}): {'; '.join(problems[:8])}. Re-export the file.")
    if nonfinite:
        why = " (an ssm_a holds -exp(A_log): a value >= 0 is NaN or infinite once its log is taken)" \
            if any(n.endswith("ssm_a") for n in nonfinite) else ""
        raise CheckpointError(f"GGUF file {path} has NaN or infinite values in {nonfinite[:8]}{why}: the file is "
                              "corrupt; re-export it (mamba-deploy export gguf) or re-download it")
    if overflow:
        raise CheckpointError(f"GGUF file {path} has values in {overflow[:8]} beyond "
                              f"{str(dtype).removeprefix('torch.')}'s range, which would load as infinities; load it "
                              "in float32 or bfloat16 (--dtype)")
    model = model.eval()
    model.source_path = Path(path).parent
    model.gguf_path = Path(path)  # its vocabulary, for exports that write a tokenizer.json
    from .gguf_vocab import matching_neighbour

    # the tokenizer file beside it when it is this GGUF's (one of another model: warned, not used);
    # exports copy it rather than write the GGUF's vocabulary (tokenizer_files.tokenizer_source)
    model.gguf_neighbour = matching_neighbour(path, reader)
    if model.gguf_neighbour is None or model.gguf_neighbour.name != "tokenizer.json":
        model._tokenizer = gguf_tokenizer(reader, path)
    return model


def _fill(model, tensors: dict, shapes: dict, cfg) -> tuple[list, list, list]:
    """Copy every GGUF tensor (dequantized, mapped back by from_gguf) into the unfilled `model`:
    (problems, non-finite in the file, past the model's dtype once cast), our / GGUF names."""
    from ..checkpoint import all_finite

    params = dict(model.named_parameters(remove_duplicate=False))
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unread = sorted(set(model.state_dict()) - tied - {key for key, _, _ in _expected(cfg)})
    if unread:  # to_empty left them holding whatever the memory held: a gap in gguf_tables.TENSORS
        raise CheckpointError(f"this GGUF loader has no source for {unread[:8]} of the {cfg.arch} model; the "
                              "file's metadata asks for a variant it cannot load")
    seen, problems, nonfinite, overflow = set(), [], [], []
    for key, name, from_gguf in _expected(cfg):
        if name not in tensors:
            problems.append(f"missing {name}")
            continue
        seen.add(name)
        p = params[key]
        try:
            with np.errstate(all="ignore"):  # A = -exp(A_log) <= 0: a positive A's log is NaN, reported below
                value = torch.from_numpy(np.ascontiguousarray(from_gguf(_dequantized(tensors[name]), cfg)))
        except ValueError:  # a reshape the tensor's shape does not allow
            problems.append(f"{name}: file {shapes[name]} vs config {tuple(p.shape)}")
            continue
        if key.endswith("embeddings.weight") or key == "lm_head.weight":
            value = _fit_rows(value, p.shape[0], name, cfg.vocab_size)
        if tuple(value.shape) != tuple(p.shape):
            problems.append(f"{name}: file {tuple(value.shape)} vs config {tuple(p.shape)}")
            continue
        if not all_finite(value):
            nonfinite.append(name)
            continue
        with torch.no_grad():
            p.copy_(value)  # cast to the model's dtype, moved to its device
        if not all_finite(p):
            overflow.append(key)
    extra = sorted(set(tensors) - seen)
    if extra:
        problems.append(f"unexpected tensors {extra[:8]}")
    return problems, nonfinite, overflow


def _expected(cfg):
    """(our parameter, GGUF tensor name, from_gguf transform) for every tensor cfg's model reads."""
    for ours, gname, _, from_gguf, arches in TENSORS:
        if cfg.arch not in arches:
            continue
        for bid in range(cfg.n_layer) if "{bid}" in ours else [None]:
            key = ours.format(bid=bid)
            if not (key == "lm_head.weight" and cfg.tie_embeddings):
                yield key, gname.format(bid=bid), from_gguf


def check_sizes(shapes: dict, cfg: MambaConfig, path) -> None:
    """The tensors' shapes (GGUF row-major) against the metadata's sizes, before any allocation:
    the layer count, then every tensor's number of values (the embeddings: their width, and at
    least as many rows as the vocabulary). An edited block_count or embedding_length would
    otherwise allocate a model of that size first (all the memory, for a large one)."""
    from ..checkpoint import check_layer_count, meta_model

    arch = GGUF_ARCH[cfg.arch]
    check_layer_count(shapes, cfg.n_layer, f"GGUF file {path}: its metadata {arch}.block_count",
                      "the file's metadata is corrupt: re-export it (mamba-deploy export gguf) or re-download it")
    params = dict(meta_model(cfg).named_parameters(remove_duplicate=False))
    problems = []
    for key, name, _ in _expected(cfg):
        have, want = shapes.get(name), params[key].shape
        if have is None:
            continue  # reported as missing by the loader
        if key.endswith("embeddings.weight") or key == "lm_head.weight":  # rows: the vocabulary, maybe padded
            ok = len(have) == 2 and have[1] == want[1] and cfg.vocab_size <= have[0] <= cfg.padded_vocab_size
        else:
            ok = math.prod(have) == want.numel()
        if not ok:
            problems.append(f"{name}: file {have} vs config {tuple(want)}")
    if problems:
        raise CheckpointError(f"GGUF file {path} does not match its own metadata ({cfg.arch}, d_model={cfg.d_model}, "
                              f"n_layer={cfg.n_layer}, vocab_size={cfg.vocab_size}): {'; '.join(problems[:8])}. "
                              "Re-export the file.")


def _fit_rows(value, rows: int, name: str, vocab_size: int):
    if value.shape[0] < vocab_size:  # zero rows for real ids: logits of exactly 0 that sampling can pick
        raise CheckpointError(f"{name} has {value.shape[0]} rows, fewer than the vocabulary of {vocab_size} "
                              f"(mamba_deploy.vocab_size); the file's metadata is corrupt: re-export it")
    if value.shape[0] < rows:  # vocab padding: extra rows are never produced by the tokenizer
        return torch.cat([value, value.new_zeros(rows - value.shape[0], *value.shape[1:])])
    if value.shape[0] > rows:
        raise CheckpointError(f"{name} has {value.shape[0]} rows but the vocabulary is {rows}")
    return value


def gguf_tokenizer(reader, path):
    """The GGUF's own vocabulary as a tokenizer that encodes as llama.cpp does (control and added
    tokens included), or None with a warning where no `tokenizers` / sentencepiece equivalent exists."""
    import warnings

    from ..errors import ExportError
    from ..extras import install_hint
    from ..tokenizer import Tokenizer, sentencepiece_tokenizer
    from .gguf_tables import SPM_TOKENIZER_MODEL
    from .gguf_vocab import llama_end_ids, spm_model_from_vocab, tokenizer_from_vocab, vocab_from_gguf

    try:
        vocab = vocab_from_gguf(path, reader)
        if vocab.model == SPM_TOKENIZER_MODEL:
            tok = sentencepiece_tokenizer(spm_model_from_vocab(vocab), Path(path).parent, add_eos=bool(vocab.add_eos))
            tok.chat_template, tok.end_token_ids = vocab.chat_template, tuple(llama_end_ids(vocab))
            return tok
        tok = tokenizer_from_vocab(vocab)
    except (ExportError, ConfigError, ModuleNotFoundError, ValueError) as e:
        # ConfigError: no tokenizer metadata at all; ValueError: sentencepiece refused the model
        why = f"{e}; {install_hint(e.name)}" if isinstance(e, ModuleNotFoundError) and e.name else str(e)
        warnings.warn(f"{path}: its tokenizer has no equivalent outside llama.cpp ({why}); use --backend llama.cpp "
                      "or give token ids", stacklevel=3)
        return None
    named = {f"{kind}_token": i for kind, i in vocab.special.items()}
    return Tokenizer(tok, vocab.special.get("eos"), vocab.special.get("bos"), chat_template=vocab.chat_template,
                     special_token_ids=named, end_token_ids=llama_end_ids(vocab))


def weights_label(path) -> str:
    """The GGUF's weight type as llama.cpp names it (q8_0, q4_k_m, f16, ...; 'fp32' when unreadable),
    or the type it records for its source (SOURCE_WEIGHTS_KEY: an f32 export of a q8_0 GGUF holds
    q8_0's rounding) where that one's verify limits are looser."""
    from ..tolerances import looser_label

    return looser_label(*weights_labels(path))


def weights_labels(path) -> tuple[str, str | None]:
    """(the file's own weight type, the type it records for its source or None)."""
    try:
        reader = open_reader(path)
    except (ImportError, ModelNotFoundError, CheckpointError):  # a bad file is the loader's error to report
        return "fp32", None
    from .gguf_tables import SOURCE_WEIGHTS_KEY

    recorded = field(reader, SOURCE_WEIGHTS_KEY, None)
    return _file_weight_type(reader), recorded.lower() if isinstance(recorded, str) else None


def _file_weight_type(reader) -> str:
    """general.file_type, else the type holding most of the 2-D weights' values. Not the most common
    type by tensor count: a Mamba2 layer has 4 small 2-D tensors every outtype keeps in F32 (conv,
    A, D, gated norm) against its 2 quantized matrices."""
    from gguf import LlamaFileType

    counts: dict[str, int] = {}
    for t in reader.tensors:
        if len(t.shape) >= 2:
            counts[t.tensor_type.name.lower()] = counts.get(t.tensor_type.name.lower(), 0) + int(t.n_elements)
    file_type = field(reader, FILE_TYPE_KEY, None)
    if file_type is not None:
        try:
            named = LlamaFileType(int(file_type)).name.lower().removeprefix("mostly_")
        except (ValueError, TypeError):  # a type this gguf package does not know
            named = None
        if named is not None:
            return _no_looser_than_stored(named, counts)
    return max(counts, key=counts.get) if counts else "fp32"


def _no_looser_than_stored(named: str, counts: dict[str, int]) -> str:
    """general.file_type, unless every matrix is stored more precisely than it says: llama.cpp
    falls back to another type for rows its blocks do not divide (a small model's q2_k file can
    hold only Q4_0 / Q8_0), and verify's row must be the loosest type stored, not the asked one."""
    from ..tolerances import row_index

    try:
        stored = max(counts, key=row_index)
        looser = row_index(named) > row_index(stored)
    except (ConfigError, ValueError):  # a type with no row (or no matrices): the file's word
        return named
    return stored if looser else named

