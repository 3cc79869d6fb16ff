"""`mamba-deploy serve` against clients that leave, wait for `100 Continue`, or send long prompts.

Over loopback with raw sockets (what http.client would not do: close mid-request, pipeline
bytes, send headers without their body). A counting runner tells how many prefills and steps
the model really ran; its 20 ms steps make a 4000-token request take 80 s, so a generation
that was not stopped shows as a request that cannot be answered within the timeout.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
import types

import pytest
from conftest import in_thread, post_json, start_server, tiny_mamba_with_bpe, wait_until

from mamba_deploy import load_model
from mamba_deploy.errors import ConfigError
from mamba_deploy.generation import generate
from mamba_deploy.runners.torch_runner import TorchRunner
from mamba_deploy.serve import make_server

TIMEOUT = 10  # seconds, every request
LONG = 4000  # tokens: 80 s at 20 ms a step
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
GONE = re.compile(r"client closed the connection: generation stopped after (\d+) token\(s\)")


@pytest.fixture(scope="module")
def folder(hf_checkpoint, tmp_path_factory):
    return tiny_mamba_with_bpe(hf_checkpoint, tmp_path_factory, "serve_disconnect")


@pytest.fixture(scope="module")
def reference(folder):
    """The independent path: its own model load, generate() called directly."""
    return TorchRunner(load_model(folder))


class _Counting(TorchRunner):
    """Records each prefill's prompt ids (with the step count when it began) and counts steps;
    each step sleeps step_s, so that a long generation is still running when its client leaves,
    and waits for `gate` when one is set."""

    def __init__(self, model, step_s: float = 0.0):
        super().__init__(model)
        self.step_s, self.steps, self.prefills, self.gate = step_s, 0, [], None

    def prefill(self, ids, state, **kw):
        self.prefills.append((ids.tolist(), self.steps))
        return super().prefill(ids, state, **kw)

    def step(self, *a, **kw):
        self.steps += 1
        if self.gate is not None:
            assert self.gate.wait(TIMEOUT)
        if self.step_s:
            threading.Event().wait(self.step_s)
        return super().step(*a, **kw)


_start, _post = start_server, post_json


def _head(n: int, extra: bytes = b"", version: bytes = b"HTTP/1.1", path: bytes = b"/v1/completions") -> bytes:
    # Connection: close, so that these tests read each answer to the connection's end (keep-alive
    # itself: test_serve.py)
    return (b"POST " + path + b" " + version + b"\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + b"Connection: close\r\n" + extra + f"Content-Length: {n}\r\n\r\n".encode())


def _request_bytes(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return _head(len(data)) + data


def _connect(server, timeout=TIMEOUT):
    return socket.create_connection(server.server_address[:2], timeout=timeout)


def _read_until(sock, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    return got


def _read_all(sock) -> bytes:
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got




def _long(**kw) -> dict:
    return {"prompt": [1, 2], "max_tokens": LONG, "temperature": 0, "stop_token_ids": [], **kw}


def _next_request_runs_soon(srv, runner, at_close: float, steps_at_close: int):
    """A one-token request gets its answer long before the dropped generation could have ended,
    and that generation ran only a few steps past its client's close. (With continuous batching
    the new request runs beside the dropped one, so its answer can come before the dropped
    request's handler has noticed the close and logged it: wait for that handler to end.)"""
    status, _, data = _post(srv, {"prompt": [3], "max_tokens": 1, "temperature": 0})
    assert status == 200, data
    assert time.monotonic() - at_close < 5  # before: the dropped request's 80 s held the model
    wait_until(lambda: not srv._handlers and srv.scheduler.stats()["running"] == 0,
               "the dropped request's handler to end and its rows to leave")
    assert steps_at_close <= runner.steps < steps_at_close + 25, (steps_at_close, runner.steps)


# ----------------------------------------------------------------------------- clients that leave

