"""Coverage round (review 45, part C): user-facing behaviour that the whole suite's coverage run
left unexercised in train (--resume with a foreign optimizer state, a non-finite gradient
norm), eval --baseline, the batching scheduler (a sampling or decode error hitting one request
of a running batch), serve's --max-connections log line and bind_error's fallback text. Each
test names the lines it pins and checks against an independent reference (transformers'
greedy decode in float64, a unigram count done here from the token ids, os.strerror), never the
code under test against itself. CPU only, no network."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_hf_model, serving, tiny_mamba_with_bpe, wait_until
from test_batching import _hf_greedy  # transformers' greedy generate, no EOS, a mask of ones
from test_review_thirty_ninth import _train_args as _thirty_ninth_args
from mamba_deploy import train
from mamba_deploy.errors import CheckpointError, ConfigError, TrainingDivergedError

DEMO2 = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"


@pytest.fixture(scope="module")
def bpe_model(hf_checkpoint, tmp_path_factory):
    """The tiny Mamba1 with the tiny BPE beside it (a copy for this module)."""
    return tiny_mamba_with_bpe(hf_checkpoint, tmp_path_factory, "cov_c")


# ----------------------------------------------------------------------------- train.py

def _train_args(tmp_path, **kw):
    """test_review_thirty_ninth's tiny-mamba2 run, 2 steps unless told."""
    return _thirty_ninth_args(tmp_path, **{"steps": 2, **kw})


def _sgd_like(opt_state: dict) -> dict:
    """The saved AdamW state rewritten as torch's SGD (momentum) would have saved it for the same
    parameters: same groups and sizes, another optimizer's per-parameter state."""
    groups = []
    for g in opt_state["param_groups"]:
        groups.append({"params": g["params"], "lr": g["lr"], "momentum": 0.9, "dampening": 0, "nesterov": False,
                       "weight_decay": g["weight_decay"], "maximize": False, "foreach": None,
                       "differentiable": False, "fused": None})
    return {"state": {k: {"momentum_buffer": v["exp_avg"].clone()} for k, v in opt_state["state"].items()},
            "param_groups": groups}


def test_resume_with_another_optimizers_state_is_a_typed_error(tmp_path, fake_data):
    """train.py 328-335: `train --resume` whose saved optimizer state is not this run's AdamW (another
    optimizer's state for the same parameters, or a state with another number of parameter
    groups) is a CheckpointError naming the state file and the way out (delete it / another
    --work-dir / drop --resume), raised before any step: neither the state file nor the model
    in --out changes. Not a bare KeyError / ValueError traceback, and no silent fresh optimizer."""
    train.train(_train_args(tmp_path))
    state_path = tmp_path / "work" / "train_state.pt"
    model_file = tmp_path / "out" / "model.safetensors"
    good = torch.load(state_path, weights_only=False)
    assert len(good["opt"]["param_groups"]) == 2  # decay / no-decay (make_optimizer)

    def resume_with(opt_state):
        st = dict(good, opt=opt_state)
        torch.save(st, state_path)
        before = (state_path.read_bytes(), model_file.read_bytes())
        with pytest.raises(CheckpointError) as e:
            train.train(_train_args(tmp_path, steps=4, resume=True))
        assert (state_path.read_bytes(), model_file.read_bytes()) == before  # nothing trained, nothing saved
        return str(e.value)

    msg = resume_with(_sgd_like(good["opt"]))  # same sizes, SGD's per-parameter state: a KeyError inside torch
    assert str(state_path) in msg and "holds an optimizer or data-order state this run cannot take" in msg
    assert "delete it" in msg and "--work-dir" in msg and "drop --resume" in msg
    one_group = dict(good["opt"], param_groups=good["opt"]["param_groups"][:1])  # torch: a ValueError
    msg = resume_with(one_group)
    assert "holds an optimizer or data-order state" in msg and "ValueError" in msg
    # the untouched state still resumes (the error above came from the optimizer state alone)
    torch.save(good, state_path)
    assert train.train(_train_args(tmp_path, steps=4, resume=True))["steps"] == 4


class _InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (a loss that stays finite while its
    gradients overflow)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("inf"))


