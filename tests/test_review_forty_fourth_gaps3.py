"""Third mutation-testing round (review 44): tests for behaviour a single-line mutation of the
source could change without any earlier test failing. Each test states the reference it checks
against (an RFC's wording, OpenAI's documented request schema, plain str / float64 arithmetic),
never the code under test against itself. CPU only, no network, no model."""

from __future__ import annotations

import http.client
import io

import pytest

from mamba_deploy.serve_http import body_length, check_allowed_hosts, check_host_and_origin, read_chunked
from mamba_deploy.serve_request import RequestError


def _headers(*lines: bytes):
    """Headers exactly as http.server parses them off the wire (http.client.parse_headers)."""
    return http.client.parse_headers(io.BytesIO(b"".join(line + b"\r\n" for line in lines) + b"\r\n"))


def test_content_length_non_ascii_digit_is_a_400_not_a_crash():
    """RFC 9110 8.6: Content-Length = 1*DIGIT, and DIGIT is ASCII 0-9 (RFC 5234 B.1). Header
    bytes arrive as Latin-1, where "\\xb2" (superscript two) is str.isdigit() but int() refuses
    it: without the ASCII check the request reached int() and died with a ValueError (a 500 and
    a traceback) instead of the 400 that closes the connection."""
    with pytest.raises(RequestError) as e:
        body_length(_headers(b"Content-Length: \xb2"))
    assert e.value.status == 400 and e.value.headers.get("Connection") == "close"
    assert body_length(_headers(b"Content-Length: 0012")) == 12  # 1*DIGIT: leading zeros are digits


def test_chunked_body_limit_counts_all_chunks():
    """read_chunked's contract: a body over `limit` bytes is a 413. Two 6-byte chunks are a
    12-byte body: over a 10-byte limit though each chunk alone is under it."""
    raw = b"6\r\nabcdef\r\n6\r\nghijkl\r\n0\r\n\r\n"
    assert read_chunked(io.BytesIO(raw), 12) == b"abcdefghijkl"
    with pytest.raises(RequestError) as e:
        read_chunked(io.BytesIO(raw), 10)
    assert e.value.status == 413


def test_chunk_data_must_end_with_crlf():
    """RFC 9112 7.1: chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF. A chunk whose data
    runs past its size ("abcX" for size 3) is a framing error, not a body "abc" with the rest
    dropped (a proxy counting the same bytes another way splits the requests differently)."""
    with pytest.raises(RequestError):
        read_chunked(io.BytesIO(b"3\r\nabcX\r\n0\r\n\r\n"), 100)
    assert read_chunked(io.BytesIO(b"3\r\nabc\r\n0\r\n\r\n"), 100) == b"abc"


def test_chunked_trailer_obs_fold_is_refused():
    """RFC 9112 5.2 / the read_chunked docstring: a field line starting with SP or HTAB is an
    obsolete line folding, which this server refuses rather than reinterprets (a line " b: c"
    after "X: a" is either a continuation of X or a field named " b", depending on the reader)."""
    with pytest.raises(RequestError):
        read_chunked(io.BytesIO(b"0\r\nX: a\r\n b: c\r\n\r\n"), 100)
    assert read_chunked(io.BytesIO(b"0\r\nX: a\r\nY: c\r\n\r\n"), 100) == b""


def test_trailer_with_bare_cr_is_refused():
    """RFC 9112 2.2: a bare CR in a field line is invalid; read_chunked's docstring refuses each
    such leniency rather than reading the line one way while a proxy reads it another."""
    with pytest.raises(RequestError):
        read_chunked(io.BytesIO(b"0\r\nX: a\rb\r\n\r\n"), 100)


# ----------------------------------------------------------------------------- Host / Origin

def test_allowed_hosts_with_trailing_dot_is_the_same_name():
    """DNS (RFC 1034 3.1): "models.example.com." is the fully qualified form of
    "models.example.com" (a Host header's trailing dot is already dropped), so --allowed-hosts
    "models.example.com." must allow requests whose Host is "models.example.com:8000"; kept with
    its dot, the listed name matched no request and every one was a 403."""
    assert check_allowed_hosts(["Models.Example.com."]) == ("models.example.com",)
    allowed = check_allowed_hosts(["models.example.com."])
    check_host_and_origin(_headers(b"Host: models.example.com:8000"), allowed, "HTTP/1.1")
    check_host_and_origin(_headers(b"Host: models.example.com.:8000"), allowed, "HTTP/1.1")


