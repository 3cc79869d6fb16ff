"""Batch-1 graph decode on the GPU, variant by variant in one run: where the time of a token goes.

For each model: the default CudaGraphRunner, then the same step with one thing changed: other
tiles of the fused mixer (triton_step.step_config) and of the GEMV (triton_gemv.pick_config),
other add+norm warps, L2 prefetch sizes and prefetch programs (cuda_graph.PREFETCH_MB,
triton_norm.PREFETCH_PROGRAMS), and ablations that are numerically wrong on purpose (timing only): no mixer kernel, no
add_rmsnorm_ kernel, neither. Prints ms per token (median of CUDA-event-timed replays) and
writes JSON. Variants that were measured and dropped are listed in benchmarks/results/README.md.

    python benchmarks/gpu_decode_sweep.py --out sweep.json [--models mamba2-2.7b,mamba2-1.3b]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu import cuda_time, our_model  # noqa: E402

from mamba_deploy.atomic import write_json  # noqa: E402

MIXER_TILES = [(8, 2), (8, 4), (16, 2), (16, 4), (16, 8), (32, 8), (64, 8)]  # (BLOCK_P, num_warps)
# GEMV launch configuration by (n, k), for every GEMV
GEMV_CONFIGS = {
    "gemv_loop_n4_k1024": lambda n, k: dict(BLOCK_N=4, BLOCK_K=1024, num_warps=8 if k >= 4096 else 4),  # until 2026-11
    "gemv_oneshot_n1": lambda n, k: dict(BLOCK_N=1, BLOCK_K=triton.next_power_of_2(k), num_warps=4),
    "gemv_oneshot_n4": lambda n, k: dict(BLOCK_N=4, BLOCK_K=triton.next_power_of_2(k), num_warps=8),
    "gemv_oneshot_n2_w8": lambda n, k: dict(BLOCK_N=2, BLOCK_K=triton.next_power_of_2(k), num_warps=8),
}
PREFETCH_MB = [0, 1, 2, 4, 8, 16]  # L2 prefetch of the next GEMV's weights by the kernel before it


@contextlib.contextmanager
def env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@contextlib.contextmanager
def patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def variants():
    """name -> (context manager factory, plan overrides, exact: whether logits must match)."""
    from mamba_deploy.ops import triton_gemv, triton_kernels, triton_norm, triton_step

    out = {"default": (contextlib.nullcontext, {}, True)}
    for bp, w in MIXER_TILES:
        tile = dict(BLOCK_P=bp, num_warps=w)
        out[f"mixer_p{bp}_w{w}"] = (lambda t=tile: patched(triton_step, "step_config", lambda *a: dict(t)), {}, True)
    for name, pick in GEMV_CONFIGS.items():
        out[name] = (lambda p=pick: patched(triton_gemv, "pick_config", p), {}, True)
    for w in (4, 8):
        out[f"norm_w{w}"] = (lambda w=w: patched(triton_norm, "add_rmsnorm_warps", lambda block: w), {}, True)
    for n in (16, 32):
        out[f"prefetch_programs_{n}"] = (lambda n=n: patched(triton_norm, "PREFETCH_PROGRAMS", n), {}, True)
    for mb in PREFETCH_MB:
        out[f"prefetch_{mb}mb"] = (lambda m=mb: env("MAMBA_DEPLOY_L2_PREFETCH_MB", str(m)), {}, True)
    # cuda_graph calls ssd_step_gated_(xBC, dt, z, ..., out, sumsq, counter) positionally: return out
    skip_mixer = lambda: patched(triton_step, "ssd_step_gated_", lambda *a, **k: a[13])  # noqa: E731
    skip_norm = lambda: patched(triton_kernels, "add_rmsnorm_", lambda y, *a, **k: y)  # noqa: E731
    out["ablate_no_mixer"] = (skip_mixer, {}, False)
    out["ablate_no_norm"] = (skip_norm, {}, False)

    @contextlib.contextmanager
    def skip_both():
        with skip_mixer(), skip_norm():
            yield
    out["ablate_no_mixer_no_norm"] = (skip_both, {}, False)
    return out


def time_variant(model, ctx, overrides):
    from mamba_deploy.cuda_graph import CudaGraphRunner

    with ctx():
        runner = CudaGraphRunner(model)
        for k, v in overrides.items():
            setattr(runner._plan, k, v)
        state = runner.new_state(1)
        torch.manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size, (1,))
        logits, _ = runner.step(ids, state)  # captures
    ms = cuda_time(functools.partial(runner.replay, 1), reps=300, warmup=20)
    del runner
    return ms, logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mamba2-2.7b,mamba2-1.3b")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--out", default="decode_sweep.json")
    args = ap.parse_args()
    results = {}
    for name in args.models.split(","):
        model = our_model(name)
        rows, ref = {}, None
        for vname, (ctx, overrides, exact) in variants().items():
            if args.only and vname not in args.only.split(","):
                continue
            ms, logits = time_variant(model, ctx, overrides)
            diff = None
            if ref is None:
                ref = logits
            elif exact:
                diff = float((logits.double() - ref.double()).norm() / ref.double().norm())
            rows[vname] = dict(ms=ms, rel_diff_vs_default=diff)
            print(f"{name:12s} {vname:28s} {ms:7.3f} ms" + (f"  rel diff {diff:.1e}" if diff is not None else ""),
                  flush=True)
        results[name] = rows
        del model
        torch.cuda.empty_cache()
    write_json(args.out, dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=results))


if __name__ == "__main__":
    main()
