"""What sets verify's fp8 row: `verify` of the shipped demo models' fp8 checkpoints against their
float ones, over seeds, with every limit off, so the measured errors are reported whatever the row.

    mamba-deploy quantize models/MODEL q_MODEL_fp8 --method fp8
    mamba-deploy verify models/MODEL q_MODEL_fp8 --seed S --json j.json \
        --tolerance logits_rel=inf,state_rel=inf,top1=0,ppl_rel=inf

Prints each run, the worst of each metric and the fp8 row's limits beside them; writes JSON.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/fp8_verify.py --out benchmarks/results/fp8_verify.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mamba_deploy.atomic import write_json  # noqa: E402
from mamba_deploy.tolerances import TOLERANCES  # noqa: E402

METRICS = ("logits_rel", "state_rel", "top1", "ppl_rel")
OFF = "logits_rel=inf,state_rel=inf,top1=0,ppl_rel=inf"


def _cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "mamba_deploy.cli", *args], check=True, cwd=ROOT,
                   env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["models/demo-mamba1", "models/demo-mamba2"])
    ap.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 per model")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fp8_verify.json"))
    args = ap.parse_args()
    runs, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for model in args.models:
            q = Path(work) / f"q_{Path(model).name}_fp8"
            _cli("quantize", model, str(q), "--method", "fp8")
            for seed in range(args.seeds):
                j = Path(work) / "j.json"
                _cli("verify", model, str(q), "--seed", str(seed), "--quiet", "--json", str(j), "--tolerance", OFF)
                checks = {c["name"]: c["value"] for c in json.loads(j.read_text())["checks"]}
                runs.append({"model": Path(model).name, "seed": seed, **{k: checks[k] for k in METRICS}})
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in runs[-1].items()),
                      flush=True)
    worst = {k: (min if k == "top1" else max)(r[k] for r in runs) for k in METRICS}
    row = TOLERANCES["fp8"]
    print(f"\n{'metric':<12}{'worst':>10}{'fp8 row':>10}")
    for k in METRICS:
        print(f"{k:<12}{worst[k]:>10.4g}{row[k]:>10.4g}")
    write_json(args.out, {"commands": __doc__.split("\n\n")[1].strip().splitlines(), "worst": worst,
                          "row": {k: row[k] for k in METRICS}, "runs": runs,
                          "seconds": round(time.perf_counter() - t0, 1)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
