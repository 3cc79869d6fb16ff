"""Regression tests for what the forty-fourth session found; each fails on the code before its fix."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mamba_deploy.errors import ModelNotFoundError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo-mamba1"


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    kw = {"stdout": subprocess.PIPE, **kw}
    return subprocess.run([sys.executable, "-m", "mamba_deploy.cli", *args], stderr=subprocess.PIPE, text=True,
                          env=env, timeout=300, **kw)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to stand for a full disk")
def test_stdout_on_a_full_disk_is_a_one_line_error():
    """`inspect --json > FILE` on a full disk printed a traceback (OSError errno 28) and exited 1;
    files were already reported cleanly (OutputPathError, exit 2). Now stdout's failure is too."""
    with open("/dev/full", "w") as full:
        res = _cli("inspect", str(DEMO), "--json", stdout=full)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr
    assert "standard output" in res.stderr and "No space left" in res.stderr, res.stderr


def test_a_short_tokenizer_given_apart_from_the_model_is_warned_about(tmp_path):
    """A folder whose tokenizer leaves thousands of the model's embedding rows without a token is
    warned about when it is the model's own folder; the same tokenizer given by --tokenizer /
    set_tokenizer was taken in silence, and its sampled text came out as nonsense."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mamba_deploy.runners import open_runner

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["def main():\n    return 0\n" * 50],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    runner = open_runner(str(DEMO), "torch")
    assert runner.vocab_size - tok.get_vocab_size() > 1024
    with pytest.warns(UserWarning, match="embedding rows"):
        runner.set_tokenizer(str(folder))
    res = _cli("generate", str(DEMO), "--tokenizer", str(folder), "--prompt", "def", "--max-new-tokens", "2")
    assert res.returncode == 0, res.stderr
    assert "embedding rows" in res.stderr, res.stderr


def test_a_hub_that_resolves_but_does_not_answer_fails_at_once(monkeypatch, tmp_path):
    """With the hub's name resolving but its port dropped (a firewall, a dead HF_ENDPOINT or proxy),
    huggingface_hub retried every call for ~25 s before the error; only a failed DNS lookup was
    short-cut. One connect with a timeout now decides, and the cache still serves."""
    import huggingface_hub
    from huggingface_hub import constants

    from mamba_deploy import hub

    def resolves(host, *a, **k):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443))]

    tried = []

    def no_answer(address, timeout=None, *a, **k):
        tried.append((address, timeout))
        raise TimeoutError("timed out")

    def online(*a, **k):
        raise AssertionError("the hub was asked although it does not answer")

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, revision=None):
        if not local_files_only:
            online()
        if repo_id != "org/cached":
            raise FileNotFoundError("not in the cache")
        return str(tmp_path)

    monkeypatch.setattr(socket, "getaddrinfo", resolves)
    monkeypatch.setattr(socket, "create_connection", no_answer)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", online)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert hub._download("org/cached") == tmp_path
    t0 = time.monotonic()
    with pytest.raises(ModelNotFoundError, match=r"cannot be reached.*not in the local hub cache"):
        hub._download("org/missing")
    assert time.monotonic() - t0 < 1
    assert tried and all(t is not None and t <= 10 for _, t in tried)  # bounded, not the OS's minutes


@pytest.mark.parametrize("under_torchrun", [True, False])
def test_a_rank_stopped_while_reading_its_command_line_says_nothing(monkeypatch, capsys, under_torchrun):
    """torchrun stops the other ranks with SIGTERM when one fails. A rank still importing (its
    command line not yet read: a loaded machine) printed "terminated" into the shared stderr
    beside the real error, since whether it ran --tensor-parallel was read from the parsed args.
    Outside torchrun, a SIGTERM there is still reported."""
    from mamba_deploy.cli import Terminated, main

    def slow_build():  # the signal arrives while the parser is being built
        raise Terminated(signal.SIGTERM)

    monkeypatch.setattr(sys, "argv", ["mamba-deploy", "generate", "m", "--prompt", "x", "--tensor-parallel"])
    if under_torchrun:
        monkeypatch.setenv("LOCAL_RANK", "0")
    else:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main(sys.argv[1:], build=slow_build) == 128 + signal.SIGTERM
    said = capsys.readouterr().err
    assert ("terminated" in said) != under_torchrun, said


def test_a_closed_stdout_still_runs_the_command():
    """With stdout closed (`>&-`, a daemon), Python's print writes nothing and the command runs;
    the stdout wrapper for the full-disk error must keep that (an early version raised
    AttributeError on None)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", "-c", f'"{sys.executable}" -m mamba_deploy.cli inspect "{DEMO}" >&-'],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
