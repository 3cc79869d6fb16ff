"""Interleaved A/B of ONNX export folders through the ONNX Runtime Runner: prefill of --prefill
tokens (steady state: after one run at that length) and greedy decode, each folder timed in turn
for --rounds rounds in one process, so a drifting shared machine affects all alike. The table has
medians and, per folder, the median of its per-round ratios to the first folder.

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
    ids = torch.randint(0, min(50000, runner.config.vocab_size), (1, 64), generator=torch.Generator().manual_seed(2))
    _, st = runner.prefill(ids, runner.new_state(1), last_only=True)
    tok = torch.tensor([5])
    for _ in range(2):
        _, st = runner.step(tok, st)
    t = time.perf_counter()
    for _ in range(steps):
        logits, st = runner.step(tok, st)
        tok = (logits.clone() if clone else logits).argmax(-1)
    return (time.perf_counter() - t) / steps * 1e3


def measure(folders, threads: int, prefill: int, n_decode: int, rounds: int, clone_logits=False):
    """Per-round prefill seconds {folder: [...]} and decode ms/token {(folder, clone): [...]}, every
    folder timed in turn within each round."""
    from mamba_deploy.runners.onnx_runner import open_onnx

    torch.set_num_threads(threads)
    runners = {f: open_onnx(f, threads=threads) for f in folders}
    vocab = min(50000, *(r.config.vocab_size for r in runners.values()))  # the same ids as before for 130m shapes
    ids = torch.randint(0, vocab, (1, prefill), generator=torch.Generator().manual_seed(1))
    for r in runners.values():  # one run at this length first: the steady state is timed
        r.prefill(ids, r.new_state(1), last_only=True)
    pre = {f: [] for f in runners}
    dec = {(f, c): [] for f in runners for c in ((False, True) if clone_logits else (False,))}
    for _ in range(rounds):
        for f, r in runners.items():
            t = time.perf_counter()
            r.prefill(ids, r.new_state(1), last_only=True)
            pre[f].append(time.perf_counter() - t)
        for (f, clone), times in dec.items():
            times.append(decode_ms(runners[f], n_decode, clone))
    return pre, dec


def compare(folders, threads=2, prefill=512, n_decode=16, rounds=4, clone_logits=False) -> str:
    """measure() as a markdown table: medians over the rounds, and the median over rounds of each
    folder's time divided by the first folder's in the same round (a drifting host cancels)."""
    pre, dec = measure(folders, threads, prefill, n_decode, rounds, clone_logits)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    ratio = lambda v, w: med([a / b for a, b in zip(v, w)])  # noqa: E731
    base = folders[0]
    lines = [f"read bandwidth after the runs: {read_bandwidth_gbs(threads):.1f} GB/s; medians of {rounds} rounds",
             f"| folder | prefill-{prefill} s | vs {base} | decode ms/token | vs {base} | decode with logits clone |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for f in folders:
        clone = f"{med(dec[f, True]):.2f}" if clone_logits else "-"
        lines.append(f"| {f} | {med(pre[f]):.3f} | {ratio(pre[f], pre[base]):.2f} | {med(dec[f, False]):.2f} | "
                     f"{ratio(dec[f, False], dec[base, False]):.2f} | {clone} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clone-logits", action="store_true", help="also time each folder with the old logits clone")
    args = ap.parse_args(argv)
    print(compare(args.folders, args.threads, args.prefill, args.decode, args.rounds, args.clone_logits))


if __name__ == "__main__":
    main()
