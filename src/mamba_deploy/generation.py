"""Sampling and the generation loop, written once against the Runner interface."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .argtypes import is_finite, is_seed, is_whole
from .errors import ConfigError, MambaDeployError, ShapeError
from .inputs import token_stream


F32_SMALLEST = float(np.finfo(np.float32).smallest_subnormal)
# sampling setting -> (valid, the rule as an error states it): SamplingConfig's checks, and serve's
# per-field 400s (serve_request.py), which name the field the client sent
SAMPLING_RULES = {
    "temperature": (lambda v: v >= 0, ">= 0 (0 = greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= -1, ">= 0 (0 or -1 = off, as in vLLM)"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "> 0 (1 = off)"),
}


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        values = (self.temperature, self.top_p, self.min_p, self.repetition_penalty)
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and is_finite(v) for v in values):
            raise ConfigError(f"bad sampling settings {self}: every value must be a finite number")
        # as floats: an int past int64 (10**20) reaches torch as a number it cannot convert
        self.temperature, self.top_p, self.min_p, self.repetition_penalty = map(float, values)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise ConfigError(f"bad sampling settings {self}: top_k must be an int (0 = off)")
        if not all(SAMPLING_RULES[k][0](getattr(self, k)) for k in ("temperature", "top_p", "min_p", "top_k")):
            raise ConfigError(
                f"bad sampling settings {self}: need temperature >= 0, 0 < top_p <= 1, 0 <= min_p <= 1, top_k >= 0 "
                "(or -1: off)")
        self.top_k = max(0, self.top_k)  # vLLM's -1 is this toolkit's 0: no top-k filter
        if not SAMPLING_RULES["repetition_penalty"][0](self.repetition_penalty):
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits, history, penalty: float):
    """CTRL-style: logits of tokens already seen are divided (if > 0) or multiplied by penalty.
    history: token ids (b, T), or a bool mask of the tokens seen (b, V), which costs the same
    whatever the context's length (Rows keeps one)."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    score = logits if history.dtype == torch.bool else logits.gather(1, history)
    score = torch.where(score < 0, score * penalty, score / penalty)
    # a tiny penalty sends a positive logit to +inf, and inf - max is NaN in the softmax: capped
    # at the dtype's largest finite value (-inf, from a huge penalty, is a token never drawn)
    score = score.clamp(max=torch.finfo(score.dtype).max)
    if history.dtype == torch.bool:
        return torch.where(history.to(logits.device), score, logits)
    return logits.scatter(1, history, score)


def filtered_probs(logits, cfg: SamplingConfig, history=None):
    """logits (b, V) -> the distribution sampled from (b, V), after the repetition penalty,
    temperature, top-k, top-p and min-p, in that order: transformers' order (its logits
    processors), checked against it in the tests. llama.cpp's default sampler chain divides by
    the temperature last, after top-k / top-p / min-p, so with T != 1 its nucleus can differ.
    top-p keeps the smallest set of most likely tokens whose mass reaches top_p; min-p keeps
    tokens of at least min_p x the top probability. Greedy (temperature 0) is not a distribution;
    use `sample`."""
    logits = _penalized(logits, cfg, history)
    # shift by the max first: with a tiny temperature logits / T overflows to inf (NaN softmax),
    # while (logits - max) / T only sends the non-max entries towards -inf. A T below float32's
    # smallest number (~1.4e-45) would round to 0 there (0 / 0 at the max): divide in float64.
    # (Compared as a float: casting a T past float32's range warned of an overflow.)
    top = logits.max(-1, keepdim=True).values
    check_finite_logits(top[:, 0])
    logits = logits - top
    if cfg.temperature < F32_SMALLEST:
        logits = logits.double()
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, -1)
    if cfg.top_p < 1.0:
        sp, idx = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp >= cfg.top_p  # the mass before a token already reaches top_p
        drop[:, 0] = False
        probs = probs.scatter(1, idx, sp.masked_fill(drop, 0.0))
    if cfg.min_p:  # relative to the top probability, so top-p's dropped mass does not matter
        probs = probs.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, 0.0)
    return (probs / probs.sum(-1, keepdim=True)).float()


def _penalized(logits, cfg: SamplingConfig, history):
    logits = logits.float()
    return logits if history is None else apply_repetition_penalty(logits, history, cfg.repetition_penalty)


