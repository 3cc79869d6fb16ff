"""Checkpoint I/O: read config + weights lazily, save, convert layouts (hub.py finds the files).

Layouts differ only in key names (tables below); weights are never read whole into memory:
safetensors files are memory-mapped and tensors are pulled one at a time.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import torch

from .argtypes import is_whole
from .atomic import atomic_dir, output_path, read_json_object
from .config import MambaConfig, config_key
from .errors import BackendUnavailableError, CheckpointError, ConfigError, MambaDeployError, ModelNotFoundError
from .export.onnx_meta import ENGINE_FILE, GRAPH_FILE, MANIFEST_FILE
from .extras import needs_packages
from .hub import WEIGHT_FILES, WEIGHT_INDEXES, local_path, resolve, split_revision
from .pathnames import is_gguf
from .state import DTYPE_NAMES
from .tokenizer_files import tokenizer_source, write_tokenizer_files

# layout -> [(prefix in that layout, prefix in ours/HF)]; `save_checkpoint` writes the first two
KEY_RENAMES = {
    "hf": [],
    "mamba_ssm": [("backbone.embedding.", "backbone.embeddings.")],
    # mistral_inference's consolidated.safetensors: mamba_ssm's names under its wrapper's "model."
    "mistral": [("model.backbone.embedding.", "backbone.embeddings."), ("model.", "")],
}
SAVE_FORMATS = ("hf", "mamba_ssm")
# the config file of each dialect, in the order they are looked for (config.py reads either)
CONFIG_FILES = ("config.json", "params.json")
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
# safetensors dtype code -> torch dtype, so that header-only checks see what a tensor is stored as
SAFETENSORS_DTYPES = {**SAFETENSORS_FLOATS, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32,
                      "U64": torch.uint64, "BOOL": torch.bool, "C64": torch.complex64}
# what a float checkpoint's tensors may be stored in (anything else would be cast to float silently:
# integer codes of another tool's quantization, fp8 without its scales, booleans)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# a layer's tensors: backbone.layers.N. (HF, mamba_ssm, mistral's model.backbone...), blk.N. (GGUF)
FINITE_CHUNK = 1 << 22  # elements per all_finite step (16 MB of float32)
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blk)\.(\d+)\.")


def _not_a_checkpoint(folder: Path) -> str:
    """What a folder without config.json is instead, and what to pass."""
    if (folder / MANIFEST_FILE).exists() or (folder / GRAPH_FILE).exists():
        return "it is an ONNX export; pass the checkpoint folder it was exported from"
    if (folder / ENGINE_FILE).exists():
        return "it is a TensorRT engine folder: pass the checkpoint it was built from"
    return "is this a Mamba checkpoint folder?"


def config_file(folder: Path) -> Path | None:
    """The folder's config.json, or mistral_inference's params.json when that is all it has."""
    return next((folder / n for n in CONFIG_FILES if (folder / n).is_file()), None)


def read_config(folder: Path) -> MambaConfig:
    cfg_path = config_file(folder)
    if cfg_path is None:
        raise ModelNotFoundError(f"{folder} has no config.json (or params.json); {_not_a_checkpoint(folder)}")
    from .pathnames import check_model_file

    check_model_file(cfg_path, folder)
    return _with_generation_token_ids(MambaConfig.from_file(cfg_path), folder)


# transformers' generation_config.json: the token ids a mamba_ssm config.json has no fields for
# (its MambaConfig dataclass refuses unknown keys), so `convert --format mamba_ssm` writes them there
GENERATION_CONFIG = "generation_config.json"
# this toolkit's own notes on a checkpoint whose config has no room for them (mamba_ssm layout)
RECORDS_FILE = "mamba_deploy.json"
SOURCE_WEIGHTS = "source_weights"  # a quantized GGUF's weight type, kept by converts and exports
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _with_generation_token_ids(cfg: MambaConfig, folder: Path) -> MambaConfig:
    """cfg with the token ids it lacks taken from the folder's generation_config.json, if any."""
    from .config import _first, check_values

    if all(getattr(cfg, k) is not None for k in TOKEN_ID_FIELDS):
        return cfg
    gen = _read_generation_config(folder)
    ids = {k: _first(gen.get(k)) for k in TOKEN_ID_FIELDS if getattr(cfg, k) is None and gen.get(k) is not None}
    if not ids:
        return cfg
    ids = check_values(ids, str(folder / GENERATION_CONFIG), "correct that value or delete the file")
    return cfg.replace(**ids)


