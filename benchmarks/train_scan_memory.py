"""What training through the reference Mamba1 scan keeps for backward, and what it costs in time:
each time chunk checkpointed (the code in use: its (b, T, d, n) intermediates recomputed in
backward) against the same chunks kept by autograd (torch.utils.checkpoint replaced by a plain
call for the comparison). Forward + backward of `selective_scan_ref` with every input requiring
grad; both variants are first checked to give the same gradients.

Columns: bytes autograd saved for backward (saved-tensor hooks; each saved tensor at its own size, so
views of one storage count more than once: an upper bound), peak memory (CUDA: the allocator's
max_memory_allocated above the inputs; CPU: not measurable per call, the glibc heap keeps what
it freed), median ms of --reps forward + backward passes, interleaved.

    python benchmarks/train_scan_memory.py [--device cpu|cuda] [--reps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mamba_deploy.atomic import write_json  # noqa: E402
from mamba_deploy.ops import reference as ref  # noqa: E402

# (name, b, l, d_inner, d_state): demo-mamba1's micro-batch on a CPU, a larger GPU batch at 130m widths
SHAPES = {"cpu": [("demo-mamba1 4x512", 4, 512, 512, 16)],
          "cuda": [("demo-mamba1 32x512", 32, 512, 512, 16), ("mamba-130m 8x2048", 8, 2048, 1536, 16)]}


@contextlib.contextmanager
def checkpointing(on: bool):
    real = torch.utils.checkpoint.checkpoint
    if not on:
        torch.utils.checkpoint.checkpoint = lambda f, *a, **k: f(*a)
    try:
        yield
    finally:
        torch.utils.checkpoint.checkpoint = real


def inputs(b, l, d, n, device):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    kw = dict(x=r(b, l, d), dt=r(b, l, d) - 1, A=-torch.rand(d, n, generator=g, device=device) * 4, B=r(b, l, n),
              C=r(b, l, n), D=r(d), z=r(b, l, d), dt_bias=r(d) * 0.5, h0=r(b, d, n))
    return {k: v.requires_grad_() for k, v in kw.items()}


def one_pass(kw, sync):
    for v in kw.values():
        v.grad = None
    y, h = ref.selective_scan_ref(**kw)
    (y.sum() + h.sum()).backward()
    sync()
    return {k: v.grad.clone() for k, v in kw.items()}


def saved_bytes(kw) -> int:
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        ref.selective_scan_ref(**kw)
    return sum(kept)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/train_scan_memory_DEVICE.json)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for name, b, l, d, n in SHAPES[dev.type]:
        kw = inputs(b, l, d, n, dev)
        grads = {}
        for on in (True, False):
            with checkpointing(on):
                grads[on] = one_pass(kw, sync)  # warm-up, and the gradients compared below
        diff = max(float((grads[True][k] - grads[False][k]).abs().max() / grads[False][k].abs().max().clamp_min(1e-30))
                   for k in kw)
        times, row = {True: [], False: []}, dict(shape=name, b=b, l=l, d_inner=d, d_state=n, max_rel_grad_diff=diff)
        for on in (True, False):
            with checkpointing(on):
                row[f"saved_mb_{'ckpt' if on else 'kept'}"] = round(saved_bytes(kw) / 2**20, 1)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    one_pass(kw, sync)
                    row[f"peak_mb_{'ckpt' if on else 'kept'}"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        for _ in range(args.reps):
            for on in (True, False):
                with checkpointing(on):
                    t = time.perf_counter()
                    one_pass(kw, sync)
                    times[on].append((time.perf_counter() - t) * 1e3)
        row.update(ms_ckpt=round(statistics.median(times[True]), 2), ms_kept=round(statistics.median(times[False]), 2))
        row["time_ratio_ckpt_to_kept"] = round(row["ms_ckpt"] / row["ms_kept"], 3)
        rows.append(row)
    cols = [c for c in rows[0] if c not in ("b", "l", "d_inner", "d_state")]
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    out = args.out or str(Path(__file__).parent / "results" / f"train_scan_memory_{dev.type}.json")
    write_json(out, dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__,
                         reps=args.reps, rows=rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
