"""The HTTP guards of `mamba-deploy serve` (serve.py), below the OpenAI schema: how long a client
may take to send a request, how its body's length is framed, which Host / Origin it may name,
and how many connections are open at once. Standard library only, as serve.py.

Why each exists:
- a reading deadline: a socket timeout alone restarts with every byte, so a client sending one
  byte a minute held a handler thread (and its connection) for good;
- one framing: Content-Length and Transfer-Encoding together, two different Content-Lengths, or a
  length such as "+51" let a proxy and this server split a connection's bytes into requests
  differently (request smuggling); RFC 9112 6.3 says refuse and close. A chunked body alone is
  read (RFC 9112 7.1: clients streaming a body of unknown length send it), within the body limit;
- Host / Origin: a web page the user visits can POST to a server on 127.0.0.1 (an Origin the
  server does not serve), or resolve its own name to 127.0.0.1 and read the answers (DNS
  rebinding: the Host header still names the page's site);
- a connection cap: each connection is a thread; past the cap a client gets a 503 at once, and
  a process out of descriptors (EMFILE) waits instead of spinning on its listening socket.

Also the socket-level helpers serve.py's handlers use: whether a client has gone (peer_closed),
a bug's 500 body (internal_error), and what a bind failure means (bind_error)."""

from __future__ import annotations

import errno
import io
import ipaddress
import json
import re
import select
import socket
import sys
import time
import traceback
import uuid
from http.server import ThreadingHTTPServer

from .errors import ConfigError
from .serve_request import RequestError, error_payload

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"
ACCEPT_PAUSE_S = 0.1  # after an accept that failed for lack of descriptors or memory
ACCEPT_WARN_EVERY_S = 10.0  # one log line per this long while accepts keep failing
CHUNKED = "chunked"  # body_length's answer for a chunked body
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions, or a trailer field
MAX_TRAILERS = 32
MAX_CHUNKS = 65536  # 128 bytes a chunk on average at the 8 MiB body limit
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}[ \t]*(;[^\r\n]*)?")  # chunk-size [ chunk-ext ]
MAX_LENGTH_DIGITS = 18  # a Content-Length this long is past any body limit (and int() refuses 4300+ digits)
_ACCEPT_SHORTAGE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
CLOSE = {"Connection": "close"}  # sent with a refusal after which the connection's bytes cannot be trusted
BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
              b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s")


# ----------------------------------------------------------------------------- reading deadline

class DeadlineReader(io.RawIOBase):
    """A socket's reading side that refuses to wait past `deadline` (time.monotonic(), or None:
    each recv waits up to `idle` seconds, as a plain socket timeout). The handler sets the
    deadline when it starts waiting for a request and clears it once the body is in; every
    recv's timeout is the time left, so a trickle of bytes cannot stretch it."""

    def __init__(self, sock: socket.socket, idle: float | None):
        super().__init__()
        self.sock, self.idle = sock, idle
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request took longer than the server's --request-timeout to arrive")
            self.sock.settimeout(left if self.idle is None else min(left, self.idle))
        try:
            return self.sock.recv_into(b)
        finally:
            if self.deadline is not None:  # replies are written with the plain timeout
                self.sock.settimeout(self.idle)


# ----------------------------------------------------------------------------- framing

def body_length(headers, request_version: str = "HTTP/1.1") -> int | str | None:
    """The request body's length from its headers: None when it sends no Content-Length, CHUNKED
    for `Transfer-Encoding: chunked` (read_chunked); a RequestError (which closes the
    connection) for a framing this server does not take."""
    te = headers.get_all("Transfer-Encoding") or []
    if te:
        codings = ", ".join(te)
        if request_version < "HTTP/1.1":  # RFC 9112 6.1: an HTTP/1.0 message with it is faulty: close
            raise RequestError("Transfer-Encoding needs HTTP/1.1; send an HTTP/1.0 body with a Content-Length",
                               headers=CLOSE)
        if headers.get_all("Content-Length"):  # RFC 9112 6.3: which one frames the body? refuse, close
            raise RequestError("a request has Content-Length or Transfer-Encoding, not both", headers=CLOSE)
        if codings.strip(" \t").lower() == "chunked":  # RFC 9112 7.1: every HTTP/1.1 server reads it; only
            return CHUNKED  # space / tab around it (str.strip would also take \x0b, \xa0: a smuggling shape)
        raise RequestError(f"Transfer-Encoding {codings[:80]!r} is not supported; send the body with a "
                           "Content-Length or as chunked alone", 501, "not_implemented", headers=CLOSE)
    values = [v.strip() for v in headers.get_all("Content-Length") or []]
    if not values:
        return None
    for v in values:  # RFC 9110 8.6: 1*DIGIT; int() would also take "+51", " 5_1", full-width digits
        if not (v.isascii() and v.isdigit()):
            raise RequestError(f"bad Content-Length {v[:40]!r}: a body length is digits only", headers=CLOSE)
        if len(v.lstrip("0")) > MAX_LENGTH_DIGITS:
            raise RequestError(f"a request body of {len(v.lstrip('0'))} digits of bytes is over this server's body limit",
                               413, "request_too_large", headers=CLOSE)
    if len(set(int(v) for v in values)) > 1:
        raise RequestError(f"{len(values)} different Content-Length headers ({', '.join(values)[:80]}); "
                           "send one", headers=CLOSE)
    return int(values[0])


