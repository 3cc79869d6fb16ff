"""Tensor parallelism on one host's GPUs: the same random bf16 model on 1 GPU (unsharded) and
sharded over N (tp.py), in one run, side by side.

    python benchmarks/gpu_tp.py --gpus 1,2 --models mamba2-2.7b,mamba-2.8b,codestral-7b --out tp.json

Each GPU count runs as its own `torchrun --nproc-per-node N` of this script (`--worker`); rank 0
times and writes its part. Shapes and weights are benchmarks/gpu.py's (MODELS, randomize: the
same seed on every rank, so each rank shards the same model). Decode = one replay of
CudaGraphRunner's graph (the all-reduces captured in it), prefill = an eager forward from a zero
state; CUDA events, median. The ratio column is N GPUs / 1 GPU time (below 1: faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import gpu  # noqa: E402  (benchmarks/gpu.py: shapes, random weights, timing)

CASES = ["decode_b1", "decode_b32", "prefill_1x2048", "prefill_8x4096"]


def worker(models, cases, out_path):
    import torch

    from mamba_deploy.cuda_graph import CudaGraphRunner
    from mamba_deploy.tp import apply_tensor_parallel, close_group, init_distributed

    rank, world, _ = init_distributed("cuda")
    results = {}
    for name in models:
        model = gpu.our_model(name)  # on this rank's GPU (init_distributed set it), seed 0 on every rank
        if world > 1:
            apply_tensor_parallel(model)
        runner = CudaGraphRunner(model)
        V = gpu.MODELS[name].get("vocab", gpu.VOCAB)
        out = {"weight_bytes_per_gpu": sum(p.numel() * p.element_size()
                                           for p in {id(p): p for p in model.parameters()}.values())}
        for case in cases:
            kind, b, l = gpu.parse_case(case)
            gen = torch.Generator().manual_seed(1)  # the same ids on every rank
            if kind == "prefill":
                ids = torch.randint(0, V, (b, l), generator=gen).cuda()
                state = model.new_state(b)

                def f():
                    state.zero_()
                    with torch.inference_mode():
                        model(ids, state, num_logits_to_keep=1)
                out[case] = gpu.cuda_time(f, reps=5 if b * l > 10000 else 10, warmup=2)
            else:
                runner.step(torch.randint(0, V, (b,), generator=gen), runner.new_state(b))  # captures
                out[case] = gpu.cuda_time(lambda: runner.replay(b), reps=200, warmup=10)
            if rank == 0:
                print(f"  {world} GPU(s) {name} {case}: {out[case]:.3f} ms", flush=True)
        results[name] = out
        runner = model = None  # free this model before the next one is built
        torch.cuda.empty_cache()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    close_group()


def table(runs, models, cases):
    base = runs.get(1, {})
    lines = ["| model | case | " + " | ".join(f"{n} GPU{'s' * (n > 1)} (ms)" for n in sorted(runs)) + " | ratio |",
             "| --- | --- | " + " | ".join("---:" for _ in runs) + " | ---: |"]
    for name in models:
        for case in cases:
            vals = [runs[n].get(name, {}).get(case) for n in sorted(runs)]
            last, first = vals[-1], base.get(name, {}).get(case)
            ratio = f"{last / first:.2f}" if last and first and len(runs) > 1 else "-"
            cells = " | ".join("-" if v is None else f"{v:.3f}" for v in vals)
            lines.append(f"| {name} | {case} | {cells} | {ratio} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2", help="GPU counts to run, comma-separated")
    ap.add_argument("--models", default="mamba2-2.7b,mamba-2.8b,codestral-7b")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default="gpu_tp.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    models, cases = args.models.split(","), args.cases.split(",")
    if args.worker:
        return worker(models, cases, args.worker)
    runs = {}
    for n in (int(v) for v in args.gpus.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            part = os.path.join(tmp, "part.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   os.path.abspath(__file__), "--models", args.models, "--cases", args.cases, "--worker", part]
            print(f"== {n} GPU(s): {' '.join(cmd[3:5])}", flush=True)
            done = subprocess.run(cmd, timeout=1800)
            if done.returncode != 0 or not os.path.exists(part):
                print(f"   {n} GPU(s) failed (exit {done.returncode})", flush=True)
                continue
            with open(part) as f:
                runs[n] = json.load(f)
    print(table(runs, models, cases))
    with open(args.out, "w") as f:
        json.dump({"runs": {str(n): r for n, r in runs.items()}, "models": models, "cases": cases}, f, indent=2)


if __name__ == "__main__":
    main()
