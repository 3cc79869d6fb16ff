"""`mamba-deploy serve` driven by the official `openai` Python client, the independent reference
for API compatibility: what the client sends, parses (its pydantic response types, validated
strictly here as well), streams (its SSE decoder, over httpx's HTTP/1.1 keep-alive pool) and raises (its exception classes, with the server's `message` and
`param`).

Correctness references are independent of the server: generate() on a separately loaded model, the
CLI's `generate --json`, the `tokenizers` library for token counts, and jinja2 for the chat
template's text. Every client has a timeout and no retries unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from openai.types import Completion, Model  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

from mamba_deploy import load_model  # noqa: E402
from mamba_deploy.generation import generate  # noqa: E402
from mamba_deploy.runners.torch_runner import TorchRunner  # noqa: E402
from mamba_deploy.serve import make_server  # noqa: E402

TIMEOUT = 30  # seconds, every request
REPO = Path(__file__).resolve().parents[1]
DEMO2 = REPO / "models" / "demo-mamba2"
MODEL = "org/demo mamba2"  # a `/` and a space: models.retrieve percent-encodes them
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PROMPTS = ["def main", "import numpy"]
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]


class _Counting(TorchRunner):
    """Counts decode steps: shows whether a generation ran on after its client left."""

    steps = 0

    def step(self, *a, **kw):
        self.steps += 1
        return super().step(*a, **kw)


def _start(runner, **kw):
    srv = make_server(runner, "127.0.0.1", 0, quiet=True, **kw)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return srv, thread


def _stop(srv, thread):
    srv.shutdown()
    srv.server_close()
    thread.join(TIMEOUT)
    assert not thread.is_alive() and srv.unfinished == []


def _client(srv, **kw):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", **{"max_retries": 0, "timeout": TIMEOUT, **kw})


@pytest.fixture(scope="module")
def started():
    """(server, runner, unix time before it was made, after)."""
    runner = _Counting(load_model(DEMO2))
    t0 = int(time.time())
    srv, thread = _start(runner, max_batch=4, chat_template=CHATML, model_name=MODEL)
    t1 = int(time.time())
    yield srv, runner, t0, t1
    _stop(srv, thread)


@pytest.fixture(scope="module")
def server(started):
    return started[0]


@pytest.fixture(scope="module")
def client(server):
    c = _client(server)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference():
    """The independent path: its own model load, generate() called directly."""
    return TorchRunner(load_model(DEMO2))


@pytest.fixture(scope="module")
def hf_tok():
    """The `tokenizers` library on the model's tokenizer.json: token counts not from mamba_deploy."""
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(DEMO2 / "tokenizer.json"))


def _chat_prompt_ids(hf_tok, messages) -> list[int]:
    """The conversation in CHATML rendered by jinja2 and tokenized by `tokenizers` (not chat.py)."""
    import jinja2

    text = jinja2.Environment().from_string(CHATML).render(messages=messages, add_generation_prompt=True)
    return hf_tok.encode(text, add_special_tokens=False).ids


def _raw_json(raw) -> dict:
    return json.loads(raw.http_response.text)


def _raw_events(raw) -> list[dict]:
    """The JSON events of a raw SSE answer; asserts OpenAI's framing and the closing [DONE]."""
    text = raw.http_response.read().decode()
    assert raw.http_response.headers["content-type"].startswith("text/event-stream")
    assert text.endswith("\n\ndata: [DONE]\n\n"), text[-200:]
    frames = text.split("\n\n")[:-2]
    assert all(f.startswith("data: {") for f in frames)
    return [json.loads(f[len("data: "):]) for f in frames]


def _tokens(choice) -> list[int]:
    """The server's `token_ids` extension, which the client keeps as an extra field."""
    return choice.model_extra["token_ids"]


# ----------------------------------------------------------------------------- models

def test_models_list_gives_openai_model_objects(started, client):
    """OpenAI's Model has id, object, created (an integer) and owned_by; `created` was missing (the
    client's lenient parse left it None; its schema, checked strictly here, requires it)."""
    _, _, t0, t1 = started
    models = client.models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [(MODEL, "model", "mamba-deploy")]
    raw = client.models.with_raw_response.list()
    for m in _raw_json(raw)["data"]:
        Model.model_validate(m)
    created = models.data[0].created
    assert isinstance(created, int) and t0 <= created <= t1  # when the server started