def read_chunked(rfile, limit: int) -> bytes:
    """A `Transfer-Encoding: chunked` body (RFC 9112 7.1): hex-sized chunks (extensions ignored),
    a 0-sized last one, trailer fields (ignored), an empty line; lines end in CRLF or a bare LF.
    RequestError, closing the connection, for a framing that deviates from that grammar (each
    leniency is a way for a proxy and this server to split requests differently), one that ends
    early, a body over `limit` bytes (413, before more than the limit is read) or in more than
    MAX_CHUNKS chunks (each costs a Python loop turn); the reader's TimeoutError passes through."""
    def line(what: str) -> bytes:
        got = rfile.readline(MAX_CHUNK_LINE + 1)
        if not got.endswith(b"\n"):
            why = "ended early" if len(got) <= MAX_CHUNK_LINE else f"has a {what} line over {MAX_CHUNK_LINE} bytes"
            raise RequestError(f"the chunked request body {why}", headers=CLOSE)
        got = got[:-2] if got.endswith(b"\r\n") else got[:-1]
        if b"\r" in got:
            raise RequestError(f"a bare CR in a {what} line of the chunked request body", headers=CLOSE)
        return got

    body = bytearray()  # one buffer: a bytes object per chunk cost ~80 bytes each (1-byte chunks: 80x the body)
    for _ in range(MAX_CHUNKS + 1):
        head = line("chunk-size")
        if not _CHUNK_SIZE.fullmatch(head):
            raise RequestError(f"bad chunk-size line {bytes(head[:40])!r} in a chunked request body (hex digits, "
                               "then optional ;extensions)", headers=CLOSE)
        size = int(head.split(b";", 1)[0].rstrip(b" \t"), 16)
        if size == 0:
            break
        if len(body) + size > limit:
            raise RequestError(f"chunked request body over the {limit}-byte limit", 413, "request_too_large",
                               headers=CLOSE)
        data = rfile.read(size)
        if len(data) < size or line("chunk end") != b"":
            raise RequestError("a chunk of the chunked request body is shorter than its size, or does not "
                               "end with CRLF", headers=CLOSE)
        body += data
    else:
        raise RequestError(f"a chunked request body in over {MAX_CHUNKS} chunks; send larger chunks or a "
                           "Content-Length", 413, "request_too_large", headers=CLOSE)
    for _ in range(MAX_TRAILERS + 1):
        field = line("trailer")
        if field == b"":
            return bytes(body)
        if field[:1] in (b" ", b"\t") or b":" not in field:  # obs-fold, or not name: value
            raise RequestError(f"bad trailer field {bytes(field[:40])!r} in a chunked request body", headers=CLOSE)
    raise RequestError(f"a chunked request body with over {MAX_TRAILERS} trailer fields", headers=CLOSE)


# ----------------------------------------------------------------------------- Host and Origin

