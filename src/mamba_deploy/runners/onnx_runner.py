"""The ONNX Runtime backend: an exported folder (model.onnx + manifest.json) behind the Runner
interface. CPU execution provider, or CUDA when onnxruntime-gpu offers it.

The state lives in two preallocated buffer sets per sequence batch (ping-pong): a call binds
one set as `past_*` and the other as `present_*` through IO binding, then swaps, so decoding
allocates nothing per token and (on CUDA) the state never leaves the device.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..argtypes import check_switch
from ..config import MambaConfig
from ..errors import BackendUnavailableError, ConfigError, ExportError, RunnerClosedError, ShapeError
from ..export.onnx_meta import GRAPH_FILE, IDS, KEEP, LOGITS, MASK, state_names
from ..extras import install_hint
from ..inputs import check_ids, check_mask, check_padding_fresh
from ..state import State
from .base import (CLOSED, NoCopy, Runner, check_parts, check_state, check_threads, checked_source, consume, part_rows,
                   release_freed_memory, state_layout)

PROVIDER_DEVICE = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}
NP_DTYPES = {"int64": np.int64, "float32": np.float32, "float16": np.float16}


class OnnxState(NoCopy):
    """Per-layer conv/ssm OrtValues, two sets; `cur` indexes the set holding the live state."""

    def __init__(self, bufs, arrays, batch: int, layout: tuple | None = None):
        self.bufs, self.arrays, self.batch, self.cur = bufs, arrays, batch, 0
        self.layout = layout  # base.state_layout of the runner's config
        self.logits = None  # (b, 1, V) preallocated for decode


class OnnxRunner(Runner):
    name = "onnx"

    def __init__(self, folder: Path, manifest: dict, session):
        self.folder, self.manifest, self.session = folder, manifest, session
        self.config = MambaConfig.from_own_dict(manifest["config"])
        self.source_path = folder
        first = session.get_providers()[0]
        self.device = PROVIDER_DEVICE.get(first, "cpu")
        # the GPU the session runs on (its provider's device_id): state and logits buffers live there
        self.device_id = int(session.get_provider_options().get(first, {}).get("device_id", 0) or 0)
        self.inputs = {d["name"]: d for d in manifest["inputs"]}
        self.outputs = {d["name"]: d for d in manifest["outputs"]}
        self.n_layer = self.config.n_layer
        self.vocab = self.outputs[LOGITS]["shape"][-1]  # by name: the manifest's order is not checked

    # ---- state -------------------------------------------------------------------------------
    def new_state(self, batch: int) -> OnnxState:
        from onnxruntime import OrtValue

        cfg = self.config
        shapes = State.layer_shapes(cfg, batch)
        arrays = [[np.zeros(s, np.float32) for s in shapes] for _ in range(2)]  # keep numpy alive (CPU)
        bufs = [[OrtValue.ortvalue_from_numpy(a, self.device, self.device_id) for a in group] for group in arrays]
        st = OnnxState(bufs, arrays, batch, state_layout(cfg))
        st.logits = OrtValue.ortvalue_from_shape_and_type((batch, 1, self.vocab), np.float32, self.device,
                                                          self.device_id)
        return st

    def state_arrays(self, state: OnnxState) -> list:
        if self.device == "cpu":  # the OrtValues share these numpy buffers
            return state.arrays[state.cur]
        return [v.numpy() for v in state.bufs[state.cur]]

    def to_torch_state(self, state: OnnxState) -> State:
        check_state(state, OnnxState, None, self.config)
        live = state.bufs[state.cur]
        return State.from_layers([torch.from_numpy(v.numpy()) for v in live])

    def gather_states(self, parts) -> OnnxState:
        """Rows taken layer by layer straight into the new state's arrays (no torch round trip:
        on a 130m Mamba2 that went from 4 copies of the rows to 1). See Runner.gather_states."""
        parts = check_parts(parts)
        for st, _ in parts:
            check_state(st, OnnxState, None, self.config)
        rows = part_rows(parts, [st.batch for st, _ in parts])
        out = self.new_state(sum(map(len, rows)))
        srcs = [self.state_arrays(st) for st, _ in parts]
        for k, dst in enumerate(out.arrays[out.cur]):
            off = 0
            for src, r in zip(srcs, rows):
                np.take(src[k], r, axis=0, out=dst[off:off + len(r)])
                off += len(r)
            if self.device != "cpu":
                out.bufs[out.cur][k].update_inplace(dst)
        return consume(parts, out)

    def load_torch_state(self, state: OnnxState, src: State) -> None:
        src = checked_source(src, self.config)
        check_state(state, OnnxState, src.conv.shape[1], self.config, rows_of="the source state's rows")
        arrays = [t.float().numpy() for pair in src.layers() for t in pair]
        for v, a, keep in zip(state.bufs[state.cur], arrays, state.arrays[state.cur]):
            if self.device == "cpu":  # the OrtValue shares this numpy buffer
                keep[...] = a
            else:
                v.update_inplace(np.ascontiguousarray(a))

    # ---- running -------------------------------------------------------------------------------
    def _run(self, ids: np.ndarray, state: OnnxState, mask=None, keep: int = 0, decode=False):
        check_state(state, OnnxState, ids.shape[0], self.config)
        if ids.shape[0] == 0:  # ORT's Reshape cannot infer -1 from 0 elements; nothing to run anyway
            return torch.zeros(0, keep or ids.shape[1], self.config.padded_vocab_size)
        from onnxruntime import OrtValue

        session = self._session()  # one reference for the whole call: close() may drop ours meanwhile
        io = session.io_binding()
        feeds = {IDS: np.ascontiguousarray(ids, dtype=np.int64)}
        if mask is not None:
            feeds[MASK] = np.ascontiguousarray(mask, dtype=np.int64)
        if keep:
            feeds[KEEP] = np.array([keep], np.int64)
        for name, arr in feeds.items():  # (bind_cpu_input cannot find inputs that have a default)
            io.bind_ortvalue_input(name, OrtValue.ortvalue_from_numpy(arr))
        if decode:
            if state.logits.shape()[-1] != self.vocab:  # a state of a runner of the same shapes, another vocabulary
                state.logits = OrtValue.ortvalue_from_shape_and_type((ids.shape[0], 1, self.vocab), np.float32,
                                                                     self.device, self.device_id)
            io.bind_ortvalue_output(LOGITS, state.logits)
        else:
            io.bind_output(LOGITS, self.device, self.device_id)  # first bound output: get_outputs()[0]
        src, dst = state.bufs[state.cur], state.bufs[1 - state.cur]
        for name, v in zip(state_names(self.n_layer), src):
            io.bind_ortvalue_input(name, v)
        for name, v in zip(state_names(self.n_layer, present=True), dst):
            io.bind_ortvalue_output(name, v)
        session.run_with_iobinding(io)
        state.cur = 1 - state.cur
        if decode:  # the preallocated buffer is reused next step: copy it out
            # numpy's copy, not torch's clone: a torch copy of (b, V) wakes torch's OpenMP pool, whose
            # spinning threads then take cores from ORT's next run (~5 ms/token on 2 cores)
            return torch.from_numpy(state.logits.numpy().copy())
        return torch.from_numpy(io.get_outputs()[0].numpy())

    def prefill(self, ids, state, attention_mask=None, last_only=False):
        ids, mask = prefill_inputs(ids, attention_mask, self.config.padded_vocab_size)
        check_state(state, OnnxState, ids.shape[0], self.config)
        self.check_padding_on_fresh_state(mask, state)
        decode = ids.shape[1] == 1 or last_only
        logits = self._run(ids, state, mask, keep=1 if last_only else 0, decode=decode)
        return logits, state

    def step(self, ids, state):
        ids = _ids(ids, 1, self.config.padded_vocab_size)
        return self._run(ids[:, None], state, decode=True)[:, 0], state

    def run(self, feeds: dict) -> dict:
        """Plain session run on numpy feeds, checked against the manifest: missing inputs and
        wrong shapes raise ShapeError naming the input."""
        check_feeds(self.manifest, self.config, feeds)
        session = self._session()
        names = [o.name for o in session.get_outputs()]
        if feeds[IDS].shape[0] == 0:  # the graph's Reshapes cannot infer -1 from no rows; nothing to run
            return self._no_rows(names, feeds)
        return dict(zip(names, session.run(names, feeds)))

    def _no_rows(self, names: list, feeds: dict) -> dict:
        """run()'s outputs for a batch of 0 rows: empty logits and the (empty) states fed."""
        keep = int(feeds[KEEP].reshape(-1)[0]) if KEEP in feeds else 0
        seq = feeds[IDS].shape[1]
        out = {LOGITS: np.zeros((0, min(keep, seq) if keep else seq, self.vocab), np.float32)}
        for past, present in zip(state_names(self.n_layer), state_names(self.n_layer, present=True)):
            out[present] = feeds[past].copy()
        return {n: out[n] for n in names}

    def _session(self):
        """The open session; RunnerClosedError once close() (another thread's) has dropped it."""
        session = self.session
        if session is None:
            raise RunnerClosedError(CLOSED.format(name=self.name))
        return session

    def close(self) -> None:
        self.session = None
        super().close()


