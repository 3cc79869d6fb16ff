"""The one place that picks an implementation for each op.

Model code calls `ops.<name>(...)`; this module routes to the Triton kernel when the inputs
live on CUDA and the kernel is available, and to the pure-PyTorch reference twin otherwise.
`set_backend("ref")` forces the references everywhere (tests, export tracing).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch

from ..errors import ConfigError
from . import reference as ref

# name -> reference implementation; fast twins share the signature.
REFERENCE = {
    "linear": torch.nn.functional.linear,
    "causal_conv1d": ref.causal_conv1d_ref,
    "causal_conv1d_update": ref.causal_conv1d_update_ref,
    "rmsnorm": ref.rmsnorm_ref,
    "rmsnorm_gated": ref.rmsnorm_gated_ref,
    "selective_scan": ref.selective_scan_ref,
    "selective_state_update": ref.selective_state_update_ref,
    "ssd": ref.ssd_ref,
    "ssd_state_update": ref.ssd_state_update_ref,
    "ssd_step": ref.ssd_step_ref,  # fused Mamba2 decode step: conv update + state update
    "int8_linear": ref.int8_linear_ref,  # weight-only quantized linears (quant/modules.py)
    "int4_linear": ref.int4_linear_ref,
    "w8a8_linear": ref.w8a8_linear_ref,  # int8 weights and per-token int8 activations
    # fused decode ops of the graph-captured step (cuda_graph.py); names ending in _ write in place
    "add_rmsnorm_": ref.add_rmsnorm_ref,  # residual add + the next block's RMSNorm
    "ssd_step_gated_": ref.ssd_step_gated_ref,  # the whole Mamba2 mixer between in_proj and out_proj
    "selective_state_update_dt": ref.selective_state_update_dt_ref,  # Mamba1's, dt_proj folded in
    "linear_conv1d_update": ref.linear_conv1d_update_ref,  # Mamba1's in_proj + conv update
}

# weight-only int8 / int4 linears take the Triton qmm kernel for 2..QMM_MAX_ROWS rows (batched
# decode); above, the matmul costs more than the weight bytes and the codes are converted for cuBLAS
QMM_MAX_ROWS = 64

_BACKENDS = ("auto", "ref", "triton")
_backend = "auto"


@functools.lru_cache(maxsize=1)
def fast_ops() -> dict:
    """Triton kernels keyed like REFERENCE; empty when triton or CUDA is missing."""
    if not torch.cuda.is_available():
        return {}
    try:
        from . import triton_kernels  # noqa: F401  (imports triton)
    except ImportError:
        return {}
    return dict(triton_kernels.KERNELS)


def set_backend(name: str) -> None:
    global _backend
    if name not in _BACKENDS:
        raise ConfigError(f"unknown ops backend {name!r}; choose one of {_BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    prev = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(prev)


@functools.lru_cache(maxsize=1)
def cpu_ops() -> dict:
    """Compiled CPU kernels keyed like REFERENCE (see cpu_kernels.py)."""
    from . import cpu_kernels

    return dict(cpu_kernels.KERNELS)


def decode_plan(model, batch: int, state):
    """A whole-model decode step `(ids, state) -> logits` for where the state lives, or None
    (then MambaLM steps block by block through the ops above). CPU: one C call per block
    (cpu_decode.py), under the default backend only. CUDA: None; decode there is captured as a
    graph by the runner (cuda_graph.py), over the fused ops below. A tensor-parallel model
    (tp.py) steps block by block: its projections' outputs are summed over ranks by their modules."""
    if state.conv.device.type != "cpu" or _backend != "auto" or getattr(model, "tp", None) is not None:
        return None
    from .cpu_decode import decode_plan as cpu_plan

    return cpu_plan(model, batch, state)


