"""`mamba-deploy` command line. Core verbs live here; each later stage (export, quantize,
verify, bench, eval, train, demo) registers its own verb through `register(subparsers)` in its
module, listed in STAGE_MODULES."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
import threading
import warnings

import numpy  # noqa: F401 - before torch: torch's C startup imports numpy and swallows any exception of that
# import, a Ctrl-C included, leaving numpy half made (later: "numpy has no attribute 'multiply'")
import torch

from . import __version__
from .argtypes import (Parser, backend_choice, min_p, nonnegative_float, nonnegative_int, positive_float, positive_int, seed,
                       threads, top_p)
from .atomic import json_text, remove_created_folders
from .errors import ConfigError, MambaDeployError, ModelNotFoundError
from .extras import PACKAGES, install_hint, top_level
from .pathnames import is_gguf
from .progress import human_bytes
from .state import DTYPE_NAMES

# Modules that add top-level verbs through register(subparsers), and exporters that add
# `export <format>` through register(export_subparsers): module -> verb. A module not written
# yet is skipped; one whose optional packages are missing gets a placeholder verb that says what
# to install, and every other verb still works.
STAGE_MODULES = {"mamba_deploy.quant.cli": "quantize", "mamba_deploy.verify": "verify", "mamba_deploy.bench": "bench",
                 "mamba_deploy.eval": "eval", "mamba_deploy.train": "train", "mamba_deploy.demo": "demo",
                 "mamba_deploy.serve_cli": "serve"}
EXPORT_MODULES = {"mamba_deploy.export.onnx": "onnx", "mamba_deploy.export.gguf": "gguf",
                  "mamba_deploy.export.tensorrt": "tensorrt"}


def _missing_package(command: str | None, error: ModuleNotFoundError) -> str:
    """What to tell a user whose command (None: no verb read yet) needs a package that is not installed."""
    top = top_level(error.name)
    prog = "mamba-deploy" + (f" {command}" if command else "")
    return f"`{prog}` needs the package {top!r}, which is not installed here: {install_hint(top)}"


def _register_all(sub, modules, prefix: str = ""):
    for name, verb in modules.items():
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # the stage itself is absent, not a dependency
                continue
            _register_unavailable(sub, verb, _missing_package(prefix + verb, e))
            continue
        mod.register(sub)


def _register_unavailable(sub, verb: str, message: str) -> None:
    """A verb whose module cannot be imported here: it takes any arguments and fails with a
    typed error naming the missing package and how to install it."""
    # no option prefix: --help, -h and options before the positionals are all taken as arguments
    # (REMAINDER alone leaves a leading option to the parent parser: "unrecognized arguments")
    s = sub.add_parser(verb, help=f"(unavailable: {message})", add_help=False, prefix_chars="\0")
    s.add_argument("args", nargs=argparse.REMAINDER)

    def unavailable(args):
        from .errors import BackendUnavailableError

        raise BackendUnavailableError(message)
    s.set_defaults(func=unavailable, unavailable=message)  # cli_doc refuses to document a placeholder


DTYPES = DTYPE_NAMES
STATE_DTYPES = DTYPE_NAMES  # every verb takes the same spellings (fp32 / float32, bf16 / bfloat16, fp16 / float16)


def add_state_dtype(parser) -> None:
    parser.add_argument("--state-dtype", default="fp32", type=str.lower, choices=sorted(STATE_DTYPES),
                        help="SSM state dtype for the torch backend (bf16 / fp16: half the state memory and "
                             "bytes per decode step, one rounding of the state per token)")


def torch_options(args) -> dict:
    """Open options of the torch backend from --device / --dtype / --state-dtype (and
    --tensor-parallel where the verb has it)."""
    opts = {"device": args.device, "dtype": DTYPES[args.dtype], "state_dtype": STATE_DTYPES[args.state_dtype]}
    return opts | ({"tensor_parallel": True} if getattr(args, "tensor_parallel", False) else {})


def add_tensor_parallel(parser, verb: str) -> None:
    parser.add_argument("--tensor-parallel", action="store_true",
                        help="torch backend: shard the model over the ranks of a torchrun launch, one GPU (--device "
                             f"cuda) or CPU process each: `torchrun --nproc-per-node N -m mamba_deploy {verb} ...`; "
                             "rank 0 prints")


def other_rank(args) -> str | None:
    """Under --tensor-parallel, this process's rank as torchrun's RANK names it, unless it is rank 0
    (or the variable is unset); else None. Read from the launcher, not the process group, so that
    it holds from the start (loading, errors before the group is joined) to the end."""
    return launcher_rank() if getattr(args, "tensor_parallel", False) else None


def launcher_rank() -> str | None:
    """torchrun's RANK of this process unless it is 0 or unset; else None."""
    rank = os.environ.get("RANK", "0").strip()
    return None if rank in ("", "0") else rank


