"""Regression tests for the forty-second session's review of `serve`'s OpenAI API: each fails on
the code before its fix. The reference for each behaviour is OpenAI's API (and vLLM, where
OpenAI leaves a choice open) and RFC 9112 / the Fetch standard for the HTTP ones."""

from __future__ import annotations

import json

import pytest
from conftest import post_json, serving, tiny_mamba_with_bpe
from test_review_thirty_eighth_serve import _raw

from mamba_deploy import load_model
from mamba_deploy.runners.torch_runner import TorchRunner

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MESSAGES = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def folder(hf_checkpoint, tmp_path_factory):
    return tiny_mamba_with_bpe(hf_checkpoint, tmp_path_factory, "serve_forty_second")


@pytest.fixture(scope="module")
def server(folder):
    with serving(TorchRunner(load_model(folder)), chat_template=CHATML) as srv:
        yield srv


@pytest.fixture()
def capped(folder):
    """A server whose runner holds 40 positions (as llama.cpp's n_ctx caps it)."""
    runner = TorchRunner(load_model(folder))
    runner.max_positions, runner.max_positions_name = 40, "n_ctx"
    with serving(runner, chat_template=CHATML) as srv:
        yield srv


def _events(data: bytes) -> list:
    return [json.loads(e[6:]) for e in data.decode().split("\n\n") if e.startswith("data: {")]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": [1] * 30, "max_tokens": 20}),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 39}),
])
def test_a_stream_past_the_context_is_a_400_not_an_in_band_error(capped, path, body):
    """The position check ran in scheduler.submit, after a stream's 200 (and chat's role chunk)
    had gone out: the client got a 200 and an error event, which the openai client reads as a
    generic APIError instead of BadRequestError."""
    status, _, data = post_json(capped, {**body, "stream": True, "temperature": 0}, path)
    assert status == 400, data[:300]
    err = json.loads(data)["error"]
    assert "n_ctx=40" in err["message"] and err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"


