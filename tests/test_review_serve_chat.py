"""From a review of serve.py and chat.py as a demanding API user and a mutation tester would do it.

Two kinds of tests. Regressions for bugs found by black-box requests to an in-process server (a
500 for an integer too large for a float, a stream that answered 200 and then an in-band error for
a stop id outside the vocabulary, `stream: null` and chat's `logprobs: false` refused although
OpenAI's schema allows them, a truthy string read as `include_usage`, a negative Content-Length
called "over the limit", http.server's own refusals as HTML pages). And tests that kill mutants
(one-line bugs planted in serve.py / chat.py) the existing tests let survive: OpenAI's defaults,
`usage` over a batch, the stream's framing, chat's stop at EOS, the template's variables.

References are independent of the code under test: generate() on a separately loaded model,
transformers' apply_chat_template, jinja2 rendering, and the OpenAI API's documented fields.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
from pathlib import Path

import pytest
from conftest import serving

from mamba_deploy import load_model
from mamba_deploy.generation import generate
from mamba_deploy.runners import open_runner
from mamba_deploy.runners.torch_runner import TorchRunner
from mamba_deploy.serve import make_server

TIMEOUT = 30
REPO = Path(__file__).resolve().parents[1]
DEMO2 = REPO / "models" / "demo-mamba2"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
HUGE_INT = "1" + "0" * 400  # a JSON integer: Python reads it exactly; float() overflows


@pytest.fixture(scope="module")
def reference():
    """The independent path: its own model load, generate() called directly."""
    return TorchRunner(load_model(DEMO2))


@pytest.fixture(scope="module")
def server():
    with serving(open_runner(DEMO2, "torch"), max_batch=4, chat_template=CHATML) as srv:
        yield srv


def _request(srv, method, path, body=None, raw=None):
    """-> (status, headers, body bytes)."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=TIMEOUT)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _post(srv, body, path="/v1/completions", raw=None):
    status, _, data = _request(srv, "POST", path, body, raw)
    return status, data


def _raw(srv, request: bytes) -> bytes:
    """Sends bytes as they are (what http.client would not) -> the whole reply."""
    with socket.create_connection(srv.server_address[:2], timeout=TIMEOUT) as sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def _events(data: bytes):
    """SSE as OpenAI frames it: `data: JSON` events, each ended by a blank line, then `data: [DONE]`."""
    text = data.decode()
    assert text.endswith("\n\ndata: [DONE]\n\n"), text[-200:]
    frames = text.split("\n\n")
    assert frames[-1] == "" and all(f.startswith("data: ") and "\n" not in f for f in frames[:-1])
    return [json.loads(f[len("data: "):]) for f in frames[:-2]]


def _hf_chat_ids(messages):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(DEMO2))
    out = tok.apply_chat_template(messages, chat_template=CHATML, tokenize=True, add_generation_prompt=True)
    return out if isinstance(out, list) else out["input_ids"]


def _error(data) -> dict:
    return json.loads(data)["error"]


# ----------------------------------------------------------------------------- bugs found

