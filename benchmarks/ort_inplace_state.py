"""ONNX Runtime decode with the state bound in place (present_* = past_* buffers) against the
Runner's ping-pong buffers, interleaved in one process. Measured and not kept (ONNX Runtime does
not promise that an output may alias an input); this script is the record of that measurement.

    python benchmarks/ort_inplace_state.py [--arch mamba2] [--threads 2] [--rounds 6] [--steps 48]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_backends import SHAPES, build_checkpoint  # noqa: E402


def step_in_place(runner, tok: torch.Tensor, state) -> torch.Tensor:
    """One decode step with present_* bound to the same OrtValues as past_*."""
    from onnxruntime import OrtValue

    io = runner.session.io_binding()
    io.bind_ortvalue_input("input_ids", OrtValue.ortvalue_from_numpy(tok.numpy()[:, None].astype(np.int64)))
    io.bind_ortvalue_output("logits", state.logits)
    live = state.bufs[state.cur]
    from mamba_deploy.export.onnx_meta import state_names

    for names in (state_names(runner.n_layer), state_names(runner.n_layer, present=True)):
        for name, v in zip(names, live):
            (io.bind_ortvalue_input if name.startswith("past") else io.bind_ortvalue_output)(name, v)
    runner.session.run_with_iobinding(io)
    return torch.from_numpy(state.logits.numpy().copy())[:, 0]


def decode(runner, in_place: bool, steps: int):
    """(ms per greedy step, logits per step) after a 64-token prefill and 2 warm steps."""
    ids = torch.randint(0, 50000, (1, 64), generator=torch.Generator().manual_seed(2))
    _, st = runner.prefill(ids, runner.new_state(1), last_only=True)
    tok = torch.tensor([5])
    for _ in range(2):
        _, st = runner.step(tok, st)
    out, t = [], time.perf_counter()
    for _ in range(steps):
        logits = step_in_place(runner, tok, st) if in_place else runner.step(tok, st)[0]
        out.append(logits)
        tok = logits.argmax(-1)
    return (time.perf_counter() - t) / steps * 1e3, out


def main(argv=None):
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners.onnx_runner import open_onnx

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=sorted(SHAPES), default="mamba2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--out", default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(args.arch, Path(tmp) / "hf")
        export_onnx(Path(tmp) / "hf", Path(tmp) / "onnx", validate=False)
        runner = open_onnx(Path(tmp) / "onnx", threads=args.threads)
        a, b = decode(runner, False, 16)[1], decode(runner, True, 16)[1]
        diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
        times = {"ping_pong": [], "in_place": []}
        for _ in range(args.rounds):
            for key, in_place in (("ping_pong", False), ("in_place", True)):
                times[key].append(decode(runner, in_place, args.steps)[0])
    res = {"arch": args.arch, "threads": args.threads, "max_abs_logits_diff": diff,
           **{k: {"ms_per_token": v, "median": statistics.median(v)} for k, v in times.items()}}
    print(f"{args.arch}: max |ping-pong - in place| logits over 16 steps {diff:.1e}")
    for k, v in times.items():
        print(f"  {k:10s} median {statistics.median(v):.2f} ms/token  rounds {[round(x, 2) for x in v]}")
    if args.out:
        from mamba_deploy.atomic import write_json  # a temporary name, then renamed

        write_json(args.out, res)


if __name__ == "__main__":
    main()