def test_models_retrieve_gives_the_served_model_and_not_found_for_others(client):
    """client.models.retrieve (GET /v1/models/{model}, the name percent-encoded) was a 404
    'unknown path' for the served model too."""
    got = client.models.retrieve(MODEL)  # GET /v1/models/org%2Fdemo%20mamba2
    assert got == client.models.list().data[0] and got.id == MODEL
    Model.model_validate(_raw_json(client.models.with_raw_response.retrieve(MODEL)))
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("demo-mamba1")
    assert e.value.status_code == 404 and e.value.param == "model"
    assert "'demo-mamba1' does not exist" in e.value.message and MODEL in e.value.message


# ----------------------------------------------------------------------------- completions

def test_completions_greedy_equal_generate_with_tokenizer_counts(client, reference, hf_tok):
    ref = generate(reference, PROMPTS, max_new_tokens=12, temperature=0.0)
    out = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == ref.texts
    assert [_tokens(c) for c in out.choices] == ref.tokens
    assert [c.finish_reason for c in out.choices] == ref.stop_reasons == ["length", "length"]
    for c in out.choices:  # the ids are the text, by the independent tokenizer
        assert hf_tok.decode(_tokens(c), skip_special_tokens=False) == c.text
    prompt_tokens = sum(len(hf_tok.encode(p).ids) for p in PROMPTS)
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 24
    assert out.usage.total_tokens == prompt_tokens + 24
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert Completion.model_validate(_raw_json(raw)).choices == out.choices  # strictly, and the same answer


def test_completions_stream_concatenates_to_the_non_streamed_answer(client):
    body = dict(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    full = client.completions.create(**body)
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    usage = chunks.pop()
    assert usage.choices == [] and usage.usage == full.usage
    assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)
    for choice in full.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [t for c in mine for t in _tokens(c)] == _tokens(choice)
        assert [c.finish_reason for c in mine] == [None] * (len(mine) - 1) + [choice.finish_reason]
        assert len(mine) == len(_tokens(choice)) + 1  # one chunk per token, then the finish
    # without stream_options: no usage chunk, every chunk has a choice
    plain = list(client.completions.create(**body, stream=True))
    assert all(c.usage is None and len(c.choices) == 1 for c in plain)
    assert [c.choices[0].text for c in plain] == [c.choices[0].text for c in chunks]
    # the events parse as OpenAI's Completion, apart from the finish_reason null that OpenAI's own
    # streams send too (the SDK shares one type between both)
    raw = client.completions.with_raw_response.create(**body, stream=True, stream_options={"include_usage": True})
    for event in _raw_events(raw):
        event["choices"] = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in event["choices"]]
        Completion.model_validate(event)


def test_cli_generate_gives_the_same_text_and_tokens(client, capsys, tmp_path):
    """The CLI's `generate --json` (its own Runner, its own chat rendering) against the client."""
    from mamba_deploy.cli import main

    args = ["generate", str(DEMO2), "--max-new-tokens", "10", "--json"]
    assert main([*args, *(a for p in PROMPTS for a in ("--prompt", p))]) == 0
    cli = json.loads(capsys.readouterr().out)
    out = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=10, temperature=0)
    assert [(c.text, _tokens(c), c.finish_reason) for c in out.choices] == [
        (r["completion"], r["tokens"], r["stop"]) for r in cli]
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    assert main([*args, "--chat", "--chat-template", str(template), "--system", MESSAGES[0]["content"],
                 "--prompt", MESSAGES[1]["content"]]) == 0
    cli = json.loads(capsys.readouterr().out)[0]
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == cli["completion"]
    assert (_tokens(out.choices[0]), out.choices[0].finish_reason) == (cli["tokens"], cli["stop"])


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences_end_the_text_before_them(client, reference, stream):
    prompt = PROMPTS[0]
    free = generate(reference, [prompt], max_new_tokens=16, temperature=0.0).texts[0]
    stop = free[len(free) // 2:][:3]  # occurs in the greedy completion
    want = free[:free.index(stop)]
    assert want
    ref = generate(reference, [prompt], max_new_tokens=16, temperature=0.0, stop_strings=[stop, "@@@"])
    assert ref.texts[0] == want and ref.stop_reasons == ["stop"]
    body = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "@@@"])
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(**body, stream=True)]
        shown = ""
        for c in chunks:  # at no point does the stream show the stop sequence
            shown += c.text
            assert stop not in shown
        text, finish = shown, chunks[-1].finish_reason
    else:
        out = client.completions.create(**body).choices[0]
        text, finish = out.text, out.finish_reason
        assert _tokens(out) == ref.tokens[0]
    assert (text, finish) == (want, "stop")


