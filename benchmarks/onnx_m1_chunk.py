"""Mamba1's ONNX prefill as a Scan over chunks of Q tokens, against the export's Scan over tokens,
timed interleaved on the CPU provider. Two chunk forms (b batch, d d_inner, n d_state; state
(b, n, d) as in the export):

- quadratic: the SSD dual form, shipped as `export onnx --scan-chunk Q` (onnx_graph.py
  `_m1_chunk_scan` / `_chunk_body`: decays exp(s_t - s_j), s_t - s_j summed directly over the
  chunk's steps as one MatMul with a 0/1 matrix, (b, Q, Q, n, d) tensors); exported here
  through export_onnx(scan_chunk=Q).
- difference: the dual form as shipped until the forty-second session, s_t - s_j as the
  difference of two cumsums (it cancels float32's digits after one large-dt step: 2.3e-4 from
  float64 at Q = 64, tests/test_onnx_m1_chunk.py); cumsum: the same sum as a masked CumSum over
  the (b, Q, Q, n, d) tensor. Both kept here for the speed A/B only.
- logdepth: kept only in this script. Step t is the affine map h -> e_t h + u_t with
  e = exp(dt A) <= 1, u = (dt x) B, all (b, Q, n, d). The carried state enters as u_0 += e_0 h;
  then rounds o = 1, 2, 4, .. < Q compose each step's map with the one o steps earlier
  (Hillis-Steele), after which u_t = h_t: 7 (b, Q, n, d)-sized ops per round (4 in the last), ~6
  more per chunk. It swaps its body into the shipped chunk Scan (same inputs and outputs).

Neither forms exp(-s) or exp(cumsum) divided out later: only decays <= 1, stable at any length.
tests/test_onnx_m1_chunk.py checks the shipped form against transformers; the logdepth form was
checked the same way when it was measured (git history of that test).

    python benchmarks/onnx_m1_chunk.py [--variants logdepth:2,logdepth:4,...] [--threads 2]
        [--prefill 512] [--decode 16] [--rounds 6] [--out benchmarks/results/onnx_ab_mamba1_chunks.txt]

On the CPU the chunked forms cost more than they save (prefill-512 on 2 threads 1.33-3.76x slower,
benchmarks/results/onnx_ab_mamba1_chunks.txt), hence opt-in. Timed on one layer's scan alone (130m
shapes, 512 tokens, 2 threads), the per-token Scan took ~17.5 us per step for its 6 ops over the
(n, d) = 24576-float state, about what bulk Mul / Add over a chunk's (Q, n, d) tensors cost per
24576 floats (~0.11-0.13 ns each): ORT's per-node overhead inside the Scan is small, so the
iterations saved buy little, while a chunk does more passes per token (up to 7 (Q, n, d) ops per
Hillis-Steele round, 4 over (Q, Q, n, d) in the dual form). On a GPU each saved iteration saves
kernel launches: benchmarks/gpu_ort_m1_chunk.py.
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

from mamba_deploy.atomic import write_text  # noqa: E402
from mamba_deploy.export import onnx_graph  # noqa: E402
from mamba_deploy.export.onnx_builder import Builder  # noqa: E402

FORMS = ("logdepth", "quadratic", "difference", "cumsum")
VARIANTS = "logdepth:2,logdepth:4,logdepth:8,logdepth:16,quadratic:4,quadratic:8"


class LogDepthMamba1Graph(onnx_graph.MambaGraph):
    """The export's chunked Mamba1 prefill (scan_chunk = Q) with the Hillis-Steele chunk body."""

    def _chunk_body(self, A: str) -> onnx.GraphProto:
        """In: h (b, n, d); dt, dtx (b, Q, 1, d); B (b, Q, n, 1); C (b, Q, 1, n). Out: h (b, n, d),
        y (b, Q, 1, d), as the shipped body. Shifts are Slice + Pad, not one Pad with negative
        pads, which TensorRT's parser rejects."""
        sb, Q = Builder(self.opset, self.g._counter), self.scan_chunk
        names = [sb._name(k) for k in ("h", "dt", "dtx", "B", "C")]
        h, dt, dtx, B, C = names

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
        last = sb.op("Squeeze", sb.op("Slice", u, sb.const([Q - 1]), sb.const([Q]), sb.const([1])), sb.const([1]))
        f = TensorProto.FLOAT
        ins = [helper.make_tensor_value_info(v, f, [f"{v}_{j}" for j in range(3 if v == h else 4)]) for v in names]
        outs = [helper.make_tensor_value_info(v, f, [f"{v}_{j}" for j in range(r)]) for v, r in ((last, 3), (y, 4))]
        return helper.make_graph(sb.nodes, sb._name("chunk_body"), ins, outs, sb.inits)


class DifferenceMamba1Graph(onnx_graph.MambaGraph):
    """The shipped dual-form chunk body with its exponents as s_t - s_j, two cumsums subtracted."""

    def _chunk_exponents(self, sb, a: str, s: str) -> str:
        return sb.op("Sub", sb.op("Unsqueeze", s, sb.const([2])), sb.op("Unsqueeze", s, sb.const([1])))


class CumSumMamba1Graph(onnx_graph.MambaGraph):
    """The shipped dual-form chunk body with s_t - s_j summed directly as a masked CumSum over the
    (b, Q, Q, n, d) tensor (shipped for part of the forty-second session)."""

    def _chunk_exponents(self, sb, a: str, s: str) -> str:
        Q = self.scan_chunk
        strict = np.tri(Q, k=-1, dtype=np.float32).reshape(Q, Q, 1, 1)  # [k, j] = 1 for k > j
        return sb.op("CumSum", sb.op("Mul", sb.op("Unsqueeze", a, sb.const([2])), sb.const(strict, np.float32)),
                     sb.const(1))


@contextlib.contextmanager
def _graph_class(cls):
    saved = onnx_graph.MambaGraph
    onnx_graph.MambaGraph = cls
    try:
        yield
    finally:
        onnx_graph.MambaGraph = saved


def export_variant(hf_dir, out_dir, form: str, q: int, **kw) -> Path:
    """export_onnx of hf_dir with Mamba1's prefill in chunks of q tokens: the shipped dual form
    (`quadratic`, scan_chunk=q), its earlier exponents (`difference`) or this script's
    Hillis-Steele body (`logdepth`)."""
    from mamba_deploy.export.onnx import export_onnx

    if form not in FORMS or q < 2:
        raise ValueError(f"need a form in {FORMS} and q >= 2, got {form}:{q}")
    cls = {"logdepth": LogDepthMamba1Graph, "difference": DifferenceMamba1Graph, "cumsum": CumSumMamba1Graph}.get(form)
    with _graph_class(cls) if cls else contextlib.nullcontext():
        return export_onnx(hf_dir, out_dir, scan_chunk=q, **kw)


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
    out = Path(args.out).absolute() if args.out else None  # relative to where it was run, not to tmp
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):  # the table names folders relatively
        build_checkpoint("mamba1", Path("hf"))
        export_onnx("hf", "per-token", validate=False)
        for form, q in variants:
            export_variant("hf", f"{form}-{q}", form, q, validate=False)
        load = os.getloadavg()
        table = onnx_ab.compare(["per-token"] + [f"{f}-{q}" for f, q in variants], args.threads, args.prefill,
                                args.decode, args.rounds)
        load_after = os.getloadavg()
    text = (f"load average (1/5/15 min) before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
            f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}\n{table}")
    print(text)
    if out:
        write_text(out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
