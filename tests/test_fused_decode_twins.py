"""The graph-captured decode step (cuda_graph.fast_decode_step) is made of fused decode ops whose
reference twins run on CPU: these tests run that step here, through the twins, against
transformers' forward (so CI checks how the step composes its ops: the norm's 1/rms applied
after out_proj, the residual add fused with the next norm, dt_proj folded into the state update,
the conv in in_proj's epilogue), and each fused twin against float64 math composed from the
unfused references. The Triton kernels are compared with these twins in test_kernels_gpu.py."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import DT_LIMIT_KIND, KINDS, rel_err
from mamba_deploy import load_model, ops
from mamba_deploy.cuda_graph import DecodePlan, fast_decode_step
from mamba_deploy.ops import FUSED_MAX_BATCH
from mamba_deploy.ops import reference as R


def _decode(model, ids):
    """fast_decode_step over ids (b, l) from a zero state -> logits (b, l, vocab)."""
    plan = DecodePlan(model)
    state = model.new_state(ids.shape[0])
    with torch.no_grad():
        return torch.stack([fast_decode_step(plan, ids[:, t], state) for t in range(ids.shape[1])], 1), plan


@pytest.mark.parametrize("kind", KINDS + [DT_LIMIT_KIND])
@pytest.mark.parametrize("batch", [1, 3, FUSED_MAX_BATCH + 1])  # fused ops up to FUSED_MAX_BATCH rows
# float64 weights: the step still returns float32 logits (a float32 rounding is ~1e-7 relative)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-6)])
def test_fast_decode_step_matches_transformers(kind, batch, dtype, tol, hf_checkpoint):
    folder, hf = hf_checkpoint(kind)
    model = load_model(folder, dtype=dtype)
    torch.manual_seed(batch)
    ids = torch.randint(0, 128, (batch, 19))  # 19 > d_conv: the conv window wraps several times
    got, plan = _decode(model, ids)
    with torch.no_grad():
        want = hf.to(dtype)(ids).logits
    hf.float()
    v = want.shape[-1]
    assert rel_err(got[..., :v], want) <= tol
    if kind.startswith("mamba2") and kind != "mamba2_g2" and batch <= FUSED_MAX_BATCH:
        assert plan.fusion(batch).gated_mixer, "the one-op Mamba2 mixer (ssd_step_gated_) was not exercised"
    if kind in ("mamba", "falcon_mamba") and batch <= FUSED_MAX_BATCH:
        assert plan.fusion(batch) == (False, True, True), "dt_proj folding / the conv in in_proj was not exercised"
    assert int(plan.sumsq.abs().sum()) == 0, "add_rmsnorm_ must leave the norm statistics zeroed"


@pytest.mark.parametrize("switch", ["no_fusion", "conv_kernel"])
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_fast_decode_step_unfused_variants(kind, switch, monkeypatch, hf_checkpoint):
    """The decompositions ops.decode_fusion falls back to compute the same function:
    MAMBA_DEPLOY_FUSED_DECODE=0 (every layer unfused) and, for Mamba1, the conv update as its own
    op after in_proj (CONV_IN_GEMV off), against transformers' forward at batch 2."""
    if switch == "no_fusion":
        monkeypatch.setenv("MAMBA_DEPLOY_FUSED_DECODE", "0")
        expect = (False, False, False)
    else:
        monkeypatch.setattr(ops, "CONV_IN_GEMV", False)
        expect = (kind == "mamba2", kind == "mamba", False)
    folder, hf = hf_checkpoint(kind)
    model = load_model(folder)
    torch.manual_seed(7)
    ids = torch.randint(0, 128, (2, 9))
    got, plan = _decode(model, ids)
    assert plan.fusion(2) == expect
    with torch.no_grad():
        want = hf(ids).logits
    assert rel_err(got[..., :want.shape[-1]], want) <= 1e-4


def test_decode_fusion_bounds():
    """Fusion stops above FUSED_MAX_BATCH rows, and a quantized dt_proj / in_proj turns off what
    reads them as weights."""
    from mamba_deploy.config import MambaConfig

    m1 = MambaConfig(arch="mamba1", d_model=32, n_layer=1, vocab_size=64, d_state=8)
    m2 = MambaConfig(arch="mamba2", d_model=32, n_layer=1, vocab_size=64, d_state=8, headdim=8)
    assert ops.decode_fusion(m1, FUSED_MAX_BATCH) == (False, True, True)
    assert ops.decode_fusion(m1, FUSED_MAX_BATCH + 1) == (False, False, False)
    assert ops.decode_fusion(m1, 1, dt_plain=False) == (False, False, False)
    assert ops.decode_fusion(m1, 1, in_proj_plain=False) == (False, True, False)
    assert ops.decode_fusion(m2, 1).gated_mixer and not ops.decode_fusion(m2, FUSED_MAX_BATCH + 1).gated_mixer


