"""The OpenVINO backend: the exported ONNX folder (model.onnx + manifest.json) read by OpenVINO's
ONNX frontend and compiled for its CPU plugin, behind the Runner interface. Same graph, same
input/output names as the ONNX Runtime runner; only the engine differs.

Two OpenVINO facts shape this file:
- Its ONNX frontend turns an input that has an initializer of the same name into a constant, so
  the graph's optional inputs (`attention_mask`, `num_logits_to_keep`, whose defaults are such
  initializers) would vanish. We drop those initializers from the proto before reading it and
  feed their default values ourselves when the caller gives none.
- The CPU plugin may pick bf16 math by default on CPUs with bf16 units; fp32 parity needs the
  inference precision pinned to f32 (the default here).
- Its CPU plugin misreads small integers when flush-to-zero / denormals-are-zero is on, which a
  -ffast-math library can switch on process-wide; compile and inference run with it off
  (`ieee_denormals`).
- Every runner compiles through one ov.Core per process (`shared_core`): each Core loads its own
  CPU plugin, and two plugins freed out of order leave a dangling signal stack behind.
- Its CPU plugin's Log is off by 1-2e-6 (absolute) near 1, so softplus(dt) = log(1 + exp(dt)) came
  out 2e-2 too high or low for dt in [-10, -5], where trained models' dt sits: the state of a
  trained Mamba1 drifted 1.3e-4 from float64 over 1000 tokens (ONNX Runtime: 1.2e-6). The graph it
  reads has each log(1 + u) written with a series for small u (`accurate_log1p`).
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..atomic import remove_stale_temps, temp_owner
from ..config import MambaConfig
from ..errors import BackendUnavailableError, ConfigError, ExportError
from ..export.onnx_meta import (DATA_FILE, GRAPH_FILE, IDS, KEEP, LOGITS, MASK, OPTIONAL_INPUTS, node_subgraphs,
                                state_names)
from ..extras import install_hint
from ..state import State
from .base import (Runner, check_state, check_threads, checked_source, one_call_at_a_time, release_freed_memory,
                   state_layout)
from .onnx_runner import _ids, prefill_inputs

# precision option -> OpenVINO inference precision hint
PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16"}
OV_TEMP = "model.openvino"  # the stripped graph of an external-data export: .model.openvino.p<pid>h<host>-<id>.onnx


class OpenVinoState:
    """Per-layer numpy arrays [conv.0, ssm.0, conv.1, ...]; replaced by the outputs each call."""

    def __init__(self, arrays: list[np.ndarray], batch: int, layout: tuple | None = None):
        self.arrays, self.batch = arrays, batch
        self.layout = layout  # base.state_layout of the runner's config


class OpenVinoRunner(Runner):
    name = "openvino"

    def __init__(self, folder: Path, manifest: dict, compiled, defaults: dict, tmpfile: Path | None = None):
        self.folder, self.manifest, self.compiled = folder, manifest, compiled
        self.config = MambaConfig.from_own_dict(manifest["config"])
        self.source_path = folder
        self.n_layer = self.config.n_layer
        self.defaults = defaults  # optional input name -> default value (numpy)
        self.request = compiled.create_infer_request()
        self.call_lock = threading.RLock()  # one infer request: one call at a time
        self._tmpfile = tmpfile  # stripped copy of an external-data graph; removed on close
        self.past, self.present = state_names(self.n_layer), state_names(self.n_layer, present=True)
        self._primed: set[int] = set()  # batch sizes whose one-token call has run once (see _run)

    # ---- state ---------------------------------------------------------------------------------
    def new_state(self, batch: int) -> OpenVinoState:
        shapes = State.layer_shapes(self.config, batch)
        return OpenVinoState([np.zeros(s, np.float32) for s in shapes], batch, state_layout(self.config))

    def state_arrays(self, state: OpenVinoState) -> list:
        return state.arrays

    def to_torch_state(self, state: OpenVinoState) -> State:
        check_state(state, OpenVinoState, None, self.config)
        return State.from_layers([torch.from_numpy(a) for a in state.arrays])

    def load_torch_state(self, state: OpenVinoState, src: State) -> None:
        src = checked_source(src, self.config)
        check_state(state, OpenVinoState, src.conv.shape[1], self.config, rows_of="the source state's rows")
        state.arrays = [t.float().numpy().copy() for pair in src.layers() for t in pair]

    # ---- running -------------------------------------------------------------------------------
    @one_call_at_a_time
    def _run(self, ids: np.ndarray, state: OpenVinoState, mask=None, keep: int = 0) -> torch.Tensor:
        check_state(state, OpenVinoState, ids.shape[0], self.config)
        feeds = {IDS: np.ascontiguousarray(ids, dtype=np.int64),
                 MASK: self.defaults[MASK] if mask is None else np.ascontiguousarray(mask, np.int64),
                 KEEP: np.array([keep], np.int64) if keep else self.defaults[KEEP]}
        feeds.update(zip(self.past, state.arrays))
        with ieee_denormals():
            if ids.shape[1] == 1 and ids.shape[0] not in self._primed:
                # OpenVINO 2026.4.1 CPU, Mamba1 graph: the first one-token call (the If's decode
                # branch) at each new batch size may compute garbage, sometimes NaN, from layer
                # 1 on; repeating the same call is exact. So that first call runs twice and its
                # first result is dropped (the inputs, state included, are not modified by it).
                self.request.infer(feeds, share_inputs=True, share_outputs=False)
                self._primed.add(ids.shape[0])
            # share_outputs=False copies the results out of the request's buffers, which the next
            # call overwrites; the states are small next to the logits, so the copy is cheap
            res = self.request.infer(feeds, share_inputs=True, share_outputs=False)
        state.arrays = [res[n] for n in self.present]
        return torch.from_numpy(res[LOGITS])

    def prefill(self, ids, state, attention_mask=None, last_only=False):
        ids, mask = prefill_inputs(ids, attention_mask, self.config.padded_vocab_size)
        check_state(state, OpenVinoState, ids.shape[0], self.config)
        self.check_padding_on_fresh_state(mask, state)
        return self._run(ids, state, mask, keep=1 if last_only else 0), state

    def step(self, ids, state):
        ids = _ids(ids, 1, self.config.padded_vocab_size)
        return self._run(ids[:, None], state)[:, 0], state

    @one_call_at_a_time
    def close(self) -> None:
        self.request = self.compiled = None
        if self._tmpfile is not None:
            self._tmpfile.unlink(missing_ok=True)
            self._tmpfile = None
        super().close()

    def __del__(self):
        if getattr(self, "_tmpfile", None) is not None:
            self._tmpfile.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- FP mode

@contextmanager
def ieee_denormals():
    """Run with flush-to-zero / denormals-are-zero off in this thread, restoring it after.

    Why: any shared library linked with gcc < 13 and -ffast-math (our own CPU kernels are
    linked without it for this reason), or torch.set_flush_denormal(True), switches FTZ/DAZ on
    for the process. OpenVINO's CPU plugin moves
    some integer tensors through float registers, so small integers (bit patterns of denormal
    floats) become 0: with FTZ/DAZ on at compile time, num_logits_to_keep=1 is read as 0 and
    every position's logits come back."""
    on = bool(np.float32(1e-40) * np.float32(1.0) == 0)  # a denormal survives unless FTZ/DAZ
    if on:
        torch.set_flush_denormal(False)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(True)


