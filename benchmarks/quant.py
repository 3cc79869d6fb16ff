"""Quantization quality + speed table for the demo models (or any checkpoint folders).

For each model and method: validation perplexity and top-1 agreement with the unquantized
model (stdlib-val split of mamba_deploy.data, first --val-tokens tokens), size on disk, CPU
decode ms/token in PyTorch and (fp32 / int8 / int4) ONNX Runtime with MatMulNBits; plus the
quantized ssm-state cache (int8 / fp16) measured by token-by-token decoding.
Prints a markdown table and writes JSON.

    .venv/bin/python benchmarks/quant.py [--models models/demo-mamba1 models/demo-mamba2]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from mamba_deploy import load_model
from mamba_deploy.quant import quantize, save_quantized
from mamba_deploy.runners.torch_runner import TorchRunner

# row name -> (method, options); group 128 divides every row of the demo models (d_model 256)
METHODS = {
    "int8": ("int8", {}),
    "fp8": ("fp8", {}),
    "smoothquant": ("smoothquant", {"alpha": 0.5}),
    "int4-g128 (RTN)": ("int4", {"group_size": 128}),
    "int4-g64 asym (RTN)": ("int4", {"group_size": 64, "symmetric": False}),
    "gptq-g128": ("gptq", {"group_size": 128}),
    "gptq-g128 act-order": ("gptq", {"group_size": 128, "act_order": True}),
    "awq-g128": ("awq", {"group_size": 128}),
}
ONNX_ROWS = {"fp32": None, "int8": "int8", "int4-g128 (RTN)": "int4"}
WINDOW = 256


def val_ids(model, n: int) -> torch.Tensor:
    try:
        from mamba_deploy import data

        ids = data.encode_split(model.tokenizer, "val")[:n]
        return torch.as_tensor(ids, dtype=torch.long), "stdlib-val"
    except Exception as e:  # noqa: BLE001  (no tokenizer: byte-level stand-in for smoke runs)
        print(f"  (no tokenizer / data split: {e}; using bytes of a stdlib file)", file=sys.stderr)
        import sysconfig

        text = (Path(sysconfig.get_paths()["stdlib"]) / "calendar.py").read_bytes()[:n]
        return torch.tensor(list(text)) % model.config.vocab_size, "calendar.py bytes"


def score(runner, ids, window=WINDOW):
    """-> (ppl, argmax predictions (n-1,)) with the state carried across windows."""
    vocab = runner.vocab_size
    state, nll, preds, prev = runner.new_state(1), 0.0, [], None
    for s in range(0, ids.numel(), window):
        chunk = ids[s:s + window]
        logits, state = runner.prefill(chunk[None], state)
        logits = logits[0, :, :vocab].double()
        p = logits[:-1] if prev is None else torch.cat([prev[None], logits[:-1]])
        t = chunk[1:] if prev is None else chunk
        prev = logits[-1]
        nll -= float(torch.log_softmax(p, -1).gather(1, t[:, None]).sum())
        preds.append(p.argmax(-1))
    return math.exp(nll / (ids.numel() - 1)), torch.cat(preds)


def decode_ms(runner, n=64) -> float:
    state = runner.new_state(1)
    ids = torch.zeros(1, dtype=torch.long)
    for _ in range(8):
        _, state = runner.step(ids, state)
    t0 = time.perf_counter()
    for i in range(n):
        _, state = runner.step(ids + i % 7, state)
    return (time.perf_counter() - t0) / n * 1e3


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".onnx", ".data"))


def bench_model(path: Path, args, work: Path) -> list[dict]:
    from mamba_deploy.checkpoint import save_checkpoint

    base = load_model(path)
    ids, source = (None, "none: --speed-only") if args.speed_only else val_ids(base, args.val_tokens)
    print(f"\n{path}: {base.num_parameters() / 1e6:.2f} M params, val tokens: {source if ids is None else ids.numel()}")
    scorer = (lambda r, i: (math.nan, None)) if args.speed_only else score
    ppl0, pred0 = scorer(TorchRunner(base), ids)
    fp_dir = save_checkpoint(base, work / f"{path.name}-fp32")
    rows = [dict(model=path.name, method="fp32", ppl=ppl0, ppl_delta_pct=0.0, top1_agree=1.0,
                 bytes=dir_bytes(fp_dir), torch_ms=decode_ms(TorchRunner(base)))]
    qmodels = {}
    for name, (method, opts) in METHODS.items():
        if args.speed_only and name not in ONNX_ROWS:
            continue
        t0 = time.perf_counter()
        q = quantize(load_model(path), method, progress=False, **opts)
        qt = time.perf_counter() - t0
        out = save_quantized(q, work / f"{path.name}-{method}-{len(rows)}")
        q = load_model(out)  # measure what a user loads
        ppl, pred = scorer(TorchRunner(q), ids)
        rows.append(dict(model=path.name, method=name, ppl=ppl, ppl_delta_pct=100 * (ppl / ppl0 - 1),
                         top1_agree=math.nan if pred is None else float((pred == pred0).float().mean()),
                         bytes=dir_bytes(out),
                         torch_ms=decode_ms(TorchRunner(q)), quantize_s=qt))
        qmodels[name] = q
        print(f"  {name:<22} ppl {ppl:8.3f} ({rows[-1]['ppl_delta_pct']:+.2f}%)  agree {rows[-1]['top1_agree']:.4f}"
              f"  {rows[-1]['bytes'] / 2**20:.2f} MiB  {rows[-1]['torch_ms']:.2f} ms/tok", flush=True)
    if not args.no_onnx:
        _onnx_rows(base, qmodels, rows, work, path.name, args.threads)
    if not args.speed_only:
        rows += _state_rows(base, ids[: args.state_tokens], path.name)
    return rows


def _onnx_rows(base, qmodels, rows, work, tag, threads: int):
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.quant.onnx_nbits import export_quantized_onnx
    from mamba_deploy.runners.onnx_runner import open_onnx

    for name, qname in ONNX_ROWS.items():
        d = work / f"{tag}-onnx-{qname or 'fp32'}"
        if qname is None:
            export_onnx(base, d, validate=False)
        else:
            export_quantized_onnx(qmodels[name], d, validate=False)
        r = open_onnx(d, threads=threads)  # as the torch rows: --threads
        row = next(x for x in rows if x["method"] == name and x["model"] == tag)
        row["onnx_ms"], row["onnx_bytes"] = decode_ms(r), dir_bytes(d)
        r.close()


def _state_rows(base, ids, tag):
    """ssm-state cache: token-by-token decoding (state rounded after every token)."""
    from mamba_deploy.quant.state_cache import QuantizedStateRunner

    ref_ppl, ref_pred = score(TorchRunner(base), ids, window=1)
    out = []
    for kind in ("fp16", "int8"):
        r = QuantizedStateRunner(base, kind)
        ppl, pred = score(r, ids, window=1)
        out.append(dict(model=tag, method=f"fp32 weights, {kind} ssm state (decode)", ppl=ppl,
                        ppl_delta_pct=100 * (ppl / ref_ppl - 1), top1_agree=float((pred == ref_pred).float().mean()),
                        state_bytes=r.new_state(1).nbytes, state_bytes_fp32=base.new_state(1).nbytes,
                        ref_ppl_decode=ref_ppl))
    return out


def table(rows) -> str:
    head = "| model | method | val ppl | Δppl vs fp32 | top-1 agree | size (MiB) | torch decode ms/tok | ORT size (MiB) | ORT decode ms/tok |"
    lines = [head, "|" + "---|" * 9]
    f = lambda v, fmt: (fmt.format(v) if v is not None else "")  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['ppl']:.3f} | {r['ppl_delta_pct']:+.2f}% | "
                     f"{r['top1_agree']:.4f} | {f(r.get('bytes') and r['bytes'] / 2**20, '{:.2f}')} | "
                     f"{f(r.get('torch_ms'), '{:.2f}')} | {f(r.get('onnx_bytes') and r['onnx_bytes'] / 2**20, '{:.2f}')} | "
                     f"{f(r.get('onnx_ms'), '{:.2f}')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["models/demo-mamba1", "models/demo-mamba2"])
    ap.add_argument("--val-tokens", type=int, default=16384)
    ap.add_argument("--state-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--speed-only", action="store_true", help="fp32 / int8 / int4 size and decode speed only")
    ap.add_argument("--out", default="benchmarks/results/quant.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as work, torch.inference_mode():
        for m in args.models:
            if not (Path(m) / "config.json").exists():
                print(f"skipping {m}: no config.json (model not trained yet?)", file=sys.stderr)
                continue
            rows += bench_model(Path(m), args, Path(work))
            write(rows, args)  # after each model, so a long run that is cut short keeps its results
    print("\n" + table(rows))


def write(rows, args):
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, python=platform.python_version(), threads=args.threads,
                machine=platform.machine(), val_tokens=args.val_tokens, window=WINDOW,
                command=" ".join(sys.argv))
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows, "table": table(rows)}, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
