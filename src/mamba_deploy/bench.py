"""`mamba-deploy bench`: latency, throughput and peak memory of any backend, through the Runner
interface only (so a backend added later is benchmarked for free).

For every artifact x batch x prompt length: `warmup` untimed runs, then `repeats` timed runs of
one prefill (last-position logits only, as generation does) followed by `gen_len` greedy decode
steps. Writes results.json, results.md and two PNG plots into --out.
"""

from __future__ import annotations

import io
import numbers
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from .argtypes import int_list, nonnegative_int, positive_int, positive_int_list, seed, torch_generator
from .atomic import check_writable, json_text, write_files
from .errors import ConfigError, IncompleteRunError, MambaDeployError, OutputPathError
from .extras import install_hint

SCHEMA = "mamba-deploy-bench/1"
# One row of `results` in results.json (times in milliseconds, memory in bytes; None = unknown).
RESULT_KEYS = ("artifact", "backend", "batch", "prompt_len", "gen_len", "repeats", "prefill_ms",
               "decode_ms_per_token", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes",
               "peak_rss_scope", "rss_at_open_bytes", "peak_cuda_bytes")
STAT_KEYS = ("median", "p95")  # prefill_ms and decode_ms_per_token are {median, p95}
OUTPUT_FILES = {"json": "results.json", "markdown": "results.md",
                "throughput_plot": "throughput_vs_batch.png", "latency_plot": "latency_vs_prompt_len.png"}


# ----------------------------------------------------------------------------- measuring

