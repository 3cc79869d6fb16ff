"""The TensorRT backend: an engine built by `export.tensorrt.build_engine` behind the Runner
interface, run with torch CUDA tensors as the engine's I/O (set_tensor_address +
execute_async_v3 on a stream of the runner's own, ordered after torch's current stream: TensorRT
synchronizes the legacy default stream after every enqueue). The engine and its execution
context belong to the GPU they were made on, which is made current for every call.

The state lives in two preallocated CUDA buffer sets (ping-pong): a call binds one set as
`past_*` and the other as `present_*`, then swaps, so decoding allocates only the logits and the
state never leaves the GPU. Prompts longer than the engine's max_seq are prefilled in max_seq
chunks, each continuing from the state the previous one left (the graph supports that; only the
left-padding mask is limited to a zero state, so masked prompts must fit one chunk).

Written against TensorRT's documented Python API (10.x); not run in this repository's CI, which
has no TensorRT (see tests/test_tensorrt.py).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from ..atomic import read_tagged_json
from ..config import MambaConfig
from ..errors import BackendUnavailableError, ConfigError, ExportError, ModelNotFoundError, ShapeError
from ..export.onnx_meta import IDS, KEEP, LOGITS, MASK, state_names
from ..export.tensorrt import INSTALL_HINT, SIDECAR_FORMAT, engine_file, import_tensorrt, sidecar_path, trt_logger
from ..inputs import check_ids, check_mask
from ..state import State
from .base import NoCopy, Runner, check_state, check_threads, checked_source, one_call_at_a_time, state_layout


def _torch_dtype(trt, dt):
    """TensorRT tensor dtype -> torch dtype (TensorRT 8 turns int64 graph inputs into int32)."""
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.bool: torch.bool}
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if dt not in table:
        raise ExportError(f"engine tensor dtype {dt} is not supported by this runner; rebuild the engine")
    return table[dt]


class TensorRTState(NoCopy):
    """Per-layer conv/ssm CUDA tensors, two sets; `cur` indexes the set holding the live state."""

    def __init__(self, bufs: list[list[torch.Tensor]], batch: int, layout: tuple | None = None):
        self.bufs, self.batch, self.cur = bufs, batch, 0
        self.layout = layout  # base.state_layout of the runner's config


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, trt, engine, sidecar: dict, path: Path, device: torch.device):
        self.trt, self.engine, self.path, self.device = trt, engine, path, device
        self.artifact_path = path
        with torch.cuda.device(device):
            self.context = engine.create_execution_context()
            self.stream = torch.cuda.Stream(device)
        if self.context is None:  # TensorRT returns None, not an error (GPU memory for the activations)
            raise ExportError(f"TensorRT could not make an execution context for {path} on {device} (out of GPU "
                              "memory?); free GPU memory, or rebuild the engine for a smaller max_batch / max_seq")
        self.call_lock = threading.RLock()  # one execution context: its bindings serve one call at a time
        self.manifest = sidecar["manifest"]
        self.config = MambaConfig.from_own_dict(self.manifest["config"])
        src = Path(sidecar.get("onnx_dir", ""))
        self.source_path = src if src.is_dir() else path.parent  # tokenizer files live with the ONNX export
        self.build = sidecar["build"]
        self.max_batch, self.max_seq = int(self.build["max_batch"]), int(self.build["max_seq"])
        self.max_masked_length = self.max_seq  # longer unmasked prompts are cut here; masked ones, by the caller
        self.n_layer = self.config.n_layer
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in self.names}
        # where TensorRT reads each input from: the host for shape tensors (num_logits_to_keep feeds
        # Slice starts), as get_tensor_location says; set_tensor_address needs that kind of pointer
        self.host_inputs = {n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
                            and engine.get_tensor_location(n) == trt.TensorLocation.HOST}
        self.defaults = {k: torch.tensor(v, dtype=torch.int64) for k, v in sidecar["defaults"].items()}
        self.past, self.present = state_names(self.n_layer), state_names(self.n_layer, present=True)
        # the mask and the logits count too: without them a padded prompt or last_only were ignored
        missing = sorted({IDS, MASK, KEEP, LOGITS, *self.past, *self.present} - set(self.names))
        if missing:
            raise ExportError(f"{path} lacks the tensors {missing}; rebuild it with build_engine")
        odd = {n: self.dtypes[n] for n in (*self.past, *self.present) if self.dtypes[n] != torch.float32}
        if odd:  # the state buffers are float32: TensorRT does not check what a pointer holds
            raise ExportError(f"{path} keeps its state as {sorted(set(map(str, odd.values())))}, not float32 "
                              f"({sorted(odd)[:2]}); rebuild it with build_engine from an fp32 export")

    # ---- state -------------------------------------------------------------------------------
    def new_state(self, batch: int) -> TensorRTState:
        if not 0 <= batch <= self.max_batch:  # 0 rows: a server's batch with every request done
            raise ShapeError(f"batch {batch} is outside the engine's 1..{self.max_batch}; "
                             f"rebuild it with build_engine(..., max_batch={batch})")
        shapes = State.layer_shapes(self.config, batch)
        bufs = [[torch.zeros(s, dtype=torch.float32, device=self.device) for s in shapes] for _ in range(2)]
        return TensorRTState(bufs, batch, state_layout(self.config))

    def state_arrays(self, state: TensorRTState) -> list:
        return state.bufs[state.cur]

    def to_torch_state(self, state: TensorRTState) -> State:
        check_state(state, TensorRTState, None, self.config)
        live = state.bufs[state.cur]
        st = State.from_layers(live)
        return State(st.conv.cpu(), st.ssm.cpu())

    def reserve_rows(self, rows: int) -> int:
        return min(rows, self.max_batch)  # the engine's batch profile

    def load_torch_state(self, state: TensorRTState, src: State) -> None:
        src = checked_source(src, self.config)
        check_state(state, TensorRTState, src.conv.shape[1], self.config, rows_of="the source state's rows")
        for buf, t in zip(state.bufs[state.cur], (t for pair in src.layers() for t in pair)):
            buf.copy_(t)

    # ---- running -------------------------------------------------------------------------------
    def _bind(self, name: str, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.dtypes[name]).contiguous()
        if name in self.host_inputs:
            t = t.cpu()
        else:
            t = t.to(self.device)
        if not self.context.set_input_shape(name, tuple(t.shape)):
            raise ShapeError(f"the engine refuses {name} of shape {tuple(t.shape)} (built for batch 1..{self.max_batch}, "
                             f"1..{self.max_seq} tokens per call); rebuild it with build_engine(..., max_batch=..., "
                             "max_seq=...)")
        self._address(name, t)
        return t  # the caller keeps it alive until the launch has run

    def _address(self, name: str, t: torch.Tensor) -> None:
        if not self.context.set_tensor_address(name, t.data_ptr()):
            raise ExportError(f"TensorRT refused the buffer for {name} ({tuple(t.shape)}, {t.dtype}, {t.device}); "
                              "rebuild the engine with this version")

    @one_call_at_a_time
    def _run(self, ids: torch.Tensor, state: TensorRTState, mask=None, keep: int = 0) -> torch.Tensor:
        check_state(state, TensorRTState, ids.shape[0], self.config)
        if ids.shape[0] == 0:  # the profile starts at batch 1; nothing to run anyway
            return torch.zeros(0, keep or ids.shape[1], self.config.padded_vocab_size)
        with torch.cuda.device(self.device):
            return self._launch(ids, state, mask, keep)

    def _launch(self, ids, state: TensorRTState, mask, keep: int) -> torch.Tensor:
        keep_alive = [self._bind(IDS, ids)]
        if MASK in self.names:
            keep_alive.append(self._bind(MASK, self.defaults[MASK] if mask is None else mask))
        if KEEP in self.names:
            keep_alive.append(self._bind(KEEP, torch.tensor([keep]) if keep else self.defaults[KEEP]))
        src, dst = state.bufs[state.cur], state.bufs[1 - state.cur]
        for name, t in zip(self.past, src):
            keep_alive.append(self._bind(name, t))
        for name, t in zip(self.present, dst):
            self._address(name, t)
        shape = tuple(self.context.get_tensor_shape(LOGITS))  # known once the inputs are set
        if any(d < 0 for d in shape):
            raise ExportError(f"TensorRT cannot infer the logits shape {shape}; rebuild the engine")
        logits = torch.empty(shape, dtype=self.dtypes[LOGITS], device=self.device)
        self._address(LOGITS, logits)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the inputs and the state were written on the caller's stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ExportError(f"TensorRT could not run the engine for input_ids of shape {tuple(ids.shape)} (its "
                              "log says why; out of GPU memory?); free GPU memory, or rebuild the engine here")
        caller.wait_stream(self.stream)
        out = logits.float().cpu()  # synchronizes the caller's stream (after the engine) before keep_alive goes
        state.cur = 1 - state.cur  # only once the engine ran: an error above leaves the state as it was
        del keep_alive
        return out

    def prefill(self, ids, state, attention_mask=None, last_only=False):
        ids = check_ids(ids, 2, self.config.padded_vocab_size).cpu()
        b, length = ids.shape
        mask = check_mask(attention_mask, ids.shape)
        check_state(state, TensorRTState, b, self.config)
        self.check_padding_on_fresh_state(mask, state)
        if attention_mask is not None and length > self.max_seq:
            raise ShapeError(f"a masked prompt of length {length} exceeds the engine's max_seq {self.max_seq}; "
                             f"rebuild it with build_engine(..., max_seq={length})")
        outs = []
        for start in range(0, length, self.max_seq):  # one chunk unless length > max_seq
            chunk = ids[:, start:start + self.max_seq]
            # last_only: every chunk keeps one position, not only the last (the others' are dropped)
            outs.append(self._run(chunk, state, mask, keep=1 if last_only else 0))
        return (outs[-1] if last_only else torch.cat(outs, 1)), state

    def step(self, ids, state):
        ids = check_ids(ids, 1, self.config.padded_vocab_size).cpu()
        return self._run(ids[:, None], state)[:, 0], state

    @one_call_at_a_time
    def close(self) -> None:
        self.context = self.engine = None
        super().close()


def check_engine_pair(sidecar: dict, engine_bytes: int, path: Path) -> None:
    """The engine file must be the one its sidecar describes: build_engine renames the sidecar,
    then the engine, into place, so a build stopped between the two leaves a new sidecar beside an
    old engine. Sidecars from before the size was recorded are taken as they are."""
    want = sidecar.get("build", {}).get("engine_bytes")
    if want is not None and want != engine_bytes:
        raise ExportError(f"{path} has {engine_bytes} bytes but its sidecar {sidecar_path(path)} describes an "
                          f"engine of {want}: they come from different builds (one stopped part-way); rebuild "
                          "the engine")


def cuda_device(device) -> torch.device:
    """`device` ("cuda", "cuda:N", an int or a torch.device) as cuda:N with its index: the engine
    and its buffers stay on that GPU whichever one the calling thread has current. ConfigError
    for anything else (checkpoint.check_device's for a GPU index this machine lacks)."""
    from ..checkpoint import check_device

    not_cuda = ConfigError(f"the tensorrt backend runs on a CUDA GPU: device {device!r} is not one; pass cuda or "
                           "cuda:N")
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"
    try:
        dev = check_device(device)
    except ConfigError as e:
        if str(device).startswith("cuda"):  # a GPU this machine lacks: check_device says how many there are
            raise
        raise not_cuda from e
    if dev.type != "cuda":
        raise not_cuda
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def require_cuda() -> None:
    """BackendUnavailableError where torch sees no CUDA GPU (the engine runs on one)."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"the tensorrt backend needs a CUDA GPU and torch with CUDA; {INSTALL_HINT}")


def engine_and_sidecar(path) -> tuple[Path, dict]:
    """(the engine file `path` names, its sidecar read), or ModelNotFoundError for either missing;
    also verify's check before its reference pass (runners/preflight.py)."""
    p = engine_file(path)
    side = sidecar_path(p)
    if not p.exists():
        raise ModelNotFoundError(f"no TensorRT engine at {p}; build one with "
                                 "mamba_deploy.export.tensorrt.build_engine(ONNX_DIR, ENGINE_PATH)")
    if not side.exists():
        raise ModelNotFoundError(f"{side} is missing (written next to the engine by build_engine); rebuild the engine")
    return p, read_tagged_json(side, SIDECAR_FORMAT, "TensorRT sidecar", "rebuild the engine")


def open_tensorrt(path, device: str = "cuda", threads: int | None = None, **_) -> TensorRTRunner:
    """path: an engine file from build_engine (or a folder holding model.engine), with its
    `<engine>.json` sidecar next to it. threads is checked like every backend's, and unused:
    the engine runs on the GPU."""
    check_threads(threads)
    trt = import_tensorrt()
    require_cuda()
    p, sidecar = engine_and_sidecar(path)
    dev = cuda_device(device)
    with torch.cuda.device(dev):
        runtime = trt.Runtime(trt_logger(trt))
        blob = p.read_bytes()
        check_engine_pair(sidecar, len(blob), p)
        engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        raise ExportError(f"TensorRT cannot load {p} (built by TensorRT {sidecar['build'].get('tensorrt')}, "
                          f"this is {trt.__version__}, or for another GPU); rebuild the engine here")
    runner = TensorRTRunner(trt, engine, sidecar, p, dev)
    runner._runtime = runtime  # the engine must not outlive its runtime
    return runner
