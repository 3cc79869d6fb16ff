"""The llama.cpp backend, through llama-cpp-python's low-level bindings.

State semantics. llama.cpp keeps the recurrent state (conv + ssm per layer) inside its context,
one slot per *sequence id*. A `LlamaCppState` is therefore a handle: one sequence id per batch
row plus the next position of each row. `new_state(b)` takes b free sequence slots and clears
them; the slots return to the pool when the state object is garbage-collected. Continuing a
state (`prefill` / `step` with it) carries the recurrent state across calls, as with the torch
runner; unlike a torch `State`, a handle cannot be cloned: copying it aliases the same slots.
When more slots are needed than the context has, the runner rebuilds its context with twice as
many and carries the live sequences' states over (llama_state_seq_get_data / set_data), so
older handles stay valid; only if llama.cpp refuses that are they invalidated (using one then
raises a ShapeError). One context takes one call at a time: threads sharing a runner wait for
each other (`one_call_at_a_time`).

Batches: prefill runs one row at a time (left padding from `generation.left_pad` is stripped per
row, padded positions get zero logits); `step` decodes all rows in one llama.cpp batch.
`to_torch_state` reads the rows' states back through llama_state_seq_get_data (an internal
llama.cpp layout: it raises NotImplementedError if a llama.cpp version changes it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..argtypes import check_switch, is_whole
from ..errors import BackendUnavailableError, CheckpointError, ConfigError, RunnerClosedError, ShapeError
from ..extras import install_hint, needs_packages
from ..inputs import check_ids, check_mask, token_stream
from ..pathnames import is_gguf
from ..state import State
from ..tokenizer import check_text
from .base import (NoCopy, Runner, check_parts, check_state, check_threads, checked_source, consume, default_threads,
                   one_call_at_a_time, part_rows)

LLAMA_MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: sequences one context holds


def _cpu_has_amx() -> bool:
    """Whether the CPU reports AMX int8 tiles (Linux /proc/cpuinfo; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_int8" in line.split() for line in f)
    except OSError:
        return False


def use_extra_buffers(extra_buffers: bool | None, amx: bool) -> bool:
    """llama.cpp's extra weight buffer types (AMX tiles, CPU repacking; llama_model_params
    use_extra_bufts): off by default on AMX CPUs. llama-cpp-python 0.3.36's AMX matmul crashed
    the process (SIGSEGV) on a Xeon with AMX for every quantized GGUF (Q8_0, Q4_0) as soon as a
    llama_decode held two or more tokens (a decode at batch >= 2, a prefill of two or more), as
    in llama.cpp issue #20824; F32 / F16 weights never take that path. True / False force them."""
    check_switch("extra_buffers", extra_buffers, none="off on AMX CPUs")
    return (not amx) if extra_buffers is None else extra_buffers


GGML_LOG_LEVEL_ERROR = 4  # ggml's enum today (NONE, DEBUG, INFO, WARN, ERROR, CONT)


@contextlib.contextmanager
def llama_log(lib, levels=None, forward: bool = True):
    """llama.cpp's log while the block runs: the text of each message at one of `levels` (all when
    None), in order. forward: also passed on to llama-cpp-python's own logger, which prints what
    set_verbose lets through; without it nothing of the log is printed (the GGUF export's quantizer,
    whose progress lines would fill the terminal, says the last of them only when it fails).
    The one place this project installs a llama.cpp log callback."""
    from llama_cpp import _logger

    texts, previous = [], _logger.llama_log_callback

    @lib.llama_log_callback
    def keep(level, text, user_data):
        if levels is None or level in levels:
            texts.append(text.decode("utf-8", "replace"))
        if forward:
            previous(level, text, user_data)

    lib.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield texts
    finally:
        lib.llama_log_set(previous, ctypes.c_void_p(0))


def log_tail(texts, n: int = 12) -> list[str]:
    """The last n non-empty lines of llama_log's texts (a message may end a line begun by another)."""
    return [ln.strip() for ln in "".join(texts).splitlines() if ln.strip()][-n:]


@contextlib.contextmanager
def _error_lines(lib):
    """llama.cpp's error log messages while the block runs (forwarded as before), for the exception
    that says why a load failed: llama-cpp-python's logger maps ggml's current error level to
    DEBUG, so without verbose=True they were shown nowhere. A Ctrl-C in the block is raised when
    it ends (see _ctrl_c_held)."""
    with llama_log(lib, (GGML_LOG_LEVEL_ERROR,)) as texts, _ctrl_c_held():
        yield texts


@contextlib.contextmanager
def _ctrl_c_held():
    """Python code runs inside a long llama.cpp call only in the log callbacks, so that is where
    Python's SIGINT handler raised KeyboardInterrupt, and ctypes prints and drops an exception
    raised in a callback: Ctrl-C during a load was lost. In the main thread with Python's own
    handler in place, the signal is noted instead and raised once the call has returned."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    noted = []
    signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if noted:
        raise KeyboardInterrupt


def _said(texts) -> str:
    lines = [t.strip() for t in texts if t.strip()]
    return f" (llama.cpp: {'; '.join(lines)})" if lines else ""


# positions per sequence when the GGUF records no longer context_length. A recurrent state is
# fixed-size, so llama.cpp's context memory does not depend on n_ctx; the file's context_length
# (2**20 from this project's and llama.cpp's converters) is the default because llama.cpp logs a
# "training context overflow" line for any n_ctx above it
MIN_N_CTX = 131072
# the default's upper end: llama.cpp's n_ctx is 32-bit, and a file's context_length near 2**32
# (a valid u32) overflowed inside it ("n_ctx_seq == 0"); pass n_ctx for more
MAX_DEFAULT_N_CTX = 1 << 24


def _context_length(reader) -> int:
    """The GGUF's {arch}.context_length, 0 when absent or not an integer."""
    from ..export.gguf_import import field
    from ..export.gguf_tables import ARCH_KEY, CONTEXT_LENGTH_KEY

    value = field(reader, CONTEXT_LENGTH_KEY.format(arch=field(reader, ARCH_KEY, "")), 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _sequences_problem(n_seq: int, n_ctx: int) -> str | None:
    """Why llama.cpp cannot hold n_seq sequences in a context of n_ctx (it aborts the process in
    a GGML_ASSERT when n_ctx < n_seq), or None."""
    if n_seq > LLAMA_MAX_SEQ:
        return f"llama.cpp holds at most {LLAMA_MAX_SEQ} sequences, a batch of {n_seq} asks for more"
    if n_seq > n_ctx:
        return f"n_ctx={n_ctx} is smaller than the {n_seq} sequences asked for"
    return None


def _lib():
    try:
        import llama_cpp
        from llama_cpp._logger import set_verbose
    except ImportError as e:
        raise BackendUnavailableError(
            f"the llama.cpp backend needs the optional package llama-cpp-python: {install_hint('llama_cpp')}"
        ) from e
    return llama_cpp, set_verbose


def check_gguf_path(path) -> Path:
    """`path` as a Path when it is a .gguf file, which this backend runs; ModelNotFoundError saying
    what it is instead (also verify's check before its reference pass)."""
    path = Path(path)
    if not is_gguf(path) or not path.is_file():
        from ..errors import ModelNotFoundError

        what = ("a folder" if path.is_dir() else "not found" if not path.exists()
                else f"a {path.suffix or 'suffix-less'} file")
        raise ModelNotFoundError(f"the llama.cpp backend runs .gguf files, got {str(path)!r} ({what}); "
                                 "export one with: mamba-deploy export gguf MODEL OUT.gguf")
    return path


@dataclass
class LlamaCppState(NoCopy):
    """Per-row llama.cpp sequence handles (see the module docstring)."""
    seq_ids: list[int]
    pos: list[int]  # next position per row
    generation: int  # the runner context this handle belongs to
    owner: object = field(default=None, repr=False)  # the runner's `_owner` token: another runner's ids are not ours
    _finalizer: object = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids)


class _Model:
    """The llama_model pointer, shared by the runner and its tokenizer: freed by the runner's
    close(), or once neither holds it (a tokenizer may outlive its runner)."""

    def __init__(self, lib, ptr):
        self.lib, self.ptr = lib, ptr
        self.vocab = lib.llama_model_get_vocab(ptr)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.context = None  # (ctx, batch) of the runner: freed before the model, always
        # held by the tokenizer's C calls and by free(): a close() from another thread waits for a
        # running llama_tokenize instead of freeing the vocabulary under it
        self.lock = threading.RLock()

    def vocab_or_raise(self):
        if not self.ptr:
            raise RunnerClosedError("the llama.cpp runner of this tokenizer is closed; open the model again "
                                    "with open_runner(...)")
        return self.vocab

    @contextlib.contextmanager
    def using(self):
        """with model.using() as vocab: C calls on the vocabulary, which free() waits for."""
        with self.lock:
            yield self.vocab_or_raise()

    def free_context(self) -> None:
        if self.context is not None:
            ctx, batch = self.context
            self.context = None
            self.lib.llama_batch_free(batch)
            self.lib.llama_free(ctx)

    def free(self) -> None:
        with self.lock:
            self.free_context()  # a runner collected in a cycle may be finalized after its model
            if self.ptr:
                self.lib.llama_model_free(self.ptr)
                self.ptr = self.vocab = None

    def __del__(self):
        try:
            self.free()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass


class LlamaCppTokenizer:
    """encode / decode with llama.cpp's own tokenizer of the GGUF (same interface as ours).
    Special tokens written in the text ("<|endoftext|>") are encoded as those tokens, as the
    `tokenizers` library and transformers do. decode joins each token's piece, as llama.cpp's
    own CLI and server stream them: llama_detokenize's space clean-up ("it '" + "s" -> "it's",
    "' '" -> "'") rewrites earlier text as tokens arrive, so no stream could equal its result."""

    def __init__(self, lib, model: _Model):
        self._lib, self._model = lib, model
        vocab = model.vocab_or_raise()
        eos, bos = lib.llama_vocab_eos(vocab), lib.llama_vocab_bos(vocab)
        self.eos_token_id = None if eos < 0 else int(eos)
        self.bos_token_id = None if bos < 0 else int(bos)
        # the chat template's other special-token names (llama.cpp's API has no unknown-token call,
        # and its deprecated llama_vocab_cls returns the BOS)
        named = {f"{k}_token": getattr(lib, f"llama_vocab_{k}", lambda v: -1)(vocab) for k in ("pad", "sep", "mask")}
        self.special_token_ids = {k: int(i) for k, i in named.items() if 0 <= i < model.n_vocab}
        self.n_vocab = model.n_vocab
        # llama.cpp's end-of-generation set besides the EOS (eot, eom and the end-of-turn tokens it
        # recognises by name): ~50k calls, ~20 ms
        self.end_token_ids = tuple(t for t in range(model.n_vocab)
                                   if t != self.eos_token_id and lib.llama_vocab_is_eog(vocab, t))
        self._pieces: dict[int, bytes] = {}  # token -> its bytes (control tokens: b"")
        # SentencePiece-style vocabularies (llama.cpp's converter for Mamba-Codestral) mark word
        # starts with a space, which decoding drops at the start of the text, as sentencepiece does
        self._strip_first_space = lib.llama_vocab_type(vocab) in (lib.LLAMA_VOCAB_TYPE_SPM, lib.LLAMA_VOCAB_TYPE_UGM)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        data = check_text(text).encode("utf-8")  # as the HF-backed Tokenizer says it
        cap = len(data) + 8
        buf = (self._lib.llama_token * cap)()
        # add_special: the BOS / EOS the GGUF asks for (tokenizer.ggml.add_bos_token: a SentencePiece
        # vocabulary's <s>), as our tokenizers add theirs; parse_special: "</s>" in the text is that token
        add = bool(add_special_tokens)
        with self._model.using() as vocab:
            n = self._lib.llama_tokenize(vocab, data, len(data), buf, cap, add, True)
            if n < 0:  # more tokens than bytes + 8 cannot happen for BPE; -n is the size needed
                buf = (self._lib.llama_token * -n)()
                n = self._lib.llama_tokenize(vocab, data, len(data), buf, -n, add, True)
        return [int(t) for t in buf[:n]]

    def id_to_token(self, token_id: int) -> str | None:
        """The token's own text ("<s>"), as chat templates write it."""
        if not 0 <= int(token_id) < self.n_vocab:
            return None
        with self._model.using() as vocab:
            text = self._lib.llama_vocab_get_text(vocab, int(token_id))
        return None if text is None else text.decode("utf-8", errors="replace")

    @property
    def chat_template(self) -> str | None:
        """The GGUF's tokenizer.chat_template, or None."""
        with self._model.using():  # RunnerClosedError once the model is freed
            tmpl = self._lib.llama_model_chat_template(self._model.ptr, None)
        return None if not tmpl else tmpl.decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return self.n_vocab

    def decode(self, ids) -> str:
        """As Tokenizer.decode: ids (n,) or (1, n) of integers; an id past the vocabulary decodes
        to nothing, a negative one is a ShapeError."""
        if not (isinstance(ids, list) and all(type(i) is int for i in ids)):
            ids = token_stream(ids, "decode's ids").tolist()
        if ids and min(ids) < 0:
            raise ShapeError(f"decode got token id {min(ids)}; token ids are >= 0")
        with self._model.using() as vocab:
            data = b"".join(self._piece(vocab, t) for t in ids if t < self.n_vocab)
        if self._strip_first_space and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def _piece(self, vocab, t: int) -> bytes:
        piece = self._pieces.get(t)
        if piece is None:
            if not 0 <= t < self.n_vocab:  # llama.cpp aborts the process on an unknown id
                raise ShapeError(f"token id {t} outside the vocabulary [0, {self.n_vocab})")
            buf = ctypes.create_string_buffer(32)
            n = self._lib.llama_token_to_piece(vocab, t, buf, 32, 0, False)  # lstrip 0, specials not shown
            if n < 0:  # -n: the size needed
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(vocab, t, buf, -n, 0, False)
            piece = self._pieces[t] = buf.raw[:n]
        return piece


class LlamaCppRunner(Runner):
    name = "llama.cpp"
    max_positions_name = "the llama.cpp context size n_ctx"

    @property
    def max_positions(self) -> int:
        return self.n_ctx

    def __init__(self, path, n_threads: int | None = None, n_ctx: int | None = None, n_batch: int = 512,
                 n_seq_max: int = 4, verbose: bool = False, extra_buffers: bool | None = None):
        with needs_packages("the llama.cpp backend"):  # it reads the GGUF's metadata and vocabulary itself
            from ..export.gguf import llama_cpp_differences
            from ..export.gguf_import import open_gguf

        self.call_lock = threading.RLock()
        n_threads = check_threads(n_threads) or default_threads()  # before loading anything
        check_switch("verbose", verbose)
        for name, v, high in (("n_ctx", MIN_N_CTX if n_ctx is None else n_ctx, None), ("n_batch", n_batch, None),
                              ("n_seq_max", n_seq_max, LLAMA_MAX_SEQ)):
            if not is_whole(v, 1) or (high and v > high):
                raise ConfigError(f"{name} must be an integer in 1..{high or 'inf'}, got {v!r:.40}")
        if n_ctx is not None and _sequences_problem(n_seq_max, n_ctx):  # before the model loads
            raise ConfigError(f"n_ctx={n_ctx} is smaller than n_seq_max={n_seq_max}; pass n_ctx >= n_seq_max")
        self.extra_buffers = use_extra_buffers(extra_buffers, _cpu_has_amx())
        lib, set_verbose = _lib()
        self._lib = lib
        set_verbose(verbose)
        path = check_gguf_path(path)
        # our checks first: clear errors for corrupt / foreign files, an edited vocab_size refused as
        # the torch backend does
        reader, _, _, self.config = open_gguf(path)
        _check_f32_tensors(reader, path)
        if n_ctx is None:
            n_ctx = max(MIN_N_CTX, min(_context_length(reader), MAX_DEFAULT_N_CTX))
        del reader
        for why in llama_cpp_differences(self.config):  # the file records them; the torch backend applies them
            warnings.warn(f"{path}: {why} (use --backend torch for the model as exported)", stacklevel=3)
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.use_extra_bufts = self.extra_buffers
        with _error_lines(lib) as said:
            ptr = lib.llama_model_load_from_file(os.fsencode(path), params)  # the name's bytes, whatever they are
            if ptr:  # owned at once: a Ctrl-C raised as the block ends leaves it to _Model's __del__
                self._model = _Model(lib, ptr)
        if not ptr:
            raise CheckpointError(f"llama.cpp could not load {path}{_said(said)}; re-export it with mamba-deploy "
                                  "export gguf (verbose=True shows llama.cpp's whole log)")
        self.n_vocab = self._model.n_vocab
        self.path, self.source_path = path, path.parent
        self.artifact_path = path
        self.n_threads, self.n_ctx, self.n_batch = n_threads, int(n_ctx), int(n_batch)
        self._ctx = self._batch = None
        self._generation = 0
        self._owner = object()  # identifies this runner's states (LlamaCppState.owner)
        self._make_context(int(n_seq_max))

    # ---- context and sequence slots ------------------------------------------
    def _make_context(self, n_seq: int) -> None:
        """A context for n_seq sequences (the old one is freed first: both may not fit). When
        llama.cpp cannot make it, the old size is made again, so the runner stays usable."""
        problem = _sequences_problem(n_seq, self.n_ctx)
        if problem:
            raise ShapeError(f"{problem}; use batches of at most {min(LLAMA_MAX_SEQ, self.n_ctx)}, or open the runner "
                             "with n_ctx >= the batch size")
        previous = getattr(self, "_n_seq", None)
        self._free_context()
        try:
            self._init_context(n_seq)
        except CheckpointError:
            if previous is not None and previous != n_seq:
                self._init_context(previous)  # usable again; a failure here leaves it without a context
            raise

    def _init_context(self, n_seq: int) -> None:
        lib = self._lib
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max = self.n_ctx, n_seq
        # step() decodes one token of every row in one llama_decode: n_batch below the row count
        # trips a GGML_ASSERT in llama.cpp, which aborts the process
        cp.n_batch = cp.n_ubatch = max(self.n_batch, n_seq)
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.no_perf = True
        try:
            with _error_lines(lib) as said:
                self._ctx = lib.llama_init_from_model(self._model.ptr, cp)
        except KeyboardInterrupt:  # raised once the context exists: not kept, so freed here
            if self._ctx:
                lib.llama_free(self._ctx)
            self._ctx = None
            raise
        if not self._ctx:
            raise CheckpointError(f"llama.cpp could not create a context for {n_seq} sequences (n_ctx={self.n_ctx})"
                                  f"{_said(said)}; use a smaller batch (verbose=True shows llama.cpp's whole log)")
        self._mem = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(max(self.n_batch, n_seq), 0, 1)
        self._model.context = (self._ctx, self._batch)
        self._generation += 1
        self._n_seq, self._free = n_seq, list(range(n_seq))

    def _free_context(self) -> None:
        if getattr(self, "_model", None) is not None:
            self._model.free_context()
        self._ctx = self._batch = self._mem = None
        self._free = []  # no sequence slots without a context (a call then fails on _ctx, not in C)

    @staticmethod
    def _release(runner_ref, seq_ids, generation) -> None:
        runner = runner_ref()
        if runner is not None:
            with runner.call_lock:  # a garbage collection in another thread: not in the middle of a _grow
                if runner._generation == generation:
                    runner._free.extend(seq_ids)

    @one_call_at_a_time
    def new_state(self, batch: int) -> LlamaCppState:
        if self._ctx is None:
            raise RunnerClosedError("this llama.cpp runner lost its context when a larger one failed; open it again")
        if batch > len(self._free):  # grow, carrying the live sequences over (documented above)
            self._grow(max(min(2 * self._n_seq, LLAMA_MAX_SEQ, self.n_ctx), len(self._live()) + batch))
        seqs, self._free = self._free[:batch], self._free[batch:]
        try:  # a Ctrl-C before the finalizer exists would lose these sequences for good
            for s in seqs:
                self._lib.llama_memory_seq_rm(self._mem, s, -1, -1)
            state = LlamaCppState(seqs, [0] * batch, self._generation, self._owner)
            state._finalizer = weakref.finalize(state, LlamaCppRunner._release, weakref.ref(self), seqs,
                                                self._generation)
        except BaseException:
            self._free = seqs + self._free
            raise
        return state

    @one_call_at_a_time
    def reserve_rows(self, rows: int) -> int:
        """Grow the context now to hold `rows` sequences, as far as llama.cpp allows (growing
        later copies the live states over); -> the sequences it holds."""
        rows = min(rows, LLAMA_MAX_SEQ, self.n_ctx)
        if self._ctx is not None and rows > self._n_seq:
            self._grow(rows)
        return self._n_seq

    def _live(self) -> list[int]:
        return [s for s in range(self._n_seq) if s not in self._free]

    def _grow(self, n_seq: int) -> None:
        """A context for n_seq sequences, holding the live sequences' states as they were, under
        the same ids, so their handles stay valid. When llama.cpp refuses a state back, the
        handles are invalidated instead (the generation moves on, as a rebuild always did)."""
        saved = {s: self._seq_bytes(s) for s in self._live()}
        generation, free, old = self._generation, list(self._free), self._n_seq
        try:
            self._make_context(n_seq)
        finally:  # also when the larger context failed and the old size was made again
            if self._ctx is not None and all(self._set_seq_bytes(s, b) for s, b in saved.items()):
                self._generation = generation
                self._free = free + list(range(old, self._n_seq))

    def _seq_bytes(self, seq: int) -> bytes:
        n = self._lib.llama_state_seq_get_size(self._ctx, seq)
        buf = (ctypes.c_uint8 * n)()
        self._lib.llama_state_seq_get_data(self._ctx, buf, n, seq)
        return bytes(buf)

    def _set_seq_bytes(self, seq: int, data: bytes) -> bool:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return self._lib.llama_state_seq_set_data(self._ctx, buf, len(data), seq) > 0

    @one_call_at_a_time
    def gather_states(self, parts):
        """The rows' sequences move to the new handle as they are (no copy); the consumed
        handles' other sequences go back to the pool. See Runner.gather_states."""
        parts = check_parts(parts)
        for st, _ in parts:
            self._check_state(st, None)
        rows = part_rows(parts, [st.batch_size for st, _ in parts])
        seqs = [st.seq_ids[r] for (st, _), idx in zip(parts, rows) for r in idx]
        pos = [st.pos[r] for (st, _), idx in zip(parts, rows) for r in idx]
        for st, _ in parts:  # consumed: an empty handle, whose finalizer frees nothing
            st._finalizer.detach()
            dropped = [q for q in st.seq_ids if q not in seqs]
            self._free.extend(dropped)
            st.seq_ids, st.pos = [], []
        state = LlamaCppState(seqs, pos, self._generation, self._owner)
        state._finalizer = weakref.finalize(state, LlamaCppRunner._release, weakref.ref(self), seqs, self._generation)
        return consume(parts, state)

    def _check_state(self, state, batch: int | None) -> None:
        """batch None: any batch (to_torch_state)."""
        check_state(state, LlamaCppState, None)  # its type; the batch is `batch_size` here
        if state.owner is not self._owner:  # its sequence ids would name this runner's other sequences
            raise ShapeError("this llama.cpp state was made by another runner; create it with this runner's "
                             "new_state(batch)")
        if batch is not None and state.batch_size != batch:
            raise ShapeError(f"llama.cpp state is for batch {state.batch_size}, inputs have batch {batch}; "
                             "create it with runner.new_state(batch)")
        if state.generation != self._generation:
            raise ShapeError("this llama.cpp state belongs to an older context of the runner (it was rebuilt for a "
                             "larger batch, and llama.cpp refused the live sequences back); open the runner with "
                             "n_seq_max >= the rows held at once (or call reserve_rows(n) first), and start again "
                             "from runner.new_state(batch)")

    # ---- decoding ----------------------------------------------------------------
    def _check_position(self, p: int) -> None:
        if p >= self.n_ctx:
            raise ShapeError(f"position {p} reaches the llama.cpp context size n_ctx={self.n_ctx}; "
                             "open the runner with a larger n_ctx")

    def _decode(self, tokens, seqs, positions, want_logits) -> np.ndarray:
        """One llama_decode of len(tokens) <= n_batch tokens; -> logits (n_wanted, n_vocab)."""
        lib, bt = self._lib, self._batch
        n = len(tokens)
        for i, (t, s, p, w) in enumerate(zip(tokens, seqs, positions, want_logits)):
            self._check_position(p)
            bt.token[i], bt.pos[i], bt.n_seq_id[i], bt.logits[i] = int(t), int(p), 1, int(bool(w))
            bt.seq_id[i][0] = int(s)
        bt.n_tokens = n
        rc = lib.llama_decode(self._ctx, bt)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} (batch of {n} tokens)")
        n_out = sum(bool(w) for w in want_logits)
        if n_out == 0:
            return np.zeros((0, self.n_vocab), np.float32)
        ptr = lib.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy()

    def _run_row(self, state, r: int, row: list[int], last_only: bool) -> np.ndarray:
        """Feed one row's tokens (chunks of n_batch) -> logits (len(row) or 1, n_vocab)."""
        outs = []
        for start in range(0, len(row), self.n_batch):
            chunk = row[start:start + self.n_batch]
            final = start + len(chunk) == len(row)
            want = [not last_only or (final and i == len(chunk) - 1) for i in range(len(chunk))]
            pos = list(range(state.pos[r], state.pos[r] + len(chunk)))
            outs.append(self._decode(chunk, [state.seq_ids[r]] * len(chunk), pos, want))
            state.pos[r] += len(chunk)
        return np.concatenate(outs)

    @one_call_at_a_time
    def prefill(self, ids, state, attention_mask=None, last_only=False):
        ids = check_ids(ids, 2, self.n_vocab).cpu()
        b, l = ids.shape
        self._check_state(state, b)
        attention_mask = check_mask(attention_mask, ids.shape)
        out = torch.zeros(b, 1 if last_only else l, self.n_vocab)
        keeps = [torch.ones(l, dtype=torch.bool) if attention_mask is None else attention_mask[r].bool() for r in range(b)]
        # every row's last position first: rows run one at a time, and one past n_ctx must not
        # leave the rows before it advanced (a retry would feed their tokens twice)
        for r, keep in enumerate(keeps):
            self._check_position(state.pos[r] + int(keep.sum()) - 1)
        for r, keep in enumerate(keeps):  # padding (mask 0) never enters the state
            row = ids[r][keep].tolist()
            if not row:
                continue
            logits = torch.from_numpy(self._run_row(state, r, row, last_only))
            if last_only:
                out[r, 0] = logits[-1]
            else:
                out[r, keep.nonzero()[:, 0]] = logits
        return out, state

    @one_call_at_a_time
    def step(self, ids, state):
        ids = check_ids(ids, 1, self.n_vocab).cpu()
        b = ids.shape[0]
        self._check_state(state, b)
        if b == 0:  # llama_decode refuses an empty batch; the other backends give no rows
            return torch.zeros(0, self.n_vocab), state
        toks = ids.tolist()
        logits = self._decode(toks, state.seq_ids, state.pos, [True] * b)
        for r in range(b):
            state.pos[r] += 1
        return torch.from_numpy(logits), state

    # ---- state export ------------------------------------------------------------------
    @one_call_at_a_time
    def to_torch_state(self, state) -> State:
        """Read each row's recurrent state out of llama.cpp (llama_state_seq_get_data) into a
        torch State, for verification. Raises NotImplementedError when this llama.cpp build
        serialises sequences in a layout other than the one `_parse_seq_state` reads."""
        self._check_state(state, None)
        if not state.seq_ids:  # 0 rows, as the other backends answer
            return State.zeros(self.config, 0)
        convs, ssms = [], []
        for s in state.seq_ids:
            conv, ssm = _parse_seq_state(self._seq_bytes(s), self.config)[1:]
            convs.append(conv)
            ssms.append(ssm)
        return State(torch.stack(convs, 1), torch.stack(ssms, 1))

    @one_call_at_a_time
    def load_torch_state(self, state, src: State) -> None:
        """Writes a torch State into the rows' sequences (llama_state_seq_set_data, in the layout
        to_torch_state reads): a state moves in from the torch / ONNX runners. A row that held no
        token yet gets one cell at position 0, and its next token goes to position 1."""
        self._check_state(state, None)
        src = checked_source(src, self.config)
        src.check(self.config, state.batch_size)
        for r in range(state.batch_size):
            self._write_row(state, r, max(state.pos[r] - 1, 0), src)

    def _write_row(self, state, r: int, pos: int, src: State) -> None:
        """Row r's sequence holds src's row r as one cell at position `pos`; its next token goes to pos + 1."""
        s = state.seq_ids[r]
        prefix = _parse_seq_state(self._seq_bytes(s), self.config)[0]
        if not self._set_seq_bytes(s, _seq_state_bytes(prefix, pos, src.conv[:, r], src.ssm[:, r])):
            raise NotImplementedError("this llama.cpp build refused the sequence state written in the layout "
                                      "to_torch_state reads; it cannot load a state")
        state.pos[r] = pos + 1

    @one_call_at_a_time
    def clone_state(self, state):
        """As Runner.clone_state, keeping each row's position, which the n_ctx cap counts (through
        load_torch_state a clone restarted at position 1): a row with no token yet stays empty."""
        self._check_state(state, None)
        src = self.to_torch_state(state)
        out = self.new_state(state.batch_size)
        for r, pos in enumerate(state.pos):
            if pos:
                self._write_row(out, r, pos - 1, src)
        return out

    # ---- misc ------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = LlamaCppTokenizer(self._lib, self._model)
        return self._tokenizer

    def set_tokenizer(self, tokenizer) -> None:
        raise ConfigError("llama.cpp tokenizes with the GGUF's own vocabulary, so another tokenizer cannot apply; "
                          "write it into the GGUF (`mamba-deploy export gguf MODEL OUT.gguf --tokenizer ...`), or run "
                          "the checkpoint with --backend torch")

    @one_call_at_a_time
    def close(self) -> None:
        self._free_context()
        if getattr(self, "_model", None) is not None:
            self._model.free()  # a tokenizer handed out earlier now raises RunnerClosedError
        super().close()

    def __del__(self):
        try:  # the context only: the model goes when the last holder (maybe a tokenizer) does
            self._free_context()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass


def _check_f32_tensors(reader, path) -> None:
    """llama.cpp's Mamba graph takes the tensors its converter keeps in F32 (norms, biases, ssm_a,
    ssm_d, the conv) only as F32: another type aborts the process (a GGML_ASSERT in ssm_conv, or
    "binary_op: unsupported types") instead of raising."""
    from gguf import GGMLQuantizationType

    from ..export.gguf_tables import keep_f32

    bad = [(t.name, t.tensor_type.name) for t in reader.tensors
           if keep_f32(t.name, len(t.shape)) and t.tensor_type != GGMLQuantizationType.F32]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"{path}: {bad[0][0]} is {bad[0][1]}{more}"
                              "; llama.cpp needs F32 there (norms, biases, ssm_a, ssm_d, the conv) and would abort "
                              "the process. Re-export it with mamba-deploy export gguf (which keeps them F32), or "
                              "run it with --backend torch")


# bytes llama.cpp may put before the memory's own data (newer builds write a 64-bit tag first)
SEQ_STATE_PREFIXES = (0, 8)


def _parse_seq_state(buf: bytes, cfg):
    """-> (the bytes before the memory's data, conv (n_layer, *conv_state_shape), ssm (...))."""
    errors = []
    for prefix in SEQ_STATE_PREFIXES:
        try:
            return (buf[:prefix], *_parse_seq_state_at(buf, cfg, prefix))
        except NotImplementedError as e:
            errors.append(str(e))
    raise NotImplementedError(errors[-1])