def _read_generation_config(folder: Path) -> dict:
    """The folder's generation_config.json ({} when there is none); a corrupt one is an error."""
    path = Path(folder) / GENERATION_CONFIG
    if not path.exists():
        return {}
    from .pathnames import check_model_file

    check_model_file(path, folder)  # a pipe there: a read that never returns
    try:  # not read_json_object: a corrupt file would be read as "no ids", and a convert then writes nulls
        gen = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8; deep nesting
        raise ConfigError(f"cannot read {path} ({type(e).__name__}: {e}); it holds the model's bos / eos / pad "
                          "token ids: copy it again from the model, or delete it to load without them") from e
    if not isinstance(gen, dict):
        raise ConfigError(f"{path} holds a {type(gen).__name__}, not a JSON object; copy it again from the model, "
                          "or delete it to load without its token ids")
    return gen


def generation_end_ids(folder) -> list[int]:
    """Every id that ends generation, as transformers' generate stops: generation_config.json's
    eos_token_id, else config.json's. Either may be a list: chat models put their end-of-turn
    token there beside the EOS (as a GGUF has tokenizer.ggml.eot_token_id)."""
    folder = Path(folder)
    ids = _read_generation_config(folder).get("eos_token_id")
    if ids is None:
        try:
            ids = read_raw_config(folder).get("eos_token_id")
        except (OSError, ValueError, AttributeError):  # no readable config: the ids are the tokenizer's own
            ids = None
    ids = ids if isinstance(ids, list) else [ids]
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0]


def write_generation_token_ids(cfg: MambaConfig, folder: Path) -> None:
    """Fill in cfg's token ids where folder's generation_config.json lacks them. A copied file's
    own ids stay as they are: a chat fine-tune's generation_config names its end-of-turn token
    (or a list of end tokens) where config.json keeps the base model's EOS, and transformers'
    generate stops at the file's; cfg's EOS written over it lost that token, or added a new one."""
    ids = {k: getattr(cfg, k) for k in TOKEN_ID_FIELDS if getattr(cfg, k) is not None}
    path = Path(folder) / GENERATION_CONFIG
    old = read_json_object(path)
    if any(k not in old for k in ids):
        path.write_text(json.dumps({**ids, **old}, indent=2))


def read_raw_config(folder: Path) -> dict:
    """The folder's config file as a dict ({} when there is none); read_config has validated it."""
    cfg_path = config_file(folder)
    return json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path is not None else {}


# ----------------------------------------------------------------------------- reading weights

def weight_files(folder: Path) -> list[Path]:
    return list(_weight_sources(folder))


def _weight_sources(folder: Path) -> dict[Path, set[str] | None]:
    """weight file -> the tensor names to read from it: those a shard index assigns to it, or None
    (every tensor in the file) when there is no index; each a regular file."""
    from .pathnames import check_model_file

    sources = _find_weight_sources(folder)
    for f in sources:  # not a pipe or device (a read that never returns or never ends)
        check_model_file(f, folder)
    return sources


def _find_weight_sources(folder: Path) -> dict[Path, set[str] | None]:
    for name in WEIGHT_FILES:
        if name in WEIGHT_INDEXES and (folder / name).exists():
            index = folder / name
            files: dict[Path, set[str]] = {}
            for k, f in _read_index(index).items():
                files.setdefault(folder / f, set()).add(k)
            missing = [str(f) for f in sorted(files) if not f.exists()]
            if missing:
                raise CheckpointError(f"shard index {index} names missing files: {missing}")
            return dict(sorted(files.items()))
        if (folder / name).exists():
            return {folder / name: None}
    found = sorted(p.name for p in folder.glob("*.safetensors")) or sorted(p.name for p in folder.glob("*.bin"))
    if found:
        return {folder / f: None for f in found}
    raise ModelNotFoundError(f"{folder} has no weights (looked for {', '.join(WEIGHT_FILES)}); put the weight "
                             "files beside its config.json, or pass the folder that has them (a hub download "
                             "that stopped part-way: download it again)")


def _read_index(index: Path) -> dict[str, str]:
    """A shard index's weight_map (tensor name -> shard file in the index's folder), checked."""
    fix = "re-save the checkpoint (or download it again)"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past the parser
        raise CheckpointError(f"{index} is not a valid shard index ({e}); {fix}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not (isinstance(weight_map, dict)
            and all(isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items())):
        found = weight_map if isinstance(data, dict) else data
        raise CheckpointError(f"{index} is not a valid shard index: its 'weight_map' must map each tensor name to "
                              f"the shard file holding it, not {found!r:.80}; {fix}")
    outside = sorted({f for f in weight_map.values() if Path(f).is_absolute() or ".." in Path(f).parts})
    if outside:
        raise CheckpointError(f"shard index {index} names files outside {index.parent}: {outside[:3]}; {fix}")
    return weight_map


