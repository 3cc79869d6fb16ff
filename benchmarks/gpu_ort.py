"""ONNX Runtime's CUDA execution provider against this project's torch runner on the GPU, in one
run: 130m-shaped random Mamba1 / Mamba2 (the shapes of cpu_backends.py), exported to ONNX in
fp32 and fp16. Measures prefill of --prefill tokens (batch 1, last position's logits) and greedy
decode in ms/token through the common Runner calls (wall time: each step includes the host
round trip a generation loop pays), and, first, the fp32 graph's prefill logits on the CUDA
provider with TF32 off and on against the CPU provider. Prints a table and writes JSON.

Needs onnxruntime-gpu (CUDAExecutionProvider) and a CUDA GPU:

    python3 benchmarks/gpu_ort.py --out $OUT/gpu_ort.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_backends import SHAPES, build_checkpoint  # noqa: E402

from mamba_deploy.atomic import write_json  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def time_runner(runner, ids, n_decode: int) -> dict:
    """Prefill seconds and decode ms/token, wall time with the GPU synchronized at each end. Two
    untimed rounds at the timed length first: Triton autotunes and ORT sizes its buffers per shape."""
    def prefill():
        logits, st = runner.prefill(ids, runner.new_state(1), last_only=True)
        return logits[:, -1].argmax(-1), st

    for _ in range(2):
        tok, st = prefill()
        for _ in range(3):
            logits, st = runner.step(tok, st)
            tok = logits.argmax(-1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tok, st = prefill()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(n_decode):
        logits, st = runner.step(tok, st)
        tok = logits.argmax(-1)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return dict(prefill_s=t1 - t0, decode_ms=(t2 - t1) / n_decode * 1000)


def tf32_rows(arch, work: Path, hf_dir: Path, ids, rows: list) -> None:
    """Why the runner turns TF32 off for fp32 graphs: prefill logits on the CUDA provider with
    use_tf32 0 / 1 against the CPU provider on the same fp32 graph (relative to max |CPU|)."""
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners.onnx_runner import open_onnx

    onnx_dir = export_onnx(hf_dir, work / f"{arch}-onnx-tf32", validate=False)
    short = ids[:, :128]
    with open_onnx(onnx_dir, providers=["CPUExecutionProvider"]) as r:
        want = r.prefill(short, r.new_state(1))[0].double()
    for tf32 in ("0", "1"):
        with open_onnx(onnx_dir, providers=[("CUDAExecutionProvider", {"use_tf32": tf32})]) as r:
            got = r.prefill(short, r.new_state(1))[0].double()
        err = float((got - want).abs().max() / want.abs().max())
        rows.append(dict(arch=arch, backend="onnxruntime-cuda", dtype="fp32", use_tf32=int(tf32),
                         prefill_tokens=short.shape[1], rel_err_vs_cpu_provider=err))
        print(f"  {arch:<7} onnxruntime-cuda fp32 use_tf32={tf32}: logits vs CPU provider {err:.2e}", flush=True)


def rows_for(arch: str, work: Path, args) -> list[dict]:
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners import open_runner
    from mamba_deploy.runners.onnx_runner import open_onnx

    hf_dir = work / f"{arch}-hf"
    build_checkpoint(arch, hf_dir)
    ids = torch.randint(0, 50000, (1, args.prefill), generator=torch.Generator().manual_seed(1))
    rows = []

    def add(backend, dtype, runner):
        t = time_runner(runner, ids, args.decode)
        rows.append(dict(arch=arch, backend=backend, dtype=dtype, prefill_tokens=args.prefill,
                         prefill_ms=round(t["prefill_s"] * 1000, 3), decode_ms_per_token=round(t["decode_ms"], 4)))
        print(f"  {arch:<7} {backend:<22} {dtype:<5} prefill {t['prefill_s'] * 1000:8.2f} ms  "
              f"decode {t['decode_ms']:7.3f} ms/token", flush=True)

    tf32_rows(arch, work, hf_dir, ids, rows)
    for dtype in args.dtypes.split(","):
        onnx_dir = work / f"{arch}-onnx-{dtype}"
        export_onnx(hf_dir, onnx_dir, dtype=dtype, validate=False)
        with open_onnx(onnx_dir, providers=["CUDAExecutionProvider"]) as r:
            add("onnxruntime-cuda", dtype, r)
        with open_runner(hf_dir, "torch", device="cuda", dtype=DTYPES[dtype]) as r:
            add(f"torch ({r.name})", dtype, r)
    return rows


def write_rows(out: str, rows: list) -> None:
    """The rows with the GPU, torch and ONNX Runtime versions, as JSON (atomically)."""
    import onnxruntime as ort

    write_json(out, dict(device=torch.cuda.get_device_name(), torch=torch.__version__, onnxruntime=ort.__version__,
                         cpu_count=os.cpu_count(), rows=rows))
    print(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default=",".join(SHAPES))
    ap.add_argument("--dtypes", default="fp32,fp16")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_ort.json"))
    args = ap.parse_args(argv)
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        print(f"needs onnxruntime-gpu and a CUDA GPU (providers: {ort.get_available_providers()})", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            rows += rows_for(arch, Path(tmp), args)
    print(f"\n{'arch':<7} {'backend':<24} {'dtype':<5} {'prefill ms':>10} {'decode ms/token':>16}")
    for r in (r for r in rows if "prefill_ms" in r):
        print(f"{r['arch']:<7} {r['backend']:<24} {r['dtype']:<5} {r['prefill_ms']:>10.2f} {r['decode_ms_per_token']:>16.3f}")
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
