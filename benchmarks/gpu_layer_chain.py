"""What each part of the three-launch batch-1 layer (ops/triton_layer.py) costs, in one run.

A 64-layer chain of random bf16 in_proj / out_proj weights at a model's shapes, graph-captured,
with the layer's kernels swapped in one at a time: the plain one-shot GEMV for both projections,
then in_proj with its conv epilogue (in_proj_conv_), out_proj with its residual/norm epilogue
(out_proj_add_), both, and both with the mixer between them. Numbers are not model outputs
(the chain feeds garbage forward); only the time is. Prints ms per chain and writes JSON.

    python benchmarks/gpu_layer_chain.py --out layer_chain.json [--models mamba2-2.7b,mamba2-1.3b]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu import MODELS, graph_time  # noqa: E402
from gpu_gemv import chain_weights  # noqa: E402

from mamba_deploy.atomic import write_json  # noqa: E402


def layer_parts(name):
    """Per-layer tensors besides the projections (random, on the GPU)."""
    s = MODELS[name]
    d, n, p = 2 * s["d_model"], s["d_state"], 64
    nh = d // p
    conv_dim = d + 2 * n
    dev, bf = "cuda", torch.bfloat16
    L = s["n_layer"]
    return dict(
        d_inner=d, conv_w=torch.randn(conv_dim, 4, device=dev, dtype=bf) * 0.3,
        conv_b=torch.randn(conv_dim, device=dev, dtype=bf) * 0.1,
        conv=torch.zeros(L, 1, conv_dim, 3, device=dev, dtype=bf),
        ssm=torch.zeros(L, 1, nh, p, n, device=dev), A=-torch.rand(nh, device=dev),
        D=torch.ones(nh, device=dev, dtype=bf), dt_bias=torch.zeros(nh, device=dev, dtype=bf),
        norm_w=torch.ones(d, device=dev, dtype=bf), w_next=torch.ones(s["d_model"], device=dev, dtype=bf))


def variants(name):
    from mamba_deploy.ops.triton_gemv import gemv
    from mamba_deploy.ops.triton_layer import in_proj_conv_, mixer_, out_proj_add_

    w_in, w_out = chain_weights(name)
    P = layer_parts(name)
    L, d_inner = len(w_in), P["d_inner"]
    d_model = w_in[0].shape[1]
    zx = torch.zeros(L, w_in[0].shape[0], device="cuda", dtype=torch.bfloat16)
    u = torch.zeros(L, d_inner, device="cuda", dtype=torch.bfloat16)
    from mamba_deploy.ops.triton_gemv import SS_SLOTS, SS_STRIDE

    ss = torch.ones(L, 2, SS_SLOTS * SS_STRIDE, device="cuda")
    res = torch.zeros(1, d_model, device="cuda")
    xn = torch.randn(1, d_model, device="cuda", dtype=torch.bfloat16)

    def run(in_kind, mixer, out_kind):
        def fn():
            x = xn
            for i in range(L):
                if in_kind == "gemv":
                    src = gemv(x, w_in[i])[0, :d_inner]
                else:
                    in_proj_conv_(x, w_in[i], ss[i, 1] if in_kind == "conv" else None, 1e-5, zx[i], P["conv_w"], P["conv_b"], P["conv"][i], d_inner)
                    src = zx[i, :d_inner]
                if mixer:
                    mixer_(zx[i], P["A"], P["D"], P["dt_bias"], P["ssm"][i], P["norm_w"], (0.0, float("inf")), False,
                           u[i], ss[i, 0])
                    src = u[i]
                if out_kind == "gemv":
                    x = gemv(src, w_out[i]).view(1, -1)
                else:
                    x = out_proj_add_(src, w_out[i], ss[i, 0], d_inner, 1e-5, res, P["w_next"], xn, ss[i, 1])
        return fn

    return {
        "gemv_gemv": run("gemv", False, "gemv"),
        "conv_noscale_gemv": run("conv_noscale", False, "gemv"),
        "conv_gemv": run("conv", False, "gemv"),
        "gemv_add": run("gemv", False, "add"),
        "conv_add": run("conv", False, "add"),
        "conv_mixer_add": run("conv", True, "add"),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mamba2-2.7b,mamba2-1.3b")
    ap.add_argument("--out", default="layer_chain.json")
    args = ap.parse_args()
    out = {}
    for name in args.models.split(","):
        out[name] = {}
        for vname, fn in variants(name).items():
            ms = graph_time(fn, reps=30)
            out[name][vname] = ms
            print(f"{name:12s} {vname:16s} {ms:7.3f} ms", flush=True)
        torch.cuda.empty_cache()
    write_json(args.out, dict(device=torch.cuda.get_device_name(), results=out))


if __name__ == "__main__":
    main()
