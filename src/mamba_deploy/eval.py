"""`mamba-deploy eval`: perplexity over any Runner, with the recurrent state carried across windows.

The token stream is cut into windows of W tokens; each window is prefilled from the state the
previous window left, so the model sees the whole stream as one sequence (what a recurrent
model is for) while memory stays bounded by W. Every token after the first is scored: the
last logits of a window predict the first token of the next one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .argtypes import is_whole
from .atomic import json_text
from .errors import ConfigError, ModelNotFoundError
from .inputs import first_out_of_vocab, token_stream


def ppl_of(mean_nll: float) -> float:
    """exp of a mean negative log-likelihood; math.exp overflows past ~709, and a broken
    artifact's perplexity is then infinite, not a traceback (eval and verify share this)."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def perplexity(runner, token_ids, window: int = 256, progress: bool = False,
               keep_logits: bool = False) -> dict:
    """token_ids: one stream (list / 1-D tensor / array). Returns dict(ppl, nll (mean, nats),
    tokens (scored), tokens_per_s (runner time only), window); with keep_logits also
    logits (n, vocab) float32, every position's logits (for parity checks)."""
    from .runners.base import require_runner

    require_runner(runner, "perplexity")
    ids = token_stream(token_ids, "token_ids")
    if ids.numel() < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens, got {ids.numel()}; give a longer text")
    if not is_whole(window, 1):
        raise ConfigError(f"window={window!r} must be an integer >= 1 (tokens per forward call)")
    vocab = runner.vocab_size
    bad = first_out_of_vocab(ids, vocab)
    if bad is not None:
        raise ConfigError(f"token id {bad} is outside the model's vocabulary [0, {vocab}); "
                          "tokenize with the model's own tokenizer")
    state = runner.new_state(1)
    total_nll, scored, runner_s = 0.0, 0, 0.0
    prev = None  # (V,) logits that predict the first token of the next window
    kept = []
    starts = range(0, ids.numel(), window)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="eval", unit="win")
    for s in starts:
        chunk = ids[s:s + window]  # (l,)
        t0 = time.perf_counter()
        logits, state = runner.prefill(chunk[None], state)
        runner_s += time.perf_counter() - t0
        logits = logits[0, :, :vocab]  # (l, V); drop rows only padding the vocab
        if prev is None:
            preds, targets = logits[:-1], chunk[1:]
        else:
            preds, targets = torch.cat([prev[None], logits[:-1]]), chunk
        prev = logits[-1]
        if keep_logits:
            kept.append(logits.float())
        if targets.numel():
            # float64 so the sum over many windows does not drift
            logp = torch.log_softmax(preds.double(), dim=-1)
            total_nll -= float(logp.gather(1, targets[:, None]).sum())
            scored += targets.numel()
    nll = total_nll / scored
    res = {"ppl": ppl_of(nll), "nll": nll, "tokens": scored,
           "tokens_per_s": ids.numel() / runner_s if runner_s > 0 else float("inf"), "window": window}
    if keep_logits:
        res["logits"] = torch.cat(kept)
    return res


def corpus_ids(tokenizer, corpus: str | None, text_file: str | None, progress: bool = True,
               max_tokens: int | None = None) -> list[int]:
    """Token ids of --text FILE or --corpus stdlib-val|stdlib-train, the first max_tokens of them."""
    from . import data
    from .tokenizer import encode_prefix

    if (corpus is None) == (text_file is None):
        raise ConfigError("give exactly one of --text FILE or --corpus stdlib-val|stdlib-train")
    if text_file is not None:
        p = Path(text_file).expanduser()  # as read_text_file and the model path do (--text=~/x is not expanded by the shell)
        if not p.is_file():
            raise ModelNotFoundError(f"--text {text_file!r} is not a file")
        return encode_prefix(tokenizer, data.read_text_file(p, "--text"), max_tokens)

    if corpus not in data.CORPORA:
        raise ConfigError(f"unknown corpus {corpus!r}; choose one of {', '.join(data.CORPORA)}")
    return data.encode_split(tokenizer, corpus.split("-", 1)[1], progress=progress)[:max_tokens].tolist()


def cmd_eval(args):
    from .cli import quiet_rank, runner_options, use_tokenizer
    from .runners import open_runner

    quiet = quiet_rank(args)
    runner = open_runner(args.model, args.backend, **runner_options(args))
    use_tokenizer(runner, args.tokenizer)
    progress = not (args.json or quiet)
    ids = corpus_ids(runner.tokenizer, args.corpus, args.text, progress=progress, max_tokens=args.max_tokens)
    if len(ids) < 2:  # perplexity's own message cannot name the flag to change
        fix = (f"--max-tokens {args.max_tokens} leaves {len(ids)}; raise it" if args.max_tokens is not None and
               args.max_tokens < 2 else f"{args.text or args.corpus} has {len(ids)}; give a longer text")
        raise ConfigError(f"perplexity needs at least 2 tokens: {fix}")
    res = perplexity(runner, ids, window=args.window, progress=progress)
    res.update(model=str(args.model), backend=runner.name, source=args.text or args.corpus)
    if args.baseline:
        from . import data

        train_ids = data.encode_split(runner.tokenizer, "train", progress=progress)
        res["unigram_ppl"] = data.unigram_perplexity(train_ids, ids[1:], runner.vocab_size)
    runner.close()
    if args.json:
        print(json_text(res))
    else:
        print(f"perplexity {res['ppl']:.3f}  (nll {res['nll']:.4f} nats over {res['tokens']} tokens, "
              f"window {res['window']}, {res['tokens_per_s']:.0f} tokens/s, backend {res['backend']})")
        if "unigram_ppl" in res:
            print(f"unigram baseline {res['unigram_ppl']:.1f}  (add-one smoothed stdlib train-split counts, same tokens)")


def register(subparsers):
    from .argtypes import backend_choice, positive_int
    from .cli import DEVICE_HELP, DTYPES, add_state_dtype, add_tensor_parallel, add_threads, add_tokenizer

    s = subparsers.add_parser("eval", help="perplexity with the recurrent state carried across windows")
    s.add_argument("model", help="checkpoint folder, ONNX folder or .gguf file")
    s.add_argument("--text", default=None, help="a UTF-8 text file")
    s.add_argument("--corpus", default=None, help="stdlib-val | stdlib-train (this Python's stdlib, see data.py)")
    s.add_argument("--max-tokens", type=positive_int, default=None,
                   help="use only the first N tokens of the text (N-1 are scored: the first has nothing before it)")
    s.add_argument("--window", type=positive_int, default=256, help="tokens per prefill window")
    s.add_argument("--backend", default=None, type=backend_choice,
                   help="torch | onnx | llama.cpp | ... (default: from the path)")
    add_tokenizer(s)
    s.add_argument("--device", default="cpu", help=DEVICE_HELP)
    s.add_argument("--dtype", default="fp32", type=str.lower, choices=sorted(DTYPES), help="torch backend dtype")
    add_state_dtype(s)
    add_threads(s)
    add_tensor_parallel(s, "eval")
    s.add_argument("--baseline", action="store_true",
                   help="also the add-one unigram perplexity from stdlib train-split counts, same tokens")
    s.add_argument("--json", action="store_true",
                   help="print the result (ppl, nll, tokens, tokens_per_s, window, ...) as one JSON object, "
                        "without the progress bar")
    s.set_defaults(func=cmd_eval)