@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty"])
def test_an_integer_too_large_for_a_float_is_a_400_not_a_500(server, field):
    """JSON 1e999 (a float: inf) was a 400, but an integer of 401 digits reached SamplingConfig's
    math.isfinite, whose OverflowError was an HTTP 500 'internal error'."""
    raw = f'{{"prompt": "a", "{field}": {HUGE_INT}}}'.encode()
    status, data = _post(server, None, raw=raw)
    assert status == 400, data
    err = _error(data)
    assert err["param"] == field and f"`{field}` must be a finite number" in err["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_id_outside_the_vocabulary_is_a_400_before_any_stream(server, path, stream):
    """generate() refuses it, but only after a stream's `200` and headers were out: the client got
    HTTP 200 and an error event, and the error named no field."""
    body = {"max_tokens": 2, "stop_token_ids": [5, 4096], "stream": stream}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "a"})
    status, data = _post(server, body, path)
    assert status == 400, data
    err = _error(data)
    assert err["param"] == "stop_token_ids" and "4096" in err["message"] and "[0, 4096)" in err["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_null_means_not_streamed(server, reference, path):
    """OpenAI's `stream` is "boolean or null" (null: false); clients that send every optional field
    as null got a 400."""
    chat = "chat" in path
    messages = [{"role": "user", "content": "hello"}]
    prompt = _hf_chat_ids(messages) if chat else "hello"
    stops = [reference.tokenizer.eos_token_id] if chat else None
    ref = generate(reference, [prompt], max_new_tokens=5, stop_token_ids=stops)
    body = {"max_tokens": 5, "temperature": 0, "stream": None, "stream_options": None}
    body.update({"messages": messages} if chat else {"prompt": "hello"})
    status, data = _post(server, body, path)
    assert status == 200, data
    out = json.loads(data)
    assert out["object"] == ("chat.completion" if chat else "text_completion")
    assert out["choices"][0]["token_ids"] == ref.tokens[0]


def test_include_usage_must_be_a_boolean(server):
    """`"include_usage": "no"` (or "false") was read as truthy and sent usage."""
    body = {"prompt": "a", "max_tokens": 2, "stream": True}
    status, data = _post(server, {**body, "stream_options": {"include_usage": "no"}})
    assert status == 400
    err = _error(data)
    assert err["param"] == "stream_options" and "`stream_options.include_usage` must be true or false" in err["message"]
    status, data = _post(server, {**body, "stream_options": {"include_usage": None}})  # null: not given
    assert status == 200 and all("usage" not in e for e in _events(data))


def test_chat_logprobs_false_is_the_default_not_an_error(server, reference):
    """Chat's `logprobs` is a boolean, false by default, and OpenAI clients send it: false was
    refused as "logprobs are not supported". true still is."""
    messages = [{"role": "user", "content": "def f():"}]
    ref = generate(reference, [_hf_chat_ids(messages)], max_new_tokens=6,
                   stop_token_ids=[reference.tokenizer.eos_token_id])
    body = {"messages": messages, "max_tokens": 6, "temperature": 0}
    status, data = _post(server, {**body, "logprobs": False}, "/v1/chat/completions")
    assert status == 200, data
    assert json.loads(data)["choices"][0]["token_ids"] == ref.tokens[0]
    status, data = _post(server, {**body, "logprobs": True}, "/v1/chat/completions")
    assert status == 400 and _error(data)["param"] == "logprobs"


def test_a_negative_content_length_is_a_bad_request_not_too_large(server):
    """Content-Length: -1 answered 413 "request body of -1 bytes is over the 8388608-byte limit"."""
    reply = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n{}")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert "bad Content-Length '-1'" in _error(body)["message"]


@pytest.mark.parametrize("request_bytes,status,pattern", [
    # (PUT, DELETE and PATCH are 405s with Allow since the thirty-sixth session)
    (b"TRACE /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}", 501, r"'TRACE'.*POST /v1/completions"),
    (b"CONNECT /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n", 501, r"'CONNECT'"),
    (b"GET /health x HTTP/1.1\r\nHost: localhost\r\n\r\n", 400, r"Bad request syntax"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, r"Too Long"),
])
def test_http_servers_own_refusals_are_json(server, request_bytes, status, pattern):
    """A method with no handler, a malformed request line and a too-long one were answered by
    http.server's HTML error page; clients of this API parse {"error": {...}}."""
    head, _, body = _raw(server, request_bytes).partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()) and b"Content-Type: application/json" in head
    err = _error(body)
    assert err["code"] is None and re.search(pattern, err["message"]), err["message"]  # OpenAI: a string or null


def test_head_gets_a_json_error_head_without_a_body(server):
    # HEAD is served since the thirty-sixth session (RFC 9110 9.1): an unknown path's 404 and a
    # POST path's 405 are still JSON heads, without their bodies
    for path, status in ((b"/nope", b"404"), (b"/v1/completions", b"405")):
        reply = _raw(server, b"HEAD " + path + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status + b" ") and b"Content-Type: application/json" in head
        assert body == b""


# ----------------------------------------------------------------------------- mutants that survived

class _Scripted(TorchRunner):
    """Emits `script` token by token whatever the prompt (one-hot logits; the last token repeats):
    a model whose EOS and stop strings come exactly where a test puts them."""

    script: list[int] = []

    def _one_hot(self, logits):
        out = logits.new_full(logits.shape, -1e9)
        out[..., self.script[min(self.k, len(self.script) - 1)]] = 0.0
        return out

    def prefill(self, ids, state, attention_mask=None, last_only=False):
        self.k = 0
        logits, state = super().prefill(ids, state, attention_mask, last_only)
        return self._one_hot(logits), state

    def step(self, ids, state):
        self.k += 1
        logits, state = super().step(ids, state)
        return self._one_hot(logits), state


