"""Where ONNX Runtime spends a decode step (or a prefill): per-op-type kernel time from ORT's own profiler.

Exports a 130m-shaped random checkpoint (the one benchmarks/cpu_backends.py builds), runs warm-up
and then timed one-token steps through the ONNX Runner with profiling on, and prints the op types
by time per step. Profiling adds overhead, so the step time here is above cpu_backends.py's.

    python benchmarks/ort_profile.py [--arch mamba1] [--threads 2] [--steps 20] [--prefill 512] [--by-shape]

--by-shape also lists the nodes grouped by op type and output shape (e.g. the Mamba2 state's
(1, 24, 64, 128) Mul and Add apart from the small ones).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_backends import SHAPES, build_checkpoint  # noqa: E402

CONTAINERS = ("If", "Scan", "Loop")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=sorted(SHAPES), default="mamba1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill", type=int, default=0, help="profile prefills of this many tokens instead")
    ap.add_argument("--by-shape", action="store_true", help="also group the nodes by op type and output shape")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners import open_runner

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_checkpoint(args.arch, work / "hf")
        export_onnx(work / "hf", work / "onnx", validate=False)
        runner = open_runner(work / "onnx", "onnx", threads=args.threads)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        so.enable_profiling, so.profile_file_prefix, so.log_severity_level = True, str(work / "prof"), 3
        runner.session = ort.InferenceSession(str(work / "onnx" / "model.onnx"), so,
                                              providers=["CPUExecutionProvider"])
        state, tok = runner.new_state(1), torch.tensor([5])
        ids = torch.randint(0, 50000, (1, args.prefill), generator=torch.Generator().manual_seed(1))

        def one():
            if args.prefill:
                runner.prefill(ids, runner.new_state(1), last_only=True)
            else:
                runner.step(tok, state)
        warm = 1 if args.prefill else 3
        for _ in range(warm):
            one()
        t = time.perf_counter()
        for _ in range(args.steps):
            one()
        step_ms = (time.perf_counter() - t) / args.steps * 1e3
        events = json.loads(Path(runner.session.end_profiling()).read_text())
    per_op, calls, containers = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            # If / Scan time includes their subgraph's nodes, which are profiled too: kept apart
            (containers if op in CONTAINERS else per_op)[op] += e["dur"]
            calls[op] += 1
    n = warm + args.steps  # the profile covers the warm-up steps too
    inside = ", ".join(f"{op} {us / n / 1e3:.2f} ms" for op, us in containers.items())
    what = f"prefill-{args.prefill}" if args.prefill else "decode step"
    print(f"{args.arch}: {step_ms:.2f} ms per profiled {what}, node time {sum(per_op.values()) / n / 1e3:.2f} ms"
          + (f" (inside {inside})" if inside else ""))
    print("| op type | ms / step | nodes / step |\n| --- | ---: | ---: |")
    for op, us in per_op.most_common(12):
        print(f"| {op} | {us / n / 1e3:.3f} | {calls[op] / n:.0f} |")
    if args.by_shape:
        by_shape, shape_calls = collections.Counter(), collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"]["op_name"] not in CONTAINERS:
                key = (e["args"]["op_name"], json.dumps(e["args"].get("output_type_shape")))
                by_shape[key] += e["dur"]
                shape_calls[key] += 1
        print("\n| op type | output shape | ms / step | nodes / step |\n| --- | --- | ---: | ---: |")
        for (op, shape), us in by_shape.most_common(20):
            print(f"| {op} | {shape} | {us / n / 1e3:.3f} | {shape_calls[op, shape] / n:.0f} |")


if __name__ == "__main__":
    main()