def test_chat_without_max_tokens_runs_within_the_context(capped):
    """Chat's default max_tokens was --max-tokens-limit (4096): with a context below prompt + 4096,
    every chat request without max_tokens was refused. It is now the room the context leaves."""
    for stream in (False, True):
        status, _, data = post_json(capped, {"messages": MESSAGES, "stream": stream, "temperature": 0,
                                             "ignore_eos": True}, "/v1/chat/completions")
        assert status == 200, data[:300]
        if not stream:
            usage = json.loads(data)["usage"]
            assert usage["prompt_tokens"] + usage["completion_tokens"] == 40
        else:
            assert _events(data)[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("extra, want", [
    ({"max_tokens": 6, "max_completion_tokens": 2}, 2),  # the newer name wins, as vLLM
    ({"max_tokens": None, "max_completion_tokens": 3}, 3),
    ({"max_tokens": 4, "max_completion_tokens": None}, 4),
    ({"max_tokens": 6, "max_completion_tokens": 0}, 400),
    ({"max_tokens": 6, "max_completion_tokens": "lots"}, 400),
    ({"max_tokens": "6", "max_completion_tokens": 2}, 400),  # neither is silently dropped
])
def test_max_completion_tokens_is_checked_and_wins(server, extra, want):
    status, _, data = post_json(server, {"messages": MESSAGES, "temperature": 0, "ignore_eos": True, **extra},
                                "/v1/chat/completions")
    if want == 400:
        assert status == 400, data[:300]
        assert json.loads(data)["error"]["param"] in ("max_tokens", "max_completion_tokens")
    else:
        assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == want, data[:300]


@pytest.mark.parametrize("path, extra", [
    ("/v1/completions", {"n": True}), ("/v1/completions", {"best_of": True}), ("/v1/completions", {"n": 1.0}),
    ("/v1/completions", {"echo": 0}), ("/v1/completions", {"presence_penalty": False}),
    ("/v1/chat/completions", {"n": True}),
    ("/v1/completions", {"stream": True, "stream_options": []}),
    ("/v1/completions", {"stream": True, "stream_options": False}),
    ("/v1/completions", {"stream": True, "stream_options": ""}),
    ("/v1/completions", {"stream": True, "stream_options": {"include_usage": True, "bogus": 1}}),
])
def test_wrongly_typed_no_op_values_are_refused(server, path, extra):
    """True == 1 and 1.0 == 1 in Python, so `"n": true` passed as n=1; `stream_options` of [] / false
    / "" read as not given; an unknown key inside it was ignored."""
    body = {"messages": MESSAGES} if "chat" in path else {"prompt": [1, 2, 3]}
    status, _, data = post_json(server, {**body, "max_tokens": 1, **extra}, path)
    assert status == 400, data[:300]
    assert json.loads(data)["error"]["param"] == next(iter(extra.keys() - {"stream"}))


@pytest.mark.parametrize("extra", [{"presence_penalty": 0.0}, {"n": 1, "echo": False},
                                   {"stream": True, "stream_options": {"include_obfuscation": False}}])
def test_the_no_op_values_themselves_still_pass(server, extra):
    status, _, data = post_json(server, {"prompt": [1, 2, 3], "max_tokens": 1, **extra})
    assert status == 200, data[:300]


def test_an_allowed_page_gets_cors_headers_and_a_preflight(server):
    """A page the Origin check lets through (here on another port of localhost, which a browser
    counts as another origin) could not read any answer: no Access-Control-Allow-Origin, and the
    preflight of its JSON POST had no Allow-Methods / Allow-Headers."""
    origin = b"http://localhost:3000"
    got, h, _, _ = _raw(server, b"OPTIONS /v1/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                        b"Origin: " + origin + b"\r\nAccess-Control-Request-Method: POST\r\n"
                        b"Access-Control-Request-Headers: content-type, authorization\r\n\r\n")
    assert got == 204 and h["access-control-allow-origin"] == origin.decode()
    assert "POST" in h["access-control-allow-methods"]
    assert h["access-control-allow-headers"] == "content-type, authorization"
    status, headers, _ = post_json(server, {"prompt": [1, 2], "max_tokens": 1}, headers={"Origin": origin.decode()})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == origin.decode()
    assert "Origin" in headers["Vary"]
    status, headers, _ = post_json(server, {"prompt": [1, 2], "max_tokens": 1})  # no Origin: a program
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    got, h, _, _ = _raw(server, b"GET /health HTTP/1.1\r\nHost: localhost\r\nOrigin: http://evil.example\r\n\r\n")
    assert got == 403 and "access-control-allow-origin" not in h


def _chunked(body: bytes, sizes) -> bytes:
    out, i = b"", 0
    for n in sizes:
        out += b"%x;ext=1\r\n" % n + body[i:i + n] + b"\r\n"
        i += n
    return out + (b"%x\r\n" % (len(body) - i) + body[i:] + b"\r\n" if i < len(body) else b"") + b"0\r\nX-T: 1\r\n\r\n"


def test_a_chunked_body_is_read(server):
    """RFC 9112 7.1: an HTTP/1.1 server reads chunked bodies (requests with a generator body, Go's
    io.Reader, Node streams send them); they got a 411. A second request on the connection is
    answered after it, so the framing was read exactly."""
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    got, _, data, closed = _raw(server, head + _chunked(body, [5, 17]) + b"GET /health HTTP/1.1\r\nHost: "
                                b"localhost\r\nConnection: close\r\n\r\n")
    assert got == 200 and len(json.loads(data)["choices"][0]["token_ids"]) == 2 and not closed, data[:300]
    status, _, want = post_json(server, json.loads(body))
    assert json.loads(want)["choices"][0]["token_ids"] == json.loads(data)["choices"][0]["token_ids"]


@pytest.mark.parametrize("chunks, status", [
    (b"zz\r\nab\r\n0\r\n\r\n", 400),  # not hex
    (b"5\r\nab\r\n0\r\n\r\n", 400),  # shorter than its size
    (b"2\r\nabXY0\r\n\r\n", 400),  # no CRLF after the data
    (b"%x\r\n" % (9 * 2 ** 20), 413),  # over the body limit, refused before it is read
])
def test_a_malformed_chunked_body_is_refused_and_closed(server, chunks, status):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    got, h, data, closed = _raw(server, head + chunks)
    assert got == status and closed and h["connection"] == "close", data[:300]


# ----------------------------------------------------------------------------- the diff review's findings

CHUNKED_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
BODY = json.dumps({"prompt": [1, 2], "max_tokens": 1}).encode()


@pytest.mark.parametrize("coding", [b"\x0bchunked", b"\xa0chunked", b"chunked\x1c", b"\x0cchunked"])
def test_a_disguised_chunked_coding_is_not_read_as_chunked(server, coding):
    """str.strip() also removes \\x0b, \\xa0, \\x1c: a proxy that does not see those values as chunked
    splits the connection's bytes differently from a server that does (request smuggling)."""
    head = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: " + coding + b"\r\n\r\n"
    got, h, data, closed = _raw(server, head + _chunked(BODY, []))
    assert got == 501 and closed, data[:300]


def test_chunked_in_http_1_0_is_refused_and_closed(server):
    """RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding is faulty framing; the server must close."""
    got, h, data, closed = _raw(server, b"POST /v1/completions HTTP/1.0\r\nConnection: keep-alive\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(BODY, [])
                                + b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert got == 400 and closed and "HTTP/1.1" in json.loads(data)["error"]["message"]


@pytest.mark.parametrize("chunks", [
    b" 5\r\nhello\r\n0\r\n\r\n",  # whitespace before the size
    b"\x0b5\r\nhello\r\n0\r\n\r\n",
    b"5\x0c\r\nhello\r\n0\r\n\r\n",
    b"5\r\r\nhello\r\n0\r\n\r\n",  # a bare CR
    b"5\r\nhello\r\n0\r\nno colon here\r\n\r\n",  # a trailer that is not name: value
    b"5\r\nhello\r\n0\r\nX-A: 1\r\n folded\r\n\r\n",  # obs-fold
])
def test_loose_chunk_framing_is_refused(server, chunks):
    got, _, data, closed = _raw(server, CHUNKED_HEAD + chunks)
    assert got == 400 and closed, data[:300]


def test_many_tiny_chunks_are_refused(server, monkeypatch):
    """1-byte chunks of an 8 MB body took ~690 MB of server memory (a bytes object per chunk) and
    11 s of one core: the chunks are now one buffer, and their number is capped."""
    from mamba_deploy import serve_http

    monkeypatch.setattr(serve_http, "MAX_CHUNKS", 8)
    got, _, data, closed = _raw(server, CHUNKED_HEAD + _chunked(BODY, [1] * 9))
    assert got == 413 and closed and "8 chunks" in json.loads(data)["error"]["message"]
    got, _, data, _ = _raw(server, CHUNKED_HEAD.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
                           + _chunked(BODY, [1] * 7))
    assert got == 200, data[:300]  # within the cap: 7 chunks and the rest in an eighth


def test_cors_header_is_not_carried_to_the_next_request(server):
    """http.server's 414 (request line too long) comes before parse_request: it carried the
    previous request's Access-Control-Allow-Origin."""
    import socket

    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost:3000\r\n\r\n"
                     + b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        replies = b""
        while chunk := sock.recv(65536):
            replies += chunk
    first, second = replies.split(b"HTTP/1.1 ")[1:3]
    assert b"Access-Control-Allow-Origin: http://localhost:3000" in first
    assert second.startswith(b"414") and b"Access-Control-Allow-Origin" not in second


def test_context_error_names_the_field_the_client_sent(capped):
    status, _, data = post_json(capped, {"messages": MESSAGES, "max_completion_tokens": 39, "stream": True},
                                "/v1/chat/completions")
    assert status == 400 and json.loads(data)["error"]["param"] == "max_completion_tokens", data[:300]
