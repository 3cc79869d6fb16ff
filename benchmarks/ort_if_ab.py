"""Does the export's top-level If(seq == 1) cost decode time in ONNX Runtime? The exported
model.onnx against the same graph with its one-token branch promoted to the top level (no If;
one token only; timing only), decode through the ONNX Runner (IO binding, state kept where
the provider keeps it), interleaved rounds in one process; 130m-shaped random models
(cpu_backends.py's shapes). Prints medians and the per-round ratio, writes JSON.

    python benchmarks/ort_if_ab.py --threads 2 [--provider cpu|cuda] [--archs mamba1,mamba2] --out FILE
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_backends import build_checkpoint  # noqa: E402

from mamba_deploy.atomic import write_json  # noqa: E402

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def step_only(src: Path, dst: Path) -> Path:
    """A copy of the export folder whose model.onnx is the If's then-branch (one token) at the top."""
    import onnx
    from onnx import helper

    shutil.copytree(src, dst)
    m = onnx.load(str(src / "model.onnx"))
    g = m.graph
    (node,) = [n for n in g.node if n.op_type == "If"]
    then = next(a.g for a in node.attribute if a.name == "then_branch")
    rename = {o.name: g.output[i].name for i, o in enumerate(then.output)}  # "<out>.step" -> "<out>"
    nodes = [n for n in g.node if n is not node] + list(then.node)
    for n in nodes:
        for names in (n.input, n.output):
            for j, v in enumerate(names):
                names[j] = rename.get(v, v)
    graph = helper.make_graph(nodes, "step_only", list(g.input), list(g.output),
                              list(g.initializer) + list(then.initializer))
    out = helper.make_model(graph, opset_imports=m.opset_import)
    out.ir_version = m.ir_version
    onnx.save(out, str(dst / "model.onnx"))
    manifest = json.loads((dst / "manifest.json").read_text())  # the runner checks model.onnx's hash
    data = (dst / "model.onnx").read_bytes()
    manifest["files"]["model.onnx"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def decode_ms(runner, steps: int) -> float:
    st = runner.new_state(1)
    tok = torch.tensor([5])
    for _ in range(3):
        logits, st = runner.step(tok, st)
    sync = torch.cuda.synchronize if runner.device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        logits, st = runner.step(tok, st)
        tok = logits.argmax(-1).cpu()
    sync()
    return (time.perf_counter() - t) / steps * 1e3


def main(argv=None) -> int:
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners.onnx_runner import open_onnx

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="mamba1,mamba2")
    ap.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ort_if_ab.json"))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            work = Path(tmp) / arch
            build_checkpoint(arch, work / "hf")
            full = export_onnx(work / "hf", work / "with_if", validate=False)
            folders = {"with If": full, "step only": step_only(full, work / "step_only")}
            runners = {k: open_onnx(v, providers=[PROVIDERS[args.provider]], threads=args.threads)
                       for k, v in folders.items()}
            times = {k: [] for k in runners}
            for _ in range(args.rounds):
                for k, r in runners.items():
                    times[k].append(decode_ms(r, args.steps))
            for r in runners.values():
                r.close()
            ratio = statistics.median(b / a for a, b in zip(times["with If"], times["step only"]))
            row = dict(arch=arch, provider=args.provider, threads=args.threads, rounds=args.rounds,
                       with_if_ms=statistics.median(times["with If"]), step_only_ms=statistics.median(times["step only"]),
                       ratio_step_only_to_with_if=ratio, all_ms=times)
            rows.append(row)
            print(f"{arch:<7} {args.provider:<5} with If {row['with_if_ms']:7.2f} ms/token  step only "
                  f"{row['step_only_ms']:7.2f}  per-round ratio {ratio:.3f}", flush=True)
    write_json(args.out, dict(load_avg=os.getloadavg(), torch=torch.__version__, rows=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
