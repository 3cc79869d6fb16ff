"""The request schema of `mamba-deploy serve` (serve.py): a JSON body -> generate() arguments,
or a RequestError naming the offending field (a 4xx with OpenAI's error shape)."""

from __future__ import annotations

import json

from .argtypes import is_finite
from .errors import ConfigError, MambaDeployError
from .tokenizer import check_text

# request field -> (accepted JSON types, default, generate() keyword). bool is rejected where int
# or float is expected (JSON true is not a number).
FIELDS = {
    "max_tokens": ((int,), 16, "max_new_tokens"),
    "temperature": ((int, float), 1.0, "temperature"),
    "top_p": ((int, float), 1.0, "top_p"),
    "top_k": ((int,), 0, "top_k"),
    "min_p": ((int, float), 0.0, "min_p"),
    "repetition_penalty": ((int, float), 1.0, "repetition_penalty"),
    "seed": ((int,), None, "seed"),
}
# OpenAI fields we accept only at their no-op value: field -> (allowed values, why / what to use instead)
UNSUPPORTED = {
    # a seed samples each prompt of a request as that prompt alone (generation.row_generators),
    # so repeated prompts with one seed would be copies: the hint says so
    "n": ((None, 1), "only n=1 is supported; send the prompt several times in `prompt` for more (without a "
                     "`seed`: with one, identical prompts give identical texts)"),
    "best_of": ((None, 1), "best_of is not supported"),
    "echo": ((None, False), "echo is not supported"),
    "logprobs": ((None,), "logprobs are not supported"),
    "suffix": ((None,), "suffix is not supported"),
    # OpenAI's clients send 0 for both by default; another value would be silently not applied
    "presence_penalty": ((None, 0), "presence_penalty is not supported; use `repetition_penalty` (> 1 penalizes "
                                    "tokens already in the prompt or the output)"),
    "frequency_penalty": ((None, 0), "frequency_penalty is not supported; use `repetition_penalty` (> 1 penalizes "
                                     "tokens already in the prompt or the output)"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
}
# OpenAI's stream_options: include_obfuscation pads chunks against length side channels, which
# this server does not do (accepted: it asks for nothing a client reads)
STREAM_OPTIONS = {"include_usage", "include_obfuscation"}
# chat fields a language model without tools or constrained decoding cannot honour: dropping
# them would answer something else than was asked (free text for a JSON response_format)
CHAT_UNSUPPORTED = {
    "tools": ((None, []), "tools (function calling) are not supported; describe the task in `messages`"),
    "tool_choice": ((None, "none", "auto"), "tool_choice is not supported (there are no tools)"),
    "functions": ((None, []), "functions (function calling) are not supported; describe the task in `messages`"),
    "function_call": ((None, "none", "auto"), "function_call is not supported (there are no functions)"),
    "response_format": ((None, {"type": "text"}), "only {\"type\": \"text\"} is supported (no constrained "
                                                  "decoding); ask for the format in `messages`"),
    "top_logprobs": ((None, 0), "top_logprobs is not supported (nor are logprobs)"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "audio": ((None,), "audio output is not supported"),
}
# fields read elsewhere (serve.py, parse_completion_request) and OpenAI fields that change nothing a
# model here computes (bookkeeping, caching hints): accepted. Any other name is refused as OpenAI
# refuses it ("Unrecognized request argument"): a misspelt `max_token` silently ignored would
# answer with other settings than the client asked for.
COMMON_FIELDS = {"model", "stream", "stream_options", "stop", "stop_token_ids", "ignore_eos",
                 "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"} | set(FIELDS) | set(UNSUPPORTED)
CHAT_FIELDS = (COMMON_FIELDS | {"messages", "max_completion_tokens", "parallel_tool_calls", "prediction"}
               | set(FIELDS) | set(UNSUPPORTED) | set(CHAT_UNSUPPORTED))
MAX_STOP_STRINGS = 4  # OpenAI's limit
SEED_RANGE = (0, 2**63 - 1)

class RequestError(Exception):
    """A client error: becomes a 4xx JSON error naming the problem."""

    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error", param=None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        # `code`: OpenAI's machine-readable string ("model_not_found", ...) or None, never the status
        self.status, self.type, self.param, self.code = status, type_, param, code
        self.headers = headers or {}  # sent with the error (a 405's Allow)

    def payload(self) -> dict:
        return error_payload(str(self), self.type, self.param, self.code)


def error_payload(message: str, type_: str, param=None, code: str | None = None) -> dict:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def check_model(body, served: str) -> None:
    """The request's `model`, when sent, names the model this server serves (OpenAI answers
    another name with a 404 `model_not_found`; a server that answered with its own model anyway
    would hide a client sent to the wrong server). Absent or null: accepted (curl, scripts)."""
    if not isinstance(body, dict) or body.get("model") is None:
        return
    name = body["model"]
    if not isinstance(name, str):
        raise RequestError(f"`model` must be a string, got {json.dumps(name)[:80]}", param="model")
    if name != served:
        raise RequestError(f"the model {name!r} does not exist; this server serves {served!r} (send "
                           f"\"model\": {json.dumps(served)}, or start it with --model-name {name})", 404,
                           param="model", code="model_not_found")


def refuse_unsupported(body: dict, table: dict) -> None:
    """A 400 naming the first field of `table` (UNSUPPORTED, CHAT_UNSUPPORTED) sent with a value
    other than its no-op ones."""
    for name, (allowed, why) in table.items():
        if name in body and not any(_same(body[name], a) for a in allowed):
            raise RequestError(f"`{name}`={json.dumps(body[name])[:80]}: {why}", param=name)


def _same(v, a) -> bool:
    """v is the no-op value `a` in `a`'s JSON type: Python has True == 1 and 1.0 == 1, so `"n":
    true` or `"echo": 0` passed as no-ops. A zero may come as 0.0 (a penalty is a JSON number)."""
    if isinstance(a, int) and not isinstance(a, bool) and isinstance(v, float):
        return a == 0 and v == 0
    return type(v) is type(a) and v == a


def refuse_unknown(body, known: set) -> None:
    """A 400 naming the first request field this server does not know, with the nearest known
    name when it looks like a misspelling."""
    import difflib

    if not isinstance(body, dict):
        return  # parse_completion_request's own error names that
    for name in body:
        if name not in known:
            near = difflib.get_close_matches(str(name), sorted(known), n=1)
            hint = f"; did you mean `{near[0]}`?" if near else f"; known fields: {', '.join(sorted(known))}"
            raise RequestError(f"unrecognized request argument supplied: `{name}`{hint}", param=name)


def _typed(body: dict, name: str, types, default):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, types):
        want = " or ".join("an integer" if t is int else "a number" for t in types)
        raise RequestError(f"`{name}` must be {want}, got {json.dumps(v)[:80]}", param=name)
    if float in types:
        if not is_finite(v):  # JSON 1e999 parses to inf; JSON 1 and 400 zeros is past float's range
            raise RequestError(f"`{name}` must be a finite number, got {json.dumps(v)[:80]}", param=name)
        return float(v)  # an integer past int64 (JSON 10**20) would reach torch as an int it cannot convert
    return v


def _check_max_tokens(n: int, name: str, limit: int) -> int:
    """1 <= n <= the server's --max-tokens-limit; the error names the field as the client sent it."""
    if not 1 <= n <= limit:
        raise RequestError(f"`{name}` must be in [1, {limit}], got {n}", param=name)
    return n


def _flag(v, name: str, param: str) -> bool:
    """An optional JSON boolean: null is OpenAI's "not given" (false), anything else but true/false
    is refused rather than read as truthy ("no" would mean yes)."""
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(f"`{name}` must be true or false, got {json.dumps(v)[:80]}", param=param)
    return v


def _parse_prompts(prompt, max_batch: int, vocab_size: int):
    """-> (list of prompts, all strings or all token-id lists, as_text)."""
    if prompt is None:
        raise RequestError("`prompt` is required: a string, a list of strings, or token-id list(s)", param="prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        prompts = [prompt]  # one text, or one token-id list
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    elif isinstance(prompt, list):
        raise RequestError("`prompt` is an empty list; give at least one prompt", param="prompt")
    else:
        raise RequestError(f"`prompt` must be a string or a list, got {type(prompt).__name__}", param="prompt")
    if len(prompts) > max_batch:
        raise RequestError(f"{len(prompts)} prompts exceed this server's --max-batch {max_batch}; "
                           "split the request", param="prompt")
    as_text = all(isinstance(p, str) for p in prompts)
    if not as_text:
        for i, p in enumerate(prompts):
            if not (isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)):
                raise RequestError(f"prompt {i} is not a token-id list; a list `prompt` holds either strings "
                                   "or token-id lists, not both", param="prompt")
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise RequestError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})",
                                   param="prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise RequestError(f"prompt {i} is empty; give at least one character or token", param="prompt")
        if as_text:
            try:
                check_text(p)
            except ConfigError as e:  # "\ud800" is valid JSON: the client's 400, not a 500 at encode
                raise RequestError(f"prompt {i}: {e}", param="prompt") from None
    return prompts, as_text