def test_stop_token_ids_through_extra_body_finish_with_stop(client, reference):
    free = generate(reference, [PROMPTS[1]], max_new_tokens=10, stop_token_ids=[]).tokens[0]
    ref = generate(reference, [PROMPTS[1]], max_new_tokens=10, stop_token_ids=[free[5]])
    out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                    extra_body={"stop_token_ids": [free[5]]})
    choice = out.choices[0]
    assert _tokens(choice) == ref.tokens[0] == free[:free.index(free[5])]
    assert choice.finish_reason == "stop" and choice.text == ref.texts[0]
    assert out.usage.completion_tokens == len(ref.tokens[0])


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_max_tokens_bounds_the_completion(client, reference, max_tokens):
    ref = generate(reference, [[5, 6, 7]], max_new_tokens=max_tokens, stop_token_ids=[])
    out = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=max_tokens, temperature=0,
                                    extra_body={"stop_token_ids": []})
    assert _tokens(out.choices[0]) == ref.tokens[0] and len(ref.tokens[0]) == max_tokens
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == max_tokens
    assert out.usage.prompt_tokens == 3
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=max_tokens,
                                          temperature=0, extra_body={"stop_token_ids": []})
    assert chat.usage.completion_tokens == len(_tokens(chat.choices[0])) == max_tokens
    assert chat.choices[0].finish_reason == "length"


def test_temperature_zero_is_deterministic(client):
    body = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    answers = {client.completions.create(**body).choices[0].text for _ in range(3)}
    answers.add("".join(c.choices[0].text for c in client.completions.create(**body, stream=True)))
    assert len(answers) == 1


def test_seed_repeats_a_sampled_completion(client, reference):
    """As serve.py documents it: the same request and seed give the same tokens (those generate()
    draws with that seed); other seeds draw others."""
    body = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=1.0)
    got = {}
    for seed in (1, 2, 3):
        ref = generate(reference, [PROMPTS[0]], max_new_tokens=16, temperature=1.0, seed=seed)
        first = client.completions.create(**body, seed=seed).choices[0]
        again = client.completions.create(**body, seed=seed).choices[0]
        streamed = "".join(c.choices[0].text for c in client.completions.create(**body, seed=seed, stream=True))
        assert first.text == again.text == streamed == ref.texts[0]
        got[seed] = first.text
    assert len(set(got.values())) > 1, got  # a seed that changed nothing would give one text
    chat = [client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=5)
            for _ in range(2)]
    assert chat[0].choices[0].message.content == chat[1].choices[0].message.content


# ----------------------------------------------------------------------------- chat

def test_chat_greedy_equals_generate_with_tokenizer_counts(client, reference, hf_tok):
    ids = _chat_prompt_ids(hf_tok, MESSAGES)
    eos = hf_tok.token_to_id("<|endoftext|>")
    ref = generate(reference, [ids], max_new_tokens=12, stop_token_ids=[eos])
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    assert out.object == "chat.completion" and out.model == MODEL and out.id.startswith("chatcmpl-")
    choice = out.choices[0]
    assert len(out.choices) == 1 and choice.index == 0 and choice.message.role == "assistant"
    assert _tokens(choice) == ref.tokens[0] and choice.finish_reason == ref.stop_reasons[0]
    assert choice.message.content == hf_tok.decode(ref.tokens[0], skip_special_tokens=False)
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(ref.tokens[0])
    assert out.usage.total_tokens == len(ids) + len(ref.tokens[0])
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                                          temperature=0)
    assert ChatCompletion.model_validate(_raw_json(raw)).choices[0].message == choice.message


def test_chat_stream_concatenates_to_the_non_streamed_answer(client):
    body = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stop=["@@@"])
    full = client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    usage = chunks.pop()
    assert usage.choices == [] and usage.usage == full.usage
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    deltas = [c.choices[0] for c in chunks]
    assert deltas[0].delta.role == "assistant" and all(d.delta.role is None for d in deltas[1:])
    assert "".join(d.delta.content or "" for d in deltas) == full.choices[0].message.content
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + [full.choices[0].finish_reason]
    raw = client.chat.completions.with_raw_response.create(**body, stream=True,
                                                          stream_options={"include_usage": True})
    for event in _raw_events(raw):
        ChatCompletionChunk.model_validate(event)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_stop_sequence(client, stream):
    free = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    text = free.choices[0].message.content
    stop = text[len(text) // 2:][:2]
    assert text.index(stop) > 0
    body = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0, stop=stop)
    if stream:
        deltas = [c.choices[0] for c in client.chat.completions.create(**body, stream=True)]
        got, finish = "".join(d.delta.content or "" for d in deltas), deltas[-1].finish_reason
    else:
        choice = client.chat.completions.create(**body).choices[0]
        got, finish = choice.message.content, choice.finish_reason
    assert (got, finish) == (text[:text.index(stop)], "stop")


