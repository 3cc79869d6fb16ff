"""The offline corpus (the Python standard library's own .py files), its train/validation split,
the demo models' BPE tokenizer, and token streams cached as .npy files.

Split rule (stable across Python versions and machines): a file belongs to validation when the
first 8 bytes of sha256(its path relative to the stdlib root, '/'-separated), read as a
big-endian integer, are < VAL_PERCENT % of 2**64. Different Python versions ship different
files, but a file present in both always lands on the same side.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import sysconfig
import warnings
from pathlib import Path

import numpy as np

from .atomic import (atomic_file, check_writable, prepare_output_dir, prepare_output_file, read_json_object,
                     write_bytes, write_files)
from .errors import ConfigError, ModelNotFoundError, OutputPathError

VAL_PERCENT = 10
# Folders skipped anywhere below the stdlib root: tests (huge, repetitive), third-party packages,
# and `encodings` (machine-generated codec tables that would make perplexity look better).
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings",
                           "__pycache__"})
EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)
CORPORA = ("stdlib-train", "stdlib-val")
MIN_BPE_VOCAB = 300  # the 256 byte tokens, the specials and some merges


def read_text_file(path, flag: str, error=ConfigError) -> str:
    """A user's text file (--text, --calib), strictly UTF-8: bytes replaced by U+FFFD would score
    or calibrate on a text that is not the file's. `error` is the typed error to raise."""
    try:
        # bytes decoded, not read_text: that turns "\r\n" into "\n", a text the file does not hold
        return Path(path).expanduser().read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {flag} {str(path)!r} as UTF-8 text: {e}; pass a text file, converted to "
                    "UTF-8 if it is in another encoding (e.g. iconv -f latin1 -t utf-8)") from e


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """'train' or 'val' for a '/'-separated path relative to the stdlib root."""
    h = int.from_bytes(hashlib.sha256(os.fsencode(relpath)).digest()[:8], "big")
    return "val" if h < VAL_PERCENT * (1 << 64) // 100 else "train"


def corpus_files(split: str, root: Path | None = None) -> list[tuple[str, Path]]:
    """Sorted [(relpath, path)] of the stdlib .py files in `split` ('train' | 'val')."""
    if split not in ("train", "val"):
        raise ConfigError(f"unknown split {split!r}; choose 'train' or 'val'")
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise ModelNotFoundError(f"the standard library folder {root} does not exist; is this a full Python install?")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in filenames:
            p = Path(dirpath) / name
            if name.endswith(".py") and p.is_file():  # not a dangling link (Debian's sitecustomize.py) or a FIFO
                rel = p.relative_to(root).as_posix()
                if split_of(rel) == split:
                    out.append((rel, p))
    out.sort()
    if not out:
        raise ModelNotFoundError(f"no .py files for split {split!r} under {root}; the stdlib sources are missing")
    return out


def corpus_texts(split: str, root: Path | None = None):
    """Yield each file's text (undecodable bytes replaced, so every install reads the same)."""
    for _, p in corpus_files(split, root):
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ModelNotFoundError(f"cannot read the corpus file {p}: {e.strerror or e}; make it readable "
                                     "or remove it") from e
        yield data.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- tokenizer

def prepare_tokenizer_dir(out_dir, overwrite: bool = False) -> Path:
    """Check up front that train_tokenizer can write into `out_dir`: a new or empty folder under a
    writable parent, or (overwrite=True) an existing writable folder whose tokenizer files are
    replaced. OutputPathError otherwise."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output {out} is a file, not a folder; choose a folder path for the tokenizer")
    if overwrite and out.is_dir():
        check_writable(out, f"{out} is not writable", "choose an output path under a writable folder")
        return out
    if out.is_dir() and any(out.iterdir()):
        has = "already has a tokenizer.json" if (out / "tokenizer.json").exists() else "is not empty"
        raise OutputPathError(f"output folder {out} {has}; choose a new path, delete it, or pass --overwrite "
                              "to replace its tokenizer files")
    return prepare_output_dir(out, OutputPathError)


def train_tokenizer(out_dir, vocab_size: int = 4096, root: Path | None = None, overwrite: bool = False) -> Path:
    """Byte-level BPE trained on the train split only; writes tokenizer.json,
    tokenizer_config.json and special_tokens_map.json (transformers' AutoTokenizer reads them).
    `out_dir` must be new or empty unless overwrite=True (checked before training)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"vocab_size={vocab_size} is too small for byte-level BPE (256 bytes + specials); "
                          f"use >= {MIN_BPE_VOCAB}")
    out = prepare_tokenizer_dir(out_dir, overwrite)  # before minutes of BPE training, not after
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  # its bar goes to stdout (blank lines in a redirected stdout): a terminal only
                                  show_progress=sys.stdout.isatty())
    tok.train_from_iterator(corpus_texts("train", root), trainer=trainer)
    files = {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
            "pad_token": PAD, "unk_token": None, "model_max_length": 1_000_000,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        }, indent=2),
        "special_tokens_map.json": json.dumps({"eos_token": EOS, "bos_token": EOS, "pad_token": PAD}, indent=2),
    }
    write_files(out, {name: text.encode() for name, text in files.items()})  # one set: never old and new mixed
    return out