def iter_tensors(folder: Path, shapes_only: bool = False):
    """Yield (name, tensor) over every weight file, one tensor at a time (memory-mapped); with a
    shard index, the tensors it assigns to each shard. shapes_only: safetensors tensors as empty
    meta tensors of their shape and dtype, read from the headers."""
    for f, names in _weight_sources(folder).items():
        if f.suffix == ".safetensors":
            yield from _iter_safetensors(f, shapes_only, names)
        else:
            yield from _iter_bin(f, names)


def _iter_bin(f: Path, names=None):
    from .pathnames import text_path

    try:
        with text_path(f) as name:  # torch's file reader takes UTF-8 names only
            try:
                sd = torch.load(name, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # saved before torch 1.6's zip format: readable, only not memory-mapped
                if "mmap" not in str(e):
                    raise
                sd = torch.load(name, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read {f}: {e}; the file is corrupt or not a PyTorch state dict") from e
    if not (isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())):
        inner = [k for k in ("state_dict", "model") if isinstance(sd, dict) and isinstance(sd.get(k), dict)]
        what = f"a {type(sd).__name__}" + (" holding other things than name -> tensor" if isinstance(sd, dict) else "")
        if inner:
            what = f"a training checkpoint with the weights under {inner[0]!r}"
        raise CheckpointError(f"{f} is {what}, not a state dict (tensor name -> tensor); save the model's weights "
                              "alone: torch.save(model.state_dict(), path), or save_pretrained")
    yield from _pick(sd, sd.__getitem__, names, f)


def _pick(keys, get, names, f: Path):
    """(name, get(name)) over a weight file's tensor names, limited to `names` (those a shard index
    assigns to the file) when given; a name the index assigns to it that it lacks is a CheckpointError."""
    keys = list(keys)
    if names is not None:
        absent = sorted(names - set(keys))
        if absent:
            raise CheckpointError(f"the shard index in {f.parent} assigns {_short(absent)} to {f.name}, which does "
                                  "not hold them: the shard or the index comes from another save; re-save the "
                                  "checkpoint (or download it again)")
        keys = [k for k in keys if k in names]
    for k in keys:
        yield k, get(k)


def _iter_safetensors(f: Path, shapes_only: bool = False, names=None):
    from safetensors import SafetensorError, safe_open

    from .pathnames import text_path

    with text_path(f) as name:  # safetensors takes UTF-8 names only
        _check_readable(f, name)
        try:
            handle = safe_open(name, framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {f}: {e}; the file is truncated or corrupt, re-download or re-save "
                                  "it") from e
        with handle as h:
            yield from _pick(h.keys(), lambda k: _read(h, k, f, shapes_only), names, f)


def _check_readable(f: Path, name: str) -> None:
    """Open the file once ourselves: safetensors reports any failure to open as "No such file or
    directory", which would send a user whose file is there but unreadable after a missing one."""
    try:
        with open(name, "rb"):
            pass
    except OSError as e:
        fix = {errno.EACCES: "make it readable (chmod a+r) or run as a user who can read it",
               errno.EPERM: "make it readable (chmod a+r) or run as a user who can read it",
               errno.ENOENT: "the file is gone (a dangling link?); re-download or re-save the checkpoint",
               errno.EISDIR: "it is a folder; put the weight file itself there"}.get(e.errno, "check the file and run again")
        raise CheckpointError(f"cannot open {f}: {e.strerror or e}; {fix}") from e


def _read(h, k: str, f: Path, shapes_only: bool):
    from safetensors import SafetensorError

    try:
        if not shapes_only:
            return h.get_tensor(k)
        sl = h.get_slice(k)
        shape, code = sl.get_shape(), sl.get_dtype()
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read tensor {k!r} from {f}: {e}") from e
    if code not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"tensor {k!r} in {f} is stored as {code}, which torch cannot load; re-save the "
                              "checkpoint in float16, bfloat16 or float32")
    return torch.empty(shape, dtype=SAFETENSORS_DTYPES[code], device="meta")


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith("model.backbone.") for k in keys):
        return "mistral"
    return "mamba_ssm" if any(k.startswith("backbone.embedding.") for k in keys) else "hf"


def to_our_key(k: str, layout: str) -> str:
    for src, dst in KEY_RENAMES[layout]:
        if k.startswith(src):
            return dst + k[len(src):]
    return k


def from_our_key(k: str, layout: str) -> str:
    for src, dst in KEY_RENAMES[layout]:
        if k.startswith(dst):
            return src + k[len(dst):]
    return k


