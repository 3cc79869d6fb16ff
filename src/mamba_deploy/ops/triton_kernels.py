"""Triton twins of `ops.reference`, keyed like `ops.REFERENCE` (same names, same signatures).

Importing this module imports triton; `ops.fast_ops()` catches the ImportError on machines
without it (CI), and only routes CUDA tensors here. The kernels live in small files:
triton_conv (causal conv1d), triton_gemv (decode GEMV with PDL), triton_qmm (int8 / int4 weight-only
linears for a few rows), triton_norm (RMSNorms), triton_scan (Mamba1 scan),
triton_ssd (Mamba2 chunked SSD), triton_step (decode-step state updates, fused Mamba2 step).

Fast-path contract for the decode ops (`causal_conv1d_update`, `selective_state_update`,
`ssd_state_update`, `ssd_step`): the state arguments are updated in place and returned.
"""

from __future__ import annotations

from .triton_conv import causal_conv1d, causal_conv1d_update
from .torch_fused import w8a8_linear
from .triton_gemv import linear, linear_conv1d_update
from .triton_norm import add_rmsnorm_, rmsnorm, rmsnorm_gated
from .triton_qmm import int4_linear, int8_linear
from .triton_scan import selective_scan
from .triton_ssd import ssd
from .triton_step import selective_state_update, selective_state_update_dt, ssd_state_update, ssd_step, ssd_step_gated_

KERNELS = {
    "linear": linear,  # Triton GEMV for a few rows (decode), cuBLAS otherwise
    "causal_conv1d": causal_conv1d,
    "causal_conv1d_update": causal_conv1d_update,
    "rmsnorm": rmsnorm,
    "rmsnorm_gated": rmsnorm_gated,
    "selective_scan": selective_scan,
    "selective_state_update": selective_state_update,
    "ssd": ssd,
    "ssd_state_update": ssd_state_update,
    "ssd_step": ssd_step,
    "int8_linear": int8_linear,  # weight-only int8: the GEMV for one row, the qmm kernel for a few
    "int4_linear": int4_linear,  # weight-only int4: tinygemm where it fits, else the qmm kernel for a few rows
    "w8a8_linear": w8a8_linear,  # torch._int_mm (torch_fused.py)
    # fused decode ops with scheduling hints (state_early, prefetch; see ops._with_hints)
    "add_rmsnorm_": add_rmsnorm_,
    "ssd_step_gated_": ssd_step_gated_,
    "selective_state_update_dt": selective_state_update_dt,
    "linear_conv1d_update": linear_conv1d_update,
}

__all__ = ["KERNELS"]
