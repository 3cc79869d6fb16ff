"""What an exported graph says about its own weights, so that manifest.json cannot say otherwise.

`verify` picks its limits from the manifest's weight type (dtype fp32 / fp16, a GGUF source's
type, a quantization method). The manifest's file hashes bind model.onnx to the manifest, but
not those fields: an edited "dtype": "fp16" would loosen fp32's limits without a word. So the
export also writes the type into the graph's own metadata (ModelProto.metadata_props, covered by
the hash), and every runner compares the two when it opens the folder. Exports written before
this carry no such entry and are not checked.

Reading the entry must not parse the graph: model.onnx holds the weights inline below 2 GB, and
onnx.load would copy all of them. ModelProto's top-level fields are scanned instead (protobuf's
wire format: a varint key, then a varint, a fixed 4 / 8 bytes, or a length and that many bytes),
seeking past the graph.
"""

from __future__ import annotations

import io
from pathlib import Path

# names of the graph's interface (the manifest repeats them with shapes and roles); here, not in
# onnx_builder, so that runners can import them without onnx
IDS, MASK, KEEP, LOGITS = "input_ids", "attention_mask", "num_logits_to_keep", "logits"
PAST_CONV, PAST_SSM, PRESENT_CONV, PRESENT_SSM = "past_conv.{}", "past_ssm.{}", "present_conv.{}", "present_ssm.{}"
# inputs whose default is an initializer of the same name (fed only when the caller gives one)
OPTIONAL_INPUTS = (MASK, KEEP)
# the top-level If: a loop-free one-token branch (then) or the any-length network (else)
ONE_TOKEN_IF = "if_one_token"
# file names in an export folder: the graph, its external weights (past 2 GB), its manifest, and a
# TensorRT engine built from it (export/tensorrt.py)
GRAPH_FILE, DATA_FILE, MANIFEST_FILE, ENGINE_FILE = "model.onnx", "model.onnx.data", "manifest.json", "model.engine"


def node_subgraphs(node) -> list:
    """The GraphProtos a NodeProto holds in its attributes (If branches, Scan / Loop bodies)."""
    return [sub for a in node.attribute for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs)]


def state_names(n_layer: int, present: bool = False) -> list[str]:
    """[conv.0, ssm.0, conv.1, ...] state input (or, present, output) names, the order of every
    runner's per-layer state list."""
    conv, ssm = (PRESENT_CONV, PRESENT_SSM) if present else (PAST_CONV, PAST_SSM)
    return [name.format(i) for i in range(n_layer) for name in (conv, ssm)]


WEIGHTS_KEY = "mamba_deploy.weights"
_METADATA_PROPS = 14  # ModelProto field numbers (onnx.proto)
_KEY, _VALUE = 1, 2  # StringStringEntryProto


def weights_label(manifest: dict) -> str:
    """The weight type a manifest claims, as the export records it in the graph: "quantized:<method>"
    for a MatMulNBits graph, else a GGUF source's type (source_weights) or the export dtype."""
    q = manifest.get("quantization")
    if isinstance(q, dict):
        return f"quantized:{q.get('method')}"
    return str(manifest.get("source_weights") or manifest.get("dtype") or "fp32")


def set_weights_label(proto, label: str) -> None:
    """Record `label` in the ModelProto (replacing an earlier one)."""
    kept = [p for p in proto.metadata_props if p.key != WEIGHTS_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=WEIGHTS_KEY, value=label)


def read_metadata(path: Path) -> dict:
    """model.onnx's metadata_props as {key: value}, without reading its graph; {} for a file this
    scan cannot follow (the runtime that opens it reports what is wrong)."""
    out = {}
    try:
        with open(path, "rb") as f:
            for data in _metadata_fields(f):
                key, value = _entry(data)
                out[key] = value
    except (OSError, ValueError):
        return {}
    return out


def _varint(read) -> int:
    shift = result = 0
    while True:
        b = read(1)
        if not b:
            raise ValueError("truncated varint")
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _metadata_fields(f):
    """The bytes of each top-level metadata_props field, every other field skipped."""
    while True:
        first = f.read(1)
        if not first:
            return
        f.seek(-1, 1)
        key = _varint(f.read)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _varint(f.read)
        elif wire == 1 or wire == 5:
            f.seek(8 if wire == 1 else 4, 1)
        elif wire == 2:
            n = _varint(f.read)
            if field == _METADATA_PROPS:
                data = f.read(n)
                if len(data) != n:
                    raise ValueError("truncated field")
                yield data
            else:
                f.seek(n, 1)  # the graph, with every inline weight
        else:
            raise ValueError(f"wire type {wire}")


def _entry(data: bytes) -> tuple[str, str]:
    """A StringStringEntryProto's (key, value)."""
    f, parts = io.BytesIO(data), {}
    while f.tell() < len(data):
        key = _varint(f.read)
        if key & 7 != 2:
            raise ValueError(f"wire type {key & 7} in a metadata entry")
        parts[key >> 3] = f.read(_varint(f.read)).decode("utf-8", "replace")
    return parts.get(_KEY, ""), parts.get(_VALUE, "")
