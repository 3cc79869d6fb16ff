"""Re-measure README's "### Parity" rows that the CI tests only bound (the tests assert a tolerance;
this script prints the errors themselves), on freshly built random tiny checkpoints and the shipped
demo models. No network.

Every figure is max |a - ref| / max |ref| over the compared tensor (float64 arithmetic), the same
measure as `verify` and the tests. Rows (--rows):

  onnx_fp32        ONNX fp32 export on ONNX Runtime (2 threads), Mamba1 / Falcon-Mamba / Mamba2 ngroups 1
                   and 2: prefill of 1, 7, 257, 1000 tokens at batch 1 and 3 from a zero state, then 16
                   teacher-forced steps; logits vs transformers on the whole sequence, the final state vs
                   our PyTorch model fed the same tokens (tests/test_onnx.py::
                   test_prefill_then_decode_matches_transformers, same seed).
  openvino_fp32    the same ONNX files on OpenVINO (CPU, f32 inference precision): tiny models at
                   1, 7, 33, 257 tokens, batch 3, + 8 steps vs transformers (state vs our model); the demo
                   models, 1000-token prefill + 32 steps vs our model run in float64.
  llamacpp_tiny    llama.cpp F32 / F16 GGUF of the tiny models, a (3, 29) prefill vs our PyTorch model
                   (tests/test_gguf.py::test_llamacpp_logits_match_pytorch).
  llamacpp_demo    llama.cpp on the demo models, 1024 tokens of real code (json.decoder + shutil source,
                   as tests/test_gguf.py::test_demo_q8_0_top1_and_perplexity): F32 / F16 logits error,
                   and for Q8_0 / Q4_K_M the top-1 agreement and perplexity ratio vs our fp32 model.

A backend whose package is missing, or a case that raises, is a "not measured (reason)" row.
Prints a table and writes JSON (temp name + rename):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/parity.py --out benchmarks/results/parity.json
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json.decoder
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tolerances import Models, fmt, guarded, missing, not_measured, rel_err, versions  # noqa: E402

from mamba_deploy import load_model  # noqa: E402
from mamba_deploy.atomic import write_json  # noqa: E402
from mamba_deploy.runners import open_runner  # noqa: E402
from mamba_deploy.runners.torch_runner import TorchRunner  # noqa: E402

ROWS = ("onnx_fp32", "openvino_fp32", "llamacpp_tiny", "llamacpp_demo")
KINDS = ("mamba", "falcon_mamba", "mamba2", "mamba2_g2")
DEMO = Path(__file__).resolve().parents[1] / "models"
DEMOS = ("demo-mamba1", "demo-mamba2")


def teacher_forced(runner, ids: torch.Tensor, length: int):
    """Prefill ids[:, :length] from a zero state, then step through the rest -> ((b, l, V) logits, state)."""
    got, st = runner.prefill(ids[:, :length], runner.new_state(ids.shape[0]))
    out = [got.float()]
    for t in range(length, ids.shape[1]):
        logits, st = runner.step(ids[:, t], st)
        out.append(logits.float()[:, None])
    return torch.cat(out, 1), st


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids, use_cache=False).logits.float()


def state_err(runner, st, model, ids) -> float:
    """The runner's state vs our PyTorch model's after the same tokens (conv and ssm, the worse)."""
    mine = runner.to_torch_state(st)
    with torch.no_grad():
        ref = model(ids, state=model.new_state(ids.shape[0])).state
    return max(rel_err(mine.conv, ref.conv), rel_err(mine.ssm, ref.ssm))


def lengths_vs_transformers(runner, folder, hf, lengths, batches, steps, seed) -> dict:
    """Worst logits error vs transformers and worst state error vs our model over the cases."""
    model, gen = load_model(folder), torch.Generator().manual_seed(seed)
    logits, state = [], []
    for batch in batches:
        for length in lengths:
            ids = torch.randint(0, hf.config.vocab_size, (batch, length + steps), generator=gen)
            got, st = teacher_forced(runner, ids, length)
            logits.append(rel_err(got, hf_logits(hf, ids)))
            state.append(state_err(runner, st, model, ids))
    return dict(logits=max(logits), state=max(state), cases=len(logits))


def row_onnx(m: Models) -> list:
    from mamba_deploy.runners.onnx_runner import open_onnx

    rows = []
    for kind in KINDS:
        def one(kind=kind):
            folder, hf = m.get(kind)
            with contextlib.closing(open_onnx(m.get_onnx(kind), threads=2)) as r:
                got = lengths_vs_transformers(r, folder, hf, (1, 7, 257, 1000), (1, 3), 16, seed=1)
            return [dict(row="onnx_fp32", kind=kind, backend="onnxruntime", measured=got["logits"],
                         state=got["state"], what="lengths 1/7/257/1000 x batch 1/3 + 16 steps")]
        guarded(rows, "onnx_fp32", kind, "onnxruntime", {}, one)
    return rows


def demo_text_ids(folder: Path, n: int) -> torch.Tensor:
    """(1, n) ids of real code through the demo model's own tokenizer."""
    from tokenizers import Tokenizer

    text = inspect.getsource(json.decoder) + inspect.getsource(shutil)
    return torch.tensor([Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids[:n]])


