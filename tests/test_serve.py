"""`mamba-deploy serve` over loopback: the HTTP answers are compared with `generate` called
directly on an independently loaded TorchRunner (the reference path), for text and token-id
prompts, batched, streamed and not; error cases must be 4xx JSON naming the problem. Every
request has a timeout; servers are shut down in fixture finalizers."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import in_thread, tiny_mamba_with_bpe, wait_until

from mamba_deploy import load_model
from mamba_deploy.generation import generate
from mamba_deploy.runners import open_runner
from mamba_deploy.runners.torch_runner import TorchRunner
from mamba_deploy.serve import make_server

TIMEOUT = 10  # seconds, every request
EXIT_TIMEOUT = 60  # a CLI server's exit after a signal (interpreter teardown is slow on a loaded host)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(hf_checkpoint, tmp_path_factory):
    return tiny_mamba_with_bpe(hf_checkpoint, tmp_path_factory, "serve")


@pytest.fixture(scope="module")
def reference(folder):
    """The independent path: its own model load, generate() called directly."""
    return TorchRunner(load_model(folder))


def _start(runner, **kw):
    server = make_server(runner, "127.0.0.1", 0, quiet=True, **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def _stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(TIMEOUT)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(folder, request):
    srv, thread = _start(open_runner(folder, "torch"), max_batch=4)
    request.addfinalizer(lambda: _stop(srv, thread))
    return srv


def _request(server, method, path, body=None, raw=None, headers=None):
    """-> (status, headers, body bytes)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _post(server, body, **kw):
    status, headers, data = _request(server, "POST", "/v1/completions", body, **kw)
    return status, headers, data


def _sse_events(data: bytes):
    text = data.decode()
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    payloads = [e[len("data: "):] for e in events]
    return [json.loads(p) for p in payloads[:-1]], payloads[-1]


def test_health_and_models(server, folder):
    status, headers, data = _request(server, "GET", "/health")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(data) == {"status": "ok", "model": folder.name, "backend": "torch", "running": 0, "waiting": 0}
    status, _, data = _request(server, "GET", "/v1/models")
    assert status == 200 and json.loads(data)["data"][0]["id"] == folder.name


def test_greedy_text_batch_equals_direct_generate(server, reference):
    prompts = ["the quick brown", "hello mamba"]
    ref = generate(reference, prompts, max_new_tokens=8, temperature=0.0)
    status, _, data = _post(server, {"model": server.model_name, "prompt": prompts, "max_tokens": 8, "temperature": 0})
    assert status == 200
    out = json.loads(data)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert [c["text"] for c in out["choices"]] == ref.texts
    assert [c["token_ids"] for c in out["choices"]] == ref.tokens
    assert [c["finish_reason"] for c in out["choices"]] == ref.stop_reasons
    p, c = sum(map(len, ref.prompt_tokens)), sum(map(len, ref.tokens))
    assert out["usage"] == {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def test_token_id_prompts_and_stop_tokens_equal_direct_generate(server, reference):
    prompts = [[5, 6, 7, 8, 9], [3]]  # different lengths: left-padded batch
    free = generate(reference, prompts, max_new_tokens=10, stop_token_ids=[])
    stop = free.tokens[0][4]
    ref = generate(reference, prompts, max_new_tokens=10, stop_token_ids=[stop])
    status, _, data = _post(server, {"prompt": prompts, "max_tokens": 10, "temperature": 0.0,
                                     "stop_token_ids": [stop]})
    assert status == 200
    choices = json.loads(data)["choices"]
    assert [c["token_ids"] for c in choices] == ref.tokens
    assert [c["finish_reason"] for c in choices] == ref.stop_reasons
    assert choices[0]["finish_reason"] == "stop" and choices[0]["token_ids"] == free.tokens[0][:free.tokens[0].index(stop)]
    tok = reference.tokenizer
    assert [c["text"] for c in choices] == [tok.decode(t) for t in ref.tokens]
    # a single flat token-id list is one prompt
    status, _, data = _post(server, {"prompt": prompts[0], "max_tokens": 10, "temperature": 0, "stop_token_ids": [], "ignore_eos": True})
    assert status == 200 and json.loads(data)["choices"][0]["token_ids"] == free.tokens[0]


def test_seeded_sampling_equals_direct_generate(server, reference):
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.2, seed=7)
    ref = generate(reference, [[1, 2, 3], [4, 5]], max_new_tokens=8, stop_token_ids=[], **kw)
    status, _, data = _post(server, {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 8, "stop_token_ids": [], "ignore_eos": True, **kw})
    assert status == 200 and [c["token_ids"] for c in json.loads(data)["choices"]] == ref.tokens


