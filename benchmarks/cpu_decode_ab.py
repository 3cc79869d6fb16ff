"""fp32 decode on the CPU, ONNX Runtime against llama.cpp F32 (--backends may add torch),
interleaved: every backend is timed in turn for --rounds rounds in one process, so a host whose
memory bandwidth drifts (30-45 GB/s between runs here) moves all alike; reports each backend's
median ms/token and the median of the per-round ratios to llama.cpp. cpu_backends.py times each
backend once, which on this shared 2-core host moved ONNX Runtime's Mamba1 decode between 14.6
and 21.6 ms/token within minutes. 130m-shaped random models (cpu_backends.py's shapes), batch 1,
greedy steps after a 64-token prefill.

--matmuls-only adds ort_floor.py's graph of only the weight MatMuls (the same bytes, no norm, conv
or state update) as one more row: its ratio to llama.cpp is how low ONNX Runtime's decode could
go if everything else cost nothing, so target ratio - that ratio is the budget the rest has.

    python benchmarks/cpu_decode_ab.py --threads 2 [--rounds 12] [--steps 64] [--matmuls-only] --out FILE
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_backends import DEMO, TARGETS, build_checkpoint, read_bandwidth_gbs  # noqa: E402
from onnx_ab import decode_ms  # noqa: E402  (64-token prefill, 2 warm steps, greedy steps timed)

from mamba_deploy.atomic import write_json  # noqa: E402


MATMULS_ONLY = "onnx, weight MatMuls only"


def open_all(arch: str, work: Path, backends, threads: int) -> dict:
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners import open_runner

    hf = work / "hf"
    build_checkpoint(arch, hf)
    # GGUF files carry a tokenizer and the random checkpoints ship none: the demo model's, as cpu_backends.py
    tokenizer = next(str(p) for p in sorted(DEMO.glob("demo-*")) if (p / "tokenizer.json").exists())
    paths = {"onnx": lambda: export_onnx(hf, work / "onnx", validate=False),
             "llama.cpp": lambda: export_gguf(hf, work / "m.gguf", outtype="f32", tokenizer=tokenizer),
             "torch": lambda: hf}
    return {b: open_runner(paths[b](), b, threads=threads) for b in backends}


def rows_for(arch: str, work: Path, args) -> dict:
    runners = open_all(arch, work, args.backends.split(","), args.threads)
    times = {b: [] for b in runners}
    if args.matmuls_only:
        from ort_floor import chain_model, session

        matmuls = session(chain_model(arch)[0], args.threads)
        times[MATMULS_ONLY] = []
    try:
        for _ in range(args.rounds):
            for b, r in runners.items():
                times[b].append(decode_ms(r, args.steps, clone=False))
            if args.matmuls_only:
                times[MATMULS_ONLY].append(statistics.fmean(matmuls(args.steps)) * 1e3)  # mean, as decode_ms
    finally:
        for r in runners.values():
            r.close()
    row = dict(arch=arch, medians_ms={b: statistics.median(v) for b, v in times.items()}, all_ms=times)
    if "llama.cpp" in times:
        row["median_ratio_to_llamacpp"] = {b: statistics.median(x / y for x, y in zip(v, times["llama.cpp"]))
                                           for b, v in times.items() if b != "llama.cpp"}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="mamba1,mamba2")
    # torch left out by default: with its runner in the process, ONNX Runtime's decode took 16.5 / 16.8 ms
    # instead of 16.1 / 15.1 (Mamba1 / Mamba2; cpu_decode_ab_with_torch.json vs cpu_decode_ab.json)
    ap.add_argument("--backends", default="onnx,llama.cpp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--matmuls-only", action="store_true", help="also time ONNX Runtime on only the weight MatMuls")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_decode_ab.json"))
    args = ap.parse_args(argv)
    bw_before, load_before = read_bandwidth_gbs(args.threads), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [rows_for(arch, Path(tmp) / arch, args) for arch in args.archs.split(",")]
    bw_after, load_after = read_bandwidth_gbs(args.threads), os.getloadavg()
    print(f"\n{args.rounds} interleaved rounds of {args.steps} greedy steps, {args.threads} threads; read bandwidth "
          f"{bw_before:.1f} / {bw_after:.1f} GB/s; load average {load_before[0]:.2f} / {load_after[0]:.2f}")
    print(f"| arch | backend | median ms/token | median ratio to llama.cpp F32 | target {TARGETS['decode_ms_per_token']} ms |")
    print("| --- | --- | ---: | ---: | --- |")
    for r in rows:
        for b, m in r["medians_ms"].items():
            ratio = r.get("median_ratio_to_llamacpp", {}).get(b)
            met = "-" if b == MATMULS_ONLY else "met" if m <= TARGETS["decode_ms_per_token"] else "not met"
            print(f"| {r['arch']} | {b} | {m:.2f} | {'-' if ratio is None else f'{ratio:.3f}'} | {met} |")
    write_json(args.out, dict(threads=args.threads, rounds=args.rounds, steps=args.steps,
                              bandwidth_gbs=[bw_before, bw_after], load_avg=[load_before, load_after],
                              torch=torch.__version__, rows=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