def percentile(values, q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between closest ranks."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def cuda_device(runner) -> torch.device | None:
    """The CUDA device whose allocations are this runner's (a torch model's, the TensorRT
    engine's buffers), or None: a CPU runner has no CUDA peak, whatever an earlier target left
    allocated on the GPU."""
    for dev in (getattr(getattr(runner, "model", None), "device", None), getattr(runner, "device", None)):
        if isinstance(dev, torch.device) and dev.type == "cuda":
            return dev
    return None


def reset_peak_memory(cuda: torch.device | None = None) -> str:
    """Reset the peak-RSS counter where Linux lets us (clear_refs 5), and `cuda`'s peak; returns
    the scope the next RSS reading covers: 'since reset' or 'process lifetime'."""
    if cuda is not None:
        torch.cuda.reset_peak_memory_stats(cuda)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "since reset"
    except OSError:
        return "process lifetime"


def peak_memory(cuda: torch.device | None = None) -> tuple[int | None, int | None]:
    """(peak resident set size of this process, peak bytes allocated on `cuda`, None without)."""
    rss = _proc_status_bytes("VmHWM")
    if rss is None:
        try:  # no /proc (macOS): the lifetime peak, in bytes on macOS and kB elsewhere
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss = peak if sys.platform == "darwin" else peak * 1024
        except (ImportError, OSError):
            rss = None
    return rss, None if cuda is None else int(torch.cuda.max_memory_allocated(cuda))


def _timed_run(runner, ids: torch.Tensor, gen_len: int) -> tuple[float, list[float]]:
    """One prefill + gen_len greedy steps -> (prefill seconds, [seconds per step]). Runners hand
    back CPU tensors, so each call has finished (device synchronised) when it returns."""
    vocab = runner.vocab_size
    state = runner.new_state(ids.shape[0])
    t0 = time.perf_counter()
    logits, state = runner.prefill(ids, state, last_only=True)
    prefill_s = time.perf_counter() - t0
    nxt, steps = logits[:, -1, :vocab].argmax(-1), []
    for _ in range(gen_len):
        t0 = time.perf_counter()
        logits, state = runner.step(nxt, state)
        steps.append(time.perf_counter() - t0)
        nxt = logits[:, :vocab].argmax(-1)
    return prefill_s, steps


def _check_count(name: str, value, low: int = 1) -> None:
    """ConfigError unless `value` (an int, or a non-empty list of them: batches, prompt_lens) is
    a whole number >= low (Python API: a float batch was truncated, repeats=0 failed in
    statistics.median)."""
    many = isinstance(value, list)
    if many and not value:
        raise ConfigError(f"{name} must be >= {low} (integers), got an empty list; give at least one value")
    for v in value if many else [value]:
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < low:
            raise ConfigError(f"{name} must be >= {low} ({'integers' if many else 'an integer'}), got {value!r:.60}")


def bench_config(runner, batch: int, prompt_len: int, gen_len: int, warmup: int = 1, repeats: int = 3,
                 seed: int = 0, tick=None, rss_at_open: int | None = None) -> dict:
    """Measure one (batch, prompt length) setting; `tick()` is called after every run.
    rss_at_open: the process's resident bytes before this target opened (run_bench), recorded
    beside the peak: the peak also holds what earlier targets left (libraries, allocator pools)."""
    for name, value, low in (("batch", batch, 1), ("prompt_len", prompt_len, 1), ("gen_len", gen_len, 0),
                             ("warmup", warmup, 0), ("repeats", repeats, 1)):
        _check_count(name, value, low)
    gen = torch_generator(seed)
    ids = torch.randint(0, runner.vocab_size, (batch, prompt_len), generator=gen)
    cuda = cuda_device(runner)
    scope = reset_peak_memory(cuda)
    prefills, steps = [], []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            p, s = _timed_run(runner, ids, gen_len)
            if i >= warmup:
                prefills.append(p * 1e3)
                steps.extend(x * 1e3 for x in s)
            if tick:
                tick()
    rss, cuda_peak = peak_memory(cuda)
    pre = {"median": statistics.median(prefills), "p95": percentile(prefills, 95)}
    dec = {"median": statistics.median(steps), "p95": percentile(steps, 95)} if steps else None
    return dict(batch=batch, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats, prefill_ms=pre,
                decode_ms_per_token=dec,
                prefill_tokens_per_s=batch * prompt_len / (pre["median"] / 1e3),
                decode_tokens_per_s=batch / (dec["median"] / 1e3) if dec else None,
                peak_rss_bytes=rss, peak_rss_scope=scope, rss_at_open_bytes=rss_at_open, peak_cuda_bytes=cuda_peak)


# ----------------------------------------------------------------------------- targets

def parse_targets(artifacts, backends=None) -> list[tuple[str, str]]:
    """Artifacts (each may be comma-separated) paired with backends: one backend per artifact,
    one backend for all, several backends on one artifact, or guessed from each path."""
    from .runners import BACKENDS, fold_backend, guess_backend

    paths = [p.strip() for a in artifacts for p in str(a).split(",") if p.strip()]
    names = [fold_backend(b) for b in (backends or []) if b.strip()]
    if not paths:
        raise ConfigError("no model or artifact given; pass a checkpoint folder, ONNX folder or .gguf file")
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise ConfigError(f"unknown backend {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if not names:
        return [(p, guess_backend(p)) for p in paths]
    if len(names) == len(paths):
        return list(zip(paths, names))
    if len(paths) == 1:
        return [(paths[0], b) for b in names]
    if len(names) == 1:
        return [(p, names[0]) for p in paths]
    raise ConfigError(f"{len(paths)} artifacts but {len(names)} backends ({', '.join(names)}); give one "
                      "backend per artifact, a single backend, or leave --backends out to guess from paths")


def _system_info() -> dict:
    info = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), python=platform.python_version(),
                torch=torch.__version__, cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return info


def run_bench(targets, batches, prompt_lens, gen_len: int, warmup: int = 1, repeats: int = 3, seed: int = 0,
              progress: bool = True, open_options: dict | None = None, threads: int | None = None,
              backend_options: dict | None = None) -> dict:
    """Benchmark every (artifact, backend) target; a target that cannot be opened or run (a
    typed error, the backend runtime's own, out of memory) is kept with its error and the rows it
    measured before, so the rest still get measured. open_options: the torch targets' (device,
    dtype, ...); backend_options: backend name -> another backend's own (OpenVINO's device)."""
    from tqdm.auto import tqdm

    from .runners import open_runner

    batches, prompt_lens = list(batches), list(prompt_lens)
    for name, value, low in (("batches", batches, 1), ("prompt_lens", prompt_lens, 1), ("gen_len", gen_len, 0),
                             ("warmup", warmup, 0), ("repeats", repeats, 1)):
        _check_count(name, value, low)
    targets = list(targets)
    bad = next((t for t in targets if not (isinstance(t, (tuple, list)) and len(t) == 2)), None)
    if bad is not None or not targets:  # a bare path was unpacked into its characters
        raise ConfigError(f"targets are (artifact, backend) pairs, got {bad if targets else targets!r:.80}; build "
                          "them with parse_targets([path, ...], [backend, ...])")
    per_target = len(batches) * len(prompt_lens) * (warmup + repeats)
    data = dict(schema=SCHEMA, settings=dict(batches=batches, prompt_lens=prompt_lens, gen_len=gen_len,
                                             warmup=warmup, repeats=repeats, seed=seed, threads=threads),
                system=_system_info(), targets=[], results=[])
    with tqdm(total=len(targets) * per_target, desc="bench", disable=not progress, unit="run") as bar:
        for path, backend in targets:
            entry = dict(artifact=str(path), backend=backend, error=None)
            data["targets"].append(entry)
            done_before = bar.n
            try:
                own = (open_options if backend == "torch" else (backend_options or {}).get(backend)) or {}
                opts = {"threads": threads, **own}
                # what ran: another --dtype or device is another benchmark
                entry.update({k: str(v).removeprefix("torch.") for k, v in own.items()})
                at_open = _proc_status_bytes("VmRSS")
                with open_runner(path, backend, **opts) as runner:
                    if backend == "torch":  # its --threads are set by the open (process-wide)
                        entry["torch_threads"] = torch.get_num_threads()
                    tp = getattr(getattr(runner, "model", None), "tp", None)
                    if tp is not None:  # what ran: the ranks it was sharded over
                        entry["tensor_parallel"] = tp.world
                    for b in batches:
                        for length in prompt_lens:
                            bar.set_postfix_str(f"{backend} b={b} l={length}")
                            row = bench_config(runner, b, length, gen_len, warmup, repeats, seed, bar.update, at_open)
                            data["results"].append(dict(artifact=str(path), backend=backend, **row))
            except Exception as e:  # noqa: BLE001  (sorted by _target_failure: a bug is raised)
                if not _target_failure(e) or opts.get("tensor_parallel"):
                    # a bug; or a sharded run, whose other ranks wait for this one in an all-reduce:
                    # the run ends (torchrun stops them)
                    raise
                entry["error"] = f"{type(e).__name__}: {e}"
                bar.update(done_before + per_target - bar.n)
    return data


# the packages whose own exception classes (not RuntimeError subclasses: ONNX Runtime's Fail,
# InvalidArgument, ...) report a failed run of their backend
RUNTIME_PACKAGES = ("onnxruntime", "openvino", "tensorrt", "llama_cpp")


def _target_failure(e: Exception) -> bool:
    """An error that ends one target's measurements (kept with it): a typed error, running out of
    memory, or a backend runtime's own error. Anything else is a bug, raised with its traceback."""
    return (isinstance(e, (MambaDeployError, MemoryError, RuntimeError))
            or type(e).__module__.split(".")[0] in RUNTIME_PACKAGES)


# ----------------------------------------------------------------------------- reporting

def _label(row, names: dict | None = None) -> str:
    """A target's name in tables and plots: its file or folder name, or a longer tail of its path
    where that name is shared by another target of the run (`names`: short_names(data))."""
    name = (names or {}).get(row["artifact"]) or Path(row["artifact"]).name or row["artifact"]
    return f"{name} ({row['backend']})"


def short_names(data: dict) -> dict:
    """artifact -> the shortest path tail that no other target of the run shares."""
    paths = sorted({t["artifact"] for t in data["targets"]})
    out = {}
    for p in paths:
        parts = Path(p).parts or (p,)
        for n in range(1, len(parts) + 1):
            tail = str(Path(*parts[-n:]))
            if all(Path(q).parts[-n:] != parts[-n:] for q in paths if q != p):
                break
        out[p] = tail
    return out


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(data: dict) -> str:
    s, names = data["settings"], short_names(data)
    lines = ["# mamba-deploy bench", "",
             f"gen_len {s['gen_len']}, warmup {s['warmup']}, repeats {s['repeats']}, "
             f"threads {s.get('threads') or 'backend default'}; "
             f"{data['system']['processor']}, {data['system']['cpu_count']} CPUs, torch {data['system']['torch']}"
             + (f", {data['system']['cuda']}" if data["system"]["cuda"] else "")
             + "".join(f"; {_label(t, names)} sharded over {t['tensor_parallel']} ranks" for t in data["targets"]
                       if t.get("tensor_parallel")), "",
             "| target | batch | prompt | prefill ms (median / p95) "
             "| decode ms/token of each sequence = ms/step (median / p95) "
             "| prefill tok/s | decode tok/s | peak RSS MiB (+ above the RSS before the target opened) | peak CUDA MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    mib = 1024 ** 2
    for r in data["results"]:
        dec = r["decode_ms_per_token"] or {"median": None, "p95": None}
        lines.append(
            f"| {_label(r, names)} | {r['batch']} | {r['prompt_len']} | {_fmt(r['prefill_ms']['median'], '.2f')} / "
            f"{_fmt(r['prefill_ms']['p95'], '.2f')} | {_fmt(dec['median'], '.2f')} / {_fmt(dec['p95'], '.2f')} "
            f"| {_fmt(r['prefill_tokens_per_s'])} | {_fmt(r['decode_tokens_per_s'])} "
            f"| {_rss_cell(r, mib)} "
            f"| {_fmt(r['peak_cuda_bytes'] and r['peak_cuda_bytes'] / mib)} |")
    failed = [t for t in data["targets"] if t["error"]]
    if failed:
        lines += ["", "Not measured:"] + [f"- {t['artifact']} ({t['backend']}): {t['error']}" for t in failed]
    return "\n".join(lines) + "\n"


def _rss_cell(r: dict, mib: int) -> str:
    peak, base = r.get("peak_rss_bytes"), r.get("rss_at_open_bytes")
    if peak is None:
        return "-"
    return _fmt(peak / mib) + ("" if base is None else f" (+{_fmt(max(peak - base, 0) / mib)})")


def _plot(data: dict, x_key: str, y_fn, series_key: str, title: str, xlabel: str, ylabel: str):
    # a bare Figure + Agg canvas: no pyplot global state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series, names = {}, short_names(data)
    for r in data["results"]:
        y = y_fn(r)
        if y is not None:
            series.setdefault(f"{_label(r, names)} {series_key}={r[series_key]}", []).append((r[x_key], y))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    xs = sorted({r[x_key] for r in data["results"]})
    if len(xs) > 1 and xs[-1] / xs[0] >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])  # the measured settings only, no fractional batches
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _check_out_dir(out_dir) -> Path:
    """--out is (or can become) a writable folder; checked without creating anything, so a run
    that then measures nothing leaves no trace."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the bench results")
    base = out if out.exists() else next(p for p in out.parents if p.exists())
    if not base.is_dir():
        raise OutputPathError(f"cannot create --out {out}: {base} is a file; choose a folder under a writable one")
    check_writable(base, f"cannot write the bench results under {base}", "choose --out under a writable folder")
    return out


def no_plots_note() -> str | None:
    """Why bench writes no plots (matplotlib missing: the tables are still written), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("matplotlib is not installed: bench writes results.json and results.md, no plots; "
                f"{install_hint('matplotlib')}")
    return None