def default_allowed_hosts(bound: str, given: str) -> tuple[str, ...]:
    """Names a request's Host may carry by default: a server bound to a loopback address (`bound`,
    the address the socket has: "127.1" and "LOCALHOST" are 127.0.0.1 too) is meant for this
    machine's programs, which name it by a loopback name or as `given` (--host); one bound
    elsewhere takes any (its names are the network's: --allowed-hosts lists them)."""
    if not is_loopback(bound):
        return (ANY_HOST,)
    extra = tuple(dict.fromkeys(h for h in (given.lower().strip("[]"), bound) if h not in LOOPBACK_NAMES))
    return LOOPBACK_NAMES + extra


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_allowed_hosts(hosts) -> tuple[str, ...]:
    """--allowed-hosts' names, lower-cased; `*` alone takes any."""
    bad = [h for h in hosts if not isinstance(h, str)]
    if bad:
        raise ConfigError(f"allowed_hosts must be host name strings (\"localhost\", \"10.0.0.5\") or \"*\" for any, "
                          f"got {type(bad[0]).__name__} {bad[0]!r:.40} in {list(hosts)!r:.120}")
    names = tuple(h.strip().lower().rstrip(".") for h in hosts)
    names = tuple(h[1:-1] if h.startswith("[") and h.endswith("]") else h for h in names)  # [::1] -> ::1
    if not names or any(not h or any(c in h for c in "/ @[]") or (":" in h and not _is_ip(h)) for h in names):
        raise ConfigError(f"allowed_hosts must be host names or addresses without scheme or port (\"localhost\", "
                          f"\"10.0.0.5\", \"::1\", \"models.example.com\") or \"*\" for any, got {list(hosts)!r:.120}")
    if ANY_HOST in names and len(names) > 1:
        raise ConfigError(f"allowed_hosts {list(hosts)!r:.120}: \"*\" takes any host; give it alone")
    return names


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


# RFC 3986 authority without userinfo: an IP literal in brackets or a name, then an optional port
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:/?#@\s]*)(?::([0-9]*))?")


def _hostname(authority: str) -> str | None:
    """"Name.:8000" / "[::1]:8000" -> "name" / "::1" (a trailing dot is the same DNS name); None
    for a value that is no host[:port] ("127.0.0.1:80x", "[::1]x", a port past 65535)."""
    m = _AUTHORITY.fullmatch(authority)
    if m is None or (m.group(2) and int(m.group(2)) > 65535):
        return None
    return m.group(1).strip("[]").lower().rstrip(".")


def check_host_and_origin(headers, allowed: tuple[str, ...], request_version: str) -> None:
    """A 403 for a Host this server does not answer to, or a browser's cross-origin request
    (an Origin whose host is neither the request's Host nor an allowed name)."""
    host_header = headers.get("Host")
    if len(headers.get_all("Host") or []) > 1:  # RFC 9112 3.2: which one is meant is anyone's guess
        raise RequestError("a request has one Host header; this one has several", headers=CLOSE)
    if host_header is None:
        if request_version >= "HTTP/1.1":  # RFC 9112 3.2: a 1.1 request without Host is a 400
            raise RequestError("an HTTP/1.1 request needs a Host header", headers=CLOSE)
        host = ""
    else:
        host = _hostname(host_header.strip())
        if host is None:  # RFC 9112 3.2: an invalid Host is a 400, whatever names are allowed
            raise RequestError(f"Host {host_header[:80]!r} is not a valid host[:port]", headers=CLOSE)
        if ANY_HOST not in allowed and host not in allowed:
            raise RequestError(f"Host {host_header[:80]!r} is not a name this server answers to ({', '.join(allowed)}); "
                               "start it with --allowed-hosts NAME (the name clients use) to take it", 403,
                               "forbidden", headers=CLOSE)
    origin = headers.get("Origin")
    if origin is None or ANY_HOST in allowed:  # not a browser's request; or any name is this server's
        return
    o = _hostname(origin.strip().split("://", 1)[-1]) or ""
    if o and (o == host or o in allowed):
        return
    raise RequestError(f"requests from a web page of another origin ({origin[:80]!r}) are refused, so that sites a "
                       "browser visits cannot use this server; send requests from a program (no Origin header), "
                       "or list that page's host in --allowed-hosts", 403, "forbidden", headers=CLOSE)


# ----------------------------------------------------------------------------- connections

class AcceptPause:
    """Wraps socket.accept: when the process is out of descriptors (or the kernel of buffers), it
    waits ACCEPT_PAUSE_S before the error goes on to socketserver, which drops it: the waiting
    connection stays readable, and without the pause the accept loop spun at full speed. One
    log line per ACCEPT_WARN_EVERY_S while it lasts."""

    def __init__(self, quiet: bool):
        self.quiet, self.warned_at = quiet, None

    def __call__(self, accept):
        try:
            return accept()
        except OSError as e:
            if e.errno not in _ACCEPT_SHORTAGE:
                raise
            now = time.monotonic()
            if not self.quiet and (self.warned_at is None or now - self.warned_at >= ACCEPT_WARN_EVERY_S):
                self.warned_at = now
                print(f"cannot accept connections ({e.strerror}); retrying every {ACCEPT_PAUSE_S:g} s "
                      "(lower --max-connections, or raise the open-file limit: ulimit -n)", file=sys.stderr)
            time.sleep(ACCEPT_PAUSE_S)
            raise