def quiet_rank(args) -> bool:
    """Under --tensor-parallel every rank computes the same result: rank 0 prints it, its progress
    and its warnings. True on another rank, whose stdout then goes nowhere (its errors still
    show on stderr, marked `rank N:`, see _rank_prefix)."""
    if other_rank(args) is None:
        return False
    sys.stdout = open(os.devnull, "w")
    warnings.simplefilter("ignore")
    return True


def add_threads(parser) -> None:
    parser.add_argument("--threads", type=threads, default=None,
                        help="CPU threads of the backend (torch, ONNX Runtime, llama.cpp, OpenVINO); default: "
                             "each backend's own (llama.cpp: one per physical core)")


def add_tokenizer(parser) -> None:
    parser.add_argument("--tokenizer", default=None, metavar="PATH_OR_HUB_ID",
                        help="tokenize with this folder / hub id's tokenizer (its tokenizer files only are fetched) "
                             "instead of the model's: state-spaces' original mamba_ssm checkpoints ship none and "
                             "use EleutherAI/gpt-neox-20b's (not with llama.cpp, whose GGUF holds its own)")


def use_tokenizer(runner, spec) -> None:
    """--tokenizer: `runner` tokenizes with `spec`'s tokenizer (see tokenizer.checked_tokenizer)."""
    if spec is None:
        return
    from .tokenizer import checked_tokenizer

    runner.set_tokenizer(checked_tokenizer(spec, runner.vocab_size, f"--tokenizer {spec}"))


# the torch backend's own flags at their defaults: anything else asks for something a backend
# that does not take the option (runners.OPTIONS) would not do
TORCH_ONLY_DEFAULTS = {"device": "cpu", "dtype": "fp32", "state_dtype": "fp32", "tensor_parallel": False}
DEVICE_HELP = ("cpu, cuda or cuda:N (torch); an OpenVINO device, CPU or GPU (--backend openvino); cuda:N "
               "(tensorrt); the other backends take none")


def refuse_torch_only(args, where: str, backend=None) -> dict:
    """ConfigError for a torch flag away from its default that the backend running instead
    (`where` says which; `backend`: its name, or the names of several that each run a target;
    None: none takes any) does not take: ignoring it would run another precision or device
    silently. -> the flags they do take, as open options."""
    from .runners import OPTIONS

    backends = [backend] if isinstance(backend, str) else list(backend or ())
    taken = {}
    for name, default in TORCH_ONLY_DEFAULTS.items():
        value = getattr(args, name, default)
        if DTYPES.get(value, value) == DTYPES.get(default, default):  # fp32 and float32 are one
            continue
        if any(name in OPTIONS[b] for b in backends):
            taken[name] = value
            continue
        flag = "--" + name.replace("_", "-")
        shown = flag if isinstance(value, bool) else f"{flag} {value}"  # a switch has no value to show
        takers = [b for b, names in OPTIONS.items() if name in names]
        raise ConfigError(f"{shown} applies to the {', '.join(takers)} backend{'s' * (len(takers) > 1)} only; "
                          f"{where}, which would ignore it and run the artifact as stored. Leave {flag} out, or "
                          "run a checkpoint folder or .gguf with --backend torch")
    return taken


def runner_options(args, torch_opts=None) -> dict:
    """open_runner options from the CLI: --threads for every backend, plus the torch backend's
    own (`torch_opts`, default torch_options(args)) when the backend is torch or left to the path.
    Another backend gets the torch flags it takes too (--device for OpenVINO and TensorRT, see
    runners.OPTIONS); one it does not take, set away from its default, is refused: ignoring it
    would run another precision or device silently."""
    from .runners import backend_name, guess_backend

    backend = backend_name(args.backend) if args.backend else guess_backend(args.model)
    opts = {"threads": args.threads}
    if backend != "torch":  # --device for the backends that take one (OpenVINO, TensorRT)
        return opts | refuse_torch_only(args, f"{args.model} runs on the {backend} backend", backend)
    return opts | (torch_options(args) if torch_opts is None else torch_opts)