def _parse_seq_state_at(buf: bytes, cfg, start: int):
    """One sequence of llama.cpp's recurrent memory, as llama_memory_recurrent writes it:
    u32 cell_count; per cell (i32 pos, u32 n_seq_id = 0); u32 s_trans; u32 n_layer; then for
    the conv states ("r") and then the ssm states ("s") of every layer: i32 ggml type (0 = F32),
    u64 row bytes, the row. Shapes: r = ne {d_conv-1, conv_dim} -> (conv_dim, d_conv-1);
    s = ne {d_state, d_inner} (Mamba1) / {d_state, headdim, nheads} (Mamba2)."""
    off = start

    def take(fmt):
        nonlocal off
        import struct

        vals = struct.unpack_from("<" + fmt, buf, off)
        off += struct.calcsize("<" + fmt)
        return vals

    def layout_error(what):
        return NotImplementedError(f"this llama.cpp build's sequence state layout differs ({what}); "
                                   "to_torch_state cannot read it")

    try:
        (cells,) = take("I")
        if cells == 0:  # a sequence that holds no token yet (a fresh state, or a row of padding only)
            return torch.zeros(cfg.n_layer, *cfg.conv_state_shape), torch.zeros(cfg.n_layer, *cfg.ssm_state_shape)
        if cells != 1:
            raise layout_error(f"{cells} cells")
        _pos, n_seq = take("iI")
        s_trans, n_layer = take("II")
        if n_seq != 0 or s_trans != 0 or n_layer != cfg.n_layer:
            raise layout_error(f"n_seq_id={n_seq}, s_trans={s_trans}, n_layer={n_layer}")
        out = []
        for shape in (cfg.conv_state_shape, cfg.ssm_state_shape):
            layers = []
            for _ in range(n_layer):
                gtype, row_bytes = take("iQ")
                if gtype != 0 or row_bytes != 4 * int(np.prod(shape)):
                    raise layout_error(f"type {gtype}, {row_bytes} bytes per row")
                layers.append(torch.from_numpy(np.frombuffer(buf, np.float32, int(np.prod(shape)), off).copy()))
                off += row_bytes
            out.append(torch.stack(layers).reshape(n_layer, *shape))
    except Exception as e:  # noqa: BLE001  (struct.error on a short buffer)
        if isinstance(e, NotImplementedError):
            raise
        raise layout_error(str(e)) from e
    if off != len(buf):
        raise layout_error(f"{len(buf) - off} trailing bytes")
    return out[0], out[1]