# ---------------------------------------------------------------------------------------- loading

_core = None
_core_lock = threading.Lock()


def shared_core(ov):
    """The process's one ov.Core, made on first use and kept until exit.

    Why one: each Core loads its own CPU plugin, and that plugin (OpenVINO's SigAltStackSetup,
    Linux) installs an mmap'ed signal stack on the thread that loads it, remembering the previous
    one; when the plugin is freed it puts that previous stack back if its own is still current,
    then unmaps its own. Two runners with their own Cores, closed in the order they were opened,
    left the thread's signal stack pointing at the first plugin's unmapped stack, and the next
    signal with a Python handler (SIGTERM, Ctrl-C: CPython installs them SA_ONSTACK) killed the
    process with SIGSEGV instead of running the handler. With one Core that lives as long as the
    process there is a single plugin, installed once and never freed before exit."""
    global _core
    with _core_lock:  # two threads opening runners at once must not make two Cores
        if _core is None:
            _core = ov.Core()
        return _core


LOG1P_SERIES_BELOW = 0.1  # |u| below this: 6 terms of the series, relative error <= u^6 / 7 = 1.5e-7


def _log1p_nodes(u: str, one: str, out: str, tag: str) -> list:
    """Nodes writing out = log(1 + u) for float32 u: Where(|u| < 0.1, u - u^2/2 + ... - u^6/6,
    Log(u + one)); the series in Horner form, its constants as Constant nodes (the graph may be a
    subgraph). `one`: the graph's own 1 when it had one, so the output broadcasts as before."""
    from onnx import helper, numpy_helper

    def const(name, v):
        return helper.make_node("Constant", [], [f"{tag}/{name}"], value=numpy_helper.from_array(np.array(v, np.float32)))

    nodes = [const("below", LOG1P_SERIES_BELOW), *(const(f"k{i}", 1.0 / i) for i in range(1, 7))]
    acc = f"{tag}/k6"
    for i in (5, 4, 3, 2, 1):  # acc = 1/i - u * acc
        nodes += [helper.make_node("Mul", [u, acc], [f"{tag}/m{i}"]),
                  helper.make_node("Sub", [f"{tag}/k{i}", f"{tag}/m{i}"], [f"{tag}/p{i}"])]
        acc = f"{tag}/p{i}"
    return nodes + [helper.make_node("Mul", [u, acc], [f"{tag}/series"]),
                    helper.make_node("Add", [u, one], [f"{tag}/1+u"]),
                    helper.make_node("Log", [f"{tag}/1+u"], [f"{tag}/log"]),
                    helper.make_node("Abs", [u], [f"{tag}/abs"]),
                    helper.make_node("Less", [f"{tag}/abs", f"{tag}/below"], [f"{tag}/small"]),
                    helper.make_node("Where", [f"{tag}/small", f"{tag}/series", f"{tag}/log"], [out])]


