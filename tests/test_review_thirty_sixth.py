"""From the thirty-sixth session's reviews; each test fails on the code before its fix.

Server (an OpenAI client's view): an integer temperature past int64 (10**20, inside float range)
and a tiny accepted repetition_penalty were 500s; misspelt fields (`max_token`) were silently
ignored, where OpenAI answers "Unrecognized request argument"; `stream_options` without a stream
was accepted; 405s had no Allow header (RFC 9110 15.5.6) and HEAD was a 501 (RFC 9110 9.1);
with include_usage the other chunks lacked OpenAI's `"usage": null`.
References: the OpenAI API reference's documented behaviour, RFC 9110, and float64 math.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_review_serve_chat import CHATML, DEMO2, TIMEOUT, _post, _request  # noqa: F401

from mamba_deploy.errors import ConfigError
from mamba_deploy.generation import SamplingConfig, apply_repetition_penalty, filtered_probs
from mamba_deploy.runners import open_runner
from mamba_deploy.serve import make_server


@pytest.fixture(scope="module")
def server():
    import threading

    srv = make_server(open_runner(DEMO2, "torch"), "127.0.0.1", 0, max_batch=4, quiet=True, chat_template=CHATML)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(TIMEOUT)


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty", "top_p", "min_p"])
def test_an_integer_past_int64_is_read_as_the_float_it_is(server, field):
    # 10**20 is a valid JSON number inside float range; torch cannot take it as a Python int
    value = 10**20 if field in ("temperature", "repetition_penalty") else 1
    status, data = _post(server, {"prompt": "def main(", "max_tokens": 3, field: value, "seed": 0})
    assert status == 200, data
    assert json.loads(data)["usage"]["completion_tokens"] >= 1


def test_sampling_config_takes_big_integers_as_floats_and_refuses_past_float_range():
    cfg = SamplingConfig(temperature=10**20, repetition_penalty=10**20)
    assert isinstance(cfg.temperature, float) and cfg.temperature == 1e20
    probs = filtered_probs(torch.randn(2, 50), cfg, torch.tensor([[1, 2], [3, 4]]))
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2))
    with pytest.raises(ConfigError, match="finite"):
        SamplingConfig(temperature=10**400)


@pytest.mark.parametrize("penalty", [1e-38, 1e-300])
def test_a_tiny_repetition_penalty_samples_instead_of_a_500(server, penalty):
    status, data = _post(server, {"prompt": "def main( def main(", "max_tokens": 4, "repetition_penalty": penalty,
                                  "seed": 1})
    assert status == 200, data


def test_a_tiny_repetition_penalty_makes_the_seen_token_certain():
    # float64 reference: 5 / 1e-38 (past float32's range) dwarfs every other logit, so the seen
    # token has probability 1; before, float32 made it inf and inf - inf gave NaN
    logits = torch.tensor([[-1.0, 5.0, -3.0, 0.5]])
    history = torch.tensor([[1]])
    out = apply_repetition_penalty(logits, history, 1e-38)
    assert torch.isfinite(out).all()
    probs = filtered_probs(logits, SamplingConfig(temperature=1.0, repetition_penalty=1e-38), history)
    ref = torch.softmax(torch.tensor([-1.0, 5.0 / 1e-38, -3.0, 0.5], dtype=torch.float64), -1)
    assert torch.allclose(probs.double(), ref, atol=1e-6)
    # a huge penalty on a negative logit is -inf: never drawn, the rest still a distribution
    probs = filtered_probs(torch.tensor([[-1.0, 2.0]]), SamplingConfig(1.0, repetition_penalty=1e300),
                           torch.tensor([[0]]))
    assert probs[0, 0] == 0 and math.isclose(probs[0, 1].item(), 1.0)


@pytest.mark.parametrize("path,body,name,near", [
    ("/v1/completions", {"prompt": "x", "max_token": 2}, "max_token", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temprature": 0}, "temprature", "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_token": 2},
     "max_completion_token", "max_completion_tokens"),
    ("/v1/completions", {"prompt": "x", "messages": []}, "messages", "/v1/chat/completions"),  # chat's field
])
def test_an_unknown_field_is_a_400_naming_it(server, path, body, name, near):
    status, data = _post(server, body, path)
    err = json.loads(data)["error"]
    assert status == 400 and err["param"] == name and name in err["message"], data
    if near:
        assert near in err["message"]


def test_known_bookkeeping_fields_are_still_accepted(server):
    body = {"prompt": "x", "max_tokens": 2, "user": "u1", "metadata": {"a": "b"}, "store": False, "seed": 0}
    assert _post(server, body)[0] == 200
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "parallel_tool_calls": True,
            "user": "u1"}
    assert _post(server, chat, "/v1/chat/completions")[0] == 200


def test_stream_options_without_stream_is_refused(server):
    status, data = _post(server, {"prompt": "x", "max_tokens": 2, "stream_options": {"include_usage": True}})
    assert status == 400 and json.loads(data)["error"]["param"] == "stream_options"


@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/v1/completions", "POST"), ("GET", "/v1/chat/completions", "POST"),
    ("POST", "/health", "GET, HEAD"), ("POST", "/v1/models", "GET, HEAD"),
])
def test_a_405_names_the_allowed_methods(server, method, path, allow):
    status, headers, _ = _request(server, method, path, {} if method == "POST" else None)
    assert status == 405 and headers.get("Allow") == allow


@pytest.mark.parametrize("path", ["/health", "/v1/models"])
def test_head_answers_the_get_headers_without_a_body(server, path):
    g_status, g_headers, g_body = _request(server, "GET", path)
    status, headers, body = _request(server, "HEAD", path)
    assert status == g_status == 200 and body == b""
    assert headers["Content-Type"] == g_headers["Content-Type"]
    if path == "/v1/models":  # /health's body holds live counters; the models list is fixed
        assert headers["Content-Length"] == g_headers["Content-Length"] == str(len(g_body))


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "def main(", "max_tokens": 4, "seed": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 0}),
])
def test_include_usage_puts_a_null_usage_on_every_other_chunk(server, path, body):
    status, _, data = _request(server, "POST", path, {**body, "stream": True,
                                                      "stream_options": {"include_usage": True}})
    events = [e[len("data: "):] for e in data.decode().split("\n\n") if e]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] >= 1
    # without include_usage there is no usage key at all (OpenAI's default)
    _, _, data = _request(server, "POST", path, {**body, "stream": True})
    assert not any("usage" in json.loads(e[len("data: "):]) for e in data.decode().split("\n\n")[:-2] if e)
