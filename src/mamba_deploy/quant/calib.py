"""Calibration data and the block-by-block driver shared by GPTQ, AWQ and SmoothQuant.

Default calibration text (offline): a fixed list of Python stdlib modules, read from this
interpreter's own library, so it is the same on every machine with the same Python.
The driver quantizes one block at a time and feeds the next block the *quantized* block's
output, so later layers calibrate on the activations they will really see.
"""

from __future__ import annotations

import codecs
import os
import sysconfig
import warnings
from pathlib import Path

import torch

from ..data import read_text_file
from ..errors import ModelNotFoundError, QuantizationError
from ..inputs import first_out_of_vocab
from ..tokenizer import PREFIX_MARGIN

# all on the *train* side of mamba_deploy.data's split, so calibration never sees validation text
CALIB_STDLIB_FILES = ("textwrap.py", "string.py", "fractions.py", "heapq.py", "bisect.py", "shlex.py",
                      "difflib.py", "argparse.py", "functools.py")
CALIB_SEQS, CALIB_LEN = 16, 256  # sequences x tokens
# a --calib file past n_seq windows of this many bytes per wanted token (a token rarely spans
# more) is read in windows, not whole; a window must tokenize to WINDOW_MARGIN tokens past seq_len
WINDOW_BYTES_PER_TOKEN, WINDOW_MARGIN = 32, 16
MAX_SAMPLE_ROWS = 4096  # activation rows kept per linear for AWQ's error search


def builtin_text(max_chars: int = 400_000) -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(lib / f).read_text(errors="replace") for f in CALIB_STDLIB_FILES if (lib / f).exists()]
    if not parts:
        raise QuantizationError(f"no built-in calibration text found under {lib}; pass --calib FILE")
    return "\n".join(parts)[:max_chars]


def calibration_ids(model, calib=None, n_seq: int = CALIB_SEQS, seq_len: int = CALIB_LEN) -> torch.Tensor:
    """-> (n_seq, seq_len) token ids. `calib`: None (built-in text), a text file path, a string,
    or a LongTensor of ids. Without a tokenizer, text is read as UTF-8 bytes modulo the vocab.
    A file larger than its windows is not read whole: see _file_windows."""
    if calib is not None and not isinstance(calib, (str, os.PathLike)):  # token ids: a tensor, array or list
        ids = _given_ids(model, calib)
    else:
        path, text = _calib_source(calib)
        if path is not None:
            windows = _file_windows(model, path, n_seq, seq_len)
            if windows is not None:
                return windows
            text = read_text_file(path, "calibration file", QuantizationError)
        ids = torch.tensor(_encode(model, _tokenizer(model), text), dtype=torch.long)
    n = min(n_seq, ids.numel() // seq_len)
    if n < 1:
        raise QuantizationError(f"calibration data has {ids.numel()} tokens, fewer than one sequence of calib_len="
                                f"{seq_len} (--calib-len); lower --calib-len, or pass a longer --calib file")
    if n < n_seq:  # said, not silently shrunk: fewer sequences calibrate less well
        warnings.warn(f"calibration data has {ids.numel()} tokens: {n} sequence(s) of calib_len={seq_len} instead "
                      f"of n_calib={n_seq} (--n-calib); pass a longer --calib file, or lower --calib-len",
                      stacklevel=2)
    # evenly spaced windows so a long file is sampled throughout
    starts = torch.linspace(0, ids.numel() - seq_len, n).long()
    return torch.stack([ids[s:s + seq_len] for s in starts])


def _given_ids(model, calib) -> torch.Tensor:
    try:
        ids = torch.as_tensor(calib).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise QuantizationError(f"calib_ids must be token ids (a LongTensor), got {type(calib).__name__}: "
                                f"{e}") from e
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise QuantizationError(f"calib_ids must be integer token ids, got dtype {ids.dtype}; "
                                "tokenize the text (or pass it as calib=)")
    ids = ids.long()
    bad = first_out_of_vocab(ids, model.config.vocab_size)
    if bad is not None:
        raise QuantizationError(f"calib_ids: token id {bad} is outside the vocabulary of "
                                f"{model.config.vocab_size}; tokenize with this model's tokenizer")
    return ids


def _calib_source(calib) -> tuple[Path | None, str | None]:
    """(a file to read, None) or (None, the text itself) for --calib / calib=."""
    if calib is None:
        return None, builtin_text()
    path = Path(str(calib)).expanduser()
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError:  # a name too long for the file system: text, not a path
        is_file = is_dir = False
    if is_file:
        return path, None
    if isinstance(calib, str) and not is_dir and (len(calib) > 200 or "\n" in calib) \
            and not (os.sep in calib and not any(c.isspace() for c in calib)):  # the text itself
        return None, calib
    what = "is a folder" if is_dir else "not found"
    raise QuantizationError(f"calibration file {str(calib)!r} {what}; pass a text file or omit --calib")


def _tokenizer(model):
    """The model's tokenizer, or None (with a warning) for a checkpoint without one."""
    try:
        return model.tokenizer
    except ModelNotFoundError as e:  # no tokenizer files next to the checkpoint
        warnings.warn(f"calibrating on the text's UTF-8 bytes as token ids, whose activations are less like "
                      f"real inputs': {e}", stacklevel=3)
        return None


def _encode(model, tok, text: str, add_special_tokens: bool = True) -> list[int]:
    if tok is None:
        return [b % model.config.vocab_size for b in text.encode()]
    return tok.encode(text, add_special_tokens=add_special_tokens)


def _file_windows(model, path: Path, n_seq: int, seq_len: int) -> torch.Tensor | None:
    """(n_seq, seq_len) ids tokenized from windows read at evenly spaced offsets of a file larger
    than those windows, or None for a file to tokenize whole. A whole file held ~180 MiB of
    tokenizer output per MB of text, where calibration keeps n_seq x seq_len tokens. A window
    starts after a line break and keeps its first seq_len tokens (a cut changes only the tokens
    of its last words); only the first window, at the file's start, gets the tokenizer's BOS."""
    span = WINDOW_BYTES_PER_TOKEN * (seq_len + PREFIX_MARGIN)
    size = path.stat().st_size
    if size <= n_seq * span:
        return None
    rows, tok = [], _tokenizer(model)
    try:
        f = open(path, "rb")
    except OSError as e:  # as read_text_file says it for a file read whole
        raise QuantizationError(f"cannot read calibration file {str(path)!r}: {e}; pass a readable text file") from e
    with f:
        for start in torch.linspace(0, size - span, n_seq).long().tolist():
            n = span
            while True:
                f.seek(start)
                ids = _encode(model, tok, _window_text(f.read(n), start, path), add_special_tokens=start == 0)
                if len(ids) >= seq_len + WINDOW_MARGIN:
                    break
                if start + n >= size:  # to the file's end and still short: a sparse file, read it whole
                    return None
                n *= 2
            rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.long)


