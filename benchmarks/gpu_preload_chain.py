"""out_proj chains with the preload GEMV (ops/gluon_gemv.py) against the register GEMV
(ops/triton_gemv.py): 64 out_proj alone, and the in/out alternating chain, graph-timed.

    python benchmarks/gpu_preload_chain.py [--models mamba2-2.7b,mamba2-1.3b] [--out chain.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu import copy_bandwidth, graph_time  # noqa: E402
from gpu_gemv import chain_weights, floor_ms, interleaved  # noqa: E402

from mamba_deploy.atomic import write_json  # noqa: E402


def chain(ws, x0, out_kind, rows=None):
    from mamba_deploy.ops.gluon_gemv import gemv_preload
    from mamba_deploy.ops.triton_gemv import gemv

    def fn():
        x = x0
        for i, w in enumerate(ws):
            is_out = w.shape[1] > w.shape[0]
            if is_out and out_kind == "preload":
                y = gemv_preload(x, w, rows=rows)
            else:
                y = gemv(x, w)
            if i + 1 < len(ws):
                x = y[:, :ws[i + 1].shape[1]] if y.shape[1] >= ws[i + 1].shape[1] else x0[:, :ws[i + 1].shape[1]]
    return fn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mamba2-2.7b,mamba2-1.3b")
    ap.add_argument("--out", default="preload_chain.json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    res = {}
    for name in args.models.split(","):
        w_in, w_out = chain_weights(name)
        x_out = torch.randn(1, w_out[0].shape[1], device="cuda", dtype=torch.bfloat16)
        x_in = torch.randn(1, w_in[0].shape[1], device="cuda", dtype=torch.bfloat16)
        alt = interleaved(w_in, w_out)
        r = dict(floor_out=floor_ms(w_out, bw), floor_alt=floor_ms(alt, bw))
        for rnd in range(2):
            for kind, rows in (("register", None), ("preload", None), ("preload", 20), ("preload", 16)):
                key = f"{kind}{'' if rows is None else '_r%d' % rows}"
                if isinstance(r.get(f"out_{key}"), str):
                    continue
                try:
                    r.setdefault(f"out_{key}", []).append(graph_time(chain(w_out, x_out, kind, rows), reps=30))
                    r.setdefault(f"alt_{key}", []).append(graph_time(chain(alt, x_in, kind, rows), reps=30))
                except ValueError as e:
                    r[f"out_{key}"] = str(e)
        res[name] = r
        print(name, {k: v for k, v in r.items()}, flush=True)
        del w_in, w_out
        torch.cuda.empty_cache()
    write_json(args.out, dict(device=torch.cuda.get_device_name(), copy_bw=bw, results=res), indent=1)


if __name__ == "__main__":
    main()
