"""Mamba2's one-token state update in ONNX Runtime, two ways, for 24 layers (130m shapes, batch 1,
one group): h = h * decay + xdt B^T as Mul + K=1 MatMul + Add (what the export writes), against
Mul + Gemm(xdt, B, h * decay) (the outer product and the Add in one node); then y = h C. Checks
that both give the same numbers and prints the median ms per 24 layers of each, interleaved.

    python benchmarks/ort_gemm_state.py [--threads 2] [--rounds 8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

H, P, N, LAYERS = 24, 64, 128, 24  # heads, headdim, d_state of the 130m Mamba2


def build(kind: str):
    nodes, ins, outs = [], [], []
    for i in range(LAYERS):
        past, present = f"past{i}", f"present{i}"
        ins.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, [H * P, N]))
        outs += [helper.make_tensor_value_info(present, TensorProto.FLOAT, [H * P, N]),
                 helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [H * P, 1])]
        nodes.append(helper.make_node("Mul", [past, "decay"], [f"decayed{i}"]))  # (h p, n)
        if kind == "mul_matmul_add":
            nodes.append(helper.make_node("MatMul", ["xdt", "B"], [f"u{i}"]))  # (h p, 1) @ (1, n)
            nodes.append(helper.make_node("Add", [f"decayed{i}", f"u{i}"], [present]))
        else:
            nodes.append(helper.make_node("Gemm", ["xdt", "B", f"decayed{i}"], [present]))
        nodes.append(helper.make_node("MatMul", [present, "C"], [f"y{i}"]))  # (h p, n) @ (n, 1)
    ins += [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
            for name, shape in (("decay", [H * P, 1]), ("xdt", [H * P, 1]), ("B", [1, N]), ("C", [N, 1]))]
    graph = helper.make_graph(nodes, kind, ins, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--runs", type=int, default=20, help="session runs per round")
    ap.add_argument("--out", help="also write the medians and every round's times as JSON")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    feeds = {f"past{i}": rng.standard_normal((H * P, N), dtype=np.float32) for i in range(LAYERS)}
    feeds.update(decay=rng.random((H * P, 1), dtype=np.float32), xdt=rng.standard_normal((H * P, 1), dtype=np.float32),
                 B=rng.standard_normal((1, N), dtype=np.float32), C=rng.standard_normal((N, 1), dtype=np.float32))
    sessions = {}
    for kind in ("mul_matmul_add", "mul_gemm"):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        sessions[kind] = ort.InferenceSession(build(kind), so, providers=["CPUExecutionProvider"])
    a, b = (s.run(None, feeds) for s in sessions.values())
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
    print("max |difference| between the two:", diff)
    times = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for kind, sess in sessions.items():
            t = time.perf_counter()
            for _ in range(args.runs):
                sess.run(None, feeds)
            times[kind].append((time.perf_counter() - t) / args.runs * 1e3)
    print(f"| state update, {LAYERS} layers | median ms ({args.rounds} rounds, {args.threads} threads) |")
    print("| --- | ---: |")
    for kind, v in times.items():
        print(f"| {kind} | {statistics.median(v):.3f} |")
    if args.out:
        result = {"args": vars(args), "max_abs_difference": diff, "ms_per_rounds": times,
                  "median_ms": {k: statistics.median(v) for k, v in times.items()}}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
