"""Batch-1 GEMV through TMA (Hopper's bulk tensor copy) with a multi-stage pipeline, against this
project's GEMV (ops/triton_gemv.py), over each model's in_proj / out_proj chain in one CUDA graph.

A record of a variant that was measured and not adopted (results/h200_gemv_tma.*, H200, bf16):
the best TMA tile streamed the mamba2-2.7b chain in 1.672 ms against 1.575 ms for the looping
GEMV then in use (floor 1.214 ms), and a persistent TMA kernel (one or two programs per SM
walking row blocks) was slower still (1.82 ms); for mamba2-1.3b, 0.824 vs 0.835 ms. The one-shot
GEMV that replaced the looping one does that chain in 1.360 ms (results/h200_gemv_oneshot.*).
Triton pipelines the descriptor loads through shared memory (STAGES - 1 buffers); it does not
pipeline plain pointer loads that feed no dot.

    python3 benchmarks/gpu_gemv_tma.py [--models mamba2-2.7b,mamba2-1.3b] [--out gemv_tma.json]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

@triton.jit
def gemv_tma(X, w_desc, Y, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
             USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    n0 = tl.program_id(0) * BLOCK_N
    rk = tl.arange(0, BLOCK_K)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        w = w_desc.load([n0, k0])
        x = tl.load(X + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    rn = n0 + tl.arange(0, BLOCK_N)
    tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=rn < N)


@triton.jit
def gemv_tma_persist(X, w_desc, Y, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                     USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    KT = tl.cdiv(K, BLOCK_K)
    NT = tl.cdiv(N, BLOCK_N)
    mine = tl.cdiv(NT - pid, nprog)
    rk = tl.arange(0, BLOCK_K)
    rn0 = tl.arange(0, BLOCK_N)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t in tl.range(0, mine * KT, num_stages=STAGES):
        rb = pid + (t // KT) * nprog
        kb = t % KT
        w = w_desc.load([rb * BLOCK_N, kb * BLOCK_K])
        x = tl.load(X + kb * BLOCK_K + rk, mask=kb * BLOCK_K + rk < K, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        if kb == KT - 1:
            rn = rb * BLOCK_N + rn0
            tl.store(Y + rn, tl.sum(acc, axis=1).to(Y.dtype.element_ty), mask=rn < N)
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)


def make_desc(w, bn, bk):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(w, [bn, bk])


def run(kind, x, w, desc, cfg, pdl):
    n, k = w.shape
    y = torch.empty(n, device=x.device, dtype=x.dtype)
    bn, bk, st, nw = cfg["BN"], cfg["BK"], cfg["S"], cfg["W"]
    kw = dict(BLOCK_N=bn, BLOCK_K=bk, STAGES=st, USE_PDL=pdl, launch_pdl=pdl, num_warps=nw)
    if kind == "tma":
        gemv_tma[(triton.cdiv(n, bn),)](x, desc, y, n, k, **kw)
    elif kind == "persist":
        nsm = torch.cuda.get_device_properties(x.device).multi_processor_count
        grid = min(nsm * cfg.get("C", 1), triton.cdiv(n, bn))
        gemv_tma_persist[(grid,)](x, desc, y, n, k, **kw)
    return y


def main():
    from gpu import copy_bandwidth, graph_time
    from gpu_gemv import chain_weights, floor_ms, interleaved

    from mamba_deploy.atomic import write_json
    from mamba_deploy.ops.triton_gemv import gemv

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mamba2-2.7b,mamba2-1.3b")
    ap.add_argument("--out", default="gemv_tma.json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    out = {"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": []}
    for name in args.models.split(","):
        w_in, w_out = chain_weights(name)
        ws = interleaved(w_in, w_out)
        x = torch.randn(max(w.shape[1] for w in ws), device="cuda", dtype=torch.bfloat16)
        floor = floor_ms(ws, bw)
        ref = [torch.nn.functional.linear(x[: w.shape[1]].float(), w.float()) for w in ws[:2]]

        base = graph_time(lambda: [gemv(x[: w.shape[1]], w, pdl=True) for w in ws], reps=30)
        print(f"{name}: floor {floor:.3f} ms, current gemv alt chain {base:.3f} ms", flush=True)
        out["rows"].append(dict(model=name, kind="current", ms=base, floor=floor))
        cfgs = []
        for kind in ("tma", "persist"):
            for bn, bk, st, nw in itertools.product((8, 16, 32), (128, 256), (3, 4, 6), (4,)):
                for c in ((1, 2) if kind == "persist" else (1,)):
                    cfgs.append((kind, dict(BN=bn, BK=bk, S=st, W=nw, C=c)))
        best = {}
        for kind, cfg in cfgs:
            try:
                descs = [make_desc(w, cfg["BN"], cfg["BK"]) for w in ws]
                # correctness on the first pair
                for w, dsc, r in zip(ws[:2], descs[:2], ref):
                    yk = run(kind, x[: w.shape[1]], w, dsc, cfg, True)
                    err = float((yk.float() - r).abs().max() / r.abs().max())
                    if err > 2e-2:
                        raise RuntimeError(f"wrong result {err:.2e}")
                ms = graph_time(lambda: [run(kind, x[: w.shape[1]], w, dsc, cfg, True) for w, dsc in zip(ws, descs)],
                                reps=30)
            except Exception as e:
                print(f"  {kind} {cfg}: {type(e).__name__} {str(e)[:120]}", flush=True)
                continue
            out["rows"].append(dict(model=name, kind=kind, cfg=cfg, ms=ms, floor=floor))
            if kind not in best or ms < best[kind][0]:
                best[kind] = (ms, cfg)
                print(f"  {name} {kind:8s} {cfg} {ms:.3f} ms  ({floor / ms:.0%} of floor)", flush=True)
        print(name, "best:", {k: (round(v[0], 3), v[1]) for k, v in best.items()}, flush=True)
        ws = w_in = w_out = None  # frees the weights before the next model
        torch.cuda.empty_cache()
    write_json(args.out, out, indent=1)


if __name__ == "__main__":
    main()
