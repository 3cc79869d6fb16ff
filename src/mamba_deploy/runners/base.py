"""The Runner interface: one implementation per backend; generate / verify / bench / serve use
nothing else, so a new backend gets all of them for free.

Token ids and logits cross this boundary as CPU torch tensors (ids int64, logits float32);
the state object is the backend's own and opaque to callers except through `to_torch_state`.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import numbers
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from ..argtypes import is_whole
from ..config import MambaConfig
from ..errors import ConfigError, RunnerClosedError, ShapeError
from ..inputs import check_padding_fresh
from ..state import CONSUMED, State, batch_first, check_batch, check_is_state

# copy.copy of a state that holds a backend's buffers shared some of them (ONNX: two branches then
# overwrote each other's state silently) and deepcopy failed on native handles
FORK = ("{name} cannot be copied with copy.copy / copy.deepcopy (it holds the backend's buffers); "
        "fork it with runner.clone_state(state)")


class NoCopy:
    """Base of a backend state class whose buffers or handles a copy would share."""

    def __copy__(self):
        raise ShapeError(FORK.format(name=type(self).__name__))

    def __deepcopy__(self, memo):
        raise ShapeError(FORK.format(name=type(self).__name__))


def one_call_at_a_time(method):
    """For a backend whose native handle takes one call at a time (one llama.cpp context, one
    OpenVINO infer request): threads sharing the runner wait for each other here, where they
    crashed the process (llama.cpp) or got "Infer Request is busy". The runner's __init__ sets
    `self.call_lock = threading.RLock()` (re-entrant: gather_states calls new_state). close()
    takes the lock too, so a call that was waiting for it finds the runner closed (and says so)
    instead of its freed handles."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.call_lock:
            if self.closed and method.__name__ != "close":
                raise RunnerClosedError(CLOSED.format(name=self.name))
            return method(self, *args, **kwargs)
    return locked


def default_threads(cpus=None, sysfs: str = "/sys/devices/system/cpu",
                    cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPU threads a backend uses when not told: one per physical core among the CPUs this
    process may run on (llama.cpp's own default; a second hyperthread per core adds little to
    bandwidth-bound decoding), and no more than a container's CPU quota (cgroup v2 cpu.max)
    allows. Falls back to the number of usable CPUs where the topology is not readable.
    cpus / sysfs / cpu_max: for tests."""
    return max(1, min(_physical_cores(cpus, sysfs), _cpu_quota(cpu_max) or 1 << 30))


def _cpu_quota(cpu_max: str) -> int | None:
    """ceil(quota / period) from a cgroup v2 cpu.max file ("max 100000" = no limit), else None."""
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        return None if quota == "max" else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


def _physical_cores(cpus, sysfs: str) -> int:
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        topo = Path(sysfs) / f"cpu{c}" / "topology"
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere). A
    runtime that loads a graph frees its parsed copy of the weights once its kernels hold their
    own, but glibc keeps those pages in the process: an ONNX Runtime session of 516 MB of fp32
    weights left the process 1037 MB larger, 674 MB once trimmed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def check_state(state, cls, batch: int | None, config: MambaConfig | None = None, rows_of: str = "ids") -> None:
    """`state` is the backend's own state class (with a `.batch`) made for `batch` rows (None:
    any) and, with `config`, by a runner of a model with that config's state shapes (its
    `.layout`, see `state_layout`): another model's state would reach the backend as a shape
    error of its own, or be read back as if it were this model's."""
    if not isinstance(state, cls):
        raise ShapeError(f"state is a {type(state).__name__}; create it with runner.new_state(batch)")
    if getattr(state, "consumed", False):
        raise ShapeError(CONSUMED)
    if config is not None and getattr(state, "layout", None) != state_layout(config):
        raise ShapeError(f"the state holds {getattr(state, 'layout', None)} (layers, conv, ssm shapes), this runner's "
                         f"model needs {state_layout(config)}: it was made by a runner of another model; create it "
                         "with this runner's new_state(batch)")
    if batch is not None and state.batch != batch:
        raise ShapeError(f"{rows_of} have batch {batch} but the state was made for batch {state.batch}; "
                         "create it with runner.new_state(batch)")


