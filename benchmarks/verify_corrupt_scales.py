"""Does `verify Q Q-ONNX` catch an int4 ONNX export with one layer's scales off? README's figures.

On a shipped demo model: `quantize MODEL Q --method int4`, `export onnx Q Q-onnx`, then
`verify Q Q-onnx --json` on the intact export and on copies whose one MatMulNBits initializer
`backbone.layers.5.mixer.out_proj.scales` is multiplied by each --factor (the manifest re-hashed, as
a buggy exporter would write it, so only the numbers can tell). verify picks its limits itself: the
export against the checkpoint it came from is held to ORT's compute error (the int8 row), not the
int4 row; the table shows both rows' verdicts.

    .venv/bin/python benchmarks/verify_corrupt_scales.py --out benchmarks/results/verify_corrupt_scales.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mamba_deploy.atomic import write_json  # noqa: E402
from mamba_deploy.export.onnx import file_record  # noqa: E402
from mamba_deploy.tolerances import TOLERANCES  # noqa: E402

INITIALIZER = "backbone.layers.5.mixer.out_proj.scales"


def mamba_deploy(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mamba-deploy")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mamba_deploy"]
    return subprocess.run(cmd + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def scaled_copy(src: Path, dst: Path, factor: float) -> None:
    """src with INITIALIZER x factor and the manifest's model.onnx size and hash rewritten."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    (init,) = [i for i in model.graph.initializer if i.name == INITIALIZER]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, INITIALIZER))
    onnx.save(model, str(dst / "model.onnx"))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = file_record(dst / "model.onnx")
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))


def verify(q: Path, art: Path, js: Path) -> dict:
    t0 = time.perf_counter()
    p = mamba_deploy("verify", str(q), str(art), "--quiet", "--json", str(js))
    if not js.exists():
        raise SystemExit(f"verify {art} wrote no report (rc {p.returncode}):\n{p.stdout[-2000:]}")
    rep = json.loads(js.read_text())
    row = {c["name"]: c["value"] for c in rep["checks"]}
    return dict(rc=p.returncode, passed=bool(rep["passed"]), row=rep["tolerance"].get("label"),
                seconds=round(time.perf_counter() - t0, 1), **row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "demo-mamba2"))
    ap.add_argument("--factor", type=float, nargs="+", default=[1.5, 0.5])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "verify_corrupt_scales.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mamba-corrupt-") as tmp:
        work = Path(tmp)
        for step in (("quantize", args.model, str(work / "q"), "--method", "int4"),
                     ("export", "onnx", str(work / "q"), str(work / "onnx"))):
            p = mamba_deploy(*step)
            if p.returncode != 0:
                raise SystemExit(f"mamba-deploy {' '.join(step)} failed (rc {p.returncode}):\n{p.stdout[-2000:]}")
        for factor in [1.0] + args.factor:
            art = work / "onnx" if factor == 1.0 else work / f"onnx_x{factor:g}"
            if factor != 1.0:
                scaled_copy(work / "onnx", art, factor)
            res = verify(work / "q", art, work / f"x{factor:g}.json")
            lim = TOLERANCES["int4"]
            res.update(factor=factor, int4_row_would_pass=res["top1"] >= lim["top1"] and all(
                res[k] <= lim[k] for k in ("logits_rel", "state_rel", "ppl_rel")))
            rows.append(res)
    print(f"{Path(args.model).name}: int4 export, {INITIALIZER} x factor, `verify Q Q-onnx`")
    print("| factor | row | logits_rel | state_rel | top1 | ppl_rel | verify | under the int4 row |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        print(f"| {r['factor']:g} | {r['row']} | {r['logits_rel']:.4f} | {r['state_rel']:.4f} | {r['top1']:.3f} | "
              f"{r['ppl_rel']:.4f} | {'pass' if r['passed'] else 'FAIL'} | "
              f"{'pass' if r['int4_row_would_pass'] else 'fail'} |")
    write_json(args.out, dict(model=args.model, initializer=INITIALIZER, rows=rows,
                              command="python benchmarks/verify_corrupt_scales.py " + " ".join(sys.argv[1:])))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