def _ids(ids, ndim: int, vocab: int) -> np.ndarray:
    return check_ids(ids, ndim, vocab).cpu().numpy()


def prefill_inputs(ids, attention_mask, vocab: int):
    """Validated prefill feeds shared by the runners of our ONNX graphs: ids (b, l) int64 and
    the optional left-padding mask (b, l) int64."""
    ids = _ids(ids, 2, vocab)
    mask = check_mask(attention_mask, ids.shape)
    return ids, None if mask is None else mask.cpu().numpy()


def check_feeds(manifest: dict, cfg: MambaConfig, feeds: dict) -> None:
    """Feeds for a plain session run: every required input, numpy arrays of the manifest's
    dtypes and shapes, token ids in the vocabulary (the graph's Gather would wrap a negative
    id round to another token) and a left-padding mask, as prefill checks them."""
    dims: dict[str, int] = {}
    for spec in manifest["inputs"]:
        name = spec["name"]
        if name not in feeds:
            if spec.get("optional"):
                continue
            needed = [s["name"] for s in manifest["inputs"] if not s.get("optional")]
            raise ShapeError(f"missing input {name!r}; the graph needs {needed}")
        v = feeds[name]
        if not isinstance(v, np.ndarray):
            raise ShapeError(f"input {name!r} is a {type(v).__name__}; run() takes numpy arrays "
                             "(tensor.numpy() for a torch tensor)")
        if spec.get("dtype") and v.dtype != np.dtype(spec["dtype"]):
            raise ShapeError(f"input {name!r} is {v.dtype}, the graph takes {spec['dtype']}; pass "
                             f"np.asarray(x, np.{spec['dtype']})")
        shape = np.shape(v)
        want = spec["shape"]
        ok = len(shape) == len(want)
        for got, w in zip(shape, want):
            if isinstance(w, str):
                ok &= dims.setdefault(w, got) == got
            else:
                ok &= got == w
        if not ok:
            raise ShapeError(f"input {name!r} has shape {tuple(shape)}, expected {want} "
                             f"(with {dims}); make states with runner.new_state(batch)")
    unknown = sorted(set(feeds) - {s["name"] for s in manifest["inputs"]})
    if unknown:
        raise ShapeError(f"unknown inputs {unknown}; the graph takes {[s['name'] for s in manifest['inputs']]}")
    if IDS in feeds:
        check_ids(feeds[IDS], 2, cfg.padded_vocab_size)
        check_mask(feeds.get(MASK), feeds[IDS].shape)
        if feeds.get(MASK) is not None:  # as prefill: padding over a state that holds tokens decays it
            check_padding_fresh(feeds[MASK], [feeds[n] for n in state_names(cfg.n_layer) if n in feeds],
                                make="zero state arrays")