@pytest.mark.parametrize("after", [b"", b"\r\n"], ids=["close", "stray-crlf-then-close"])
def test_a_non_streaming_client_that_closes_stops_its_generation(folder, request, capsys, after):
    """Only a streamed write noticed a client gone: a plain request ran its max_tokens to the end
    (holding the model) for nobody. Bytes sent while the generation runs are peeked at, never
    taken: a client that pipelined its next request and stays connected gets its whole answer;
    one that sent a stray CRLF and closed is seen as gone (Linux: the socket's TCP state)."""
    if after and not sys.platform.startswith("linux"):
        pytest.skip("a FIN behind unread bytes is read from Linux's TCP_INFO")
    runner = _Counting(load_model(folder), step_s=0.02)
    srv = _start(runner, request, quiet=False)
    with _connect(srv) as sock:  # pipelined bytes, connection kept open: not a disconnect
        sock.sendall(_request_bytes(_long(max_tokens=30)))
        wait_until(lambda: runner.steps >= 3, "the generation to run")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")  # stays unread in the server's socket
        reply = b""
        try:  # a server closing with those bytes unread may reset, after the answer
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    head, _, data = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and len(json.loads(data)["choices"][0]["token_ids"]) == 30
    assert not GONE.search(capsys.readouterr().err)

    sock = _connect(srv)
    sock.sendall(_request_bytes(_long()))
    wait_until(lambda: runner.steps >= 29 + 3, "the long generation to run")
    sock.sendall(after)
    sock.close()
    at_close, steps_at_close = time.monotonic(), runner.steps
    _next_request_runs_soon(srv, runner, at_close, steps_at_close)
    err = capsys.readouterr().err
    assert len(GONE.findall(err)) == 1 and "Traceback" not in err, err
    assert int(GONE.findall(err)[0]) >= 3, err  # the tokens it made (a non-stream request has no token events)


def test_a_client_that_gives_up_while_waiting_for_the_model_is_never_run(folder, request, capsys):
    """A request queued behind another generation whose client closes before its turn is dropped
    without its prefill, instead of being run to its max_tokens when the model is free."""
    runner = _Counting(load_model(folder), step_s=0.02)
    runner.gate = threading.Event()  # the first generation holds the model until the gate opens
    srv = _start(runner, request, quiet=False, max_num_seqs=1)  # one request at a time: the second waits
    first, answer = in_thread(_post, srv, _long(max_tokens=40))
    wait_until(lambda: runner.steps >= 1, "the first generation to run")
    sock = _connect(srv)
    sock.sendall(_request_bytes(_long(prompt=[9, 9, 9])))
    wait_until(lambda: srv.scheduler.stats()["waiting"] == 1, "the second request to wait for the model")
    sock.close()
    # its handler notices the close and ends before the model is free (not raced against the
    # first's remaining 0.8 s, which a loaded machine could lose)
    wait_until(lambda: len(srv._handlers) == 1, "the gone request's handler to end")
    runner.gate.set()
    first.join(TIMEOUT)
    assert answer and answer[0][0] == 200
    wait_until(lambda: not srv._handlers, "the dropped request's handler to end")  # before: 80 s of generation
    assert [ids for ids, _ in runner.prefills] == [[[1, 2]]]
    assert GONE.findall(capsys.readouterr().err) == ["0"]


def test_a_client_that_leaves_during_a_long_prompt_stops_it_at_the_next_piece(folder, request, capsys):
    """The gone-client check ran only between generated tokens, so a long prompt's prefill ran to
    its end for nobody while the next request waited. The server feeds prompts in pieces
    (--prefill-chunk) and checks between them: 500 pieces of 20 ms here, stopped a few after
    the close."""
    runner = _Counting(load_model(folder))
    real = runner.prefill

    def slow(ids, state, **kw):
        threading.Event().wait(0.02)
        return real(ids, state, **kw)

    runner.prefill = slow
    srv = _start(runner, request, quiet=False, prefill_chunk=8)
    sock = _connect(srv)
    sock.sendall(_request_bytes(_long(prompt=[1] * 4000)))
    wait_until(lambda: len(runner.prefills) >= 3, "the prompt's pieces to run")
    sock.close()
    at_close, pieces_at_close = time.monotonic(), len(runner.prefills)
    status, _, data = _post(srv, {"prompt": [3], "max_tokens": 1, "temperature": 0})
    assert status == 200, data
    assert time.monotonic() - at_close < 5  # before: the whole prompt, then 4000 tokens, for nobody
    # the second prompt's prefill can come before the long one's last piece (the close is seen
    # every 50 ms), so the pieces are told apart by content, not by position
    pieces = [ids[0] for ids, _ in runner.prefills]
    long = [p for p in pieces if p != [3]]
    assert pieces.count([3]) == 1 and long == [[1] * 8] * len(long)
    assert len(long) < pieces_at_close + 25 and runner.steps == 0
    # the dropped request's log line is written when its handler ends, which can be after the
    # second answer (a race seen once under load: an empty log)
    wait_until(lambda: not srv._handlers, "the dropped request's handler to end")
    assert GONE.findall(capsys.readouterr().err) == ["0"]


def test_prefill_chunk_is_checked_by_make_server(folder):
    runner = TorchRunner(load_model(folder))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match=f"prefill_chunk must be >= 1 \\(or None: one piece\\), got {bad!r}"):
            make_server(runner, "127.0.0.1", 0, prefill_chunk=bad)


