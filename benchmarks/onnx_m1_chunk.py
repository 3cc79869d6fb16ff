"""Mamba1's ONNX prefill as a Scan over chunks of Q tokens, against the export's Scan over tokens,
timed interleaved on the CPU provider. Measured and not kept (prefill-512 1.33-3.76x slower on 2
CPU threads, benchmarks/results/onnx_ab_mamba1_chunks.txt); this script is the record of that
measurement and holds the chunked graph.

Why try it: the export's Mamba1 prefill (`MambaGraph._m1_scan`) runs one Scan iteration per token
and layer, a handful of small kernels each; ONNX Runtime's CUDA provider pays a launch for every
one (prefill-512 ~465 ms on an H200, against 31.6 ms for Mamba2's loop-free SSD graph). Here each
iteration takes Q tokens at once (b batch, d d_inner, n d_state; state (b, n, d) as in the export):

- logdepth: step t is the affine map h -> e_t h + u_t with e = exp(dt A) <= 1, u = (dt x) B, all
  (b, Q, n, d). The carried state enters as u_0 += e_0 h; then rounds o = 1, 2, 4, .. < Q compose
  each step's map with the one o steps earlier (Hillis-Steele), after which u_t = h_t: 7
  (b, Q, n, d)-sized ops per round (4 in the last), ~6 more per chunk.
- quadratic: the SSD dual form. s = in-chunk cumsum of dt A (<= 0, non-increasing), decay from
  step j to t exp(s_t - s_j), its exponent a masked difference (<= 0 on and below the diagonal,
  -inf above, so exp gives exact zeros): (b, Q, Q, n, d) tensors, Q * Q * 98 KB per batch row at
  d = 1536, n = 16.

Neither forms exp(-s) or exp(cumsum) divided out later: only decays <= 1, stable at any length.
The time axis is padded to a multiple of Q with dt = 0 (decay 1, input 0: the state passes
padded steps unchanged) and the padded outputs are dropped. tests/test_onnx_m1_chunk.py checks
both forms against transformers.

    python benchmarks/onnx_m1_chunk.py [--variants logdepth:2,logdepth:4,...] [--threads 2]
        [--prefill 512] [--decode 16] [--rounds 6] [--out benchmarks/results/onnx_ab_mamba1_chunks.txt]

On the CPU the chunked forms cost more than they save. Timed on one layer's scan alone (130m
shapes, 512 tokens, 2 threads), the per-token Scan took ~17.5 us per step for its 6 ops over the
(n, d) = 24576-float state, about what bulk Mul / Add over a chunk's (Q, n, d) tensors cost per
24576 floats (~0.11-0.13 ns each): ORT's per-node overhead inside the Scan is small, so the
iterations saved buy little, while a chunk does more passes per token (up to 7 (Q, n, d) ops per
Hillis-Steele round, 4 over (Q, Q, n, d) in the dual form).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from mamba_deploy.export import onnx_graph  # noqa: E402
from mamba_deploy.export.onnx_builder import PAST_SSM, PRESENT_SSM, Builder  # noqa: E402

FORMS = ("logdepth", "quadratic")
VARIANTS = "logdepth:2,logdepth:4,logdepth:8,logdepth:16,quadratic:4,quadratic:8"


class ChunkedMamba1Graph(onnx_graph.MambaGraph):
    """The export's graph with Mamba1's prefill Scan taking Q tokens per iteration."""

    Q, FORM = 8, "logdepth"  # chunked_graph() makes subclasses with other values

    def _m1_scan(self, dt, x, B, C, A: str, i: int) -> str:
        """dt, x (b, l, d); B, C (b, l, n) -> y (b, l, d); present_ssm.i as in the export."""
        g, Q, d, n = self.g, self.Q, self.cfg.d_inner, self.cfg.d_state
        if getattr(self, "_m1_pads", None) is None:  # shared by all layers
            c = g.op("Div", g.op("Add", self.L, g.const([Q - 1])), g.const([Q]))
            pad = g.op("Sub", g.op("Mul", c, g.const([Q])), self.L)
            self._m1_pads = g.cat(g.const([0, 0, 0, 0]), pad, g.const([0]))  # end of axis 1 of (b, l, w)

        def chunked(t, width, axis):  # (b, l, w) -> (c, b, Q, w), a unit axis inserted at `axis`
            t = g.op("Reshape", g.op("Pad", t, self._m1_pads), g.const([0, -1, Q, width]))  # (b, c, Q, w)
            return g.op("Unsqueeze", g.op("Transpose", t, perm=[1, 0, 2, 3]), g.const([axis]))

        body = self._body_logdepth(A) if self.FORM == "logdepth" else self._body_quadratic(A)
        h_last, ys = g.op("Scan", g.op("Transpose", PAST_SSM.format(i), perm=[0, 2, 1]),  # (b, n, d)
                          chunked(dt, d, 3),  # (c, b, Q, 1, d)
                          chunked(g.op("Mul", dt, x), d, 3),  # (c, b, Q, 1, d)
                          chunked(B, n, 4),  # (c, b, Q, n, 1)
                          chunked(C, n, 3),  # (c, b, Q, 1, n)
                          n_out=2, body=body, num_scan_inputs=4)  # ys (c, b, Q, 1, d)
        g.op_to(self.out(PRESENT_SSM.format(i)), "Transpose", h_last, perm=[0, 2, 1])
        y = g.op("Reshape", g.op("Transpose", ys, perm=[1, 0, 2, 3, 4]), g.const([0, -1, d]))  # (b, c*Q, d)
        return g.op("Slice", y, g.const([0]), self.L, g.const([1]))  # drop the padded tail

    def _body(self, build) -> onnx.GraphProto:
        """A chunk Scan body from build(sb, h, dt, dtx, B, C) -> (new h, y). In: h (b, n, d); dt,
        dtx (b, Q, 1, d); B (b, Q, n, 1); C (b, Q, 1, n). Out: h (b, n, d), y (b, Q, 1, d)."""
        sb = Builder(self.opset, self.g._counter)
        names = [sb._name(k) for k in ("h", "dt", "dtx", "B", "C")]
        h, y = build(sb, *names)
        f = TensorProto.FLOAT
        ins = [helper.make_tensor_value_info(v, f, [f"{v}_{j}" for j in range(3 if k == 0 else 4)])
               for k, v in enumerate(names)]
        outs = [helper.make_tensor_value_info(v, f, [f"{v}_{j}" for j in range(r)]) for v, r in ((h, 3), (y, 4))]
        return helper.make_graph(sb.nodes, sb._name("chunk_body"), ins, outs, sb.inits)

    def _body_logdepth(self, A: str) -> onnx.GraphProto:
        """Hillis-Steele over the chunk's affine maps (module doc). Shifts are Slice + Pad, not one
        Pad with negative pads, which TensorRT's parser rejects."""
        Q = self.Q

        def build(sb, h, dt, dtx, B, C):
            def later(t, o, fill):  # t moved o steps later along axis 1, `fill` in the first o
                head = sb.op("Slice", t, sb.const([0]), sb.const([Q - o]), sb.const([1]))
                return sb.op("Pad", head, sb.const([0, o, 0, 0, 0, 0, 0, 0]), sb.const(fill, np.float32))

            e = sb.op("Exp", sb.op("Mul", dt, A))  # (b, Q, n, d), each <= 1
            u0, rest = sb.op("Split", sb.op("Mul", dtx, B), sb.const([1, Q - 1]), axis=1, n_out=2)
            e0 = sb.op("Slice", e, sb.const([0]), sb.const([1]), sb.const([1]))  # (b, 1, n, d)
            u = sb.op("Concat", sb.op("Add", u0, sb.op("Mul", e0, sb.op("Unsqueeze", h, sb.const([1])))), rest, axis=1)
            o = 1
            while o < Q:
                u = sb.op("Add", u, sb.op("Mul", e, later(u, o, 0.0)))
                if 2 * o < Q:  # e_t becomes the decay over steps t-2o+1..t
                    e = sb.op("Mul", e, later(e, o, 1.0))
                o *= 2
            y = sb.op("MatMul", C, u)  # (b, Q, 1, n) @ (b, Q, n, d) -> (b, Q, 1, d)
            last = sb.op("Slice", u, sb.const([Q - 1]), sb.const([Q]), sb.const([1]))
            return sb.op("Squeeze", last, sb.const([1])), y

        return self._body(build)

    def _body_quadratic(self, A: str) -> onnx.GraphProto:
        """y_t = sum_j (sum_n C_tn B_jn exp(s_tn - s_jn)) (dt x)_j + C_t . (exp(s_t) h) and
        h_new = exp(s_Q) h + sum_j exp(s_Q - s_j) (dt x)_j B_j; the n-contraction with C B^T is a
        MatMul over the (b, Q, Q, n, d) decays."""
        Q, n = self.Q, self.cfg.d_state
        mask = np.where(np.tri(Q, dtype=bool), 0.0, -np.inf).astype(np.float32).reshape(Q, Q, 1, 1)

        def build(sb, h, dt, dtx, B, C):
            s = sb.op("CumSum", sb.op("Mul", dt, A), sb.const(1))  # (b, Q, n, d)
            diff = sb.op("Sub", sb.op("Unsqueeze", s, sb.const([2])), sb.op("Unsqueeze", s, sb.const([1])))
            W = sb.op("Exp", sb.op("Add", diff, sb.const(mask, np.float32)))  # (b, Q_t, Q_j, n, d)
            CB = sb.op("Mul", C, sb.op("Reshape", B, sb.const([0, 1, Q, n])))  # (b, Q_t, Q_j, n)
            G = sb.op("MatMul", sb.op("Unsqueeze", CB, sb.const([3])), W)  # (b, Q, Q, 1, d)
            y = sb.reduce("ReduceSum", sb.op("Mul", G, sb.op("Unsqueeze", dtx, sb.const([1]))), [2], keepdims=0)
            E = sb.op("Exp", s)  # decay from the chunk start (b, Q, n, d)
            y = sb.op("Add", y, sb.op("MatMul", C, sb.op("Mul", E, sb.op("Unsqueeze", h, sb.const([1])))))
            w_last, e_last = (sb.op("Squeeze", sb.op("Slice", t, sb.const([Q - 1]), sb.const([Q]), sb.const([1])),
                                    sb.const([1])) for t in (W, E))  # (b, Q_j, n, d), (b, n, d)
            u = sb.op("Mul", dtx, B)  # (b, Q, n, d)
            h = sb.op("Add", sb.op("Mul", e_last, h), sb.reduce("ReduceSum", sb.op("Mul", w_last, u), [1], keepdims=0))
            return h, y  # y (b, Q, 1, d)

        return self._body(build)


