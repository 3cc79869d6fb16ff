"""The fused decode ops of the graph-captured step (ops.add_rmsnorm_, ops.linear_conv1d_update;
ssd_step_gated_ and selective_state_update_dt are in test_kernels_gpu.py) and torch's own fused
kernels behind the quantized linears (torch_fused.py): each Triton / torch kernel against its
reference twin on the same inputs, per dtype, and the dispatch that picks them.

Runs on a CUDA machine with triton; skipped elsewhere. Tolerances as in test_kernels_gpu.py:
relative 1e-4 in float32, 1e-2 in bfloat16."""

from __future__ import annotations

import pytest
import torch

from mamba_deploy import ops
from mamba_deploy.ops import reference as R
from test_kernels_gpu import CUDA, DTYPES, close, rnd, up

pytestmark = pytest.mark.skipif(not CUDA, reason="Triton kernels need a CUDA GPU (CPU keeps the references)")
DEV = "cuda"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_fused_ops_dispatch_to_their_kernels():
    from mamba_deploy.ops import triton_kernels as T

    x = torch.zeros(1, 8, device=DEV)
    for name in ("add_rmsnorm_", "ssd_step_gated_", "selective_state_update_dt", "linear_conv1d_update",
                 "w8a8_linear", "int4_linear"):
        assert ops.pick(name, x) is T.KERNELS[name], name
        with ops.use_backend("ref"):
            assert ops.pick(name, x) is ops.REFERENCE[name], name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,d", [(1, 2560), (3, 1000), (4, 64)])
@pytest.mark.parametrize("scaled", [False, True])
def test_add_rmsnorm_matches_twin(b, d, scaled, dtype):
    """residual += y (y first scaled by the row's 1/rms when sumsq is given), then the next
    RMSNorm; the float32 residual and sumsq updated in place as the twin updates them."""
    y, w = rnd(b, d, device=DEV, dtype=dtype), rnd(d, device=DEV, dtype=dtype)
    res = torch.randn(b, d, device=DEV)
    ss = (torch.rand(b, device=DEV) * d + 1) if scaled else None
    kw = dict(sumsq=ss, scale_n=d, scale_eps=1e-5) if scaled else {}
    res_t, ss_t = res.clone(), None if ss is None else ss.clone()
    want = R.add_rmsnorm_ref(*up(y), res_t, w.float(), 1e-5, **{**kw, "sumsq": ss_t} if scaled else {})
    weight = torch.empty(4096, 1024, device=DEV, dtype=dtype)
    got = ops.add_rmsnorm_(y, res, w, 1e-5, prefetch=(weight, 2 << 20), **kw)  # the prefetch changes no value
    close(got, want, dtype, "add_rmsnorm_ output")
    close(res, res_t, dtype, "add_rmsnorm_ residual")
    if scaled:
        assert int(ss.abs().sum()) == 0, "sumsq must be zeroed"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,k,c,kc", [(1, 10240, 2560, 5120, 4), (1, 200, 96, 100, 3), (2, 200, 96, 100, 4),
                                         (1, 50, 40, 20, 5)])
@pytest.mark.parametrize("state_early", [False, True])
def test_linear_conv1d_update_matches_twin(b, n, k, c, kc, state_early, dtype):
    """Both forms of the Triton twin (the GEMV with the conv epilogue: one row, state_early,
    d_conv 2..4; else the linear and the conv-update kernel) against the reference."""
    x = rnd(b, k, device=DEV, dtype=dtype)
    w = rnd(n, k, device=DEV, dtype=dtype, scale=k ** -0.5)
    bias, cb = rnd(n, device=DEV, dtype=dtype), rnd(c, device=DEV, dtype=dtype)
    cw, cs = rnd(c, kc, device=DEV, dtype=dtype, scale=0.5), rnd(b, c, kc - 1, device=DEV, dtype=dtype)
    yc_r, rest_r, cs_r = R.linear_conv1d_update_ref(*up(x, w, bias, cw, cb, cs))
    yc, rest, cs1 = ops.linear_conv1d_update(x, w, bias, cw, cb, cs, state_early=state_early)
    assert cs1.data_ptr() == cs.data_ptr(), "the window is updated in place"
    close(yc, yc_r, dtype, "conv'd channels")
    close(rest, rest_r, dtype, "the other outputs")
    close(cs, cs_r, dtype, "conv window")


@pytest.mark.parametrize("rows", [1, 17, 64])
def test_w8a8_on_cuda_matches_twin(rows):
    """torch._int_mm (more than 16 rows) sums exactly; the twin's float sums are exact too."""
    q = torch.randint(-127, 128, (96, 256), dtype=torch.int8, device=DEV)
    s = torch.rand(96, 1, device=DEV) / 100
    x = torch.randn(rows, 256, device=DEV)
    assert torch.equal(ops.w8a8_linear(x, q, s), R.w8a8_linear_ref(x, q, s))


def test_tinygemm_repacks_after_an_in_place_update():
    """The tinygemm packing is kept per weight tensor; loading new codes into the same buffers
    (load_state_dict copies in place) must not reuse the old packing."""
    from mamba_deploy.quant.modules import QuantLinear

    lin = torch.nn.Linear(512, 96).to(DEV, torch.bfloat16)
    m = QuantLinear.from_linear(lin, "int4", "t", group_size=128)
    other = QuantLinear.from_linear(torch.nn.Linear(512, 96).to(DEV, torch.bfloat16), "int4", "t", group_size=128)
    x = rnd(3, 512, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        m(x)  # packs m's codes
        m.load_state_dict(other.state_dict())
        want = x.double() @ other.weight.double().T + other.bias.double()
        got = m(x)
    close(got, want, torch.bfloat16, "int4 after load_state_dict")