@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("b,nh,p,n,k", [(1, 4, 8, 16, 4), (3, 2, 5, 7, 3), (2, 3, 4, 8, 2)])
def test_ssd_step_gated_ref_is_step_then_gated_norm(b, nh, p, n, k, before):
    """The un-normalised output times rsqrt(sumsq / d + eps) is the gated RMSNorm of ssd_step's
    output; conv_state and h are updated in place as ssd_step_ref returns them (float64)."""
    torch.manual_seed(b * 10 + k)
    d, dt64 = nh * p, torch.float64
    conv_dim = d + 2 * n
    xBC, z = torch.randn(b, conv_dim, dtype=dt64), torch.randn(b, d, dtype=dt64)
    dt, dtb, D, A = torch.randn(b, nh, dtype=dt64), torch.randn(nh, dtype=dt64), torch.randn(nh, dtype=dt64), \
        -torch.rand(nh, dtype=dt64) * 2
    cw, cb = torch.randn(conv_dim, k, dtype=dt64), torch.randn(conv_dim, dtype=dt64)
    cs, h = torch.randn(b, conv_dim, k - 1, dtype=dt64), torch.randn(b, nh, p, n, dtype=dt64)
    nw, eps = torch.randn(d, dtype=dt64), 1e-5
    y, cs_want, h_want = R.ssd_step_ref(xBC, dt, cw, cb, cs, A, D, dtb, h, (0.0, math.inf))
    want = R.rmsnorm_gated_ref(y.reshape(b, d), z, nw, eps, d, before)
    out, ss = torch.empty(b, d, dtype=dt64), torch.full((b,), 0.25, dtype=torch.float64)
    R.ssd_step_gated_ref(xBC, dt, z, cw, cb, cs, A, D, dtb, h, nw, (0.0, math.inf), before, out, ss, None)
    got = out * torch.rsqrt((ss - 0.25) / d + eps)[:, None]  # sumsq is added to, not overwritten
    assert rel_err(got, want) <= 1e-12
    assert torch.equal(cs, cs_want) and rel_err(h, h_want) <= 1e-14


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_add_rmsnorm_ref(dtype):
    """residual += y (scaled per row by 1/rms when sumsq is given, sumsq then zeroed), and the
    next block's RMSNorm of the new residual, against float64 math."""
    torch.manual_seed(0)
    b, d, eps = 3, 40, 1e-5
    y, res = torch.randn(b, d, dtype=dtype), torch.randn(b, d, dtype=torch.float32)
    w = torch.randn(d, dtype=dtype)
    ss = torch.rand(b, dtype=torch.float32) * d + 1
    scale = torch.rsqrt(ss.double() / d + 1e-6)[:, None]
    r_want = res.double() + y.double() * scale
    x_want = r_want * torch.rsqrt(r_want.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    out = torch.empty(b, d, dtype=dtype)
    x = R.add_rmsnorm_ref(y, res, w, eps, out=out, sumsq=ss, scale_n=d, scale_eps=1e-6)
    tol = 1e-6 if dtype == torch.float64 else 2e-2  # res is float32; bf16 y / output
    assert x is out and rel_err(res, r_want) <= tol and rel_err(x, x_want) <= tol
    assert torch.equal(ss, torch.zeros(b)), "sumsq must be zeroed for the next layer"


def test_linear_conv1d_update_ref_splits_conv_and_rest():
    torch.manual_seed(0)
    x, w, bias = torch.randn(2, 12, dtype=torch.float64), torch.randn(10, 12, dtype=torch.float64), None
    cw, cs = torch.randn(6, 4, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64)
    yc, rest, cs2 = R.linear_conv1d_update_ref(x, w, bias, cw, None, cs)
    lin = x @ w.T
    win = torch.cat([cs, lin[:, :6, None]], -1)  # (b, c, k): the window after this token
    assert rel_err(yc, torch.nn.functional.silu((win * cw).sum(-1))) <= 1e-14
    assert torch.equal(rest, lin[:, 6:]) and torch.equal(cs2, win[..., 1:])


def test_hints_reach_only_kernels_that_take_them():
    """The fused ops' scheduling hints are dropped for the twins (which do not take them)."""
    torch.manual_seed(0)
    x, cw, cs = torch.randn(2, 6), torch.randn(6, 4), torch.randn(2, 6, 3)
    want = R.causal_conv1d_update_ref(x, cw, None, cs.clone(), True)
    with ops.use_backend("ref"):
        got = ops.causal_conv1d_update(x, cw, None, cs.clone(), state_early=True, pdl=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_w8a8_int_mm_equals_twin():
    """torch._int_mm's exact int32 sums and the twin's float sums agree bit for bit (the twin's
    sums are exact below 2^24), on the row counts that take each."""
    from mamba_deploy.ops import torch_fused

    torch.manual_seed(0)
    q = torch.randint(-127, 128, (64, 96), dtype=torch.int8)
    s = torch.rand(64, 1) / 100
    for rows in (1, 17, 40):
        x = torch.randn(rows, 96)
        assert torch.equal(torch_fused.w8a8_linear(x, q, s), R.w8a8_linear_ref(x, q, s))
    x64 = x.double()
    want = (torch.round(x64 / (x64.abs().amax(-1, keepdim=True) / 127)) * (x64.abs().amax(-1, keepdim=True) / 127)) \
        @ (q.double() * s.double()).T
    assert rel_err(R.w8a8_linear_ref(x, q, s), want) <= 1e-6