def load_weights(model: torch.nn.Module, folder: Path, device, dtype, shapes_only: bool = False,
                 take=None) -> None:
    """Copy the checkpoint into `model` (already on device/dtype), checking names, shapes, that
    every tensor is stored as a float and that every value is finite in the model's dtype.
    shapes_only: check names, shapes and dtypes from the file headers only (`inspect`; `model` may
    live on the meta device). take(name, tensor) -> the part of each file tensor `model` holds
    (tensor parallelism: a rank's slice, read from the file one tensor at a time)."""
    cfg: MambaConfig = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    seen, unexpected, bad_shape, bad_dtype, nonfinite, overflow = set(), [], [], [], [], []
    head = None  # a tied model's lm_head.weight in the file: must equal the embeddings it is tied to
    layout = None
    for k, t in iter_tensors(folder, shapes_only):
        layout = layout or detect_layout([k])
        if k.startswith("backbone.embedding."):
            layout = "mamba_ssm"
        name = to_our_key(k, layout)
        if name not in params:
            unexpected.append(k)
            continue
        p = params[name]
        seen.add(name)  # present: a wrong shape or dtype is reported as such rather than as missing
        if t.dtype not in WEIGHT_DTYPES:
            bad_dtype.append(f"{k} ({str(t.dtype).removeprefix('torch.')})")
            continue
        if name.endswith("embeddings.weight") or name == "lm_head.weight":
            t = _pad_vocab(t, p.shape[0], k, cfg.vocab_size)
        if take is not None and not shapes_only:
            t = take(name, t)
        if tuple(t.shape) != tuple(p.shape):
            bad_shape.append(f"{k}: file {tuple(t.shape)} vs model {tuple(p.shape)}")
            continue
        if shapes_only:
            continue
        if name in tied:
            head = (k, t)
            continue
        with torch.no_grad():
            p.copy_(t.to(device=device, dtype=p.dtype))
        if not all_finite(p):  # NaN / inf in the file, or values past the model's dtype
            (overflow if all_finite(t) else nonfinite).append(k)
    emb = "backbone.embeddings.weight"
    if tied and "lm_head.weight" in seen and emb not in seen:
        # the shared matrix stored under the head's name alone (transformers ties it either way)
        seen.add(emb)
        if head is not None:
            with torch.no_grad():
                params[emb].copy_(head[1].to(device=device, dtype=params[emb].dtype))
            if not all_finite(params[emb]):
                (overflow if all_finite(head[1]) else nonfinite).append(head[0])
            head = None
    missing = sorted(set(params) - seen - tied)
    problems = []
    if missing == ["lm_head.weight"] and not cfg.tie_embeddings:  # Mamba2's default is untied
        problems.append("missing tensors: lm_head.weight (the weights have no separate head: if the embeddings "
                        "are the head, set tie_word_embeddings to true in config.json)")
    elif missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short(unexpected)}")
    if bad_shape:
        problems.append(f"wrong shapes: {_short(bad_shape)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {folder} does not match its config.json ({cfg.arch}, d_model={cfg.d_model}, "
            f"n_layer={cfg.n_layer}): " + "; ".join(problems) + ". Check that config.json belongs to these weights."
        )
    _check_values(folder, cfg, params, layout, bad_dtype, nonfinite, overflow, head)


def all_finite(t: torch.Tensor, as_float: bool = False) -> bool:
    """bool(torch.isfinite(t).all()), FINITE_CHUNK elements at a time: on a whole tensor, isfinite's
    temporaries (|t| and two masks) are ~1.7x the tensor, 250 MB above the model while loading a
    150 MB embedding matrix. as_float: each slice is cast to float32 first (dtypes isfinite lacks)."""
    for c in t.reshape(-1).split(FINITE_CHUNK):
        if not bool(torch.isfinite(c.float() if as_float else c).all()):
            return False
    return True


def refuse_nonfinite(model, what: str, error) -> None:
    """`error` naming the model's tensors that hold NaN / inf, before `what` writes them: the
    file would load as corrupt (load_model checks) and every output would be NaN."""
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not all_finite(t)]
    if bad:
        raise error(f"the model's weights hold NaN or inf values in {_short(bad)}, so {what} would write a file that "
                    "fails to load and computes NaN; load the checkpoint again (an edit after loading did this) or "
                    "re-download / re-train it")