def sample(logits, cfg: SamplingConfig, history=None, generator=None):
    """logits (b, V) -> token ids (b,). generator: a torch.Generator for the whole batch, None
    (torch's global one), or a list of row_generators' numpy generators, one per row: each row
    then draws only from its own, so a row samples the same whatever rows are beside it."""
    if cfg.temperature == 0:
        top, ids = _penalized(logits, cfg, history).max(-1)  # the argmax and its logit in one pass
        check_finite_logits(top)
        return ids
    probs = filtered_probs(logits, cfg, history)
    if isinstance(generator, (list, tuple)):
        return inverse_cdf(probs, [g.random() for g in generator])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_finite_logits(top) -> None:
    """top: each row's largest logit (b,). A row whose largest logit is NaN or +inf (torch's max
    propagates NaN), or -inf (every token ruled out), has no token to pick: greedy's argmax gave
    id 0 (often the EOS, so generation "stopped"), sampling raised torch's or numpy's own error.
    One check of b numbers per step; a row that merely holds some -inf (a padded vocabulary)
    passes."""
    if bool(torch.isfinite(top).all()):
        return
    bad = int((~torch.isfinite(top)).nonzero()[0, 0])
    raise ShapeError(f"row {bad}'s logits are not finite (largest {float(top[bad])}), so no token can be chosen: "
                     "the model's weights or the state it was given hold NaN or inf, or float16 overflowed; check "
                     "the model with `mamba-deploy verify`, run it in float32 or bfloat16, or start from "
                     "model.new_state()")


def inverse_cdf(probs, uniforms) -> torch.Tensor:
    """probs (b, V), uniforms: b numbers in [0, 1) -> ids (b,): per row the first token whose
    cumulative probability passes u x the row's total (float64 sums, on probs' device). A token of
    probability 0 (filtered out, padded vocabulary) is never the answer: its cumulative sum
    equals its predecessor's, and a u x total that rounds up to the total takes the row's last
    token of positive probability."""
    cdf = probs.double().cumsum(-1)  # (b, V)
    total = cdf[:, -1]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):  # torch.multinomial refuses these too
        bad = int((~(torch.isfinite(total) & (total > 0))).nonzero()[0, 0])
        raise ShapeError(f"row {bad}'s probabilities are NaN, infinite or all zero (its logits hold NaN or inf); the "
                         "model's weights or the state it was given are broken: check the model with mamba-deploy "
                         "verify")
    u = torch.tensor(uniforms, dtype=torch.float64, device=probs.device)
    ids = torch.searchsorted(cdf, (u * total).unsqueeze(-1), right=True)[:, 0]  # (b,)
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)  # (b,)
    return torch.minimum(ids, last)


