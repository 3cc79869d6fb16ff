"""Batch-1 graph decode on the GPU, kernel by kernel: where the head (embedding, first norm) and
the tail (final norm, lm_head, logits cast) of a token go, next to the layers, and within a
layer how long each of its four launches holds up the chain.

For each model: one captured CudaGraphRunner step, replayed under torch.profiler (CUPTI sees the
kernels inside graph replays); per replay, the kernels sorted by start time are split into the
head (before the first layer's in_proj GEMV), the layers and the tail (after the last layer's
add+norm), and each part's span is reported (PDL overlaps neighbours, so spans, not summed
durations). Also timed on their own as replayed graphs: the lm_head GEMV and the head's launches,
against the weight-streaming floor at the measured copy bandwidth.

    python benchmarks/gpu_decode_profile.py --out profile.json [--models mamba2-2.7b,mamba2-1.3b]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu import copy_bandwidth, cuda_time, graph_time, our_model  # noqa: E402

from mamba_deploy.atomic import write_json  # noqa: E402


def replay_kernels(runner, replays: int):
    """[[(name, start_us, dur_us), ...] per replay], kernels of each replay in start order."""
    from torch.profiler import ProfilerActivity, profile

    runner.replay(1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            runner.replay(1)
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    kernels = sorted((e["ts"], e["dur"], e["name"]) for e in trace["traceEvents"]
                     if e.get("cat") == "kernel")
    per = len(kernels) // replays
    return [[(n, ts, d) for ts, d, n in kernels[r * per:(r + 1) * per]] for r in range(replays)]


def split(kernels, n_layer: int):
    """(head, layers, tail) index ranges: the layers start at the first GEMV and end at the
    n_layer-th add+norm; which kernel is which is read from its name."""
    gemv = [i for i, (n, _, _) in enumerate(kernels) if "gemv" in n]
    norms = [i for i, (n, _, _) in enumerate(kernels) if "add_rmsnorm" in n]
    first, last = gemv[0], norms[n_layer - 1]
    return (0, first), (first, last + 1), (last + 1, len(kernels))


def span(kernels, lo, hi, prev_end):
    """us from the end of the kernel before lo (or the first start) to the last end in [lo, hi)."""
    if lo >= hi:
        return 0.0
    end = max(ts + d for _, ts, d in kernels[lo:hi])
    return end - (prev_end if prev_end is not None else kernels[lo][1])


def layer_phases(kernels, lo, hi, start):
    """Per layer of a fused Mamba2 step (in_proj GEMV, mixer, out_proj GEMV, add+norm): us from the
    end of the previous phase to the end of each; None for other layouts (Mamba1, unfused)."""
    ks = kernels[lo:hi]
    if len(ks) % 4 or not all("gemv" in ks[i][0] and "ssd_step" in ks[i + 1][0] and "gemv" in ks[i + 2][0]
                              and "add_rmsnorm" in ks[i + 3][0] for i in range(0, len(ks), 4)):
        return None
    out, prev = {"in_proj": [], "mixer": [], "out_proj": [], "add_norm": []}, start
    for i in range(0, len(ks), 4):
        for name, (_, ts, d) in zip(out, ks[i:i + 4]):
            out[name].append(ts + d - prev)
            prev = ts + d
    return out


def profile_model(name: str, replays: int, bw: float):
    from mamba_deploy.cuda_graph import CudaGraphRunner
    from mamba_deploy.ops import triton_gemv

    model = our_model(name)
    runner = CudaGraphRunner(model)
    state = runner.new_state(1)
    runner.step(torch.zeros(1, dtype=torch.long), state)  # captures
    step_ms = cuda_time(functools.partial(runner.replay, 1), reps=200, warmup=20)
    reps = replay_kernels(runner, replays)
    n_layer = model.config.n_layer
    parts = {"head": [], "layers": [], "tail": [], "total": []}
    phases = {}
    for ks in reps:
        (h0, h1), (l0, l1), (t0, t1) = split(ks, n_layer)
        head_end = max(ts + d for _, ts, d in ks[h0:h1]) if h1 > h0 else ks[0][1]
        layers_end = max(ts + d for _, ts, d in ks[l0:l1])
        parts["head"].append(span(ks, h0, h1, None))
        parts["layers"].append(span(ks, l0, l1, head_end))
        for k, v in (layer_phases(ks, l0, l1, head_end) or {}).items():
            phases.setdefault(k, []).extend(v)
        parts["tail"].append(span(ks, t0, t1, layers_end))
        parts["total"].append(max(ts + d for _, ts, d in ks) - ks[0][1])
    med = {k: sorted(v)[len(v) // 2] / 1e3 for k, v in parts.items()}
    phase_us = {k: sorted(v)[len(v) // 2] for k, v in phases.items()}
    mixer = model.backbone.layers[0].mixer
    phase_floor_us = {k: lin.weight.numel() * lin.weight.element_size() / bw * 1e6
                      for k, lin in (("in_proj", mixer.in_proj), ("out_proj", mixer.out_proj))}
    ks = reps[len(reps) // 2]
    (h0, h1), _, (t0, t1) = split(ks, n_layer)
    base = ks[0][1]
    listing = [dict(name=n[:60], start_us=round(ts - base, 2), dur_us=round(d, 2))
               for n, ts, d in ks[h0:h1] + ks[h1:h1 + 6] + ks[t0 - 4:t1]]

    # lm_head alone, and the floor of its bytes
    w = model.lm_head.weight
    x = torch.randn(1, w.shape[1], device="cuda", dtype=w.dtype)
    lm_ms = graph_time(lambda: triton_gemv.gemv(x, w, pdl=False), reps=50)
    lm_cublas_ms = graph_time(lambda: torch.nn.functional.linear(x, w), reps=50)
    lm_floor_ms = w.numel() * w.element_size() / bw * 1e3
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out = dict(step_ms=step_ms, profiled_ms=med, floor_ms=weights / bw * 1e3, n_kernels=len(ks),
               layer_phase_us_median=phase_us, layer_phase_floor_us=phase_floor_us,
               lm_head_gemv_ms=lm_ms, lm_head_cublas_ms=lm_cublas_ms, lm_head_floor_ms=lm_floor_ms,
               kernels=listing)
    print(f"{name}: step {step_ms:.3f} ms (floor {out['floor_ms']:.3f}); profiled head {med['head']:.3f}, "
          f"layers {med['layers']:.3f}, tail {med['tail']:.3f}, total {med['total']:.3f} ms; "
          f"{len(ks)} kernels", flush=True)
    if phase_us:
        print("  per layer, us from the previous phase's end (median): "
              + ", ".join(f"{k} {v:.2f}" + (f" (floor {phase_floor_us[k]:.2f})" if k in phase_floor_us else "")
                          for k, v in phase_us.items()))
    print(f"  lm_head alone: gemv {lm_ms:.3f} ms, cuBLAS {lm_cublas_ms:.3f} ms, floor {lm_floor_ms:.3f} ms")
    for row in listing:
        print(f"    {row['start_us']:9.2f} {row['dur_us']:8.2f}  {row['name']}")
    del runner, model
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mamba2-2.7b,mamba2-1.3b")
    ap.add_argument("--replays", type=int, default=9)
    ap.add_argument("--out", default="decode_profile.json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    results = {name: profile_model(name, args.replays, bw) for name in args.models.split(",")}
    write_json(args.out, dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                              copy_bandwidth=bw, results=results))


if __name__ == "__main__":
    main()
