"""`mamba-deploy serve`: a small OpenAI-style completions server over any Runner.

It talks to the model only through the Runner interface, so every backend (torch, onnx,
llama.cpp, openvino, tensorrt) gets it for free. Standard library only:
`http.server.ThreadingHTTPServer` accepts connections concurrently, and one scheduler loop
(batching.py, run in the thread that calls `serve_forever`) decodes every running request's
rows together in one batch (continuous batching): a request joins the batch once its prompts
are in and leaves it when it finishes.
`max_num_seqs` (--max-num-seqs) caps the rows decoded together; 1 runs one request at a time.
Several prompts in one request are that request's rows.

    GET  /health          -> {"status": "ok", "model": ..., "backend": ..., "running": rows, "waiting": requests}
    GET  /v1/models       -> {"object": "list", "data": [{"id": model, "object": "model", "created": ..., ...}]}
    GET  /v1/models/NAME  -> that model object (`created`: when the server started), or a 404 for another name
    POST /v1/completions  -> OpenAI "text_completion" (or Server-Sent Events with "stream": true)
    POST /v1/chat/completions -> OpenAI "chat.completion" (one conversation in `messages`, written in
                             the model's chat template: see chat.py; "chat.completion.chunk" events)

`prompt` is a string, a list of strings, a list of token ids, or a list of token-id lists.
`stop` is a string or a list of up to 4 (the text ends before the first one found; a stream
never shows it). Extensions to the OpenAI schema: `stop_token_ids` (besides the model's EOS, for
every kind of prompt; `ignore_eos`, as in vLLM, leaves the EOS out), `top_k`, `min_p`, `repetition_penalty` in the
request, and `token_ids` (the generated ids) in every choice / stream chunk.
Defaults follow OpenAI: max_tokens 16 for completions and --max-tokens-limit for chat (OpenAI's
chat has no small default), temperature 1.0 (send 0 for greedy). OpenAI fields the
server cannot honour (n > 1, logprobs, presence / frequency penalties other than 0, logit_bias,
chat's tools / response_format, ...) are a 400 naming the field, never silently ignored
(serve_request.py). `seed` (0..2**63-1) seeds the request's own sampler: the same request with the
same seed gives the same tokens (its rows draw from its own generator, whatever else runs
beside it; up to the rounding of a batched step, see batching.py). A request's `model`,
when sent, must be the served model's name (else a 404 with code "model_not_found", as OpenAI
answers); `--model-name` sets that name. Errors have OpenAI's shape: {"error": {"message",
"type", "param", "code"}}, `code` a string or null.

HTTP/1.1 with keep-alive: a connection carries request after request (OpenAI's clients pool
them). A stream is sent without a length and ends by closing its connection (`Connection:
close`); so does an error answered before the request's body was read. `Expect: 100-continue`
gets `100 Continue` once the request line, path and Content-Length pass (any other Expect
value: 417). A client that closes its connection (or its sending side, as nginx reads it) is
seen within 50 ms (a stream: at its next token); its rows leave the batch after the current
step, or it is dropped before it starts when it was still waiting.
`max_prompt_tokens` (--max-prompt-tokens) turns longer prompts away with a 400 before generating.
"""

from __future__ import annotations

import io
import json
import numbers
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from .errors import ConfigError, ContextLengthError, MambaDeployError, RunnerClosedError
from .serve_http import (CHUNKED, CLOSE, AcceptPause, DeadlineReader, bind_error, body_length, check_host,
                         check_allowed_hosts, check_host_and_origin, default_allowed_hosts, internal_error, peer_closed,
                         read_chunked, refuse_busy)
from .serve_request import (CHAT_FIELDS, CHAT_UNSUPPORTED, COMPLETION_FIELDS, RequestError, _check_max_tokens, _same,
                            _typed, check_model, error_payload, parse_completion_request, refuse_unknown,
                            refuse_unsupported)

MAX_BODY_BYTES = 8 * 1024 * 1024
SINGLE_FILE_SUFFIXES = (".gguf", ".engine", ".plan")  # artifacts that are one file, named for the model
POST_PATHS = ("/v1/completions", "/v1/chat/completions")
MODEL_PATH = "/v1/models/"  # + a model's name (percent-encoded by OpenAI's clients): GET one model
ENDPOINTS = "GET /health, GET /v1/models, GET /v1/models/{model}, POST /v1/completions, POST /v1/chat/completions"
JSON_HEADERS = {"Content-Type": "application/json"}
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