def row_generators(seed, rows: int) -> list | None:
    """One generator per row, each seeded with `seed` (None: torch's global generator), as a
    request alone gets: a prompt samples the same text with seed s alone or listed beside
    others (so identical prompts with one seed give identical texts). `generate` and the server's
    scheduler both sample through these. numpy's PCG64, not a torch.Generator: torch's CPU
    generator keeps 32 bits of its seed, so seeds 1, 2**32 + 1 and 2**62 + 1 gave one text;
    PCG64 takes all 64 (and the server's seeds up to 2**63 - 1)."""
    if seed is None:
        return None
    return [np.random.Generator(np.random.PCG64(int(seed))) for _ in range(rows)]  # int(): a numpy integer


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt (a stop token excluded; a stop string's tokens kept)
    prompt_tokens: list[list[int]]
    texts: list[str] | None = None  # new tokens decoded after the prompt's last ones, ending before a stop string
    stop_reasons: list[str] = field(default_factory=list)


def check_stop_strings(stop_strings) -> list[str]:
    """A string or a list of non-empty strings -> a list ([] for None)."""
    if stop_strings is None:
        return []
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if not isinstance(stop_strings, (list, tuple)) or not all(isinstance(s, str) and s for s in stop_strings):
        raise ConfigError(f"stop strings must be non-empty strings, got {stop_strings!r:.80}")
    return list(stop_strings)


def first_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Where the first stop string starts in a row's decoded completion so far (searching from
    `start`), or None. Trailing incomplete characters (decoded as U+FFFD) are not searched yet."""
    text = text.rstrip("\ufffd")
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


# prompt tokens decoded before a completion, as vLLM's incremental detokenizer starts its prefix
# offset (5 tokens back): decoders treat a text's first token specially (SentencePiece drops its
# word-start space: "hello" + "▁world" is " world", not the "world" decoding it alone gives)
CONTEXT_TOKENS = 5
MAX_CONTEXT_TOKENS = 80  # how far back context_ids looks past text-less tokens


def context_ids(tok, prompt) -> list[int]:
    """The last prompt tokens a completion is decoded after (`decode_after`). Tokens that decode
    to nothing (a chat template's closing control tokens, a lone <s>) leave a decoder at the
    start of its text, so the context reaches back past them, within MAX_CONTEXT_TOKENS."""
    prompt = list(prompt)
    n = min(CONTEXT_TOKENS, len(prompt))
    while n < min(len(prompt), MAX_CONTEXT_TOKENS) and not tok.decode(prompt[-n:]):
        n = min(2 * n, len(prompt), MAX_CONTEXT_TOKENS)
    return prompt[len(prompt) - n:]


def decode_after(tok, ids: list[int], n: int) -> str:
    """The text ids[n:] add after the context ids[:n]: decode(ids) less decode(ids[:n]), as
    decoding the whole sequence and cutting the prompt's text off gives it. A context that ends
    inside a character the completion finishes (U+FFFD alone) is cut before that character,
    which the completion then holds; a decoder that rewrote the context's own text (a space
    clean-up across the join) leaves the completion decoded alone."""
    full = tok.decode(ids)
    if not n:
        return full
    head = tok.decode(ids[:n])
    if not full.startswith(head):
        head = head.rstrip("\ufffd")
        if not full.startswith(head):
            return tok.decode(ids[n:])
    return full[len(head):]


def completion_texts(tok, res: "Generation") -> list[str]:
    """res.texts, or each row's new tokens decoded after its prompt (token-id prompts without
    stop strings, whose Generation holds no text)."""
    if res.texts is not None:
        return list(res.texts)
    return [decode_after(tok, ctx + out, len(ctx))
            for ctx, out in ((context_ids(tok, p), list(o)) for p, o in zip(res.prompt_tokens, res.tokens))]


class IncrementalText:
    """The decoded text of a growing list of token ids, and where the first stop string starts,
    for O(1) decoding per token instead of decoding the whole completion each time (a 16k-token
    stream spent 24 s decoding). As in vLLM's incremental detokenizer, the new text is
    decode(ids[p:]) minus decode(ids[p:r]) over a window that starts one push back, so decoders
    that treat a text's first token specially (SentencePiece's leading space) stay right; the
    first window starts in the prompt's last tokens (`context`, see context_ids), whose text is
    not part of the result. A character still incomplete (U+FFFD) keeps the window open until it
    completes. A decoder that revised earlier text (transformers' space clean-up: "it '" + "s" ->
    "it's") is decoded whole again (after the context) at that token."""

    def __init__(self, tok, stops=(), context=()):
        self.tok, self.stops = tok, list(stops)
        self.n_ctx = len(context)
        self.ids: list[int] = list(context)  # the context, then the completion's ids
        self.stable, self.text = "", ""  # text = stable + a tail that may still change
        self.p, self.r = 0, self.n_ctx  # window start and end of the stable ids
        self.cut: int | None = None  # where the first stop string starts, once found
        self._from = 0  # the stop search resumes here
        self._longest = max((len(x) for x in self.stops), default=1)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix = self.tok.decode(self.ids[self.p:self.r])
        window = self.tok.decode(self.ids[self.p:])
        if not window.startswith(prefix):  # a revision of earlier text (or of an incomplete context's)
            self.text = decode_after(self.tok, self.ids, self.n_ctx)
            self._from = 0
            if not self.text.endswith("\ufffd"):
                self.stable, self.r = self.text, len(self.ids)  # the window keeps its start
        else:
            new = window[len(prefix):]
            self.text = self.stable + new
            if not new.endswith("\ufffd"):
                # the next window starts at these tokens only if they decode to more than
                # whitespace: a window that starts with text-less tokens (a skipped special) or a
                # lone space ("▁") would make the next token its first, whose leading space (all
                # leading whitespace, with SentencePiece's remove_extra_whitespaces) is dropped
                # (held for WINDOW_HOLD tokens at most: a long run of them, say blank lines, would
                # be decoded again at every token)
                hold = not new.strip(" ") and len(self.ids) - self.p <= WINDOW_HOLD
                self.stable, self.p, self.r = self.text, self.p if hold else self.r, len(self.ids)
        if self.stops and self.cut is None:
            self.cut = first_stop(self.text, self.stops, self._from)
            self._from = max(0, len(self.text.rstrip("\ufffd")) - self._longest + 1)
        return self.text

    def final(self) -> str:
        """The whole completion decoded at once after its context, cut before a stop string."""
        return decode_after(self.tok, self.ids, self.n_ctx)[:self.cut]


WINDOW_HOLD = 32  # tokens an IncrementalText window may keep behind it for a text-less start


class TextStream:
    """Incremental text of one row for streaming. An incomplete multi-byte character is held
    back and, with stop strings, so are the last (longest - 1) characters, which could be the
    start of one; nothing from a stop string on is emitted (the stream finds stop strings as
    `generate` does). `finish()` emits the rest, so the concatenation is the text `generate`
    returns, for decoders whose text only grows at its end (every tokenizer here: `tokenizers`'
    byte-level BPE, and llama.cpp's token pieces). `prompt` (its token ids, or the text, which
    is encoded as `generate` encodes it) is where the completion starts: without it, the first
    token is decoded as a text's first (a SentencePiece word start loses its space)."""

    def __init__(self, tok, stop_strings=None, prompt=None):
        stops = check_stop_strings(stop_strings)
        _check_stream_tokenizer(tok)
        self.tok, self.sent = tok, 0
        self.hold = max((len(s) for s in stops), default=1) - 1
        if tok is not None and isinstance(prompt, str):
            prompt = tok.encode(prompt)
        elif prompt is not None:
            prompt = _stream_prompt_ids(prompt)
        context = context_ids(tok, prompt) if tok is not None and prompt is not None else ()
        self.inc = IncrementalText(tok, stops, context) if tok is not None else None

    def push(self, token: int) -> str:
        inc = self.inc
        if inc is None or inc.cut is not None:  # no tokenizer, or past a stop string: no more text
            return ""
        text = inc.push(token)
        end = len(text.rstrip("\ufffd")) - self.hold if inc.cut is None else inc.cut
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta

    def finish(self) -> str:
        if self.inc is None:
            return ""
        delta = self.inc.final()[self.sent:]  # the whole decode, once
        self.sent += len(delta)
        return delta


