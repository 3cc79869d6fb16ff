"""Review (twenty-third session): user-level findings, each a test that failed before its fix."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from mamba_deploy.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO2 = REPO / "models" / "demo-mamba2"
EOS_FIRST = "if __name__ == '__main__':\n    main()\n"  # demo-mamba2 answers this with its EOS at once


def _generate_json(capsys, *extra):
    assert main(["generate", str(DEMO2), "--prompt", EOS_FIRST, "--max-new-tokens", "12", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)[0]


def test_a_stop_id_does_not_turn_the_eos_stop_off(capsys):
    """`--stop ID` replaced the tokenizer's EOS as the stop set: generation ran past the end of
    text (an invisible token) to --max-new-tokens. An unrelated stop id now changes nothing."""
    plain = _generate_json(capsys)
    assert plain["stop"] == "stop" and plain["tokens"] == []  # the reference: EOS ends it at once
    assert _generate_json(capsys, "--stop", "99") == plain


def test_server_stop_token_ids_keep_the_eos_stop_for_text_prompts():
    """The server's `stop_token_ids` extension replaced EOS the same way for text prompts; token-id
    prompts keep exactly the ids sent (generate()'s own rule)."""
    import http.client
    import threading

    from mamba_deploy.runners import open_runner
    from mamba_deploy.serve import make_server

    runner = open_runner(DEMO2, "torch")
    server = make_server(runner, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        def post(body):
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
            conn.request("POST", "/v1/completions", json.dumps({"max_tokens": 12, "temperature": 0, **body}),
                         {"Content-Type": "application/json"})
            out = json.loads(conn.getresponse().read())
            conn.close()
            return out["choices"][0]

        plain = post({"prompt": EOS_FIRST})
        assert plain["finish_reason"] == "stop" and plain["token_ids"] == []
        assert post({"prompt": EOS_FIRST, "stop_token_ids": [99]}) == plain
        ids = runner.tokenizer.encode(EOS_FIRST)
        free = post({"prompt": ids, "stop_token_ids": [99]})
        assert free["token_ids"][:1] == [runner.tokenizer.eos_token_id]  # ids alone: EOS does not stop it
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)


def test_a_huge_temperature_samples_without_a_numpy_warning():
    """--temperature 1e39 (finite, accepted) printed numpy's "overflow encountered in cast"."""
    from mamba_deploy.generation import SamplingConfig, filtered_probs

    logits = torch.randn(2, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = filtered_probs(logits, SamplingConfig(temperature=1e39))
        tiny = filtered_probs(logits, SamplingConfig(temperature=1e-46))  # below float32: float64 division
    assert torch.allclose(probs, torch.full_like(probs, 1 / 50))  # T -> inf: uniform, as float64 math says
    assert torch.equal(tiny.argmax(-1), logits.argmax(-1)) and torch.allclose(tiny.max(-1).values, torch.ones(2))