def cmd_inspect(args):
    from .checkpoint import (check_depth, check_weight_headers, config_file, meta_model,
                             read_config, read_raw_config, resolve, weight_files)

    path = resolve(args.model)
    if path.is_file() and not is_gguf(path) and config_file(path.parent) is None:
        raise ModelNotFoundError(f"{path} is a file; pass the checkpoint folder or a .gguf file")
    if is_gguf(path):  # its metadata and tensor headers: no weight is dequantized
        from .export.gguf_import import open_gguf

        cfg, files = open_gguf(path)[3], [path]
    else:
        folder = path if path.is_dir() else path.parent
        cfg, files = read_config(folder), weight_files(folder)
        check_depth(folder, cfg)  # before the model is built, even on the meta device
    meta = meta_model(cfg)
    n_params = meta.num_parameters()
    if not is_gguf(path) and "quantization_config" not in read_raw_config(folder):
        check_weight_headers(folder, cfg, meta)
    info = {
        "architecture": cfg.arch + (" (falcon-mamba)" if cfg.dt_bc_rms else ""),
        "d_model": cfg.d_model, "n_layer": cfg.n_layer, "d_state": cfg.d_state, "d_inner": cfg.d_inner,
        "vocab_size": cfg.vocab_size, "padded_vocab_size": cfg.padded_vocab_size,
        "parameters": n_params,
        "bytes_on_disk": sum(f.stat().st_size for f in files),
        "state_bytes_per_sequence_fp32": cfg.state_numel() * 4,
        "tied_embeddings": cfg.tie_embeddings,
    }
    if cfg.arch == "mamba2":
        info.update(nheads=cfg.nheads, headdim=cfg.headdim, ngroups=cfg.ngroups, chunk_size=cfg.chunk_size)
    else:
        info.update(dt_rank=cfg.resolved_dt_rank)
    if args.json:
        print(json_text(info))
        return
    for k, v in info.items():
        if k in ("bytes_on_disk", "state_bytes_per_sequence_fp32"):
            v = f"{v} ({human_bytes(v)})"
        elif k == "parameters":
            v = f"{v} ({v / 1e6:.2f} M)"
        print(f"{k:>30}: {v}")


def _warn_greedy_ignores(args) -> None:
    """Sampling flags given with --temperature 0 (greedy, the default) change nothing: said, since
    a user who set --top-p or --seed expects sampling."""
    if args.temperature != 0:
        return
    given = [flag for flag, on in (("--top-k", args.top_k != 0), ("--top-p", args.top_p != 1.0),
                                   ("--min-p", args.min_p != 0.0), ("--seed", args.seed is not None)) if on]
    if given:
        warnings.warn(f"{', '.join(given)} only {'apply' if len(given) > 1 else 'applies'} when sampling; "
                      "--temperature is 0 (greedy), so they are ignored: give --temperature > 0 "
                      "(e.g. 0.7) to sample", stacklevel=2)


def cmd_generate(args):
    from .chat import read_template_file
    from .generation import TextStream, check_request, check_stop_strings, completion_texts, generate, stops_with_eos
    from .runners import open_runner

    check_stop_strings(args.stop_string)  # before any model loads (argparse checked the sampling ranges)
    if not args.chat and (args.system is not None or args.chat_template is not None):
        raise ConfigError("--system and --chat-template apply to chat prompts only; add --chat")
    template = read_template_file(args.chat_template) if args.chat_template else None
    quiet = quiet_rank(args)
    _warn_greedy_ignores(args)
    runner = open_runner(args.model, args.backend, **runner_options(args))
    use_tokenizer(runner, args.tokenizer)
    prompts, stops = list(args.prompt), args.stop
    if args.chat or stops is not None:
        stops = stops_with_eos(runner.tokenizer, stops)
    if args.chat:  # each --prompt one user turn (after --system), in the model's chat format
        from .chat import chat_ids

        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [chat_ids(runner.tokenizer, system + [{"role": "user", "content": p}], template)
                   for p in args.prompt]
    stream = len(args.prompt) == 1 and not args.json
    check_request(runner, prompts, stops, args.stop_string)  # before the prompt is echoed, not after
    if stream:
        print_text("" if args.chat else args.prompt[0], end="")
        # never prints (part of) a stop string; decoded after the prompt (a SentencePiece word's space)
        text = TextStream(runner.tokenizer, args.stop_string, prompt=prompts[0])

        def on_token(i, t):
            print_text(text.push(t), end="")
    else:
        on_token = None
    res = generate(runner, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed, on_token=on_token,
                   stop_token_ids=stops, stop_strings=args.stop_string, prefill_chunk=args.prefill_chunk,
                   on_prefill=prefill_progress() if args.prefill_chunk and not quiet else None)
    texts = None if stream else completion_texts(runner.tokenizer, res)  # a stream's text is its own
    if stream:
        print_text(text.finish())
    elif args.json:
        print(json.dumps([{"prompt": p, "completion": t, "tokens": ids, "stop": r} for p, t, ids, r in
                          zip(args.prompt, texts, res.tokens, res.stop_reasons)], indent=2))
    else:
        for p, t in zip(args.prompt, texts):
            print_text(f"--- {p!r}\n{'' if args.chat else p}{t}")
    runner.close()