def _check_stream_tokenizer(tok) -> None:
    """Refused at construction: a path or anything else without decode failed at the first push."""
    if tok is not None and not callable(getattr(tok, "decode", None)):
        raise ConfigError(f"TextStream needs a loaded tokenizer (runner.tokenizer, or "
                          f"mamba_deploy.tokenizer.load_tokenizer(folder)) or None, got {type(tok).__name__} "
                          f"{tok!r:.80}")


def _stream_prompt_ids(prompt) -> list[int]:
    """A TextStream prompt given as ids -> a list of ints. bytes are refused: iterated, b"def"
    was the ids [100, 101, 102], a prompt nobody meant."""
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise ShapeError(f"TextStream's prompt must be the prompt's text (a str) or its token ids, got "
                         f"{type(prompt).__name__} {bytes(prompt)!r:.60}; decode the bytes first")
    return token_stream(prompt, "TextStream's prompt").tolist()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """-> ids (b, L), attention_mask (b, L) or None when all lengths are equal."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, L - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, L - len(p):] = 1
    return ids, (None if bool(mask.all()) else mask)


def generate(runner, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             stop_token_ids: Sequence[int] | None = None, seed: int | None = None,
             on_token: Callable[[int, int], None] | None = None, stop_strings=None,
             prefill_chunk: int | None = None, on_prefill: Callable[[int, int], None] | None = None) -> Generation:
    """Generate for a batch of prompts (strings or token-id lists) of any lengths.

    Prompts are left-padded and masked so padding never enters the recurrent state. Each
    sequence stops at a stop token (default: the model's end ids, the tokenizer's EOS and, for
    a GGUF, its end-of-turn tokens, for string and token-id prompts alike, as transformers'
    generate stops at the EOS; `stop_token_ids=[]` runs past them), at
    the first of `stop_strings` in its decoded text (the text is cut before it; the tokens that
    produced it are kept), or after max_new_tokens. `on_token(batch_index, token_id)` streams
    tokens as they come (`TextStream` turns them into text that never shows a stop string).
    prefill_chunk: feed the prompts in pieces of at most this many positions (None: in one
    call), which bounds the prefill's activation memory; `on_prefill(done, total)` runs after
    each piece (a progress bar, or a check that raises to abandon the request).
    """
    for name, fn in (("on_token", on_token), ("on_prefill", on_prefill)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"{name} must be a function (or None), got {type(fn).__name__} {fn!r:.40}")
    check_prefill_chunk(prefill_chunk)
    req = prepare_request(runner, prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                          stop_token_ids, seed, stop_strings)
    ids, mask = left_pad(req.ids_list)
    logits, state = prefill_in_chunks(runner, ids, mask, runner.new_state(len(ids)), prefill_chunk, on_prefill)
    rows = req.rows()
    for t in range(max_new_tokens):
        nxt = rows.sample(logits, req.scfg, req.generators, runner.vocab_size)
        rows.push(nxt, on_token)
        if rows.all_done or t == max_new_tokens - 1:
            break
        logits, state = runner.step(nxt, state)
    return rows.result(req.as_text)


@dataclass
class Request:
    """One generate call's inputs, checked and tokenized (prepare_request)."""
    ids_list: list[list[int]]
    tok: object  # the tokenizer, or None when neither the prompts nor stop strings need one
    as_text: bool
    stops: torch.Tensor  # stop token ids
    stop_strings: list[str]
    scfg: SamplingConfig
    generators: list | None  # one seeded per row (row_generators), or None: torch's global one
    max_new_tokens: int

    def rows(self) -> "Rows":
        return Rows(self.ids_list, self.tok, self.stops, self.stop_strings)