def check_session(manifest: dict, session, folder: Path) -> None:
    """The graph's declared inputs/outputs must equal the manifest's (names and static dims)."""
    # optional inputs have a default initializer; ORT lists those apart from the required ones
    inputs = list(session.get_inputs()) + list(session.get_overridable_initializers())
    for kind, declared in (("inputs", inputs), ("outputs", session.get_outputs())):
        want = {d["name"]: d["shape"] for d in manifest[kind]}
        got = {v.name: v.shape for v in declared}
        if set(want) != set(got):
            raise ExportError(f"{folder}/model.onnx does not match manifest.json: {kind} differ "
                              f"(graph only: {sorted(set(got) - set(want))}, manifest only: "
                              f"{sorted(set(want) - set(got))}); re-export the model")
        for name, shape in want.items():
            g = got[name]
            if len(g) != len(shape) or any(isinstance(w, int) and w != v for w, v in zip(shape, g)):
                raise ExportError(f"{folder}/model.onnx: {kind[:-1]} {name!r} has shape {g} but manifest.json "
                                  f"says {shape}; re-export the model")


def _provider_names(providers, available: list) -> list[str]:
    """The provider names of ORT's `providers` argument (names, or (name, options) pairs);
    ConfigError for anything else (ORT itself raised TypeErrors, or fell back to the CPU with
    only a printed banner)."""
    fix = f"pass a list of provider names or (name, options dict) pairs, from {available}"
    if not isinstance(providers, (list, tuple)) or not providers:
        raise ConfigError(f"providers={providers!r:.80} is not a list of providers; {fix}")
    names = []
    for p in providers:
        pair = isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], dict)
        if not (isinstance(p, str) or pair):
            raise ConfigError(f"provider {p!r:.80} is neither a name nor a (name, options dict) pair; {fix}")
        names.append(p if isinstance(p, str) else p[0])
    return names


