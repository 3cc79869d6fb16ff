"""The thirty-eighth session's server review: what a client (or a web page) can do to
`mamba-deploy serve` below the OpenAI schema. Over loopback with raw sockets where http.client
would not send the bytes (a trickled request, two framings, a foreign Host).

- a prompt of megabytes is tokenized only up to --max-prompt-tokens, and any text prompt once;
- a request has --request-timeout seconds to arrive in full, however it trickles;
- Content-Length and Transfer-Encoding together, two Content-Lengths, "+51": refused, closed;
- a Host the server does not answer to (DNS rebinding) and a web page's Origin: 403;
- --max-connections: one more connection gets a 503 at once; an accept out of descriptors waits;
- a 500 and a chat-template error do not hand the server's paths or Python version to clients."""

from __future__ import annotations

import errno
import json
import socket
import socketserver
import time

import pytest
from conftest import post_json, serving, start_server, tiny_mamba_with_bpe

from mamba_deploy import load_model
from mamba_deploy.cli import main
from mamba_deploy.errors import ConfigError
from mamba_deploy.generation import generate
from mamba_deploy.runners.torch_runner import TorchRunner
from mamba_deploy.serve import make_server

TIMEOUT = 10
BAD_TEMPLATE = "{% for m in messages %}{{ m['content'] | no_such_filter }}{% endfor %}"


@pytest.fixture(scope="module")
def folder(hf_checkpoint, tmp_path_factory):
    return tiny_mamba_with_bpe(hf_checkpoint, tmp_path_factory, "serve_thirty_eighth")


@pytest.fixture(scope="module")
def reference(folder):
    return TorchRunner(load_model(folder))


_start, _post = start_server, post_json


