"""Checks on what users feed a model or a Runner (token ids, attention masks), shared by every
backend so that a bad input gets the same typed error everywhere instead of an IndexError from
torch, a RuntimeError from ONNX Runtime or `llama_decode failed -1` from llama.cpp."""

from __future__ import annotations

import os

import numpy as np
import torch

from .errors import ConfigError, ShapeError

_WANT = {1: "(batch,)", 2: "(batch, seqlen)"}


def check_ids(ids, ndim: int, vocab: int, on_device: bool = False) -> torch.Tensor:
    """ids -> the same ids as an int64 tensor on their device, after checking the rank (2 for
    prefill, 1 for a decode step), the dtype, a sequence length >= 1 and every id in [0, vocab).
    On CUDA the range check synchronises, so it runs there only with on_device=True (prefill;
    an out-of-range id would otherwise end in a device-side assert that poisons the context)."""
    if isinstance(ids, np.ndarray):
        if not np.issubdtype(ids.dtype, np.integer):
            raise ShapeError(f"ids must be an integer tensor of shape {_WANT[ndim]}, got {ids.dtype} {ids.shape}")
        if ids.dtype == np.uint64 and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
            raise ShapeError(f"token id {int(ids.max())} outside the vocabulary [0, {vocab}); "
                             "was the prompt tokenized with this model's tokenizer?")
        ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))  # any stride / byte order / width
    elif not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ShapeError(f"ids must be an integer tensor of shape {_WANT[ndim]}, got {type(ids).__name__}") from e
    if ids.dim() != ndim or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ShapeError(f"ids must be an integer tensor of shape {_WANT[ndim]}, got {ids.dtype} {tuple(ids.shape)}")
    if ndim == 2 and ids.shape[1] == 0:
        raise ShapeError("input_ids has length 0; give at least one token")
    if ids.device.type == "meta":
        raise ShapeError("ids are on the meta device, which holds no values; pass real token ids (a CPU tensor, "
                         "or one on the model's device)")
    if ids.dtype == getattr(torch, "uint64", None) and ids.numel() and (ids.device.type == "cpu" or on_device) \
            and bool((ids.view(torch.int64) < 0).any()):  # >= 2**63: the int64 cast below would make it negative
        big = int(ids.view(torch.int64)[ids.view(torch.int64) < 0][0]) + 2**64
        raise ShapeError(f"token id {big} outside the vocabulary [0, {vocab}); "
                         "was the prompt tokenized with this model's tokenizer?")
    ids = ids.long()  # before the range check: aminmax has no kernel for some unsigned widths
    if ids.numel() and (ids.device.type == "cpu" or on_device):
        lo, hi = (int(v) for v in torch.aminmax(ids))  # one pass: this runs every decode step
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ShapeError(f"token id {bad} outside the vocabulary [0, {vocab}); "
                             "was the prompt tokenized with this model's tokenizer?")
    return ids


def first_out_of_vocab(ids: torch.Tensor, vocab: int) -> int | None:
    """The first id of a whole stream outside [0, vocab), for a message naming it (not the
    stream's max: a negative id may be the bad one), or None. check_ids keeps its one-pass
    aminmax: it runs every decode step."""
    bad = ids[(ids < 0) | (ids >= vocab)]
    return int(bad[0]) if bad.numel() else None


def token_stream(ids, name: str) -> torch.Tensor:
    """One stream of token ids (list, array or tensor; (n,) or (1, n)) -> LongTensor (n,). A batch,
    floats or bools are a ShapeError: flattened or truncated they would be scored as something
    the caller did not mean."""
    if isinstance(ids, (list, tuple)) and len(ids) == 0:  # numpy would call [] float64
        return torch.zeros(0, dtype=torch.long)
    try:
        t = torch.as_tensor(np.asarray(ids) if isinstance(ids, (list, tuple)) else ids)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ShapeError(f"{name} must be token ids (a list, array or tensor of integers): {e}") from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ShapeError(f"{name} must be integer token ids, got {t.dtype}; tokenize the text first")
    if t.dim() > 2 or (t.dim() == 2 and t.shape[0] != 1):
        raise ShapeError(f"{name} must be one stream, shape (n,) or (1, n), got {tuple(t.shape)}; score the rows "
                         "one at a time")
    return t.reshape(-1).long()