def write_outputs(data: dict, out_dir) -> dict:
    """results.json, results.md and the two plots (when matplotlib is there) into out_dir -> {kind: path}."""
    out = _check_out_dir(out_dir)
    contents = {"json": json_text(data).encode(), "markdown": markdown_table(data).encode()}
    note = no_plots_note()
    if note is None:
        # every file is rendered before the first is replaced, so a failure while drawing leaves the
        # previous run's set whole instead of new tables beside old plots
        thr = _plot(data, "batch", lambda r: r["decode_tokens_per_s"], "prompt_len",
                    f"decode throughput vs batch (gen_len {data['settings']['gen_len']})", "batch size", "tokens / s")
        lat = _plot(data, "prompt_len", lambda r: r["prefill_ms"]["median"], "batch",
                    "prefill latency vs prompt length", "prompt length (tokens)", "prefill latency, median (ms)")
        contents.update(throughput_plot=_png(thr), latency_plot=_png(lat))
    else:
        warnings.warn(note, stacklevel=2)
    # a new folder appears complete or not at all (write_files); into an existing one,
    # all written in full under temporary names before the first is renamed into place: a
    # failure while writing leaves the previous run's set whole, never new tables beside old plots
    write_files(out, {OUTPUT_FILES[k]: contents[k] for k in contents})
    for k in OUTPUT_FILES.keys() - contents.keys():  # an earlier run's plots are not this run's
        (out / OUTPUT_FILES[k]).unlink(missing_ok=True)
    return {k: out / OUTPUT_FILES[k] for k in contents}