# ----------------------------------------------------------------------------- server

class ClientGone(Exception):
    """The client closed its connection while its request waited for or ran a generation: the
    generation is stopped and nothing is sent."""

    def __init__(self, tokens: int):
        super().__init__(f"client closed the connection after {tokens} generated token(s)")
        self.tokens = tokens


class ShuttingDown(RequestError):
    """The server is closing: a request that waited for, or was in, a generation gets a 503."""

    def __init__(self):
        super().__init__("the server is shutting down; retry on another server or after a restart",
                         status=503, type_="server_error")


class CompletionServer(ThreadingHTTPServer):
    # daemon handler threads, so that a stalled client cannot keep the process alive; server_close
    # still ends and waits for them (up to close_timeout): the runner is freed after them, and the
    # interpreter does not exit under a running handler (that aborted torch's exit now and then)
    daemon_threads = True
    close_timeout = 10.0
    # the listen backlog: socketserver's 5 dropped the SYNs of a burst of clients beyond it, which
    # then waited for their retransmit (1 s, then 3 s): 31 of 40 clients that connected at once
    request_queue_size = socket.SOMAXCONN

    def __init__(self, addr, runner, model_name: str, max_batch: int, max_tokens_limit: int,
                 quiet: bool, request_timeout: float | None, chat_template: str | None = None,
                 max_prompt_tokens: int | None = None, prefill_chunk: int | None = None, max_num_seqs: int = 16,
                 max_connections: int = 256, allowed_hosts: tuple[str, ...] = ("*",)):
        from .batching import Scheduler

        self.runner = runner
        self.prefill_chunk = prefill_chunk  # prompts go in pieces this long, checked for a gone client between
        self.chat_template = chat_template  # None: the model's own (chat.py)
        self.model_name = model_name
        self.created = int(time.time())  # the model object's `created` (OpenAI's schema requires one)
        self.max_batch = max_batch
        self.max_tokens_limit = max_tokens_limit
        self.max_prompt_tokens = max_prompt_tokens  # None: no limit
        self.quiet = quiet
        self.request_timeout = request_timeout  # seconds a request may take to arrive (serve_http.DeadlineReader)
        self.max_connections = max_connections  # open connections (one handler thread each); past it: a 503
        self.allowed_hosts = allowed_hosts  # Host / Origin names answered (serve_http.check_host_and_origin)
        self._accept = AcceptPause(quiet)
        self.closing = threading.Event()
        self.unfinished: list[threading.Thread] = []  # handlers still running after server_close
        self._handlers: dict[threading.Thread, socket.socket] = {}
        self._handlers_lock = threading.Lock()
        self.scheduler = None  # server_close runs inside super().__init__ when the port is busy
        super().__init__(addr, _Handler)  # binds first: a busy port raises before the scheduler's thread starts
        self.scheduler = Scheduler(runner, max_num_seqs, prefill_chunk, thread=False)  # run by serve_forever

    def serve_forever(self, poll_interval: float = 0.5):
        """Accepts connections in a helper thread and runs the model in this one, until
        shutdown(): torch and llama.cpp keep an OpenMP thread team per calling thread, and the
        model's steps ran 40-70 % slower on 2 cores in a thread other than the one that loaded
        it (batching.Scheduler). Requests wait for the model while no serve_forever runs."""
        accept = threading.Thread(target=super().serve_forever, args=(poll_interval,), daemon=True,
                                  name="mamba-deploy-accept")
        accept.start()
        try:
            self.scheduler.run()  # until shutdown() stops it, or a signal handler's scheduler.stop()
        finally:  # however the model loop ended (Ctrl-C raises through here): stop accepting too
            super().shutdown()
            accept.join()

    def handle_error(self, request, client_address):
        """An error outside a request's own handling: a client that reset or left its keep-alive
        connection (closing without reading the answer) gets one log line, as other clients that
        leave do (none with --quiet), not socketserver's traceback."""
        e = sys.exc_info()[1]
        if isinstance(e, (ConnectionError, TimeoutError)):
            if not self.quiet:
                print(f"{client_address[0]} - connection lost ({type(e).__name__})", file=sys.stderr)
            return
        super().handle_error(request, client_address)

    def shutdown(self):
        """Stops serve_forever (both its loops) and waits for it; running requests are ended by
        server_close."""
        self.scheduler.stop()
        super().shutdown()

    def get_request(self):
        return self._accept(super().get_request)

    def process_request(self, request, client_address):
        with self._handlers_lock:
            busy = len(self._handlers) >= self.max_connections
        if busy:
            if not self.quiet:
                print(f"{client_address[0]} - refused: {self.max_connections} connections open (--max-connections)",
                      file=sys.stderr)
            refuse_busy(request, self.max_connections)
            self.shutdown_request(request)
            return
        # registered before it starts (under the lock server_close snapshots with), so that a
        # thread started just before a shutdown is still joined
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address), daemon=True)
        with self._handlers_lock:
            self._handlers[t] = request
            try:
                t.start()
            except BaseException:  # no thread (or Ctrl-C here): nothing to join; socketserver closes the socket
                del self._handlers[t]
                raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._handlers_lock:
                self._handlers.pop(threading.current_thread(), None)

    def server_close(self):
        """Stop listening, end each running generation after its current token (503 to its
        client), end connections still waiting for a request, and wait up to close_timeout for
        the handlers; those still running are left in `unfinished`."""
        self.closing.set()
        super().server_close()
        with self._handlers_lock:
            handlers = list(self._handlers.items())
        for _, conn in handlers:
            try:  # a handler still reading its request gets EOF; replies still go out
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + self.close_timeout
        for thread, _ in handlers:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.unfinished = [t for t, _ in handlers if t.is_alive()]
        if self.scheduler is not None and not self.scheduler.close(max(0.0, deadline - time.monotonic())):
            self.unfinished.append(self.scheduler.loop_thread)  # still inside a runner call

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def model_object(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mamba-deploy"}

    def public(self, e: BaseException) -> str:
        """An error's text for a client: the model's path on this machine named by its served name."""
        text = str(e)
        path = getattr(self.runner, "artifact_path", None)
        if path is not None:
            for form in sorted({str(path), str(Path(str(path)).resolve())}, key=len, reverse=True):
                text = text.replace(form, f"the model {self.model_name!r}")
        return text

    def tokenizer_or_none(self):
        try:
            return self.runner.tokenizer
        except MambaDeployError:
            return None


class _Handler(BaseHTTPRequestHandler):
    server: CompletionServer
    server_version = "mamba-deploy"
    protocol_version = "HTTP/1.1"  # keep-alive: every answer but a stream has a Content-Length

    def setup(self):
        self.timeout = self.server.request_timeout  # socket timeout: slow or stalled clients
        super().setup()
        self.rfile.close()  # socketserver's reader: replaced by one that keeps a whole request's deadline
        self._reader = DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def version_string(self):  # the Server header: not the Python version too
        return self.server_version

    def handle_one_request(self):
        self._cors = None  # http.server's own refusals (a 414) come before parse_request: not the last request's
        # from the wait for its first line to the end of its body, a request has request_timeout seconds
        t = self.server.request_timeout
        self._reader.deadline = None if t is None else time.monotonic() + t
        super().handle_one_request()

    def _request_in(self):  # the request has arrived: its handling and reply are not under the deadline
        self._reader.deadline = None

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            super().log_message(fmt, *args)

    def parse_request(self):
        self._continue = False  # owe the client a `100 Continue` before reading its body
        self._body_unread = False  # bytes of this request still on the connection: it cannot carry another
        if not super().parse_request():
            return False
        try:
            check_host_and_origin(self.headers, self.server.allowed_hosts, self.request_version)
            self._cors = self.headers.get("Origin")  # an allowed page's: echoed so its browser may read the answer
            self._length = body_length(self.headers, self.request_version)
        except RequestError as e:
            self._body_unread = True  # its bytes cannot be told from the next request's: close
            self._send(e.status, e.payload(), headers={**JSON_HEADERS, **e.headers})
            return False
        # a POST without Content-Length may still send a body, ended only by closing (HTTP/1.0)
        self._body_unread = self._length is None and self.command == "POST" or bool(self._length)
        if self.command != "POST":
            self._request_in()
        expect = self.headers.get("Expect")
        if expect is None:
            return True
        if expect.strip().lower() != "100-continue":  # RFC 9110: the one expectation there is
            self.send_error(417, f"Expect: {expect[:80]!r} is not supported; only Expect: 100-continue is")
            return False
        # _read_json sends it once the path and Content-Length pass (not http.server, at once), so
        # a refused request does not make the client send its body first. HTTP/1.0 requests: ignored.
        self._continue = self.request_version >= "HTTP/1.1"
        return True

    def handle_expect_100(self):  # only _read_json sends the 100 (see parse_request)
        return True

    def end_headers(self):
        # CORS: a page whose Origin check_host_and_origin let through (the server's own host, a
        # listed one, or any with --allowed-hosts *) may read the answer; a browser treats another
        # port as another origin and would otherwise block it (and fail its preflight)
        if getattr(self, "_cors", None):
            self.send_header("Access-Control-Allow-Origin", self._cors)
            self.send_header("Vary", "Origin")
        super().end_headers()

    # -- responses
    def _send(self, status: int, payload: dict | None, headers=JSON_HEADERS):
        """payload None: no body and no Content-Length (a 204, which RFC 9110 8.6 forbids one)."""
        if headers.get("Connection") == "close":
            self.close_connection = True
        if getattr(self, "_body_unread", False):  # its bytes would be read as the next request (a GET
            headers = {"Connection": "close", **headers}  # with a body, a refused POST): close after this
            self.close_connection = True
        data = None if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if data is not None:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data is not None and getattr(self, "command", None) != "HEAD":  # a HEAD reply: the GET's headers,
            # no body (`command` is unset after a malformed request line)
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        # http.server's own refusals (a method with no do_*, a malformed request line, a line or
        # headers too long) in the JSON error shape clients parse, not its HTML page
        message = message or self.responses.get(code, ("error",))[0]
        if code in (400, 501):  # what to send instead
            message = f"{message}; endpoints: {ENDPOINTS}"
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True  # the request may not even have been read to its end
        self._send(code, error_payload(message, "invalid_request_error"),
                   headers={"Connection": "close", **JSON_HEADERS})

    def _guarded(self, fn):
        try:
            try:
                fn()
            except RequestError as e:  # a client that left before its error is written: below
                self._send(e.status, e.payload(), headers={**JSON_HEADERS, **e.headers})
        except ClientGone as e:
            self.close_connection = True
            self.log_message("client closed the connection: generation stopped after %d token(s)", e.tokens)
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as e:
            self.close_connection = True  # the client went away (or stalled); nothing more to send
            self.log_message("connection lost or timed out (%s): response abandoned", type(e).__name__)
        except Exception as e:  # noqa: BLE001 -- never a traceback to the client
            try:
                self._send(500, internal_error(e))
            except OSError:
                pass

    # -- routing
    def do_GET(self):
        self._guarded(self._get)

    def do_POST(self):
        self._guarded(self._post)

    def do_HEAD(self):  # RFC 9110 9.1: a general-purpose server supports GET and HEAD
        self._guarded(self._get)

    def do_OPTIONS(self):  # the methods an endpoint takes, in Allow (RFC 9110 9.3.7)
        self._guarded(self._options)

    def _other_method(self):  # PUT, DELETE, PATCH: a 405 naming the methods that work
        self._guarded(lambda: self._refuse_method(self._route_path()))

    do_PUT = do_DELETE = do_PATCH = _other_method

    def _route_path(self):
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _allowed(self, path: str) -> str:
        """The methods `path` takes (an Allow header's value); a 404 for an unknown path."""
        if path in POST_PATHS:
            return "POST"
        if path in ("/health", "/v1/models") or path.startswith(MODEL_PATH):
            return "GET, HEAD"
        raise RequestError(f"unknown path {self.path!r}; endpoints: {ENDPOINTS}", 404, "not_found")

    def _refuse_method(self, path: str):
        allow = self._allowed(path)
        raise RequestError(f"use {allow.split(',')[0]} for {path}", 405, "method_not_allowed",
                           headers={"Allow": allow})

    def _options(self):
        allow = f"{self._allowed(self._route_path())}, OPTIONS"
        headers = {"Allow": allow}
        if self._cors and self.headers.get("Access-Control-Request-Method"):  # a browser's preflight
            asked = self.headers.get("Access-Control-Request-Headers")
            headers.update({"Access-Control-Allow-Methods": allow,
                            "Access-Control-Allow-Headers": asked or "Content-Type, Authorization",
                            "Access-Control-Max-Age": "600"})
        self._send(204, None, headers=headers)

    def _get(self):
        path = self._route_path()
        s = self.server
        if path == "/health":
            self._send(200, {"status": "ok", "model": s.model_name, "backend": s.runner.name, **s.scheduler.stats()})
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [s.model_object()]})
        elif path.startswith(MODEL_PATH):  # OpenAI's models.retrieve
            name = unquote(path[len(MODEL_PATH):])
            check_model({"model": name}, s.model_name)
            self._send(200, s.model_object())
        else:
            self._refuse_method(path)

    def _post(self):
        self._max_field = "max_tokens"
        path = self._route_path()
        if path not in POST_PATHS:
            self._refuse_method(path)
        body = self._read_json()
        s = self.server
        check_model(body, s.model_name)
        chat = path == "/v1/chat/completions"
        if chat:
            body = self._chat_body(body)
        else:
            if isinstance(body, dict) and "messages" in body:
                raise RequestError("/v1/completions takes `prompt`, not `messages` (that is /v1/chat/completions)",
                                   param="messages")
            refuse_unknown(body, COMPLETION_FIELDS)
        prompts, as_text, kw, stream, include_usage = parse_completion_request(
            body, s.max_batch, s.runner.vocab_size, s.max_tokens_limit)
        if as_text or kw["stop_strings"]:
            try:
                _ = s.runner.tokenizer  # loads it; a missing one is the client's 400, before generating
            except MambaDeployError as e:
                what = "text prompts" if as_text else "`stop` strings"
                raise RequestError(f"{what} need a tokenizer: {s.public(e)}", param=None if as_text else "stop") from e
        prompts = self._prompt_ids(prompts, as_text, chat)  # text is tokenized here, once
        if kw.pop("ignore_eos"):
            kw["stop_token_ids"] = kw["stop_token_ids"] or []
        elif chat or as_text or kw["stop_token_ids"] is not None:  # text's default: its tokenizer's end ids
            from .generation import stops_with_eos

            kw["stop_token_ids"] = stops_with_eos(s.runner.tokenizer if as_text or chat else None,
                                                  kw["stop_token_ids"], s.runner)
        if stream:
            self._stream(prompts, as_text or chat, kw, include_usage, chat)
        else:
            self._complete(prompts, as_text, kw, chat)

    def _prompt_ids(self, prompts, as_text: bool, chat: bool) -> list[list[int]]:
        """The prompts as token ids (text as generate encodes it), each at most --max-prompt-tokens
        long (chat: the rendered template, tokenized by _chat_body), else a 400 before anything
        is generated or sent. Past the limit only a prefix is tokenized (encode_prefix): a
        multi-megabyte text held the interpreter for seconds, every other request waiting."""
        from .tokenizer import encode_prefix

        limit = self.server.max_prompt_tokens
        tok = self.server.runner.tokenizer if as_text else None  # loaded by _post's check
        ids = [encode_prefix(tok, p, None if limit is None else limit + 1) if as_text else p for p in prompts]
        for i, p in enumerate(ids):
            what = ("the conversation in the chat template" if chat
                    else f"prompt {i}" if len(prompts) > 1 else "the prompt")
            if not p:  # a text this tokenizer encodes to nothing (only spaces, for some): a 400, not a
                # stream's 200 with an error event after it
                raise RequestError(f"{what} tokenizes to no tokens; give text this model's tokenizer encodes",
                                   param="messages" if chat else "prompt")
            if limit is not None and len(p) > limit:  # text and chat: tokenized only up to limit + 1 tokens
                size = f"over this server's limit of {limit} tokens" if as_text or chat else \
                    f"{len(p)} tokens, over this server's limit of {limit}"
                raise RequestError(f"{what} is {size} (--max-prompt-tokens {limit}); shorten it",
                                   param="messages" if chat else "prompt", code="context_length_exceeded")
        return ids

    def _chat_body(self, body) -> dict:
        """A chat request as a completion request of one token-id prompt: the conversation in the
        model's chat template, tokenized without the tokenizer's own special tokens."""
        from .chat import chat_ids, check_messages

        if not isinstance(body, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
        if "prompt" in body:
            raise RequestError("/v1/chat/completions takes `messages`, not `prompt` (that is /v1/completions)",
                               param="prompt")
        refuse_unknown(body, CHAT_FIELDS)
        # the request's own faults first: they hold whatever the model's template is
        if not any(_same(body.get("n"), a) for a in (None, 1)):  # the completions answer suggests `prompt`
            raise RequestError(f"`n`={json.dumps(body['n'])[:80]}: only n=1 is supported; send the request "
                               "again for another reply", param="n")
        refuse_unsupported(body, CHAT_UNSUPPORTED)
        try:
            check_messages(body.get("messages"))
        except ConfigError as e:
            raise RequestError(str(e), param="messages") from e
        try:
            tok = self.server.runner.tokenizer
        except MambaDeployError as e:
            raise RequestError(f"chat needs a tokenizer: {self.server.public(e)}", param="messages") from e
        try:
            limit = self.server.max_prompt_tokens  # past it, the rest is not tokenized (_prompt_ids refuses it)
            ids = chat_ids(tok, body.get("messages"), self.server.chat_template,
                           None if limit is None else limit + 1, name=self.server.model_name)
        except ConfigError as e:  # no template, or the template refused the conversation
            raise RequestError(self.server.public(e), param="messages") from e
        rest = {k: v for k, v in body.items() if k not in ("messages", "max_completion_tokens")}
        if rest.get("logprobs") is False:  # chat's logprobs is a flag, off by default; clients send false
            del rest["logprobs"]
        limit = self.server.max_tokens_limit
        for name in ("max_tokens", "max_completion_tokens"):  # each checked when sent (null: not sent)
            if body.get(name) is not None:
                rest["max_tokens"] = _check_max_tokens(_typed(body, name, (int,), None), name, limit)
                self._max_field = name  # what a context-length 400 names
        # max_completion_tokens, OpenAI's newer name, wins over max_tokens when both are sent (as vLLM);
        # neither: OpenAI's chat has no small default, the reply runs until it ends, within the
        # runner's context (llama.cpp's n_ctx): a default past it would refuse every such request
        if rest.get("max_tokens") is None:
            positions = getattr(self.server.runner, "max_positions", None)
            room = positions - len(ids) if isinstance(positions, int) else limit
            rest["max_tokens"] = min(limit, room) if room > 0 else limit  # no room: the scheduler's 400
            self._max_field = None  # the server's default: the prompt is what to shorten
        return {**rest, "prompt": ids}

    def _read_json(self):
        n = self._length  # checked by parse_request (serve_http.body_length): bytes, CHUNKED or None
        if n is None:
            raise RequestError("the request needs a JSON body with a Content-Length header (or a chunked one)",
                               411, "length_required")
        if n != CHUNKED and n > MAX_BODY_BYTES:
            raise RequestError(f"request body of {n} bytes is over the {MAX_BODY_BYTES}-byte limit", 413,
                               "request_too_large")
        if self._continue and n:  # the client waits for this before sending its body
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._continue = False
        try:
            raw = read_chunked(self.rfile, MAX_BODY_BYTES) if n == CHUNKED else self.rfile.read(n)
        except TimeoutError:
            raise RequestError(f"the request body did not arrive within {self.server.request_timeout:g} s "
                               "(the server's --request-timeout)", 408, "request_timeout", headers=CLOSE) from None
        finally:
            self._request_in()
        if n != CHUNKED and len(raw) < n:  # the client closed its sending side early: nothing more can come
            self.close_connection = True
            raise RequestError(f"the request body ended after {len(raw)} of its {n} bytes (Content-Length)")
        self._body_unread = False
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
            raise RequestError(f"invalid JSON body: {e}") from None

    # -- completions
    def _base(self, rid: str, created: int, obj: str = "text_completion"):
        return {"id": rid, "object": obj, "created": created, "model": self.server.model_name}

    def _generate(self, prompts, kw, on_token=None, started=None):
        """The request through the scheduler -> Generation. started(): called once the request is
        queued (the scheduler's checks passed), before its tokens are followed: a stream sends its
        200 there, so a request the scheduler refuses is still a 400."""
        from .batching import SchedulerClosed

        closing = self.server.closing
        job = None

        def made() -> int:  # tokens generated so far, for the log line of a client that left
            return 0 if job is None else sum(len(out) for out in job.rows.out)

        def check():  # between tokens, and every 50 ms while waiting: the server closing, or the client gone
            if closing.is_set():
                raise ShuttingDown
            if peer_closed(self.connection):
                if closing.is_set():  # server_close's shutdown(SHUT_RD) reads as end-of-file too
                    raise ShuttingDown
                raise ClientGone(made())

        def each_token(i, t):
            if on_token is not None:
                try:
                    on_token(i, t)
                except (BrokenPipeError, ConnectionResetError):  # it closed between check() and this write
                    raise ClientGone(made()) from None

        try:
            check()
            job = self.server.scheduler.submit(prompts, stream=on_token is not None, **kw)
            if started is not None:
                try:
                    started()
                except BaseException:  # nobody will follow it
                    job.cancel()
                    raise
            return job.follow(each_token, check)
        except SchedulerClosed:
            raise ShuttingDown from None
        except ContextLengthError as e:
            raise RequestError(self.server.public(e), param=self._max_field, code="context_length_exceeded") from e
        except (MambaDeployError, ValueError) as e:
            raise RequestError(self.server.public(e)) from e

    def _complete(self, prompts, as_text, kw, chat=False):
        from .generation import completion_texts

        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        res = self._generate(prompts, kw)
        tok = self.server.runner.tokenizer if as_text else self.server.tokenizer_or_none()
        # prompts (text too, tokenized by _post) without stop strings are decoded here, after their last tokens
        texts = [""] * len(res.tokens) if tok is None and res.texts is None else completion_texts(tok, res)
        if chat:
            choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0]}, "token_ids": res.tokens[0],
                        "logprobs": None, "finish_reason": res.stop_reasons[0]}]
            self._send(200, {**self._base(rid, created, "chat.completion"), "choices": choices, "usage": _usage(res)})
            return
        choices = [{"index": i, "text": texts[i], "token_ids": res.tokens[i], "logprobs": None,
                    "finish_reason": res.stop_reasons[i]} for i in range(len(prompts))]
        self._send(200, {**self._base(rid, created), "choices": choices, "usage": _usage(res)})

    def _stream(self, prompts, as_text, kw, include_usage, chat=False):
        from .generation import TextStream

        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        base = self._base(rid, created, "chat.completion.chunk" if chat else "text_completion")
        tok = self.server.runner.tokenizer if as_text else self.server.tokenizer_or_none()
        detoks = [TextStream(tok, kw["stop_strings"], prompt=p) for p in prompts]  # text that follows its prompt
        sent = False

        def event(payload):
            self.wfile.write(b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
                             + b"\n\n")
            self.wfile.flush()

        # OpenAI: with include_usage, every chunk but the last has "usage": null
        cbase = {**base, "usage": None} if include_usage else base

        def chunk(i, text, token_ids, finish=None):
            if chat:  # OpenAI's deltas: the role first, then content pieces, then the finish reason
                delta = {"content": text} if text or finish is None else {}
                return {**cbase, "choices": [{"index": i, "delta": delta, "token_ids": token_ids, "logprobs": None,
                                              "finish_reason": finish}]}
            return {**cbase, "choices": [{"index": i, "text": text, "token_ids": token_ids, "logprobs": None,
                                          "finish_reason": finish}]}

        def on_token(i, t):  # a write error (client gone) raises here and ends the generation
            event(chunk(i, detoks[i].push(t), [t]))

        def start():  # the request is queued: from here on, errors go in-band
            nonlocal sent
            self.send_response(200)
            for k, v in {**SSE_HEADERS, "Connection": "close"}.items():
                self.send_header(k, v)
            self.end_headers()  # no Content-Length: the stream ends when the connection closes
            self.close_connection = True
            sent = True
            if chat:
                event({**cbase, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})

        try:
            res = self._generate(prompts, kw, on_token, start)
        except (BrokenPipeError, ConnectionResetError, TimeoutError, ClientGone):
            raise  # the client is gone: nothing to tell it (_guarded logs one line)
        except Exception as e:  # noqa: BLE001
            if not sent:  # refused before the 200: a plain error reply (_guarded)
                raise
            event(e.payload() if isinstance(e, RequestError) else internal_error(e))  # headers are out: in-band
            return
        for i, d in enumerate(detoks):
            event(chunk(i, d.finish(), [], res.stop_reasons[i]))
        if include_usage:
            event({**base, "choices": [], "usage": _usage(res)})
        event(b"[DONE]")


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _usage(res) -> dict:
    p = sum(len(x) for x in res.prompt_tokens)
    c = sum(len(x) for x in res.tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def make_server(runner, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
                model_name: str | None = None, max_tokens_limit: int = 4096, quiet: bool = False,
                request_timeout: float | None = 60.0, chat_template: str | None = None,
                max_prompt_tokens: int | None = None, prefill_chunk: int | None = 1024,
                max_num_seqs: int = 16, max_connections: int = 256,
                allowed_hosts=None) -> CompletionServer:
    """A bound (not yet serving) server; call `serve_forever()`, then `shutdown()` (from another
    thread) and `server_close()` (which waits for running requests; see CompletionServer).
    port 0 picks a free port: read it from `server.server_address[1]` or `server.url`.
    chat_template: a Jinja chat template for /v1/chat/completions instead of the model's own.
    max_prompt_tokens: the longest prompt a request may send, in tokens (None: no limit); longer
    ones (any prompt of a batch, or the rendered chat) get a 400 before generating.
    prefill_chunk: prompts are fed this many positions at a time (None: in one piece); between
    pieces the running requests decode a token, and a request whose client left stops.
    max_num_seqs: the most rows (prompts of all running requests) decoded together; a request
    waits until its rows fit (one with more rows than that runs alone); 1: one request at a time.
    request_timeout: seconds a request may take to arrive, from the wait for its first line to the
    end of its body (a 408 or a closed connection past it), and the longest a reply's write or a
    keep-alive connection's idle wait lasts (None: no limit).
    max_connections: open connections (one thread each); one more gets a 503 and is closed.
    allowed_hosts: the names a request's Host header (and a browser's Origin) may carry; default:
    the loopback names for a loopback `host`, else any ("*"); see serve_http.py."""
    from .chat import check_template
    from .runners.base import require_runner

    require_runner(runner, "make_server")
    if runner.closed:  # else every request would fail with the closed runner's error
        raise RunnerClosedError(f"make_server got a closed {runner.name} runner; open the model again with open_runner")
    check_host(host)
    if model_name is not None and not (isinstance(model_name, str) and model_name.strip()):
        # clients name the model in requests and read it from /v1/models, a string in OpenAI's schema
        raise ConfigError(f"model_name must be a non-empty str (or None: the artifact's name), got "
                          f"{type(model_name).__name__} {model_name!r:.60}")
    if chat_template is not None:
        check_template(chat_template)
    limits = [("port", port, 0), ("max_batch", max_batch, 1), ("max_tokens_limit", max_tokens_limit, 1),
              ("max_num_seqs", max_num_seqs, 1), ("max_connections", max_connections, 1)]
    limits += [(name, v, 1) for name, v in (("max_prompt_tokens", max_prompt_tokens), ("prefill_chunk", prefill_chunk))
               if v is not None]
    for name, v, low in limits:
        # max_tokens_limit 0 would turn every request away with a 400
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low or (name == "port" and v > 65535):
            also = {"port": " and <= 65535", "max_prompt_tokens": " (or None: no limit)",
                    "prefill_chunk": " (or None: one piece)"}.get(name, "")
            raise ConfigError(f"{name} must be >= {low}{also}, got {v!r} (an integer)")
    t = request_timeout
    if t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Real) or not t > 0):
        raise ConfigError(f"request_timeout must be a number of seconds > 0 (or None: no limit), got {t!r}")
    if isinstance(allowed_hosts, str) or (allowed_hosts is not None and not hasattr(allowed_hosts, "__iter__")):
        raise ConfigError(f"allowed_hosts must be a list of host names (or None: the default), got {allowed_hosts!r:.80}")
    hosts = None if allowed_hosts is None else check_allowed_hosts(list(allowed_hosts))
    if model_name is None:
        model_name = default_model_name(runner)
    try:
        server = CompletionServer((host, port), runner, model_name, max_batch, max_tokens_limit, quiet,
                                  request_timeout, chat_template, max_prompt_tokens, prefill_chunk, max_num_seqs,
                                  max_connections, hosts or ())
    except OSError as e:  # socket.gaierror (a bad host) is an OSError too
        raise bind_error(host, port, e) from None
    if hosts is None:  # from the address bound: "127.1" and "LOCALHOST" are loopback too
        server.allowed_hosts = default_allowed_hosts(server.server_address[0], host)
    return server


def default_model_name(runner, model=None) -> str:
    """The name reported as `model`: the file's stem for a single-file artifact (model.gguf ->
    'model'), else the folder's name (or a hub id's last part); `model` is the path or id the
    user gave, else the runner's own path."""
    path = model if model is not None else getattr(runner, "artifact_path", None)  # duck-typed runners may lack it
    if path is None:
        return runner.name
    p = Path(str(path))
    if p.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return p.stem
    if p.is_file():  # model.onnx and the like: the folder is the model
        p = p.parent
    return p.name or p.resolve().name or runner.name
