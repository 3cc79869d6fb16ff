"""Python-API misuse that an audit (2026-11-23) found crashing the process, failing deep inside
torch / llama.cpp, or silently computing something else. Each test fails on the code before
its fix (the llama.cpp ones crashed the interpreter there: a freed context used again, or a
GGML_ASSERT abort)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rel_err

from mamba_deploy import load_model
from mamba_deploy.errors import CheckpointError, ConfigError, ShapeError
from mamba_deploy.runners import open_runner

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import export_gguf

    return export_gguf(DEMO, tmp_path_factory.mktemp("api_audit") / "m.gguf", outtype="f32")


def _llama(gguf, **kw):
    pytest.importorskip("llama_cpp")
    return open_runner(gguf, "llama.cpp", **kw)


def test_llamacpp_batch_beyond_its_sequence_limit_is_refused_and_the_runner_goes_on(gguf):
    r = _llama(gguf)
    with pytest.raises(ShapeError, match="at most 256 sequences, a batch of 300"):
        r.new_state(300)
    ref = _llama(gguf)
    want, _ = ref.prefill(torch.tensor([[5, 6, 7]]), ref.new_state(1))
    got, _ = r.prefill(torch.tensor([[5, 6, 7]]), r.new_state(1))
    assert rel_err(got, want) == 0


def test_llamacpp_context_that_cannot_be_made_leaves_the_old_one(gguf, monkeypatch):
    """The old context was freed first and its handles kept: the next call used freed memory."""
    from mamba_deploy.runners.llamacpp_runner import LlamaCppRunner

    r = _llama(gguf)
    real = LlamaCppRunner._init_context

    def fail_large(self, n_seq):
        if n_seq > 4:
            raise CheckpointError("llama.cpp could not create a context (simulated)")
        real(self, n_seq)

    monkeypatch.setattr(LlamaCppRunner, "_init_context", fail_large)
    with pytest.raises(CheckpointError, match="simulated"):
        r.new_state(8)
    st = r.new_state(2)
    got, _ = r.prefill(torch.tensor([[5, 6, 7], [8, 9, 10]]), st)
    monkeypatch.undo()
    ref = _llama(gguf)
    want, _ = ref.prefill(torch.tensor([[5, 6, 7], [8, 9, 10]]), ref.new_state(2))
    assert rel_err(got, want) == 0


@pytest.mark.parametrize("kw,needle", [
    (dict(n_ctx=1), "n_ctx=1 is smaller than n_seq_max=4"),  # GGML_ASSERT abort
    (dict(n_batch=0), "n_batch must be an integer in 1..inf, got 0"),
    (dict(n_ctx="x"), "n_ctx must be an integer"),
    (dict(n_seq_max=300), "n_seq_max must be an integer in 1..256, got 300"),
])
def test_llamacpp_options_are_checked_before_loading(gguf, kw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        _llama(gguf, **kw)


def test_llamacpp_growing_past_n_ctx_is_refused(gguf):
    r = _llama(gguf, n_ctx=4)
    with pytest.raises(ShapeError, match="n_ctx=4 is smaller than the 8 sequences"):
        r.new_state(8)
    assert r.new_state(4).batch_size == 4


def test_llamacpp_fresh_state_reads_as_zeros(gguf):
    """llama.cpp writes 0 cells for a sequence without tokens: it was a NotImplementedError."""
    r = _llama(gguf)
    st = r.to_torch_state(r.new_state(2))
    ref = load_model(DEMO).new_state(2)
    assert st.conv.shape == ref.conv.shape and st.ssm.shape == ref.ssm.shape
    assert not st.conv.any() and not st.ssm.any()