@pytest.fixture(scope="module")
def scripted():
    runner = _Scripted(load_model(DEMO2))
    srv = make_server(runner, "127.0.0.1", 0, quiet=True, chat_template=CHATML)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, runner
    srv.shutdown()
    srv.server_close()
    thread.join(TIMEOUT)


@pytest.mark.parametrize("seed", [11, 12])
def test_defaults_follow_openai(server, reference, seed):
    """The docstring's promise: max_tokens 16, temperature 1.0 (and top_p 1.0) when not sent."""
    ref = generate(reference, [[1, 2, 3]], max_new_tokens=16, temperature=1.0, top_p=1.0, seed=seed,
                   stop_token_ids=[])
    status, data = _post(server, {"prompt": [1, 2, 3], "seed": seed, "stop_token_ids": [], "ignore_eos": True})
    assert status == 200
    out = json.loads(data)
    assert out["choices"][0]["token_ids"] == ref.tokens[0] and out["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("stream", [False, True])
def test_token_ids_at_the_vocabulary_edge(server, reference, stream):
    """Id V is refused up front, naming `prompt` (the runner would refuse it too, but only once a
    stream's 200 is out); id V - 1 is the last one of the vocabulary."""
    v = reference.vocab_size
    status, data = _post(server, {"prompt": [1, v], "max_tokens": 2, "stream": stream})
    assert status == 400 and _error(data)["param"] == "prompt"
    assert f"token id {v} outside the vocabulary [0, {v})" in _error(data)["message"]
    ref = generate(reference, [[1, v - 1]], max_new_tokens=2, stop_token_ids=[])
    status, data = _post(server, {"prompt": [1, v - 1], "max_tokens": 2, "temperature": 0, "stop_token_ids": [], "ignore_eos": True})
    assert status == 200 and json.loads(data)["choices"][0]["token_ids"] == ref.tokens[0]


def test_seed_range_is_inclusive_up_to_2_63_minus_1(server, reference):
    top = 2**63 - 1
    status, data = _post(server, {"prompt": [4, 5], "max_tokens": 2, "seed": top + 1})
    assert status == 400 and _error(data)["param"] == "seed"
    ref = generate(reference, [[4, 5]], max_new_tokens=4, temperature=1.0, seed=top, stop_token_ids=[])
    status, data = _post(server, {"prompt": [4, 5], "max_tokens": 4, "seed": top, "stop_token_ids": [], "ignore_eos": True})
    assert status == 200 and json.loads(data)["choices"][0]["token_ids"] == ref.tokens[0]


def test_one_stop_token_id_may_be_a_bare_integer(server, reference):
    free = generate(reference, [[7, 8]], max_new_tokens=8, stop_token_ids=[]).tokens[0]
    ref = generate(reference, [[7, 8]], max_new_tokens=8, stop_token_ids=[free[3]])
    status, data = _post(server, {"prompt": [7, 8], "max_tokens": 8, "temperature": 0, "stop_token_ids": free[3]})
    choice = json.loads(data)["choices"][0]
    assert status == 200 and choice["token_ids"] == ref.tokens[0] and choice["finish_reason"] == "stop"


@pytest.mark.parametrize("field,value", [("n", 2), ("best_of", 3), ("echo", True), ("suffix", "x"), ("logprobs", 1)])
def test_openai_fields_we_cannot_honour_are_refused_by_name(server, field, value):
    status, data = _post(server, {"prompt": "a", "max_tokens": 2, field: value})
    assert status == 400 and _error(data)["param"] == field


def test_a_trailing_slash_or_query_reaches_the_same_endpoint(server, reference):
    ref = generate(reference, ["hello"], max_new_tokens=3)
    for path in ("/v1/completions/", "/v1/completions?x=1"):
        status, data = _post(server, {"prompt": "hello", "max_tokens": 3, "temperature": 0}, path)
        assert status == 200 and json.loads(data)["choices"][0]["token_ids"] == ref.tokens[0]
    assert _request(server, "GET", "/health/")[0] == 200


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_without_a_tokenizer_are_a_400_naming_stop(tmp_path, stream):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((DEMO2 / name).read_bytes())
    srv = make_server(open_runner(folder, "torch"), "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        status, data = _post(srv, {"prompt": [1, 2], "max_tokens": 3, "stop": "x", "stream": stream})
        assert status == 400 and _error(data)["param"] == "stop" and "tokenizer" in _error(data)["message"]
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(TIMEOUT)


def test_chat_stops_at_eos_streamed_or_not(scripted):
    """/v1/chat/completions sends token-id prompts, for which generate() adds no EOS stop of its
    own: the server must, or the reply runs past the end of the assistant's turn."""
    srv, runner = scripted
    tok = runner.tokenizer
    words = tok.encode("def main", add_special_tokens=False)
    runner.script = [*words, tok.eos_token_id, *tok.encode(" after", add_special_tokens=False)]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    status, data = _post(srv, body, "/v1/chat/completions")
    choice = json.loads(data)["choices"][0]
    assert status == 200 and choice["token_ids"] == words and choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": "def main"}
    status, data = _post(srv, {**body, "stream": True}, "/v1/chat/completions")
    events = _events(data)
    assert [t for e in events for t in e["choices"][0].get("token_ids", [])] == words
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stop", [None, "ma"])
def test_a_streams_finish_reason_is_stop_at_eos_or_a_stop_string(scripted, stop):
    srv, runner = scripted
    tok = runner.tokenizer
    runner.script = [*tok.encode("def main", add_special_tokens=False), tok.eos_token_id]
    status, data = _post(srv, {"prompt": "x", "max_tokens": 10, "stream": True, "stop": stop})
    events = _events(data)
    assert status == 200 and events[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(e["choices"][0]["text"] for e in events) == ("def " if stop else "def main")


def test_chat_stream_chunks_have_openais_shape(scripted):
    """OpenAI's chat.completion.chunk: the first delta carries the role, each later one `content`
    (a string, "" allowed) until the last, whose delta may be empty and which has finish_reason."""
    srv, runner = scripted
    tok = runner.tokenizer
    runner.script = tok.encode("é€ x", add_special_tokens=False)  # byte tokens: some decode to nothing yet
    status, data = _post(srv, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": len(runner.script),
                               "stream": True}, "/v1/chat/completions")
    events = _events(data)
    assert status == 200 and events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    middle = [e["choices"][0] for e in events[1:-1]]
    assert middle and all(isinstance(c["delta"].get("content"), str) and c["finish_reason"] is None for c in middle)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "é€ x"


def test_missing_content_length_is_411(server):
    head, _, body = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n\r\n").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411 ") and _error(body)["type"] == "length_required"


def test_created_is_the_unix_time_of_the_request(server):
    import time

    t0 = int(time.time())
    _, data = _post(server, {"prompt": "a", "max_tokens": 2})
    _, sdata = _post(server, {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2, "stream": True},
                     "/v1/chat/completions")
    t1 = int(time.time())
    assert t0 <= json.loads(data)["created"] <= t1
    events = _events(sdata)
    assert len({(e["id"], e["created"]) for e in events}) == 1 and t0 <= events[0]["created"] <= t1


@pytest.mark.parametrize("opts", ["yes", 1, [True]])
def test_stream_options_must_be_an_object(server, opts):
    """Not an object: a 400 naming it (a non-dict reached .get(), an HTTP 500)."""
    status, data = _post(server, {"prompt": "a", "max_tokens": 2, "stream": True, "stream_options": opts})
    assert status == 400 and _error(data)["param"] == "stream_options"


@pytest.mark.parametrize("stop", ["", []])
def test_empty_stop_means_none(server, reference, stop):
    ref = generate(reference, ["hello"], max_new_tokens=6)
    status, data = _post(server, {"prompt": "hello", "max_tokens": 6, "temperature": 0, "stop": stop})
    assert status == 200 and json.loads(data)["choices"][0]["text"] == ref.texts[0]


def test_chat_n_2_names_chats_own_fix(server):
    status, data = _post(server, {"messages": [{"role": "user", "content": "a"}], "n": 2}, "/v1/chat/completions")
    assert status == 400 and _error(data)["param"] == "n" and "send the request again" in _error(data)["message"]


# ----------------------------------------------------------------------------- chat templates

FEATURES = ("{% for m in messages %}\n"
            "  {% if m['role'] == 'tool' %}\n"
            "<tool {{ m['tool_call_id'] }}>{{ m['content'] | tojson }}\n"
            "  {% else %}\n"
            "{{ m['role'] }}{% if m['name'] is defined %} ({{ m['name'] }}){% endif %}: {{ m['content'] }}\n"
            "  {% endif %}\n"
            "{% endfor %}\n"
            "{% if add_generation_prompt %}assistant [{{ strftime_now('%Y') }}]:{% endif %}")
FEATURE_MESSAGES = [{"role": "system", "content": "héllo ☃"}, {"role": "user", "content": "hi", "name": "bob"},
                    {"role": "tool", "content": 'résumé "x"', "tool_call_id": "c1"}]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_features_render_as_transformers_does(add_generation_prompt):
    """trim_blocks / lstrip_blocks, tojson without ASCII escapes, strftime_now, the `tool` role
    and keys beyond role/content (name, tool_call_id), add_generation_prompt both ways."""
    from mamba_deploy.chat import render_chat

    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(DEMO2))
    for template in (FEATURES, CHATML):
        want = tok.apply_chat_template(FEATURE_MESSAGES, chat_template=template, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
        assert render_chat(template, FEATURE_MESSAGES, add_generation_prompt=add_generation_prompt) == want


class _LlamaLikeTokenizer:
    """A stand-in with distinct BOS / EOS that adds its BOS unless told not to, as Llama's does."""

    chat_template, path, bos_token_id, eos_token_id = None, "stub", 1, 2
    pieces = {1: "<s>", 2: "</s>"}

    def id_to_token(self, i):
        return self.pieces.get(i)

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


def test_chat_ids_write_bos_and_eos_as_the_template_says_once():
    """The template's bos_token / eos_token are the tokenizer's own (not swapped), and the text is
    tokenized without the tokenizer's BOS (the template wrote it): transformers' behaviour."""
    import jinja2

    from mamba_deploy.chat import chat_ids

    template = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{{ eos_token }}{% endfor %}"
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    text = jinja2.Environment().from_string(template).render(messages=messages, bos_token="<s>", eos_token="</s>")
    assert chat_ids(_LlamaLikeTokenizer(), messages, template) == [ord(c) for c in text]


def test_a_template_given_overrides_the_tokenizers_own(tmp_path):
    from mamba_deploy.chat import chat_ids
    from mamba_deploy.tokenizer import load_tokenizer

    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((DEMO2 / name).read_bytes())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML}))
    tok = load_tokenizer(folder)
    messages = [{"role": "user", "content": "hi"}]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(DEMO2))
    want = hf.apply_chat_template(messages, chat_template=FEATURES, tokenize=False, add_generation_prompt=True)
    assert chat_ids(tok, messages, FEATURES) == tok.encode(want, add_special_tokens=False)
    assert chat_ids(tok, messages) == _hf_chat_ids(messages)  # and its own without one