# ----------------------------------------------------------------------------- CLI

def cmd_bench(args):
    from .cli import quiet_rank, refuse_torch_only, torch_options
    from .runners import OPTIONS

    backends = [b for spec in (args.backends or []) for b in spec.split(",")]
    targets = parse_targets(args.models, backends or None)
    others = sorted({b for _, b in targets} - {"torch"})
    backend_options = {}
    if len(others) == len({b for _, b in targets}):  # no torch target
        # a flag no target takes is refused, not ignored; the torch flags another backend takes
        # (--device for OpenVINO and TensorRT) are its own here, where no torch target takes them
        # (the backends share no device name but cpu)
        taken = refuse_torch_only(args, f"no target runs on the torch backend ({', '.join(others)})", others)
        backend_options = {b: {k: v for k, v in taken.items() if k in OPTIONS[b]} for b in others}
    if args.tensor_parallel and len(targets) > 1:  # each sharded runner would open and close the group
        raise ConfigError("--tensor-parallel benchmarks one model on the torch backend, got "
                          + ", ".join(f"{p} ({b})" for p, b in targets) + "; run bench once per model")
    quiet = quiet_rank(args)
    batches, prompt_lens = int_list(args.batch, "--batch", "1,8"), int_list(args.prompt_len, "--prompt-len", "128,512")
    # what would stop the writing is reported before minutes of measuring, not after
    _check_out_dir(args.out)
    data = run_bench(targets, batches, prompt_lens, args.gen_len, args.warmup, args.repeats, args.seed,
                     progress=not (args.quiet or quiet), open_options=torch_options(args), threads=args.threads,
                     backend_options=backend_options)
    errors = [t for t in data["targets"] if t["error"]]
    if not data["results"]:
        # results of an earlier run in --out stay as they were: an empty table is not a result
        raise ConfigError("no target could be benchmarked, nothing was written to "
                          f"{args.out}: " + _failures(errors)
                          + ". Check each path and its --backends")
    if quiet:  # rank 0 writes the files; every rank measured the same sharded model
        return
    paths = write_outputs(data, args.out)
    print(markdown_table(data))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if errors:  # after the table and files: what was measured is kept, the exit status says what is missing
        part = sum(any(r["artifact"] == t["artifact"] and r["backend"] == t["backend"] for r in data["results"])
                   for t in errors)
        kept = f" ({part} stopped part-way; the rows measured before are kept)" if part else ""
        raise IncompleteRunError(f"{len(errors)} of {len(data['targets'])} targets failed{kept}: {_failures(errors)}. "
                                 f"What was measured is in {args.out}; check each failed path and its --backends, "
                                 "or lower --batch / --prompt-len where one ran out of memory")