def prepare_request(runner, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                    stop_token_ids=None, seed=None, stop_strings=None) -> Request:
    """generate's arguments checked and the prompts tokenized, before any model work: what
    `generate` and the server's scheduler (batching.py) refuse is refused the same way."""
    from .runners.base import require_runner

    require_runner(runner, "generate", "runners.open_runner(path) (or call model.generate on a model)",
                   duck=("new_state", "prefill", "step", "vocab_size"))
    _check_counts(max_new_tokens, seed)
    stop_strings = check_stop_strings(stop_strings)
    ids_list, tok, as_text, stops = _prepare(runner, prompts, stop_token_ids, stop_strings)
    scfg = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    gens = row_generators(seed, len(ids_list))
    return Request(ids_list, tok, as_text, stops, stop_strings, scfg, gens, int(max_new_tokens))


class Rows:
    """The per-row bookkeeping of one request's batch: tokens so far, stop tokens and strings,
    why each row ended. `generate` and the server's continuous batching (batching.py) both
    run their rows through it, so a request decodes the same either way."""

    def __init__(self, ids_list, tok, stops: torch.Tensor, stop_strings: list[str]):
        b = len(ids_list)
        self.prompts, self.tok, self.stops, self.stop_strings = ids_list, tok, stops, stop_strings
        self.seen = None  # (b, V) bool: the tokens of each row so far, made by the first penalized sample
        self.out = [[] for _ in range(b)]
        self.reasons = ["length"] * b
        self.done = [False] * b
        self.cuts: list[int | None] = [None] * b
        # each row's text is decoded after its prompt's last tokens, as a stream's (TextStream) is
        self.context = [context_ids(tok, p) for p in ids_list] if tok is not None else None
        self.texts = [IncrementalText(tok, stop_strings, c) for c in self.context] if stop_strings else None

    def __len__(self) -> int:
        return len(self.out)

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def sample(self, logits, scfg: SamplingConfig, gen, vocab: int):
        """logits (b, V) of these rows -> next tokens (b,); gen: the request's generators, one
        per row (row_generators), or None. Every row draws, done or not."""
        if scfg.repetition_penalty != 1.0 and self.seen is None:
            # a mask, not the id lists: a step's cost does not grow with the prompt and output
            self.seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            for i, (p, o) in enumerate(zip(self.prompts, self.out)):
                self.seen[i, torch.as_tensor(list(p) + o, dtype=torch.long, device=logits.device)] = True
        return sample(_mask_padded_vocab(logits, vocab), scfg, self.seen, gen)

    def push(self, nxt, on_token=None) -> None:
        """Takes each unfinished row's next token (nxt (b,)): a stop token ends the row unseen,
        others are kept and streamed (`on_token(row, token)`), a stop string ends it after."""
        # one transfer of the whole batch: int(nxt[i]) synchronized with a GPU once per row
        tokens = nxt.tolist() if hasattr(nxt, "tolist") else list(nxt)
        for i in range(len(self.out)):
            if self.done[i]:
                continue
            token = int(tokens[i])
            if self.stops.numel() and bool((self.stops == token).any()):
                self.done[i] = True
                self.reasons[i] = "stop"
                continue
            self.out[i].append(token)
            if self.seen is not None:
                self.seen[i, token] = True
            if on_token is not None:
                on_token(i, token)
            if self.texts is not None:
                self.texts[i].push(token)
                self.cuts[i] = self.texts[i].cut
                if self.cuts[i] is not None:
                    self.done[i] = True
                    self.reasons[i] = "stop"

    def result(self, as_text: bool) -> Generation:
        texts = None
        if as_text or self.stop_strings:  # the whole decode once, after the prompt's last tokens
            texts = [decode_after(self.tok, c + o, len(c))[:cut]
                     for c, o, cut in zip(self.context, self.out, self.cuts)]
        return Generation(self.out, self.prompts, texts, list(self.reasons))