@contextlib.contextmanager
def chunked_graph(q: int, form: str):
    """Inside, export_onnx builds Mamba1 graphs with the chunked prefill (chunks of q tokens)."""
    if form not in FORMS or q < 2:
        raise ValueError(f"need a form in {FORMS} and q >= 2, got {form}:{q}")
    saved = onnx_graph.MambaGraph
    onnx_graph.MambaGraph = type(f"Chunked_{form}_{q}", (ChunkedMamba1Graph,), {"Q": q, "FORM": form})
    try:
        yield
    finally:
        onnx_graph.MambaGraph = saved


def main(argv=None) -> int:
    import onnx_ab
    from cpu_backends import build_checkpoint

    from mamba_deploy.export.onnx import export_onnx

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=VARIANTS, help="comma-separated form:Q")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args(argv)
    variants = [(form, int(q)) for form, q in (v.split(":") for v in args.variants.split(","))]
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the table names folders by their relative paths
        build_checkpoint("mamba1", Path("hf"))
        export_onnx("hf", "per-token", validate=False)
        for form, q in variants:
            with chunked_graph(q, form):
                export_onnx("hf", f"{form}-{q}", validate=False)
        load = os.getloadavg()
        table = onnx_ab.compare(["per-token"] + [f"{f}-{q}" for f, q in variants], args.threads, args.prefill,
                                args.decode, args.rounds)
        load_after = os.getloadavg()
    text = (f"load average (1/5/15 min) before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
            f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}\n{table}")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
