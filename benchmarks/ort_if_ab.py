"""Does the export's top-level If cost decode time in ONNX Runtime? The exported model.onnx
against the same graph with its one-token branch promoted to the top level (no If; one token
only; timing only) and, with --seq-cond, against the If on `seq == 1` alone (the condition before
the all-ones mask test was added: And(Equal(seq, 1), ReduceMin(mask) == 1) needs the mask's
values, which on the CUDA provider live on the device, where the If's condition must be read on
the host). Decode through the ONNX Runner (IO binding, state kept where the provider keeps it),
interleaved rounds in one process; 130m-shaped random models (cpu_backends.py's shapes). Prints
medians and the per-round ratios, writes JSON.

    python benchmarks/ort_if_ab.py --threads 2 [--provider cpu|cuda] [--archs mamba1,mamba2] [--seq-cond] --out FILE
"""

from __future__ import annotations

import argparse
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
from mamba_deploy.export.onnx import file_record  # noqa: E402

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
    _save_with_manifest(out, dst)
    return dst


def seq_cond_only(src: Path, dst: Path) -> Path:
    """A copy of the export folder whose If reads `seq == 1` alone (the And's first input); the
    mask test's nodes are dropped. Wrong for a padded one-token prompt: timing only."""
    import onnx

    shutil.copytree(src, dst)
    m = onnx.load(str(src / "model.onnx"))
    g = m.graph
    (node,) = [n for n in g.node if n.op_type == "If"]
    (cond,) = [n for n in g.node if n.output[0] == node.input[0] and n.op_type == "And"]
    node.input[0] = cond.input[0]
    dead = {cond.output[0]}
    while dead:  # drop nodes nothing reads any more (the subgraphs read outer names too)
        used = {v for n in g.node for v in n.input} | _subgraph_inputs(g) | {o.name for o in g.output}
        gone = [n for n in g.node if n.output and not any(o in used for o in n.output)]
        dead = {o for n in gone for o in n.output}
        for n in gone:
            g.node.remove(n)
    _save_with_manifest(m, dst)
    return dst


def _subgraph_inputs(g) -> set[str]:
    names = set()
    for n in g.node:
        for a in n.attribute:
            if a.g.node:
                names |= {v for sn in a.g.node for v in sn.input} | _subgraph_inputs(a.g)
    return names


def _save_with_manifest(model, dst: Path) -> None:
    import onnx

    onnx.save(model, str(dst / "model.onnx"))
    manifest = json.loads((dst / "manifest.json").read_text())  # the runner checks model.onnx's hash
    manifest["files"]["model.onnx"] = file_record(dst / "model.onnx")
    (dst / "manifest.json").write_text(json.dumps(manifest))


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
    ap.add_argument("--seq-cond", action="store_true", help="also time the If on seq == 1 alone")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ort_if_ab.json"))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            work = Path(tmp) / arch
            build_checkpoint(arch, work / "hf")
            full = export_onnx(work / "hf", work / "with_if", validate=False)
            folders = {"with If": full, "step only": step_only(full, work / "step_only")}
            if args.seq_cond:
                folders["If on seq only"] = seq_cond_only(full, work / "seq_cond")
            runners = {k: open_onnx(v, providers=[PROVIDERS[args.provider]], threads=args.threads)
                       for k, v in folders.items()}
            times = {k: [] for k in runners}
            for _ in range(args.rounds):
                for k, r in runners.items():
                    times[k].append(decode_ms(r, args.steps))
            for r in runners.values():
                r.close()
            row = dict(arch=arch, provider=args.provider, threads=args.threads, rounds=args.rounds, all_ms=times)
            line = f"{arch:<7} {args.provider:<5} with If {statistics.median(times['with If']):7.2f} ms/token"
            for k in times:
                key = k.lower().replace(" ", "_")
                row[f"{key}_ms"] = statistics.median(times[k])
                if k != "with If":
                    ratio = statistics.median(b / a for a, b in zip(times["with If"], times[k]))
                    row[f"ratio_{key}_to_with_if"] = ratio
                    line += f"  {k} {row[f'{key}_ms']:7.2f} (per-round ratio {ratio:.3f})"
            rows.append(row)
            print(line, flush=True)
    write_json(args.out, dict(load_avg=os.getloadavg(), torch=torch.__version__, rows=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