def print_text(text: str, end: str = "\n") -> None:
    """Model text on stdout. Characters its encoding cannot write (a cp1252 console or file on
    Windows) print as '?' instead of ending the command in a UnicodeEncodeError traceback."""
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(enc, errors="replace").decode(enc, errors="replace"), end=end, flush=True)


def prefill_progress():
    """generate()'s on_prefill as a progress bar on stderr, shown once a prompt takes two pieces."""
    from tqdm.auto import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and done < total:
            bar = tqdm(total=total, desc="prefill", unit="tok", leave=False)
        if bar is not None:
            bar.update(done - bar.n)
            if done == total:
                bar.close()
    return update


def cmd_convert(args):
    from .atomic import prepare_output_dir
    from .checkpoint import check_shard_size, load_model, save_checkpoint, stored_dtypes
    from .errors import CheckpointError
    from .tolerances import dtype_label

    check_shard_size(args.format, args.max_shard_size)
    prepare_output_dir(args.out, CheckpointError)
    # without --dtype the weights keep the source's stored precision (an fp16 checkpoint is not
    # silently doubled in size); a GGUF or a checkpoint without torch_dtype is saved as fp32
    bulk, exact = (None, None) if args.dtype else stored_dtypes(args.model)
    dtype = DTYPES[args.dtype] if args.dtype else exact or torch.float32
    if bulk is not None and bulk != dtype:
        name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        print(f"note: {args.model} stores its weights in more than one float dtype (mostly {name(bulk)}); they are "
              f"saved as {name(dtype)} so that none is rounded; pass --dtype {dtype_label(bulk)} for a smaller file",
              file=sys.stderr)
    model = load_model(args.model, dtype=dtype)
    out = save_checkpoint(model, args.out, fmt=args.format, dtype=dtype,
                          max_shard_bytes=None if args.max_shard_size is None else int(args.max_shard_size * 1024**2))
    print(f"wrote {args.format} checkpoint ({str(dtype).removeprefix('torch.')}) to {out}")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mamba-deploy", description="Run, export, quantize and verify Mamba / Mamba2 language models.")
    p.add_argument("--version", action="version", version=f"mamba-deploy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="architecture, parameters, bytes on disk, state bytes per sequence")
    s.add_argument("model", help="checkpoint folder (or a file in it), hub id or .gguf file")
    s.add_argument("--json", action="store_true", help="print the fields as one JSON object instead of a table")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("generate", help="generate text from a model or exported artifact")
    s.add_argument("model", help="checkpoint folder, hub id, ONNX folder or .gguf file")
    s.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    s.add_argument("--backend", default=None, type=backend_choice,
                   help="torch | onnx | llama.cpp | ... (default: from the path)")
    add_tokenizer(s)
    s.add_argument("--max-new-tokens", type=nonnegative_int, default=64,
                   help="most tokens generated per prompt; a stop token or --stop-string ends one earlier")
    s.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=nonnegative_int, default=0,
                   help="sample from the K most likely tokens only (0 = no limit; with --temperature > 0)")
    s.add_argument("--top-p", type=top_p, default=1.0, help="in (0, 1]")
    s.add_argument("--min-p", type=min_p, default=0.0, help="in [0, 1]")
    s.add_argument("--repetition-penalty", type=positive_float, default=1.0,
                   help="> 0; logits of tokens already in the prompt or output are divided by it where positive "
                        "and multiplied where negative (CTRL-style: > 1 discourages repeats, 1 = off); "
                        "also applies when greedy")
    s.add_argument("--stop", type=nonnegative_int, action="append", default=None,
                   help="stop token id (repeatable), besides the tokenizer's EOS")
    s.add_argument("--stop-string", action="append", default=None, metavar="TEXT",
                   help="stop at this text, which is left out of the output (repeatable)")
    s.add_argument("--seed", type=seed, default=None,
                   help="random seed for sampling (with --temperature > 0), 0..2**64-1; default: unseeded, "
                        "so each run differs")
    s.add_argument("--chat", action="store_true",
                   help="each --prompt is one user message, written in the model's chat template")
    s.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message first")
    s.add_argument("--chat-template", default=None, metavar="FILE",
                   help="with --chat: this Jinja template instead of the model's own")
    s.add_argument("--prefill-chunk", type=positive_int, default=None, metavar="N",
                   help="feed the prompts N tokens at a time, with a progress bar (bounds the prefill's memory; "
                        "default: in one piece)")
    s.add_argument("--device", default="cpu", help=DEVICE_HELP)
    s.add_argument("--dtype", default="fp32", type=str.lower, choices=sorted(DTYPES),
                   help="torch backend only: dtype the weights are loaded and run in")
    add_state_dtype(s)
    add_threads(s)
    add_tensor_parallel(s, "generate")
    s.add_argument("--json", action="store_true",
                   help="print a JSON list, one object per prompt (prompt, completion, token ids, stop reason), "
                        "instead of text")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("convert", help="re-save a checkpoint in the HF or mamba_ssm layout")
    s.add_argument("model", help="checkpoint folder, hub id or .gguf file")
    s.add_argument("out", help="new or empty folder for the converted checkpoint")
    s.add_argument("--format", type=str.lower, choices=["hf", "mamba_ssm"], default="hf",
                   help="hf: transformers' config and tensor names; mamba_ssm: the original state-spaces "
                        "mamba_ssm ones, as one pytorch_model.bin that its from_pretrained loads (refused for "
                        "models it cannot express, e.g. Falcon-Mamba)")
    s.add_argument("--dtype", type=str.lower, choices=sorted(DTYPES), default=None,
                   help="dtype of the saved float tensors (default: the dtype the source folder stores, from its "
                        "config or safetensors; fp32 for a .gguf, a hub id or when it cannot be read)")
    s.add_argument("--max-shard-size", type=positive_float, default=None,
                   help="MB per safetensors shard (--format hf; default 2048). mamba_ssm reads one pytorch_model.bin")
    s.set_defaults(func=cmd_convert)

    ex = sub.add_parser("export", help="export to a deployment format")
    _register_all(ex.add_subparsers(dest="format", required=True), EXPORT_MODULES, "export ")
    _register_all(sub, STAGE_MODULES)
    return p


