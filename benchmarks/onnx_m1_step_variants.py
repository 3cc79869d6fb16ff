"""Two rewrites of Mamba1's one-token ONNX branch, A/B-timed against the export as it is: decode
through the ONNX Runtime Runner, interleaved rounds (onnx_ab.compare), 130m-shaped random Mamba1
(cpu_backends.py's shapes), 2 threads.

- `xT`: x_proj as W (N, K) @ x^T (K, b), transposed back: its N = dt_rank + 2 d_state = 80
  outputs are few for a GEMV that splits its output columns over threads.
- `dt3d`: dt_proj on (b, 1, r) instead of (b, r), so that ONNX Runtime does not fuse MatMul +
  bias + Softplus into one FusedGemm (profiled at ~33 us a layer for its 295 KB weight).
- `both`.

Each variant is exported with validation against PyTorch (it computes the same function); the
rewrites patch `StepNetwork` in this process only. Neither was kept (benchmarks/results/
onnx_ab_m1_step_variants.txt): the differences stayed within the rounds' noise.

    python benchmarks/onnx_m1_step_variants.py [--rounds 8] [--decode 64] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_backends import build_checkpoint  # noqa: E402
from onnx_ab import compare  # noqa: E402

from mamba_deploy.export import onnx_step  # noqa: E402

VARIANTS = {"base": (False, False), "xT": (True, False), "dt3d": (False, True), "both": (True, True)}


def patched_m1_step(original, x_transposed: bool, dt_3d: bool):
    """`original` (StepNetwork._m1_step) with its x_proj / dt_proj linears rewritten as asked."""

    def m1_step(self, xn, p, i):
        real = self.linear

        def linear(x, key, bias_key=None):
            g = self.g
            if x_transposed and key.endswith("x_proj.weight"):  # (N, K) @ (K, b) -> (N, b) -> (b, N)
                w = self.weight(key + ".NK", lambda: self._np(key))
                return g.op("Transpose", g.op("MatMul", w, g.op("Transpose", x, perm=[1, 0])), perm=[1, 0])
            if dt_3d and key.endswith("dt_proj.weight"):  # (b, 1, r) @ (r, d) + bias -> (b, d)
                y = real(g.op("Unsqueeze", x, g.const([1])), key, bias_key)
                return g.op("Reshape", y, g.const([0, -1]))
            return real(x, key, bias_key)

        self.linear = linear
        try:
            return original(self, xn, p, i)
        finally:
            self.linear = real

    return m1_step


def main(argv=None) -> int:
    from mamba_deploy.atomic import write_text
    from mamba_deploy.export.onnx import export_onnx

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args(argv)
    original = onnx_step.StepNetwork._m1_step
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_checkpoint("mamba1", work / "hf")
        try:
            for name, flags in VARIANTS.items():
                onnx_step.StepNetwork._m1_step = patched_m1_step(original, *flags)
                export_onnx(work / "hf", work / name, validate=True)
        finally:
            onnx_step.StepNetwork._m1_step = original
        table = compare([str(work / n) for n in VARIANTS], args.threads, args.prefill, args.decode, args.rounds)
    table = table.replace(str(work) + "/", "")
    print(table)
    if args.out:
        write_text(args.out, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
