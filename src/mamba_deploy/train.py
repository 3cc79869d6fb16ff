"""`mamba-deploy train` / `mamba-deploy train-tokenizer`: small Mamba LMs on the stdlib corpus.

Single device; bf16 autocast on CUDA; AdamW with a cosine schedule after a linear warmup;
gradient clipping; a resumable training state plus an fp16 HF snapshot written atomically
every --save-every steps, so an interrupted run always leaves a loadable model behind.
"""

from __future__ import annotations

import io
import json
import math
import shlex
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from .argtypes import bpe_vocab_size, nonnegative_float, nonnegative_int, positive_float, positive_int, seed
from .atomic import atomic_file, read_json_object
from .config import MambaConfig
from .errors import CheckpointError, ConfigError, TrainingDivergedError
from .model_card import TIMED_STEPS
from .train_outputs import check_outputs, missing_dirs, remove_empty, save_snapshot, work_dir

# Sizes of the shipped demo models (and a tiny one for smoke tests). ~3-4 M parameters each.
PRESETS = {
    "demo-mamba1": dict(arch="mamba1", d_model=256, n_layer=6, d_state=16, expand=2),
    "demo-mamba2": dict(arch="mamba2", d_model=256, n_layer=6, d_state=32, expand=2, headdim=32,
                        ngroups=2, chunk_size=64),
    "tiny-mamba1": dict(arch="mamba1", d_model=32, n_layer=2, d_state=8, expand=2),
    "tiny-mamba2": dict(arch="mamba2", d_model=32, n_layer=2, d_state=16, expand=2, headdim=16,
                        ngroups=2, chunk_size=16),
}
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def build_config(preset: str, vocab_size: int, eos_id: int | None, pad_id: int | None) -> MambaConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    kw = dict(PRESETS[preset])
    tie = kw["arch"] == "mamba1"  # exercise both tied (Mamba1) and untied (Mamba2) heads
    # no vocab padding: the checkpoint's vocab_size (and the logits' width) is the tokenizer's, so
    # no never-trained rows enter the softmax when the saved model is evaluated
    return MambaConfig(vocab_size=vocab_size, pad_vocab_size_multiple=1, tie_embeddings=tie,
                       bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, **kw)