def with_options(providers: list, manifest: dict) -> list:
    """ORT's provider list with our options: the CUDA provider runs an fp32 graph without TF32,
    whose MatMuls round their inputs to 10 mantissa bits (ORT's default is on; an fp32 export
    is checked against PyTorch at fp32's 1e-4, which TF32 does not meet). A caller's own
    (name, options) entries pass through unchanged."""
    out = []
    for p in providers:
        if p == "CUDAExecutionProvider" and manifest.get("dtype") == "fp32":
            p = (p, {"use_tf32": "0"})
        out.append(p)
    return out


# ORT's CPU MatMul repacks each constant weight at load into a layout of its own; the file's copy
# is freed once packed, except where another node reads it too (the tied embeddings: Gather and
# the lm_head MatMul). While loading, the parsed graph, the file's copies and the packed ones live
# together. Measured on 130m shapes (516 MB of fp32 weights), memory added by the session, with
# prepacking / without: peak while loading 1252-1336 / 733-756 MB; held after (freed pages
# returned, `release_freed_memory`) 672-674 / 520-524 MB. Without prepacking, decode took 1.17x
# (Mamba1) and 1.27x (Mamba2) as long (ORT's one-row MatMul reads the packed layout faster) and
# prefill-512 1.01-1.05x: medians of 8 interleaved rounds, 2 threads.
PREPACK_PEAK = 2.6  # x the weight bytes while loading, with prepacking