def _window_text(raw: bytes, start: int, path: Path) -> str:
    if start:  # from the first line break on, or else from the first whole UTF-8 character
        cut = raw.find(b"\n") + 1 or next((i for i, b in enumerate(raw) if b & 0xC0 != 0x80), len(raw))
        raw = raw[cut:]
    try:  # incremental, not final: a character cut at the window's end is left out, not an error
        return codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
    except UnicodeDecodeError as e:
        raise QuantizationError(f"cannot read calibration file {str(path)!r} as UTF-8 text: {e} (in the window "
                                f"from byte {start}); pass a text file, converted to UTF-8 if it is in another "
                                "encoding (e.g. iconv -f latin1 -t utf-8)") from e


class Stats:
    """Input statistics of one Linear over calibration tokens."""

    def __init__(self, in_features: int, need_hessian: bool):
        self.n = 0
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64) if need_hessian else None
        self.absmax = torch.zeros(in_features)
        self.absmean = torch.zeros(in_features, dtype=torch.float64)
        self.sample: list[torch.Tensor] = []
        self.kept = 0

    def add(self, x: torch.Tensor):
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()  # (t, in)
        if self.H is not None:
            self.H += x.double().T @ x.double()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.absmean += x.abs().double().sum(0)
        self.n += x.shape[0]
        if self.kept < MAX_SAMPLE_ROWS:
            take = x[: MAX_SAMPLE_ROWS - self.kept]
            self.sample.append(take)
            self.kept += take.shape[0]

    @property
    def X(self) -> torch.Tensor:
        return torch.cat(self.sample)

    @property
    def hessian(self) -> torch.Tensor:
        return 2 * self.H / max(self.n, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.absmean / max(self.n, 1)).float()


@torch.no_grad()
def run_blockwise(model, ids, block_targets: dict, quantize_block, need_hessian=False, progress=True):
    """For each block: collect Stats for its target linears (names relative to the model), call
    quantize_block(layer_index, {name: Stats}), then recompute the block's output with the
    quantized modules for the next block. Returns nothing; modules are swapped by the callback."""
    from tqdm import tqdm

    from ..runners.base import release_freed_memory

    dev = model.device
    ids = ids.to(dev)
    cfg = model.config
    h = model.backbone.embeddings(ids)  # (n, l, d_model)
    layers = model.backbone.layers
    for i in tqdm(range(len(layers)), desc="calibrating layers", disable=not progress):
        names = block_targets.get(i, [])
        stats = {n: Stats(model.get_submodule(n).in_features, need_hessian) for n in names}
        hooks = [model.get_submodule(n).register_forward_pre_hook(_collector(stats[n])) for n in names]
        try:
            _run_block(layers[i], h, cfg)
        finally:
            for hk in hooks:
                hk.remove()
        quantize_block(i, stats)
        h = _run_block(layers[i], h, cfg)
        del stats
        # each block's temporaries (Hessians, AWQ's search) fragment glibc's heap: a 210M Mamba2's
        # AWQ grew from 1.4 to 2.25 GB over 24 layers, and stayed flat with glibc told to unmap them
        release_freed_memory()


def _collector(stats: Stats):
    def hook(module, args):
        stats.add(args[0])
    return hook


def _run_block(layer, h, cfg):
    from ..state import State

    out = []
    for j in range(0, h.shape[0], 4):  # a few sequences at a time bounds peak memory
        hj = h[j:j + 4]
        st = State.zeros(cfg, hj.shape[0], hj.device, hj.dtype)
        y, _, _ = layer(hj, st.conv[0], st.ssm[0])
        out.append(y.to(h.dtype))
    return torch.cat(out)
