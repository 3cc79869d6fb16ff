"""Gaps found by a mutation review of the ONNX graph builders (export/onnx_graph.py, onnx_step.py,
onnx_builder.py): each test fails on the one-line bug it was written for. References are transformers'
models on the same checkpoint (the independent reference)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DT_LIMIT_KIND, build_hf_model, rel_err

from mamba_deploy.export.onnx import export_onnx
from mamba_deploy.runners.onnx_runner import open_onnx

FP32_TOL = 1e-4


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids, use_cache=False).logits.float()


def prefill_then_steps(runner, ids, length):
    """ONNX logits for ids: a prefill of `length` tokens (multi-token branch), then one-token steps."""
    got, st = runner.prefill(ids[:, :length], runner.new_state(ids.shape[0]))
    for t in range(length, ids.shape[1]):
        logits, st = runner.step(ids[:, t], st)
        got = torch.cat([got, logits[:, None]], 1)
    return got


# ---- a one-sided dt clamp (time_step_limit with only a lower or only an upper bound) ----------
# Mutant: `if lo > 0.0 or hi != inf` -> `and` in either graph dropped the Clip whenever only one
# bound is set; the parity kind DT_LIMIT_KIND sets both, so nothing caught it.
@pytest.mark.parametrize("limit", [(0.0, 0.5), (0.05, math.inf)])
def test_one_sided_dt_limit_matches_transformers(tmp_path, limit):
    hf = build_hf_model(DT_LIMIT_KIND, time_step_limit=limit)
    unclamped = build_hf_model(DT_LIMIT_KIND, time_step_limit=(0.0, math.inf))
    hf.save_pretrained(tmp_path / "hf")
    # validate=False: judged here against transformers, not against our own PyTorch model
    out = export_onnx(tmp_path / "hf", tmp_path / "onnx", validate=False)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(7))
    want = hf_logits(hf, ids)
    assert rel_err(hf_logits(unclamped, ids), want) > 10 * FP32_TOL  # the clamp matters on this model
    assert rel_err(prefill_then_steps(open_onnx(out), ids, 33), want) < FP32_TOL


# ---- prefills shorter than the conv window ----------------------------------------------------
# Mutant: present_conv sliced from the new tokens x instead of [past_conv, x] gave a (b, c, l)
# state for l < d_conv - 1; every tested prefill was 1 token (the step branch) or >= 3 tokens.
@pytest.mark.parametrize("kind", ["mamba", "mamba2_g2"])
def test_prefills_shorter_than_conv_window_continue_the_state(onnx_export, kind):
    out, _, hf = onnx_export(kind)
    runner = open_onnx(out)
    k = runner.config.d_conv
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(8))
    want = hf_logits(hf, ids)
    st, pos = runner.new_state(2), 0
    for n in (2, k - 1, 2, 5):  # first from a zero state, then from non-zero ones
        got, st = runner.prefill(ids[:, pos:pos + n], st)
        assert rel_err(got, want[:, pos:pos + n]) < FP32_TOL, (n, pos)
        pos += n
    logits, _ = runner.step(ids[:, pos], st)
    assert rel_err(logits, want[:, pos]) < FP32_TOL