def prefill_in_chunks(runner, ids, mask, state, chunk: int | None = None, on_chunk=None):
    """Left-padded ids (b, l) and their mask (or None) -> (last position's logits (b, V), state),
    fed to runner.prefill `chunk` positions at a time (prefill_pieces); `on_chunk(done, total)`
    after each piece."""
    for done, logits, state in prefill_pieces(runner, ids, mask, state, chunk):
        if on_chunk is not None:
            on_chunk(done, ids.shape[1])
    return logits, state


def prefill_pieces(runner, ids, mask, state, chunk: int | None = None, last_only: bool = True):
    """Yields (positions done, last position's logits (b, V), state) after each piece of at most
    `chunk` positions (None: one piece; a masked prompt: at most the runner's max_masked_length).
    A row whose padding outlasts a piece goes through it all-masked, which leaves its state fresh
    (zero), so the next piece may still pad it (the Runner's fresh-state rule holds piece by
    piece). A piece without padding goes without a mask. last_only False: every position's
    logits (b, piece, V)."""
    l = ids.shape[1]
    step = l if chunk is None else chunk
    cap = getattr(runner, "max_masked_length", None)
    if mask is not None and cap and not bool(mask.all()):
        step = min(step, cap)  # TensorRT refused a masked prompt past its engine's max_seq
    for start in range(0, l, step):
        m = None if mask is None else mask[:, start:start + step]
        logits, state = runner.prefill(ids[:, start:start + step], state,
                                       attention_mask=None if m is None or bool(m.all()) else m, last_only=last_only)
        yield min(start + step, l), logits[:, -1] if last_only else logits, state


def check_prefill_chunk(chunk) -> None:
    if chunk is not None and not is_whole(chunk, 1):
        raise ConfigError(f"prefill_chunk must be an int >= 1 (or None for one piece), got {chunk!r}")


def _check_counts(max_new_tokens, seed) -> None:
    if not is_whole(max_new_tokens, 0):
        raise ConfigError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if seed is not None and not is_seed(seed):
        raise ConfigError(f"seed must be an int in 0..2**64-1 (or None), got {seed!r}")


def check_request(runner, prompts, stop_token_ids=None, stop_strings=None) -> None:
    """What generate() would refuse before its first token (an empty prompt, text without a
    tokenizer, stop ids outside the vocabulary), checked without running the model: for callers
    that print something first (the CLI echoes the prompt), so an error is not glued to it."""
    _prepare(runner, prompts, stop_token_ids, check_stop_strings(stop_strings))


def stops_with_eos(tokenizer, stop_token_ids, runner=None):
    """The stop ids of a prompt from the CLI or the server: the caller's plus the model's end
    ids, as llama.cpp and vLLM stop at EOS beside any stop ids (`--stop 13` used to replace it,
    and generation ran on past the end of text). generate() itself adds them only where the
    caller gives no stop ids. tokenizer None: the end ids of `runner`'s model (model_end_ids)."""
    eos = end_ids(tokenizer) if tokenizer is not None else model_end_ids(runner)
    if stop_token_ids is None:
        return eos or None
    return sorted(set(stop_token_ids) | set(eos))


def model_end_ids(runner) -> list[int]:
    """The end ids of a runner's model for token-id prompts, which need no tokenizer: its
    tokenizer's (end_ids) where one loads, else the config's eos_token_id. transformers'
    generate stops at the EOS whatever form the prompt has; without it a token-id prompt ran past
    the end of its text into the next document."""
    try:  # a tokenizer of a larger vocabulary (set_tokenizer) may name ids this model lacks
        return [i for i in end_ids(runner.tokenizer) if 0 <= i < runner.vocab_size]
    except MambaDeployError:  # no tokenizer beside the artifact: token ids still run
        eos = getattr(runner.config, "eos_token_id", None)
        return [eos] if isinstance(eos, int) and 0 <= eos < runner.vocab_size else []