def _float32_ones(graph) -> set[str]:
    """Names of the graph's float32 scalar (or [1]) ones: initializers and Constant nodes (the
    weights stay unread: external data)."""
    from onnx import TensorProto, numpy_helper

    def one(t) -> bool:
        return (list(t.dims) in ([], [1]) and t.data_type == TensorProto.FLOAT and t.data_location != TensorProto.EXTERNAL
                and float(numpy_helper.to_array(t).reshape(())) == 1.0)

    found = {t.name for t in graph.initializer if one(t)}
    return found | {n.output[0] for n in graph.node if n.op_type == "Constant" and n.attribute
                    and n.attribute[0].name == "value" and one(n.attribute[0].t)}


def accurate_log1p(graph, ones: frozenset = frozenset()) -> int:
    """Rewrite, in place and in every subgraph, each Softplus(x) as max(x, 0) + log1p(exp(-|x|)),
    each Log(u + 1) with a float32 1 (the export's own softplus) as log1p(u), with _log1p_nodes,
    and each (u + 1) - 1 as u (the export's log1p correction, see onnx_builder.softplus). Our
    exports compute softplus in float32 at every --dtype. Returns the number of sites rewritten."""
    from onnx import helper, numpy_helper

    ones = ones | _float32_ones(graph)
    made = {o: n for n in graph.node for o in n.output}
    nodes, count = [], 0
    for n in graph.node:
        for sub in node_subgraphs(n):
            count += accurate_log1p(sub, frozenset(ones))
        tag = f"log1p/{n.output[0]}"
        add = made.get(n.input[0]) if n.op_type in ("Log", "Sub") else None
        if add is not None and add.op_type == "Add" and len(set(add.input) & ones) == 1:
            u, one = sorted(add.input, key=lambda i: i in ones)  # n reads u + 1
        else:
            add = None
        if n.op_type == "Log" and add is not None:
            nodes += _log1p_nodes(u, one, n.output[0], tag)
        elif n.op_type == "Sub" and add is not None and n.input[1] in ones:
            # (u + 1) - 1: the export's log1p adds u - ((u + 1) - 1) to undo log(1 + u)'s rounding,
            # which the Log's rewrite above no longer has; u itself makes that term 0
            nodes.append(helper.make_node("Identity", [u], [n.output[0]]))
            continue  # part of the site its Log counts
        elif n.op_type == "Softplus":
            x, zero, one = n.input[0], f"{tag}/zero", f"{tag}/one"
            nodes += [helper.make_node("Constant", [], [zero], value=numpy_helper.from_array(np.array(0, np.float32))),
                      helper.make_node("Constant", [], [one], value=numpy_helper.from_array(np.array(1, np.float32))),
                      helper.make_node("Max", [x, zero], [f"{tag}/pos"]),
                      helper.make_node("Min", [x, zero], [f"{tag}/neg"]),
                      helper.make_node("Sub", [f"{tag}/neg", f"{tag}/pos"], [f"{tag}/-|x|"]),
                      helper.make_node("Exp", [f"{tag}/-|x|"], [f"{tag}/u"]),
                      *_log1p_nodes(f"{tag}/u", one, f"{tag}/log1p", tag),
                      helper.make_node("Add", [f"{tag}/pos", f"{tag}/log1p"], [n.output[0]])]
        else:
            nodes.append(n)
            continue
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _read_model(core, folder: Path):
    """Read model.onnx with the optional inputs' default initializers removed; returns (ov model,
    {name: default numpy value}, temp graph file or None)."""
    import onnx
    from onnx import numpy_helper

    try:
        proto = onnx.load(str(folder / GRAPH_FILE), load_external_data=False)
    except Exception as e:  # noqa: BLE001 -- protobuf's DecodeError and friends: a damaged graph file
        raise ExportError(f"OpenVINO cannot read {folder / GRAPH_FILE}: it is not a valid ONNX graph "
                          f"({type(e).__name__}: {str(e)[:200]}); re-export the model") from e
    defaults, inits = {}, proto.graph.initializer
    for i in reversed(range(len(inits))):  # deleted in place: re-adding the kept ones would copy every weight
        if inits[i].name in OPTIONAL_INPUTS:
            defaults[inits[i].name] = numpy_helper.to_array(inits[i])
            del inits[i]
    del inits
    missing = [n for n in OPTIONAL_INPUTS if n not in defaults]
    if missing:
        raise ExportError(f"{folder / GRAPH_FILE} has no default for the optional inputs {missing}; "
                          "re-export it with this version of mamba-deploy")
    accurate_log1p(proto.graph)
    if not (folder / DATA_FILE).exists():
        from openvino import Tensor

        # the weights are inline: the proto and its serialized bytes are one copy each, so the
        # proto goes before OpenVINO parses the bytes into copies of its own (peak memory)
        data = proto.SerializeToString()
        del proto
        return core.read_model(data, Tensor(np.empty(0, np.uint8))), defaults, None
    # weights in model.onnx.data (graphs above 2 GB): OpenVINO reads external data only from the
    # graph's own folder (a link from elsewhere is refused as "outside the base directory"), so
    # the stripped graph is written next to it under a hidden temp name, removed on close()
    # named as atomic.py names temporaries (writer's pid and host), so that one a killed run left
    # (no close() ran) is removed by the next open instead of staying beside the weights for good
    remove_stale_temps(folder, OV_TEMP)
    tmp = folder / f".{OV_TEMP}.{temp_owner()}-{id(proto):x}.onnx"
    try:
        onnx.save_model(proto, str(tmp))
    except BaseException as e:  # Ctrl-C or a full disk mid-save: no partial copy left in the folder
        tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        raise ExportError(f"{folder} must be writable, with room for a copy of the graph, to open a graph with "
                          f"external weights in OpenVINO (it writes a temporary {tmp.name} there): {e}") from e
    try:
        return core.read_model(str(tmp)), defaults, tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_model(manifest: dict, model, folder: Path) -> None:
    """The graph OpenVINO read must expose the manifest's input and output names, with the
    manifest's static dims: a manifest edited to another vocabulary or d_state ran (all-zero
    logits past the graph's vocabulary, a raw error at prefill), where the ONNX runner refused it
    (onnx_runner.check_session)."""
    for kind, ports in (("inputs", model.inputs), ("outputs", model.outputs)):
        want = {d["name"]: d["shape"] for d in manifest[kind]}
        got = {n: p for p in ports for n in p.get_names()}
        if not set(want) <= set(got):
            raise ExportError(f"OpenVINO reads {folder / GRAPH_FILE} without the {kind} {sorted(set(want) - set(got))} "
                              "listed in manifest.json; re-export the model")
        for name, shape in want.items():
            ps = got[name].get_partial_shape()
            if ps.rank.is_dynamic:
                continue
            dims = [d.get_length() if d.is_static else None for d in ps]
            if len(dims) != len(shape) or any(isinstance(w, int) and v is not None and w != v
                                              for w, v in zip(shape, dims)):
                raise ExportError(f"{folder / GRAPH_FILE}: {kind[:-1]} {name!r} has shape {dims} but manifest.json "
                                  f"says {shape}; re-export the model")