def test_non_finite_gradient_norm_stops_before_the_update(tmp_path, fake_data, monkeypatch):
    """train.py 592-595: without --amp fp16, a step whose loss is finite but whose gradient norm is
    not (inf / NaN) raises TrainingDivergedError "the gradient norm is inf" (or nan) BEFORE opt.step:
    the weights and AdamW's moments stay as they were (checked directly on train_step), and the
    whole run stops at that step naming it, keeping the last save (step 2) with finite weights."""
    from mamba_deploy.model import MambaLM

    real = train.lm_logits

    def inf_grads(model, ids):
        out = real(model, ids)
        return _InfGrad.apply(out) if torch.is_grad_enabled() else out

    monkeypatch.setattr(train, "lm_logits", inf_grads)
    # 1) train_step itself: the error, and no update
    torch.manual_seed(0)
    model = MambaLM(train.build_config("tiny-mamba2", 64, 0, 1))
    opt = train.make_optimizer(model, 1e-3, 0.1)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    args = argparse.Namespace(lr=1e-3, warmup=1, clip=1.0, micro_batch=None)
    with pytest.raises(TrainingDivergedError, match=r"the gradient norm is (inf|nan)"):
        train.train_step(model, opt, batch, torch.device("cpu"), None, args, 0, 10)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights were updated with infinite gradients"
    assert not opt.state, "AdamW took a step (its moments exist) with infinite gradients"

    # 2) the run: good steps 1-2 (saved), poisoned from step 3 on
    calls = {"n": 0}

    def from_step_3(model, ids):
        calls["n"] += torch.is_grad_enabled()
        out = real(model, ids)
        return _InfGrad.apply(out) if calls["n"] > 2 and torch.is_grad_enabled() else out

    monkeypatch.setattr(train, "lm_logits", from_step_3)
    with pytest.raises(TrainingDivergedError) as e:
        train.train(_train_args(tmp_path, steps=4))
    msg = str(e.value)
    assert re.search(r"training diverged at step 3: the gradient norm is (inf|nan)\b", msg), msg
    assert "last save (step 2" in msg
    state = torch.load(tmp_path / "work" / "train_state.pt", weights_only=False)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------- eval.py

def test_eval_baseline_is_the_add_one_unigram_perplexity_of_the_scored_tokens(bpe_model, tmp_path, capsys,
                                                                               monkeypatch):
    """eval.py 123-128 (and the text line after): `eval --baseline` adds unigram_ppl, the add-one
    smoothed unigram perplexity whose counts come from the stdlib TRAIN split (encoded with the
    model's tokenizer) over the model's vocabulary, scored on the same tokens the model is
    scored on (all but the first). Reference: counts and float64 sums done here from the ids."""
    from tokenizers import Tokenizer

    from mamba_deploy import cli, data

    rng = np.random.default_rng(1)
    train_ids = rng.integers(0, 60, 3000).astype(np.int32)  # some ids never seen: the +1 matters
    asked = []

    def fake_split(tokenizer, split, root=None, progress=True):
        asked.append(split)
        return train_ids

    monkeypatch.setattr(data, "encode_split", fake_split)
    text = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine"
    f = tmp_path / "t.txt"
    f.write_text(text)
    assert cli.main(["eval", str(bpe_model), "--text", str(f), "--baseline", "--json"]) in (0, None)
    res = json.loads(capsys.readouterr().out)
    assert asked == ["train"]
    ids = Tokenizer.from_file(str(bpe_model / "tokenizer.json")).encode(text).ids
    vocab = json.loads((bpe_model / "config.json").read_text())["vocab_size"]
    counts = Counter(int(t) for t in train_ids)
    n = len(train_ids)
    scored = ids[1:]
    nll = -math.fsum(math.log((counts[t] + 1) / (n + vocab)) for t in scored) / len(scored)
    assert res["tokens"] == len(scored)
    assert res["unigram_ppl"] == pytest.approx(math.exp(nll), rel=1e-9)
    # the human-readable form prints the same number
    assert cli.main(["eval", str(bpe_model), "--text", str(f), "--baseline"]) in (0, None)
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("unigram baseline "))
    assert float(line.split()[2]) == pytest.approx(math.exp(nll), abs=0.051)
    # without --baseline: no unigram_ppl and no train split encoded
    asked.clear()
    assert cli.main(["eval", str(bpe_model), "--text", str(f), "--json"]) in (0, None)
    assert "unigram_ppl" not in json.loads(capsys.readouterr().out) and asked == []


# ----------------------------------------------------------------------------- batching.py

BAD, GOOD = [5, 6, 7, 8], [9, 8, 7, 6]


