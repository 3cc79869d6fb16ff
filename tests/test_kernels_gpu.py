"""Each Triton kernel against its pure-PyTorch reference twin, per dtype, on random inputs.

Runs on a CUDA machine with triton; skipped elsewhere (CI is CPU-only). Tolerances: relative
error ||out - ref|| / ||ref|| and max |out - ref| / max |ref| each <= 1e-4 in float32, <= 1e-2 in
bfloat16. The reference runs on the
same inputs upcast to float32; outputs and final states are both checked, and the state arguments
are cloned before the fast call because the decode kernels update them in place.

The `check_*` helpers take a device so the same checks can run under TRITON_INTERPRET=1 on a CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from mamba_deploy import ops
from mamba_deploy.ops import reference as R

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="Triton kernels need a CUDA GPU (CPU keeps the references)")

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def K():
    from mamba_deploy.ops import triton_kernels

    return triton_kernels


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rel_max(a, b):
    """The largest element's error over the largest reference element: the L2 ratio of rel()
    dilutes a few wrong elements (one wrong row of 2049 counts ~1/45 of its error)."""
    a, b = a.double(), b.double()
    if b.numel() == 0:  # e.g. a GEMV whose every row is conv'd leaves no plain rows
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def close(out, ref, dtype, what=""):
    r, m = rel(out, ref), rel_max(out, ref)
    assert r <= TOL[dtype], f"{what}: relative error {r:.2e} > {TOL[dtype]:.0e}"
    assert m <= TOL[dtype], f"{what}: largest element's error {m:.2e} > {TOL[dtype]:.0e} (L2 ratio {r:.2e})"


def as_close_as_reference(out, ref, gold, what=""):
    """A whole bf16 model is two bf16 pipelines apart from the reference, each with its own
    roundings: require out to be about as close to float64 math (gold) as the bf16 reference
    path (ref) is: x1.5, plus 2e-3."""
    r_out, r_ref = rel(out, gold), rel(ref, gold)
    assert r_out <= 1.5 * r_ref + 2e-3, f"{what}: {r_out:.2e} from float64 vs the reference's {r_ref:.2e}"


def up(*args):
    """The reference runs in float32 on the same (bf16-valued) inputs: its own intermediate bf16
    roundings (e.g. the conv in x's dtype) are not the kernel's error."""
    return [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def rnd(*shape, device, dtype, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


# ----------------------------------------------------------------------------- checks

def check_conv(b, l, c, k, dtype, device, bias=True):
    x = rnd(b, l, c, device=device, dtype=dtype)
    w = rnd(c, k, device=device, dtype=dtype, scale=0.5)
    bb = rnd(c, device=device, dtype=dtype) if bias else None
    s = rnd(b, c, k - 1, device=device, dtype=dtype)
    y, s1 = K().causal_conv1d(x, w, bb, s, True)
    yr, sr = R.causal_conv1d_ref(*up(x, w, bb, s), True)
    close(y, yr, dtype, "conv y")
    assert torch.equal(s1.float(), sr), "conv state"


def check_conv_update(b, c, k, dtype, device, **launch):
    """launch: pdl / state_early (the graph-decode launch of triton_conv.causal_conv1d_update)."""
    from mamba_deploy.ops import triton_conv

    x = rnd(b, c, device=device, dtype=dtype)
    w = rnd(c, k, device=device, dtype=dtype, scale=0.5)
    bb = rnd(c, device=device, dtype=dtype)
    s = rnd(b, c, k - 1, device=device, dtype=dtype)
    yr, sr = R.causal_conv1d_update_ref(*up(x, w, bb, s), True)
    y, s1 = triton_conv.causal_conv1d_update(x, w, bb, s, True, **launch)
    close(y, yr, dtype, "conv update y")
    assert torch.equal(s1.float(), sr), "conv update state"


def check_rmsnorm(rows, d, dtype, device):
    x = rnd(rows, d, device=device, dtype=dtype, scale=3.0)
    w = rnd(d, device=device, dtype=dtype)
    close(K().rmsnorm(x, w, 1e-5), R.rmsnorm_ref(*up(x, w), 1e-5), dtype, "rmsnorm")


def check_rmsnorm_gated(rows, d, group, before, dtype, device):
    x = rnd(2, rows, d, device=device, dtype=dtype)
    z = rnd(2, rows, d, device=device, dtype=dtype)
    w = rnd(d, device=device, dtype=dtype)
    out = K().rmsnorm_gated(x, z, w, 1e-5, group, before)
    close(out, R.rmsnorm_gated_ref(*up(x, z, w), 1e-5, group, before), dtype, "rmsnorm_gated")


def mamba1_inputs(b, l, d, n, dtype, device):
    x = rnd(b, l, d, device=device, dtype=dtype)
    dt = rnd(b, l, d, device=device, dtype=dtype, scale=0.5) - 1.0
    A = -torch.exp(torch.rand(d, n, device=device) * 2)  # float32, like the model passes it
    B = rnd(b, l, n, device=device, dtype=dtype)
    C = rnd(b, l, n, device=device, dtype=dtype)
    D = rnd(d, device=device, dtype=dtype)
    z = rnd(b, l, d, device=device, dtype=dtype)
    dtb = rnd(d, device=device, dtype=dtype, scale=0.5)
    h0 = torch.randn(b, d, n, device=device)
    return x, dt, A, B, C, D, z, dtb, h0


def check_selective_scan(b, l, d, n, dtype, device, gate=True):
    x, dt, A, B, C, D, z, dtb, h0 = mamba1_inputs(b, l, d, n, dtype, device)
    z = z if gate else None
    y, h = K().selective_scan(x, dt, A, B, C, D, z, dtb, h0)
    yr, hr = R.selective_scan_ref(*up(x, dt, A, B, C, D, z, dtb, h0))
    close(y, yr, dtype, "scan y")
    close(h, hr, torch.float32 if dtype == torch.float32 else dtype, "scan h")


def state_tol(dtype, hdtype):
    """Tolerance row for an updated state: a 16-bit state is rounded once per step."""
    return dtype if hdtype == torch.float32 else hdtype


def check_selective_state_update(b, d, n, dtype, device, hdtype=torch.float32):
    x, dt, A, B, C, D, z, dtb, h0 = mamba1_inputs(b, 1, d, n, dtype, device)
    h0 = h0.to(hdtype)
    args = (x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, z[:, 0], dtb)
    yr, hr = R.selective_state_update_ref(*up(*args, h0))
    y, h = K().selective_state_update(*args, h0)
    close(y, yr, dtype, "sel update y")
    assert h.dtype == hdtype
    close(h, hr, state_tol(dtype, hdtype), "sel update h")


def check_selective_state_update_dt(b, d, n, r, dtype, device, state_early, hdtype=torch.float32):
    """The Mamba1 state update with dt_proj folded in, against dt_proj then the reference update."""
    from mamba_deploy.ops.triton_step import selective_state_update_dt

    x, _, A, B, C, D, z, dtb, h0 = mamba1_inputs(b, 1, d, n, dtype, device)
    h0 = h0.to(hdtype)
    dt_in = rnd(b, r, device=device, dtype=dtype)
    w = rnd(d, r, device=device, dtype=dtype, scale=r ** -0.5)
    args = (x[:, 0], dt_in, w, A, B[:, 0], C[:, 0], D, z[:, 0], dtb)
    yr, hr = R.selective_state_update_dt_ref(*up(*args, h0))
    y, h = selective_state_update_dt(*args, h0, state_early=state_early)
    assert h.data_ptr() == h0.data_ptr(), "state not updated in place"
    close(y, yr, dtype, "sel update (dt_proj fused) y")
    close(h, hr, state_tol(dtype, hdtype), "sel update (dt_proj fused) h")


def mamba2_inputs(b, l, nh, p, g, n, dtype, device):
    x = rnd(b, l, nh, p, device=device, dtype=dtype)
    dt = rnd(b, l, nh, device=device, dtype=dtype, scale=0.5) - 1.0
    A = -torch.exp(torch.rand(nh, device=device) * 2)
    B = rnd(b, l, g, n, device=device, dtype=dtype)
    C = rnd(b, l, g, n, device=device, dtype=dtype)
    D = rnd(nh, device=device, dtype=dtype)
    dtb = rnd(nh, device=device, dtype=dtype, scale=0.5)
    h0 = torch.randn(b, nh, p, n, device=device)
    return x, dt, A, B, C, D, dtb, h0


def check_ssd(b, l, nh, p, g, n, Q, dtype, device, dt_limit=(0.0, math.inf)):
    x, dt, A, B, C, D, dtb, h0 = mamba2_inputs(b, l, nh, p, g, n, dtype, device)
    y, h = K().ssd(x, dt, A, B, C, D, dtb, h0, Q, dt_limit)
    yr, hr = R.ssd_ref(*up(x, dt, A, B, C, D, dtb, h0), Q, dt_limit)
    close(y, yr, dtype, "ssd y")
    close(h, hr, dtype, "ssd h")


def step_inputs(b, nh, p, g, n, k, dtype, device, hdtype=torch.float32):
    """Inputs of ssd_step in its argument order: xBC, dt, conv weight, conv bias, conv state, A, D,
    dt_bias, h (hdtype)."""
    conv_dim = nh * p + 2 * g * n
    xBC = rnd(b, conv_dim, device=device, dtype=dtype)
    dt = rnd(b, nh, device=device, dtype=dtype, scale=0.5) - 1.0
    w = rnd(conv_dim, k, device=device, dtype=dtype, scale=0.5)
    cb = rnd(conv_dim, device=device, dtype=dtype)
    cs = rnd(b, conv_dim, k - 1, device=device, dtype=dtype)
    A = -torch.exp(torch.rand(nh, device=device) * 2)
    D = rnd(nh, device=device, dtype=dtype)
    dtb = rnd(nh, device=device, dtype=dtype, scale=0.5)
    h = torch.randn(b, nh, p, n, device=device).to(hdtype)
    return xBC, dt, w, cb, cs, A, D, dtb, h


def check_ssd_step(b, nh, p, g, n, k, dtype, device, dt_limit=(0.0, math.inf), hdtype=torch.float32):
    xBC, dt, w, cb, cs, A, D, dtb, h = step_inputs(b, nh, p, g, n, k, dtype, device, hdtype)
    yr, csr, hr = R.ssd_step_ref(*up(xBC, dt, w, cb, cs, A, D, dtb, h), dt_limit)
    y, cs1, h1 = K().ssd_step(xBC, dt, w, cb, cs, A, D, dtb, h, dt_limit)
    close(y, yr, dtype, "ssd_step y")
    assert torch.equal(cs1.float(), csr), "ssd_step conv state"
    close(h1, hr, state_tol(dtype, hdtype), "ssd_step h")
    # the un-fused state update too
    x = rnd(b, nh, p, device=device, dtype=dtype)
    Bv, Cv = rnd(b, g, n, device=device, dtype=dtype), rnd(b, g, n, device=device, dtype=dtype)
    yr, hr = R.ssd_state_update_ref(*up(x, dt, A, Bv, Cv, D, dtb, h), dt_limit)
    y, h2 = K().ssd_state_update(x, dt, A, Bv, Cv, D, dtb, h, dt_limit)
    close(y, yr, dtype, "ssd_state_update y")
    close(h2, hr, state_tol(dtype, hdtype), "ssd_state_update h")


def check_ssd_step_gated(b, nh, p, n, k, dtype, device, before=False, prefetch=(None, 0), hdtype=torch.float32):
    """The one-launch decode mixer (conv + state update + gate + norm statistics) against
    ssd_step_ref followed by rmsnorm_gated_ref (norm over the whole row, ngroups = 1), and against
    its twin ssd_step_gated_ref (the same un-normalised output and sum of squares)."""
    from mamba_deploy.ops.triton_step import ssd_step_gated_

    d = nh * p
    xBC, dt, w, cb, cs, A, D, dtb, h = step_inputs(b, nh, p, 1, n, k, dtype, device, hdtype)
    z = rnd(b, d, device=device, dtype=dtype)
    nw = rnd(d, device=device, dtype=dtype)
    yr, csr, hr = R.ssd_step_ref(*up(xBC, dt, w, cb, cs, A, D, dtb, h))
    outr = R.rmsnorm_gated_ref(yr.reshape(b, d), *up(z, nw), 1e-5, d, before)
    twin_in = up(xBC, dt, z, w, cb, cs.clone(), A, D, dtb, h.clone(), nw)
    twin_out, twin_ss = torch.empty(b, d, device=device), torch.zeros(b, device=device)
    R.ssd_step_gated_ref(*twin_in, (0.0, math.inf), before, twin_out, twin_ss, None)
    out = torch.empty(b, d, device=device, dtype=dtype)
    ss = torch.zeros(b, device=device)
    cnt = torch.zeros(b, device=device, dtype=torch.int32)
    ssd_step_gated_(xBC, dt, z, w, cb, cs, A, D, dtb, h, nw, (0.0, math.inf), before, out, ss, cnt,
                    prefetch=prefetch)
    close(out.float() * torch.rsqrt(ss / d + 1e-5)[:, None], outr, dtype, "fused step output")
    close(out, twin_out, dtype, "fused step un-normalised output vs its twin")
    close(ss, twin_ss, dtype, "fused step sum of squares vs its twin")
    close(h, twin_in[9], state_tol(dtype, hdtype), "fused step h vs its twin")
    assert torch.equal(cs.float(), csr), "fused step conv state"
    close(h, hr, state_tol(dtype, hdtype), "fused step h")
    assert int(cnt.abs().sum()) == 0, "counter not reset"


# ----------------------------------------------------------------------------- tests

DEV = "cuda"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,l,c,k", [(1, 1, 64, 4), (2, 7, 200, 4), (3, 33, 130, 3), (2, 1025, 384, 4)])
def test_causal_conv1d(b, l, c, k, dtype):
    check_conv(b, l, c, k, dtype, DEV)
    check_conv(b, l, c, k, dtype, DEV, bias=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,c,k", [(1, 64, 4), (3, 300, 4), (2, 5376, 4), (2, 300, 2), (1, 100, 5)])
@pytest.mark.parametrize("launch", [{}, dict(pdl=True, state_early=True), dict(pdl=True)])
def test_causal_conv1d_update(b, c, k, launch, dtype):
    check_conv_update(b, c, k, dtype, DEV, **launch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 64), (7, 2560), (33, 1000)])
def test_rmsnorm(rows, d, dtype):
    check_rmsnorm(rows, d, dtype, DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d,group", [(1, 128, 128), (7, 5120, 5120), (5, 256, 64)])
@pytest.mark.parametrize("before", [False, True])
def test_rmsnorm_gated(rows, d, group, before, dtype):
    check_rmsnorm_gated(rows, d, group, before, dtype, DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,l,d,n", [(1, 1, 64, 16), (2, 7, 96, 16), (2, 65, 130, 8), (1, 600, 256, 16)])
def test_selective_scan(b, l, d, n, dtype):
    check_selective_scan(b, l, d, n, dtype, DEV)


def test_selective_scan_no_gate():
    check_selective_scan(2, 70, 64, 16, torch.float32, DEV, gate=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,d,n", [(1, 64, 16), (5, 300, 16), (2, 5120, 16)])
def test_selective_state_update(b, d, n, dtype):
    check_selective_state_update(b, d, n, dtype, DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hdtype", [torch.bfloat16, torch.float16])
def test_decode_kernels_16bit_state(dtype, hdtype):
    """A 16-bit SSM state (MambaLM.set_state_dtype): every decode kernel updates it in place,
    computing in float32 from the stored values and rounding once on the store."""
    check_selective_state_update(3, 300, 16, dtype, DEV, hdtype)
    check_selective_state_update_dt(2, 5120, 16, 160, dtype, DEV, True, hdtype)
    check_ssd_step(2, 80, 64, 1, 128, 4, dtype, DEV, hdtype=hdtype)
    check_ssd_step(3, 8, 64, 2, 64, 4, dtype, DEV, hdtype=hdtype)
    check_ssd_step_gated(2, 80, 64, 128, 4, dtype, DEV, hdtype=hdtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,d,n,r", [(1, 5120, 16, 160), (3, 300, 9, 7), (2, 64, 16, 48)])
@pytest.mark.parametrize("state_early", [False, True])
def test_selective_state_update_dt(b, d, n, r, state_early, dtype):
    check_selective_state_update_dt(b, d, n, r, dtype, DEV, state_early)


SSD_SHAPES = [  # (b, l, nh, p, g, n, Q): odd lengths 1, 7, chunk+1, long; groups; batch > 1
    (1, 1, 4, 16, 1, 16, 16),
    (2, 7, 4, 16, 1, 16, 16),
    (2, 17, 8, 16, 2, 16, 16),
    (2, 257, 8, 64, 1, 128, 256),
    (1, 1000, 6, 64, 2, 64, 128),
    (3, 2049, 4, 64, 1, 128, 256),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SSD_SHAPES)
def test_ssd(shape, dtype):
    check_ssd(*shape, dtype, DEV)


def test_ssd_dt_limit():
    check_ssd(2, 100, 4, 32, 1, 32, 64, torch.float32, DEV, dt_limit=(0.01, 0.5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,nh,p,g,n", [(1, 4, 16, 1, 16), (3, 8, 64, 2, 64), (2, 80, 64, 1, 128)])
def test_ssd_step(b, nh, p, g, n, dtype):
    check_ssd_step(b, nh, p, g, n, 4, dtype, DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,nh,p,n,before", [(1, 4, 16, 16, False), (3, 8, 64, 64, True), (2, 80, 64, 128, False)])
def test_ssd_step_gated(b, nh, p, n, before, dtype):
    weight = torch.empty(4096, 1024, device=DEV, dtype=dtype)  # an out_proj-sized weight to prefetch
    for i in range(3):  # the B/C window shift is ordered by an atomic counter: repeat to catch races
        # the last round with the L2 prefetch of a weight on (must change no value)
        check_ssd_step_gated(b, nh, p, n, 4, dtype, DEV, before, prefetch=(weight, 3 << 20) if i == 2 else (None, 0))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("n,k", [(8, 16), (10576, 2560), (1003, 777), (2560, 5120), (517, 1030), (257, 9001)])
@pytest.mark.parametrize("pdl", [False, True])
def test_linear_gemv(n, k, pdl, dtype):
    """The one-row decode GEMV against F.linear in float64 (odd sizes: masked tails in n and k;
    k > ONE_SHOT_MAX_K takes the looping path)."""
    from mamba_deploy.ops import triton_gemv

    x = rnd(1, k, device="cuda", dtype=dtype)
    w = rnd(n, k, device="cuda", dtype=dtype, scale=k ** -0.5)
    bias = rnd(n, device="cuda", dtype=dtype)
    ref = torch.nn.functional.linear(x.double(), w.double())
    close(triton_gemv.gemv(x, w, bias, pdl=pdl), ref + bias.double(), dtype, f"gemv {n}x{k}")
    close(triton_gemv.gemv(x[0], w, pdl=pdl), ref[0], dtype, f"gemv {n}x{k} without bias, 1-D x")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,c,kc", [(10240, 2560, 5120, 4), (200, 96, 100, 3), (37, 50, 37, 2), (517, 9001, 300, 4)])
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_conv_epilogue(n, k, c, kc, pdl, bias, dtype):
    """The GEMV with the Mamba1 decode conv as epilogue (outputs [0, c) conv'd, the window shifted
    in place) against F.linear in float64, rounded to the dtype, then the reference conv update."""
    from mamba_deploy.ops import triton_gemv

    x = rnd(1, k, device="cuda", dtype=dtype)
    w = rnd(n, k, device="cuda", dtype=dtype, scale=k ** -0.5)
    b = rnd(n, device="cuda", dtype=dtype) if bias else None
    cw = rnd(c, kc, device="cuda", dtype=dtype, scale=0.5)
    cb = rnd(c, device="cuda", dtype=dtype) if bias else None
    cs = rnd(1, c, kc - 1, device="cuda", dtype=dtype)
    taps = cs[..., 1:].clone()
    lin = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()).to(dtype)
    yr, sr = R.causal_conv1d_update_ref(*up(lin[:, :c], cw, cb, cs), True)
    y = triton_gemv.gemv(x, w, b, pdl=pdl, conv=(cw, cb, cs))
    close(y[:, :c], yr, dtype, f"gemv conv channels {n}x{k}")
    close(y[:, c:], lin[:, c:], dtype, f"gemv plain rows {n}x{k}")
    assert torch.equal(cs[..., :-1], taps), "gemv conv window: the kept taps must shift exactly"
    close(cs[..., -1], lin[:, :c], dtype, "gemv conv window: the new tap is in_proj's output")
    close(cs, sr, dtype, "gemv conv window")


def test_linear_dispatch_rows():
    """One row goes to the GEMV; more rows (and a GEMV call with them) to cuBLAS / a clear error."""
    from mamba_deploy.ops import triton_gemv

    w = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one row"):
        triton_gemv.gemv(x, w)
    close(K().KERNELS["linear"](x, w), x.double() @ w.double().t(), torch.bfloat16, "3 rows")


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "mamba2_g2"])
def test_model_triton_vs_reference(kind):
    """Whole tiny model, prefill + 5 decode steps, Triton dispatch vs references (float32)."""
    from conftest import build_hf_model  # noqa: PLC0415

    from mamba_deploy import ops
    from mamba_deploy.checkpoint import load_model

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        build_hf_model(kind).save_pretrained(tmp)
        model = load_model(tmp, device=DEV, dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 37), device=DEV)
    nxt = torch.randint(0, 128, (5, 2), device=DEV)
    outs = {}
    for backend in ("ref", "triton"):
        with ops.use_backend(backend), torch.inference_mode():
            st = model.new_state(2)
            logits = [model(ids, st).logits[:, -1]]
            logits += [model.step(t, st) for t in nxt]
            outs[backend] = (torch.stack(logits), st.ssm.clone(), st.conv.clone())
    close(outs["triton"][0], outs["ref"][0], torch.float32, "logits")
    close(outs["triton"][1], outs["ref"][1], torch.float32, "ssm state")
    close(outs["triton"][2], outs["ref"][2], torch.float32, "conv state")


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_padded_prefill_on_cuda_vs_transformers(kind, tmp_path):
    """A left-padded batch prefilled on CUDA (Triton dispatch) gives each prompt's last logits as
    transformers' float32 model on CPU does for the prompt alone; padding a state that already
    holds tokens is refused on CUDA as on CPU (the check reads the state where it lives)."""
    from conftest import build_hf_model, rel_err  # noqa: PLC0415

    from mamba_deploy.errors import ShapeError
    from mamba_deploy.runners import open_runner

    hf = build_hf_model(kind)
    hf.save_pretrained(tmp_path)
    runner = open_runner(tmp_path, "torch", device=DEV)
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (37, 20, 1)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    st = runner.new_state(len(prompts))
    logits, st = runner.prefill(ids, st, attention_mask=mask, last_only=True)
    with torch.no_grad():
        want = torch.stack([hf(p[None]).logits[0, -1] for p in prompts])
    assert rel_err(logits[:, -1].float().cpu(), want) < 1e-4
    with pytest.raises(ShapeError, match="already holds tokens"):
        runner.prefill(ids, st, attention_mask=mask)


@pytest.mark.parametrize("chunk", [8, 17])
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_prefill_in_pieces_on_cuda_vs_transformers(kind, chunk, tmp_path):
    """generate(prefill_chunk=N) on CUDA: a left-padded batch fed N positions at a time (the
    1-token row's padding outlasts several pieces; pieces of 17 cross the tiny Mamba2's 16-token
    SSD chunks) gives each prompt's last logits as transformers' float32 model on CPU does for the
    prompt alone."""
    from conftest import build_hf_model, rel_err  # noqa: PLC0415

    from mamba_deploy.generation import left_pad, prefill_in_chunks
    from mamba_deploy.runners import open_runner

    hf = build_hf_model(kind)
    hf.save_pretrained(tmp_path)
    runner = open_runner(tmp_path, "torch", device=DEV)
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (37, 20, 1)]
    ids, mask = left_pad(prompts)
    logits, _ = prefill_in_chunks(runner, ids, mask, runner.new_state(len(prompts)), chunk)
    with torch.no_grad():
        want = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in prompts])
    assert rel_err(logits.float().cpu(), want) < 1e-4


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefetch_mb", ["0", "8"])
def test_cuda_graph_runner(kind, dtype, prefetch_mb, monkeypatch):
    """Graph-captured decode gives the eager reference's logits, batch 1 and 3 (with and without
    the L2 prefetch of the next GEMV's weights)."""
    monkeypatch.setenv("MAMBA_DEPLOY_L2_PREFETCH_MB", prefetch_mb)
    from conftest import build_hf_model  # noqa: PLC0415

    from mamba_deploy import ops
    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.cuda_graph import CudaGraphRunner
    from mamba_deploy.runners.torch_runner import TorchRunner

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        build_hf_model(kind).save_pretrained(tmp)
        model = load_model(tmp, device=DEV, dtype=dtype)
    for batch in (1, 3, 5):  # 1, 3: one-launch mixer; 5: ssd_step + rmsnorm_gated kernels
        ids = torch.randint(0, 128, (batch, 9))
        steps = torch.randint(0, 128, (4, batch))
        fast, slow = CudaGraphRunner(model), TorchRunner(model)
        sf, ss = fast.new_state(batch), slow.new_state(batch)
        fast.prefill(ids, sf)
        with ops.use_backend("ref"):
            slow.prefill(ids, ss)
        gold = TorchRunner(load_model_copy(model, torch.float64))  # bf16 weights, float64 arithmetic
        sg = gold.new_state(batch)
        with ops.use_backend("ref"):
            gold.prefill(ids, sg)
        for t in steps:
            lf, _ = fast.step(t, sf)
            with ops.use_backend("ref"):
                lr, _ = slow.step(t, ss)
                lg, _ = gold.step(t, sg)
            if dtype == torch.float32:
                close(lf, lr, dtype, f"graph step logits b={batch}")
            else:
                as_close_as_reference(lf, lr, lg, f"graph logits b={batch}")
                assert rel(lf, lr) <= 2e-2
        got, ref = fast.to_torch_state(sf).ssm, slow.to_torch_state(ss).ssm
        if dtype == torch.float32:
            close(got, ref, dtype, "graph ssm state")
        else:  # two bf16 pipelines: each about as far from float64 math (one element of the state
            # measured 1.6e-2 from the other's, the L2 ratio 7.7e-3)
            assert rel(got, ref) <= TOL[dtype], f"graph ssm state: {rel(got, ref):.2e}"
            as_close_as_reference(got, ref, gold.to_torch_state(sg).ssm, "graph ssm state")


@pytest.mark.parametrize("method,opts", [("awq", dict(group_size=16)), ("smoothquant", {}), ("int8", {})])
def test_graph_decode_quantized_mamba1(method, opts, tmp_path):
    """A quantized Mamba1 checkpoint (AWQ int4 / SmoothQuant w8a8 in_proj with an input scale,
    int8 dt_proj) through CudaGraphRunner: graph decode gives the eager model's logits (the
    graph's fused step must call the quantized in_proj, not read a dequantized weight)."""
    from conftest import build_hf_model  # noqa: PLC0415

    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.cuda_graph import CudaGraphRunner
    from mamba_deploy.quant import quantize, save_quantized
    from mamba_deploy.runners.torch_runner import TorchRunner

    build_hf_model("mamba").save_pretrained(tmp_path / "hf")
    calib = torch.randint(0, 128, (4, 80))
    save_quantized(quantize(load_model(tmp_path / "hf"), method, calib_ids=calib, progress=False, **opts),
                   tmp_path / "q")
    model = load_model(tmp_path / "q", device=DEV)
    for batch in (1, 3):
        fast, slow = CudaGraphRunner(model), TorchRunner(model)
        sf, ss = fast.new_state(batch), slow.new_state(batch)
        ids = torch.randint(0, 128, (batch, 9))
        fast.prefill(ids, sf)
        slow.prefill(ids, ss)
        for t in torch.randint(0, 128, (4, batch)):
            lf, _ = fast.step(t, sf)
            lr, _ = slow.step(t, ss)
            close(lf, lr, torch.float32, f"quantized ({method}) graph logits b={batch}")


def load_model_copy(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def random_lm(cfg, dtype, seed=0):
    """conftest.random_lm on the GPU."""
    from conftest import random_lm as make  # noqa: PLC0415

    return make(cfg, dtype, seed, DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [dict(d_model=2560, d_state=128, headdim=64),  # mamba2-2.7b widths
                                   dict(d_model=4096, d_state=128, headdim=64, ngroups=8,
                                        tie_embeddings=False),  # Mamba-Codestral-7B widths: 128 heads, 8 groups
                                   dict(d_model=768, d_state=128, headdim=64, d_conv=3, norm_before_gate=True),
                                   dict(d_model=96, d_state=17, headdim=7, d_inner_override=231, d_conv=2,
                                        dt_limit=(0.01, 0.5)),  # odd widths
                                   dict(arch="mamba1", d_model=2560, d_state=16),  # mamba-2.8b widths
                                   dict(arch="mamba1", d_model=100, d_state=9, dt_rank=7, d_conv=3),
                                   dict(arch="mamba1", d_model=256, d_state=16, dt_bc_rms=True)])  # Falcon-Mamba
def test_graph_decode_real_widths(shape, dtype):
    """Graph decode at real layer widths (Mamba2: one-shot GEMV rows of 2560 / 5120, 80 heads,
    d_state 128; Mamba1: 5120 channels, dt_rank 160) and at odd ones, batch 1 and 3, 6 steps.
    float32: logits and states within 1e-4 of float64
    math on the same weights. bf16: about as close to float64 as the bf16 reference path is
    (as in test_cuda_graph_runner)."""
    check_graph_decode(shape, dtype)


@pytest.mark.parametrize("shape", [dict(d_model=2560, d_state=128, headdim=64),
                                   dict(arch="mamba1", d_model=2560, d_state=16)])
def test_graph_decode_16bit_state(shape):
    """Graph decode with a bfloat16 SSM state (MambaLM.set_state_dtype): the state is rounded once
    per step, in the graph as in the eager reference path; both about as far from float64 math."""
    check_graph_decode(shape, torch.bfloat16, state_dtype=torch.bfloat16)


def test_graph_decode_mamba1_conv_kernel(monkeypatch):
    """Mamba1 batch-1 graph decode with the conv-update kernel (PDL, window read before its wait)
    after in_proj's GEMV, instead of the conv as the GEMV's epilogue."""
    monkeypatch.setattr(ops, "CONV_IN_GEMV", False)
    check_graph_decode(dict(arch="mamba1", d_model=256, d_state=16), torch.float32)


def test_graph_decode_foreign_state():
    """A State the runner's bucket does not own (copied in and out around each replay) gives the
    same logits and final state as the bucket's own."""
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.cuda_graph import CudaGraphRunner

    for arch in ("mamba1", "mamba2"):
        model = random_lm(MambaConfig(arch=arch, d_model=256, d_state=16, headdim=32, n_layer=2, vocab_size=1000),
                          torch.float32)
        fast = CudaGraphRunner(model)
        own, foreign = fast.new_state(2), model.new_state(2)
        ids = torch.randint(0, 1000, (2, 5))
        fast.prefill(ids, own)
        fast.prefill(ids, foreign)
        for t in torch.randint(0, 1000, (4, 2)):
            lo, _ = fast.step(t, own)
            lf, _ = fast.step(t, foreign)
            close(lf, lo, torch.float32, f"{arch} logits, foreign state")
        got, want = fast.to_torch_state(foreign), fast.to_torch_state(own)
        close(got.ssm, want.ssm, torch.float32, f"{arch} ssm state, foreign state")
        close(got.conv, want.conv, torch.float32, f"{arch} conv state, foreign state")


def test_graph_decode_foreign_state_leaves_the_lent_state_alone():
    """A foreign state is copied through the bucket's buffers, which a live lent state views: each
    must decode its own sequence (stepping the foreign one used to overwrite the lent one)."""
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.cuda_graph import CudaGraphRunner
    from mamba_deploy.runners.torch_runner import TorchRunner

    for arch in ("mamba1", "mamba2"):
        model = random_lm(MambaConfig(arch=arch, d_model=256, d_state=16, headdim=32, n_layer=2, vocab_size=1000),
                          torch.float32)
        fast, eager = CudaGraphRunner(model), TorchRunner(model)
        lent, foreign = fast.new_state(1), fast.new_state(1)  # the second: the bucket is busy
        assert fast._b[1].owns(lent) and not fast._b[1].owns(foreign)
        refs = [eager.new_state(1), eager.new_state(1)]
        for st, ref, prompt in zip((lent, foreign), refs, ([[3, 4, 5]], [[7, 8]])):
            fast.prefill(torch.tensor(prompt), st)
            eager.prefill(torch.tensor(prompt), ref)
        for k, t in enumerate(torch.randint(0, 1000, (4, 2))):
            for j, st in enumerate((lent, foreign)):
                got, _ = fast.step(t[j:j + 1], st)
                want, _ = eager.step(t[j:j + 1], refs[j])
                close(got, want, torch.float32, f"{arch} step {k}, {'foreign' if j else 'lent'} state")
        # bucket 4: a lent state of 4 rows and a foreign one of 3; the replay steps all 4 rows
        lent, foreign = fast.new_state(4), fast.new_state(3)
        refs = [eager.new_state(4), eager.new_state(3)]
        for st, ref, b in zip((lent, foreign), refs, (4, 3)):
            prompt = torch.randint(0, 1000, (b, 3))
            fast.prefill(prompt, st)
            eager.prefill(prompt, ref)
        for k, t in enumerate(torch.randint(0, 1000, (3, 4))):
            for j, (st, b) in enumerate(((foreign, 3), (lent, 4))):
                got, _ = fast.step(t[:b], st)
                want, _ = eager.step(t[:b], refs[1 - j])
                close(got, want, torch.float32, f"{arch} step {k}, batch {b}, {'lent' if j else 'foreign'} state")


def check_graph_decode(shape, dtype, state_dtype=None):
    from mamba_deploy import ops
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.cuda_graph import CudaGraphRunner

    cfg = MambaConfig(**{"arch": "mamba2", **shape}, n_layer=2, vocab_size=1000)
    model = random_lm(cfg, dtype).set_state_dtype(state_dtype)
    gold = load_model_copy(model, torch.float64).set_state_dtype(None)
    for batch in (1, 3):
        fast = CudaGraphRunner(model)
        sf, sg, sr = fast.new_state(batch), gold.new_state(batch), model.new_state(batch)
        for t in torch.randint(0, 1000, (6, batch)):
            lf, _ = fast.step(t, sf)
            with ops.use_backend("ref"), torch.inference_mode():
                lg = gold.step(t.to(DEV), sg).cpu()
                lr = model.step(t.to(DEV), sr).cpu()
            if dtype == torch.float32:
                close(lf, lg, dtype, f"graph logits {shape} b={batch}")
            else:
                as_close_as_reference(lf, lr, lg, f"graph logits {shape} b={batch}")
        assert sf.ssm.dtype == sr.ssm.dtype == (state_dtype or torch.float32)
        for name in ("ssm", "conv"):
            got, want, ref = (getattr(x, name).cpu() for x in (fast.to_torch_state(sf), sg, sr))
            if dtype == torch.float32:
                close(got, want, dtype, f"graph {name} state b={batch}")
            else:
                as_close_as_reference(got, ref, want, f"graph {name} state b={batch}")


def _import_mamba_ssm(monkeypatch):
    """mamba_ssm's Mamba2 layer (pure Triton) from a `.gpu/mamba_ssm-*` sdist folder or the
    environment, as benchmarks/gpu.py finds it; None when it is not there."""
    import glob
    import os
    import sys
    import types

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in sorted(glob.glob(os.path.join(root, ".gpu", "mamba_ssm-*")))[:1]:
        monkeypatch.syspath_prepend(path)
    if "selective_scan_cuda" not in sys.modules:  # its Mamba1 CUDA op, not built; only for this test
        monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    try:
        from mamba_ssm.modules.mamba2 import Mamba2
    except ImportError:
        return None
    return Mamba2


@pytest.mark.parametrize("ngroups", [1, 2, 4])
def test_mamba2_mixer_matches_mamba_ssm(ngroups, monkeypatch):
    """Our Mamba2 mixer (parallel path, on the Triton kernels) against mamba_ssm's own Mamba2
    layer, the origin of the architecture, with the same weights: fp32, batch 2, 37 tokens from a
    zero state, ngroups 1 / 2 / 4 (heads map to groups in contiguous blocks). mamba_ssm's Triton
    kernels use TF32 matmuls, so the bound is 1e-3 (measured 1.7e-4..2.0e-4 on an H200). The CPU
    suite checks ngroups > 1 against transformers; transformers 5.17 (the GPU machine's) gets
    ngroups 2 wrong, 5.23 agrees with both."""
    Mamba2 = _import_mamba_ssm(monkeypatch)
    if Mamba2 is None:
        pytest.skip("mamba_ssm is not importable (unpack its sdist under .gpu/, see benchmarks/gpu.py)")
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.model import Mamba2Mixer

    torch.manual_seed(0)
    ref = Mamba2(d_model=64, d_state=16, headdim=8, ngroups=ngroups, expand=2, d_conv=4, chunk_size=16,
                 use_mem_eff_path=False, device=DEV, dtype=torch.float32)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cfg = MambaConfig(arch="mamba2", d_model=64, d_state=16, headdim=8, ngroups=ngroups, n_layer=1,
                      vocab_size=10, chunk_size=16)
    ours = Mamba2Mixer(cfg).to(DEV)
    ours.load_state_dict(ref.state_dict())  # parameter names equal mamba_ssm's
    u = torch.randn(2, 37, 64, device=DEV)
    with torch.no_grad():
        want = ref(u)
        got, _, _ = ours(u, torch.zeros(2, cfg.conv_dim, 3, device=DEV), torch.zeros(2, cfg.nheads, 8, 16, device=DEV))
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(10576, 2560), (2560, 5120), (37, 300), (5, 9000)])  # 2.7b in/out_proj, odd, looped
def test_int8_gemv_matches_float64(n, k, dtype):
    """The decode GEMV over int8 codes with a scale per row (weight-only int8 at batch 1) against
    float64 math on the same codes: (x . q) * s. One-shot slabs and the looping path (K > 8192)."""
    from mamba_deploy.ops.triton_gemv import gemv

    g = torch.Generator(device=DEV).manual_seed(n + k)
    q = torch.randint(-127, 128, (n, k), device=DEV, dtype=torch.int8, generator=g)
    s = torch.rand(n, device=DEV, generator=g) * 0.01
    x = torch.randn(1, k, device=DEV, generator=g).to(dtype)
    want = (x.double() @ q.double().T) * s.double()
    close(gemv(x, q, scale=s), want, dtype, f"int8 gemv {n}x{k}")
    with pytest.raises(ValueError, match="int8 codes"):
        gemv(x, q.to(dtype), scale=s)


