"""Peak resident memory and time of reading a large `quantize --calib FILE` into calibration
windows, against loading the model and its tokenizer alone; each in a fresh process under
`/usr/bin/time -v`. Prints a table and writes JSON.

    python benchmarks/calib_memory.py [--mib 8] [--src OTHER_CHECKOUT/src] --out FILE

The text is seeded random lines of README.md's words; the model is the shipped demo-mamba2 (its
tokenizer is what the file is read with). --src measures another checkout's code on the same file.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "demo-mamba2"
LOAD = "from mamba_deploy.checkpoint import load_model; m = load_model({model!r}); m.tokenizer"
CALIB = LOAD + ("; import time; from mamba_deploy.quant.calib import calibration_ids; t = time.perf_counter(); "
                "ids = calibration_ids(m, {path!r}); print(tuple(ids.shape), time.perf_counter() - t)")


def write_text(path: Path, mib: float) -> None:
    rng, words = random.Random(0), (ROOT / "README.md").read_text().split()
    with open(path, "w") as f:
        n = 0
        while n < mib * 2**20:
            line = " ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) + "\n"
            f.write(line)
            n += len(line.encode())


def run(code: str, src: str) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, default=8.0, help="size of the calibration text file")
    ap.add_argument("--src", default=str(ROOT / "src"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mamba-calib-") as tmp:
        path = Path(tmp) / "calib.txt"
        write_text(path, a.mib)
        base, _ = run(LOAD.format(model=str(MODEL)), a.src)
        peak, out = run(CALIB.format(model=str(MODEL), path=str(path)), a.src)
    seconds = float(out.split(")")[-1])
    row = {"src": a.src, "file_mib": a.mib, "load_peak_mib": base / 2**20, "calib_peak_mib": peak / 2**20,
           "calib_extra_mib": (peak - base) / 2**20, "calib_seconds": seconds}
    print(f"| file | load model + tokenizer | + calibration_ids | extra | time |\n| --- | ---: | ---: | ---: | ---: |\n"
          f"| {a.mib:g} MiB | {row['load_peak_mib']:.0f} MiB | {row['calib_peak_mib']:.0f} MiB | "
          f"{row['calib_extra_mib']:.0f} MiB | {seconds:.2f} s |")
    if a.out:
        from mamba_deploy.atomic import write_json  # a temporary name, then renamed

        write_json(a.out, row)


if __name__ == "__main__":
    main()