def _seq_state_bytes(prefix: bytes, pos: int, conv: torch.Tensor, ssm: torch.Tensor) -> bytes:
    """The inverse of _parse_seq_state: one cell at `pos` holding conv (n_layer, *conv_state_shape)
    and ssm (n_layer, *ssm_state_shape), after the build's own `prefix` bytes."""
    import struct

    n_layer = conv.shape[0]
    parts = [prefix, struct.pack("<IiIII", 1, pos, 0, 0, n_layer)]
    for t in (conv, ssm):
        for layer in t.float().contiguous().numpy():
            parts += [struct.pack("<iQ", 0, layer.nbytes), layer.tobytes()]
    return b"".join(parts)


def open_llamacpp(path, threads: int | None = None, n_ctx: int | None = None, n_batch: int = 512, n_seq_max: int = 4,
                  verbose: bool = False, n_threads: int | None = None, extra_buffers: bool | None = None,
                  **_ignored) -> LlamaCppRunner:
    """`open_runner(path, "llama.cpp", threads=4, n_ctx=...)`. threads (or llama.cpp's own name,
    n_threads): CPU threads for prefill and decode; default one per physical core, as llama.cpp's
    CLI does. n_ctx only caps positions per sequence: a Mamba context's memory does not grow with
    it (measured: the same peak RSS at 2**17 and 2**30). Default: the GGUF's context_length (2**20
    for this project's and llama.cpp's Mamba exports), at least 131072. extra_buffers: llama.cpp's
    AMX / repacked weight buffers (None: off on AMX CPUs, see use_extra_buffers). Options other
    backends take (device, dtype) are ignored: llama.cpp runs the GGUF's own types on the CPU."""
    if threads is not None and n_threads is not None and threads != n_threads:
        raise ConfigError(f"threads={threads!r} and n_threads={n_threads!r} disagree; pass one of them")
    return LlamaCppRunner(path, n_threads=n_threads if threads is None else threads, n_ctx=n_ctx, n_batch=n_batch,
                          n_seq_max=n_seq_max, verbose=verbose, extra_buffers=extra_buffers)
