"""ONNX Runtime session options for fp32 decode on 2 cores (issue 4), interleaved: one export of
each 130m-shaped random model (cpu_backends.py's shapes) opened once per variant of the
SessionOptions, and every session timed in turn for --rounds rounds in one process (greedy steps
after a 64-token prefill, as onnx_ab.py). Reports each variant's median ms/token and the median of
its per-round ratios to the runner's own options ("runner").

The variants are ONNX Runtime's documented threading and memory knobs that the Runner does not
set: worker thread pinned (session.intra_op_thread_affinities, the calling thread pinned to the
other core for that session's turn), ORT's own thread count (0: one per physical core, with its
affinitization), spinning off, a smaller dynamic block base, denormals as zero, no memory pattern.

    python benchmarks/ort_session_options.py [--rounds 8] [--steps 64] --out FILE
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_backends import build_checkpoint, read_bandwidth_gbs  # noqa: E402
from onnx_ab import decode_ms  # noqa: E402

from mamba_deploy.atomic import write_json  # noqa: E402

THREADS = 2
# name -> (session config entries, SessionOptions attributes, pin the calling thread to CPU 0)
VARIANTS = {
    "runner": ({}, {}, False),
    "pinned": ({"session.intra_op_thread_affinities": "2"}, {}, True),
    "ort_threads_0": ({}, {"intra_op_num_threads": 0}, False),
    "no_spinning": ({"session.intra_op.allow_spinning": "0"}, {}, False),
    "block_base_4": ({"session.dynamic_block_base": "4"}, {}, False),
    "denormal_as_zero": ({"session.set_denormal_as_zero": "1"}, {}, False),
    "no_mem_pattern": ({}, {"enable_mem_pattern": False}, False),
}


def open_variant(folder: Path, entries: dict, attrs: dict):
    import onnxruntime as ort

    from mamba_deploy.export.onnx import open_export_folder
    from mamba_deploy.runners.onnx_runner import OnnxRunner, check_session

    folder, manifest = open_export_folder(folder, False)
    so = ort.SessionOptions()  # the Runner's options (open_onnx), then the variant's
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    for k, v in attrs.items():
        setattr(so, k, v)
    for k, v in entries.items():
        so.add_session_config_entry(k, v)
    session = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    check_session(manifest, session, folder)
    return OnnxRunner(folder, manifest, session)


def timed(runner, steps: int, pin: bool) -> float:
    if not pin or not hasattr(os, "sched_setaffinity"):
        return decode_ms(runner, steps, clone=False)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})  # this thread only (Linux): the pinned worker has CPU 1
    try:
        return decode_ms(runner, steps, clone=False)
    finally:
        os.sched_setaffinity(0, before)


def row_for(arch: str, work: Path, args) -> dict:
    from mamba_deploy.export.onnx import export_onnx

    build_checkpoint(arch, work / "hf")
    folder = export_onnx(work / "hf", work / "onnx", validate=False)
    runners = {name: (open_variant(folder, e, a), pin) for name, (e, a, pin) in VARIANTS.items()}
    times = {name: [] for name in runners}
    try:
        for _ in range(args.rounds):
            for name, (r, pin) in runners.items():
                times[name].append(timed(r, args.steps, pin))
    finally:
        for r, _ in runners.values():
            r.close()
    return dict(arch=arch, medians_ms={n: statistics.median(v) for n, v in times.items()}, all_ms=times,
                median_ratio_to_runner={n: statistics.median(x / y for x, y in zip(v, times["runner"]))
                                        for n, v in times.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="mamba1,mamba2")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ort_session_options.json"))
    args = ap.parse_args(argv)
    bw_before, load_before = read_bandwidth_gbs(THREADS), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row_for(arch, Path(tmp) / arch, args) for arch in args.archs.split(",")]
    bw_after, load_after = read_bandwidth_gbs(THREADS), os.getloadavg()
    print(f"\n{args.rounds} interleaved rounds of {args.steps} greedy steps, {THREADS} threads; read bandwidth "
          f"{bw_before:.1f} / {bw_after:.1f} GB/s; load average {load_before[0]:.2f} / {load_after[0]:.2f}")
    print("| arch | session options | median ms/token | median ratio to the runner's |")
    print("| --- | --- | ---: | ---: |")
    for r in rows:
        for n, m in r["medians_ms"].items():
            print(f"| {r['arch']} | {n} | {m:.2f} | {r['median_ratio_to_runner'][n]:.3f} |")
    write_json(args.out, dict(threads=THREADS, rounds=args.rounds, steps=args.steps, variants=list(VARIANTS),
                              bandwidth_gbs=[bw_before, bw_after], load_avg=[load_before, load_after], rows=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