def end_ids(tokenizer) -> list[int]:
    """The ids that end a text: the EOS and, for a GGUF, its eot / eom tokens (llama.cpp's
    end-of-generation set), which a chat model samples at the end of its turn."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return ids + [i for i in getattr(tokenizer, "end_token_ids", ()) if i not in ids]


def _prepare(runner, prompts, stop_token_ids, stop_strings):
    """Prompts -> (token id lists, tokenizer or None, whether prompts were text, stop ids tensor).
    The tokenizer is needed for text prompts and for stop strings (found in decoded text)."""
    prompts = _as_prompt_list(prompts)
    as_text = isinstance(prompts[0], str)
    tok = runner.tokenizer if as_text or stop_strings else None
    ids_list = [tok.encode(p) if as_text else [int(t) for t in p] for p in prompts]
    if any(len(p) == 0 for p in ids_list):
        raise ShapeError("a prompt is empty; give at least one token")
    if stop_token_ids is None:  # the model's end ids by default, for token-id prompts too
        stop_token_ids = end_ids(tok) if as_text else model_end_ids(runner)
    vocab = runner.vocab_size
    if isinstance(stop_token_ids, numbers.Integral):
        stop_token_ids = [stop_token_ids]
    elif hasattr(stop_token_ids, "tolist"):  # a numpy array or tensor
        stop_token_ids = stop_token_ids.tolist()
        if not isinstance(stop_token_ids, list):  # a 0-d one: one id
            stop_token_ids = [stop_token_ids]
    if not isinstance(stop_token_ids, (list, tuple, set, range)) or not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in stop_token_ids):
        raise ConfigError(f"stop_token_ids must be integer token ids, got {stop_token_ids!r:.80}")
    bad = [t for t in stop_token_ids if not 0 <= int(t) < vocab]
    if bad:
        raise ConfigError(f"stop token id(s) {bad} outside the vocabulary [0, {vocab}): they could never stop "
                          "generation; check the ids against the tokenizer")
    return ids_list, tok, as_text, torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long)


def _as_prompt_list(prompts) -> list:
    """A string, a list of ids, a 1-D tensor, a 2-D tensor (rows) or a list of those -> a
    non-empty list of strings / id sequences, all strings or all ids."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() not in (1, 2) or prompts.dtype.is_floating_point:
            raise ShapeError(f"tensor prompts must be integer ids (l,) or (b, l), got {prompts.dtype} "
                             f"{tuple(prompts.shape)}")
        prompts = [prompts.tolist()] if prompts.dim() == 1 else prompts.tolist()
    elif isinstance(prompts, np.ndarray):
        if prompts.dtype.kind not in "iu":
            raise ShapeError(f"array prompts must be integer ids (l,) or (b, l), got {prompts.dtype} {prompts.shape}")
        return _as_prompt_list(torch.from_numpy(np.ascontiguousarray(prompts, dtype=np.int64)))
    elif isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                      and _is_id(prompts[0])):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ShapeError(f"prompts must be a string, a list of token ids, or a non-empty list of those; "
                         f"got {prompts!r:.80}")
    prompts = [p.tolist() if isinstance(p, (torch.Tensor, np.ndarray)) else p for p in prompts]
    if len({isinstance(p, str) for p in prompts}) > 1:
        raise ShapeError("prompts mix strings and token-id lists; give one kind")
    for p in prompts:
        if not isinstance(p, str) and not (isinstance(p, (list, tuple)) and all(_is_id(t) for t in p)):
            raise ShapeError(f"a prompt must be a string or a list of integer token ids, got {p!r:.80}")
    return list(prompts)


def _is_id(t) -> bool:
    """An integer token id: int, numpy integer or a 0-d integer tensor (not bool)."""
    if isinstance(t, torch.Tensor):
        return t.dim() == 0 and not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool
    return is_whole(t)


def _mask_padded_vocab(logits, vocab: int):
    if logits.shape[-1] > vocab:  # rows added only to pad the vocab never win
        logits = logits.clone()
        logits[:, vocab:] = -float("inf")
    return logits
