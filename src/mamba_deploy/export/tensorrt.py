"""`build_engine(onnx_dir, out_path)`: a TensorRT engine built from our exported ONNX folder with
TensorRT's Python API (Builder -> network from OnnxParser -> one optimization profile covering
the dynamic batch / seq axes -> serialized engine, written atomically), plus a static check that
TensorRT's ONNX parser supports every node of a graph (`trt_parser_issues`), which needs no
TensorRT and so runs everywhere.

OUT: the engine file (`model.engine` inside `out_path` when that is a folder) and a sidecar
`<engine>.json` holding the ONNX manifest (config, input/output names) and the build limits;
the TensorRT runner reads both. The sidecar is written first, the engine renamed into place
last, so an engine file on disk is always complete and described; the sidecar records the
engine's size, so an engine left from an earlier build beside a newer sidecar is refused.

TensorRT itself is imported only when an engine is built or run, so this module imports (and
the op check runs) where TensorRT cannot be installed.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..argtypes import positive_int
from ..atomic import atomic_file, output_path, prepare_output_file, renames_together
from ..errors import BackendUnavailableError, ExportError, OutputPathError
from ..extras import install_hint
from .onnx_meta import ENGINE_FILE, GRAPH_FILE, IDS, KEEP, LOGITS, MASK, ONE_TOKEN_IF, OPTIONAL_INPUTS, node_subgraphs

INSTALL_HINT = install_hint("tensorrt")
ENGINE_NAME = ENGINE_FILE
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = "mamba-deploy-tensorrt"
# onnx_meta.OPTIONAL_INPUTS: their default value is an initializer of the same name. TensorRT's
# parser imports such an input as weights (a constant), so they are removed from the proto before
# parsing and become real engine inputs; the runner feeds the defaults when the caller gives none.

# TensorRT's ONNX parser support for every op type our exporter may emit
# (export/onnx.py ALLOWED_OPS). Source: onnx-tensorrt docs/operators.md, "TensorRT 10.15 supports
# operators in the inclusive range of opset 9 to opset 24", Operator Support Matrix
# (https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md). All rows below are
# "Supported: Y".  op -> (supported types of the checked input, index of the checked input or
# None, inputs that must be build-time constants, the doc's restriction text).
F = ("FLOAT", "FLOAT16", "BFLOAT16")
FI = F + ("INT32", "INT64")
FIB = FI + ("BOOL",)
TRT_ONNX_OPS: dict[str, tuple[tuple[str, ...], int | None, tuple[int, ...], str]] = {
    "Add": (FI, 0, (), ""),
    "And": (("BOOL",), 0, (), ""),
    "Cast": (FIB + ("UINT8",), 0, (), ""),
    "Clip": (F, 0, (), ""),
    "Concat": (FIB, 0, (), ""),
    "Constant": (FIB, None, (), ""),  # its outputs are build-time constants (walk below)
    "ConstantOfShape": (FIB, None, (), ""),  # types are those of the `value` output
    "CumSum": (F, 0, (1,), "`axis` must be a build-time constant"),
    "Div": (FI, 0, (), ""),
    "Equal": (FI, 0, (), ""),
    "Exp": (F, 0, (), ""),
    "Expand": (FIB, 0, (), ""),
    "Gather": (FIB, 0, (), ""),
    "Greater": (FI, 0, (), ""),
    "Identity": (FIB, 0, (), ""),
    # before 10.11 the branches' outputs must have the same shape unless the condition is a
    # build-time constant (10.11 relaxed it to the same rank, but then cannot size such an output
    # before running: IExecutionContext.getTensorShape gives -1 for a value-dependent dim)
    "If": (FIB, None, (), "Output tensors of the two conditional branches must have the same rank "
                          "and must have different names"),
    "Log": (F, 0, (), ""),
    "MatMul": (F, 0, (), ""),
    "Max": (FI, 0, (), ""),
    "Min": (FI, 0, (), ""),
    "Mul": (FI, 0, (), ""),
    "Pad": (FI, 0, (), ""),
    "Pow": (F, 0, (), ""),
    "Reciprocal": (F, 0, (), ""),
    "ReduceMean": (FI, 0, (1,), "`axes` must be an initializer"),
    "ReduceMin": (FI, 0, (1,), "`axes` must be an initializer"),
    "ReduceSum": (FI, 0, (1,), "`axes` must be an initializer"),
    "Reshape": (FIB, 0, (), ""),
    "Scan": (F, None, (), ""),  # checked over all its inputs below
    "Shape": (FIB, 0, (), ""),
    "Sigmoid": (F, 0, (), ""),
    "Slice": (FIB, 0, (), ""),
    "Softplus": (F, 0, (), ""),
    "Split": (FIB, 0, (), ""),
    "Sqrt": (F, 0, (), ""),
    "Squeeze": (FIB, 0, (1,), "`axes` must be resolvable to a constant"),
    "Sub": (FI, 0, (), ""),
    "Transpose": (FIB, 0, (), ""),
    "Trilu": (FIB, 0, (), ""),
    "Unsqueeze": (FIB, 0, (1,), "`axes` must be resolvable to a constant"),
    "Where": (FIB, 1, (), ""),
}
MIN_OPSET, MAX_OPSET = 9, 24  # the same doc's opset range


# ----------------------------------------------------------------------------- op support check

def _value_types(graph, types: dict, shapes: dict) -> None:
    """Element type and shape (sizes, None where symbolic) of every named value in graph and its
    subgraphs (after inference)."""
    for v in (*graph.input, *graph.output, *graph.value_info):
        types[v.name] = v.type.tensor_type.elem_type
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    for t in graph.initializer:
        types[t.name] = t.data_type
    for sub in _subgraphs(graph):
        _value_types(sub, types, shapes)


def _subgraphs(graph):
    for n in graph.node:
        yield from node_subgraphs(n)


def _node_issues(n, op: str, label: str, types: dict, shapes: dict, consts: set) -> list[str]:
    """What TensorRT's parser would reject in one node whose op it knows (TRT_ONNX_OPS)."""
    from onnx import TensorProto

    issues = []
    ok_types, checked, const_in, _ = TRT_ONNX_OPS[op]
    checked_inputs = list(n.input) if op == "Scan" else \
        ([n.input[checked]] if checked is not None and len(n.input) > checked else [])
    for name in checked_inputs:
        t = TensorProto.DataType.Name(types.get(name, 0))
        if name and t not in ok_types:
            issues.append(f"{label}: input {name!r} has type {t}; TensorRT supports {', '.join(ok_types)}")
    for k in const_in:
        if len(n.input) > k and n.input[k] and n.input[k] not in consts:
            issues.append(f"{label}: input {k} ({n.input[k]!r}) must be a build-time constant")
    if op == "If":
        br = {a.name: a.g for a in n.attribute}
        for a, b in zip(br["then_branch"].output, br["else_branch"].output):
            if a.name == b.name:
                issues.append(f"{label}: both branches name an output {a.name!r}")
            sa, sb = shapes.get(a.name), shapes.get(b.name)
            if sa is None or sb is None:
                continue
            if len(sa) != len(sb):
                issues.append(f"{label}: branch outputs {a.name!r} / {b.name!r} have ranks {len(sa)} / {len(sb)}")
            elif sa != sb and n.input[0] not in consts:
                issues.append(f"{label}: branch outputs {a.name!r} / {b.name!r} have shapes {_shown(sa)} / "
                              f"{_shown(sb)} and the condition is computed at run time: TensorRT before 10.11 "
                              "refuses it, later versions cannot size the output before running")
    return issues


