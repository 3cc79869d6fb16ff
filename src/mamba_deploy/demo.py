"""`mamba-deploy demo`: the whole toolkit, offline, on the two shipped demo models.

For each model: load it, generate a few completions, then build every deployment format in
FORMATS, run it through the Runner interface on a validation snippet, and compare it with the
PyTorch fp32 reference (top-1 agreement, max relative logit error, perplexity ratio, and how
many greedy tokens come out the same before the first difference). One summary table at the
end; any parity failure makes the command exit non-zero.
A format whose module (or optional dependency) is missing is listed as "not available".
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import (output_path, prepare_output_dir, prepare_output_file, refuse_input_file, remove_stale_temps,
                     temp_owner, write_json)
from .errors import BackendUnavailableError, ConfigError, ModelNotFoundError, OutputPathError
from .extras import PACKAGES, install_hint, top_level

DEMO_MODELS = ("demo-mamba1", "demo-mamba2")
PROMPTS = ("def fibonacci(n):\n", "import os\n\n\nclass ", "    for i in range(")
SNIPPET_TOKENS = 384  # validation tokens scored per format
WINDOW = 128  # prefill window; several windows so the carried state is exercised
DECODE_TOKENS = 24  # greedy decode steps timed per format
SCRATCH_NAME = "mamba-demo"  # the artifacts' folder under $TMPDIR without --out
# tolerance rows: max relative logit error, min top-1 agreement, max |ppl / ppl_ref - 1|,
# min share of the greedy tokens that match the reference's before the first difference (free-running
# decodes part for good at the first near-tie that rounds the other way). fp32 follows CONTRIBUTING (1e-4);
# 8-bit rows are loose enough for a trained model and tight enough to catch a broken one.
TOLERANCE = {
    "ref": dict(logits_rel=0.0, top1=1.0, ppl_rel=0.0, greedy=1.0),
    "fp32": dict(logits_rel=1e-4, top1=0.99, ppl_rel=1e-3, greedy=0.9),
    "int8": dict(logits_rel=5e-2, top1=0.90, ppl_rel=3e-2, greedy=0.0),  # verify.py's int8 row
}


# ----------------------------------------------------------------------------- format steps
# Each builder takes (model, model_dir, work_dir, threads=None) and returns (runner, artifact path);
# threads: CPU threads of the runner it opens (None: the backend's default).

def build_torch(model, model_dir, work, threads=None):
    from .runners.torch_runner import TorchRunner

    return TorchRunner(model), Path(model_dir)


def build_onnx(model, model_dir, work, threads=None):
    from .export.onnx import export_onnx
    from .runners import open_runner

    out = export_onnx(model, work / "onnx", dtype="fp32", validate=False)
    return open_runner(out, "onnx", threads=threads), out


def _gguf(outtype):
    def build(model, model_dir, work, threads=None):
        from .export.gguf import export_gguf
        from .runners import open_runner

        path = export_gguf(model, work / f"model-{outtype}.gguf", outtype=outtype)
        try:
            return open_runner(path, "llama.cpp", threads=threads), path
        except BackendUnavailableError as e:
            # No llama.cpp here: still check the file itself, read back by our GGUF importer.
            from .checkpoint import load_model
            from .runners.torch_runner import TorchRunner

            return TorchRunner(load_model(path)), path, f"gguf_import+torch ({e})"
    return build


def build_quant_int8(model, model_dir, work, threads=None):
    from .checkpoint import load_model
    from .quant import quantize, save_quantized
    from .runners.torch_runner import TorchRunner

    q = quantize(load_model(model_dir), "int8")
    out = save_quantized(q, work / "int8")
    return TorchRunner(load_model(out)), out  # loaded back from disk: the artifact is what is tested


# (format, backend, builder, tolerance row)
FORMATS = [
    ("safetensors fp16->fp32", "torch", build_torch, "ref"),
    ("onnx fp32", "onnxruntime", build_onnx, "fp32"),
    ("gguf f32", "llama.cpp", _gguf("f32"), "fp32"),
    ("gguf q8_0", "llama.cpp", _gguf("q8_0"), "int8"),
    ("int8 weight-only", "torch", build_quant_int8, "int8"),
]


@dataclass
class Row:
    model: str
    format: str
    backend: str
    status: str = "ok"  # ok | FAIL | not available | error
    size: int | None = None
    ppl: float | None = None
    top1: float | None = None
    logits_rel: float | None = None
    greedy: float | None = None
    ms_per_token: float | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- measuring

def greedy_decode(runner, prompt_ids: list[int], n: int):
    """-> (n greedy tokens, ms per decode step). Only the step calls are timed."""
    vocab = runner.vocab_size
    state = runner.new_state(1)
    logits, state = runner.prefill(torch.tensor([prompt_ids]), state, last_only=True)
    nxt = logits[:, -1, :vocab].argmax(-1)  # (1,)
    out, spent = [], 0.0
    for _ in range(n):
        out.append(int(nxt))
        t0 = time.perf_counter()
        logits, state = runner.step(nxt, state)
        spent += time.perf_counter() - t0
        nxt = logits[:, :vocab].argmax(-1)
    return out, 1000 * spent / n


def measure(runner, ids, prompt_ids) -> dict:
    from .eval import perplexity

    res = perplexity(runner, ids, window=WINDOW, keep_logits=True)
    res["greedy"], res["ms_per_token"] = greedy_decode(runner, prompt_ids, DECODE_TOKENS)
    return res


def compare(row: Row, ref: dict, got: dict, tol: dict) -> None:
    """Fill row's parity columns; status FAIL when any exceeds its tolerance."""
    r, a = ref["logits"].double(), got["logits"].double()  # (n, V)
    row.logits_rel = float((a - r).abs().max() / r.abs().max())
    row.top1 = float((a.argmax(-1) == r.argmax(-1)).double().mean())
    same = next((i for i, (x, y) in enumerate(zip(got["greedy"], ref["greedy"])) if x != y), len(ref["greedy"]))
    row.greedy = same / len(ref["greedy"])
    ppl_rel = abs(got["ppl"] / ref["ppl"] - 1)
    checks = [("logits_rel", row.logits_rel <= tol["logits_rel"]), ("top1", row.top1 >= tol["top1"]),
              ("ppl_rel", ppl_rel <= tol["ppl_rel"]), ("greedy", row.greedy >= tol["greedy"])]
    failed = [name for name, ok in checks if not ok]
    if failed:
        row.status = "FAIL"
        row.notes.append(f"over tolerance: {', '.join(failed)} (ppl_rel {ppl_rel:.2e}; limits {tol})")


