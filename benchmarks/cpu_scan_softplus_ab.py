"""The C Mamba1 selective scan alone (l 512, d 1536, n 16: 130m shapes, one layer, 2 threads),
median of 20 calls after a warm-up. Run it on two commits (git stash the ops change) to compare;
the fortieth session used it for the scan's log1pf step sizes (docs/measurements.md).

    PYTHONPATH=src python benchmarks/cpu_scan_softplus_ab.py --out scan.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default=None, help="JSON file for the result")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mamba_deploy.ops import cpu_kernels as ck

    torch.manual_seed(0)
    b, l, d, n = 1, 512, 1536, 16
    x, dt = torch.randn(b, l, d), torch.randn(b, l, d)
    A, B, C, D = -torch.rand(d, n), torch.randn(b, l, n), torch.randn(b, l, n), torch.ones(d)
    bias, h = torch.randn(d), torch.zeros(b, d, n)
    ck.selective_scan_cpu(x, dt, A, B, C, D, None, bias, h)  # builds / loads the library
    times = []
    for _ in range(args.calls):
        t = time.perf_counter()
        ck.selective_scan_cpu(x, dt, A, B, C, D, None, bias, h)
        times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2] * 1e3
    print("| op | shape (l, d, n) | threads | median ms |\n| --- | --- | --- | ---: |")
    print(f"| C selective scan | ({l}, {d}, {n}) | {args.threads} | {med:.2f} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"op": "selective_scan_cpu", "shape": [l, d, n], "threads": args.threads,
                       "median_ms": med, "calls": args.calls}, f, indent=2)


if __name__ == "__main__":
    main()