# ----------------------------------------------------------------------------- request schema

def _parse(body, limit: int = 64):
    from mamba_deploy.serve_request import parse_completion_request

    return parse_completion_request(body, max_batch=4, vocab_size=100, max_tokens_limit=limit)


def test_stream_options_only_with_stream_and_only_an_object():
    """OpenAI's `stream_options`: an object or null, "only set this when you set stream: true".
    false / [] are not "not given": they are a 400, as is an object without streaming."""
    assert _parse({"prompt": "hi", "stream": True, "stream_options": {"include_usage": True}})[4] is True
    for bad in ({"stream_options": {"include_usage": True}}, {"stream": True, "stream_options": False},
                {"stream": True, "stream_options": []}):
        with pytest.raises(RequestError) as e:
            _parse({"prompt": "hi", **bad})
        assert e.value.param == "stream_options"


# ----------------------------------------------------------------------------- stop strings

def test_first_stop_is_the_earliest_position_not_the_first_listed():
    """`first_stop` names where the first stop string starts in the text: the smallest
    str.find over all stop strings, whichever order they were listed in."""
    from mamba_deploy.generation import first_stop

    text = "xx BA yy AB"
    assert first_stop(text, ["AB", "BA"]) == min(text.find("AB"), text.find("BA")) == 3


# ----------------------------------------------------------------------------- CLI ranges

def test_top_p_range_excludes_zero():
    """--top-p is nucleus mass in (0, 1] (argtypes.top_p's docstring, the CLI's own error text
    "must be in (0, 1]"): 0 keeps no token at all and is refused, 1 is allowed; --min-p's range
    [0, 1] takes 0."""
    import argparse

    from mamba_deploy import argtypes

    with pytest.raises(argparse.ArgumentTypeError, match=r"\(0, 1\]"):
        argtypes.top_p("0")
    assert argtypes.top_p("1") == 1.0
    assert argtypes.min_p("0") == 0.0


# ----------------------------------------------------------------------------- atomic moves, states

def test_finish_killed_moves_takes_only_a_folder_inside_the_output(tmp_path):
    """finish_killed_moves' contract ("only that writer's own temporary folder (not a link, not
    elsewhere)"): a journal is a file anyone may have left, and the folder it names is moved
    from and then removed with rmtree. A journal naming a folder outside the output folder,
    even one whose name looks like the killed writer's temporary, must leave that folder and
    its files where they are, and put nothing into the output."""
    import os
    import subprocess
    import sys
    import warnings

    from mamba_deploy.atomic import _host, finish_killed_moves

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a writer that is gone
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    foreign = elsewhere / f".model.tmp-p{child.pid}h{_host()}-abc"
    foreign.mkdir(parents=True)
    (foreign / "weights.bin").write_bytes(b"not yours")
    (out / f".model.tmp-p{child.pid}h{_host()}-moving").write_bytes(os.fsencode(str(foreign)))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        finish_killed_moves(out, "model")
    assert (foreign / "weights.bin").read_bytes() == b"not yours"
    assert not (out / "weights.bin").exists()


def test_state_stack_refuses_unequal_layer_counts():
    """State.stack's contract: per-layer conv / ssm tensors -> one State (n_layer, b, ...), so
    conv and ssm need the same number of layers; 2 conv layers with 3 ssm layers describe no
    model and must be a ShapeError, not a State whose conv and ssm disagree on n_layer."""
    import torch

    from mamba_deploy.errors import ShapeError
    from mamba_deploy.state import State

    conv, ssm = torch.zeros(1, 4, 3), torch.zeros(1, 4, 2)
    assert tuple(State.stack([conv] * 2, [ssm] * 2).ssm.shape) == (2, 1, 4, 2)
    with pytest.raises(ShapeError):
        State.stack([conv] * 2, [ssm] * 3)