def _check_values(folder, cfg, params, layout, bad_dtype, nonfinite, overflow, head) -> None:
    """load_weights' value checks, once names and shapes match: tensors not stored as floats,
    NaN / inf in the file, values past the model's dtype, a tied head that differs from the
    embeddings ((file key, tensor) or None)."""
    if bad_dtype:
        raise CheckpointError(f"checkpoint {folder} stores {_short(bad_dtype)}, not as floats: a Mamba checkpoint's "
                              "weights are float16, bfloat16 or float32 (integer or fp8 tensors come from another "
                              "tool's quantization); pass the original float checkpoint, and quantize it with "
                              "`mamba-deploy quantize` if need be")
    if nonfinite:
        raise CheckpointError(f"checkpoint {folder} has NaN or infinite values in {_short(nonfinite)}: the file is "
                              "corrupt or the training run diverged; re-download or re-save it")
    if overflow:
        p_dtype = params[to_our_key(overflow[0], layout)].dtype
        fix = ("load it in float32 or bfloat16 (--dtype)" if p_dtype == torch.float16 else
               "the file is corrupt or the training run diverged; re-download or re-save it")
        raise CheckpointError(f"checkpoint {folder} has values in {_short(overflow)} beyond "
                              f"{str(p_dtype).removeprefix('torch.')}'s range, which would load as infinities; {fix}")
    if head is not None:
        emb = params["backbone.embeddings.weight"]
        if not torch.equal(head[1].to(device=emb.device, dtype=emb.dtype), emb):
            key = config_key(cfg, "tie_embeddings")
            raise CheckpointError(f"checkpoint {folder}: its config ties the output head to the embeddings "
                                  f"({key}=true) but the weights hold a separate {head[0]} that differs from them; "
                                  f"set {key} to false in its config (or remove {head[0]} if the head is meant to "
                                  "be the embeddings)")


def check_layer_count(names, n_layer: int, where: str, fix: str) -> None:
    """Before a model of `n_layer` layers is built: the weights (`names`) must hold that many
    (an edited count of 10**9 would otherwise take all the memory building it). More layers in the
    weights than the config says is left to the name check, which names the extra tensors."""
    found = {int(m.group(1)) for n in names if (m := LAYER_INDEX.search(n))}
    held = max(found) + 1 if found else 0
    if n_layer > held:
        raise CheckpointError(f"{where}={n_layer}, but the weights hold {held} layers; {fix}")


def check_depth(folder: Path, cfg: MambaConfig) -> None:
    """check_layer_count for a checkpoint folder, from its tensor names (headers only)."""
    names = [k for k, _ in iter_tensors(folder, shapes_only=True)]
    key = config_key(cfg, "n_layer")
    cfg_name = config_file(folder).name if config_file(folder) else "config.json"
    check_layer_count(names, cfg.n_layer, f"{folder / cfg_name} says {key}",
                      "check that the config belongs to these weights (and that none of the weight files is missing)")


def meta_model(cfg: MambaConfig):
    """MambaLM(cfg) on the meta device: shapes and parameter counts, nothing allocated."""
    from .model import MambaLM

    with torch.device("meta"):
        return MambaLM(cfg)


def check_weight_headers(folder: Path, cfg: MambaConfig, meta=None) -> None:
    """Names and shapes of the weight files against cfg, from the file headers only (`meta`: a
    meta_model(cfg) to reuse): a truncated file, or a config.json that does not fit its weights,
    fails without allocating anything."""
    load_weights(meta if meta is not None else meta_model(cfg), folder, "meta", None, shapes_only=True)


def _pad_vocab(t, rows: int, key: str, vocab_size: int):
    if t.shape[0] < vocab_size:  # zero rows for real ids: logits of exactly 0 that sampling can pick
        raise CheckpointError(f"{key} has {t.shape[0]} vocab rows, fewer than config.json's vocab_size "
                              f"{vocab_size} (ids {t.shape[0]}..{vocab_size - 1} would have no weights); set "
                              f"vocab_size to {t.shape[0]}, or resize the embeddings of the model that added them")
    if t.shape[0] < rows:  # mamba_ssm pads the vocab to a multiple; extra rows are never produced
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    if t.shape[0] > rows:
        raise CheckpointError(f"{key} has {t.shape[0]} vocab rows but config allows {rows}; fix vocab_size in config.json")
    return t


def _short(items, n=8):
    items = list(items)
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------- saving

def check_shard_size(fmt: str, max_shard_bytes) -> None:
    if fmt == "mamba_ssm" and max_shard_bytes is not None:
        raise ConfigError("the mamba_ssm layout is one pytorch_model.bin (mamba_ssm's from_pretrained reads no "
                          "shards); drop the shard size (--max-shard-size), or save in the hf layout")