def _parse_stop(stop) -> list[str] | None:
    """OpenAI's `stop`: null, a string, or a list of up to 4 strings ("" and [] mean none)."""
    from .generation import check_stop_strings

    if stop is None or stop == "" or stop == []:
        return None
    try:  # generate's own check
        stops = check_stop_strings(stop)
    except ConfigError as e:
        raise RequestError(f"`stop` must be a string or a list of non-empty strings, got {json.dumps(stop)[:80]}",
                           param="stop") from e
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"`stop` has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop")
    return stops


def parse_completion_request(body, max_batch: int, vocab_size: int, max_tokens_limit: int):
    """JSON body -> (prompts, as_text, generate() keyword arguments, stream, include_usage).
    Raises RequestError naming the offending field."""
    from .generation import SAMPLING_RULES, SamplingConfig

    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    refuse_unsupported(body, UNSUPPORTED)
    prompts, as_text = _parse_prompts(body.get("prompt"), max_batch, vocab_size)
    kw = {key: _typed(body, name, types, default) for name, (types, default, key) in FIELDS.items()}
    if body.get("max_tokens") is None:  # not sent: the default, within this server's limit (a limit
        kw["max_new_tokens"] = min(kw["max_new_tokens"], max_tokens_limit)  # below it refused every such request)
    _check_max_tokens(kw["max_new_tokens"], "max_tokens", max_tokens_limit)
    if kw["seed"] is not None and not SEED_RANGE[0] <= kw["seed"] <= SEED_RANGE[1]:
        raise RequestError(f"`seed` must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {kw['seed']}", param="seed")
    for name, (valid, rule) in SAMPLING_RULES.items():
        if not valid(kw[FIELDS[name][2]]):
            raise RequestError(f"`{name}` must be {rule}, got {json.dumps(body[name])[:80]}", param=name)
    try:  # generation's own check, before anything is sent (a stream cannot change its status later)
        SamplingConfig(kw["temperature"], kw["top_k"], kw["top_p"], kw["min_p"], kw["repetition_penalty"])
    except (MambaDeployError, ValueError) as e:  # the client's settings: a 400, never a 500
        raise RequestError(str(e)) from e
    stops = body.get("stop_token_ids")
    if stops is not None:
        if isinstance(stops, int) and not isinstance(stops, bool):
            stops = [stops]
        if not (isinstance(stops, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in stops)):
            raise RequestError(f"`stop_token_ids` must be a list of integers, got {json.dumps(stops)[:80]}",
                               param="stop_token_ids")
        # generate() checks this too, but only once a stream's 200 is out; here it is still a 400
        bad = [t for t in stops if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"`stop_token_ids` has id {bad[0]} outside the vocabulary [0, {vocab_size}); "
                               "it could never stop generation", param="stop_token_ids")
    kw["stop_token_ids"] = stops  # None: generate's default (the model's end ids)
    # vLLM's extension: the EOS does not stop generation (only the request's own stop ids do)
    kw["ignore_eos"] = _flag(body.get("ignore_eos"), "ignore_eos", "ignore_eos")
    kw["stop_strings"] = _parse_stop(body.get("stop"))
    stream = _flag(body.get("stream"), "stream", "stream")
    opts = body.get("stream_options")
    opts = {} if opts is None else opts  # a falsy [] / false / "" is not "not given"
    if not isinstance(opts, dict):
        raise RequestError(f"`stream_options` must be an object, got {json.dumps(opts)[:80]}", param="stream_options")
    unknown = sorted(set(opts) - STREAM_OPTIONS)
    if unknown:
        raise RequestError(f"unrecognized `stream_options` field `{unknown[0]}`; known: "
                           f"{', '.join(sorted(STREAM_OPTIONS))}", param="stream_options")
    if opts and not stream:  # OpenAI: "only set this when you set stream: true"
        raise RequestError("`stream_options` is only allowed with \"stream\": true", param="stream_options")
    _flag(opts.get("include_obfuscation"), "stream_options.include_obfuscation", "stream_options")
    return prompts, as_text, kw, stream, _flag(opts.get("include_usage"), "stream_options.include_usage",
                                               "stream_options")