def checked_source(src, config: MambaConfig, device="cpu") -> State:
    """load_torch_state's `src`: a State of this model's shapes (the backend checks its batch
    against the target state), detached, on `device`. Unchecked, torch's copy_ and numpy
    broadcast a wrong-shaped one silently, and ONNX loaded only the layers a shorter one had."""
    check_is_state(src, "State.zeros(config, batch) or another runner's to_torch_state(state)")
    conv = src.conv
    src.check(config, conv.shape[1] if isinstance(conv, torch.Tensor) and conv.dim() > 1 else -1)
    if src.conv.is_meta or src.ssm.is_meta:  # no values to copy (torch's NotImplementedError said so)
        raise ShapeError("the source state is on the meta device and holds no values; load one made with "
                         "State.zeros(config, batch) or read with another runner's to_torch_state(state)")
    return State(src.conv.detach().to(device), src.ssm.detach().to(device))


def check_parts(parts) -> list:
    """gather_states' parts: a list of (state, rows) pairs, each state once."""
    if not isinstance(parts, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in parts):
        raise ShapeError(f"gather_states takes a list of (state, rows) pairs, got {parts!r:.80}")
    if len({id(s) for s, _ in parts}) != len(parts):
        raise ShapeError("gather_states got the same state twice; give each state once with all the rows it keeps")
    return list(parts)


def consume(parts, out):
    """Marks gather_states' input states consumed (every state check then refuses them, see
    state.CONSUMED): their memory, sequences or graph bucket may now be the returned state's, and
    a step on one would write into it. -> out."""
    for st, _ in parts:
        if st is not out:
            st.consumed = True
    return out


def part_rows(parts, batches: list[int]) -> list:
    """One index list per (state, rows) part, checked against that state's batch: rows None
    (all of them) or row indices in range, none twice."""
    out = []
    for (_, rows), n in zip(parts, batches):
        if rows is None:
            out.append(list(range(n)))
            continue
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        if not isinstance(rows, (list, tuple, range)) or not all(
                isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in rows):
            raise ShapeError(f"rows must be a list of row indices (or None for all), got {rows!r:.80}")
        bad = [r for r in rows if not 0 <= r < n]
        if bad or len(set(rows)) != len(rows):
            why = f"rows {bad} are outside 0..{n - 1}" if bad else f"rows {list(rows)} repeat a row"
            raise ShapeError(f"gather_states: {why} (the state has {n} rows); give each row at most once")
        out.append([int(r) for r in rows])
    return out


def state_layout(config: MambaConfig) -> tuple:
    """(n_layer, conv shape, ssm shape) of one sequence's state: what a backend state records
    to be recognised by runners of the same model."""
    return config.n_layer, tuple(config.conv_state_shape), tuple(config.ssm_state_shape)


def max_threads() -> int:
    """The most threads a backend may be given: 4 per CPU of this machine, at least 64. More only
    wait for each other, and tens of thousands crash torch's and llama.cpp's thread pools."""
    return max(64, 4 * (os.cpu_count() or 1))


def check_threads(threads) -> int | None:
    """A backend's `threads` option: None (the backend's default) or an int in 1..max_threads()."""
    if threads is None:
        return None
    if not is_whole(threads, 1):
        raise ConfigError(f"threads must be an integer >= 1 (or left out for the backend's default), got {threads!r}")
    if threads > max_threads():
        raise ConfigError(f"threads {threads} is more than this machine can use ({os.cpu_count()} CPUs; at most "
                          f"{max_threads()}); leave it out for the backend's default ({default_threads()})")
    return int(threads)


