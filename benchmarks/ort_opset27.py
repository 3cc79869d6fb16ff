"""ONNX opset 27's fused recurrent ops against the decode nodes the export writes, in ONNX Runtime.

Opset 27 added two standard operators that express a Mamba decode step in one node each:
`LinearAttention` (update_rule "gated": S = exp(g) * S + k (x) v, o = q^T S; Mamba2 with one
decay per head, Mamba1 with one per (channel, d_state) pair) and `CausalConvWithState` (the
depthwise causal conv with its carry state and a fused SiLU). If ONNX Runtime ran them as fused
kernels, the one-token branch would lose most of its state-sized passes. This script times, for
24 layers of the 130m shapes at batch 1 (cpu_backends.py's models), each op against the same
step written with the nodes `export/onnx_step.py` uses (state update + readout without the D
skip; conv + bias + SiLU without the attention-mask multiplies), after checking every graph
against float64 numpy. Between timed runs a 128 MB read evicts the caches, as a decode step's
weight streaming does. LinearAttention is timed in its own state layout (b, h, d_state,
headdim), i.e. without the two Transposes the export's (b, h, headdim, d_state) would need: its
best case.

    python benchmarks/ort_opset27.py [--threads 2] [--rounds 6] [--runs 40] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mamba_deploy.atomic import write_json  # noqa: E402

LAYERS = 24
SHAPES = {"mamba1": dict(d=1536, n=16, conv=1536), "mamba2": dict(h=24, p=64, n=128, conv=1792)}
K = 4  # d_conv


class Graph:
    """Just enough of a builder: nodes, initializers, inputs and outputs of one ONNX graph."""

    def __init__(self):
        self.nodes, self.inits, self.ins, self.outs, self._n = [], [], [], [], 0

    def const(self, arr) -> str:
        from onnx import numpy_helper

        self._n += 1
        self.inits.append(numpy_helper.from_array(np.asarray(arr), f"c{self._n}"))
        return f"c{self._n}"

    def op(self, op_type: str, *inputs, out: str | list | None = None, n_out=1, **attrs):
        from onnx import helper

        self._n += 1
        outs = [out] if isinstance(out, str) else out or [f"t{self._n}_{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def model(self, opset: int) -> bytes:
        from onnx import TensorProto, helper

        info = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
        g = helper.make_graph(self.nodes, "g", [info(n, s) for n, s in self.ins], [info(n, None) for n in self.outs],
                              self.inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


def per_head(g: Graph, t: str, h: int, n: int) -> str:
    """(1, n) -> (1, 1, h * n): LinearAttention takes one key / query per head, Mamba has one per group."""
    return g.op("Reshape", g.op("Expand", g.op("Reshape", t, g.const([0, 1, 1, n])), g.const([1, 1, h, n])),
                g.const([0, 1, h * n]))


def ssm_graph(arch: str, fused: bool, A: list) -> Graph:
    """Per layer i: inputs past{i}, x{i} (1, d), dt{i} (1, d|h) after softplus, B{i}, C{i} (1, n);
    outputs present{i}, y{i} (1, d)."""
    s, g = SHAPES[arch], Graph()
    for i in range(LAYERS):
        if arch == "mamba2":
            h, p, n = s["h"], s["p"], s["n"]
            past_shape, dt_w = ([1, h, n, p] if fused else [1, h, p, n]), h
        else:
            h, p, n = s["d"], 1, s["n"]
            past_shape, dt_w = [1, h, n], h
        g.ins += [(f"past{i}", past_shape), (f"x{i}", [1, h * p]), (f"dt{i}", [1, dt_w]), (f"B{i}", [1, n]), (f"C{i}", [1, n])]
        g.outs += [f"present{i}", f"y{i}"]
        a = g.const(A[i])
        past, x, dt, B, C = (f"{v}{i}" for v in ("past", "x", "dt", "B", "C"))
        if arch == "mamba2":
            xdt = g.op("Mul", g.op("Reshape", x, g.const([0, h, p])), g.op("Unsqueeze", dt, g.const([2])))  # (1, h, p)
            if fused:
                gdec = g.op("Reshape", g.op("Mul", dt, a), g.const([0, 1, h]))
                o = g.op("LinearAttention", per_head(g, C, h, n), per_head(g, B, h, n), g.op("Reshape", xdt, g.const([0, 1, h * p])), past, gdec,
                         out=[f"o{i}", f"present{i}"], q_num_heads=h, kv_num_heads=h, scale=1.0, update_rule="gated")[0]
                g.op("Reshape", o, g.const([0, h * p]), out=f"y{i}")
                continue
            decay = g.op("Reshape", g.op("Exp", g.op("Mul", dt, a)), g.const([0, h, 1, 1]))
            u = g.op("MatMul", g.op("Reshape", xdt, g.const([0, 1, h * p, 1])), g.op("Reshape", B, g.const([0, 1, 1, n])))
            st = g.op("Add", g.op("Mul", past, decay), g.op("Reshape", u, g.const([0, h, p, n])), out=f"present{i}")
            y = g.op("MatMul", g.op("Reshape", st, g.const([0, 1, h * p, n])), g.op("Reshape", C, g.const([0, 1, n, 1])))
            g.op("Reshape", y, g.const([0, h * p]), out=f"y{i}")
            continue
        dt_n = g.op("MatMul", g.op("Unsqueeze", dt, g.const([2])), g.const(np.ones((1, n), np.float32)))  # (1, d, n)
        if fused:
            y = g.op("LinearAttention", per_head(g, C, h, n), per_head(g, B, h, n), g.op("Reshape", g.op("Mul", dt, x), g.const([0, 1, h])),
                     g.op("Reshape", past, g.const([0, h, n, 1])), g.op("Reshape", g.op("Mul", dt_n, a), g.const([0, 1, h * n])),
                     n_out=2, q_num_heads=h, kv_num_heads=h, scale=1.0, update_rule="gated")
            g.op("Reshape", y[1], g.const([0, h, n]), out=f"present{i}")
            g.op("Reshape", y[0], g.const([0, h]), out=f"y{i}")
            continue
        dA = g.op("Exp", g.op("Mul", dt_n, a))
        dBx = g.op("MatMul", g.op("Unsqueeze", g.op("Mul", dt, x), g.const([2])), g.op("Unsqueeze", B, g.const([1])))
        st = g.op("Add", g.op("Mul", past, dA), dBx, out=f"present{i}")
        g.op("Reshape", g.op("MatMul", st, g.op("Unsqueeze", C, g.const([2]))), g.const([0, h]), out=f"y{i}")
    return g


def conv_graph(channels: int, fused: bool, W: list, bias: list) -> Graph:
    """Per layer i: inputs past{i} (1, c, k-1), x{i} (1, c); outputs present{i}, y{i} = silu(conv + bias) (1, c)."""
    g = Graph()
    for i in range(LAYERS):
        g.ins += [(f"past{i}", [1, channels, K - 1]), (f"x{i}", [1, channels])]
        g.outs += [f"present{i}", f"y{i}"]
        xu = g.op("Unsqueeze", f"x{i}", g.const([2]))  # (1, c, 1)
        if fused:
            y = g.op("CausalConvWithState", xu, g.const(W[i][:, None, :]), g.const(bias[i]), f"past{i}",
                     out=[f"conv{i}", f"present{i}"], activation="silu")[0]  # (1, c, 1)
            g.op("Reshape", y, g.const([0, channels]), out=f"y{i}")
            continue
        xt = g.op("Concat", f"past{i}", xu, axis=2)
        g.op("Slice", xt, g.const([1]), g.const([2**62]), g.const([2]), out=f"present{i}")
        y = g.op("Reshape", g.op("MatMul", g.op("Mul", xt, g.const(W[i])), g.const(np.ones((K, 1), np.float32))),
                 g.const([0, channels]))
        y = g.op("Add", y, g.const(bias[i]))
        g.op("Mul", y, g.op("Sigmoid", y), out=f"y{i}")
    return g


def ssm_reference(arch, feeds, A, fused):
    """float64 numpy: {name: array} for present{i}, y{i}."""
    out = {}
    for i in range(LAYERS):
        f = {k: feeds[f"{k}{i}"].astype(np.float64) for k in ("past", "x", "dt", "B", "C")}
        if arch == "mamba2":
            s = SHAPES[arch]
            h, p = s["h"], s["p"]
            past = f["past"].transpose(0, 1, 3, 2) if fused else f["past"]  # -> (1, h, p, n)
            xdt = f["x"].reshape(1, h, p) * f["dt"][:, :, None]
            st = past * np.exp(f["dt"] * A[i])[:, :, None, None] + xdt[..., None] * f["B"][:, None, None, :]
            out[f"y{i}"] = (st @ f["C"][0]).reshape(1, h * p)
            out[f"present{i}"] = st.transpose(0, 1, 3, 2) if fused else st
        else:
            st = f["past"] * np.exp(f["dt"][:, :, None] * A[i]) + (f["dt"] * f["x"])[:, :, None] * f["B"][:, None, :]
            out[f"present{i}"], out[f"y{i}"] = st, st @ f["C"][0]
    return out


def conv_reference(feeds, W, bias):
    out = {}
    for i in range(LAYERS):
        xt = np.concatenate([feeds[f"past{i}"], feeds[f"x{i}"][:, :, None]], axis=2).astype(np.float64)
        y = (xt * W[i]).sum(-1) + bias[i]
        out[f"present{i}"], out[f"y{i}"] = xt[:, :, 1:], y / (1 + np.exp(-y))
    return out


def cases(rng):
    """name -> (arch, {variant: graph bytes}, feeds per variant, float64 reference per variant)."""
    out = {}
    for arch, s in SHAPES.items():
        n = s["n"]
        if arch == "mamba2":
            h, p = s["h"], s["p"]
            A = [-np.exp(rng.uniform(0, 2.5, h)).astype(np.float32) for _ in range(LAYERS)]
            shapes = dict(x=(1, h * p), dt=(1, h), B=(1, n), C=(1, n))
            past = {False: (1, h, p, n), True: (1, h, n, p)}
        else:
            d = s["d"]
            A = [-np.exp(rng.uniform(0, 2.5, (d, n))).astype(np.float32) for _ in range(LAYERS)]
            shapes = dict(x=(1, d), dt=(1, d), B=(1, n), C=(1, n))
            past = {False: (1, d, n), True: (1, d, n)}
        graphs, feeds, refs = {}, {}, {}
        for fused, name in ((False, "export nodes"), (True, "LinearAttention")):
            f = {}
            for i in range(LAYERS):
                f[f"past{i}"] = rng.standard_normal(past[fused], dtype=np.float32)
                for k, shp in shapes.items():
                    f[f"{k}{i}"] = (rng.uniform(0.001, 0.2, shp) if k == "dt" else rng.standard_normal(shp)).astype(np.float32)
            graphs[name], feeds[name] = ssm_graph(arch, fused, A).model(27 if fused else 17), f
            refs[name] = ssm_reference(arch, f, A, fused)
        out[f"{arch} state update"] = (graphs, feeds, refs)
        c = s["conv"]
        W = [rng.standard_normal((c, K)).astype(np.float32) * 0.5 for _ in range(LAYERS)]
        bias = [rng.standard_normal(c).astype(np.float32) * 0.1 for _ in range(LAYERS)]
        f = {}
        for i in range(LAYERS):
            f[f"past{i}"], f[f"x{i}"] = rng.standard_normal((1, c, K - 1), dtype=np.float32), rng.standard_normal((1, c), dtype=np.float32)
        ref = conv_reference(f, W, bias)
        out[f"{arch} conv step"] = ({"export nodes": conv_graph(c, False, W, bias).model(17),
                                     "CausalConvWithState": conv_graph(c, True, W, bias).model(27)},
                                    {"export nodes": f, "CausalConvWithState": f},
                                    {"export nodes": ref, "CausalConvWithState": ref})
    return out


def max_rel(got: dict, ref: dict) -> float:
    return max(float(np.abs(got[k] - ref[k]).max() / max(np.abs(ref[k]).max(), 1e-30)) for k in ref)


def kernels(model: bytes, feeds: dict) -> list[str]:
    """The op types ONNX Runtime actually runs for a graph (a function op it has no kernel for
    shows up as its body), from one profiled run whose profile file is deleted."""
    import json
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.enable_profiling, so.log_severity_level, so.profile_file_prefix = True, 3, str(Path(tmp) / "p")
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
        with open(sess.end_profiling()) as fh:
            return sorted({e["args"]["op_name"] for e in json.load(fh) if e.get("cat") == "Node"})


def main(argv=None):
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=40, help="timed runs per variant and round")
    ap.add_argument("--out", default="benchmarks/results/ort_opset27.json")
    args = ap.parse_args(argv)
    flush = np.ones(32 * 2**20, np.float32)  # 128 MB
    rows = []
    for case, (graphs, feeds, refs) in cases(np.random.default_rng(0)).items():
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = args.threads, 1, 3
        sess = {v: ort.InferenceSession(m, so, providers=["CPUExecutionProvider"]) for v, m in graphs.items()}
        err = {v: max_rel(dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds[v]))), refs[v]) for v, s in sess.items()}
        ran = {v: kernels(m, feeds[v]) for v, m in graphs.items()}
        times = {v: [] for v in sess}
        for _ in range(args.rounds):
            for v, s in sess.items():
                total = 0.0
                for _ in range(args.runs):
                    flush.sum()
                    t = time.perf_counter()
                    s.run(None, feeds[v])
                    total += time.perf_counter() - t
                times[v].append(total / args.runs * 1e3)
        base = next(iter(times))
        for v in sess:
            row = dict(case=case, variant=v, ms_per_token_24_layers=round(statistics.median(times[v]), 3),
                       ratio_to_export_nodes=round(statistics.median(a / b for a, b in zip(times[v], times[base])), 3),
                       max_rel_err_vs_float64=float(f"{err[v]:.2e}"), ort_ran=ran[v])
            rows.append(row)
    print("| case | variant | ms per token (24 layers) | vs export nodes | max rel err vs float64 | ONNX Runtime ran |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['variant']} | {r['ms_per_token_24_layers']:.3f} | {r['ratio_to_export_nodes']:.2f} | "
              f"{r['max_rel_err_vs_float64']:.1e} | {', '.join(r['ort_ran'])} |")
    write_json(args.out, {"onnxruntime": ort.__version__, "threads": args.threads, "rounds": args.rounds,
                          "runs": args.runs, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