def test_a_refusal_is_reported_as_the_templates_words():
    """raise_exception's message comes through as it is, not re-wrapped as a template failure."""
    from mamba_deploy.chat import ChatTemplateError, render_chat

    with pytest.raises(ChatTemplateError) as e:
        render_chat("{{ raise_exception('only one user turn') }}", [{"role": "user", "content": "x"}])
    assert str(e.value) == "the chat template refused the conversation: only one user turn"


def test_a_template_that_renders_only_whitespace_renders_nothing():
    """Whitespace is no conversation: a ChatTemplateError naming the template, not a prompt of
    spaces generated from."""
    from mamba_deploy.chat import ChatTemplateError, chat_ids
    from mamba_deploy.tokenizer import load_tokenizer

    with pytest.raises(ChatTemplateError, match="rendered nothing"):
        chat_ids(load_tokenizer(DEMO2), [{"role": "user", "content": "hi"}], "{% for m in messages %} {% endfor %}")


def test_a_blank_template_is_refused_before_serving():
    from mamba_deploy.chat import ChatTemplateError

    with pytest.raises(ChatTemplateError, match="non-empty Jinja string"):
        make_server(open_runner(DEMO2, "torch"), "127.0.0.1", 0, quiet=True, chat_template=" \n")


def test_a_blank_config_template_does_not_hide_chat_template_jinja(tmp_path):
    """transformers reads chat_template.jinja when tokenizer_config.json's "chat_template" is ""."""
    from mamba_deploy.chat import read_chat_template

    transformers = pytest.importorskip("transformers")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((DEMO2 / name).read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": ""}))
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    want = transformers.AutoTokenizer.from_pretrained(str(tmp_path)).chat_template
    assert want == CHATML and read_chat_template(tmp_path) == want
