"""Mamba1's ONNX prefill on ONNX Runtime's CUDA provider: the export's Scan over tokens against
the chunked Scans (Q tokens per iteration: `quadratic`, the dual form shipped as `export onnx
--scan-chunk Q`, and benchmarks/onnx_m1_chunk.py's log-depth form), in one run. 130m-shaped random Mamba1 (cpu_backends.py's shapes), fp32 and fp16
exports, batch 1: prefill of --prefill tokens (last position's logits) and greedy decode ms/token
(the one-token graph is the same in every folder, so decode is a control), wall time through the
Runner, as benchmarks/gpu_ort.py times them; and each graph's prefill logits against this
project's torch model in float64 (relative to max |reference|; the random 130m weights put even
the per-token fp32 graph at ~5e-4 there on the CPU provider). Prints a table, writes JSON.

Needs onnxruntime-gpu (CUDAExecutionProvider) and a CUDA GPU:

    python3 benchmarks/gpu_ort_m1_chunk.py --out $OUT/gpu_ort_m1_chunk.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_backends import build_checkpoint  # noqa: E402
from gpu_ort import time_runner, write_rows  # noqa: E402
from onnx_m1_chunk import export_variant  # noqa: E402

VARIANTS = "logdepth:4,logdepth:8,logdepth:16,logdepth:32,quadratic:8,quadratic:16"


def export_all(hf_dir: Path, work: Path, dtype: str, variants) -> dict:
    from mamba_deploy.export.onnx import export_onnx

    dirs = {"per-token": export_onnx(hf_dir, work / f"per-token-{dtype}", dtype=dtype, validate=False)}
    for form, q in variants:
        dirs[f"{form}-{q}"] = export_variant(hf_dir, work / f"{form}-{q}-{dtype}", form, q, dtype=dtype, validate=False)
    return dirs


def rows_for(dtype: str, hf_dir: Path, work: Path, variants, args) -> list[dict]:
    from mamba_deploy import load_model
    from mamba_deploy.runners.onnx_runner import open_onnx

    ids = torch.randint(0, 50000, (1, args.prefill), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = load_model(hf_dir, dtype=torch.float64, device="cuda")(ids.cuda()).logits.double().cpu()
    rows = []
    for name, folder in export_all(hf_dir, work, dtype, variants).items():
        with open_onnx(folder, providers=["CUDAExecutionProvider"]) as r:
            logits = r.prefill(ids, r.new_state(1))[0].double().cpu()
            err = float((logits - want).abs().max() / want.abs().max())
            best = min((time_runner(r, ids, args.decode) for _ in range(args.repeats)), key=lambda t: t["prefill_s"])
        rows.append(dict(graph=name, dtype=dtype, prefill_tokens=args.prefill, prefill_ms=round(best["prefill_s"] * 1e3, 3),
                         decode_ms_per_token=round(best["decode_ms"], 4), logits_vs_fp64=err))
        print(f"  {name:<14} {dtype:<5} prefill {best['prefill_s'] * 1e3:8.2f} ms  decode {best['decode_ms']:7.3f} "
              f"ms/token  logits vs float64 {err:.1e}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=VARIANTS, help="comma-separated form:Q")
    ap.add_argument("--dtypes", default="fp32,fp16")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per graph; the fastest prefill is kept")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_ort_m1_chunk.json"))
    args = ap.parse_args(argv)
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        print(f"needs onnxruntime-gpu and a CUDA GPU (providers: {ort.get_available_providers()})", file=sys.stderr)
        return 2
    variants = [(form, int(q)) for form, q in (v.split(":") for v in args.variants.split(","))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint("mamba1", Path(tmp) / "hf")
        for dtype in args.dtypes.split(","):
            rows += rows_for(dtype, Path(tmp) / "hf", Path(tmp), variants, args)
    base = {r["dtype"]: r["prefill_ms"] for r in rows if r["graph"] == "per-token"}
    print(f"\n{'graph':<14} {'dtype':<5} {'prefill ms':>10} {'vs per-token':>12} {'decode ms/token':>16} {'vs fp64':>10}")
    for r in rows:
        print(f"{r['graph']:<14} {r['dtype']:<5} {r['prefill_ms']:>10.2f} {r['prefill_ms'] / base[r['dtype']]:>12.3f} "
              f"{r['decode_ms_per_token']:>16.3f} {r['logits_vs_fp64']:>10.1e}")
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