# ----------------------------------------------------------------------------- weight-only int8 / int4, a few rows

SPLIT_TILE = dict(BM=16, BN=16, BK=128, SPLIT_K=4, STAGES=3, num_warps=4, SWAP=False)  # atomics into float32
SWAP_TILE = dict(BM=32, BN=64, BK=128, SPLIT_K=1, STAGES=3, num_warps=4, SWAP=True)  # (BN, BM) accumulator


def _x(m, k, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(m, k, device=DEV, generator=g).to(dtype), g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [2, 7, 33, 64])
@pytest.mark.parametrize("n,k,config", [(10576, 2560, None), (37, 512, None), (37, 512, SPLIT_TILE),
                                        (37, 512, SWAP_TILE), (5120, 160, None), (64, 96, None)])
def test_int8_mm_matches_float64(m, n, k, config, dtype):
    """The qmm kernel over int8 codes (weight-only int8 at batch 2..64) against float64 math on
    the same codes, (x @ q^T) * s; odd rows and columns, rows not a multiple of 128 (Mamba1's
    dt_proj reads dt_rank = 160), the default tile, a split-K tile and the transposed-accumulator tile."""
    from mamba_deploy.ops.triton_qmm import int8_mm

    x, g = _x(m, k, dtype, m * n + k)
    q = torch.randint(-127, 128, (n, k), device=DEV, dtype=torch.int8, generator=g)
    s = (torch.rand(n, 1, device=DEV, generator=g) * 0.01).half()
    want = (x.double() @ q.double().T) * s.double().view(1, -1)
    got = int8_mm(x, q, s, config=config)
    assert got.dtype == dtype and got.shape == (m, n)
    close(got, want, dtype, f"int8 qmm {m}x{n}x{k}")


