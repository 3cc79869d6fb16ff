"""int8 decode GEMV tile sweep: weight-only int8 graph decode at batch 1 with BLOCK_N / warps varied
for the int8 GEMVs only (two rounds, best of each; the bf16 GEMVs keep their tiles).

    PYTHONPATH=src python3 benchmarks/gpu_int8_sweep.py mamba2-2.7b,mamba2-1.3b   # -> results/h200_int8_gemv_sweep.log
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu as G  # noqa: E402  (benchmarks/gpu.py: shapes, random weights, timing; puts src/ on the path)

TILES = [(2, 4), (4, 4), (4, 8), (8, 4), (8, 8), (16, 8)]  # (BLOCK_N, num_warps)


def main():
    import torch

    from mamba_deploy import cuda_graph as CG
    from mamba_deploy.ops import triton_gemv as TG
    from mamba_deploy.ops import triton_qmm as TQ
    from mamba_deploy.quant import quantize

    plain = TG.gemv
    for name in (sys.argv[1] if len(sys.argv) > 1 else "mamba2-2.7b").split(","):
        model = G.our_model(name)
        quantize(model, "int8", progress=False)
        res = {}
        for _ in range(2):
            for bn, nw in TILES:
                def gemv(x, weight, *args, bn=bn, nw=nw, **kw):
                    k = weight.shape[1]
                    if weight.dtype == torch.int8 and k <= TG.ONE_SHOT_MAX_K and kw.get("config") is None:
                        kw["config"] = dict(BLOCK_N=bn, BLOCK_K=TG.triton.next_power_of_2(k), num_warps=nw)
                    return plain(x, weight, *args, **kw)
                TQ.gemv = gemv  # int8_linear looks the name up in its module at each call
                r = CG.CudaGraphRunner(model)
                r.step(torch.randint(0, G.VOCAB, (1,)), r.new_state(1))  # captures
                res.setdefault((bn, nw), []).append(G.cuda_time(lambda: r.replay(1), reps=200, warmup=10))
                r = None
                torch.cuda.empty_cache()
        TQ.gemv = plain
        for (bn, nw), ts in res.items():
            print(f"{name} int8 BLOCK_N={bn} warps={nw}: {min(ts):.3f} ms ({', '.join(f'{t:.3f}' for t in ts)})")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