def test_a_dropped_stream_stops_at_once_quietly_with_one_log_line(folder, request, capsys):
    """A stream noticed its client only when a write failed; now the token after the close is not
    generated-and-written into a dead socket, and the server says so in one line (no traceback)."""
    runner = _Counting(load_model(folder), step_s=0.02)
    srv = _start(runner, request, quiet=False)
    sock = _connect(srv)
    sock.sendall(_request_bytes(_long(stream=True)))
    _read_until(sock, b"data: ")  # headers, then the first token's event
    wait_until(lambda: runner.steps >= 3, "the stream to run")
    sock.close()
    at_close, steps_at_close = time.monotonic(), runner.steps
    _next_request_runs_soon(srv, runner, at_close, steps_at_close)
    err = capsys.readouterr().err
    assert len(GONE.findall(err)) == 1 and "Traceback" not in err and "connection lost" not in err, err


def test_an_error_answer_to_a_client_that_left_is_one_log_line_not_a_traceback(capsys):
    """A 400 (say, for a body cut short by a client that left) whose write hits the closed
    socket: the BrokenPipeError escaped the handler and socketserver printed a traceback. Driven
    directly, since over loopback the write fails only when the peer's reset wins a race."""
    from mamba_deploy.serve import RequestError, _Handler

    class Closed:
        def write(self, data):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    def cut_body():
        raise RequestError("invalid JSON body: Unterminated string")

    h = _Handler.__new__(_Handler)  # no socket: just what _guarded and the response writing read
    h.server, h.wfile, h.client_address = types.SimpleNamespace(quiet=False), Closed(), ("127.0.0.1", 9)
    h.command, h.request_version, h.requestline = "POST", "HTTP/1.1", "POST /v1/completions HTTP/1.1"
    h.close_connection = False
    h._guarded(cut_body)
    assert h.close_connection
    err = capsys.readouterr().err
    assert len(re.findall(r"connection lost or timed out \(BrokenPipeError\): response abandoned", err)) == 1, err


# ----------------------------------------------------------------------------- Expect