def _cli_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line for the terminal, without the source file and line that Python's
    default format shows (it points into this package, not at anything the user can change)."""
    return f"warning: {message}\n"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every writer's cleanup (temporary files) runs."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


def _on_sigterm(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def _stop_signals_as_interrupts():
    """SIGTERM (a process manager) and SIGHUP (the terminal or SSH session closed) as Terminated
    while a command runs; their default, killing the process at once, left the temporaries of a
    write in progress. A SIGHUP already ignored (nohup) stays ignored. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    sigs = [s for s in sigs if s == signal.SIGTERM or signal.getsignal(s) is signal.SIG_DFL]
    previous = [signal.signal(s, _on_sigterm) for s in sigs]
    try:
        yield
    finally:
        for s, handler in zip(sigs, previous):
            signal.signal(s, handler)


def _stopped(e: KeyboardInterrupt, args=None) -> int:
    """Report an interrupt in one line; the exit status a shell shows for the signal. A
    tensor-parallel rank that torchrun stops (SIGTERM, after another rank failed) says nothing:
    one "terminated" per rank ran together on the shared stderr around the real error."""
    signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
    word = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}.get(signum, "hung up")
    # args is None when the signal came while the command line was read (a slow rank still importing)
    tp = getattr(args, "tensor_parallel", False) if args is not None else (
        "--tensor-parallel" in sys.argv[1:] and "LOCAL_RANK" in os.environ)
    if not (signum == signal.SIGTERM and tp):
        with contextlib.suppress(OSError, ValueError):  # stderr may be the terminal that went away
            print(word, file=sys.stderr)
    return 128 + signum


def main(argv=None, build=None) -> int:
    """The CLI: `build` makes its parser (default: every verb's; `python -m mamba_deploy.train`
    passes one with the train verbs only, and gets the same errors, signals and exit codes)."""
    with _stop_signals_as_interrupts():
        return _main(argv, build or build_parser)