def _failures(targets) -> str:
    return "; ".join(f"{t['artifact']} ({t['backend']}): {t['error']}" for t in targets)


def register(subparsers) -> None:
    from .cli import DTYPES, add_state_dtype, add_tensor_parallel, add_threads

    s = subparsers.add_parser("bench", help="latency / throughput / peak memory of one or more backends")
    s.add_argument("models", nargs="+", metavar="MODEL_OR_ARTIFACT",
                   help="checkpoint folder, ONNX folder, .gguf, ... (comma-separated or repeated)")
    s.add_argument("--backends", action="append", default=None,
                   help="torch,onnx,llama.cpp,... (default: guessed from each path)")
    s.add_argument("--batch", type=positive_int_list, default="1,8",
                   help="batch sizes, comma-separated integers >= 1; each is run with every --prompt-len (default 1,8)")
    s.add_argument("--prompt-len", type=positive_int_list, default="128,512",
                   help="prompt lengths in tokens (random token ids), comma-separated integers >= 1 (default 128,512)")
    s.add_argument("--gen-len", type=nonnegative_int, default=128,
                   help="greedy decode steps timed after each prefill (0 = prefill only, no decode figures; default 128)")
    s.add_argument("--warmup", type=nonnegative_int, default=1,
                   help="untimed runs (prefill + decode) before the timed ones, per batch and prompt length (default 1)")
    s.add_argument("--repeats", type=positive_int, default=3,
                   help="timed runs per batch and prompt length; the medians and p95 are over these (default 3)")
    s.add_argument("--seed", type=seed, default=0, help="seed of the random prompt token ids")
    s.add_argument("--device", default="cpu", help="device for the torch backend")
    s.add_argument("--dtype", default="fp32", type=str.lower, choices=sorted(DTYPES), help="dtype for the torch backend")
    add_state_dtype(s)
    add_threads(s)
    add_tensor_parallel(s, "bench")
    s.add_argument("--out", default="bench-results", help="folder for results.json, results.md and plots (default bench-results)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_bench)