def _only_bad_fails(hf_checkpoint, scheduler_for, bad_new_tokens, error, match, good_n=8):
    """BAD and GOOD queued together before the loop starts (one prefill group, one running batch;
    the loop in a thread of its own): BAD fails with `error`, GOOD decoded beside it and then
    alone, and its tokens equal transformers' float64 greedy decode."""
    from mamba_deploy.runners import open_runner

    sched = scheduler_for(open_runner(hf_checkpoint("mamba")[0], "torch"), thread=False)
    bad = sched.submit([BAD], stop_token_ids=[], max_new_tokens=bad_new_tokens)
    good = sched.submit([GOOD], max_new_tokens=good_n, stop_token_ids=[])
    threading.Thread(target=sched.run, daemon=True).start()
    with pytest.raises(error, match=match):
        bad.follow(check=_in_time())
    got = good.follow(check=_in_time()).tokens[0]
    assert sched.batch_sizes[2] >= 2 and sched.batch_sizes[1] >= 1  # they did decode together, then GOOD alone
    assert got == _hf_greedy(build_hf_model("mamba").double(), GOOD, good_n)


def _in_time(seconds=30):
    deadline = time.monotonic() + seconds

    def check():  # a scheduler that lost the error would otherwise hang the test
        assert time.monotonic() < deadline, "the request neither finished nor failed in time"
    return check


def test_sampling_error_fails_only_its_request(hf_checkpoint, scheduler_for, monkeypatch):
    """batching.py 423-431: a sampling error (here raised at BAD's third token, while GOOD decodes
    beside it in the same batch) fails BAD alone with that error; GOOD goes on and its tokens
    equal transformers' float64 greedy decode."""
    from mamba_deploy import generation

    real = generation.Rows.sample
    seen = Counter()

    def sample(self, logits, scfg, gen, vocab):
        key = tuple(self.prompts[0])
        seen[key] += 1
        if key == tuple(BAD) and seen[key] == 3:
            raise RuntimeError("sampling failed (simulated)")
        return real(self, logits, scfg, gen, vocab)

    monkeypatch.setattr(generation.Rows, "sample", sample)
    _only_bad_fails(hf_checkpoint, scheduler_for, 20, RuntimeError, "sampling failed")


def test_decode_error_at_the_end_fails_only_its_request(hf_checkpoint, scheduler_for, monkeypatch):
    """batching.py 98-102: when a finished request's result cannot be made (its tokens do not decode:
    a tokenizer error), that request alone gets the error; GOOD, still decoding in the same batch,
    goes on and its tokens equal transformers' float64 greedy decode."""
    from mamba_deploy import generation

    real = generation.Rows.result

    def result(self, as_text):
        if list(self.prompts[0]) == BAD:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated decode failure")
        return real(self, as_text)

    monkeypatch.setattr(generation.Rows, "result", result)
    _only_bad_fails(hf_checkpoint, scheduler_for, 3, UnicodeDecodeError, "simulated decode failure")


# ----------------------------------------------------------------------------- serve.py / serve_http.py

def _raw_get(server) -> bytes:
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


@pytest.mark.parametrize("quiet", [False, True])
def test_connection_past_max_connections_is_logged_unless_quiet(hf_checkpoint, capsys, quiet):
    """serve.py 167-175: a connection past --max-connections gets its 503, and the server's log
    (stderr) gets one line "<client address> - refused: N connections open (--max-connections)";
    with --quiet, no line."""
    from mamba_deploy.runners import open_runner

    runner = open_runner(hf_checkpoint("mamba")[0], "torch")
    with serving(runner, quiet=quiet, max_connections=1) as server:
        held = socket.create_connection(server.server_address[:2], timeout=10)
        try:
            wait_until(lambda: len(server._handlers) == 1, "the first connection's handler")
            capsys.readouterr()
            got = _raw_get(server)
            assert got.startswith(b"HTTP/1.1 503"), got[:100]
            err = capsys.readouterr().err
        finally:
            held.close()
    runner.close()
    line = "127.0.0.1 - refused: 1 connections open (--max-connections)"
    if quiet:
        assert "refused" not in err
    else:
        assert err.count(line) == 1, err


@pytest.mark.parametrize("code", [errno.EAFNOSUPPORT, errno.EINVAL, None])
def test_bind_error_for_another_errno_gives_the_generic_fix(code):
    """serve_http.py 337-339: bind_error for an errno other than EADDRINUSE / EACCES / EPERM /
    EADDRNOTAVAIL (an IPv6 --host without IPv6, a socket that cannot bind, an OSError with no errno)
    is a ConfigError "cannot listen on HOST:PORT: <the system's reason>; check --host, or pick
    another --port (--port 0 picks a free one)", not another case's (wrong) advice."""
    from mamba_deploy.serve_http import bind_error

    e = OSError(code, os.strerror(code)) if code is not None else OSError("no route to bind (simulated)")
    err = bind_error("::1", 8000, e)
    assert isinstance(err, ConfigError)
    reason = os.strerror(code) if code is not None else "no route to bind (simulated)"
    assert str(err) == f"cannot listen on ::1:8000: {reason}; check --host, or pick another --port " \
                       "(--port 0 picks a free one)"