def refuse_busy(sock: socket.socket, limit: int) -> None:
    """The 503 a connection over --max-connections gets, written without a thread (a new
    socket's send buffer takes it at once). A client still sending a large body when the
    connection closes may see a reset instead (its unread bytes make the close a RST)."""
    body = json.dumps(error_payload(f"the server has {limit} open connections, its --max-connections; retry "
                                    "shortly", "server_error")).encode()
    try:
        sock.setblocking(False)
        sock.send(BUSY_REPLY % (len(body), body))
    except OSError:
        pass


# ----------------------------------------------------------------------------- client gone

_TCP_CLOSE_WAIT = 8  # Linux's tcp_states.h: the peer has sent its FIN


def peer_closed(sock) -> bool:
    """Whether the client closed its connection (or shut down its sending side), seen without
    taking a byte from `sock`: readable, and a peek reads end-of-file. Bytes still waiting (a
    pipelined request, a stray CRLF after the body) are left where they are; on Linux the TCP
    state then tells whether a FIN follows them."""
    try:
        if hasattr(select, "poll"):  # select.select refuses descriptors >= FD_SETSIZE
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            readable = bool(poller.poll(0))
        else:
            readable = bool(select.select([sock], [], [], 0)[0])
        if not readable:
            return False
        if sock.recv(1, socket.MSG_PEEK) == b"":
            return True
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # reset by the peer, or the socket is already closed
        return True
    if sys.platform.startswith("linux") and hasattr(socket, "TCP_INFO"):
        try:  # struct tcp_info starts with tcpi_state
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE_WAIT
        except OSError:
            return False
    return False


# ----------------------------------------------------------------------------- errors

def internal_error(e: BaseException) -> dict:
    """A bug's 500 body: the exception's type and an id to find its traceback (printed here) in
    the server's log; its text stays there, as it may hold the server's paths."""
    ref = uuid.uuid4().hex[:12]
    print(f"internal error {ref}:", file=sys.stderr)
    traceback.print_exception(e, file=sys.stderr)
    return error_payload(f"internal error ({type(e).__name__}); the server's log has its details under id {ref}",
                         "server_error")


def bind_error(host: str, port: int, e: OSError) -> ConfigError:
    where = f"{host}:{port}"
    if e.errno == errno.EADDRINUSE:
        fix = f"another process is listening on port {port}; pick another --port (--port 0 picks a free one)"
    elif e.errno in (errno.EACCES, errno.EPERM):
        fix = f"port {port} needs privileges here; pick a --port of 1024 or above (--port 0 picks a free one)"
    elif e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror):
        fix = f"{host!r} is not an address of this machine; use --host 127.0.0.1 (this machine only) or 0.0.0.0 (all)"
    else:
        fix = "check --host, or pick another --port (--port 0 picks a free one)"
    return ConfigError(f"cannot listen on {where}: {e.strerror or e}; {fix}")


def check_host(host) -> None:
    """What `--host` / make_server's host may be: a non-empty IPv4 address or name (the server
    listens on IPv4 alone)."""
    if not isinstance(host, str):
        raise ConfigError(f"host must be a name or address string (\"127.0.0.1\", \"0.0.0.0\"), got {host!r:.40}")
    if not host.strip():  # socket's "" is every interface: an unset variable opened the server to the network
        raise ConfigError(f"host {host!r} is empty, which would listen on every interface; use \"127.0.0.1\" (this "
                          "machine only) or, to serve the network, say so with \"0.0.0.0\"")
    if _is_ip(host.strip("[]")) and ipaddress.ip_address(host.strip("[]")).version == 6:
        raise ConfigError(f"host {host!r} is an IPv6 address, and the server listens on IPv4 only; use "
                          "\"127.0.0.1\" (this machine only) or \"0.0.0.0\" (all IPv4 interfaces)")


def check_can_listen(host: str, port: int) -> None:
    """Bind (host, port) the way the server will and let it go: a bad or foreign host or a busy
    port is reported before the model is loaded, which can take minutes."""
    check_host(host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if ThreadingHTTPServer.allow_reuse_address:  # as the server binds (socketserver.TCPServer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
