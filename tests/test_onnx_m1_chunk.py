"""The chunked Mamba1 prefill of benchmarks/onnx_m1_chunk.py (a Scan over chunks of Q tokens,
measured slower on the CPU and not in the export): checked against transformers, so the record of
that measurement stays a correct graph. Lengths around the chunk (Q - 1, Q, Q + 1, 2Q + 3, padded
to a multiple of Q with dt = 0), from a zero and from a non-zero state, a left-padded batch, and
decays that underflow within a step over 1500 tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import build_hf_model, rel_err
from mamba_deploy.export.onnx import ALLOWED_OPS, export_onnx, graph_op_types
from mamba_deploy.runners.onnx_runner import open_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from onnx_m1_chunk import chunked_graph  # noqa: E402

FP32_TOL = 1e-4
# Q = 5: not a power of two (the last Hillis-Steele round reaches past the chunk start)
VARIANTS = [("logdepth", 8), ("logdepth", 5), ("quadratic", 4)]


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids, use_cache=False).logits.float()


@pytest.fixture(scope="module")
def chunked(hf_checkpoint, tmp_path_factory):
    """chunked(form, q) -> (ONNX folder, transformers model) for the tiny Mamba1; cached."""
    cache = {}

    def make(form, q):
        if (form, q) not in cache:
            folder, hf = hf_checkpoint("mamba")
            out = tmp_path_factory.mktemp(f"m1_{form}_{q}") / "out"
            with chunked_graph(q, form):
                export_onnx(folder, out)
            cache[form, q] = (out, hf)
        return cache[form, q]

    return make


@pytest.mark.parametrize("form,q", VARIANTS)
def test_lengths_around_the_chunk_match_transformers(chunked, form, q):
    """Batch 2: a prefill of each length from a zero state, then the same length again from the
    state it left, then one decode step; all against transformers on the whole sequence."""
    out, hf = chunked(form, q)
    runner = open_onnx(out, threads=2)
    gen = torch.Generator().manual_seed(q)
    for length in (q - 1, q, q + 1, 2 * q + 3):
        ids = torch.randint(0, 128, (2, 2 * length + 1), generator=gen)
        want = hf_logits(hf, ids)
        st = runner.new_state(2)
        first, st = runner.prefill(ids[:, :length], st)
        second, st = runner.prefill(ids[:, length:2 * length], st)
        step, _ = runner.step(ids[:, -1], st)
        got = torch.cat([first, second, step[:, None]], 1)
        assert rel_err(got, want) < FP32_TOL, (form, q, length)


@pytest.mark.parametrize("form,q", VARIANTS[:1] + VARIANTS[2:])
def test_left_padded_batch_matches_unpadded(chunked, form, q):
    """attention_mask: rows with 0, 3 and 11 padded positions (across chunk boundaries) end with the
    logits of their own unpadded prompts."""
    out, hf = chunked(form, q)
    runner = open_onnx(out)
    prompts = [[5, 9, 17, 33, 2, 8, 1, 4, 70, 3, 11, 6, 40, 2], [7, 3, 99, 1, 4, 4, 60, 2, 9, 12, 30], [1, 8, 3]]
    L = max(map(len, prompts))
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    got, _ = runner.prefill(ids, runner.new_state(3), attention_mask=mask, last_only=True)
    for i, p in enumerate(prompts):
        assert rel_err(got[i, -1], hf_logits(hf, torch.tensor([p]))[0, -1]) < FP32_TOL, (form, q, i)


@pytest.mark.parametrize("form,q", VARIANTS[:1] + VARIANTS[2:])
def test_long_sequence_large_dt_negative_A_is_stable(tmp_path, form, q):
    """dt ~ softplus(6..9), A ~ -(20..200): decays underflow to 0 within a step. exp(cumsum) divided
    out later would give inf/NaN over 1500 tokens; the chunked forms must stay finite and match."""
    hf = build_hf_model("mamba", seed=3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(np.log(20), np.log(200)))
            if name.endswith("dt_proj.bias"):
                p.copy_(torch.empty_like(p).uniform_(6, 9))
    hf.save_pretrained(tmp_path / "hf")
    with chunked_graph(q, form):
        out = export_onnx(tmp_path / "hf", tmp_path / "onnx")
    ids = torch.randint(0, 128, (2, 1500), generator=torch.Generator().manual_seed(4))
    runner = open_onnx(out)
    got, _ = runner.prefill(ids, runner.new_state(2))
    assert torch.isfinite(got).all()
    assert rel_err(got, hf_logits(hf, ids)) < FP32_TOL


@pytest.mark.parametrize("form,q", VARIANTS[:1] + VARIANTS[2:])
def test_standard_ops_and_one_scan_per_layer(chunked, form, q):
    out, _ = chunked(form, q)
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert graph_op_types(model) <= ALLOWED_OPS
    (branch_if,) = [n for n in model.graph.node if n.op_type == "If"]
    seq = next(a.g for a in branch_if.attribute if a.name == "else_branch")
    scans = [n for n in seq.node if n.op_type == "Scan"]
    assert len(scans) == 2  # tiny model: 2 layers
    (body,) = [a.g for a in scans[0].attribute if a.name == "body"]
    assert not {"Scan", "Loop"} & {n.op_type for n in body.node}
    assert "Div" not in {n.op_type for n in body.node}  # nothing is divided out