def _shown(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def trt_parser_issues(model) -> list[str]:
    """Every node of `model` (an onnx ModelProto, subgraphs included) the TensorRT ONNX parser
    would reject per TRT_ONNX_OPS: unknown op, unsupported input type, non-constant input where
    a constant is required, If branches with different ranks or shared output names, or with
    different shapes under a condition computed at run time. [] = fine."""
    import onnx

    issues: list[str] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        issues.append(f"opset {opset} is outside TensorRT's {MIN_OPSET}..{MAX_OPSET}")
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    shapes: dict[str, list] = {}
    _value_types(inferred.graph, types, shapes)

    def walk(g, consts: set[str], where: str):
        # build-time constants: initializers that are not overridable inputs, Constant outputs
        overridable = {v.name for v in g.input}
        consts = consts | {t.name for t in g.initializer if t.name not in overridable}
        consts |= {n.output[0] for n in g.node if n.op_type == "Constant"}
        for n in g.node:
            op = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
            label = f"{where}{n.name or op} ({op})"
            if op not in TRT_ONNX_OPS:
                issues.append(f"{label}: op not in TensorRT's supported ONNX operators")
                continue
            issues.extend(_node_issues(n, op, label, types, shapes, consts))
            for sub in node_subgraphs(n):
                walk(sub, consts, f"{label} > ")

    walk(inferred.graph, set(), "")
    return issues


# ----------------------------------------------------------------------------- engine build

def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailableError(f"TensorRT is not installed: {INSTALL_HINT}") from e
    return trt


def load_stripped_onnx(folder: Path):
    """model.onnx without the optional inputs' default initializers (see OPTIONAL_INPUTS);
    returns (proto, {name: default numpy value})."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(folder / GRAPH_FILE), load_external_data=False)
    defaults = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name in OPTIONAL_INPUTS}
    kept = [t for t in proto.graph.initializer if t.name not in OPTIONAL_INPUTS]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto, defaults


def engine_graph(folder: Path):
    """(proto, defaults): what TensorRT parses. load_stripped_onnx's proto with the top-level If
    (ONE_TOKEN_IF) replaced by its any-length branch, which computes the same for one token. Its
    condition reads the attention mask's values and its branches' logits differ in shape (b, 1, V)
    / (b, keep or seq, V), which TensorRT cannot take (see TRT_ONNX_OPS["If"]); TensorRT fuses the
    any-length network's decode itself. Exports without that If are returned as they are."""
    from onnx import helper

    proto, defaults = load_stripped_onnx(folder)
    g = proto.graph
    at = [i for i, n in enumerate(g.node) if n.op_type == "If" and n.name == ONE_TOKEN_IF]
    if not at:
        return proto, defaults
    node = g.node[at[0]]
    branch = next(a.g for a in node.attribute if a.name == "else_branch")
    # branch value names come from the graph's one counter, so they cannot clash with the outer graph's
    inlined = list(branch.node) + [helper.make_node("Identity", [b.name], [o], name=f"{o}.any_length")
                                   for b, o in zip(branch.output, node.output)]
    nodes = [*g.node[:at[0]], *inlined, *g.node[at[0] + 1:]]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(branch.initializer)
    g.value_info.extend(branch.value_info)
    _drop_unused(g)
    return proto, defaults


def _names_read(node) -> set[str]:
    """Inputs of a node and of every node in its subgraphs (a Scan body reads outer values)."""
    names = set(node.input)
    for sub in node_subgraphs(node):
        for n in sub.node:
            names |= _names_read(n)
    return names


def _drop_unused(g) -> None:
    """Remove nodes and initializers no graph output depends on (the one-token branch's condition)."""
    live = {o.name for o in g.output}
    kept = []
    for n in reversed(g.node):
        if any(o in live for o in n.output):
            kept.append(n)
            live |= _names_read(n)
    inits = [t for t in g.initializer if t.name in live]
    del g.node[:], g.initializer[:]
    g.node.extend(reversed(kept))
    g.initializer.extend(inits)


def engine_path(out_path) -> Path:
    p = output_path(out_path)
    return p / ENGINE_NAME if p.is_dir() or p.suffix == "" else p


def engine_file(path) -> Path:
    """An engine named as its file or as the folder holding ENGINE_NAME (what open_runner takes)."""
    p = Path(path)
    return p / ENGINE_NAME if p.is_dir() else p


def sidecar_path(engine: Path) -> Path:
    """The JSON beside an engine: the build options and the ONNX export's manifest."""
    return Path(str(engine) + SIDECAR_SUFFIX)


def _check_engine_path(out: Path, folder: Path) -> Path:
    """The engine path, writable; an existing file there must be an engine this builds (it has a
    sidecar), never a file of the ONNX export (`OUT` given as the folder's model.onnx)."""
    out = prepare_output_file(out, example=ENGINE_NAME)
    if out.is_file() and not sidecar_path(out).is_file() and folder.resolve() in out.resolve().parents:
        raise OutputPathError(f"engine output {out} is a file of the ONNX export {folder}, which it would replace; "
                              f"write the engine to a new path (e.g. {folder / ENGINE_NAME})")
    return out


_LOGGER = []  # TensorRT keeps the first logger it was given for the process: one, made on first use


def trt_logger(trt):
    """The process's one trt.Logger (warnings and errors): a second one is ignored by TensorRT with
    a warning that the logger "differs from one already provided"."""
    if not _LOGGER:
        _LOGGER.append(trt.Logger(trt.Logger.WARNING))
    return _LOGGER[0]


def _set_shape(profile, name: str, *shapes, values: bool = False) -> None:
    """IOptimizationProfile.set_shape / set_shape_input, whose bad arguments are a RuntimeError of
    the bindings, as a typed error naming the input."""
    try:
        (profile.set_shape_input if values else profile.set_shape)(name, *shapes)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ExportError(f"TensorRT refused the optimization profile of {name!r} {shapes} ({e}); re-export the ONNX "
                          "model with this version, or pass other max_batch / max_seq") from e


def _profile(builder, network, manifest, opt_batch, opt_seq, max_batch, max_seq):
    """One optimization profile over the dynamic batch / seq axes; state inputs keep their
    static per-sequence dims."""
    profile = builder.create_optimization_profile()
    static = {d["name"]: d["shape"] for d in manifest["inputs"]}
    states = {d["name"] for d in manifest["inputs"] if str(d.get("role", "")).startswith("state_")}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.name in (IDS, MASK):  # (batch, seq)
            _set_shape(profile, t.name, (1, 1), (opt_batch, opt_seq), (max_batch, max_seq))
        elif t.name == KEEP:  # (1,), and it feeds Slice starts: a shape tensor
            _set_shape(profile, t.name, (1,), (1,), (1,))
            if t.is_shape_tensor:
                _set_shape(profile, t.name, (0,), (1,), (max_seq,), values=True)
        elif t.name in states:  # past_conv.i / past_ssm.i: (batch, *static state dims)
            rest = tuple(static[t.name][1:])
            _set_shape(profile, t.name, (1, *rest), (opt_batch, *rest), (max_batch, *rest))
        else:
            raise ExportError(f"unexpected engine input {t.name!r}; re-export the ONNX model with this version")
    return profile


def build_engine(onnx_dir, out_path, fp16: bool = False, max_batch: int = 8, max_seq: int = 2048,
                 opt_batch: int = 1, opt_seq: int | None = None, workspace_mb: int | None = None) -> Path:
    """Build a TensorRT engine from an ONNX export folder; returns the engine path.

    One optimization profile: batch 1..max_batch and seq 1..max_seq (optimized for opt_batch x
    opt_seq, default max_seq // 4); state inputs take their static dims with the same batch range.
    fp16 lets TensorRT pick half-precision kernels (the state stays float32 at the boundary)."""
    from ..export.onnx import open_export_folder

    folder, manifest = open_export_folder(onnx_dir)
    opt_seq = max(1, max_seq // 4) if opt_seq is None and isinstance(max_seq, int) else opt_seq
    for name, v in (("max_batch", max_batch), ("max_seq", max_seq), ("opt_batch", opt_batch), ("opt_seq", opt_seq),
                    ("workspace_mb", 1 if workspace_mb is None else workspace_mb)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ExportError(f"{name}={v!r} must be a positive integer")
    if opt_batch > max_batch or opt_seq > max_seq:
        raise ExportError(f"opt_batch={opt_batch} / opt_seq={opt_seq} exceed max_batch={max_batch} / max_seq={max_seq}")
    # the profile covers logits for every position (num_logits_to_keep 0): TensorRT tensors hold
    # fewer than 2**31 elements, which a build finds only after minutes
    vocab = next((d["shape"][-1] for d in manifest["outputs"] if d["name"] == LOGITS), None)
    if isinstance(vocab, int) and max_batch * max_seq * vocab >= 2**31:
        raise ExportError(f"max_batch {max_batch} x max_seq {max_seq} x vocabulary {vocab} logits reach TensorRT's "
                          f"2**31-element tensor limit; lower --max-batch or --max-seq (longer prompts are "
                          "prefilled in pieces of max_seq)")
    out = _check_engine_path(engine_path(out_path), folder)  # before minutes of building, not after
    proto, defaults = engine_graph(folder)
    issues = trt_parser_issues(proto)
    if issues:
        raise ExportError(f"{folder / GRAPH_FILE} uses nodes TensorRT's ONNX parser does not support: "
                          + "; ".join(issues[:8]))
    trt = import_tensorrt()

    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated there); 8.x needs it
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if flag is None or int(trt.__version__.split(".")[0]) >= 10 else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    # path: where the parser resolves model.onnx.data (external weights) from
    if not parser.parse(proto.SerializeToString(), str(folder / GRAPH_FILE)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT cannot parse {folder / GRAPH_FILE}: {' | '.join(errors)}")
    keep = [network.get_input(i) for i in range(network.num_inputs) if network.get_input(i).name == KEEP]
    if keep and not keep[0].is_shape_tensor:  # the logits' length would be data-dependent (-1) at run time
        raise ExportError(f"TensorRT reads {KEEP} of {folder / GRAPH_FILE} as data, not as a shape tensor, so "
                          "the logits have no shape before running; this TensorRT cannot run the export")

    config = builder.create_builder_config()
    # "fp32" means fp32: TensorRT rounds matmul inputs to TF32 (10-bit mantissas) unless told not to,
    # ~4e-4 logits error on the demo models against the 1e-4 the fp32 engine is checked at
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):  # weak typing: deprecated in 10.12, gone in 11
            raise ExportError(f"--fp16 asks TensorRT to pick half-precision kernels, which TensorRT "
                              f"{trt.__version__} no longer does (its networks keep the graph's own types); "
                              "build from an `export onnx --dtype fp16` folder without --fp16 instead")
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    profile = _profile(builder, network, manifest, opt_batch, opt_seq, max_batch, max_seq)
    if config.add_optimization_profile(profile) < 0:
        raise ExportError(f"TensorRT refused the optimization profile (batch 1..{max_batch}, seq 1..{max_seq}); "
                          "see the log above")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {folder / GRAPH_FILE} (see the log above)")

    data = bytes(serialized)
    sidecar = {
        "format": SIDECAR_FORMAT, "onnx_dir": str(folder.resolve()), "manifest": manifest,
        "defaults": {k: v.tolist() for k, v in defaults.items()},
        "build": {"fp16": fp16, "max_batch": max_batch, "max_seq": max_seq, "opt_batch": opt_batch,
                  "opt_seq": opt_seq, "tensorrt": trt.__version__,
                  "engine_bytes": len(data)},  # the runner checks the pair (two renames)
    }
    # written in full first, then renamed sidecar first, engine last, with a Ctrl-C / SIGTERM held
    # between the two: an earlier working engine is never left beside a newer sidecar that refuses it
    side = sidecar_path(out)
    with renames_together() as hold, atomic_file(out) as engine_tmp, atomic_file(side) as sidecar_tmp:
        sidecar_tmp.write_bytes(json.dumps(sidecar, indent=2).encode())
        engine_tmp.write_bytes(data)
        hold(out, side)
    return out


# ----------------------------------------------------------------------------- CLI

def register(subparsers) -> None:
    s = subparsers.add_parser("tensorrt", help="TensorRT engine from an ONNX export folder (NVIDIA GPU)")
    s.add_argument("onnx_dir", help="folder written by `mamba-deploy export onnx`")
    s.add_argument("out_path", help="engine file, or a folder for model.engine")
    s.add_argument("--fp16", action="store_true",
                   help="let TensorRT choose FP16 kernels; the state inputs and outputs stay float32")
    s.add_argument("--max-batch", type=positive_int, default=8,
                   help="largest batch the engine accepts (its profile covers 1..N, tuned for 1)")
    s.add_argument("--max-seq", type=positive_int, default=2048,
                   help="most tokens per engine call (profile 1..N, tuned for N/4); longer unpadded prompts are "
                        "prefilled in pieces of N, a left-padded batch must fit in N")
    s.set_defaults(func=_cmd)


def _cmd(args) -> None:
    out = build_engine(args.onnx_dir, args.out_path, fp16=args.fp16, max_batch=args.max_batch, max_seq=args.max_seq)
    print(f"wrote {out}")