def row_openvino(m: Models) -> list:
    rows = []
    for kind in KINDS:
        def one(kind=kind):
            folder, hf = m.get(kind)
            with contextlib.closing(open_runner(str(m.get_onnx(kind)), "openvino")) as r:
                got = lengths_vs_transformers(r, folder, hf, (1, 7, 33, 257), (3,), 8, seed=43)
            return [dict(row="openvino_fp32", kind=kind, backend="openvino", measured=got["logits"],
                         state=got["state"], what="lengths 1/7/33/257 x batch 3 + 8 steps vs transformers")]
        guarded(rows, "openvino_fp32", kind, "openvino", {}, one)
    for name in DEMOS:
        def demo(name=name):
            from mamba_deploy.export.onnx import export_onnx

            folder = DEMO / name
            with contextlib.redirect_stdout(sys.stderr):
                out = export_onnx(folder, m.work / f"{name}-onnx", dtype="fp32")
            ids = torch.randint(0, load_model(folder).config.vocab_size, (1, 1032),
                                generator=torch.Generator().manual_seed(5))
            ref = TorchRunner(load_model(folder, dtype=torch.float64))
            want, want_st = teacher_forced(ref, ids, 1000)
            with contextlib.closing(open_runner(str(out), "openvino")) as r:
                got, st = teacher_forced(r, ids, 1000)
                mine = r.to_torch_state(st)
            return [dict(row="openvino_fp32", kind=name, backend="openvino", measured=rel_err(got, want),
                         state=max(rel_err(mine.conv, want_st.conv), rel_err(mine.ssm, want_st.ssm)),
                         what="1000-token prefill + 32 steps vs our model in float64")]
        guarded(rows, "openvino_fp32", name, "openvino", {}, demo)
    return rows


def row_llamacpp_tiny(m: Models) -> list:
    rows = []
    for kind in ("mamba", "mamba2", "mamba2_g2"):
        for outtype in ("f32", "f16"):
            def one(kind=kind, outtype=outtype):
                folder, _ = m.get(kind)
                ids = torch.randint(0, 128, (3, 29), generator=torch.Generator().manual_seed(2))
                ref = TorchRunner(load_model(folder))
                want, _ = ref.prefill(ids, ref.new_state(3))
                with contextlib.closing(open_runner(str(m.get_gguf(kind, outtype)), "llama.cpp", n_threads=2)) as r:
                    got, _ = r.prefill(ids, r.new_state(3))
                return [dict(row="llamacpp_tiny", kind=kind, backend=f"llama.cpp {outtype.upper()}",
                             measured=rel_err(got, want), what="(3, 29) prefill vs our PyTorch model")]
            guarded(rows, "llamacpp_tiny", kind, f"llama.cpp {outtype}", {}, one)
    return rows


def row_llamacpp_demo(m: Models) -> list:
    from mamba_deploy.export.gguf import export_gguf

    rows = []
    for name in DEMOS:
        folder = DEMO / name
        for outtype in ("f32", "f16", "q8_0", "q4_k_m"):
            def one(name=name, folder=folder, outtype=outtype):
                ids = demo_text_ids(folder, 1025)
                ref = TorchRunner(load_model(folder))
                want, _ = ref.prefill(ids[:, :-1], ref.new_state(1))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # rows K-quants keep in F16 (Mamba1's dt_rank): tested elsewhere
                    gguf = export_gguf(folder, m.work / f"{name}-{outtype}.gguf", outtype=outtype)
                with contextlib.closing(open_runner(str(gguf), "llama.cpp", n_threads=2)) as r:
                    got, _ = r.prefill(ids[:, :-1], r.new_state(1))
                target, vocab = ids[0, 1:], ref.vocab_size

                def ppl(logits):
                    return float(torch.exp(torch.nn.functional.cross_entropy(logits[0, :, :vocab].float(), target)))
                return [dict(row="llamacpp_demo", kind=name, backend=f"llama.cpp {outtype.upper()}",
                             measured=rel_err(got, want), top1=float((got.argmax(-1) == want.argmax(-1)).float().mean()),
                             ppl_ratio=ppl(got) / ppl(want), what="1024 tokens of real code vs our fp32 model")]
            guarded(rows, "llamacpp_demo", name, f"llama.cpp {outtype}", {}, one)
    return rows


RUN = {"onnx_fp32": (row_onnx, "onnx"), "openvino_fp32": (row_openvino, "openvino"),
       "llamacpp_tiny": (row_llamacpp_tiny, "llama.cpp"), "llamacpp_demo": (row_llamacpp_demo, "llama.cpp")}


def table(rows: list) -> str:
    head = f"{'row':<15}{'model':<14}{'backend':<20}{'logits rel':>12}{'state rel':>11}{'top-1':>8}{'ppl ratio':>11}  what"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["measured"] is None:
            lines.append(f"{r['row']:<15}{r['kind']:<14}{r['backend']:<20}  {r['status']}")
            continue
        top1 = f"{100 * r['top1']:.1f}%" if "top1" in r else "-"
        ppl = f"{r['ppl_ratio']:.4f}" if "ppl_ratio" in r else "-"
        lines.append(f"{r['row']:<15}{r['kind']:<14}{r['backend']:<20}{fmt(r['measured']):>12}"
                     f"{fmt(r.get('state')) if 'state' in r else '-':>11}{top1:>8}{ppl:>11}  {r['what']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--out", default="parity.json", help="JSON file to write")
    args = ap.parse_args()
    wanted = [r for r in args.rows.split(",") if r]
    bad = [r for r in wanted if r not in ROWS]
    if bad:
        ap.error(f"unknown row(s) {bad}; choose from {', '.join(ROWS)}")
    torch.manual_seed(0)
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory(prefix="parity-") as work:
        m = Models(Path(work))
        for name in wanted:
            fn, backend = RUN[name]
            reason = missing(backend)
            rows += [not_measured(name, "-", backend, reason)] if reason else fn(m)
    print(table(rows))
    write_json(args.out, dict(rows=rows, seconds=round(time.time() - t0, 1), versions=versions(),
                              command=" ".join(sys.argv)))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
