"""How fast ONNX Runtime's fp32 decode can be on this machine: the memory-read bandwidth, and a
one-token graph holding only the 130m models' weight MatMuls (random weights, same shapes as
benchmarks/cpu_backends.py: embedding gather, per layer in_proj / x_proj / dt_proj / out_proj
(Mamba1) or in_proj / out_proj (Mamba2) plus the residual add, tied lm_head). Everything else
the real graph does (norms, conv, state update) comes on top of this time.

With --graphs, the same run also times the real export of the cpu_backends.py checkpoint and an
ablation of it whose one-token branch skips the causal conv (present_conv = past_conv; wrong
numbers on purpose, timing only), all three graphs interleaved round by round. Unlike ORT's
profiler (ort_profile.py), which adds a few microseconds to every node and so roughly doubles
the small ones, the differences are unprofiled: graph - MatMuls only = everything but the
weights, graph - no conv = the conv.

    python benchmarks/ort_floor.py --threads 2 [--graphs] --out benchmarks/results/ort_floor.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_backends import read_bandwidth_gbs  # noqa: E402

from mamba_deploy.atomic import write_json  # noqa: E402

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


def session(model, threads: int):
    """A one-token timer for an ONNX model (proto or path): IO binding, preallocated logits, and
    for the real graph two sets of state buffers bound as past / present in turn."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    sess = ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    states = {i.name[len("past_"):]: [d if isinstance(d, int) else 1 for d in i.shape]
              for i in sess.get_inputs() if i.name.startswith("past_")}
    bufs = [{k: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for k, shape in states.items()}
            for _ in range(2)]
    logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, V), np.float32))
    ios = []
    for a in range(2 if states else 1):
        io = sess.io_binding()
        io.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(np.array([[7]], np.int64)))
        io.bind_ortvalue_output("logits", logits)
        for k in states:
            io.bind_ortvalue_input("past_" + k, bufs[a][k])
            io.bind_ortvalue_output("present_" + k, bufs[1 - a][k])
        ios.append(io)
    for j in range(3):
        sess.run_with_iobinding(ios[j % len(ios)])

    def run(steps: int) -> list[float]:
        times = []
        for j in range(steps):
            t = time.perf_counter()
            sess.run_with_iobinding(ios[j % len(ios)])
            times.append(time.perf_counter() - t)
        return times
    return run


def median_ms(times) -> float:
    return sorted(times)[len(times) // 2] * 1e3


def export_graphs(arch: str, work: Path) -> dict:
    """The real ONNX graph of the cpu_backends.py checkpoint and its conv-free ablation: name -> path."""
    from cpu_backends import build_checkpoint

    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.export.onnx import _save
    from mamba_deploy.export.onnx_meta import PAST_CONV, PRESENT_CONV
    from mamba_deploy.export.onnx_graph import MambaGraph
    from mamba_deploy.export.onnx_step import StepNetwork

    build_checkpoint(arch, work / "hf")
    model = load_model(work / "hf")
    weights = dict(model.state_dict())

    def no_conv(self, x, p, i, channels):
        self.g.op_to(self.out(PRESENT_CONV.format(i)), "Identity", PAST_CONV.format(i))
        return x

    paths = {}
    for name, conv in (("graph", StepNetwork._conv_step), ("graph_no_conv", no_conv)):
        real, StepNetwork._conv_step = StepNetwork._conv_step, conv
        try:
            proto = MambaGraph(model.config, weights).build()
        finally:
            StepNetwork._conv_step = real
        (work / name).mkdir()
        _save(proto, work / name, label="fp32")  # as export_onnx writes it
        paths[name] = str(work / name / "model.onnx")
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--graphs", action="store_true", help="also time the real graph and its conv-free ablation")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds with --graphs")
    ap.add_argument("--out", default="benchmarks/results/ort_floor.json")
    args = ap.parse_args(argv)
    bw = [read_bandwidth_gbs(args.threads)]  # before and after: it drifts on a shared host
    rows = []
    for arch in LAYER_MATMULS:
        model, nbytes = chain_model(arch)
        with tempfile.TemporaryDirectory() as tmp:
            models = {"matmuls_only": model, **(export_graphs(arch, Path(tmp)) if args.graphs else {})}
            runs = {name: session(m, args.threads) for name, m in models.items()}
            times = {name: [] for name in runs}
            rounds = args.rounds if args.graphs else 1
            for _ in range(rounds):
                for name, run in runs.items():
                    times[name] += run(max(1, args.steps // rounds))
            del runs
        ms = {name: round(median_ms(t), 2) for name, t in times.items()}
        row = dict(arch=arch, matmul_weights_mb=round(nbytes / 1e6, 1),
                   bandwidth_floor_ms=round(nbytes / bw[0] / 1e6, 2), ort_matmuls_only_ms=ms["matmuls_only"],
                   ort_gbs=round(nbytes / ms["matmuls_only"] / 1e6, 1))
        print(f"{arch}: {nbytes / 1e6:.0f} MB of MatMul weights; bandwidth floor {row['bandwidth_floor_ms']:.2f} ms, "
              f"ORT MatMuls only {ms['matmuls_only']:.2f} ms/token ({row['ort_gbs']:.1f} GB/s)")
        if args.graphs:
            row.update(ort_graph_ms=ms["graph"], ort_graph_no_conv_ms=ms["graph_no_conv"],
                       non_matmul_ms=round(ms["graph"] - ms["matmuls_only"], 2),
                       conv_ms=round(ms["graph"] - ms["graph_no_conv"], 2))
            print(f"{arch}: real graph {ms['graph']:.2f} ms/token, without the conv {ms['graph_no_conv']:.2f}: "
                  f"everything but the weight MatMuls {row['non_matmul_ms']:.2f} ms, "
                  f"of which the conv {row['conv_ms']:.2f}")
        rows.append(row)
    bw.append(read_bandwidth_gbs(args.threads))
    print(f"read bandwidth {bw[0]:.1f} / {bw[1]:.1f} GB/s on {args.threads} threads (before / after)")
    write_json(args.out, {"threads": args.threads, "read_bandwidth_gbs_before_after": [round(b, 1) for b in bw],
                          "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
