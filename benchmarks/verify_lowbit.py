"""Re-measure README's low-bit `mamba-deploy verify` numbers on the shipped demo models.

Every number comes from the CLI at its defaults (`mamba-deploy verify REFERENCE ARTIFACT --json`,
seed 0 unless noted; pass/fail against the limits verify picks itself):

  (a) llama.cpp quantizations: `export gguf MODEL OUT.gguf --outtype T`
      (T = q5_k_m, q4_0, q4_k_m, q3_k_m, q2_k), then `verify MODEL OUT.gguf`;
  (b) this project's: `quantize MODEL OUT --method int4 --group-size G [--asymmetric]`
      (G = 32, 64, 128), `--method gptq`, `--method awq` (built-in offline calibration text),
      then `verify MODEL OUT`;
  (c) quantized ONNX: `quantize MODEL Q --method int4|smoothquant`, `export onnx Q Q-onnx`
      (its printed validation errors at accuracy level 0 and 4 are recorded), `verify Q Q-onnx`;
  plus seeds 1-3 (`verify --seed S`) for demo-mamba2's default int4, AWQ, Q5_K_M, Q3_K_M, Q2_K.

Artifacts go to --work (a temp folder outside the repo); a step that fails is recorded with its
error and the rest continue. Prints a markdown table of every verify run, then the ranges per
README group next to README's figures, and writes JSON.

    .venv/bin/python benchmarks/verify_lowbit.py --work /tmp/vlb \
        --out benchmarks/results/verify_lowbit.json | tee benchmarks/results/verify_lowbit.log
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

GGUF_TYPES = ("q5_k_m", "q4_0", "q4_k_m", "q3_k_m", "q2_k")
# artifact name -> quantize options (the int4 default is group 128, symmetric)
QUANTS = {
    "int4-g32": ["--method", "int4", "--group-size", "32"],
    "int4-g64": ["--method", "int4", "--group-size", "64"],
    "int4-g128": ["--method", "int4"],
    "int4-g32-asym": ["--method", "int4", "--group-size", "32", "--asymmetric"],
    "int4-g64-asym": ["--method", "int4", "--group-size", "64", "--asymmetric"],
    "int4-g128-asym": ["--method", "int4", "--asymmetric"],
    "gptq": ["--method", "gptq"],
    "awq": ["--method", "awq"],
}
# quantized checkpoints exported to ONNX and verified against themselves
ONNX_FROM = {"int4-g128": None, "smoothquant": ["--method", "smoothquant"]}
EXTRA_SEEDS = (1, 2, 3)
EXTRA_SEED_MODEL = "demo-mamba2"
EXTRA_SEED_ARTIFACTS = ("int4-g128", "awq", "Q5_K_M", "Q3_K_M", "Q2_K")

# README's low-bit table ("From 5 bits down"): group -> (logits_rel, state_rel, top1, ppl_rel) as
# (lo, hi) ranges, lo None for "<= hi"
README_GROUPS = {
    "Q5_K_M": ((0.068, 0.094), (0.060, 0.196), (0.933, 0.944), (None, 0.017)),
    "Q4_0/Q4_K_M/int4/GPTQ/AWQ": ((0.113, 0.221), (0.116, 0.489), (0.840, 0.906), (None, 0.104)),
    "Q3_K_M": ((0.199, 0.461), (0.233, 0.640), (0.756, 0.802), (None, 0.090)),
    "Q2_K": ((0.343, 0.642), (0.645, 1.0), (0.550, 0.653), (0.18, 0.53)),
}
METRICS = ("logits_rel", "state_rel", "top1", "ppl_rel")


def group_of(artifact: str) -> str | None:
    if artifact == "Q5_K_M":
        return "Q5_K_M"
    if artifact in ("Q4_0", "Q4_K_M", "gptq", "awq") or artifact.startswith("int4-g") and "onnx" not in artifact:
        return "Q4_0/Q4_K_M/int4/GPTQ/AWQ"
    if artifact in ("Q3_K_M", "Q2_K"):
        return artifact
    return None


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("mamba-deploy")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mamba_deploy"]


def run(args: list[str], log: Path) -> tuple[int, str, float]:
    """Run mamba-deploy ARGS, output to LOG; -> (returncode, output, seconds)."""
    t0 = time.perf_counter()
    p = subprocess.run(cli() + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dt = time.perf_counter() - t0
    log.write_text(f"$ mamba-deploy {' '.join(args)}\n{p.stdout}\n[rc {p.returncode}, {dt:.1f} s]\n")
    return p.returncode, p.stdout, dt


def tail(text: str, n: int = 600) -> str:
    # progress bars use \r; keep the last lines only
    lines = [ln.split("\r")[-1] for ln in text.strip().splitlines()]
    return "\n".join(lines)[-n:]


def build(args: list[str], out: Path, work: Path, name: str) -> tuple[dict, str]:
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    rc, text, dt = run(args, work / f"{name}.build.log")
    rec = dict(command="mamba-deploy " + " ".join(args), rc=rc, seconds=round(dt, 2))
    if rc != 0 or not out.exists():
        rec["error"] = tail(text)
    return rec, text


def parse_onnx_validation(text: str) -> dict:
    """export onnx's printed validation blocks -> {"level_N": {"tolerance": t, "errors": {...}, "max": m}}."""
    out, cur = {}, None
    for line in text.splitlines():
        line = line.split("\r")[-1]
        m = re.match(r"ONNX validation .*accuracy_level (\d+).*tolerance ([0-9.e+-]+)", line)
        if m:
            cur = out.setdefault(f"level_{m.group(1)}", dict(tolerance=float(m.group(2)), errors={}))
            continue
        m = re.match(r"\s+(\S+(?: len=\d+)?)\s+([0-9.]+e[+-]\d+)\s*$", line)
        if cur is not None and m:
            cur["errors"][re.sub(r"\s+", " ", m.group(1))] = float(m.group(2))
        elif cur is not None and line and not line.startswith(" "):
            cur = None
    for v in out.values():
        v["max"] = max(v["errors"].values()) if v["errors"] else None
    return out