# OpenVINO's virtual devices: they run on the devices listed after ':' (AUTO alone picks one itself)
VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")


def missing_devices(device: str, available) -> list[str]:
    """The real devices `device` names ("GPU.1", "HETERO:GPU,CPU", "BATCH:GPU(4)") that are not
    among `available` (Core.available_devices); [] = all there. "-GPU" in AUTO:CPU,-GPU excludes
    a device and needs none."""
    head, _, rest = device.partition(":")
    names = [d.split("(")[0] for d in rest.split(",") if d and not d.startswith("-")] \
        if head in VIRTUAL_DEVICES else [head]
    have = {d.split(".")[0] for d in available}

    def present(name: str) -> bool:  # "GPU.1" must be listed as such; "GPU.0" also where one "GPU" is
        base, dot, index = name.partition(".")
        return name in available or (base in have and (not dot or (index == "0" and base in available)))

    return [d for d in names if not present(d)]


def open_openvino(path, device: str = "CPU", precision: str = "f32", threads: int | None = None,
                  check_hash: bool = False, properties: dict | None = None, **_) -> OpenVinoRunner:
    """path: an ONNX export folder or its model.onnx. device: an OpenVINO device name (CPU;
    GPU/NPU where the plugins exist). precision: inference precision hint, f32 (default, for
    parity) | bf16 | f16. threads: CPU inference threads (default: OpenVINO's choice).
    properties: further OpenVINO compile properties, passed through."""
    threads = check_threads(threads)
    try:
        import openvino as ov
    except ImportError as e:
        raise BackendUnavailableError(f"the openvino backend needs OpenVINO: {install_hint('openvino')}") from e
    try:
        import onnx  # noqa: F401  (needed to strip the optional-input defaults)
    except ImportError as e:
        raise BackendUnavailableError("the openvino backend reads the ONNX graph with onnx: "
                                      f"{install_hint('onnx')}") from e
    from ..export.onnx import open_export_folder

    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")
    folder, manifest = open_export_folder(path, check_hash)
    core = shared_core(ov)
    device = str(device).upper()  # OpenVINO's names are upper case; the CLI's --device default is "cpu"
    missing = missing_devices(device, core.available_devices)
    if missing:
        which = "" if missing == [device] else f" (it runs on {', '.join(missing)})"
        raise BackendUnavailableError(f"OpenVINO device {device!r} is not available here{which}; have "
                                      f"{core.available_devices}; use device='CPU'")
    config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    level = (manifest.get("quantization") or {}).get("accuracy_level")
    if precision == "f32" and isinstance(level, int) and level < 4:
        config.update(_keep_float_activations(core, device))
    if properties is not None and not (isinstance(properties, dict) and all(isinstance(k, str) for k in properties)):
        raise ConfigError(f"properties must be a dict of OpenVINO property names (strings) to values, got "
                          f"{type(properties).__name__} {properties!r:.80}")
    config.update(properties or {})
    try:
        with ieee_denormals():
            model, defaults, tmpfile = _read_model(core, folder)
    except RuntimeError as e:  # OpenVINO reports unsupported ops / bad graphs as RuntimeError
        raise ExportError(f"OpenVINO cannot read {folder / GRAPH_FILE}: {e}") from e
    try:
        _check_model(manifest, model, folder)
        try:
            with ieee_denormals():
                compiled = core.compile_model(model, device, config)
        except RuntimeError as e:
            if properties:  # most likely theirs: an unknown name or a value the device refuses
                raise ConfigError(f"OpenVINO cannot compile {folder / GRAPH_FILE} for {device} with properties "
                                  f"{properties}: {str(e).strip()}; check their names and values against OpenVINO's "
                                  "documentation for that device, or leave them out") from e
            raise ExportError(f"OpenVINO cannot compile {folder / GRAPH_FILE} for {device}: {e}") from e
    except BaseException:
        if tmpfile is not None:
            tmpfile.unlink(missing_ok=True)
        raise
    _warn_if_precision_changed(compiled, str(config["INFERENCE_PRECISION_HINT"]), device,
                               "INFERENCE_PRECISION_HINT" in (properties or {}))
    del model  # the compiled model holds its own weights
    release_freed_memory()
    return OpenVinoRunner(folder, manifest, compiled, defaults, tmpfile)


