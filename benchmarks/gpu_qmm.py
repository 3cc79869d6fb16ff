"""Weight-only int8 / int4 linears for a few rows on one GPU (batched decode): this project's qmm
kernel (ops/triton_qmm.py) and one-row GEMV (ops/triton_gemv.py) vs converting the codes and
calling cuBLAS (the reference twin) vs torch's tinygemm int4 kernel vs the bf16 weight in cuBLAS,
at the projections of mamba2-2.7b and mamba-2.8b, rows 1..128; then a tile sweep at 32 rows.
Each timing is a CUDA graph over 8 copies of the weight (more than L2 holds), per call. Prints
tables and writes JSON.

    PYTHONPATH=src python3 benchmarks/gpu_qmm.py [--rows 1,2,8,32,64,128] [--no-sweep] [--out qmm.json]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu as G  # noqa: E402  (benchmarks/gpu.py: timing; puts src/ on the path)

from mamba_deploy.atomic import write_json  # noqa: E402
from mamba_deploy.ops import reference as R  # noqa: E402
from mamba_deploy.ops import triton_qmm as Q  # noqa: E402
from mamba_deploy.ops.triton_gemv import gemv  # noqa: E402
from mamba_deploy.quant import formats  # noqa: E402
from mamba_deploy.ops.torch_fused import tinygemm_pack  # noqa: E402

SHAPES = {  # (out, in)
    "mamba2-2.7b in_proj": (10576, 2560),
    "mamba2-2.7b out_proj": (2560, 5120),
    "mamba-2.8b in_proj": (10240, 2560),
    "mamba-2.8b x_proj": (192, 5120),
}
COPIES = 8


def stored(n, k, fmt):
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    t = formats.encode(w, fmt, "bench", group_size=128, symmetric=True)
    return dict(t, w=w.to(torch.bfloat16))


def timed(fn_of_copy):
    return G.graph_time(lambda: [fn_of_copy(i) for i in range(COPIES)], reps=20) / COPIES


def run_shape(name, n, k, rows, sweep):
    cp8 = [stored(n, k, "int8") for _ in range(COPIES)]
    cp4 = [stored(n, k, "int4") for _ in range(COPIES)]
    tiny = [tinygemm_pack(t["qweight"], t["scales"], None, True) for t in cp4]
    res = {}
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        r = dict(
            bf16_cublas=timed(lambda i: torch.nn.functional.linear(x, cp8[i]["w"])),
            int8_ref=timed(lambda i: R.int8_linear_ref(x, cp8[i]["qweight"], cp8[i]["scales"])),
            int4_ref=timed(lambda i: R.int4_linear_ref(x, cp4[i]["qweight"], cp4[i]["scales"], None, 128, True)),
            int4_tinygemm=timed(lambda i: torch._weight_int4pack_mm(x, tiny[i][0], 128, tiny[i][1])),
        )
        if m == 1:
            r["bf16_gemv"] = timed(lambda i: gemv(x, cp8[i]["w"]))
            r["int8_gemv"] = timed(lambda i: gemv(x, cp8[i]["qweight"], scale=cp8[i]["scales"].view(-1)))
        if m >= 2:
            r["int8_qmm"] = timed(lambda i: Q.int8_mm(x, cp8[i]["qweight"], cp8[i]["scales"]))
            r["int4_qmm"] = timed(lambda i: Q.int4_mm(x, cp4[i]["qweight"], cp4[i]["scales"], None, 128, True))
            # error vs float64 on the same codes
            t = cp8[0]
            want = (x.double() @ t["qweight"].double().T) * t["scales"].double().view(1, -1)
            r["int8_rel_err"] = float((Q.int8_mm(x, t["qweight"], t["scales"]).double() - want).norm() / want.norm())
            t = cp4[0]
            w4 = formats.decode(t, "int4", 128, True, torch.float64)
            want = x.double() @ w4.T
            got = Q.int4_mm(x, t["qweight"], t["scales"], None, 128, True).double()
            r["int4_rel_err"] = float((got - want).norm() / want.norm())
        res[m] = r
        print(f"{name} rows {m}: " + ", ".join(f"{key} {v:.4g}" for key, v in r.items()), flush=True)
    if sweep:
        m = 32
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        rows_ = []
        if sweep == "wide":  # int8 only: warps, stages, longer K tiles
            grid = [(8, bn, split, bk, False, st, w) for bn, split, bk, st, w in
                    itertools.product((16, 32, 64), (1, 2), (256, 512), (3, 5), (4, 8))]
        else:
            grid = [(bits, bn, split, bk, swap, 4, 4) for bits, bn, split, bk, swap in
                    itertools.product((8, 4), (16, 32, 64, 128), (1, 2, 4), (128, 256), (False, True))]
        for bits, bn, split, bk, swap, stages, warps in grid:
            if bits == 4 and bk != 128 or k % (bk * split) or k // split < 2 * bk:
                continue
            cfg = dict(BM=32, BN=bn, BK=bk, SPLIT_K=split, STAGES=stages, num_warps=warps, SWAP=swap)
            try:
                if bits == 8:
                    ms = timed(lambda i: Q.int8_mm(x, cp8[i]["qweight"], cp8[i]["scales"], config=cfg))
                else:
                    ms = timed(lambda i: Q.int4_mm(x, cp4[i]["qweight"], cp4[i]["scales"], None, 128, True,
                                                   config=cfg))
            except Exception as e:  # noqa: BLE001 (resources a tile cannot have)
                print(f"  {bits} {cfg}: {type(e).__name__}", flush=True)
                continue
            rows_.append(dict(bits=bits, cfg=cfg, ms=ms))
        for bits in ((8,) if sweep == "wide" else (8, 4)):
            best = sorted((r for r in rows_ if r["bits"] == bits), key=lambda r: r["ms"])[:5]
            default = Q.qmm_config(m, n, k, bits, 128)
            print(f"  sweep {name} rows 32 int{bits}: default {default} -> {res[32][f'int{bits}_qmm']:.4f} ms; best "
                  + "; ".join(f"{r['ms']:.4f} {r['cfg']}" for r in best), flush=True)
        res["sweep32"] = rows_
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,8,32,64,128")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--wide-sweep", action="store_true", help="int8 only: warps, stages, K tiles of 512")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default="qmm.json")
    args = ap.parse_args()
    rows = [int(v) for v in args.rows.split(",")]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": {}}
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        sweep = (not args.no_sweep and 32 in rows and "x_proj" not in name) and ("wide" if args.wide_sweep else True)
        out["results"][name] = run_shape(name, n, k, rows, sweep)
        torch.cuda.empty_cache()
    write_json(args.out, out, indent=1)
    cols = ["bf16_cublas", "bf16_gemv", "int8_ref", "int8_gemv", "int8_qmm", "int4_ref", "int4_tinygemm", "int4_qmm"]
    print(f"{'shape':24s}{'rows':>5s}" + "".join(f"{c:>15s}" for c in cols) + "   (us per call)")
    for name, r in out["results"].items():
        for m in rows:
            print(f"{name:24s}{m:5d}" + "".join(f"{r[m][c] * 1e3:15.1f}" if c in r[m] else f"{'-':>15s}"
                                                 for c in cols))


if __name__ == "__main__":
    main()