def _main(argv, build) -> int:
    default_format, warnings.formatwarning = warnings.formatwarning, _cli_warning
    args, done = None, False
    stdout = sys.stdout = _MarkedStdout(sys.stdout) if sys.stdout is not None else None  # None: stdout closed
    remove_created_folders(keep=True)  # folders made before this command (Python API calls) are not its to remove
    try:
        # inside the try: building the parser imports every stage's modules, for a second or more,
        # and Ctrl-C (or SIGTERM) then was a traceback
        args = build().parse_args(argv)
        args.func(args)
        if sys.stdout is not None:  # here, not at exit: a full disk behind `> FILE` is reported below
            sys.stdout.flush()
        done = True
    except MambaDeployError as e:
        if (stop := _interrupted(e)) is not None:
            return _stopped(stop, args)
        print(f"{_rank_prefix(args)}error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # verify's "beyond tolerance": 1 (errors.BeyondToleranceError)
    except ModuleNotFoundError as e:
        if (stop := _interrupted(e)) is not None:
            return _stopped(stop, args)
        if top_level(e.name) not in PACKAGES:  # not an optional package: a bug, keep the traceback
            raise
        print(f"{_rank_prefix(args)}error: {_missing_package(args and _command(args), e)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        said = (str(e).splitlines() or [type(e).__name__])[0][:300]  # a MemoryError may carry no message
        print(f"{_rank_prefix(args)}error: out of memory in {_command(args)}: {said}\n"
              "a size asked for (lengths, batch, prompt or generation length, --max-tokens) or the model's "
              "config needs more memory than there is; try smaller values, or --dtype bf16", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return _stopped(e, args)
    except PermissionError as e:  # a path check that raised instead of saying no (Path.exists on 3.11)
        if (stop := _interrupted(e)) is not None:
            return _stopped(stop, args)
        print(f"{_rank_prefix(args)}error: {e.filename or 'a file'}: {e.strerror or e}; check its permissions "
              "and those of the folders above it", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head` stopped reading: end quietly
        _stdout_to_devnull()
        return 141  # 128 + SIGPIPE, as a shell reports it
    except OSError as e:
        if not getattr(e, "mamba_stdout", False):  # not stdout's own failure (see _MarkedStdout)
            raise
        _stdout_to_devnull()
        print(f"{_rank_prefix(args)}error: could not write the output of {_command(args)} to standard output: "
              f"{e.strerror or e}; free space on the disk it is redirected to, or redirect it to another one",
              file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = default_format
        if stdout is not None and sys.stdout is stdout:  # (a tensor-parallel rank other than 0 put /dev/null there)
            sys.stdout = stdout.stream
        remove_created_folders(keep=done)  # a failed or stopped command leaves no empty output folders
    return 0


class _MarkedStdout:
    """sys.stdout, whose write and flush failures are marked as its own (`> FILE` on a full disk),
    so _main tells them from the files a verb writes (those report a full disk themselves:
    atomic.out_of_space). Unbuffered (python -u), nothing is left to fail again at a later flush."""

    def __init__(self, stream):
        self.stream = stream

    def _marked(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            e.mamba_stdout = True
            raise

    def write(self, text):
        return self._marked(self.stream.write, text)

    def flush(self):
        return self._marked(self.stream.flush)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _stdout_to_devnull() -> None:
    """Point stdout's descriptor at /dev/null after it failed (a closed pipe, a full disk), so
    the flush of what is still buffered, at exit, does not fail a second time."""
    with contextlib.suppress(OSError, ValueError):
        fd = sys.stdout.fileno()  # first: a stdout without one (a test's capture) leaks no /dev/null descriptor
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)


def _rank_prefix(args) -> str:
    """'rank N: ' in a tensor-parallel rank other than 0, whose stdout is silenced (its errors
    still show, marked, since a failure may be that rank's alone; other_rank: marked from the
    start, where the group's own rank left errors before it was joined unmarked)."""
    rank = other_rank(args)
    return "" if rank is None else f"rank {rank}: "


def _interrupted(e: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt an error was raised from, if any: a Ctrl-C while a package imports
    (numpy, onnxruntime) comes back as an ImportError, which "needs onnxruntime: pip install ..."
    then reported as a missing package."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _out_of_memory(e: BaseException) -> bool:
    """A failed allocation: MemoryError, torch.OutOfMemoryError (CUDA) or the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    return (isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError)))
            or "can't allocate memory" in str(e) or "out of memory" in str(e).lower())


def _command(args) -> str:
    if args is None:  # failed while the command line was read
        return "mamba-deploy"
    return args.command + (f" {args.format}" if getattr(args, "format", None) and args.command == "export" else "")


if __name__ == "__main__":
    sys.exit(main())
