"""Decode GEMV on the GPU: cuBLAS vs this project's Triton GEMV (ops/triton_gemv.py), with and
without programmatic dependent launch, over each model's real chain of projections.

A chain is every layer's in_proj then out_proj (distinct weights, so nothing stays in L2), one
row of x, captured in one CUDA graph: what batch-1 decode streams, minus the small kernels.
First each projection's launch configurations are swept (PDL on), then the best pair is timed
against cuBLAS. Prints a table (ms per chain and the copy-bandwidth floor), writes JSON.

    python benchmarks/gpu_gemv.py [--out gemv.json] [--models mamba2-2.7b,mamba2-130m]

With 4 or 16 rows, a tensor-core variant of the kernel was 1.5x slower than cuBLAS (kept in
results/h200_gemv_rows4_16.json), so the dispatcher uses the GEMV for one row only.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu import MODELS, copy_bandwidth, graph_time  # noqa: E402

from mamba_deploy.atomic import write_json  # noqa: E402


def shapes(name):
    s = MODELS[name]
    d = 2 * s["d_model"]
    if s["arch"] == "mamba2":
        n_in = 2 * d + 2 * s["d_state"] + d // 64
    else:
        n_in = 2 * d
    return s["n_layer"], (n_in, s["d_model"]), (s["d_model"], d)


def chain_weights(name):
    """Each layer's in_proj and out_proj weights (random bf16, seed 0) on the GPU: (w_in, w_out)."""
    n_layer, (n1, k1), (n2, k2) = shapes(name)
    torch.manual_seed(0)
    w_in = [torch.randn(n1, k1, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(n_layer)]
    w_out = [torch.randn(n2, k2, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(n_layer)]
    return w_in, w_out


def interleaved(w_in, w_out):
    """The decode order of the chain: in_proj, out_proj, in_proj, ..."""
    return [w for pair in zip(w_in, w_out) for w in pair]


def floor_ms(ws, bw):
    """ms to read every weight of ws once at bw bytes/s (the chain's bandwidth floor)."""
    return sum(w.numel() * w.element_size() for w in ws) / bw * 1e3


def configs():
    for bn, bk, w in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048, 4096, 8192), (2, 4, 8)):
        if 1024 <= bn * bk <= 16384:
            yield {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w}


graph_ms = functools.partial(graph_time, reps=30)


def chain(ws, x0, proj, cfgs=None, pdl=None, feed=False):
    """fn() applying ws in order (cfgs cycled); feed: each output's first columns are the next input."""
    from mamba_deploy.ops.triton_gemv import gemv

    def fn():
        x = x0
        for i, w in enumerate(ws):
            if proj == "cublas":
                y = torch.nn.functional.linear(x, w)
            else:
                y = gemv(x, w, config=cfgs[i % len(cfgs)], pdl=pdl)
            if feed and i + 1 < len(ws):
                x = y[:, :ws[i + 1].shape[1]]
    return fn


def run_model(name, bw):
    from mamba_deploy.ops.triton_gemv import pick_config

    w_in, w_out = chain_weights(name)
    k1, k2 = w_in[0].shape[1], w_out[0].shape[1]
    x_in = torch.randn(1, k1, device="cuda", dtype=torch.bfloat16)
    x_out = torch.randn(1, k2, device="cuda", dtype=torch.bfloat16)
    res = {}
    best = {}
    for proj, ws, x in (("in", w_in, x_in), ("out", w_out, x_out)):
        cub = graph_ms(chain(ws, x, "cublas"))
        sweep = []
        for cfg in configs():
            try:
                ms = graph_ms(chain(ws, x, "triton", [cfg], pdl=True))
            except Exception as e:  # a config the compiler rejects (resources)
                print(f"  {name} {proj} {cfg}: {type(e).__name__}", flush=True)
                continue
            sweep.append((ms, cfg))
        sweep.sort(key=lambda t: t[0])
        best[proj] = sweep[0][1]
        res[proj] = dict(cublas_ms=cub, best_ms=sweep[0][0], best=sweep[0][1], floor_ms=floor_ms(ws, bw),
                         top5=[(round(m, 4), c) for m, c in sweep[:5]],
                         default_ms=graph_ms(chain(ws, x, "triton", [pick_config(*ws[0].shape)],
                                                   pdl=True)))
        print(f"  {name} {proj}: cublas {cub:.3f} ms, best triton {sweep[0][0]:.3f} ms "
              f"{sweep[0][1]}, floor {res[proj]['floor_ms']:.3f}", flush=True)
    ws = interleaved(w_in, w_out)
    alt = dict(floor_ms=floor_ms(ws, bw), cublas_ms=graph_ms(chain(ws, x_in, "cublas", feed=True)))
    for pdl in (False, True):
        alt[f"triton_pdl{int(pdl)}_ms"] = graph_ms(chain(ws, x_in, "triton", [best["in"], best["out"]], pdl=pdl,
                                                         feed=True))
    res["alternating"] = alt
    print(f"  {name} alternating: " + ", ".join(f"{k} {v:.3f}" for k, v in alt.items()), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gemv.json")
    ap.add_argument("--models", default="mamba2-2.7b,mamba2-1.3b,mamba2-130m")
    args = ap.parse_args()
    bw = copy_bandwidth()
    out = {"device": torch.cuda.get_device_name(), "copy_bw": bw, "results": {}}
    for name in args.models.split(","):
        out["results"][name] = run_model(name, bw)
        torch.cuda.empty_cache()
    write_json(args.out, out, indent=1)
    print("model                 proj   cublas_ms  triton_ms  floor_ms")
    for key, r in out["results"].items():
        for proj in ("in", "out"):
            p = r[proj]
            print(f"{key:22s}{proj:6s}{p['cublas_ms']:10.3f}{p['best_ms']:11.3f}{p['floor_ms']:10.3f}")
        a = r["alternating"]
        print(f"{key:22s}{'alt':6s}{a['cublas_ms']:10.3f}{a['triton_pdl1_ms']:11.3f}{a['floor_ms']:10.3f}"
              f"   (no PDL {a['triton_pdl0_ms']:.3f})")


if __name__ == "__main__":
    main()
