"""Interleaved A/B of ONNX export folders through the ONNX Runtime Runner: prefill of --prefill
tokens (steady state: after one run at that length) and greedy decode, each folder timed in turn
for --rounds rounds in one process, so a drifting shared machine affects all alike.

--clone-logits adds a torch clone of every step's logits (what the runner did before it copied
with numpy; the clone wakes torch's OpenMP threads, which then compete with ORT for the cores).

    python benchmarks/onnx_ab.py BEFORE_DIR AFTER_DIR [--clone-logits] [--threads 2]

Exports of the cpu_backends.py checkpoints from another commit: `git worktree add /tmp/before
<commit>` and `PYTHONPATH=/tmp/before/src python -m mamba_deploy export onnx HF_DIR BEFORE_DIR
--no-validate`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_backends import read_bandwidth_gbs  # noqa: E402


def decode_ms(runner, steps: int, clone: bool) -> float:
    """Mean ms per greedy step after a 64-token prefill and 2 warm steps."""
    ids = torch.randint(0, 50000, (1, 64), generator=torch.Generator().manual_seed(2))
    _, st = runner.prefill(ids, runner.new_state(1), last_only=True)
    tok = torch.tensor([5])
    for _ in range(2):
        _, st = runner.step(tok, st)
    t = time.perf_counter()
    for _ in range(steps):
        logits, st = runner.step(tok, st)
        tok = (logits.clone() if clone else logits).argmax(-1)
    return (time.perf_counter() - t) / steps * 1e3


def main(argv=None):
    from mamba_deploy.runners.onnx_runner import open_onnx

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clone-logits", action="store_true", help="also time each folder with the old logits clone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runners = {f: open_onnx(f, threads=args.threads) for f in args.folders}
    ids = torch.randint(0, 50000, (1, args.prefill), generator=torch.Generator().manual_seed(1))
    for r in runners.values():  # one run at this length first: the steady state is timed
        r.prefill(ids, r.new_state(1), last_only=True)
    pre = {f: [] for f in runners}
    dec = {(f, c): [] for f in runners for c in ((False, True) if args.clone_logits else (False,))}
    for _ in range(args.rounds):
        for f, r in runners.items():
            t = time.perf_counter()
            r.prefill(ids, r.new_state(1), last_only=True)
            pre[f].append(time.perf_counter() - t)
        for (f, clone), times in dec.items():
            times.append(decode_ms(runners[f], args.decode, clone))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    print(f"read bandwidth after the runs: {read_bandwidth_gbs(args.threads):.1f} GB/s; medians of {args.rounds} rounds")
    print(f"| folder | prefill-{args.prefill} s | decode ms/token | decode with logits clone |\n| --- | ---: | ---: | ---: |")
    for f in runners:
        clone = f"{med(dec[f, True]):.2f}" if args.clone_logits else "-"
        print(f"| {f} | {med(pre[f]):.3f} | {med(dec[f, False]):.2f} | {clone} |")


if __name__ == "__main__":
    main()
