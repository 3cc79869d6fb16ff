"""Graph-captured decode of weight-only quantized models on one GPU: bf16 vs int8 vs int4 (g128,
round-to-nearest), at batch 1 and 32, in one run; random weights at real shapes.

With --old-prefetch, also times the int8 / int4 graphs with the graph's L2 prefetch reading
`module.weight`, as it did before 2026-11-22 (fourth session): for a quantized module that property
dequantizes the whole matrix, so each replay ran an extra dequantization per projection. Prints a
table and writes JSON.

    PYTHONPATH=src python3 benchmarks/gpu_quant_decode.py --models mamba2-2.7b,mamba-2.8b [--old-prefetch] --out q.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu as G  # noqa: E402  (benchmarks/gpu.py: shapes, random weights, timing; puts src/ on the path)

VARIANTS = {  # name: (quantize() method, options); None = the bf16 model
    "bf16": None,
    "int8": ("int8", {}),
    "int4-g128": ("int4", dict(group_size=128)),
}


def old_prefetch(plan, linear, batch):
    """DecodePlan.prefetch before the fix: any module's `weight` (dequantized when quantized)."""
    return (linear.weight, plan.prefetch_bytes if batch == 1 else 0)


def time_variant(model, batches, old=False):
    import torch

    from mamba_deploy import cuda_graph as CG

    out = {}
    for b in batches:
        runner = CG.CudaGraphRunner(model)
        if old:
            runner._plan.prefetch = lambda linear, batch, p=runner._plan: old_prefetch(p, linear, batch)
        runner.step(torch.randint(0, G.VOCAB, (b,)), runner.new_state(b))  # captures
        out[str(b)] = G.cuda_time(lambda: runner.replay(b), reps=200, warmup=10)
        runner = None
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mamba2-2.7b,mamba-2.8b")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--old-prefetch", action="store_true", help="also time the pre-fix prefetch")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from mamba_deploy.atomic import write_json
    from mamba_deploy.quant import quantize

    batches = [int(b) for b in args.batches.split(",")]
    res = {}
    for name in args.models.split(","):
        res[name] = {}
        for variant, spec in VARIANTS.items():
            model = G.our_model(name)
            if spec is not None:
                quantize(model, spec[0], progress=False, **spec[1])
            res[name][variant] = time_variant(model, batches)
            if spec is not None and args.old_prefetch:
                res[name][variant + " (old prefetch)"] = time_variant(model, batches, old=True)
            print(name, variant, res[name][variant], flush=True)
            del model
            torch.cuda.empty_cache()
    print("\n| model | variant | " + " | ".join(f"batch {b} (ms/step)" for b in batches) + " |")
    print("| --- | --- |" + " ---: |" * len(batches))
    for name, rows in res.items():
        for variant, t in rows.items():
            print(f"| {name} | {variant} | " + " | ".join(f"{t[str(b)]:.3f}" for b in batches) + " |")
    if args.out:
        write_json(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ms": res})


if __name__ == "__main__":
    main()
