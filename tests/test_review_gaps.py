"""Gaps found by a mutation review (each test fails on the one-line bug named in its comment and
passes on this code): CPU kernel dispatch, the no-compiler linear fallback, SmoothQuant / calibration
statistics / AWQ clipping against float64 math, the quantized state snapshot, perplexity over a padded
vocabulary, and serve's request limits."""
from __future__ import annotations

import pytest
import torch
from conftest import random_lm, rel_err

from mamba_deploy.config import MambaConfig


def test_cpu_ops_dispatch_to_c_kernels():  # C8
    from mamba_deploy import ops
    from mamba_deploy.ops import cpu_kernels
    if not cpu_kernels.available():
        pytest.skip("no compiler")
    x = torch.zeros(2, 3)
    for name in ("selective_scan", "linear", "int8_linear", "int4_linear", "ssd_step", "rmsnorm"):
        assert ops.pick(name, x) is cpu_kernels.KERNELS[name], name
    with ops.use_backend("ref"):
        assert ops.pick("linear", x) is ops.REFERENCE["linear"]


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_linear_cpu_without_compiler_matches_float64(monkeypatch, rows):  # C7
    from mamba_deploy.ops import cpu_kernels
    monkeypatch.setattr(cpu_kernels, "_lib", lambda: None)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(rows)
        x, W, b = torch.randn(rows, 37, generator=g), torch.randn(48, 37, generator=g), torch.randn(48, generator=g)
        got = cpu_kernels.linear_cpu(x, W, b)
    finally:
        torch.set_num_threads(prev)
    want = x.double() @ W.double().T + b.double()
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_smoothquant_scales_float64(alpha):  # Q2
    from mamba_deploy.quant import algos
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 40, generator=g) * torch.rand(40, generator=g) * 3
    amax = torch.rand(40, generator=g) * 20 + 0.1
    Ws, inv_s = algos.smoothquant(W, amax, alpha)
    s = amax.double() ** alpha / W.double().abs().amax(0) ** (1 - alpha)  # the paper's formula
    assert rel_err(1 / inv_s.double(), s) < 1e-5
    assert rel_err(Ws, W.double() * s) < 1e-5
    if alpha == 1.0:  # all difficulty moved to the weight: every channel's activation max becomes 1
        assert rel_err(amax.double() * inv_s.double(), torch.ones(40)) < 1e-5


def test_calib_stats_float64():  # Q3, Q4
    from mamba_deploy.quant.calib import Stats
    g = torch.Generator().manual_seed(2)
    chunks = [torch.randn(2, n, 12, generator=g) - torch.linspace(-3, 3, 12) for n in (5, 7)]  # signed, skewed
    st = Stats(12, need_hessian=True)
    for c in chunks:
        st.add(c)
    X = torch.cat([c.reshape(-1, 12) for c in chunks]).double()
    assert st.n == 24
    assert rel_err(st.mean_abs, X.abs().mean(0)) < 1e-6
    assert rel_err(st.absmax, X.abs().amax(0)) < 1e-6
    assert rel_err(st.hessian, 2 * X.T @ X / 24) < 1e-10


def test_awq_clip_never_worse_per_row_with_one_group():  # Q5
    from mamba_deploy.quant import algos, formats
    g = torch.Generator().manual_seed(0)
    k = 32  # one group per row: the clip objective is the row's whole output error
    W = torch.randn(16, k, generator=g)
    X = torch.randn(512, k, generator=g) * (torch.rand(k, generator=g) ** 3 * 10 + 0.05)  # salient channels
    mean_abs = X.abs().mean(0)
    Wc, inv_c = algos.awq(W, X, mean_abs, k, True, clip=True)
    Wn, inv_n = algos.awq(W, X, mean_abs, k, True, clip=False)
    assert torch.equal(inv_c, inv_n)  # same scale search
    X64, ref = X.double(), X.double() @ W.double().T

    def row_err(Ws, inv):
        Wq = formats.fake_quant(Ws, 4, True, k).double() * inv.double()
        return ((X64 @ Wq.T - ref) ** 2).sum(0)

    ec, en = row_err(Wc, inv_c), row_err(Wn, inv_n)
    assert bool((ec <= en * (1 + 1e-6)).all()), (ec - en)
    assert bool((ec < en).any())  # some row really clipped


def test_quantized_state_runner_snapshot_matches_float_state():  # Q6, Q7
    from mamba_deploy.quant.state_cache import QuantizedStateRunner, decode_ssm, encode_ssm
    from mamba_deploy.runners.torch_runner import TorchRunner
    model = random_lm(MambaConfig(arch="mamba2", d_model=32, n_layer=2, vocab_size=64, headdim=16, chunk_size=16))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    base = TorchRunner(model)
    _, want = base.prefill(ids, base.new_state(2))
    want = base.to_torch_state(want)
    r = QuantizedStateRunner(model, "int8")
    _, st = r.prefill(ids, r.new_state(2))
    got = r.to_torch_state(st)
    step = want.ssm.double().abs().amax(-1, keepdim=True) / 127  # one code step per state row
    assert bool(((got.ssm.double() - want.ssm.double()).abs() <= step * 0.5 * (1 + 2e-3) + 1e-12).all())
    h = torch.randn(3, 4, 16) * 100
    q, s = encode_ssm(h, "fp16")
    assert q.dtype == torch.float16 and s is None and torch.equal(decode_ssm(q, s), h.half().float())


def test_perplexity_ignores_padded_vocab_rows():  # E2
    from mamba_deploy.eval import perplexity
    from mamba_deploy.runners.torch_runner import TorchRunner
    cfg = MambaConfig(arch="mamba1", d_model=32, n_layer=1, vocab_size=100, pad_vocab_size_multiple=16)
    model = random_lm(cfg)
    assert model.lm_head.out_features == 112
    with torch.no_grad():  # padding rows: large logits that would soak up probability
        model.backbone.embeddings.weight[100:] = 5 * model.backbone.embeddings.weight[:12]
    ids = torch.randint(0, 100, (23,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :, :100].double()
    want = -torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None]).mean()
    got = perplexity(TorchRunner(model), ids, window=5)
    assert abs(got["nll"] - float(want)) < 1e-6 * abs(float(want))


def test_serve_limits_are_inclusive():  # S1, S5
    from mamba_deploy.serve_request import MAX_STOP_STRINGS, parse_completion_request
    prompts, _, kw, _, _ = parse_completion_request(
        {"prompt": [[1]] * 4, "stop": ["a", "b", "c", "d"][:MAX_STOP_STRINGS], "max_tokens": 16}, 4, 128, 16)
    assert len(prompts) == 4 and kw["stop_strings"] == ["a", "b", "c", "d"] and kw["max_new_tokens"] == 16
