"""Each fast CPU op against its pure-PyTorch reference twin (float32), and the references
against float64 sequential math (an independent, loop-over-time formulation).

Tolerances: float32 kernel vs reference <= 1e-5 relative; reference vs float64 loop <= 1e-5.
"""

import functools
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from mamba_deploy.ops import cpu_kernels, reference as ref


def _inputs(b, l, d, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=r(b, l, d), dt=r(b, l, d) - 1, A=-torch.rand(d, n, generator=g, dtype=dtype) * 4,
                B=r(b, l, n), C=r(b, l, n), D=r(d), z=r(b, l, d), dt_bias=r(d) * 0.5, h0=r(b, d, n))


def _scan_loop_f64(x, dt, A, B, C, D, z, dt_bias, h0):
    """Plain recurrence in float64, written independently of reference.py."""
    x, dt, A, B, C, D, dt_bias, h = (t.double() for t in (x, dt, A, B, C, D, dt_bias, h0))
    delta = F.softplus(dt + dt_bias)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * x[:, t])
    y = torch.stack(ys, 1)
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


@pytest.mark.parametrize("l", [1, 7, 33, 257])
@pytest.mark.parametrize("gate", [True, False])
def test_selective_scan_reference_vs_float64_loop(l, gate):
    kw = _inputs(3, l, 24, 8, seed=l)
    if not gate:
        kw["z"] = None
    y, h = ref.selective_scan_ref(**kw)
    y64, h64 = _scan_loop_f64(**kw)
    assert rel_err(y, y64) <= 1e-5 and rel_err(h, h64) <= 1e-5


@pytest.mark.parametrize("l", [1, 7, 33, 70])
def test_selective_scan_reference_gradients_vs_float64_loop(l):
    """Training's backward through the reference scan (each time chunk checkpointed, its
    intermediates recomputed) against autograd of the float64 loop: the gradients of every input,
    the initial state included, within 1e-4 relative; lengths within one chunk and across chunks."""
    check_gradients(ref.selective_scan_ref, _scan_loop_f64, _inputs(2, l, 24, 8, seed=300 + l), seed=l)


def check_gradients(fn, fn64, kw, seed):
    """Every input's gradient of fn (float32) against autograd of fn64 (float64), both returning
    (y, final state), through one random linear function of both outputs: within 1e-4 relative."""
    ours = {k: v.clone().requires_grad_() for k, v in kw.items()}
    theirs = {k: v.double().requires_grad_() for k, v in kw.items()}
    y, h = fn(**ours)
    y64, h64 = fn64(**theirs)
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    wh = torch.randn(h.shape, generator=g, dtype=torch.float64)
    ((y * wy).sum() + (h * wh).sum()).backward()
    ((y64 * wy).sum() + (h64 * wh).sum()).backward()
    for k in kw:
        assert rel_err(ours[k].grad, theirs[k].grad) <= 1e-4, k


def test_selective_scan_reference_keeps_no_state_sized_tensors_for_backward():
    """What autograd keeps for the scan's backward grows with (b, l, d), not (b, l, d, n): the
    ~15 (b, l, d, n) intermediates of the log-depth scan took 3.9 MB per token of demo-mamba1
    training (a 32 x 512 step needed ~60 GB); they are recomputed chunk by chunk instead. Bound:
    less than one (b, l, d, n) float32 tensor in all."""
    b, l, d, n = 2, 128, 64, 16
    kw = {k: v.requires_grad_() for k, v in _inputs(b, l, d, n, seed=5).items()}
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        ref.selective_scan_ref(**kw)
    assert 0 < sum(kept) < b * l * d * n * 4


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the CPU scan kernel cannot be built")
@pytest.mark.parametrize("l", [1, 7, 33, 257])
@pytest.mark.parametrize("gate", [True, False])
def test_cpu_scan_kernel_vs_reference(l, gate):
    kw = _inputs(3, l, 40, 16, seed=100 + l)
    if not gate:
        kw["z"] = None
    y, h = cpu_kernels.selective_scan_cpu(**kw)
    y_ref, h_ref = ref.selective_scan_ref(**kw)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(h, h_ref) <= 1e-5
    assert not torch.equal(kw["h0"], h)  # the input state is not modified in place