def tokenizer_digest(tokenizer_dir) -> str:
    return hashlib.sha256((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- token streams

ENCODE_CHUNK = 32  # files per encode_batch call in encode_split


def encode_split(tokenizer, split: str, root: Path | None = None, progress: bool = True) -> np.ndarray:
    """One stream: every file's tokens followed by EOS, files in sorted path order. (n,) int32.
    `tokenizer`: any object with encode(str) and eos_token_id (a Runner's tokenizer: ours,
    llama.cpp's); encode_batch(texts), where it has one, is used for speed. progress: a bar on
    stderr while encoding."""
    texts = list(corpus_texts(split, root))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'path', None) or type(tokenizer).__name__} has no eos "
                          "token to separate files; use a tokenizer that defines one (e.g. from train-tokenizer)")
    from tqdm.auto import tqdm

    batch = getattr(tokenizer, "encode_batch", None) or (lambda chunk: [tokenizer.encode(t) for t in chunk])
    out = []
    # ENCODE_CHUNK files per call, not the whole split in one: Ctrl-C is seen between calls (one
    # call into the Rust tokenizer took seconds, deaf to it), and the bar can move
    with tqdm(total=len(texts), desc=f"encoding {split}", unit="file", leave=False,
              disable=not progress) as bar:
        for i in range(0, len(texts), ENCODE_CHUNK):
            for ids in batch(texts[i:i + ENCODE_CHUNK]):
                out.extend(ids)
                out.append(eos)
            bar.update(min(ENCODE_CHUNK, len(texts) - i))
    return np.asarray(out, dtype=np.int32)


def _cached_split(path: Path) -> np.ndarray | None:
    """A cached split's ids, or None (with a warning) when the file cannot be read whole: a copy
    cut short on its way to the training machine is encoded again, not a traceback."""
    try:
        ids = np.load(path)
    except (OSError, ValueError, EOFError) as e:
        warnings.warn(f"the cached split {path} cannot be read ({e}); encoding it again", stacklevel=3)
        return None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        warnings.warn(f"the cached split {path} holds {ids.dtype} {ids.shape}, not token ids; encoding it again",
                      stacklevel=3)
        return None
    return ids


def load_split(tokenizer_dir, split: str, cache_dir=None, root: Path | None = None) -> np.ndarray:
    """encode_split, cached in cache_dir/{split}.npy keyed by the tokenizer's digest.
    meta.json records the digest each split was encoded with ("{split}_tokenizer_digest"); a split
    whose digest is missing or different is re-encoded, and when the tokenizer changes every other
    cached split is dropped, so a stream from another tokenizer is never loaded.
    A cache made elsewhere (another Python version) is used as is; meta.json says where it came from."""
    from .tokenizer import load_tokenizer

    digest = tokenizer_digest(tokenizer_dir)
    key = f"{split}_tokenizer_digest"
    if cache_dir is not None:
        cache = Path(cache_dir)
        meta_path, arr_path = cache / "meta.json", cache / f"{split}.npy"
        meta = read_json_object(meta_path)  # {} when absent or unreadable: the split is encoded again
        if cache.exists() and not cache.is_dir():
            raise ConfigError(f"--data-cache {cache} is a file; pass a folder for the encoded splits (it is created "
                              "if missing), or leave --data-cache out")
        if arr_path.exists() and meta.get("tokenizer_digest") == digest:
            ids = _cached_split(arr_path)
            if ids is not None and meta.get(key) == digest:
                return ids
            # a cache from before per-split digests: trust a split only where meta counted it (a
            # stale split has no count there)
            if ids is not None and key not in meta and meta.get(f"{split}_tokens") == int(ids.size):
                return ids
        prepare_output_file(arr_path)  # an unwritable cache folder fails now, not after encoding
    ids = encode_split(load_tokenizer(tokenizer_dir), split, root)
    if cache_dir is not None:
        meta = read_json_object(meta_path)
        if meta.get("tokenizer_digest") != digest:
            # another tokenizer's streams: none of them may be loaded for this one
            for name in ("train", "val"):
                if name != split:
                    (cache / f"{name}.npy").unlink(missing_ok=True)
            meta = {}
        meta.update(tokenizer_digest=digest, python=sys.version.split()[0], stdlib=str(stdlib_root()),
                    val_percent=VAL_PERCENT, excluded_dirs=sorted(EXCLUDED_DIRS))
        meta[f"{split}_tokens"] = int(ids.size)
        meta[f"{split}_files"] = len(corpus_files(split, root))
        meta[key] = digest
        # the array and meta.json are two renames: meta first loses this split's digest and count,
        # so a kill between them leaves a split that is encoded again, never another tokenizer's
        # ids under this one's digest
        interim = {k: v for k, v in meta.items() if k not in (key, f"{split}_tokens")}
        write_bytes(meta_path, json.dumps(interim, indent=2).encode())
        with atomic_file(arr_path) as tmp, open(tmp, "wb") as f:
            np.save(f, ids)
        write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    return ids


def unigram_perplexity(train_ids, eval_ids, vocab_size: int) -> float:
    """Perplexity of add-one-smoothed unigram counts from `train_ids`, scored on `eval_ids`
    (float64). The baseline a trained model must beat by far."""
    counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=vocab_size).astype(np.float64)[:vocab_size]
    logp = np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)
    nll = -logp[np.asarray(eval_ids, dtype=np.int64)].mean()
    return float(math.exp(nll))