# what the Triton kernels compute in (their states and activations); anything else (float64:
# `verify --reference-dtype float64` on a GPU) runs the reference twins, in its own precision
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pick(name: str, tensor):
    if _backend == "auto" and tensor.device.type == "cpu" and tensor.dtype == torch.float32:
        fast = cpu_ops().get(name)
        if fast is not None:
            return fast
    if _backend == "triton" and tensor.is_cuda and tensor.dtype not in TRITON_DTYPES:
        raise RuntimeError(f"no Triton kernel computes {name!r} in {tensor.dtype}")  # the strict switch
    if _backend != "ref" and tensor.is_cuda and tensor.dtype in TRITON_DTYPES:
        fast = fast_ops().get(name)
        if fast is not None:
            return fast
        if _backend == "triton":
            raise RuntimeError(f"no Triton kernel for op {name!r}")  # a developer's strict switch
    return REFERENCE[name]


def graph_decode_available(model) -> bool:
    """Whether decode on `model` can be captured as a CUDA graph of the Triton ops
    (cuda_graph.CudaGraphRunner): on CUDA, Triton present, not under the reference backend, and
    in a dtype the kernels compute in."""
    return (model.device.type == "cuda" and _backend != "ref" and model.dtype in TRITON_DTYPES
            and fast_ops().get("ssd_step") is not None)


# ---- which fused decode ops the graph-captured step composes (cuda_graph.fast_decode_step)

# The one-launch mixer (ssd_step_gated_) wins where decode is launch-bound and loses where it is
# bandwidth-bound (its group counter's acq_rel fence stalls each program). Measured on an H200,
# mamba2-2.7b: batch 1 2.45 ms fused vs 2.70 unfused; batch 32 6.54 fused vs 5.71 unfused.
# Batches in between were not measured; 4 is a guess on the launch-bound side. Mamba1's folded
# dt_proj follows the same bound.
FUSED_MAX_BATCH = 4
# Mamba1: the decode conv as an epilogue of in_proj's GEMV (linear_conv1d_update; its Triton
# kernel makes it one launch at batch 1 and falls back to two launches above)
CONV_IN_GEMV = True


class DecodeFusion(NamedTuple):
    """The decomposition of one layer's decode step; each op named here has its reference twin."""

    gated_mixer: bool  # Mamba2: ssd_step_gated_ (conv, state update, gate, norm statistics), else ssd_step + rmsnorm_gated
    dt_folded: bool  # Mamba1: selective_state_update_dt (dt_proj inside the state update), else dt_proj then the update
    conv_in_gemv: bool  # Mamba1: linear_conv1d_update (in_proj with the conv update), else in_proj then the conv


def decode_fusion(cfg, batch: int, dt_plain: bool = True, in_proj_plain: bool = True,
                  out_proj_local: bool = True) -> DecodeFusion:
    """Which fused ops a decode step of `batch` rows uses for a model with config cfg.
    dt_plain: every dt_proj can be read as a weight (not a quantized one with an input scale);
    in_proj_plain: every in_proj is an unquantized Linear; out_proj_local: out_proj's output is
    this process's alone, not summed over tensor-parallel ranks (the fused mixer's norm scale, one
    per row, is applied after out_proj, and each rank's would differ). MAMBA_DEPLOY_FUSED_DECODE=0 turns
    all fusion off (A/B measurements; the twins compute the same function either way)."""
    on = os.environ.get("MAMBA_DEPLOY_FUSED_DECODE", "1") != "0" and batch <= FUSED_MAX_BATCH
    # the fused mixer's gated norm spans the whole row (one group) and its conv takes 2..4 taps
    gated = (on and cfg.arch == "mamba2" and cfg.ngroups == 1 and cfg.rmsnorm and not cfg.bias
             and 2 <= cfg.d_conv <= 4 and out_proj_local)
    dt = on and cfg.arch == "mamba1" and dt_plain
    return DecodeFusion(gated, dt, dt and CONV_IN_GEMV and in_proj_plain)