def test_expect_100_continue_is_answered_before_the_body(folder, reference, request):
    """curl (and PHP's curl, .NET) send `Expect: 100-continue` and wait for `100 Continue` before
    the body; http.server sends it only with protocol_version HTTP/1.1, so the client waited out
    its own timeout (curl: 1 s) on every large request. A refused request gets its refusal
    instead (no body asked for); an HTTP/1.0 request's expectation is ignored (RFC 9110)."""
    srv = _start(TorchRunner(load_model(folder)), request)
    body = json.dumps({"prompt": [1, 2], "max_tokens": 4, "temperature": 0, "stop_token_ids": [],
                       "user": "u" * 2000}).encode()
    ref = generate(reference, [[1, 2]], max_new_tokens=4, stop_token_ids=[]).tokens[0]
    with _connect(srv, timeout=5) as sock:
        sock.sendall(_head(len(body), b"Expect: 100-continue\r\n"))
        assert _read_until(sock, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        head, _, data = _read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and json.loads(data)["choices"][0]["token_ids"] == ref

    with _connect(srv, timeout=5) as sock:  # over the body limit: the 413 comes first
        sock.sendall(_head(9_000_000, b"Expect: 100-continue\r\n"))
        head, _, data = _read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and json.loads(data)["error"]["type"] == "request_too_large"
    with _connect(srv, timeout=5) as sock:  # unknown path: refused without asking for the body
        sock.sendall(_head(len(body), b"Expect: 100-continue\r\n", path=b"/v1/nope"))
        assert _read_all(sock).startswith(b"HTTP/1.1 404 ")
    with _connect(srv, timeout=5) as sock:  # HTTP/1.0: no interim answer
        sock.sendall(_head(len(body), b"Expect: 100-continue\r\n", version=b"HTTP/1.0") + body)
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 200 ") and b"100 Continue" not in reply


@pytest.mark.parametrize("expect", [b"x-wait-for-me", b"100-continue, x-more"])
def test_any_other_expectation_is_a_417_before_the_body(folder, request, expect):
    """An expectation the server cannot meet is refused (417) at once; before, the server waited
    for a body the client was holding back."""
    srv = _start(TorchRunner(load_model(folder)), request)
    with _connect(srv, timeout=5) as sock:
        sock.sendall(_head(20, b"Expect: " + expect + b"\r\n"))
        head, _, data = _read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 417 ") and b"Content-Type: application/json" in head
    err = json.loads(data)["error"]
    assert err["code"] is None and expect.decode() in err["message"] and "100-continue" in err["message"]


# ----------------------------------------------------------------------------- --max-prompt-tokens

def _texts_of_lengths(tok, lengths):
    """Prefixes of a sentence that encode to each of `lengths` tokens."""
    sentence = "the quick brown fox jumps over the lazy dog and a stitch in time saves nine"
    by_len = {}
    for k in range(1, len(sentence) + 1):
        by_len.setdefault(len(tok.encode(sentence[:k])), sentence[:k])
    assert all(n in by_len for n in lengths), sorted(by_len)
    return [by_len[n] for n in lengths]


def _refused(srv, body, path="/v1/completions"):
    status, headers, data = _post(srv, body, path)
    assert status == 400 and headers["Content-Type"] == "application/json", data
    err = json.loads(data)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "context_length_exceeded"  # OpenAI's code
    return err


def test_max_prompt_tokens_refuses_longer_prompts_before_generating(folder, reference, request):
    runner = _Counting(load_model(folder))
    srv = _start(runner, request, max_prompt_tokens=5)
    text5, text6 = _texts_of_lengths(reference.tokenizer, [5, 6])
    for prompt in ([1] * 5, text5, [[1] * 5, [2] * 3]):  # exactly at the limit: answered
        status, _, data = _post(srv, {"prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert status == 200, data
    assert len(runner.prefills) == 3
    for prompt, what in (([1] * 6, "the prompt"), (text6, "the prompt"), ([[1] * 5, [2] * 6], "prompt 1"),
                         (["a", text6, "b"], "prompt 1")):
        for stream in (False, True):  # a stream is refused before it starts
            err = _refused(srv, {"prompt": prompt, "max_tokens": 2, "stream": stream})
            size = "over this server's limit of 5 tokens" if isinstance(prompt, str) or isinstance(prompt[1], str) \
                else "6 tokens, over this server's limit of 5"  # text is tokenized only up to the limit + 1
            assert err["message"] == f"{what} is {size} (--max-prompt-tokens 5); shorten it" and err["param"] == "prompt"
    assert len(runner.prefills) == 3  # nothing generated for them


def test_max_prompt_tokens_counts_the_chat_as_rendered(folder, request):
    runner = _Counting(load_model(folder))
    messages = [{"role": "user", "content": "the quick brown fox"}]
    body = {"messages": messages, "max_tokens": 1, "temperature": 0}
    status, _, data = _post(_start(runner, request, chat_template=TEMPLATE), body, "/v1/chat/completions")
    assert status == 200, data
    n = json.loads(data)["usage"]["prompt_tokens"]  # the rendered conversation, as generated from
    assert n > len("the quick brown fox".split())  # the role names and the generation prompt count too
    status, _, data = _post(_start(runner, request, chat_template=TEMPLATE, max_prompt_tokens=n), body,
                            "/v1/chat/completions")
    assert status == 200, data
    err = _refused(_start(runner, request, chat_template=TEMPLATE, max_prompt_tokens=n - 1),
                   {**body, "stream": True}, "/v1/chat/completions")
    assert err["param"] == "messages" and err["message"] == (
        f"the conversation in the chat template is over this server's limit of {n - 1} tokens "
        f"(--max-prompt-tokens {n - 1}); shorten it")
    assert len(runner.prefills) == 2


@pytest.mark.parametrize("value", [0, -3, True, "5", 2.0])
def test_make_server_refuses_a_bad_max_prompt_tokens(reference, value):
    with pytest.raises(ConfigError, match=r"max_prompt_tokens must be >= 1 \(or None: no limit\), got "):
        make_server(reference, "127.0.0.1", 0, max_prompt_tokens=value)


def test_cli_max_prompt_tokens_is_checked_and_reaches_the_server(folder, capsys, monkeypatch):
    from mamba_deploy import serve
    from mamba_deploy.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", str(folder), "--max-prompt-tokens", "0"])
    assert exc.value.code == 2
    assert "argument --max-prompt-tokens: 0 must be >= 1" in capsys.readouterr().err
    seen = []

    def fake_make_server(runner, *a, **kw):  # records what the CLI asked for, then ends the command
        seen.append(kw.get("max_prompt_tokens", "missing"))
        raise ConfigError("stop here")

    monkeypatch.setattr(serve, "make_server", fake_make_server)
    assert main(["serve", str(folder), "--port", "0", "--quiet", "--max-prompt-tokens", "7"]) == 2
    assert main(["serve", str(folder), "--port", "0", "--quiet"]) == 2
    assert seen == [7, None]