CLOSED = "the {name} runner is closed; open the model again with open_runner(...)"
# the methods that touch a backend's handles: refused once the runner is closed (a freed
# llama.cpp context crashes the process; ORT / OpenVINO / TensorRT handles are None)
OPEN_ONLY = ("new_state", "prefill", "step", "to_torch_state", "gather_states", "load_torch_state", "clone_state",
             "run", "reserve_rows", "state_arrays")


def _open_only(fn):
    @functools.wraps(fn)
    def method(self, *args, **kwargs):
        if self.closed:
            raise RunnerClosedError(CLOSED.format(name=self.name))
        return fn(self, *args, **kwargs)

    method.open_only = True
    return method


def _batch_checked(fn):
    @functools.wraps(fn)
    def checked(self, batch, *args, **kwargs):
        return fn(self, check_batch(batch), *args, **kwargs)

    checked.batch_checked = True
    return checked


class Runner(ABC):
    name: str = "?"
    config: MambaConfig
    source_path: Path | None = None  # folder with tokenizer files
    supports_attention_mask: bool = True  # left-padded batched prefill
    closed: bool = False
    _artifact_path: Path | None = None
    # positions one sequence may reach (prompt + generated tokens) where the backend caps them;
    # None: no cap, since a recurrent state does not grow with the sequence. The server refuses a
    # request past it when it arrives (in a batched step it would fail every row beside it).
    max_positions: int | None = None
    max_positions_name: str = "the backend's max_positions"  # as an error names the cap
    # the longest left-padded (masked) prompt one prefill takes, where the backend caps it
    # (TensorRT: the engine's max_seq); generation.prefill_pieces feeds masked prompts in pieces of it
    max_masked_length: int | None = None

    @property
    def artifact_path(self) -> Path | None:
        """What the runner was opened from, as reports and the server name it: a file (.gguf, an
        engine) where the backend sets one, else its source_path (an ONNX or checkpoint folder;
        None for a model built in memory)."""
        return self._artifact_path or self.source_path

    @artifact_path.setter
    def artifact_path(self, path) -> None:
        self._artifact_path = path

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("new_state", "reserve_rows"):  # a typed error for new_state(-1), reserve_rows("4")
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "batch_checked", False):
                setattr(cls, name, _batch_checked(fn))
        for name in OPEN_ONLY:  # every backend gets the closed check without writing it
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "open_only", False):
                setattr(cls, name, _open_only(fn))

    @abstractmethod
    def new_state(self, batch: int):
        """A zeroed state for `batch` sequences."""

    @abstractmethod
    def prefill(self, ids: torch.Tensor, state, attention_mask: torch.Tensor | None = None,
                last_only: bool = False):
        """ids (b, l) -> (logits (b, l or 1, vocab) float32, state). The logits at left-padded
        positions (mask 0) are unspecified: llama.cpp gives zeros there, the graphs the padding
        token's, so with last_only a row of padding only gives no usable logits."""

    @abstractmethod
    def step(self, ids: torch.Tensor, state):
        """ids (b,) -> (logits (b, vocab) float32, state)."""

    def to_torch_state(self, state) -> State:
        """The state as a torch `State` (conv, ssm) for verification."""
        raise NotImplementedError(f"{self.name} runner does not expose its state")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def tokenizer(self):
        from ..tokenizer import load_tokenizer

        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = load_tokenizer(self.source_path)
        return self._tokenizer

    def set_tokenizer(self, tokenizer) -> None:
        """Text goes through `tokenizer` instead of the one beside the model (a model that ships
        none: state-spaces' original mamba_ssm checkpoints use EleutherAI/gpt-neox-20b's): a
        folder or hub id with tokenizer files, or a loaded tokenizer (tokenizer.checked_tokenizer)."""
        from ..tokenizer import checked_tokenizer

        self._tokenizer = checked_tokenizer(tokenizer, self.vocab_size)

    def close(self) -> None:
        """Frees the backend's handles; later calls raise RunnerClosedError. Backends that hold
        handles free them and call this."""
        self.closed = True

    # ---- rows across states: how a server batches requests that start at different times ----
    def gather_states(self, parts):
        """parts: [(state, rows), ...], rows a list of row indices or None (all) -> a new state of
        this runner holding those rows of those states, in that order. A server joins a request's
        freshly prefilled rows to the running batch with [(running, None), (new, None)] and drops
        a finished request's rows with [(running, kept)]. The states given are consumed: use only
        the one returned (a backend may reuse their memory or, for llama.cpp, their sequences).
        This default goes through `to_torch_state` and `load_torch_state`."""
        parts = check_parts(parts)
        src = [self.to_torch_state(s) for s, _ in parts]  # checks each state
        src = [(t.conv[:, i], t.ssm[:, i]) for t, i in zip(src, part_rows(parts, [t.conv.shape[1] for t in src]))]
        empty = State.zeros(self.config, 0)
        conv = torch.cat([empty.conv] + [c for c, _ in src], 1)
        ssm = torch.cat([empty.ssm] + [h for _, h in src], 1)
        del src
        out = self.new_state(conv.shape[1])
        self.load_torch_state(out, State(conv, ssm))
        return consume(parts, out)

    def load_torch_state(self, state, src: State) -> None:
        """Writes a torch State (float32 on the CPU, the same batch) into this backend's `state`:
        the inverse of `to_torch_state`; `checked_source` checks `src`. Backends that cannot take
        a state in leave this out, and `can_gather_states` is then False."""
        raise NotImplementedError(f"the {self.name} runner cannot load a state")

    def clone_state(self, state):
        """An independent copy of `state`: two branches (beams, a shared prompt's continuations)
        go on from one prefilled state. copy.copy would share the backend's buffers."""
        src = self.to_torch_state(state)
        out = self.new_state(src.conv.shape[1])
        self.load_torch_state(out, src)
        return out

    @property
    def can_gather_states(self) -> bool:
        # past the closed / batch checks every class's methods are wrapped in
        overrides = lambda name: inspect.unwrap(getattr(type(self), name)) is not inspect.unwrap(  # noqa: E731
            getattr(Runner, name))
        return overrides("gather_states") or overrides("load_torch_state")

    @_batch_checked
    def reserve_rows(self, rows: int) -> int:
        """Make room for `rows` live sequences at once, so that a later `new_state` does not
        invalidate live states (llama.cpp rebuilds its context to grow); -> how many rows may be
        live at once (fewer where the backend holds fewer). Default: nothing to do, no limit."""
        return rows

    def state_arrays(self, state) -> list:
        """The live state as arrays / tensors with the batch first (for cheap checks on the
        state's own device, without a copy); a backend overrides this where it can."""
        return batch_first(self.to_torch_state(state))

    def check_padding_on_fresh_state(self, mask, state) -> None:
        """Padding needs a fresh state (inputs.check_padding_fresh). (llama.cpp drops padding instead.)"""
        check_padding_fresh(mask, self.state_arrays(state))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()




for _name in OPEN_ONLY:  # the base's own defaults too (reserve_rows, state_arrays answered after close)
    _fn = Runner.__dict__.get(_name)
    if _fn is not None and not getattr(_fn, "__isabstractmethod__", False):
        setattr(Runner, _name, _open_only(_fn))


def require_runner(runner, name: str, how: str = "runners.open_runner(path)", duck: tuple[str, ...] = ()) -> None:
    """ConfigError unless `runner` is a Runner (or, with `duck`, has those attributes: a runner of
    the caller's own that only needs them): a model or a path given instead would fail deep
    inside (AttributeError: 'MambaLM' object has no attribute 'vocab_size')."""
    if isinstance(runner, Runner) or (duck and all(hasattr(runner, a) for a in duck)):
        return
    # a path is named; a model's repr is its whole module tree
    got = f"{type(runner).__name__} {runner!r:.80}" if isinstance(runner, (str, os.PathLike)) else type(runner).__name__
    raise ConfigError(f"{name} needs a Runner, got {got}; open one with mamba_deploy.{how}")
