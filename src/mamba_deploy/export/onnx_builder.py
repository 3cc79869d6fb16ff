"""Node / initializer plumbing shared by the ONNX graph builders (`onnx_graph.py` for the whole
graph and its multi-token branch, `onnx_step.py` for its one-token branch); the names of the
graph's interface are in `onnx_meta.py`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_meta import DATA_FILE

INT64_MAX = np.iinfo(np.int64).max


class ExternalData:
    """Initializers written to one external-data file as the graph is built: each TensorProto
    keeps only its location, offset and length, so the graph never holds the weights' bytes and a
    model past protobuf's 2 GB is saved without a second copy of its weights in memory (saving a
    built proto with save_as_external_data holds every weight in the proto first). Tensors under
    `threshold` bytes stay inline, as onnx.save_model's size_threshold leaves them."""

    ALIGN = 4096  # each tensor starts on a page: runtimes that map the file need no copy

    def __init__(self, folder, location: str = DATA_FILE, threshold: int = 1024):
        self.location, self.threshold = location, threshold
        self._f = open(Path(folder) / location, "wb")

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto | None:
        """The external TensorProto of `array` (its bytes appended to the file), or None when
        it stays inline (small, or an object / big-endian array that from_array converts)."""
        order = sys.byteorder if array.dtype.byteorder == "=" else array.dtype.byteorder
        if array.nbytes < self.threshold or array.dtype.hasobject or order in (">", "big"):
            return None
        pad = -self._f.tell() % self.ALIGN
        if pad:
            self._f.write(bytes(pad))
        offset = self._f.tell()
        self._f.write(np.ascontiguousarray(array).data)
        t = onnx.TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                             data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(array.nbytes))):
            t.external_data.add(key=key, value=value)
        return t

    def close(self) -> None:
        self._f.close()


class Builder:
    """Collects nodes / initializers; names are unique across the graph and its subgraphs.
    external: an ExternalData that takes the large initializers (the root graph of a big model)."""

    def __init__(self, opset: int, counter=None, external: ExternalData | None = None):
        self.opset = opset
        self.external = external
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._counter = counter if counter is not None else [0]
        self._consts: dict = {}

    def _name(self, hint: str) -> str:
        self._counter[0] += 1
        return f"{hint}_{self._counter[0]}"

    def op(self, op_type: str, *inputs, n_out: int = 1, **attrs):
        outs = [self._name(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._name("n_" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def op_to(self, out: str, op_type: str, *inputs, **attrs) -> str:
        """One node whose output has the given name (a branch output); returns the name."""
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self._name("n_" + op_type), **attrs))
        return out

    def init(self, name: str, array: np.ndarray) -> str:
        t = self.external.tensor(name, array) if self.external is not None else None
        self.inits.append(t if t is not None else numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self._name("const"), arr)
        return self._consts[key]

    # ---- small compositions ----------------------------------------------------------------
    def reduce(self, op_type: str, x: str, axes, keepdims=1) -> str:
        """ReduceSum takes axes as an input since opset 13, ReduceMean only since 18."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, x, self.const(axes), keepdims=keepdims)
        return self.op(op_type, x, axes=list(axes), keepdims=keepdims)

    def silu(self, x: str) -> str:
        return self.op("Mul", x, self.op("Sigmoid", x))

    def softplus(self, x: str) -> str:
        """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)): exp of non-positive numbers only.
        Vectorised ops: 3.4x faster than ORT's scalar Softplus kernel on (1, 512, 1536) (4.75 ->
        1.38 ms, before log1p's correction). log1p(u) = log(w) + c, w = 1 + u rounded, c = u - (w - 1)
        its rounding error (w - 1 is exact): log(w) alone is off by up to 6e-8 absolute, 1e-3 of a
        softplus of 5e-5 (dt that small, from dt_proj, put a Mamba1 state 1.2e-4 from float64);
        the first-order term c (of log(1 + c / w)) leaves 6e-8 relative."""
        zero, one = self.const(0.0, np.float32), self.const(1.0, np.float32)
        pos = self.op("Max", x, zero)
        u = self.op("Exp", self.op("Sub", self.op("Min", x, zero), pos))  # exp(-|x|) in (0, 1]
        w = self.op("Add", u, one)
        c = self.op("Sub", u, self.op("Sub", w, one))
        return self.op("Add", self.op("Add", pos, c), self.op("Log", w))

    def rms(self, x: str, eps: float, weight: str | None = None) -> str:
        """x / sqrt(mean(x^2) + eps) over the last axis, float32. Written as Pow, ReduceMean, Add,
        Sqrt, Div, Mul: the pattern ONNX Runtime fuses into one SimplifiedLayerNormalization."""
        ms = self.reduce("ReduceMean", self.op("Pow", x, self.const(2.0, np.float32)), [-1])
        y = self.op("Div", x, self.op("Sqrt", self.op("Add", ms, self.const([eps], np.float32))))
        return y if weight is None else self.op("Mul", y, weight)

    def dim(self, shape: str, i: int) -> str:
        """Element i of a shape tensor, as a 1-element int64 tensor."""
        return self.op("Slice", shape, self.const([i]), self.const([i + 1 if i != -1 else INT64_MAX]))

    def cat(self, *parts) -> str:
        return self.op("Concat", *parts, axis=0)



def move_initializers(inits: list, dst) -> None:
    """Append the TensorProtos of `inits` to the repeated field `dst` (a graph's initializer),
    emptying the list as it goes. protobuf copies a message on append; moved one at a time, only
    one weight is held twice at a time, not all of them (make_graph then make_model used to hold
    every weight three times at once: 3x the checkpoint's size at the peak of an export)."""
    inits.reverse()
    while inits:
        dst.append(inits.pop())


def _ir_for_opset(opset: int) -> int:
    """Lowest IR version that carries `opset`, so older runtimes can load the file (a runtime
    refuses a file whose IR is above its own, whatever the opset); onnx's own table, which knows
    every opset the installed onnx can write."""
    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