def test_async_client_streams_the_same_chat(server, client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                      timeout=TIMEOUT) as aclient:
            stream = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                                           temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream])

    assert asyncio.run(run()) == full.choices[0].message.content


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_n_above_one_is_a_bad_request_naming_n(client, chat, stream):
    with pytest.raises(openai.BadRequestError) as e:
        if chat:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, stream=stream)
        else:
            client.completions.create(model=MODEL, prompt="x", n=2, stream=stream)
    assert e.value.status_code == 400 and e.value.param == "n" and "only n=1" in e.value.message
    ok = (client.chat.completions.create(model=MODEL, messages=MESSAGES, n=1, max_tokens=2) if chat
          else client.completions.create(model=MODEL, prompt="x", n=1, max_tokens=2))
    assert len(ok.choices) == 1


BAD = [  # (endpoint, arguments, param, message pattern)
    ("cmpl", dict(temperature=-1), "temperature", r"`temperature` must be >= 0"),
    ("cmpl", dict(top_p=0), "top_p", r"`top_p` must be in \(0, 1\]"),
    ("cmpl", dict(max_tokens=0), "max_tokens", r"`max_tokens` must be in \[1, 4096\], got 0"),
    ("cmpl", dict(max_tokens=5000), "max_tokens", r"`max_tokens` must be in \[1, 4096\], got 5000"),
    ("cmpl", dict(seed=-1), "seed", r"`seed` must be in"),
    ("cmpl", dict(stop=["a", "b", "c", "d", "e"]), "stop", r"`stop` has 5 strings; at most 4"),
    ("cmpl", dict(logprobs=2), "logprobs", r"logprobs are not supported"),
    ("cmpl", dict(echo=True), "echo", r"echo is not supported"),
    ("cmpl", dict(best_of=2), "best_of", r"best_of is not supported"),
    ("cmpl", dict(suffix="x"), "suffix", r"suffix is not supported"),
    ("cmpl", dict(presence_penalty=0.5), "presence_penalty", r"use `repetition_penalty`"),
    ("cmpl", dict(frequency_penalty=0.5), "frequency_penalty", r"use `repetition_penalty`"),
    ("cmpl", dict(logit_bias={"5": 10}), "logit_bias", r"logit_bias is not supported"),
    ("cmpl", dict(prompt=""), "prompt", r"prompt 0 is empty"),
    ("cmpl", dict(prompt=[[1, 4096]]), "prompt", r"token id 4096 outside the vocabulary \[0, 4096\)"),
    ("cmpl", dict(extra_body={"stop_token_ids": [4096]}), "stop_token_ids", r"outside the vocabulary"),
    ("chat", dict(logprobs=True), "logprobs", r"logprobs are not supported"),
    ("chat", dict(messages=[]), "messages", r"`messages` must be a non-empty list"),
    ("chat", dict(max_completion_tokens=0), "max_completion_tokens", r"`max_completion_tokens` must be in"),
    ("chat", dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools",
     r"tools \(function calling\) are not supported"),
    ("chat", dict(tool_choice="required"), "tool_choice", r"tool_choice is not supported"),
    ("chat", dict(response_format={"type": "json_object"}), "response_format", r"only \{\"type\": \"text\"\}"),
    ("chat", dict(top_logprobs=3), "top_logprobs", r"top_logprobs is not supported"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint,kwargs,param,pattern", BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_bad_parameters_are_bad_request_errors_with_the_servers_message(client, endpoint, kwargs, param, pattern,
                                                                         stream):
    """A 400 the client raises as BadRequestError, before any stream starts, carrying the server's
    `error.message`, `error.param` and `error.type`."""
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":  # max_tokens would take precedence over max_completion_tokens
            limit = {} if "max_completion_tokens" in kwargs else {"max_tokens": 2}
            client.chat.completions.create(**{"model": MODEL, "messages": MESSAGES, "stream": stream, **limit,
                                              **kwargs})
        else:
            client.completions.create(**{"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": stream, **kwargs})
    err = e.value
    assert err.status_code == 400 and err.param == param and err.type == "invalid_request_error"
    assert re.search(pattern, err.message), err.message
    assert err.body["message"] in err.message and "Traceback" not in err.message


def test_no_op_values_of_unsupported_fields_are_accepted(client):
    """What OpenAI's clients may send as defaults must not be refused."""
    want = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, tools=[],
                                         tool_choice="none", response_format={"type": "text"}, logprobs=False,
                                         presence_penalty=0, frequency_penalty=0, logit_bias={}, n=1,
                                         user="u", stream_options=None, extra_body={"modalities": ["text"]})
    assert got.choices[0].message.content == want.choices[0].message.content