@pytest.mark.parametrize("group,symmetric,config", [
    (32, True, None), (64, False, None), (128, True, None), (128, False, None), (256, True, None),
    (128, False, SPLIT_TILE), (256, True, SPLIT_TILE), (64, False, dict(SWAP_TILE, BK=64)), (128, True, SWAP_TILE)])
@pytest.mark.parametrize("m", [1, 2, 33])
def test_int4_mm_matches_float64(m, group, symmetric, config):
    """The qmm kernel over packed int4 codes against float64 math on the decoded weight
    (quant/formats.py's decoder): signed and zero-point codes, groups of 32..256 columns."""
    from mamba_deploy.ops.triton_qmm import int4_mm
    from mamba_deploy.quant import formats

    n, k = 300, 1024
    x, g = _x(m, k, torch.bfloat16, m + group)
    t = formats.encode(torch.randn(n, k, device=DEV, generator=g), "int4", "t", group, symmetric)
    want = x.double() @ formats.decode(t, "int4", group, symmetric, torch.float64).T
    got = int4_mm(x, t["qweight"], t["scales"], t.get("zeros"), group, symmetric, config=config)
    close(got, want, torch.bfloat16, f"int4 qmm g{group} sym={symmetric}")


@pytest.mark.parametrize("fmt,k,group", [("int8", 512, None), ("int8", 160, None), ("int4", 512, 128),
                                         ("int4", 320, 64)])
