"""What the OpenVINO runner's accurate log1p (runners/openvino_runner.py `accurate_log1p`) costs:
the shipped demo models' ONNX exports opened twice, with the rewrite and without it (the graph as
exported), timed in turn for --rounds rounds in one process; decode ms/token (greedy steps after
a 64-token prefill, as onnx_ab.py) and prefill-512 seconds; medians and per-round ratios.

    python benchmarks/openvino_log1p.py [--rounds 8] [--threads 1] --out FILE
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from onnx_ab import decode_ms  # noqa: E402

from mamba_deploy.atomic import write_json  # noqa: E402


def prefill_s(runner, ids) -> float:
    t = time.perf_counter()
    runner.prefill(ids, runner.new_state(1), last_only=True)
    return time.perf_counter() - t


def row_for(name: str, work: Path, args) -> dict:
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners import openvino_runner as ovr

    folder = export_onnx(ROOT / "models" / name, work / name, validate=False)
    rewritten = ovr.open_openvino(folder, threads=args.threads)
    with mock.patch.object(ovr, "accurate_log1p", lambda graph, ones=frozenset(): 0):
        raw = ovr.open_openvino(folder, threads=args.threads)
    runners = {"as exported": raw, "accurate log1p": rewritten}
    ids = torch.randint(0, raw.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(1))
    dec = {k: [] for k in runners}
    pre = {k: [] for k in runners}
    for r in runners.values():
        prefill_s(r, ids)  # warm
    for _ in range(args.rounds):
        for k, r in runners.items():
            dec[k].append(decode_ms(r, args.steps, clone=False))
            pre[k].append(prefill_s(r, ids))
    for r in runners.values():
        r.close()
    ratio = {"decode": statistics.median(a / b for a, b in zip(dec["accurate log1p"], dec["as exported"])),
             "prefill": statistics.median(a / b for a, b in zip(pre["accurate log1p"], pre["as exported"]))}
    return dict(model=name, decode_ms={k: statistics.median(v) for k, v in dec.items()},
                prefill_s={k: statistics.median(v) for k, v in pre.items()}, ratio=ratio, all_decode=dec, all_prefill=pre)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "openvino_log1p.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row_for(n, Path(tmp), args) for n in ("demo-mamba1", "demo-mamba2")]
    print(f"\n{args.rounds} interleaved rounds, {args.threads} thread(s)")
    print("| model | decode ms/token as exported | with accurate log1p | ratio | prefill-512 s as exported | with | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        d, p = r["decode_ms"], r["prefill_s"]
        print(f"| {r['model']} | {d['as exported']:.3f} | {d['accurate log1p']:.3f} | {r['ratio']['decode']:.3f} | "
              f"{p['as exported']:.4f} | {p['accurate log1p']:.4f} | {r['ratio']['prefill']:.3f} |")
    write_json(args.out, dict(rounds=args.rounds, steps=args.steps, threads=args.threads, rows=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
