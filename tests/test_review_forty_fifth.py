"""Forty-fifth session: `serve --host` checks made before the model loads, and `verify` sizes
checked before allocating (tests/test_cli.py holds the verify ones)."""

from __future__ import annotations

import pytest

from mamba_deploy.cli import main
from mamba_deploy.errors import ConfigError
from mamba_deploy.serve_http import check_can_listen


@pytest.fixture
def no_model_load(monkeypatch):
    """Make reaching the model load visible: it is what the early checks exist to spare."""
    import mamba_deploy.runners as runners

    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise AssertionError("open_runner reached: the host should have been refused before the load")

    monkeypatch.setattr(runners, "open_runner", refuse)
    return calls


@pytest.mark.parametrize("host,says", [
    ("", "is empty, which would listen on every interface"),
    ("   ", "is empty, which would listen on every interface"),
    ("::1", "is an IPv6 address, and the server listens on IPv4 only"),
    ("[::1]", "is an IPv6 address, and the server listens on IPv4 only"),
])
def test_a_bad_host_is_refused_before_the_model_loads(host, says, no_model_load, capsys):
    assert main(["serve", "no-such-model-folder", "--backend", "torch", "--host", host, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert says in err and "127.0.0.1" in err, err
    assert no_model_load == []


def test_check_can_listen_takes_the_hosts_the_server_takes():
    check_can_listen("127.0.0.1", 0)
    check_can_listen("localhost", 0)
    for host in ("", "::1", None):
        with pytest.raises(ConfigError, match="host"):
            check_can_listen(host, 0)