@pytest.mark.parametrize("rows", [1, 5, 9, 64, 65])
def test_quantized_linear_rows_on_cuda(fmt, k, group, rows):
    """QuantLinear on CUDA at every row regime against float64 math on its dequantized weight.
    int8: 1 row the GEMV, 2..64 the qmm kernel, more the reference; int4: tinygemm (K = 512), or
    where tinygemm refuses the shape (K = 320) the qmm kernel up to 64 rows, the reference above."""
    from mamba_deploy.quant.modules import QuantLinear

    lin = torch.nn.Linear(k, 96, bias=True).to(DEV, torch.bfloat16)
    m = QuantLinear.from_linear(lin, fmt, "t", group_size=group)
    x, _ = _x(rows, k, torch.bfloat16, rows)
    with torch.no_grad():
        want = x.double() @ m.weight.double().T + lin.bias.double()
        got = m(x)
    close(got, want, torch.bfloat16, f"{fmt} QuantLinear, {rows} rows")


@pytest.mark.parametrize("tied", [False, True])
def test_mamba_ssm_loads_our_mamba_ssm_layout(tied, tmp_path, monkeypatch):
    """`convert --format mamba_ssm` output read by mamba_ssm itself, as its from_pretrained does:
    MambaConfig(**config.json) (a dataclass that refuses unknown keys), then a strict
    load_state_dict of pytorch_model.bin (the tied lm_head included). Only use_mem_eff_path is set
    off (causal_conv1d's CUDA op is not built). Logits against ours, fp32: mamba_ssm's Triton SSD and
    norm kernels compute in TF32: on an H200 mamba_ssm was 1.9e-3 / 2.4e-3 from float64 math and ours
    6.5e-7 / 6.7e-7 (untied / tied), so the bound is 1e-2; a mis-mapped or missing weight is O(1)."""
    if _import_mamba_ssm(monkeypatch) is None:
        pytest.skip("mamba_ssm is not importable (unpack its sdist under .gpu/, see benchmarks/gpu.py)")
    from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.utils.hf import load_config_hf, load_state_dict_hf

    from conftest import random_lm
    from mamba_deploy import load_model, save_checkpoint
    from mamba_deploy.config import MambaConfig

    cfg = MambaConfig(arch="mamba2", d_model=64, n_layer=2, vocab_size=100, pad_vocab_size_multiple=8, d_state=16,
                      headdim=16, ngroups=2, chunk_size=16, tie_embeddings=tied)
    folder = save_checkpoint(random_lm(cfg), tmp_path / "ssm", fmt="mamba_ssm", dtype=torch.float16)
    data = load_config_hf(str(folder))
    data["ssm_cfg"]["use_mem_eff_path"] = False
    ref = MambaLMHeadModel(SsmConfig(**data), device=DEV, dtype=torch.float32).eval()
    ref.load_state_dict(load_state_dict_hf(str(folder), device=DEV))
    ours = load_model(folder, device=DEV)
    ids = torch.randint(0, 100, (2, 37), device=DEV)
    with torch.no_grad():
        want, got = ref(ids).logits[..., :100], ours(ids).logits[..., :100]
        exact = load_model(folder, dtype=torch.float64)(ids.cpu()).logits[..., :100]
    err = float((got - want).abs().max() / want.abs().max())
    print(f"mamba_ssm vs ours {err:.2e}; vs float64: mamba_ssm {float((want.cpu().double() - exact).abs().max() / exact.abs().max()):.2e}, "
          f"ours {float((got.cpu().double() - exact).abs().max() / exact.abs().max()):.2e}")
    assert err <= 1e-2
