"""Fortieth session: fixes from that session's reviews, each test failing on the code before it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO1, DEMO2 = ROOT / "models" / "demo-mamba1", ROOT / "models" / "demo-mamba2"


def test_the_server_refuses_a_request_past_any_runners_max_positions(request):
    """The server's position check read llama.cpp's `n_ctx` by name, so a backend with another
    position cap was not checked. It now reads the Runner's `max_positions` (llama.cpp's n_ctx
    is one): a request past it is a 400 naming the cap; one inside it is generated as alone."""
    from conftest import post_json, start_server
    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner

    r = open_runner(DEMO2, "torch")
    request.addfinalizer(r.close)
    alone = generate(r, [[5, 6, 7]], max_new_tokens=8).tokens[0]
    r.max_positions, r.max_positions_name = 16, "this backend's cap"
    server = start_server(r, request, max_num_seqs=4)
    status, _, body = post_json(server, {"prompt": list(range(3, 13)), "max_tokens": 7, "temperature": 0})
    assert status == 400, body
    assert "would pass this backend's cap=16" in json.loads(body)["error"]["message"]
    status, _, body = post_json(server, {"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0})
    assert status == 200 and json.loads(body)["choices"][0]["token_ids"] == alone