def verify(ref: Path, art: Path, work: Path, name: str, seed: int | None = None) -> dict:
    js = work / f"{name}.verify.json"
    js.unlink(missing_ok=True)
    args = ["verify", str(ref), str(art), "--quiet", "--json", str(js)]
    if seed is not None:
        args += ["--seed", str(seed)]
    rc, text, dt = run(args, work / f"{name}.verify.log")
    rec = dict(command="mamba-deploy " + " ".join(args), rc=rc, seconds=round(dt, 2),
               seed=0 if seed is None else seed)
    if not js.exists():
        rec["error"] = tail(text)
        return rec
    rep = json.loads(js.read_text())
    rec["passed"] = bool(rep["passed"])
    rec["tolerance"] = rep.get("tolerance")
    for c in rep["checks"]:
        rec[c["name"]] = c["value"]
        rec[c["name"] + "_where"] = c.get("where")
    rec["failures"] = rep.get("failures")
    return rec


def bench_model(model: Path, work: Path, rows: list, builds: list, exports: list) -> None:
    tag = model.name
    wd = work / tag
    wd.mkdir(parents=True, exist_ok=True)
    arts = {}  # artifact name -> path

    def add(artifact, rec, kind, reference=str(model)):
        rows.append(dict(model=tag, artifact=artifact, kind=kind, reference=reference, **rec))
        r = rows[-1]
        msg = r.get("error", "").splitlines()[-1:] if "error" in r else None
        print(f"  {tag} {artifact:<22} seed {r.get('seed')}: " + (
            f"ERROR {msg}" if msg is not None else
            f"logits {r['logits_rel']:.4f} state {r['state_rel']:.4f} top1 {r['top1']:.3f} "
            f"ppl {r['ppl_rel']:.4f} {'PASS' if r['passed'] else 'FAIL'}") + f" ({r['seconds']:.0f} s)",
            flush=True)

    for t in GGUF_TYPES:
        name = t.upper()
        out = wd / f"{tag}-{t}.gguf"
        b, _ = build(["export", "gguf", str(model), str(out), "--outtype", t], out, wd, name)
        builds.append(dict(model=tag, artifact=name, **b))
        if "error" in b:
            add(name, dict(error="build failed: " + b["error"], seed=0, seconds=b["seconds"]), "gguf")
            continue
        arts[name] = out
        add(name, verify(model, out, wd, name), "gguf")

    for name, opts in {**QUANTS, **{k: v for k, v in ONNX_FROM.items() if v}}.items():
        out = wd / name
        b, _ = build(["quantize", str(model), str(out), *opts], out, wd, name)
        builds.append(dict(model=tag, artifact=name, **b))
        if "error" in b:
            if name in QUANTS:
                add(name, dict(error="build failed: " + b["error"], seed=0, seconds=b["seconds"]), "checkpoint")
            continue
        arts[name] = out
        if name in QUANTS:
            add(name, verify(model, out, wd, name), "checkpoint")

    for src in ONNX_FROM:
        name = f"{src}-onnx"
        if src not in arts:
            add(name, dict(error=f"build failed: no {src} checkpoint", seed=0, seconds=0.0), "onnx", str(src))
            continue
        out = wd / name
        b, text = build(["export", "onnx", str(arts[src]), str(out)], out, wd, name)
        builds.append(dict(model=tag, artifact=name, **b))
        val = parse_onnx_validation(text)
        exports.append(dict(model=tag, artifact=name, source=src, validation=val,
                            warnings=[tail(ln, 400) for ln in text.splitlines() if ln.startswith("warning")],
                            **{k: v for k, v in b.items() if k != "command"}, command=b["command"]))
        print(f"  {tag} {name} export validation: " + ", ".join(
            f"{lv} max {v['max']:.3e} (tol {v['tolerance']:g})" for lv, v in val.items()), flush=True)
        if "error" in b:
            add(name, dict(error="build failed: " + b["error"], seed=0, seconds=b["seconds"]), "onnx", src)
            continue
        add(name, verify(arts[src], out, wd, name), "onnx", f"{src} checkpoint")

    if tag == EXTRA_SEED_MODEL:
        for name in EXTRA_SEED_ARTIFACTS:
            for s in EXTRA_SEEDS:
                if name not in arts:
                    add(name, dict(error="build failed (see seed 0)", seed=s, seconds=0.0),
                        "gguf" if name.isupper() else "checkpoint")
                    continue
                add(name, verify(model, arts[name], wd, f"{name}.seed{s}", seed=s),
                    "gguf" if name.isupper() else "checkpoint")


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def table(rows: list) -> str:
    lines = ["| model | artifact | seed | logits_rel | state_rel | top1 | ppl_rel | passed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            err = r["error"].replace("\n", " ").replace("|", "/")[-160:]
            lines.append(f"| {r['model']} | {r['artifact']} | {r['seed']} | error: {err} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['artifact']} | {r['seed']} | {r['logits_rel']:.4f} | "
                     f"{r['state_rel']:.4f} | {r['top1']:.3f} | {r['ppl_rel']:.4f} | "
                     f"{'yes' if r['passed'] else 'NO'} |")
    return "\n".join(lines)


def summary(rows: list) -> dict:
    out = {}
    for g, claim in README_GROUPS.items():
        rs = [r for r in rows if group_of(r["artifact"]) == g and "error" not in r]
        s = dict(n=len(rs), all_passed=all(r["passed"] for r in rs),
                 readme={m: list(c) for m, c in zip(METRICS, claim)})
        for m in METRICS:
            vals = [r[m] for r in rs]
            s[m] = [min(vals), max(vals)] if vals else None
        out[g] = s
    return out


def summary_table(summ: dict) -> str:
    def rng(v, spec=".3f"):
        return "n/a" if v is None else f"{v[0]:{spec}}-{v[1]:{spec}}"

    def claim(c):
        return f"<= {c[1]:g}" if c[0] is None else f"{c[0]:g}-{c[1]:g}"

    lines = ["| group | n | logits_rel (README) | state_rel (README) | top1 (README) | ppl_rel (README) | all passed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for g, s in summ.items():
        cells = [f"{rng(s[m])} ({claim(s['readme'][m])})" for m in METRICS]
        lines.append(f"| {g} | {s['n']} | " + " | ".join(cells) + f" | {'yes' if s['all_passed'] else 'NO'} |")
    return "\n".join(lines)


def export_table(exports: list) -> str:
    lines = ["| model | export | level 0 max err (tol) | level 4 max err (tol) | per output at level 4 |",
             "| --- | --- | --- | --- | --- |"]
    for e in exports:
        v = e["validation"]
        cell = lambda k: (f"{v[k]['max']:.3e} ({v[k]['tolerance']:g})" if k in v and v[k]["max"] is not None
                          else "n/a")
        per = ", ".join(f"{k} {x:.2e}" for k, x in v.get("level_4", {}).get("errors", {}).items())
        lines.append(f"| {e['model']} | {e['artifact']} | {cell('level_0')} | {cell('level_4')} | {per} |")
    return "\n".join(lines)


def versions() -> dict:
    vs = dict(python=platform.python_version(), machine=platform.machine(), cpus=os.cpu_count())
    for mod in ("mamba_deploy", "torch", "onnxruntime", "llama_cpp", "onnx"):
        try:
            m = __import__(mod)
            vs[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            vs[mod] = f"not importable: {e}"
    try:
        vs["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=Path(__file__).resolve().parent).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return vs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["models/demo-mamba1", "models/demo-mamba2"])
    ap.add_argument("--work", default="/tmp/vlb", help="folder for the artifacts (outside the repo)")
    ap.add_argument("--out", default="benchmarks/results/verify_lowbit.json")
    args = ap.parse_args()

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows, builds, exports = [], [], []
    for m in args.models:
        m = Path(m).resolve()
        if not (m / "config.json").exists():
            print(f"skipping {m}: no config.json", file=sys.stderr)
            continue
        print(f"\n{m.name}", flush=True)
        bench_model(m, work, rows, builds, exports)
    total = time.perf_counter() - t0
    summ = summary(rows)
    t_rows, t_sum, t_exp = table(rows), summary_table(summ), export_table(exports)
    print("\n" + t_rows + "\n\nRanges per README group (README's figure in brackets):\n\n" + t_sum
          + "\n\nONNX export validation (export onnx's own printout; max relative error over outputs):\n\n"
          + t_exp + f"\n\ntotal {total / 60:.1f} min")
    meta = dict(versions(), work=str(work), total_s=round(total, 1), verify_defaults="seed 0, limits from the artifact",
                note="README lines ~320-345 and the export onnx row of the command table")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from mamba_deploy.atomic import write_json  # a temporary name, then renamed

    write_json(out, dict(meta=meta, rows=rows, summary=summ, onnx_exports=exports, builds=builds,
                         table=t_rows, summary_table=t_sum, export_table=t_exp))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