def test_unknown_paths_are_not_found_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model=MODEL, input="hello")
    assert e.value.status_code == 404 and "unknown path '/v1/embeddings'" in e.value.message
    assert "POST /v1/completions" in e.value.message  # it names the endpoints there are


def test_a_request_for_another_model_is_the_clients_not_found_error(client):
    """One model per server: another name in `model` is OpenAI's 404 `model_not_found`, not an
    answer from a model the client did not ask for."""
    a = client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=0)
    assert a.model == MODEL
    for call in (lambda: client.completions.create(model="gpt-4o", prompt="x", max_tokens=4),
                 lambda: client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.code == "model_not_found" and e.value.param == "model" and "gpt-4o" in e.value.message


class _FailsAtStep(TorchRunner):
    """A runner that breaks after a few decode steps: an error once a stream's 200 is out."""

    fail_at = 3

    def prefill(self, *a, **kw):
        self.k = 0
        return super().prefill(*a, **kw)

    def step(self, *a, **kw):
        self.k += 1
        if self.k >= self.fail_at:
            raise RuntimeError("kaboom in step")
        return super().step(*a, **kw)


def test_a_generation_failure_is_an_internal_server_error_or_an_in_band_api_error():
    srv, thread = _start(_FailsAtStep(load_model(DEMO2)), model_name=MODEL)
    try:
        client = _client(srv)
        body = dict(model=MODEL, prompt=[1, 2, 3], max_tokens=10, temperature=0, extra_body={"stop_token_ids": []})
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(**body)
        assert e.value.status_code == 500 and "internal error (RuntimeError)" in e.value.message
        got = []
        with pytest.raises(openai.APIError) as e:  # headers were out: the error event ends the stream
            for chunk in client.completions.create(**body, stream=True):
                got.append(chunk)
        assert not isinstance(e.value, openai.APIStatusError)
        assert "internal error (RuntimeError)" in e.value.message and e.value.type == "server_error"
        assert len(got) == _FailsAtStep.fail_at  # the tokens generated before it
        client.close()
    finally:
        _stop(srv, thread)


# ----------------------------------------------------------------------------- a keep-alive client

def test_one_client_many_requests_sequential_and_concurrent(server, reference, monkeypatch):
    """httpx pools HTTP/1.1 connections and the server keeps them open between requests (a stream
    closes its own). One client (with its default retries, which must not be needed) sends mixed
    requests one after another and from several threads; each answer is the reference's."""
    accepted = []
    monkeypatch.setattr(server, "process_request", lambda *a, _p=server.process_request: (accepted.append(1), _p(*a)))
    client = _client(server, max_retries=2)
    prompts = [[k + 1, k + 2] for k in range(8)]
    refs = [generate(reference, [p], max_new_tokens=4, stop_token_ids=[]).tokens[0] for p in prompts]

    def ask(k):
        body = dict(model=MODEL, prompt=prompts[k], max_tokens=4, temperature=0, extra_body={"stop_token_ids": []})
        if k % 3 == 0:
            return [t for c in client.completions.create(**body, stream=True) for t in _tokens(c.choices[0])]
        if k % 3 == 1:
            try:
                client.completions.create(model=MODEL, prompt="x", top_p=0)
            except openai.BadRequestError:
                pass
            else:
                raise AssertionError("top_p=0 was accepted")
        return _tokens(client.completions.create(**body).choices[0])

    for _ in range(3):
        assert [ask(k) for k in range(len(prompts))] == refs
    streams = 3 * len(range(0, len(prompts), 3))
    # 33 requests; a new connection only after each stream (HTTP/1.0: one per request)
    assert 1 <= len(accepted) <= streams + 1, len(accepted)
    results = [None] * len(prompts)

    def worker(k):
        results[k] = ask(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * TIMEOUT)
    assert results == refs
    client.close()


def test_closing_a_stream_early_stops_its_generation(started, client, reference):
    srv, runner, _, _ = started
    runner.steps = 0
    with client.completions.create(model=MODEL, prompt="def", max_tokens=4000, temperature=0, stream=True,
                                   extra_body={"stop_token_ids": []}) as stream:
        for i, _chunk in enumerate(stream):
            if i == 2:
                break
    at_close = runner.steps  # counted from the close: a stalled test thread lets steps run before it
    ref = generate(reference, ["def"], max_new_tokens=3, temperature=0.0)
    out = client.completions.create(model=MODEL, prompt="def", max_tokens=3, temperature=0)  # waits for the lock
    assert out.choices[0].text == ref.texts[0]
    assert runner.steps - at_close < 200  # ~4000 had the abandoned generation run on