def save_checkpoint(model, out_dir: str | os.PathLike, fmt: str = "hf",
                    max_shard_bytes: int | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint folder plus the source's tokenizer files, to a temporary folder, then renamed.
    hf: config.json + safetensors, sharded above max_shard_bytes (default DEFAULT_MAX_SHARD_BYTES).
    mamba_ssm: what its MambaLMHeadModel.from_pretrained reads, one pytorch_model.bin (no shards)
    and a config.json of its MambaConfig's keys only, with the token ids in generation_config.json.
    A model whose weights were rounded to a quantized GGUF's type records that type
    (`source_weights`: verify's limits) in the hf config.json, or in mamba_deploy.json."""
    from .model import MambaLM

    if not isinstance(model, MambaLM):  # its missing .config failed as an AttributeError deep in the save
        raise CheckpointError(f"save_checkpoint takes a mamba_deploy model (mamba_deploy.load_model(path)), got "
                              f"{type(model).__name__} {model!r:.60}; to copy a checkpoint folder, load it first")
    if fmt not in SAVE_FORMATS:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; choose one of {sorted(SAVE_FORMATS)}")
    dtype = _dtype_by_name(dtype)
    if dtype is not None and dtype not in LOAD_DTYPES:  # "int8" reached Tensor.to as a device name; int8
        # cast A_log and the norms too and wrote a checkpoint the loader refuses
        raise ConfigError(f"dtype {dtype!r} is not one a checkpoint is saved in; pass one of "
                          f"{', '.join(str(d) for d in LOAD_DTYPES)} (quantize with mamba-deploy quantize)")
    check_shard_size(fmt, max_shard_bytes)
    if max_shard_bytes is not None and not is_whole(max_shard_bytes, 1):  # (the CLI's --max-shard-size, MB, apart)
        raise ConfigError(f"max_shard_bytes must be a whole number of bytes >= 1 (or None for the default, "
                          f"{DEFAULT_MAX_SHARD_BYTES}), got {max_shard_bytes!r:.40}; e.g. 2 * 1024**3 for 2 GiB shards")
    from .progress import progress_wanted
    from .quant.runtime import refuse_quantized

    refuse_quantized(model, f"saving in the {fmt} layout", "convert the unquantized source checkpoint, "
                     "then quantize the result (mamba-deploy quantize)", CheckpointError)
    from .tp import refuse_sharded

    refuse_sharded(model, f"saving in the {fmt} layout", "save the model loaded in one process (without torchrun)",
                   CheckpointError)
    refuse_nonfinite(model, f"saving in the {fmt} layout", CheckpointError)
    cfg: MambaConfig = model.config
    tensors = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[from_our_key(name, fmt)] = t.contiguous()
    label = saved_source_weights(model, dtype)
    if fmt == "mamba_ssm":  # MambaConfig(**config.json) is a dataclass that refuses any key it lacks
        if cfg.tie_embeddings:  # its load_state_dict is strict: the tied head too, as the same tensor
            tensors["lm_head.weight"] = tensors[from_our_key("backbone.embeddings.weight", fmt)]
        records = {SOURCE_WEIGHTS: label} if label else None
        return write_folder(out_dir, cfg.to_mamba_ssm_dict(), tensors, tokenizer_source(model),
                            progress=progress_wanted(model), token_ids=cfg, records=records, single_bin=True)
    config = cfg.to_hf_dict()
    if label:  # transformers keeps an unknown key as an attribute
        config[SOURCE_WEIGHTS] = label
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return write_folder(out_dir, config, tensors, tokenizer_source(model),
                        DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes,
                        progress=progress_wanted(model))


def saved_source_weights(model, dtype: torch.dtype | None = None) -> str | None:
    """The quantized-GGUF weight type a checkpoint saved from `model` in `dtype` records
    (SOURCE_WEIGHTS), or None: a q8_0 GGUF's weights saved in fp16 keep q8_0's limits, an F16
    GGUF's saved in bf16 get bf16's (the looser of the two)."""
    from .export import EXACT_TYPES, source_weights

    label = source_weights(model)
    if label and dtype is not None:
        from .tolerances import dtype_label, looser_label

        label = looser_label(dtype_label(dtype), label)
    return None if label in EXACT_TYPES else label


def write_folder(out_dir, config: dict, tensors: dict, tokenizer_src=None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False,
                 token_ids: MambaConfig | None = None, records: dict | None = None,
                 single_bin: bool = False) -> Path:
    """Atomically write a checkpoint folder: config.json, (sharded) safetensors, tokenizer files.
    progress: a bar over the bytes written, on stderr, advanced as each shard is written.
    token_ids: a config whose bos / eos / pad ids go into generation_config.json (mamba_ssm layout).
    records: this toolkit's notes a layout has no key for, written as RECORDS_FILE.
    single_bin: one pytorch_model.bin instead (mamba_ssm), where a tensor under two names is stored once."""
    from .progress import progress_bar

    out_dir = output_path(out_dir)
    total = sum(_nbytes(t) for t in {id(t): t for t in tensors.values()}.values())
    with atomic_dir(out_dir, CheckpointError) as tmp, progress_bar(total, "writing checkpoint", progress) as bar:
        if single_bin:
            torch.save(tensors, tmp / "pytorch_model.bin")
            bar.update(total)
        else:
            _write_safetensors(tmp, tensors, max_shard_bytes, total, bar)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer_files(tokenizer_src, tmp, out_dir)
        if token_ids is not None:
            write_generation_token_ids(token_ids, tmp)
        if records:
            (tmp / RECORDS_FILE).write_text(json.dumps(records, indent=2))
    return Path(out_dir)


def _write_safetensors(folder: Path, tensors: dict, max_shard_bytes: int, total: int, bar) -> None:
    """model.safetensors, or shards of at most max_shard_bytes and their index (total: all bytes)."""
    from safetensors.torch import save_file

    from .pathnames import text_path

    shards = _shards(tensors, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for fname, shard in zip(names, shards):
        with text_path(folder / fname) as name:  # safetensors takes UTF-8 names only
            save_file(shard, name, metadata={"format": "pt"})
        bar.update(sum(_nbytes(t) for t in shard.values()))
    if n > 1:
        weight_map = {k: fname for fname, shard in zip(names, shards) for k in shard}
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _shards(tensors: dict, max_shard_bytes: int) -> list[dict]:
    """name -> tensor split, in order, into dicts of at most max_shard_bytes (a larger tensor alone)."""
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        if cur and size + _nbytes(t) > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += _nbytes(t)
    shards.append(cur)
    return shards


def stored_dtype(path_or_hub_id, exact: bool = False) -> torch.dtype | None:
    """The float dtype a checkpoint folder's weights are stored in: the one holding most of their
    float elements (read from the safetensors headers, or a memory-mapped pytorch_model.bin), else
    its config's `torch_dtype`; or None. The weights, not the config, decide: a fine-tune saved in
    float32 under a config still saying bfloat16 would otherwise be converted to bf16 silently
    (and verified against the bf16 row). A quantized folder's floats are its scales: its config's.
    exact: one dtype that holds every stored float unrounded instead (float32 for a folder that
    mixes float dtypes, e.g. bf16 matrices beside float32 A_log / D), for `convert`: the bulk's
    dtype decides verify's tolerance row, and would round the rest."""
    return stored_dtypes(path_or_hub_id)[exact]


def checkpoint_path(path) -> Path:
    """A local path as load_model reads it: `~` expanded (a quoted "~/model" reaches it
    unexpanded), and a checkpoint folder's config file standing for the folder."""
    path = Path(path).expanduser()
    return path.parent if path.is_file() and path.name in CONFIG_FILES else path


def stored_dtypes(path_or_hub_id) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(stored_dtype, stored_dtype(exact=True)) from one reading of the weights' headers."""
    path = checkpoint_path(path_or_hub_id)
    if not path.is_dir():
        return None, None
    raw = read_json_object(path / "config.json")
    name = raw.get("torch_dtype") or raw.get("dtype")  # transformers >= 5 writes "dtype"
    declared = FLOAT_DTYPES.get(name) if isinstance(name, str) else None  # a list, an int: not a dtype
    counts = {} if "quantization_config" in raw else stored_float_counts(path)
    if not counts:
        return declared, declared
    bulk = max(counts, key=counts.get)
    # float16, bfloat16 and float32 values are all float32 values
    return bulk, (torch.float32 if len(counts) > 1 else bulk)


def stored_float_counts(path: Path) -> dict[torch.dtype, int]:
    """Float elements per stored dtype of a folder's weights (headers only); empty when unreadable
    (the loader's error to report)."""
    counts: dict[torch.dtype, int] = {}
    try:
        for _, t in iter_tensors(path, shapes_only=True):
            if t.dtype in SAFETENSORS_FLOATS.values():
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    except (MambaDeployError, OSError, ValueError):
        return {}
    return counts


# ----------------------------------------------------------------------------- the public loader

LOAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dtype_by_name(dtype):
    """"bf16", "float32"... as the CLI's --dtype and set_state_dtype take them -> the torch dtype;
    anything else as it is (checked by the caller)."""
    return DTYPE_NAMES.get(dtype.lower(), dtype) if isinstance(dtype, str) else dtype


def load_model(path_or_hub_id, device="cpu", dtype: torch.dtype = torch.float32, state_dtype=None,
               revision: str | None = None, *, _slicer=None):
    """Load a Mamba/Mamba2 checkpoint folder, hub id, or .gguf file into a `MambaLM`.

    Quantized checkpoints (config.json with `quantization_config`) load with their quantized
    modules swapped in. state_dtype: the SSM state's dtype (`MambaLM.set_state_dtype`; default
    float32). revision: a hub id's branch, tag or commit (also written 'org/name@REVISION').
    _slicer: tp.load_sharded's (a checkpoint folder is then built at a rank's size and filled with
    its slices; a GGUF or quantized model loads whole, on the CPU, and _slicer.applied stays False).
    """
    if not isinstance(path_or_hub_id, (str, os.PathLike)):
        raise ModelNotFoundError(f"load_model takes a path or hub id (str or Path), got "
                                 f"{type(path_or_hub_id).__name__} {path_or_hub_id!r:.60}")
    if revision is not None:
        if local_path(path_or_hub_id) is not None or split_revision(str(path_or_hub_id))[1] is not None:
            raise ConfigError(f"revision={revision!r} applies to a hub id without '@REVISION'; "
                              f"{str(path_or_hub_id)!r} is a local path or names its revision already")
        path_or_hub_id = f"{path_or_hub_id}@{revision}"
    dtype = _dtype_by_name(dtype)
    if dtype not in LOAD_DTYPES:  # a string would reach Module.to as a device name
        raise ConfigError(f"dtype {dtype!r} is not one a model loads in; pass one of "
                          f"{', '.join(str(d) for d in LOAD_DTYPES)} (or its name: {', '.join(DTYPE_NAMES)})")
    # inference only: parameters that require grad would make every call outside inference_mode
    # build an autograd graph chained through the in-place state (memory grows per token)
    model = _load_model(path_or_hub_id, check_device(device), dtype, _slicer).eval().requires_grad_(False)
    return model.set_state_dtype(state_dtype) if state_dtype is not None else model


def check_device(device) -> torch.device:
    """A torch device this process can use (cpu, cuda, cuda:N), or a typed error naming it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r}: torch {torch.__version__} sees no CUDA GPU here; "
                                      "use --device cpu, or install a CUDA build of torch on a GPU machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def _load_model(path_or_hub_id, device, dtype, slicer=None):
    path = resolve(path_or_hub_id)
    whole_on = device if slicer is None else torch.device("cpu")  # a model loaded whole, to be sliced after
    if path.is_file():
        if is_gguf(path):
            with needs_packages("reading a GGUF file"):
                from .export.gguf_import import load_gguf

            return load_gguf(path, device=whole_on, dtype=dtype)
        if path.name in CONFIG_FILES:
            path = path.parent
        else:
            raise ModelNotFoundError(f"{path} is a file; pass the checkpoint folder or a .gguf file")
    cfg = read_config(path)
    check_depth(path, cfg)  # before any model of the config's depth is built
    raw = read_raw_config(path)
    if "quantization_config" in raw:
        if slicer is not None:
            from .quant.plan import refuse_foreign

            refuse_foreign(raw["quantization_config"])  # told that no process reads it, not to use one
            slicer.refuse_quantized(path)
        from .quant.runtime import load_quantized

        model = load_quantized(path, cfg, raw["quantization_config"], device=whole_on, dtype=dtype)
        label = recorded_source_weights(path, raw)  # quantized from a quantized GGUF: its exports record it too
        if label:
            model.source_weights = label
        return model
    check_weight_headers(path, cfg)  # before a model of the config's size is allocated
    model = _unfilled_model(cfg if slicer is None else slicer.config(cfg), device, dtype)
    # every parameter (a missing one is a CheckpointError)
    load_weights(model, path, device, dtype, take=None if slicer is None else slicer.take)
    if slicer is not None:
        slicer.applied = True
    model.source_path = path
    label = recorded_source_weights(path, raw)  # `convert` of a quantized GGUF: carried to later converts and exports
    if label:
        model.source_weights = label
    return model


def recorded_source_weights(folder: Path, config: dict | None = None) -> str | None:
    """The quantized-GGUF weight type a converted checkpoint records (save_checkpoint): config.json's
    source_weights (`config`: that file, when the caller has read it), else RECORDS_FILE's (the
    mamba_ssm layout); or None."""
    config = read_json_object(folder / "config.json") if config is None else config
    label = config.get(SOURCE_WEIGHTS) or read_json_object(folder / RECORDS_FILE).get(SOURCE_WEIGHTS)
    return label.lower() if isinstance(label, str) and label else None


def _unfilled_model(cfg: MambaConfig, device, dtype):
    """MambaLM(cfg) on `device` in `dtype` with its parameters allocated, not initialised, for
    load_weights to fill. Built for real it would run the random init of every weight (seconds
    for billions), allocate the tied lm_head before tying it (the embeddings' size again), and
    for a 16-bit load hold the float32 model beside its cast (3x the 16-bit model at the peak)."""
    from .model import MambaLM

    with torch.device("meta"):
        model = MambaLM(cfg).to(dtype)
    model = model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives the two modules a tensor each
        model.lm_head.weight = model.backbone.embeddings.weight
    return model