def _reference_label(model_dir: Path, files) -> str:
    """The reference row's format as stored: "safetensors fp16->fp32" for the shipped models."""
    from .checkpoint import stored_dtypes
    from .tolerances import dtype_label

    kind = "safetensors" if files[0].suffix == ".safetensors" else "pytorch .bin"
    stored = dtype_label(stored_dtypes(model_dir)[0])  # fp16 / bf16, else fp32
    return f"{kind} {stored}->fp32" if stored != "fp32" else f"{kind} fp32"


# files of an output folder that are not its weights (tokenizer, configs, manifest, template)
NOT_WEIGHTS = (".json", ".txt", ".jinja", ".model", ".v3")


def _size(path: Path) -> int:
    """The bytes of an artifact's weights: the file, or a folder's files less NOT_WEIGHTS, as the
    reference row counts only its weight files (the ONNX and int8 rows counted the tokenizer too)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.endswith(NOT_WEIGHTS))
    return path.stat().st_size


def validation_snippet(tokenizer, n: int) -> list[int]:
    """The first n tokens of the stdlib validation stream (this Python's files)."""
    from . import data

    ids: list[int] = []
    for text in data.corpus_texts("val"):
        ids.extend(tokenizer.encode(text) + [tokenizer.eos_token_id])
        if len(ids) >= n:
            break
    return ids[:n]


# ----------------------------------------------------------------------------- the run

def show_completions(model, log) -> None:
    from .generation import generate
    from .runners.torch_runner import TorchRunner

    res = generate(TorchRunner(model), list(PROMPTS), max_new_tokens=32)
    for prompt, text in zip(PROMPTS, res.texts):
        log(f"  --- {prompt!r}\n" + "\n".join("  | " + line for line in (prompt + text).splitlines()))


def run_format(name, backend, builder, tol_row, model, model_dir, work, ids, prompt_ids, ref, threads=None,
               label=None) -> Row:
    row = Row(label or Path(model_dir).name, name, backend)
    if tol_row == "ref":  # the reference itself: its own numbers, parity by definition
        from .checkpoint import weight_files

        files = weight_files(Path(model_dir))  # one safetensors file, shards, or a mamba_ssm .bin
        row.format = _reference_label(Path(model_dir), files)
        row.size, row.ppl, row.ms_per_token = sum(map(_size, files)), ref["ppl"], ref["ms_per_token"]
        row.top1, row.logits_rel, row.greedy = 1.0, 0.0, 1.0
        return row
    try:
        runner, path, *note = builder(model, model_dir, work, threads=threads)
        if note:  # the builder fell back to another backend: say so in the table
            row.backend = note[0].split(" ", 1)[0]
            row.notes.append(note[0])
    except ImportError as e:  # a stage not built yet, or an optional dependency (BackendUnavailableError too)
        row.status = "not available"
        missing = top_level(getattr(e, "name", None))  # a bare ModuleNotFoundError: say how to install it
        row.notes.append(f"needs {missing!r}: {install_hint(missing)}" if missing in PACKAGES
                         else f"{type(e).__name__}: {e}")
        return row
    except Exception as e:  # noqa: BLE001  (an export that breaks is a failure, reported in the table)
        row.status = "error"
        row.notes.append(f"build failed: {type(e).__name__}: {e}")
        return row
    try:
        row.size = _size(path)
        got = measure(runner, ids, prompt_ids)
        row.ppl, row.ms_per_token = got["ppl"], got["ms_per_token"]
        compare(row, ref, got, TOLERANCE[tol_row])
    except Exception as e:  # noqa: BLE001
        row.status = "error"
        row.notes.append(f"run failed: {type(e).__name__}: {e}")
    finally:
        runner.close()
    return row


def run_model(model_dir: Path, work: Path, formats, log, threads=None, label=None) -> list[Row]:
    """The rows of one model; label (default: the folder's name) names its rows and its folder
    under `work`."""
    from .checkpoint import load_model
    from .runners.torch_runner import TorchRunner

    t0 = time.perf_counter()
    model = load_model(model_dir)  # fp16 on disk -> fp32 reference
    label = label or model_dir.name
    log(f"\n== {label}: {model.config.arch}, {model.num_parameters() / 1e6:.2f} M parameters")
    show_completions(model, log)
    tok = model.tokenizer
    ids, prompt_ids = validation_snippet(tok, SNIPPET_TOKENS), tok.encode(PROMPTS[0])
    ref = measure(TorchRunner(model), ids, prompt_ids)
    rows = []
    for name, backend, builder, tol_row in formats:
        sub = work / label / name.replace(" ", "_").replace(">", "")
        sub.mkdir(parents=True, exist_ok=True)
        t1 = time.perf_counter()
        rows.append(run_format(name, backend, builder, tol_row, model, model_dir, sub, ids, prompt_ids, ref, threads,
                               label))
        log(f"  {name:<24} {rows[-1].status:<14} ({time.perf_counter() - t1:.1f} s)")
    log(f"  {label} done in {time.perf_counter() - t0:.1f} s")
    return rows


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(rows: list[Row]) -> str:
    from .progress import human_bytes

    head = ("model", "format", "backend", "size", "ppl", "top-1", "max rel err", "greedy same", "ms/token",
            "status")
    body = [(r.model, r.format, r.backend, "-" if r.size is None else human_bytes(r.size), _fmt(r.ppl, ".2f"),
             _fmt(r.top1, ".1%"), _fmt(r.logits_rel, ".1e"),
             "-" if r.greedy is None else f"{round(r.greedy * DECODE_TOKENS)}/{DECODE_TOKENS}",
             _fmt(r.ms_per_token, ".2f"), r.status) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.model} / {r.format}: {n}" for r in rows for n in r.notes]
    return "\n".join(lines + (["", "notes:"] + notes if notes else []))


def find_models(names=DEMO_MODELS) -> list[Path]:
    """models/<name> under the working directory, else beside the source tree (a checkout), else
    the copy an installed wheel carries (setup.py puts models/demo-* in mamba_deploy/demo_models)."""
    here = Path(__file__).resolve().parent
    for base in (Path.cwd() / "models", here.parents[1] / "models", here / "demo_models"):
        if all((base / n / "config.json").exists() for n in names):
            return [base / n for n in names]
    raise ModelNotFoundError(f"cannot find the demo models {', '.join(names)} under ./models, the source "
                             f"checkout or the installed package ({here / 'demo_models'}); reinstall mamba-deploy "
                             "from its wheel or run from the repository root, or pass --models DIR [DIR ...] with "
                             "checkpoint folders of your own")


def unique_labels(dirs) -> list[str]:
    """Each folder's name, with -2, -3, ... added to repeats (runA/ckpt, runB/ckpt -> ckpt, ckpt-2):
    the names label the table's rows and the models' folders under --out."""
    labels: list[str] = []
    for d in dirs:
        label, n = d.name, 2
        while label in labels:
            label, n = f"{d.name}-{n}", n + 1
        labels.append(label)
    return labels


def run_demo(model_dirs=None, out=None, only=None, log=print, threads=None) -> tuple[list[Row], bool]:
    """Returns (rows, passed). `only`: format names to run (default all). threads: CPU threads of
    every backend (torch's is process-wide); None keeps each backend's default."""
    from .runners.base import check_threads

    threads = check_threads(threads)
    if threads is not None:
        torch.set_num_threads(threads)
    dirs = [Path(d) for d in model_dirs] if model_dirs else find_models()
    from .tokenizer import load_tokenizer

    from .checkpoint import read_raw_config

    for d in dirs:
        if not (d / "config.json").exists():
            raise ModelNotFoundError(f"{d} is not a checkpoint folder (no config.json)")
        if "quantization_config" in read_raw_config(d):  # its rows would be held to the float limits
            raise ConfigError(f"{d} is a quantized checkpoint; the demo exports and checks float checkpoints: pass "
                              f"the one it was quantized from, or check it with `mamba-deploy verify FLOAT {d}`")
        # every model is prompted with text: a missing or corrupt tokenizer fails here, before the
        # earlier models' rows are built and lost with the run
        load_tokenizer(d)
    formats = [f for f in FORMATS if only is None or f[0] in only or f[2] is build_torch]
    # before any work: a file there failed mid-run with a traceback, and an earlier run's artifacts
    # failed the exports that refuse a non-empty folder after the other rows had run
    work = prepare_output_dir(out, OutputPathError) if out else _scratch_folder()
    existed = work.is_dir()
    try:
        rows = []
        for d, label in zip(dirs, unique_labels(dirs)):
            rows += run_model(d, work, formats, log, threads, label)
    except BaseException:
        if out:  # --out back as it was (absent or empty): a re-run refused a part-filled one
            _clear(work, keep_folder=existed)
        raise
    finally:
        if not out:
            shutil.rmtree(work, ignore_errors=True)
    passed = all(r.status in ("ok", "not available") for r in rows)
    return rows, passed


def _scratch_folder() -> Path:
    """The artifacts' folder without --out, named for this process: a killed run's (no cleanup
    ran; the demo's exports can be GBs for real models) is removed by the next."""
    tmp = Path(tempfile.gettempdir())
    remove_stale_temps(tmp, SCRATCH_NAME)
    return Path(tempfile.mkdtemp(prefix=f".{SCRATCH_NAME}.{temp_owner()}-", dir=tmp))


def _clear(folder: Path, keep_folder: bool) -> None:
    if not keep_folder:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def cmd_demo(args):
    t0 = time.perf_counter()
    if args.json:  # a bad path fails now, not after the whole demo has run
        refuse_input_file(args.json, args.models or find_models(), "--json", "demo.json")
        json_path = output_path(args.json).absolute()
        out_path = output_path(args.out).absolute() if args.out else None
        if out_path is not None and (json_path == out_path or out_path in json_path.parents):
            raise OutputPathError(f"--json {args.json} lies in --out {args.out}, the artifacts' folder (new or "
                                  f"empty, which the demo fills); write it beside that folder (e.g. --json demo.json)")
        prepare_output_file(args.json, example="demo.json")
    rows, passed = run_demo(args.models, args.out, args.only, threads=args.threads)
    print("\n" + format_table(rows))
    print(f"\n{'PASSED' if passed else 'FAILED'}: {sum(r.status == 'ok' for r in rows)} ok, "
          f"{sum(r.status == 'not available' for r in rows)} not available, "
          f"{sum(r.status in ('FAIL', 'error') for r in rows)} failed; {time.perf_counter() - t0:.0f} s")
    if args.json:
        write_json(args.json, [r.__dict__ for r in rows])
    if not passed:
        sys.exit(1)


def register(subparsers):
    from .cli import add_threads

    s = subparsers.add_parser("demo", help="offline end to end: generate, export every format, verify parity")
    s.add_argument("--models", nargs="+", default=None, help="checkpoint folders (default: the shipped demo models)")
    s.add_argument("--out", default=None,
                   help="new or empty folder to keep the exported artifacts in (default: a temporary folder)")
    s.add_argument("--only", nargs="+", default=None, choices=[f[0] for f in FORMATS], help="formats to run")
    add_threads(s)
    s.add_argument("--json", default=None, help="also write the table rows to this JSON file")
    s.set_defaults(func=cmd_demo)
