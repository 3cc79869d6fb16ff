"""How fast ONNX Runtime's fp32 decode can be on this machine: the memory-read bandwidth, and a
one-token graph holding only the 130m models' weight MatMuls (random weights, same shapes as
benchmarks/cpu_backends.py: embedding gather, per layer in_proj / x_proj / dt_proj / out_proj
(Mamba1) or in_proj / out_proj (Mamba2) plus the residual add, tied lm_head). Everything else
the real graph does (norms, conv, state update) comes on top of this time.

    python benchmarks/ort_floor.py --threads 2 --out benchmarks/results/ort_floor.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_backends import read_bandwidth_gbs  # noqa: E402

D, V, LAYERS = 768, 50280, 24
# arch -> per-layer chain of (in, out) MatMuls; each consumes the previous output's first `in` columns
LAYER_MATMULS = {"mamba1": [(768, 3072), (1536, 80), (48, 1536), (1536, 768)],
                 "mamba2": [(768, 3352), (1536, 768)]}


def chain_model(arch: str):
    """input_ids (b, 1) -> logits through only the weight MatMuls (+ residual adds)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(arr, name))
        return name

    const("emb", rng.standard_normal((D, V), dtype=np.float32))
    nodes += [helper.make_node("Reshape", ["input_ids", const("flat_shape", np.array([-1]))], ["ids"]),
              helper.make_node("Gather", ["emb", "ids"], ["cols"], axis=1),
              helper.make_node("Transpose", ["cols"], ["h0"], perm=[1, 0])]
    h = "h0"
    for i in range(LAYERS):
        x = h
        for j, (k, n) in enumerate(LAYER_MATMULS[arch]):
            if j:  # the next projection reads the first k columns (the Split/Slice of the real graph)
                x_in = f"x{i}_{j}"
                nodes.append(helper.make_node("Slice", [x, const(f"s0_{i}_{j}", np.array([0])),
                                                        const(f"s1_{i}_{j}", np.array([k])),
                                                        const(f"ax_{i}_{j}", np.array([1]))], [x_in]))
                x = x_in
            w = const(f"w{i}_{j}", rng.standard_normal((k, n), dtype=np.float32) * 0.02)
            nodes.append(helper.make_node("MatMul", [x, w], [f"y{i}_{j}"]))
            x = f"y{i}_{j}"
        nodes.append(helper.make_node("Add", [h, x], [f"h{i + 1}"]))
        h = f"h{i + 1}"
    nodes.append(helper.make_node("Unsqueeze", [h, const("ax1", np.array([1]))], ["hu"]))
    nodes.append(helper.make_node("MatMul", ["hu", "emb"], ["logits"]))
    graph = helper.make_graph(nodes, f"{arch}_matmuls", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", 1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, sum(t.ByteSize() for t in inits)


def time_chain(model, threads: int, steps: int) -> float:
    """Median ms per one-token run (IO binding, preallocated logits)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    io = sess.io_binding()
    io.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(np.array([[7]], np.int64)))
    io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, V), np.float32)))
    for _ in range(3):
        sess.run_with_iobinding(io)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        sess.run_with_iobinding(io)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/ort_floor.json")
    args = ap.parse_args(argv)
    bw = read_bandwidth_gbs(args.threads)
    rows = []
    for arch in LAYER_MATMULS:
        model, nbytes = chain_model(arch)
        ms = time_chain(model, args.threads, args.steps)
        rows.append(dict(arch=arch, matmul_weights_mb=round(nbytes / 1e6, 1), bandwidth_floor_ms=round(nbytes / bw / 1e6, 2),
                         ort_matmuls_only_ms=round(ms, 2), ort_gbs=round(nbytes / ms / 1e6, 1)))
        print(f"{arch}: {nbytes / 1e6:.0f} MB of MatMul weights; bandwidth floor {nbytes / bw / 1e6:.2f} ms, "
              f"ORT MatMuls only {ms:.2f} ms/token ({nbytes / ms / 1e6:.1f} GB/s)")
    print(f"read bandwidth {bw:.1f} GB/s on {args.threads} threads")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "read_bandwidth_gbs": round(bw, 1), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