def test_stream_matches_non_stream(server):
    body = {"prompt": ["the quick brown", "a stitch"], "max_tokens": 8, "temperature": 0}
    status, _, data = _post(server, body)
    full = json.loads(data)
    status, headers, data = _post(server, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    chunks, done = _sse_events(data)
    assert done == "[DONE]"
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    for choice in full["choices"]:
        i = choice["index"]
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        token_chunks = [c for c in mine if c["finish_reason"] is None]
        assert all(len(c["token_ids"]) == 1 for c in token_chunks)  # one chunk per token
        assert [t for c in mine for t in c["token_ids"]] == choice["token_ids"]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"] and mine[-1]["token_ids"] == []
        assert all(c["finish_reason"] is None for c in mine[:-1])


def test_stop_strings_equal_direct_generate_and_stream_never_shows_them(server, reference):
    prompts = ["the quick brown", "a stitch"]
    free = generate(reference, prompts, max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    stop = free.texts[0][3:5]  # occurs in row 0's completion; maybe in row 1's too
    ref = generate(reference, prompts, max_new_tokens=12, temperature=0.0, stop_token_ids=[], stop_strings=[stop])
    assert ref.texts[0] == free.texts[0][:free.texts[0].index(stop)] and ref.stop_reasons[0] == "stop"
    body = {"prompt": prompts, "max_tokens": 12, "temperature": 0, "stop_token_ids": [], "ignore_eos": True, "stop": stop}
    status, _, data = _post(server, body)
    assert status == 200
    choices = json.loads(data)["choices"]
    assert [c["text"] for c in choices] == ref.texts
    assert [c["token_ids"] for c in choices] == ref.tokens
    assert [c["finish_reason"] for c in choices] == ref.stop_reasons
    status, _, data = _post(server, {**body, "stream": True})
    chunks, _ = _sse_events(data)
    for i, choice in enumerate(choices):
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(texts) == choice["text"]
        shown = ""
        for t in texts:  # at no point did the stream show the stop string
            shown += t
            assert stop not in shown


def test_concurrent_requests_are_serialised_and_correct(server, reference):
    prompts = [[[7, 8, 9]], [[10, 11]], [[12]], [[13, 14, 15, 16]]]
    refs = [generate(reference, p, max_new_tokens=6, stop_token_ids=[]).tokens for p in prompts]
    results = [None] * len(prompts)

    def worker(k):
        status, _, data = _post(server, {"prompt": prompts[k], "max_tokens": 6, "temperature": 0,
                                         "stop_token_ids": [], "ignore_eos": True, "stream": k % 2 == 1})
        if k % 2:
            chunks, _ = _sse_events(data)
            results[k] = (status, [[t for c in chunks for t in c["choices"][0]["token_ids"]]])
        else:
            results[k] = (status, [c["token_ids"] for c in json.loads(data)["choices"]])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * TIMEOUT)
    assert results == [(200, r) for r in refs]


@pytest.mark.parametrize("body,status,pattern", [
    (None, 400, r"invalid JSON"),  # raw body b"{not json"
    ({"max_tokens": 4}, 400, r"`prompt` is required"),
    ({"prompt": 5}, 400, r"`prompt` must be a string or a list"),
    ({"prompt": []}, 400, r"empty list"),
    ({"prompt": ""}, 400, r"prompt 0 is empty"),
    ({"prompt": ["a", [1, 2]]}, 400, r"not a token-id list"),
    ({"prompt": [[1, 999]]}, 400, r"token id 999 outside the vocabulary"),
    ({"prompt": ["a"] * 5}, 400, r"5 prompts exceed .*--max-batch 4"),
    ({"prompt": "a", "max_tokens": "8"}, 400, r"`max_tokens` must be an integer"),
    ({"prompt": "a", "max_tokens": 0}, 400, r"`max_tokens` must be in \[1, "),
    ({"prompt": "a", "temperature": True}, 400, r"`temperature` must be a"),
    ({"prompt": "a", "temperature": -1}, 400, r"`temperature` must be >= 0"),
    ({"prompt": "a", "top_p": 0}, 400, r"`top_p` must be in \(0, 1\]"),
    ({"prompt": "a", "repetition_penalty": 0}, 400, r"`repetition_penalty` must be > 0"),
    ({"prompt": "a", "top_p": 0, "stream": True}, 400, r"top_p"),  # rejected before the stream starts
    ({"prompt": "a", "stop_token_ids": ["x"]}, 400, r"`stop_token_ids` must be a list of integers"),
    ({"prompt": "a", "stop": [1]}, 400, r"`stop` must be a string or a list of non-empty strings"),
    ({"prompt": "a", "stop": ["x", ""]}, 400, r"`stop` must be a string or a list of non-empty strings"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, r"`stop` has 5 strings; at most 4"),
    ({"prompt": "a", "seed": -1}, 400, r"`seed` must be in"),
    ({"prompt": "a", "stream": "yes"}, 400, r"`stream` must be true or false"),
    ([1, 2], 400, r"must be a JSON object"),
    ({"prompt": "abc\ud800def"}, 400, r"prompt 0: the text holds '\\ud800' at character 3, a lone surrogate"),
    ({"prompt": ["ok", "\udfff"]}, 400, r"prompt 1: the text holds '\\udfff'"),  # valid JSON, not text: was a 500
])
def test_bad_requests_are_4xx_json(server, body, status, pattern):
    raw = b"{not json" if body is None else None
    got, headers, data = _post(server, body, raw=raw)
    assert got == status and headers["Content-Type"] == "application/json"
    err = json.loads(data)["error"]
    assert re.search(pattern, err["message"]), err["message"]
    assert err["type"] == "invalid_request_error" and "Traceback" not in err["message"]


def test_a_body_nested_too_deep_is_400_not_500(server, capsys):
    """json.loads raised RecursionError: a 500 and a traceback in the server's log."""
    depth = 50_000
    got, _, data = _post(server, None, raw=b"[" * depth + b"]" * depth)
    assert got == 400 and "invalid JSON body" in json.loads(data)["error"]["message"]
    assert "Traceback" not in capsys.readouterr().err


def test_default_max_tokens_fits_a_lower_limit(folder, reference, request):
    """A request without max_tokens got the default 16, refused by a server whose
    --max-tokens-limit is below it ("`max_tokens` must be in [1, 8], got 16"), a field the
    client never sent: every such request failed. Now the default is capped at the limit."""
    srv, thread = _start(open_runner(folder, "torch"), max_tokens_limit=8)
    request.addfinalizer(lambda: _stop(srv, thread))
    got, _, data = _post(srv, {"prompt": [1, 2], "temperature": 0, "stop_token_ids": [], "ignore_eos": True})
    assert got == 200, data
    want = generate(reference, [[1, 2]], max_new_tokens=8, temperature=0.0, stop_token_ids=[]).tokens[0]
    assert json.loads(data)["choices"][0]["token_ids"] == want and len(want) == 8
    got, _, data = _post(srv, {"prompt": [1, 2], "max_tokens": 9})  # one the client sends: still checked
    assert got == 400 and "`max_tokens` must be in [1, 8], got 9" in json.loads(data)["error"]["message"]


def test_a_get_with_a_body_closes_the_connection(server):
    """The unread body of a GET on a keep-alive connection was read as the next request
    ('Unsupported method (helloGET)'): the connection's answers went out of step."""
    import socket

    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello"
                     b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, headers, body = _read_response(f)
        assert status == 200 and headers["connection"] == "close" and json.loads(body)["status"] == "ok"
        assert f.read() == b""  # closed: the body's bytes were never taken for a request


@pytest.mark.parametrize("quiet", [True, False])
def test_a_client_that_resets_its_connection_gets_no_traceback(folder, request, capsys, quiet):
    """A client that closed its keep-alive connection without reading the answer (a reset) made
    socketserver print a full ConnectionResetError traceback, even with --quiet. Now: one line,
    none when quiet."""
    import socket
    import struct

    srv = make_server(open_runner(folder, "torch"), "127.0.0.1", 0, quiet=quiet)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    request.addfinalizer(lambda: _stop(srv, thread))
    for _ in range(2):
        sock = socket.create_connection(srv.server_address[:2], timeout=TIMEOUT)
        sock.sendall(_raw("GET", "/health"))
        wait_until(lambda: sock.recv(1, socket.MSG_PEEK), "the answer to arrive")  # left unread
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        sock.close()
        wait_until(lambda: not srv._handlers, "the connection's handler to end")
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err
    # one line a connection, whether the reset is seen between requests or while its answer is written
    lost = re.findall(r"connection lost(?: or timed out)? \(ConnectionResetError\)", err)
    assert len(lost) == (0 if quiet else 2), err


def test_bad_paths_and_methods(server):
    for method, path, status in [("GET", "/nope", 404), ("POST", "/v1/chat", 404),
                                 ("GET", "/v1/completions", 405), ("POST", "/health", 405)]:
        got, _, data = _request(server, method, path, {} if method == "POST" else None)
        assert got == status
        assert json.loads(data)["error"]["message"]
    got, _, data = _request(server, "GET", "/nope")
    assert "/nope" in json.loads(data)["error"]["message"]
    # non-finite numbers are not JSON
    got, _, data = _post(server, None, raw=b'{"prompt": "a", "temperature": NaN}')
    assert got == 400 and "NaN" in json.loads(data)["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_request_for_another_model_is_openais_404(server, path):
    body = {"model": "gpt-4o", "prompt": "a", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1}
    if path.endswith("/completions") and "chat" not in path:
        del body["messages"]
    else:
        del body["prompt"]
    got, _, data = _request(server, "POST", path, body)
    err = json.loads(data)["error"]
    assert got == 404 and err["code"] == "model_not_found" and err["param"] == "model"
    assert "'gpt-4o'" in err["message"] and repr(server.model_name) in err["message"]
    got, _, data = _request(server, "POST", path, {**body, "model": 7})
    assert got == 400 and json.loads(data)["error"]["param"] == "model"
    for ok in ({**body, "model": server.model_name}, {k: v for k, v in body.items() if k != "model"}):
        got, _, data = _request(server, "POST", path, ok)
        if "chat" in path:  # past the model check: this model has no chat template
            assert got == 400 and json.loads(data)["error"]["param"] == "messages", data
        else:
            assert got == 200, data


def test_error_codes_are_strings_or_null_as_openai_sends_them(server):
    for body in ({"prompt": "a", "temperature": -1}, {"prompt": "a", "n": 3}):
        got, _, data = _post(server, body)
        assert got == 400 and json.loads(data)["error"]["code"] is None
    got, _, data = _request(server, "GET", "/nope")
    assert got == 404 and json.loads(data)["error"]["code"] is None


def _read_response(f):
    """One HTTP/1.1 response from a socket file -> (status, headers (lower-case names), body)."""
    status = int(f.readline().split()[1])
    headers = {}
    for line in iter(f.readline, b"\r\n"):
        k, v = line.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    n = headers.get("content-length")
    return status, headers, (f.read(int(n)) if n is not None else f.read())


def _raw(method, path, body: bytes = b""):
    return (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_keep_alive_carries_requests_until_an_unread_body_or_a_stream_closes_it(server, reference):
    import socket

    good = json.dumps({"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0}).encode()
    bad_value = json.dumps({"prompt": "a", "temperature": -1}).encode()  # read, then refused: stays open
    ref = generate(reference, [[1, 2, 3]], max_new_tokens=3, temperature=0.0).tokens[0]
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock, sock.makefile("rb") as f:
        # pipelined on one connection: each answer in order, each with its own length
        sock.sendall(_raw("GET", "/health") + _raw("POST", "/v1/completions", good)
                     + _raw("POST", "/v1/completions", bad_value) + _raw("POST", "/v1/completions", good))
        answers = [_read_response(f) for _ in range(4)]
        assert [a[0] for a in answers] == [200, 200, 400, 200]
        assert all(a[1].get("connection") != "close" for a in answers)
        assert json.loads(answers[1][2])["choices"][0]["token_ids"] == ref == \
            json.loads(answers[3][2])["choices"][0]["token_ids"]
        # refused before its body is read (unknown path): the body would parse as the next request
        sock.sendall(_raw("POST", "/nope", b'GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n'))
        status, headers, _ = _read_response(f)
        assert status == 404 and headers["connection"] == "close"
        assert f.read() == b""  # closed: the smuggled GET was never answered
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock, sock.makefile("rb") as f:
        sock.sendall(_raw("POST", "/v1/completions", json.dumps({"prompt": [1], "max_tokens": 2,
                                                                  "stream": True}).encode()))
        status, headers, data = _read_response(f)  # no length: read to the close
        assert status == 200 and headers["connection"] == "close" and data.endswith(b"data: [DONE]\n\n")


def test_no_tokenizer_text_prompt_is_400_and_token_ids_still_work(hf_checkpoint, request):
    runner = TorchRunner(load_model(hf_checkpoint("mamba")[0]))  # a folder without tokenizer files
    runner.source_path = None
    srv, thread = _start(runner, max_batch=2)
    request.addfinalizer(lambda: _stop(srv, thread))
    got, _, data = _post(srv, {"prompt": "hello"})
    assert got == 400 and "tokenizer" in json.loads(data)["error"]["message"]
    got, _, data = _post(srv, {"prompt": [1, 2], "max_tokens": 3, "temperature": 0})
    choice = json.loads(data)["choices"][0]
    assert got == 200 and len(choice["token_ids"]) == 3 and choice["text"] == ""


def test_runner_failure_is_500_json_without_traceback(folder, request, capsys):
    class Broken(TorchRunner):
        def step(self, ids, state):
            raise RuntimeError("kaboom")

    srv, thread = _start(Broken(load_model(folder)))
    request.addfinalizer(lambda: _stop(srv, thread))
    got, _, data = _post(srv, {"prompt": [1, 2], "max_tokens": 3, "temperature": 0, "stop_token_ids": [], "ignore_eos": True})
    err = json.loads(data)["error"]
    # the client reads the type and an id; the text (which may hold the server's paths) and the
    # traceback go to the server's log under that id
    assert got == 500 and err["type"] == "server_error" and "RuntimeError" in err["message"]
    assert "Traceback" not in err["message"] and "kaboom" not in err["message"]
    ref = re.search(r"under id ([0-9a-f]{12})", err["message"]).group(1)
    log = capsys.readouterr().err
    assert f"internal error {ref}:" in log and "RuntimeError: kaboom" in log.split(f"internal error {ref}:")[1]
    # the lock was released: the server still answers
    assert _request(srv, "GET", "/health")[0] == 200


def _start_cli_server(args):
    """`mamba-deploy serve ARGS --port 0` in a subprocess -> (process, its port, its first line)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "mamba_deploy", "serve", *args, "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    timer = threading.Timer(60, proc.kill)  # bound the wait for the first line
    timer.start()
    try:
        line = proc.stdout.readline()
    finally:
        timer.cancel()
    m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not m:
        proc.kill()
        pytest.fail(f"server did not start: {line!r} {proc.stderr.read()}")
    return proc, int(m.group(1)), line


def _health(port: int) -> dict:
    """GET /health of a CLI server; asserts a 200 and returns the JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())
    finally:
        conn.close()


def test_cli_serve_answers_then_exits_cleanly_on_ctrl_c(folder):
    proc, port, _ = _start_cli_server([str(folder)])
    try:
        assert _health(port)["backend"] == "torch"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(EXIT_TIMEOUT) == 0
        assert "shutting down" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(EXIT_TIMEOUT)


def _track_servers(monkeypatch):
    """([servers], [runners]) that the CLI's serve makes, appended as it makes them."""
    from mamba_deploy import serve

    servers, runners = [], []
    real_make = serve.make_server

    def make(runner, *a, **kw):
        runners.append(runner)
        servers.append(real_make(runner, *a, **kw))
        return servers[-1]

    monkeypatch.setattr(serve, "make_server", make)
    return servers, runners


def _signal_once_serving(servers: list, sig) -> None:
    """From a helper thread: send this process `sig` once the first server answers /health."""
    def send():
        wait_until(lambda: servers and _health(servers[0].server_address[1]), "the server to answer")
        os.kill(os.getpid(), sig)

    threading.Thread(target=send, daemon=True).start()


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_cli_serve_signals_during_its_clean_up_do_not_break_it_off(folder, monkeypatch, capsys, first):
    """A second SIGTERM / Ctrl-C / SIGHUP while the server shuts down raised KeyboardInterrupt
    inside server_close / runner.close: exit 130 with the model half freed (llama.cpp then crashed
    at exit). They are now reported and the clean-up finishes: exit 0, the runner closed."""
    from mamba_deploy import serve
    from mamba_deploy.cli import main

    servers, runners = _track_servers(monkeypatch)
    real_close = serve.CompletionServer.server_close

    def close_under_signals(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # the handler runs in this (the main) thread, between bytecodes
        real_close(self)

    monkeypatch.setattr(serve.CompletionServer, "server_close", close_under_signals)
    handlers = lambda: [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]  # noqa: E731
    before = handlers()
    _signal_once_serving(servers, first)
    assert main(["serve", str(folder), "--port", "0", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "shutting down" in err and err.count("already shutting down") == 3, err
    assert runners[0].closed
    assert handlers() == before


def test_cli_serve_puts_back_a_host_apps_signal_handlers(folder, monkeypatch):
    """An app that runs cli.main with its own SIGHUP / SIGTERM handlers gets them back after
    serve: cli.main leaves a non-default SIGHUP alone, and serve put back only SIGINT's, so the
    app's SIGHUP handler stayed replaced by serve's "already shutting down"."""
    from mamba_deploy.cli import main

    def app_handler(signum, frame):
        pass

    servers, _ = _track_servers(monkeypatch)
    previous = {sig: signal.signal(sig, app_handler) for sig in (signal.SIGHUP, signal.SIGTERM)}
    _signal_once_serving(servers, signal.SIGINT)
    try:
        assert main(["serve", str(folder), "--port", "0", "--quiet"]) == 0
        assert signal.getsignal(signal.SIGHUP) is app_handler and signal.getsignal(signal.SIGTERM) is app_handler
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Watched(TorchRunner):
    """Counts runner calls and records whether two ever overlapped."""

    def __init__(self, model):
        super().__init__(model)
        self.active, self.overlap, self.steps = 0, False, 0
        self._guard = threading.Lock()

    def _enter(self):
        with self._guard:
            self.active += 1
            self.overlap |= self.active > 1

    def _leave(self):
        with self._guard:
            self.active -= 1

    def prefill(self, *a, **kw):
        self._enter()
        try:
            threading.Event().wait(0.005)  # widen the window an unserialised server would overlap in
            return super().prefill(*a, **kw)
        finally:
            self._leave()

    def step(self, *a, **kw):
        self._enter()
        try:
            self.steps += 1
            threading.Event().wait(0.001)
            return super().step(*a, **kw)
        finally:
            self._leave()


def test_runner_calls_never_overlap_and_a_dropped_stream_frees_the_runner(folder, reference, request):
    import socket

    runner = _Watched(load_model(folder))
    srv, thread = _start(runner, max_batch=2)
    request.addfinalizer(lambda: _stop(srv, thread))
    bodies = [{"prompt": [[k + 1, k + 2]], "max_tokens": 6, "temperature": 0, "stop_token_ids": [], "ignore_eos": True} for k in range(6)]
    results = [None] * len(bodies)

    def worker(k):
        status, _, data = _post(srv, bodies[k])
        results[k] = (status, json.loads(data)["choices"][0]["token_ids"])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * TIMEOUT)
    refs = [generate(reference, b["prompt"], max_new_tokens=6, stop_token_ids=[]).tokens[0] for b in bodies]
    assert results == [(200, r) for r in refs] and not runner.overlap

    # a client that drops a long stream after the first token: generation stops, the lock is freed
    runner.steps = 0
    body = json.dumps({"prompt": [1, 2], "max_tokens": 4000, "temperature": 0, "stop_token_ids": [], "ignore_eos": True,
                       "stream": True}).encode()
    sock = socket.create_connection(srv.server_address[:2], timeout=TIMEOUT)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while b"data: " not in got:  # headers, then the first token's event
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    sock.close()
    status, _, data = _post(srv, bodies[0])  # waits on the lock until the dropped stream ends
    assert status == 200 and json.loads(data)["choices"][0]["token_ids"] == refs[0]
    assert runner.steps < 1000 and not runner.overlap


class _Slow(TorchRunner):
    """A runner slow enough (20 ms a step) that a long request is still running when the server closes."""

    def __init__(self, model):
        super().__init__(model)
        self.steps = 0

    def step(self, *a, **kw):
        self.steps += 1
        threading.Event().wait(0.02)
        return super().step(*a, **kw)




@pytest.mark.parametrize("stream", [False, True])
def test_server_close_ends_a_running_generation_and_waits_for_it(folder, stream):
    """Closing must not free the runner under a running request (nor let the process exit under
    it): the generation stops after its current token, its client is told why, and server_close
    returns only when the handler is done."""
    runner = _Slow(load_model(folder))
    srv, thread = _start(runner)
    body = {"prompt": [1, 2], "max_tokens": 4000, "temperature": 0, "stop_token_ids": [], "ignore_eos": True, "stream": stream}
    client, answer = in_thread(_post, srv, body)
    wait_until(lambda: runner.steps >= 3, "the generation to start")
    t0 = time.monotonic()
    srv.shutdown()
    srv.server_close()
    assert time.monotonic() - t0 < 5 and srv.unfinished == []
    thread.join(TIMEOUT)
    client.join(TIMEOUT)
    status, _, data = answer[0]
    if stream:  # headers were out: the error comes in-band, as the stream's last event
        assert status == 200
        last = json.loads(data.decode().strip().split("\n\n")[-1][len("data: "):])
        err = last["error"]
    else:
        assert status == 503
        err = json.loads(data)["error"]
    assert err["type"] == "server_error" and "shutting down" in err["message"]
    assert runner.steps < 100  # 4000 if the generation had run to its end


def test_server_close_ends_a_connection_that_never_sends_its_request(folder):
    import socket

    srv, thread = _start(TorchRunner(load_model(folder)), request_timeout=60.0)
    sock = socket.create_connection(srv.server_address[:2], timeout=TIMEOUT)
    try:
        wait_until(lambda: srv._handlers, "the connection's handler thread")
        time.sleep(0.1)  # it is now blocked reading the request line
        t0 = time.monotonic()
        srv.shutdown()
        srv.server_close()
        assert time.monotonic() - t0 < 5 and srv.unfinished == []  # not the 60 s request timeout
        thread.join(TIMEOUT)
    finally:
        sock.close()


def test_server_close_waits_for_a_handler_that_had_not_started_yet(folder):
    """A handler thread started just before the shutdown registered itself only once it ran, so
    server_close could miss it and the runner was closed under it."""
    from mamba_deploy.serve import CompletionServer

    done, entered = threading.Event(), threading.Event()

    class LateStart(CompletionServer):
        def process_request_thread(self, request, client_address):
            entered.set()
            time.sleep(1.5)  # exists, but has not reached the handler when shutdown() (<= 0.5 s poll) returns
            super().process_request_thread(request, client_address)
            done.set()

    srv = LateStart(("127.0.0.1", 0), TorchRunner(load_model(folder)), "m", 8, 4096, True, 60.0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    client, _ = in_thread(_request, srv, "GET", "/health")
    assert entered.wait(TIMEOUT)  # accepted: its thread sleeps in process_request_thread
    srv.shutdown()
    srv.server_close()
    assert done.is_set() and srv.unfinished == []
    thread.join(TIMEOUT)
    client.join(TIMEOUT)


def test_cli_serve_ctrl_c_during_a_generation_ends_it_and_exits_cleanly(folder):
    # a limit the tiny model cannot reach before the signal, even when the host delays its delivery
    proc, port, _ = _start_cli_server([str(folder), "--max-tokens-limit", "100000000"])
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3 * TIMEOUT)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"prompt": [1, 2], "max_tokens": 100000000, "temperature": 0, "stop_token_ids": [], "ignore_eos": True, "stream": True}),
            headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")  # the generation is running
        proc.send_signal(signal.SIGINT)
        last = resp.read().decode().strip().split("\n\n")[-1]
        assert "shutting down" in json.loads(last[len("data: "):])["error"]["message"]
        assert proc.wait(EXIT_TIMEOUT) == 0
        err = proc.stderr.read()
        assert "shutting down" in err and "warning" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(EXIT_TIMEOUT)


@pytest.mark.parametrize("flag,value,pattern", [
    ("--port", "-1", r"argument --port: port -1 is outside 0\.\.65535"),
    ("--port", "70000", r"argument --port: port 70000 is outside 0\.\.65535"),
    ("--max-batch", "0", r"argument --max-batch: 0 must be >= 1"),
    ("--max-tokens-limit", "0", r"argument --max-tokens-limit: 0 must be >= 1"),
])
def test_cli_bad_numbers_are_usage_errors(folder, capsys, flag, value, pattern):
    """argparse rejects them (exit 2, usage line) before the model is loaded: no OverflowError
    traceback for a port, no server that turns every request away for max_tokens_limit 0."""
    from mamba_deploy.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", str(folder), flag, value])
    assert exc.value.code == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_cli_cannot_listen_is_a_user_error_naming_host_and_port(folder, capsys):
    """A port in use and a host that is not this machine's: exit 2 through the CLI's error path,
    naming host:port and what to change."""
    import socket

    from mamba_deploy.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(folder), "--port", str(port), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "pick another --port" in err
    assert main(["serve", str(folder), "--host", "999.1.1.1", "--port", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 999.1.1.1:0" in err and "--host 127.0.0.1" in err


def test_make_server_rejects_limits_below_one(reference):
    from mamba_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="max_tokens_limit must be >= 1, got 0"):
        make_server(reference, "127.0.0.1", 0, max_tokens_limit=0)
    with pytest.raises(ConfigError, match="max_batch must be >= 1, got 0"):
        make_server(reference, "127.0.0.1", 0, max_batch=0)


@pytest.mark.parametrize("body,pattern", [
    ({"prompt": "a", "top_p": 2}, r"`top_p` must be in \(0, 1\], got 2"),
    ({"prompt": "a", "temperature": -1, "stream": True}, r"`temperature` must be >= 0 \(0 = greedy\), got -1"),
    ({"prompt": "a", "temperature": "NaN"}, r"`temperature` must be a"),
    ({"prompt": "a", "min_p": 1.5}, r"`min_p` must be in \[0, 1\], got 1.5"),
    ({"prompt": "a", "top_k": -3}, r"`top_k` must be >= 0 \(0 or -1 = off, as in vLLM\), got -3"),
    (b'{"prompt": "a", "temperature": 1e999}', r"`temperature` must be a finite number"),  # JSON inf
])
def test_bad_sampling_values_are_400_not_500(server, body, pattern):
    raw = body if isinstance(body, bytes) else None
    got, headers, data = _post(server, None if raw else body, raw=raw)
    assert got == 400 and headers["Content-Type"] == "application/json"
    err = json.loads(data)["error"]
    assert re.search(pattern, err["message"]), err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == re.search(r"`(\w+)`", pattern).group(1)


def test_tiny_temperature_is_greedy_not_a_server_error(server, reference):
    """temperature 1e-45: logits / T overflowed to a NaN softmax (HTTP 500); it is as good as greedy."""
    ref = generate(reference, [[1, 2]], max_new_tokens=6, temperature=0.0, stop_token_ids=[])
    status, _, data = _post(server, {"prompt": [1, 2], "max_tokens": 6, "temperature": 1e-45, "seed": 0,
                                     "stop_token_ids": [], "ignore_eos": True})
    assert status == 200, data
    assert json.loads(data)["choices"][0]["token_ids"] == ref.tokens[0]


def test_cli_gguf_is_named_after_the_file(folder, tmp_path):
    """`serve out/tiny-q.gguf` reports 'tiny-q', not the folder 'out' that holds it."""
    pytest.importorskip("gguf", reason="gguf is not installed")
    from mamba_deploy.export.gguf import export_gguf

    gguf = export_gguf(folder, tmp_path / "out" / "tiny-q.gguf")
    proc, port, line = _start_cli_server([str(gguf), "--backend", "torch"])
    try:
        assert line.startswith("serving tiny-q (torch)")
        assert _health(port)["model"] == "tiny-q"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(EXIT_TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(EXIT_TIMEOUT)


def test_a_handler_thread_that_cannot_start_does_not_break_server_close(folder, monkeypatch):
    """Registered before start(), a thread whose start() failed stayed listed, and server_close
    raised 'cannot join thread before it is started' (never waiting for the live handlers)."""
    srv, thread = _start(TorchRunner(load_model(folder)))
    real_start, failed = threading.Thread.start, []

    def start(self):
        if getattr(self, "_target", None) == srv.process_request_thread and not failed:
            failed.append(self)
            raise RuntimeError("can't start new thread")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        _request(srv, "GET", "/health")  # its thread never started: the socket is closed
    assert _request(srv, "GET", "/health")[0] == 200
    srv.shutdown()
    srv.server_close()
    assert failed and srv.unfinished == []
    thread.join(TIMEOUT)