def _keep_float_activations(core, device: str) -> dict:
    """OpenVINO's CPU plugin rounds the activations of int4 / int8-weight MatMuls to int8 by default
    (DYNAMIC_QUANTIZATION_GROUP_SIZE 32), whatever the precision hint and the graph's
    MatMulNBits accuracy_level: a level-0 export, checked at fp32's 1e-4, ran at ~1e-2. Off for
    such graphs at f32 (virtual devices forward it to theirs; a device that lacks it: nothing)."""
    key = "DYNAMIC_QUANTIZATION_GROUP_SIZE"
    if device.partition(":")[0] not in VIRTUAL_DEVICES:
        try:
            if key not in {str(p) for p in core.get_property(device, "SUPPORTED_PROPERTIES")}:
                return {}
        except RuntimeError:
            return {}
    return {key: 0}


def _warn_if_precision_changed(compiled, wanted: str, device: str, by_properties: bool) -> None:
    """OpenVINO compiles a precision its device lacks in another one without an error (f16 on a
    CPU with bf16 but no fp16 arithmetic runs in bf16): say what runs instead. wanted: the hint
    compiled with (the caller's `properties` may have set it)."""
    try:
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type
        got = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    except RuntimeError:  # a device that does not report it
        return
    if got not in ("", "undefined", "dynamic", wanted.lower()):
        source = "properties' INFERENCE_PRECISION_HINT" if by_properties else "precision"
        warnings.warn(f"OpenVINO on {device} runs {source} {wanted!r} as {got}, which it has instead; its "
                      "results have that precision's error", stacklevel=3)