def _with_hints(name: str, tensor, *args, **hints):
    """Call the op picked for tensor; hints (state_early, prefetch: scheduling advice for the
    graph-captured decode, see cuda_graph.py) reach only the Triton kernels, which take them.
    The twins compute the same values without them."""
    fn = pick(name, tensor)
    return fn(*args, **hints) if hints and fn is fast_ops().get(name) else fn(*args)


def linear(x, weight, bias=None):
    return pick("linear", x)(x, weight, bias)


def causal_conv1d(x, weight, bias, conv_state, activation=True):
    return pick("causal_conv1d", x)(x, weight, bias, conv_state, activation)


def causal_conv1d_update(x, weight, bias, conv_state, activation=True, **hints):
    return _with_hints("causal_conv1d_update", x, x, weight, bias, conv_state, activation, **hints)


def rmsnorm(x, weight, eps):
    return pick("rmsnorm", x)(x, weight, eps)


def rmsnorm_gated(x, z, weight, eps, group_size, norm_before_gate=False):
    return pick("rmsnorm_gated", x)(x, z, weight, eps, group_size, norm_before_gate)


def selective_scan(x, dt, A, B, C, D, z, dt_bias, h0):
    return pick("selective_scan", x)(x, dt, A, B, C, D, z, dt_bias, h0)


def selective_state_update(x, dt, A, B, C, D, z, dt_bias, h):
    return pick("selective_state_update", x)(x, dt, A, B, C, D, z, dt_bias, h)


def ssd(x, dt, A, B, C, D, dt_bias, h0, chunk_size, dt_limit):
    return pick("ssd", x)(x, dt, A, B, C, D, dt_bias, h0, chunk_size, dt_limit)


def ssd_state_update(x, dt, A, B, C, D, dt_bias, h, dt_limit):
    return pick("ssd_state_update", x)(x, dt, A, B, C, D, dt_bias, h, dt_limit)


def ssd_step(xBC, dt, conv_weight, conv_bias, conv_state, A, D, dt_bias, h, dt_limit):
    return pick("ssd_step", xBC)(xBC, dt, conv_weight, conv_bias, conv_state, A, D, dt_bias, h, dt_limit)


def int8_linear(x, qweight, scales):
    return pick("int8_linear", x)(x, qweight, scales)


def int4_linear(x, qweight, scales, zeros, group_size, symmetric):
    return pick("int4_linear", x)(x, qweight, scales, zeros, group_size, symmetric)


def w8a8_linear(x, qweight, scales):
    return pick("w8a8_linear", x)(x, qweight, scales)


# ---- the fused decode ops (cuda_graph.py); each twin's docstring has the contract

def add_rmsnorm_(y, residual, weight, eps, out=None, sumsq=None, scale_n=1, scale_eps=0.0, **hints):
    return _with_hints("add_rmsnorm_", residual, y, residual, weight, eps, out, sumsq, scale_n, scale_eps, **hints)


def ssd_step_gated_(xBC, dt, z, conv_weight, conv_bias, conv_state, A, D, dt_bias, h, norm_weight, dt_limit,
                    norm_before_gate, out, sumsq, counter, **hints):
    return _with_hints("ssd_step_gated_", xBC, xBC, dt, z, conv_weight, conv_bias, conv_state, A, D, dt_bias, h,
                       norm_weight, dt_limit, norm_before_gate, out, sumsq, counter, **hints)


def selective_state_update_dt(x, dt_in, dt_weight, A, B, C, D, z, dt_bias, h, **hints):
    return _with_hints("selective_state_update_dt", x, x, dt_in, dt_weight, A, B, C, D, z, dt_bias, h, **hints)


def linear_conv1d_update(x, weight, bias, conv_weight, conv_bias, conv_state, **hints):
    return _with_hints("linear_conv1d_update", x, x, weight, bias, conv_weight, conv_bias, conv_state, **hints)