@torch.no_grad()
def init_weights(model, seed: int) -> None:
    """mamba_ssm's initialisation: S4D-real A, dt log-uniform in [1e-3, 0.1] through the bias
    (inverse softplus), small embeddings, out_proj scaled down by depth."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    emb = model.backbone.embeddings.weight
    emb.copy_(torch.randn(emb.shape, generator=g) * 0.02)
    if not cfg.tie_embeddings:
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * 0.02)
    for layer in model.backbone.layers:
        m = layer.mixer
        width = m.dt_proj.bias.shape[0] if cfg.arch == "mamba1" else cfg.nheads
        dt = torch.exp(torch.rand(width, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        inv_softplus = dt + torch.log(-torch.expm1(-dt))
        if cfg.arch == "mamba1":
            m.dt_proj.bias.copy_(inv_softplus)
            m.A_log.copy_(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).expand_as(m.A_log))
        else:
            m.dt_bias.copy_(inv_softplus)
            m.A_log.copy_(torch.log(torch.empty(cfg.nheads).uniform_(1, 16, generator=g)))
        m.out_proj.weight.mul_(1 / math.sqrt(2 * cfg.n_layer))


def lm_logits(model, ids):
    """Training forward: ids (b, l) -> logits (b, l, V) from a zero state. Uses the library's
    blocks but keeps states out of place (MambaLM.forward updates its State in place, which
    autograd cannot differentiate through)."""
    cfg = model.config
    b = ids.shape[0]
    h = model.backbone.embeddings(ids)  # (b, l, d_model)
    for layer in model.backbone.layers:
        conv0 = torch.zeros(b, *cfg.conv_state_shape, device=ids.device, dtype=h.dtype)
        ssm0 = torch.zeros(b, *cfg.ssm_state_shape, device=ids.device, dtype=torch.float32)
        h, _, _ = layer(h, conv0, ssm0)
    return model._head(h)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to `peak`, then cosine decay to min_ratio * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def sample_batch(tokens: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator, split: str = "corpus"):
    """Random windows of the stream: (b, seq_len + 1) int64 (inputs + shifted targets)."""
    if tokens.size < seq_len + 1:
        raise ConfigError(f"{'the ' * (split != 'corpus')}{split} has {tokens.size} tokens, fewer than --seq-len "
                          f"{seq_len} + 1; pass --seq-len {max(1, tokens.size - 1)} or less")
    starts = rng.integers(0, tokens.size - seq_len, size=batch)  # the last window starts at size - seq_len - 1
    return torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))


def make_optimizer(model, lr: float, weight_decay: float):
    """AdamW; no decay on 1-D tensors (norms, biases, D, dt biases, Mamba2's A_log). Mamba1's A_log
    is (d_inner, d_state), so it is decayed, unlike mamba_ssm (which marks it no-decay); the
    shipped demo-mamba1 was trained this way, so it stays for `train` to reproduce it."""
    params = {id(p): p for p in model.parameters()}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(iter(params)).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


VAL_PIECE_TOKENS = 8192  # validation windows are scored this many tokens at a time (bounded logits)


@torch.no_grad()
def quick_val_loss(model, val_windows, amp_dtype) -> float:
    """Mean loss over fixed validation windows (b, l+1), each from a zero state, scored a few rows
    at a time: all at once, --eval-batch 100000 grew to 24 GB of logits and was killed."""
    model.eval()
    dev, (b, n) = model.device, val_windows.shape
    rows, total = max(1, VAL_PIECE_TOKENS // (n - 1)), 0.0
    with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for i in range(0, b, rows):
            x = val_windows[i:i + rows].to(dev)
            logits = lm_logits(model, x[:, :-1])
            total += float(F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
    model.train()
    return total / (b * (n - 1))


def save_training_state(path: Path, model, opt, step: int, rng, log: list, preset: str | None = None,
                        extra: dict | None = None) -> None:
    """extra: what --resume reads besides (settings, schedule_steps, tokens_seen); `rng`: a
    Generator or its bit_generator.state."""
    # atomic_file: a unique temporary, removed when the save is interrupted or the disk fills
    with atomic_file(path) as tmp:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "rng": rng if isinstance(rng, dict) else rng.bit_generator.state, "log": log, "preset": preset,
                    "vocab_size": model.config.vocab_size, **(extra or {})}, tmp)


# what a run fixes at its start and --resume must not change: they shape its schedule and data
RUN_SETTINGS = ("batch", "seq_len", "lr", "warmup", "weight_decay", "clip", "seed")


TOKENIZER_KEY = "tokenizer_sha256"  # the run's tokenizer.json (data.tokenizer_digest), in its settings


def check_run_settings(args, saved: dict | None, state_path: Path, digest: str | None = None) -> None:
    """ConfigError when --resume would continue a run with other settings than it was started
    with, or another tokenizer of the same size (a state from before they were saved is taken
    as it is)."""
    if not isinstance(saved, dict):
        return
    if digest is not None and saved.get(TOKENIZER_KEY) not in (None, digest):
        raise ConfigError(f"--resume: the run in {state_path} was trained with another tokenizer.json than --tokenizer "
                          f"{args.tokenizer}'s (same vocabulary size, other ids: the weights would not match it); "
                          "pass the run's tokenizer, or drop --resume (or use another --work-dir) to start a new run")
    diff = [k for k in RUN_SETTINGS if k in saved and saved[k] != getattr(args, k)]
    if diff:
        def flags(values):
            return " ".join(f"--{k.replace('_', '-')} {values[k]:g}" if isinstance(values[k], float)
                            else f"--{k.replace('_', '-')} {values[k]}" for k in diff)

        raise ConfigError(f"--resume: the run in {state_path} was started with {flags(saved)}, this command has "
                          f"{flags(vars(args))}; a resumed run keeps its settings: pass the run's values, or drop "
                          "--resume (or use another --work-dir) to start a new run")


def load_data(args):
    from . import data

    tok_dir = Path(args.tokenizer)
    train_ids = data.load_split(tok_dir, "train", args.data_cache)
    val_ids = data.load_split(tok_dir, "val", args.data_cache)
    return train_ids, val_ids


def resolve_total_steps(args, step_times: list[float], start: float, step: int, costs: dict | None = None) -> int:
    """--steps, or fewer when --max-minutes would be exceeded at the measured step time; never
    fewer than `step`, the steps done (a budget already spent ended the run without its last
    step's evaluation and save: the loop's `step == total` was never true; a resumed run
    counted its steps from 0). costs: seconds of one evaluation, one save and the final
    --eval-tokens evaluation (_extra_costs), spread over --eval-every / --save-every steps and
    kept back for the end: fitted to the step time alone, evaluations ran 6 s budgets to 50 s."""
    if not args.max_minutes or len(step_times) < 4:
        return args.steps
    c = {"eval": 0.0, "save": 0.0, "final": 0.0, **(costs or {})}
    per_step = float(np.median(step_times[2:])) + c["eval"] / args.eval_every + c["save"] / args.save_every
    left = args.max_minutes * 60 - (time.perf_counter() - start) - c["final"] - c["eval"] - c["save"]
    return max(step, min(args.steps, step + int(max(left, 0.0) / per_step)))


def _extra_costs(run, args) -> dict:
    """What --max-minutes must leave room for besides the steps: an evaluation and a save, timed
    where the run already did one, else measured now (a save by serializing the training state
    in memory, plus half again for the fp16 snapshot), and the final --eval-tokens evaluation,
    scaled from an evaluation by its token count."""
    costs = dict(run.costs)
    if "eval" not in costs:
        t = time.perf_counter()
        quick_val_loss(run.model, run.val_windows, run.amp_dtype)
        costs["eval"] = time.perf_counter() - t
    if "save" not in costs:
        t = time.perf_counter()
        torch.save({"model": run.model.state_dict(), "opt": run.opt.state_dict()}, io.BytesIO())
        costs["save"] = 1.5 * (time.perf_counter() - t)
    costs["final"] = costs["eval"] * args.eval_tokens / run.val_windows[:, 1:].numel() if args.eval_tokens else 0.0
    return costs


STATE_KEYS = ("model", "opt", "step", "rng", "log")


def load_resume_state(args, state_path: Path, device):
    """The saved training state for --resume (None when there is none), checked against --preset."""
    if not args.resume:
        return None
    if not state_path.exists():
        out = Path(args.out)
        if (out / "config.json").exists() and not getattr(args, "overwrite", False):
            # starting over would replace the model there, which a fresh run refuses to do unasked
            raise CheckpointError(f"--resume: no training state at {state_path}, and --out {out} holds a model that "
                                  "training from scratch would replace; pass the --work-dir of the run that made "
                                  "it, or --overwrite to train a new model over it")
        warnings.warn(f"--resume: no training state at {state_path}; starting from scratch (pass the --work-dir "
                      "of the run to continue, if it had one)", stacklevel=2)
        return None
    fix = "delete it (or use another --work-dir, or drop --resume) to start over"
    try:
        st = torch.load(state_path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001  (pickle, zip and EOF errors for a truncated or foreign file)
        raise CheckpointError(f"--resume: cannot read {state_path} ({type(e).__name__}: {e}); "
                              f"it is truncated or not a training state: {fix}") from e
    if not isinstance(st, dict) or any(k not in st for k in STATE_KEYS):
        raise CheckpointError(f"--resume: {state_path} is not a `mamba-deploy train` state (it lacks "
                              f"{', '.join(STATE_KEYS)}); {fix}")
    # what save_training_state writes, value by value: another trainer's file with these generic
    # keys (or a damaged one) failed later with a KeyError or TypeError, some after steps had run
    shapes = {"model": isinstance(st["model"], dict),
              "opt": isinstance(st["opt"], dict) and {"state", "param_groups"} <= set(st["opt"]),
              "step": isinstance(st["step"], int) and not isinstance(st["step"], bool) and st["step"] >= 0,
              "rng": isinstance(st["rng"], dict) and "bit_generator" in st["rng"],
              "log": isinstance(st["log"], list) and all(isinstance(e, dict) and "step" in e for e in st["log"])}
    bad = [k for k, ok in shapes.items() if not ok]
    if bad:
        raise CheckpointError(f"--resume: {state_path} is not a `mamba-deploy train` state (its "
                              f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not what this trainer saves); {fix}")
    saved = st.get("preset")
    if saved is not None and saved != args.preset:
        raise ConfigError(f"--resume: {state_path} was saved by preset {saved!r}, not --preset {args.preset!r}; "
                          f"pass --preset {saved} to continue it, or drop --resume (or use another --work-dir) "
                          "to start over")
    return st


def _check_moment_shapes(opt) -> None:
    """load_state_dict takes per-parameter moments of any shape; a mismatched one would fail
    only inside the first opt.step, as a bare RuntimeError."""
    for group in opt.param_groups:
        for p in group["params"]:
            for key, t in opt.state.get(p, {}).items():
                if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape != p.shape:
                    raise ValueError(f"its {key!r} of shape {tuple(t.shape)} belongs to a parameter of shape "
                                     f"{tuple(p.shape)}")


def setup(args) -> SimpleNamespace:
    """Data, model, optimizer and (with --resume) the saved training state."""
    from .checkpoint import check_device
    from .model import MambaLM
    from .tokenizer import load_tokenizer

    torch.manual_seed(args.seed)
    # the default depends on the machine, so it is not the parser's (docs/cli.md is generated from it)
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.micro_batch = resolve_micro_batch(args, device)
    if not (Path(args.tokenizer) / "tokenizer.json").exists():
        raise ConfigError(f"--tokenizer {args.tokenizer} has no tokenizer.json; "
                          "make one with `mamba-deploy train-tokenizer DIR`")
    tok = load_tokenizer(args.tokenizer)  # a corrupt one fails here, before any output folder is made
    work = check_outputs(args)
    state_path = work / "train_state.pt"
    st = load_resume_state(args, state_path, device)
    from .data import tokenizer_digest

    digest = tokenizer_digest(args.tokenizer)
    if st is not None:  # before the data is tokenized (minutes for a new tokenizer)
        check_run_settings(args, st.get("settings"), state_path, digest)
    train_ids, val_ids = load_data(args)
    cfg = build_config(args.preset, tok.vocab_size, tok.eos_token_id, tok.token_to_id("<|pad|>"))
    model = MambaLM(cfg)
    init_weights(model, args.seed)
    model.source_path = Path(args.tokenizer)  # save_checkpoint copies the tokenizer files from here
    model.to(device).train()
    run = SimpleNamespace(model=model, opt=make_optimizer(model, args.lr, args.weight_decay), cfg=cfg,
                          rng=np.random.default_rng(args.seed), step=0, log=[], device=device, tokens_seen=0,
                          schedule_steps=None, total=args.steps, seconds_before=0.0,
                          settings={**{k: getattr(args, k) for k in RUN_SETTINGS}, TOKENIZER_KEY: digest},
                          amp_dtype=AMP[args.amp or ("bf16" if device.type == "cuda" else "none")],
                          state_path=state_path, train_ids=train_ids, val_ids=val_ids)
    run.scaler = make_scaler(run.amp_dtype, device)
    if st is not None:
        try:
            model.load_state_dict(st["model"])
        except RuntimeError as e:  # a state from before presets were recorded, or another tokenizer
            raise ConfigError(
                f"--resume: {state_path} does not fit --preset {args.preset!r} with the {cfg.vocab_size}-token "
                f"--tokenizer {args.tokenizer} (saved preset: {st.get('preset') or 'not recorded'}, saved vocab: "
                f"{st.get('vocab_size') or 'not recorded'}); pass the preset and tokenizer it was trained with, "
                "or drop --resume (or use another --work-dir) to start over") from e
        # a schedule --max-minutes fixed stays: re-fitted to a new budget, its rate jumped
        run.schedule_steps = st.get("schedule_steps")
        total = run.total = run.schedule_steps or args.steps
        log_out = read_json_object(Path(args.out) / "train_log.json")
        saved = log_out.get("steps", 0)  # 0: no snapshot there yet
        # the state's last step done but --out older (its final save failed: disk full, Ctrl-C),
        # or its final evaluation never written: the loop below has nothing to do, and the final
        # evaluation and snapshot are written
        unsaved = st["step"] == total and isinstance(saved, int) and (
            saved < st["step"] or (args.eval_tokens and "validation" not in log_out))
        if st["step"] >= total and not unsaved:  # nothing to train: the saved run stays as it is
            if run.schedule_steps:
                raise ConfigError(f"--resume: {state_path} has done all {st['step']} steps that its --max-minutes "
                                  "fitted into its schedule; start a new run (drop --resume, or another --work-dir) "
                                  "to train longer")
            raise ConfigError(f"--resume: {state_path} has already done {st['step']} steps, and --steps {args.steps} "
                              f"counts those too; pass --steps above {st['step']} to train further")
        try:
            run.opt.load_state_dict(st["opt"])
            _check_moment_shapes(run.opt)
            run.rng.bit_generator.state = st["rng"]
            if run.scaler is not None and "grad_scaler" in st:  # a state saved with --amp fp16
                run.scaler.load_state_dict(st["grad_scaler"])
        except (KeyError, TypeError, ValueError) as e:  # another optimizer's or generator's state
            raise CheckpointError(f"--resume: {state_path} holds an optimizer or data-order state this run cannot "
                                  f"take ({type(e).__name__}: {e}); delete it (or use another --work-dir, or drop "
                                  "--resume) to start over") from e
        run.step, run.log = st["step"], st["log"]
        run.tokens_seen = st.get("tokens_seen", st["step"] * args.batch * args.seq_len)
        secs = st.get("train_seconds")  # absent from states saved before it was kept
        run.seconds_before = float(secs) if isinstance(secs, (int, float)) and math.isfinite(secs) else 0.0
    run.info = dict(preset=args.preset, config=cfg.to_hf_dict(), parameters=model.num_parameters(),
                    train_tokens_available=int(train_ids.size), val_tokens_available=int(val_ids.size),
                    batch=args.batch, micro_batch=args.micro_batch, seq_len=args.seq_len, lr=args.lr,
                    warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip, amp=str(run.amp_dtype),
                    device=str(device),
                    command=shlex.join(["mamba-deploy", *sys.argv[1:]]))
    return run


def train(args) -> dict:
    """The training loop; returns the metrics written to train_log.json. A run that fails
    removes the folders it created while they are still empty (no stray OUT.work)."""
    created = missing_dirs(args.out, work_dir(args))
    try:
        return _train(args)
    except BaseException:
        remove_empty(created)
        raise


# On a CPU, tokens per forward / backward pass by default (--micro-batch): the allocator keeps
# what a pass allocated, ~3 MB per token for demo-mamba1 (~0.4 MB for demo-mamba2), so the
# presets' 32 x 512 tokens in one pass were killed by the OOM killer on a 23 GB machine
CPU_MICRO_TOKENS = 2048


def resolve_micro_batch(args, device) -> int:
    """Sequences per forward / backward pass: --micro-batch, else all of --batch on a GPU and
    as many as fit in CPU_MICRO_TOKENS on a CPU (at least one)."""
    if getattr(args, "micro_batch", None) is not None:
        if args.micro_batch > args.batch:
            raise ConfigError(f"--micro-batch {args.micro_batch} is larger than --batch {args.batch}: a micro-batch "
                              "is part of one optimizer step's sequences; pass --micro-batch <= --batch")
        return args.micro_batch
    if device.type != "cpu":
        return args.batch
    return max(1, min(args.batch, CPU_MICRO_TOKENS // args.seq_len))


def eval_tokens(text: str) -> int:
    """--eval-tokens: 0 (no evaluation) or >= 2; 1 was accepted and failed after the whole run."""
    import argparse

    n = nonnegative_int(text)
    if n == 1:
        raise argparse.ArgumentTypeError("must be 0 (no evaluation) or >= 2 (perplexity scores each token "
                                         "after the first), got 1")
    return n


def _train(args) -> dict:
    run = setup(args)
    model, total = run.model, run.total
    val_windows = sample_batch(run.val_ids, args.eval_batch, args.seq_len, np.random.default_rng(1234),
                               "validation split")
    print(f"{args.preset}: {run.info['parameters'] / 1e6:.2f} M parameters, {run.train_ids.size} train tokens",
          flush=True)
    if args.micro_batch != args.batch:
        print(f"gradients of --batch {args.batch} accumulated over micro-batches of {args.micro_batch} sequences "
              f"({args.micro_batch * args.seq_len} tokens per pass; set with --micro-batch)", flush=True)
    if args.warmup >= total:  # accepted (a short test run), but said: the peak is never reached
        _warmup_note(args, total, f"--steps {total}")
    if model.device.type == "cpu" and args.micro_batch * args.seq_len > CPU_MICRO_TOKENS:
        print(f"note: {args.micro_batch} x --seq-len {args.seq_len} tokens per forward pass on the CPU; if the "
              "process is killed for memory, lower --micro-batch or --seq-len", file=sys.stderr, flush=True)
    start = time.perf_counter()
    step = _loop(run, args, val_windows, start)
    metrics = {**run.info, "steps": step, "tokens_seen": run.tokens_seen, "train_seconds": round(_seconds(run), 1),
               "log": run.log}
    if args.eval_tokens:
        metrics["validation"] = final_eval(model, run.train_ids, run.val_ids, args.eval_tokens, run.cfg.vocab_size)
        print("validation:", json.dumps(metrics["validation"]), flush=True)
    save_snapshot(model, Path(args.out), torch.float16, metrics)
    return metrics


def _loop(run, args, val_windows, start: float) -> int:
    """The optimizer steps from run.step to the schedule's end (-> the steps done). Between two
    steps run.step / run.mark (the data RNG before the next batch) / run.tokens_seen describe a
    state the run can resume from; an interrupt then saves it (_save_interrupted)."""
    from tqdm import tqdm

    from .ops import use_backend

    model, step, total, step_times = run.model, run.step, run.total, []
    run.mark, run.saved, run.updating, run.val_windows = run.rng.bit_generator.state, step, False, val_windows
    run.costs = {}  # seconds of the last evaluation and save (for --max-minutes)
    run.start = start
    update = run.opt.step

    def flagged_update(*a, **k):  # from here until the step is counted the weights are mid-step
        run.updating = True
        return update(*a, **k)

    run.opt.step = flagged_update
    # closed on the way out of an interrupt too: else its last redraw, at exit, came after the message
    bar = tqdm(total=total, initial=step, desc=args.preset, unit="step", mininterval=5)
    try:
        with bar, use_backend("ref"):  # the reference ops have autograd; fast kernels may not
            while step < total:
                t0 = time.perf_counter()
                batch = sample_batch(run.train_ids, args.batch, args.seq_len, run.rng, "train split")
                try:
                    loss, lr = train_step(model, run.opt, batch, run.device, run.amp_dtype, args, step, total,
                                          run.scaler)
                except TrainingDivergedError as e:
                    raise _diverged(run, args, step + 1, str(e)) from e
                step += 1
                # one statement: a signal is not taken between its stores
                run.step, run.mark, run.tokens_seen, run.last, run.updating = (
                    step, run.rng.bit_generator.state, run.tokens_seen + args.batch * args.seq_len, (loss, lr),
                    False)
                step_times.append(time.perf_counter() - t0)
                if len(step_times) == TIMED_STEPS and run.schedule_steps is None:
                    costs = _extra_costs(run, args) if args.max_minutes else None
                    fitted = resolve_total_steps(args, step_times, start, step, costs)
                    if args.warmup >= fitted and args.warmup < total:  # the cut put the peak out of reach
                        _warmup_note(args, fitted, f"the {fitted} steps --max-minutes {args.max_minutes:g} leaves")
                    total = bar.total = run.total = fitted
                    run.schedule_steps = total if args.max_minutes else None  # kept by --resume
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
                t0 = time.perf_counter()
                if _evaluation_due(run, args):
                    _evaluate(run, bar.write)
                    run.costs["eval"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                if step % args.save_every == 0 or step == total:
                    _save(run, args)
                    run.costs["save"] = time.perf_counter() - t0
    except KeyboardInterrupt:
        _save_interrupted(run, args)
        raise
    finally:
        del run.opt.step  # the class's again
    return step


def _seconds(run) -> float:
    """Training time of the whole run: this process's and, after --resume, the earlier ones'."""
    return run.seconds_before + time.perf_counter() - run.start


def _warmup_note(args, total: int, steps: str) -> None:
    print(f"note: --warmup {args.warmup} >= {steps}: the learning rate rises to {args.lr * total / args.warmup:.3g} "
          f"at most, never to --lr {args.lr:g}; lower --warmup", file=sys.stderr, flush=True)


def _evaluation_due(run, args) -> bool:
    """run.step is an evaluation step whose log entry is not written yet."""
    due = run.step % args.eval_every == 0 or run.step == run.total
    return due and not (run.log and run.log[-1]["step"] == run.step)


def _evaluate(run, say) -> None:
    """The validation loss at run.step, logged (train_log.json) and said."""
    loss, lr = run.last
    vl = quick_val_loss(run.model, run.val_windows, run.amp_dtype)
    run.log.append({"step": run.step, "loss": loss, "val_loss": vl, "lr": lr,
                    "elapsed_s": round(time.perf_counter() - run.start, 1)})
    say(f"step {run.step}/{run.total} loss {loss:.4f} val_loss {vl:.4f} ({vl / math.log(2):.3f} bits)")


def _diverged(run, args, step: int, what: str) -> TrainingDivergedError:
    saved = (f"the last save (step {run.saved}, in {run.state_path} and {args.out}) stands" if run.saved
             else "nothing was saved")
    return TrainingDivergedError(f"training diverged at step {step}: {what}; {saved}. Start a new run with a lower "
                                 f"--lr (now {args.lr:g}) or a longer --warmup (now {args.warmup}); --resume keeps "
                                 "the run's --lr")


def _save(run, args) -> None:
    """The training state (WORK_DIR/train_state.pt) and the fp16 snapshot in --out at run.step;
    TrainingDivergedError, writing nothing, when a weight is NaN or infinite (the last good
    state is kept: --resume from a non-finite one could never recover)."""
    from .checkpoint import all_finite

    bad = next((name for name, p in run.model.named_parameters() if not all_finite(p.detach())), None)
    if bad is not None:
        raise _diverged(run, args, run.step, f"{bad} holds NaN or infinite values")
    extra = {"settings": run.settings, "schedule_steps": run.schedule_steps, "tokens_seen": run.tokens_seen,
             "train_seconds": _seconds(run)}
    if run.scaler is not None:
        extra["grad_scaler"] = run.scaler.state_dict()
    save_training_state(run.state_path, run.model, run.opt, run.step, run.mark, run.log, args.preset, extra)
    metrics = {**run.info, "steps": run.step, "tokens_seen": run.tokens_seen, "log": run.log}
    save_snapshot(run.model, Path(args.out), torch.float16, metrics)
    run.saved = run.step


def _save_interrupted(run, args) -> None:
    """Ctrl-C (or SIGTERM) during training: the steps done since the last save are saved, so
    --resume continues from there, unless the signal came inside an optimizer update (the weights
    are then part-way between two steps: the last save stands)."""
    if run.step == run.saved:
        return
    if run.updating:
        print(f"interrupted inside an optimizer update: the last save (step {run.saved}) stands; continue it "
              "with --resume", file=sys.stderr, flush=True)
        return
    print(f"interrupted at step {run.step}: saving it (Ctrl-C again to leave without it)", file=sys.stderr,
          flush=True)
    if _evaluation_due(run, args):  # cut short: --resume starts after this step and would never log it
        _evaluate(run, lambda m: print(m, file=sys.stderr, flush=True))
    _save(run, args)
    print(f"saved step {run.step} to {run.state_path} and {args.out}; continue with --resume", file=sys.stderr,
          flush=True)


MIN_LOSS_SCALE = 2.0**-16  # 32 halvings below GradScaler's start (2**16): not an overflow but NaN gradients


def make_scaler(amp_dtype, device):
    """fp16 autocast's loss scaling (None otherwise): the loss is divided by the batch's target
    count (16384 for 32 x 512), so a softmax gradient p / 16384 of ~1e-8 is below float16's
    smallest subnormal (6e-8) and became 0 in the fp16 lm_head matmul: 92 of 4096 lm_head rows got
    no gradient at all. bf16 has float32's range and needs none."""
    if amp_dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def train_step(model, opt, batch, device, amp_dtype, args, step: int, total: int, scaler=None):
    """One optimizer step on `batch` (b, l+1): the mean next-token cross entropy over all of its
    tokens, its gradients accumulated over micro-batches of args.micro_batch sequences (all at
    once when unset), clipped, then AdamW. `scaler`: make_scaler's, for fp16 autocast (a step
    whose scaled gradients overflow is skipped and the scale lowered, as torch.amp does).
    Returns (loss, lr); TrainingDivergedError, before the update, for a NaN or infinite loss or
    gradient norm."""
    lr = lr_at(step, total, args.lr, args.warmup)
    for g in opt.param_groups:
        g["lr"] = lr
    x = batch.to(device, non_blocking=True)
    n_targets = x[:, 1:].numel()
    opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for part in x.split(getattr(args, "micro_batch", None) or len(x)):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = lm_logits(model, part[:, :-1])  # (m, l, V)
        # summed and divided by the whole batch's count: the accumulated gradient is the batch mean's
        loss = F.cross_entropy(logits.float().flatten(0, 1), part[:, 1:].flatten(), reduction="sum") / n_targets
        (loss if scaler is None else scaler.scale(loss)).backward()
        loss_sum += float(loss.detach())
    if not math.isfinite(loss_sum):
        raise TrainingDivergedError(f"the loss is {loss_sum}")
    if scaler is not None:
        scaler.unscale_(opt)
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
    if scaler is not None:  # an overflow of the scaled gradients: the step is skipped, the scale halved
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() < MIN_LOSS_SCALE:  # halved at every step since: the gradients are not finite at all
            raise TrainingDivergedError(f"the gradients overflow at every loss scale (now {scaler.get_scale():.3g})")
    elif not math.isfinite(norm):
        raise TrainingDivergedError(f"the gradient norm is {norm}")
    else:
        opt.step()
    return loss_sum, lr


def final_eval(model, train_ids, val_ids, n_tokens: int, vocab: int) -> dict:
    """Carried-state perplexity of the fp16-rounded weights (what ships) on the first n_tokens
    validation tokens, next to the add-one unigram baseline on the same tokens."""
    from .data import unigram_perplexity
    from .eval import perplexity
    from .model import MambaLM
    from .runners.torch_runner import TorchRunner

    shipped = MambaLM(model.config).to(model.device)
    sd = {k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    shipped.load_state_dict(sd)
    ids = val_ids[:n_tokens]
    res = perplexity(TorchRunner(shipped), ids, window=512)
    res["unigram_ppl"] = unigram_perplexity(train_ids, ids[1:], vocab)  # the tokens scored: all but the first
    return res


def cmd_train(args):
    train(args)
    print(f"wrote {args.out}")


def cmd_train_tokenizer(args):
    from .data import train_tokenizer

    out = train_tokenizer(args.out, args.vocab_size, overwrite=args.overwrite)
    print(f"wrote {out}/tokenizer.json")


def register(subparsers):
    s = subparsers.add_parser("train", help="train a small Mamba/Mamba2 LM on the stdlib corpus")
    s.add_argument("--preset", default="demo-mamba1", choices=sorted(PRESETS),
                   help="model shape: demo-* as the shipped demo models (d_model 256, 6 layers), tiny-* for smoke "
                        "tests (d_model 32, 2 layers); mamba1 ties the head to the embeddings, mamba2 does not")
    s.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (see train-tokenizer)")
    s.add_argument("--out", required=True,
                   help="HF checkpoint folder (fp16), its model replaced at each save (other files there are kept)")
    s.add_argument("--work-dir", default=None, help="resumable training state (default: OUT.work)")
    s.add_argument("--data-cache", default=".cache/stdlib",
                   help="folder where the tokenized corpus is cached (.npy), reused by later runs (default "
                        ".cache/stdlib, under the current folder)")
    s.add_argument("--steps", type=positive_int, default=1000,
                   help="optimizer steps in all, counting those a --resume run already did; the learning-rate "
                        "schedule ends here")
    s.add_argument("--max-minutes", type=positive_float, default=None, help="cap --steps to fit this wall time")
    s.add_argument("--batch", type=positive_int, default=32, help="sequences per optimizer step")
    s.add_argument("--micro-batch", type=positive_int, default=None,
                   help="sequences per forward / backward pass, their gradients accumulated to --batch (the same "
                        f"step, less memory; default: all of --batch on a GPU, {CPU_MICRO_TOKENS} tokens' worth on "
                        "a CPU)")
    s.add_argument("--seq-len", type=positive_int, default=512,
                   help="tokens per training sequence (a random window of the train split), and per validation "
                        "window")
    s.add_argument("--lr", type=positive_float, default=3e-3,
                   help="peak AdamW learning rate, reached after --warmup steps, then cosine decay towards a tenth of "
                        "it, reached one step after the last (the last step's rate is a step short of it)")
    s.add_argument("--warmup", type=nonnegative_int, default=50,
                   help="steps of linear learning-rate warmup (0 = start at --lr)")
    s.add_argument("--weight-decay", type=nonnegative_float, default=0.1,
                   help="AdamW weight decay of the parameters with 2 or more dimensions (weight matrices, the "
                        "conv, Mamba1's A_log); 1-D ones (norms, biases, D, Mamba2's A_log) get none")
    s.add_argument("--clip", type=positive_float, default=1.0,
                   help="clip the gradients' global L2 norm to this")
    s.add_argument("--amp", default=None, type=str.lower, choices=sorted(AMP), help="default: bf16 on CUDA, none on CPU; fp16 trains with loss scaling (torch.amp.GradScaler)")
    s.add_argument("--device", default=None,
                   help="torch device: cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)")
    s.add_argument("--eval-every", type=positive_int, default=100,
                   help="steps between validation losses (logged to train_log.json), and at the last step")
    s.add_argument("--eval-batch", type=positive_int, default=8,
                   help="how many validation windows of --seq-len tokens each evaluation scores (the same ones "
                        "every time)")
    s.add_argument("--eval-tokens", type=eval_tokens, default=0,
                   help="final carried-state val perplexity on N tokens (0 = none, else >= 2: the first is not scored)")
    s.add_argument("--save-every", type=positive_int, default=200,
                   help="steps between saves of the training state (WORK_DIR/train_state.pt) and the fp16 "
                        "checkpoint in --out, and at the last step")
    s.add_argument("--seed", type=seed, default=0,
                   help="seed of the weight initialisation and of the training windows drawn")
    s.add_argument("--resume", action="store_true", help="continue from WORK_DIR/train_state.pt")
    s.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --out that holds a model (a previous run's), replacing that model; "
                        "other files there are kept")
    s.set_defaults(func=cmd_train)

    s = subparsers.add_parser("train-tokenizer", help="byte-level BPE on the stdlib train split")
    s.add_argument("out", help="new or empty folder for tokenizer.json and its configs")
    s.add_argument("--overwrite", action="store_true",
                   help="write into an existing folder, replacing its tokenizer files")
    s.add_argument("--vocab-size", type=bpe_vocab_size, default=4096,
                   help="vocabulary size, counting the 256 byte tokens and the special tokens; at least 300")
    s.set_defaults(func=cmd_train_tokenizer)


def main(argv=None) -> int:
    """`python -m mamba_deploy.train train ...`: the same verbs, errors and exit codes without
    importing every other stage (handy on a training machine that lacks the export dependencies)."""
    from .argtypes import Parser
    from .cli import main as cli_main

    def parser():
        p = Parser(prog="mamba-deploy")
        register(p.add_subparsers(dest="command", required=True))
        return p

    return cli_main(argv, build=parser)


if __name__ == "__main__":
    sys.exit(main())