def use_prepacking(prepack: bool | None, weight_bytes: int, folder) -> bool:
    """prepack as given, or (None) whether the packed copies fit: PREPACK_PEAK x the weights
    within the memory available now. When they do not, prepacking is turned off with a warning
    (the session then holds the weights once, at some cost in speed) instead of the load
    pushing the machine into swap or the OOM killer."""
    if prepack is not None:
        return prepack
    available = available_memory()
    if available is None or PREPACK_PEAK * weight_bytes <= available:
        return True
    warnings.warn(f"{folder}: ONNX Runtime's prepacked weights would take ~{PREPACK_PEAK * weight_bytes / 2**30:.1f} GiB "
                  f"while loading and {available / 2**30:.1f} GiB is available, so prepacking is off: the session holds "
                  f"the {weight_bytes / 2**30:.1f} GiB of weights once, and one-token decode runs ~20 % slower; "
                  "pass prepack=True to open_runner to force it", stacklevel=3)
    return False


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux MemAvailable), or less
    where the process's cgroup (a container's memory limit) leaves less; None elsewhere. In a
    container MemAvailable is the host's: a 4 GiB container on a 64 GiB host reads 64 GiB."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    left = _cgroup_left()
    if left is not None:
        available = left if available is None else min(available, left)
    return available


# (limit, usage, memory.stat's reclaimable page cache): cgroup v2, then v1 (as the container sees them)
CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
                 "inactive_file"),
                ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
                 "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"))
NO_CGROUP_LIMIT = 2**62  # v1 writes "no limit" as about 2**63 rounded to a page


def _cgroup_left() -> int | None:
    """The cgroup's memory limit less its usage (its inactive page cache counted as free, as
    the kernel reclaims it before the OOM killer acts); None without a limit."""
    for limit_file, usage_file, stat_file, cache_key in CGROUP_FILES:
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= NO_CGROUP_LIMIT:
            return None  # "max" (v2) or v1's no-limit value
        cache = 0
        try:
            with open(stat_file) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == cache_key:
                        cache = int(value)
        except (OSError, ValueError):
            pass
        return max(0, int(limit) - usage + cache)
    return None


def _weight_bytes(manifest: dict) -> int:
    """The graph's files (model.onnx and its external data), as the manifest lists them."""
    return sum(info["bytes"] for name, info in manifest["files"].items() if name.startswith(GRAPH_FILE))


def open_onnx(path, providers=None, threads: int | None = None, check_hash: bool = False,
              prepack: bool | None = None, **_) -> OnnxRunner:
    """path: an export folder or its model.onnx. providers: ORT provider names or (name, options)
    pairs (default CUDA if available, else CPU). threads: intra-op threads (default: ORT's
    choice, one per physical core). prepack: let ORT's CPU MatMuls keep their weights in its
    packed layout (see `use_prepacking`; None: yes when that copy fits in available memory)."""
    threads = check_threads(threads)
    check_switch("prepack", prepack, none="decide by available memory")
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailableError(f"the onnx backend needs onnxruntime: {install_hint('onnxruntime')}") from e
    from ..export.onnx import open_export_folder

    folder, manifest = open_export_folder(path, check_hash)
    available = ort.get_available_providers()
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if isinstance(providers, str):  # one name: as a list, not its letters
        providers = [providers]
    names = _provider_names(providers, available)
    missing = [p for p in names if p not in available]
    if missing:
        raise BackendUnavailableError(f"ONNX Runtime providers {missing} are not available here (have {available})")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # the optional inputs' defaults are initializers; ORT warns about that
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if prepack is None and names[:1] != ["CPUExecutionProvider"]:
        prepack = True  # the CPU provider's packing: with CUDA first the weights live on the GPU
    if not use_prepacking(prepack, _weight_bytes(manifest), folder):
        so.add_session_config_entry("session.disable_prepacking", "1")
    from ..pathnames import text_path

    try:
        with text_path(folder / GRAPH_FILE) as name:  # ORT takes the path as UTF-8 text only
            session = ort.InferenceSession(name, so, providers=with_options(providers, manifest))
    except Exception as e:  # noqa: BLE001  (ORT raises its own exception types)
        raise ExportError(f"ONNX Runtime cannot load {folder / GRAPH_FILE}: {e}; re-export the model") from e
    release_freed_memory()  # the graph's parsed copy and, with prepacking, the unpacked weights
    check_session(manifest, session, folder)
    return OnnxRunner(folder, manifest, session)
