"""A/B of Mamba1 graph decode on the GPU: the unfused step vs dt_proj folded into the state
update, with the conv / state-update kernels launched with and without PDL, and with the conv
as an epilogue of in_proj's GEMV (batch 1). Interleaved rounds
on one model (random bf16 weights, benchmarks/gpu.py's shapes); prints a table, writes JSON.

    python3 benchmarks/gpu_mamba1_ab.py --model mamba-2.8b --out $OUT/mamba1_ab.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gpu as G  # noqa: E402  (benchmarks/gpu.py: shapes, random weights, timing; puts src/ on the path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mamba-2.8b", choices=[m for m, s in G.MODELS.items() if s["arch"] == "mamba1"])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from mamba_deploy import cuda_graph as CG
    from mamba_deploy import ops
    from mamba_deploy.atomic import write_json
    from mamba_deploy.ops import triton_conv, triton_gemv, triton_step

    off = lambda dev: dict(USE_PDL=False, launch_pdl=False)  # noqa: E731
    variants = {  # name: (MAMBA_DEPLOY_FUSED_DECODE, PDL for conv / state update, conv in in_proj's GEMV)
        "unfused": ("0", True, False),
        "fused, no PDL on conv / state update": ("1", False, False),
        "fused, conv update kernel": ("1", True, False),
        "fused, conv in GEMV (default)": ("1", True, True),
    }
    model = G.our_model(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    res = {v: {b: [] for b in batches} for v in variants}
    for _ in range(args.rounds):
        for v, (env, pdl, conv_in_gemv) in variants.items():
            os.environ["MAMBA_DEPLOY_FUSED_DECODE"] = env
            triton_conv.pdl_kwargs = triton_step.pdl_kwargs = triton_gemv.pdl_kwargs if pdl else off
            ops.CONV_IN_GEMV = conv_in_gemv
            for b in batches:
                runner = CG.CudaGraphRunner(model)
                runner.step(torch.randint(0, G.VOCAB, (b,)), runner.new_state(b))  # captures
                res[v][b].append(G.cuda_time(lambda: runner.replay(b), reps=200, warmup=10))
                runner = None  # frees the graph and its bucket before the next capture
                torch.cuda.empty_cache()
    print(f"{args.model}, graph decode, ms per step (median of {args.rounds} rounds)")
    print(f"{'variant':40s}" + "".join(f"{'b' + str(b):>10s}" for b in batches))
    for v in variants:
        print(f"{v:40s}" + "".join(f"{statistics.median(res[v][b]):10.3f}" for b in batches))
    if args.out:
        out = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "ms": {v: {str(b): t for b, t in r.items()} for v, r in res.items()}}
        write_json(args.out, out)


if __name__ == "__main__":
    main()
