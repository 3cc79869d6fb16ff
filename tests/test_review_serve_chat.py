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
    srv = make_server(open_runner(DEMO2, "torch"), "127.0.0.1", 0, max_batch=4, quiet=True, chat_template=CHATML)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(TIMEOUT)


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
    reply = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400 ")
    assert "bad Content-Length '-1'" in _error(body)["message"]


@pytest.mark.parametrize("request_bytes,status,pattern", [
    (b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 501, r"'PUT'.*POST /v1/completions"),
    (b"DELETE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 501, r"'DELETE'"),
    (b"GET /health x HTTP/1.1\r\nHost: x\r\n\r\n", 400, r"Bad request syntax"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, r"Too Long"),
])
def test_http_servers_own_refusals_are_json(server, request_bytes, status, pattern):
    """A method with no handler, a malformed request line and a too-long one were answered by
    http.server's HTML error page; clients of this API parse {"error": {...}}."""
    head, _, body = _raw(server, request_bytes).partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.0 {status} ".encode()) and b"Content-Type: application/json" in head
    err = _error(body)
    assert err["code"] == status and re.search(pattern, err["message"]), err["message"]


def test_head_gets_a_json_error_head_without_a_body(server):
    head, _, body = _raw(server, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 501 ") and b"Content-Type: application/json" in head and body == b""