def check_mask(attention_mask, ids_shape) -> torch.Tensor | None:
    """attention_mask (b, l) of 0/1 (left padding) or None -> int64 tensor or None."""
    if attention_mask is None:
        return None
    try:
        if isinstance(attention_mask, np.ndarray):
            attention_mask = np.ascontiguousarray(attention_mask)  # negative strides / other byte orders
        elif isinstance(attention_mask, (list, tuple)):
            attention_mask = np.asarray(attention_mask)
        mask = torch.as_tensor(attention_mask)
    except (TypeError, ValueError, RuntimeError) as e:  # ragged rows, strings, objects
        raise ShapeError(f"attention_mask must be a (batch, length) array of 0 and 1, got "
                         f"{type(attention_mask).__name__} {attention_mask!r:.60}: {e}") from None
    if tuple(mask.shape) != tuple(ids_shape):
        raise ShapeError(f"attention_mask has shape {tuple(mask.shape)}, expected {tuple(ids_shape)}")
    if mask.device.type == "meta":
        raise ShapeError("attention_mask is on the meta device, which holds no values; pass a real 0/1 mask "
                         "(a CPU tensor, list or numpy array)")
    if mask.dtype.is_complex:  # torch.unique (in _values) has no complex kernel
        raise ShapeError(f"attention_mask must hold 0 (padding) and 1 (token), got {mask.dtype}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ShapeError(f"attention_mask must hold 0 (padding) and 1 (token), got {_values(mask)}")
    mask = mask.long()
    # left padding only: a 0 after a 1 would be a hole (or right padding) inside the state's
    # history. An all-0 row is allowed: its state stays as it was (zero for a fresh state).
    bad = ((mask[:, 1:] - mask[:, :-1]) < 0).any(-1)
    if bad.any():
        r = int(bad.nonzero()[0, 0])
        raise ShapeError(f"attention_mask row {r} is {mask[r].tolist()[:16]}{'...' if mask.shape[1] > 16 else ''}; "
                         "rows must be left padding (0s, then 1s): pad prompts on the left")
    return mask


def padded_rows(mask) -> list[int]:
    """Rows of a checked mask (b, l) (tensor or numpy) that hold padding."""
    return [] if mask is None else torch.as_tensor(mask).eq(0).any(-1).nonzero()[:, 0].tolist()


def check_padding_fresh(mask, arrays, make: str = "runner.new_state") -> None:
    """A left-padded row needs a zero (fresh) state: the padding is masked out of the update, but a
    state that already holds tokens would still decay over the padded positions and its conv
    window would see the padding. arrays: the state's per-layer arrays, batch first (numpy or
    torch; read where they live). ShapeError naming the rows; `make` names the fresh-state call."""
    rows = padded_rows(mask)
    if rows and any(bool(a[rows].any()) for a in arrays):
        raise ShapeError(f"attention_mask pads rows {rows} of a state that already holds tokens; padding "
                         f"needs a fresh state ({make}): continue those rows one at a time "
                         "(batch 1, no mask) or as a batch of equal-length rows")


def _values(mask: torch.Tensor) -> str:
    vals = torch.unique(mask.flatten()[:100000]).tolist()
    return f"{mask.dtype} values {vals[:8]}{' ...' if len(vals) > 8 else ''}"


def machine_memory() -> int | None:
    """Bytes this process could ever hold at once: physical RAM, plus the GPUs' memory once CUDA is
    in use (a runner on the GPU keeps its logits there). None where the OS does not say."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        total += sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    return total


def check_fits(nbytes: int, what: str, fix: str) -> None:
    """Refuse work whose tensors alone outgrow the machine before any is allocated. The allocator's
    own refusal is not enough: where the kernel overcommits memory (vm.overcommit_memory = 1, common
    in containers) the allocation succeeds and the process is killed once the pages are touched."""
    total = machine_memory()
    if total is not None and nbytes > total:
        raise ConfigError(f"{what} needs at least {nbytes / 2**30:,.1f} GiB, more than this machine's "
                          f"{total / 2**30:,.1f} GiB of memory; {fix}")