def _raw(server, data: bytes, timeout=TIMEOUT) -> tuple[int, dict, bytes, bool]:
    """Sends `data` -> (status, lower-cased headers, body, whether the server then closed)."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        f = sock.makefile("rb")
        status = int(f.readline().split()[1])
        headers = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            k, v = line.decode().split(":", 1)
            headers[k.strip().lower()] = v.strip()
        body = f.read(int(headers.get("content-length", 0)))
        closed = f.read(1) == b""  # end of file: the server closed its side
        return status, headers, body, closed


def _recording(runner):
    """The runner's tokenizer with each encode()'s text length recorded."""
    tok = runner.tokenizer
    seen, encode = [], tok.encode

    def recording(text, *a, **kw):
        seen.append(len(text))
        return encode(text, *a, **kw)

    tok.encode = recording
    return seen


# ----------------------------------------------------------------------------- prompt tokenization

def test_a_megabyte_prompt_over_the_limit_is_refused_without_tokenizing_it_whole(folder, request):
    runner = TorchRunner(load_model(folder))
    seen = _recording(runner)
    srv = _start(runner, request, max_prompt_tokens=64)
    text = "the quick brown fox jumps over the lazy dog. " * 40000  # 1.8 MB
    status, _, data = _post(srv, {"prompt": text, "max_tokens": 1})
    err = json.loads(data)["error"]
    assert status == 400 and err["code"] == "context_length_exceeded", data
    assert "over this server's limit of 64 tokens (--max-prompt-tokens 64)" in err["message"]
    assert seen and max(seen) < len(text) // 50, seen  # only a prefix was tokenized


def test_a_long_chat_over_the_limit_is_refused_without_tokenizing_it_whole(folder, request):
    runner = TorchRunner(load_model(folder))
    seen = _recording(runner)
    srv = _start(runner, request, max_prompt_tokens=64, chat_template="{% for m in messages %}{{ m['content'] }}"
                 "{% endfor %}")
    content = "lorem ipsum dolor sit amet " * 40000
    status, _, data = _post(srv, {"messages": [{"role": "user", "content": content}], "max_tokens": 1},
                            "/v1/chat/completions")
    assert status == 400 and json.loads(data)["error"]["code"] == "context_length_exceeded", data
    assert seen and max(seen) < len(content) // 50, seen


@pytest.mark.parametrize("stream", [False, True])
def test_a_text_prompt_is_tokenized_once_and_answers_as_generate(folder, reference, request, stream):
    runner = TorchRunner(load_model(folder))
    seen = _recording(runner)
    srv = _start(runner, request)
    prompt = "the quick brown fox jumps over"
    status, _, data = _post(srv, {"prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": stream})
    assert status == 200, data
    if stream:
        events = [json.loads(x[6:]) for x in data.decode().split("\n\n") if x.startswith("data: {")]
        tokens = [t for e in events for c in e["choices"] for t in c["token_ids"]]
        text = "".join(c["text"] for e in events for c in e["choices"])
    else:
        choice = json.loads(data)["choices"][0]
        tokens, text = choice["token_ids"], choice["text"]
    want = generate(reference, prompt, max_new_tokens=6)  # the independent path: its own model and tokenization
    assert tokens == want.tokens[0] and text == want.texts[0]
    assert seen.count(len(prompt)) == 1, seen  # the server encoded the prompt once (it was 2, 3 with a stream)


# ----------------------------------------------------------------------------- the reading deadline

def test_a_request_trickled_a_byte_at_a_time_is_cut_off_at_the_request_timeout(folder, request):
    srv = _start(TorchRunner(load_model(folder)), request, request_timeout=1.0)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nX-Filler: " + b"a" * 100
    t0 = time.monotonic()
    with socket.create_connection(srv.server_address[:2], timeout=TIMEOUT) as sock:
        closed_at = None
        for b in head:  # 0.2 s a byte: each recv is well inside the 1 s socket timeout
            try:
                sock.sendall(bytes([b]))
                sock.settimeout(0.2)
                if sock.recv(1) == b"":
                    closed_at = time.monotonic() - t0
                    break
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed_at = time.monotonic() - t0
                break
        assert closed_at is not None and closed_at < 3.0, closed_at  # the old server waited for all 130 bytes


def test_a_body_that_does_not_arrive_in_time_is_a_408(folder, request):
    srv = _start(TorchRunner(load_model(folder)), request, request_timeout=1.0)
    with socket.create_connection(srv.server_address[:2], timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 200\r\n\r\n{")
        t0 = time.monotonic()
        for _ in range(8):  # a byte every 0.3 s: never idle for the 1 s socket timeout
            time.sleep(0.3)
            try:
                sock.sendall(b" ")
            except OSError:
                break
        sock.settimeout(TIMEOUT)
        reply = sock.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"--request-timeout" in reply and time.monotonic() - t0 < 4


@pytest.mark.parametrize("flag, value", [("--request-timeout", "0"), ("--request-timeout", "soon"),
                                         ("--allowed-hosts", "http://x/"), ("--allowed-hosts", "*,localhost"),
                                         ("--max-connections", "0")])
def test_the_new_serve_flags_are_checked_before_the_model_loads(folder, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["serve", str(folder), flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_the_serve_flags_reach_the_server(folder, monkeypatch):
    import mamba_deploy.serve as serve

    got = {}

    def fake_make_server(runner, host, port, **kw):
        got.update(kw)
        raise ConfigError("stop here")

    monkeypatch.setattr(serve, "make_server", fake_make_server)
    assert main(["serve", str(folder), "--port", "0", "--request-timeout", "2.5", "--max-connections", "7",
                 "--allowed-hosts", "A.example,10.0.0.5"]) == 2
    assert got["request_timeout"] == 2.5 and got["max_connections"] == 7
    assert got["allowed_hosts"] == ["a.example", "10.0.0.5"]


# ----------------------------------------------------------------------------- framing

@pytest.mark.parametrize("headers, status", [
    (b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", 400),  # which one frames the body?
    (b"Transfer-Encoding: gzip\r\nContent-Length: 2\r\n", 400),
    (b"Transfer-Encoding: gzip\r\n", 501),
    (b"Transfer-Encoding: gzip, chunked\r\n", 501),
    (b"Content-Length: 2\r\nContent-Length: 40\r\n", 400),
    (b"Content-Length: +2\r\n", 400),
    (b"Content-Length: 2,2\r\n", 400),
    (b"Content-Length: \xef\xbc\x92\r\n", 400),  # a full-width 2, which int() takes
])
def test_ambiguous_body_framing_is_refused_and_the_connection_closed(server_for_framing, headers, status):
    # a second request follows on the same connection: answered, it would be a smuggled request
    smuggled = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    got, h, body, closed = _raw(server_for_framing, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n" + headers
                                + b"\r\n{}" + smuggled)
    assert got == status and h["connection"] == "close" and closed, (got, body)
    assert json.loads(body)["error"]["message"]


def test_two_equal_content_lengths_are_one(server_for_framing):
    body = json.dumps({"prompt": [1, 2], "max_tokens": 1, "temperature": 0}).encode()
    n = str(len(body)).encode()
    got, _, data, _ = _raw(server_for_framing, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                           b"Content-Length: " + n + b"\r\nContent-Length: " + n + b"\r\n\r\n" + body)
    assert got == 200 and json.loads(data)["choices"][0]["token_ids"], data


@pytest.fixture(scope="module")
def server_for_framing(folder):
    with serving(TorchRunner(load_model(folder))) as srv:
        yield srv


# ----------------------------------------------------------------------------- Host and Origin

def test_a_foreign_host_is_refused_on_a_loopback_server_dns_rebinding(server_for_framing):
    got, _, body, closed = _raw(server_for_framing, b"GET /health HTTP/1.1\r\nHost: attacker.example:8000\r\n\r\n")
    msg = json.loads(body)["error"]["message"]
    assert got == 403 and closed and "attacker.example" in msg and "--allowed-hosts" in msg
    for host in (b"localhost:8000", b"127.0.0.1", b"[::1]:8000"):
        got, _, body, _ = _raw(server_for_framing, b"GET /health HTTP/1.1\r\nConnection: close\r\nHost: " + host
                               + b"\r\n\r\n")
        assert got == 200, (host, body)
    got, _, _, _ = _raw(server_for_framing, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert got == 400  # RFC 9112: an HTTP/1.1 request needs a Host
    got, _, _, _ = _raw(server_for_framing, b"GET /health HTTP/1.0\r\n\r\n")
    assert got == 200


def test_a_web_page_of_another_origin_cannot_post(server_for_framing):
    body = {"prompt": [1, 2], "max_tokens": 1}
    status, _, data = _post(server_for_framing, body, headers={"Origin": "https://attacker.example"})
    assert status == 403 and "origin" in json.loads(data)["error"]["message"], data
    status, _, data = _post(server_for_framing, body, headers={"Origin": "null"})  # a sandboxed frame
    assert status == 403, data
    status, _, data = _post(server_for_framing, body, headers={"Origin": "http://localhost:3000"})
    assert status == 200, data


def test_allowed_hosts_opens_the_server_to_a_name(folder, request):
    srv = _start(TorchRunner(load_model(folder)), request, allowed_hosts=["models.example"])
    got, _, _, _ = _raw(srv, b"GET /health HTTP/1.1\r\nConnection: close\r\nHost: models.example\r\n\r\n")
    assert got == 200
    got, _, _, _ = _raw(srv, b"GET /health HTTP/1.1\r\nConnection: close\r\nHost: localhost\r\n\r\n")
    assert got == 403  # the list replaces the default
    got, _, _, _ = _raw(srv, b"GET /health HTTP/1.1\r\nConnection: close\r\nHost: models.example.:80\r\n"
                        b"Origin: https://Models.Example\r\n\r\n")
    assert got == 200  # a trailing dot is the same DNS name; names are case-blind
    any_host = _start(TorchRunner(load_model(folder)), request, allowed_hosts=["*"])
    got, _, _, _ = _raw(any_host, b"GET /health HTTP/1.1\r\nConnection: close\r\nHost: 10.1.2.3:8000\r\n"
                        b"Origin: http://app.example\r\n\r\n")
    assert got == 200  # "*": any name, so a page behind a proxy that rewrites Host works too
    for bad in ("localhost", ["http://x"], ["*", "localhost"], [], ["localhost:8000"], ["[::1]:8000"]):
        with pytest.raises(ConfigError, match="allowed_hosts"):
            make_server(TorchRunner(load_model(folder)), "127.0.0.1", 0, allowed_hosts=bad)


@pytest.mark.parametrize("spelling", ["LOCALHOST", "127.1", "127.0.0.2"])
def test_every_spelling_of_a_loopback_host_keeps_the_loopback_default(folder, request, spelling):
    try:
        srv = make_server(TorchRunner(load_model(folder)), spelling, 0, quiet=True)
    except ConfigError as e:  # an address this machine lacks (127.0.0.2 is loopback on Linux)
        pytest.skip(f"cannot bind {spelling}: {e}")
    request.addfinalizer(srv.server_close)
    assert "*" not in srv.allowed_hosts and "localhost" in srv.allowed_hosts, srv.allowed_hosts
    assert spelling.lower() in srv.allowed_hosts  # the name the user gave is the server's name too


def test_a_request_with_two_hosts_or_a_huge_content_length_is_refused_not_crashed(server_for_framing):
    got, _, _, closed = _raw(server_for_framing, b"GET /health HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n")
    assert got == 400 and closed
    got, _, body, closed = _raw(server_for_framing, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                                b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n")
    assert got == 413 and closed and json.loads(body)["error"]["type"] == "request_too_large"


# ----------------------------------------------------------------------------- connections

def test_a_connection_over_max_connections_gets_a_503_at_once(folder, request):
    srv = _start(TorchRunner(load_model(folder)), request, max_connections=2)
    idle = [socket.create_connection(srv.server_address[:2], timeout=TIMEOUT) for _ in range(2)]
    try:
        time.sleep(0.3)  # both accepted, each held by its handler thread
        t0 = time.monotonic()
        got, h, body, closed = _raw(srv, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert got == 503 and closed and h["retry-after"] == "1" and time.monotonic() - t0 < 2
        assert "--max-connections" in json.loads(body)["error"]["message"]
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:  # the handlers see the closes and end
        got = _raw(srv, b"GET /health HTTP/1.1\r\nConnection: close\r\nHost: localhost\r\n\r\n")[0]
        if got == 200:
            break
        time.sleep(0.1)
    assert got == 200


def test_an_accept_out_of_descriptors_waits_instead_of_spinning(folder, request, monkeypatch, capsys):
    from mamba_deploy.serve_http import ACCEPT_PAUSE_S

    srv = make_server(TorchRunner(load_model(folder)), "127.0.0.1", 0, quiet=True)
    request.addfinalizer(srv.server_close)

    def no_descriptors():
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socketserver.TCPServer, "get_request", lambda self: no_descriptors())
    srv._accept.quiet = False
    t0 = time.monotonic()
    for _ in range(3):
        with pytest.raises(OSError):
            srv.get_request()
    assert time.monotonic() - t0 >= 3 * ACCEPT_PAUSE_S * 0.9
    assert capsys.readouterr().err.count("cannot accept connections") == 1  # not one line per retry


# ----------------------------------------------------------------------------- what clients learn

def test_replies_do_not_name_the_python_version(server_for_framing):
    _, h, _, _ = _raw(server_for_framing, b"GET /health HTTP/1.1\r\nConnection: close\r\nHost: localhost\r\n\r\n")
    assert h["server"] == "mamba-deploy"


def test_a_broken_chat_template_error_names_the_model_not_its_path(folder, request):
    runner = TorchRunner(load_model(folder))
    runner.tokenizer.chat_template = BAD_TEMPLATE  # the model's own template, broken
    srv = _start(runner, request, model_name="tiny")
    status, _, data = _post(srv, {"messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions")
    msg = json.loads(data)["error"]["message"]
    assert status == 400 and "the chat template of tiny" in msg, msg
    assert str(folder) not in msg and str(folder.resolve()) not in msg