def _ssd_loop_f64(x, dt, A, B, C, D, dt_bias, h0, dt_limit):
    x, dt, A, B, C, D, dt_bias, h = (t.double() for t in (x, dt, A, B, C, D, dt_bias, h0))
    delta = F.softplus(dt + dt_bias).clamp(*dt_limit)
    rep = x.shape[2] // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)
    ys = []
    for t in range(x.shape[1]):
        a = torch.exp(delta[:, t] * A)  # (b, h)
        h = a[..., None, None] * h + (delta[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((h * Ch[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("l", [1, 7, 15, 17, 53])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.01, 0.5), (0.2, 1.0)])
def test_ssd_reference_vs_float64_loop(l, groups, dt_limit):
    """ssd_ref (chunked) against the float64 loop, with and without the Mamba2 dt clamp. Of these
    softplus(dt + dt_bias), (0.01, 0.5) clamps 60% from above and none from below, (0.2, 1.0) 10%
    from below and 27% from above; dropping the clamp moves y by 0.09..4 relative."""
    g = torch.Generator().manual_seed(l * 10 + groups)
    b, h, p, n = 3, 4, 8, 16
    kw = dict(x=torch.randn(b, l, h, p, generator=g), dt=torch.randn(b, l, h, generator=g),
              A=-torch.rand(h, generator=g) * 3, B=torch.randn(b, l, groups, n, generator=g),
              C=torch.randn(b, l, groups, n, generator=g), D=torch.randn(h, generator=g),
              dt_bias=torch.randn(h, generator=g) * 0.5, h0=torch.randn(b, h, p, n, generator=g),
              dt_limit=dt_limit)
    y, hl = ref.ssd_ref(chunk_size=16, **kw)
    y64, h64 = _ssd_loop_f64(**kw)
    assert rel_err(y, y64) <= 1e-5 and rel_err(hl, h64) <= 1e-5


@pytest.mark.parametrize("l", [1, 15, 40])
@pytest.mark.parametrize("groups", [1, 2])
def test_ssd_reference_gradients_vs_float64_loop(l, groups):
    """Mamba2 training's backward through the chunked SSD against autograd of the float64 loop:
    every input's gradient (the initial state's too), within 1e-4 relative; one chunk, and three
    (chunk 16), so the state carried between chunks is differentiated through."""
    g = torch.Generator().manual_seed(400 + l + groups)
    b, h, p, n = 2, 4, 8, 16
    kw = dict(x=torch.randn(b, l, h, p, generator=g), dt=torch.randn(b, l, h, generator=g),
              A=-torch.rand(h, generator=g) * 3, B=torch.randn(b, l, groups, n, generator=g),
              C=torch.randn(b, l, groups, n, generator=g), D=torch.randn(h, generator=g),
              dt_bias=torch.randn(h, generator=g) * 0.5, h0=torch.randn(b, h, p, n, generator=g))
    check_gradients(functools.partial(ref.ssd_ref, chunk_size=16, dt_limit=(0.0, math.inf)),
                    functools.partial(_ssd_loop_f64, dt_limit=(0.0, math.inf)), kw, seed=l)


def test_ssd_stable_with_huge_decay():
    """Large dt and strongly negative A over a long sequence: no inf/nan (no exp(cumsum) divided out)."""
    b, l, h, p, n = 1, 600, 2, 4, 8
    g = torch.Generator().manual_seed(0)
    kw = dict(x=torch.randn(b, l, h, p, generator=g), dt=torch.full((b, l, h), 8.0), A=torch.tensor([-50.0, -0.01]),
              B=torch.randn(b, l, 1, n, generator=g), C=torch.randn(b, l, 1, n, generator=g), D=torch.zeros(h),
              dt_bias=torch.zeros(h), h0=torch.zeros(b, h, p, n), dt_limit=(0.0, math.inf))
    y, hl = ref.ssd_ref(chunk_size=64, **kw)
    y64, h64 = _ssd_loop_f64(**kw)
    assert torch.isfinite(y).all() and rel_err(y, y64) <= 1e-5


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the CPU scan kernel cannot be built")
def test_cpu_kernel_does_not_flush_denormals_process_wide():
    """Loading and running the kernel must not switch the process to flush-to-zero
    (a shared object linked with -ffast-math does that and changes other libraries' math)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from mamba_deploy.ops import cpu_kernels\n"
        "from test_ops import _inputs\n"
        "cpu_kernels.selective_scan_cpu(**_inputs(1, 3, 4, 2))\n"
        "x = torch.tensor([1e-39], dtype=torch.float32)\n"  # a float32 denormal
        "print(float(x * 1.0) != 0.0)\n"
    )
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the CPU kernels cannot be built")
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_conv_update_vs_reference(bias):
    g = torch.Generator().manual_seed(7)
    x, w, st = torch.randn(3, 40, generator=g), torch.randn(40, 4, generator=g), torch.randn(3, 40, 3, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    y, s = cpu_kernels.causal_conv1d_update_cpu(x, w, b, st)
    y_ref, s_ref = ref.causal_conv1d_update_ref(x, w, b, st)
    assert rel_err(y, y_ref) <= 1e-6 and torch.equal(s, s_ref)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the CPU kernels cannot be built")
@pytest.mark.parametrize("gate", [True, False])
def test_cpu_selective_state_update_vs_reference(gate):
    kw = _inputs(3, 1, 40, 16, seed=9)
    args = dict(x=kw["x"][:, 0], dt=kw["dt"][:, 0], A=kw["A"], B=kw["B"][:, 0], C=kw["C"][:, 0], D=kw["D"],
                z=kw["z"][:, 0] if gate else None, dt_bias=kw["dt_bias"], h=kw["h0"])
    y, h = cpu_kernels.selective_state_update_cpu(**args)
    y_ref, h_ref = ref.selective_state_update_ref(**args)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(h, h_ref) <= 1e-5


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the CPU kernels cannot be built")
@pytest.mark.parametrize("groups,dt_limit", [(1, (0.0, math.inf)), (2, (0.01, 0.5))])
def test_cpu_ssd_step_vs_reference(groups, dt_limit):
    g = torch.Generator().manual_seed(11)
    b, h, p, n = 3, 4, 8, 16
    conv_dim = h * p + 2 * groups * n
    args = dict(xBC=torch.randn(b, conv_dim, generator=g), dt=torch.randn(b, h, generator=g),
                conv_weight=torch.randn(conv_dim, 4, generator=g), conv_bias=torch.randn(conv_dim, generator=g),
                conv_state=torch.randn(b, conv_dim, 3, generator=g), A=-torch.rand(h, generator=g) * 3,
                D=torch.randn(h, generator=g), dt_bias=torch.randn(h, generator=g), h=torch.randn(b, h, p, n, generator=g),
                dt_limit=dt_limit)
    out = cpu_kernels.ssd_step_cpu(**args)
    out_ref = ref.ssd_step_ref(**args)
    for a, r in zip(out, out_ref):
        assert rel_err(a, r) <= 1e-5


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the CPU kernels cannot be built")
def test_cpu_kernels_softplus_over_its_whole_range():
    """dt + dt_bias from about -40 to 40: the C softplus's branches (log1p(exp(v)) below its
    threshold of 20, v itself above, where float32 rounds them alike) all run, in the scan, the
    Mamba1 step and the Mamba2 step (cpu_scan.c, cpu_common.h); the other tests reach about 3."""
    kw = _inputs(3, 33, 40, 16, seed=1)
    kw["dt"] = kw["dt"] * 12
    v = kw["dt"] + kw["dt_bias"]
    assert float(v.max()) > 25 and float(v.min()) < -25 and float(((v > 0) & (v < 20)).float().mean()) > 0.1
    y, h = cpu_kernels.selective_scan_cpu(**kw)
    y_ref, h_ref = ref.selective_scan_ref(**kw)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(h, h_ref) <= 1e-5
    step = dict(x=kw["x"][:, 0], dt=kw["dt"][:, 0], A=kw["A"], B=kw["B"][:, 0], C=kw["C"][:, 0], D=kw["D"],
                z=kw["z"][:, 0], dt_bias=kw["dt_bias"], h=kw["h0"])
    for a, r in zip(cpu_kernels.selective_state_update_cpu(**step), ref.selective_state_update_ref(**step)):
        assert rel_err(a, r) <= 1e-5
    g = torch.Generator().manual_seed(12)
    b, nh, p, n = 3, 8, 8, 16
    conv_dim = nh * p + 2 * n
    args = dict(xBC=torch.randn(b, conv_dim, generator=g), dt=torch.linspace(-40, 40, b * nh).reshape(b, nh),
                conv_weight=torch.randn(conv_dim, 4, generator=g), conv_bias=torch.randn(conv_dim, generator=g),
                conv_state=torch.randn(b, conv_dim, 3, generator=g), A=-torch.rand(nh, generator=g) * 3,
                D=torch.randn(nh, generator=g), dt_bias=torch.zeros(nh), h=torch.randn(b, nh, p, n, generator=g),
                dt_limit=(0.0, math.inf))
    for a, r in zip(cpu_kernels.ssd_step_cpu(**args), ref.ssd_step_ref(**args)):
        assert rel_err(a, r) <= 1e-5


def test_strict_triton_backend_raises_for_a_missing_kernel(monkeypatch):
    """`use_backend("triton")` raises for an op with no Triton kernel instead of silently using
    the reference; checked with a fake CUDA tensor and an empty kernel table."""
    from mamba_deploy import ops

    class FakeCuda:
        is_cuda = True
        device = torch.device("cuda")
        dtype = torch.float16

    monkeypatch.setattr(ops, "fast_ops", lambda: {})
    with ops.use_backend("triton"):
        for name in ("linear", "selective_scan"):
            with pytest.raises(RuntimeError, match=name):
                ops.pick(name, FakeCuda())
    with ops.use_backend("auto"):
        assert ops.pick("linear", FakeCuda()) is ops.REFERENCE["linear"]


def test_cpu_kernels_fall_back_when_sources_are_missing(monkeypatch, tmp_path):
    """An install without the C sources warns and uses the references instead of crashing."""
    from mamba_deploy.ops import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_SRCS", [tmp_path / "missing.c"])
    monkeypatch.setenv("MAMBA_DEPLOY_CACHE", str(tmp_path))
    cpu_kernels._lib.cache_clear()
    try:
        with pytest.warns(UserWarning, match="sources are missing"):
            assert cpu_kernels._lib() is None
    finally:
        cpu_kernels._lib.cache_clear()


def test_cpu_linear_and_quantized_linears_reject_wrong_widths():
    """Found in review: the C GEMV behind ops.linear took rows = numel / in_features and wrote past
    its output for an input of the wrong width. Every CPU linear now gives torch's shape error."""
    from mamba_deploy import ops

    x = torch.randn(2, 6)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        ops.linear(x, torch.randn(4096, 4))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        ops.int8_linear(x, torch.zeros(16, 4, dtype=torch.int8), torch.ones(16, 1))
    with pytest.raises(RuntimeError):
        ops.int4_linear(x, torch.zeros(16, 2, dtype=torch.uint8), torch.ones(16, 1), None, 4, True)


def _x86_with_avx2() -> bool:
    import platform

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return platform.machine() in ("x86_64", "AMD64") and " avx2" in flags and " fma" in flags


@pytest.mark.skipif(not _x86_with_avx2(), reason="needs an x86-64 CPU with AVX2 + FMA (the build under test "
                    "is the plain-loop one such CPUs never run otherwise)")
def test_cpu_kernels_plain_loops_build(tmp_path):
    """The C kernels' non-AVX2 loops (the build for CPUs without AVX2, or MAMBA_DEPLOY_CPU_ARCH=x86-64)
    pass the same C-kernel-vs-reference tests as the AVX2 build this machine compiles by default."""
    import subprocess

    assert cpu_kernels.simd_level() == 1  # the default build here takes the AVX2 loops
    env = {**os.environ, cpu_kernels.ARCH_ENV: "x86-64", "MAMBA_DEPLOY_CACHE": str(tmp_path)}
    env.pop("MAMBA_DEPLOY_NO_CPU_KERNELS", None)
    root = Path(__file__).resolve().parents[1]
    level = subprocess.run([sys.executable, "-c", "from mamba_deploy.ops import cpu_kernels as c; print(c.simd_level())"],
                           env=env, capture_output=True, text=True, cwd=root)
    assert level.stdout.strip() == "0", level.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ops.py",
                          "tests/test_quant.py", "-k", "cpu and not plain_loops_build"],
                         env=env, capture_output=True, text=True, cwd=root)
    assert run.returncode == 0 and " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]


def test_cpu_arch_env_refuses_non_names(monkeypatch):
    from mamba_deploy.errors import ConfigError

    monkeypatch.setenv(cpu_kernels.ARCH_ENV, "native -fplugin=x.so")
    with pytest.raises(ConfigError, match="MAMBA_DEPLOY_CPU_ARCH='native -fplugin=x.so' is not an architecture"):
        cpu_kernels._march()
    monkeypatch.setenv(cpu_kernels.ARCH_ENV, " x86-64-v2 ")
    assert cpu_kernels._march() == "-march=x86-64-v2"
    monkeypatch.delenv(cpu_kernels.ARCH_ENV)
    assert cpu_kernels._march() == "-march=native"
