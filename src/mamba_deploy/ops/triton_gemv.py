"""Triton GEMV for batch-1 decode (one row times a weight matrix), launched with programmatic
dependent launch (PDL) on Hopper.

Twin of `torch.nn.functional.linear` for x with one row. Why not cuBLAS: batch-1
decode of a 64-layer model is ~256 dependent launches whose GPU work is a few microseconds each,
so the gap between kernels costs as much as the weight streaming. With PDL a kernel is launched
while its predecessor still runs: it loads its first weight tile (weights never depend on the
predecessor), then `gdc_wait`s for the predecessor's results. cuBLAS kernels cannot join such a
chain. The other decode kernels (add_rmsnorm_, ssd_step_gated_) take the same `USE_PDL` switch.

Rules every PDL kernel here keeps: `gdc_launch_dependents` first (the next kernel may then start
its own weight loads); before `gdc_wait`, read only what the previous launch cannot have written
(weights) and write nothing.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def pdl_enabled(device_index: int = 0) -> bool:
    """PDL needs sm_90+; MAMBA_DEPLOY_PDL=0 turns it off (for A/B measurements)."""
    if os.environ.get("MAMBA_DEPLOY_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


@functools.lru_cache(maxsize=1)
def _gemv_on() -> bool:
    """MAMBA_DEPLOY_GEMV=0 routes every linear to cuBLAS (for A/B measurements)."""
    return os.environ.get("MAMBA_DEPLOY_GEMV", "1") != "0"


def pdl_kwargs(device: torch.device) -> dict:
    """Launch kwargs for a kernel with a USE_PDL constexpr."""
    on = pdl_enabled(device.index if device.index is not None else torch.cuda.current_device())
    return dict(USE_PDL=on, launch_pdl=on)


@triton.jit
def _gemv_kernel(X, W, Bias, Y, N, K, swn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    # one program: BLOCK_N output features, streaming its (BLOCK_N, K) weight slab
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    w_ptrs = W + rn[:, None] * swn + rk[None, :]  # (BN, BK)
    w = tl.load(w_ptrs, mask=nmask[:, None] & (rk[None, :] < K), other=0.0)  # constant: before the wait
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(X + kk, mask=kk < K, other=0.0).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        w = tl.load(w_ptrs + (k0 + BLOCK_K), mask=nmask[:, None] & ((kk + BLOCK_K)[None, :] < K), other=0.0)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(Y + rn, acc.to(Y.dtype.element_ty), mask=nmask)


def pick_config(n: int, k: int) -> dict:
    """Launch configuration by shape, from the sweep in benchmarks/gpu_gemv.py on an H200 (bf16,
    mamba2 130m / 1.3b / 2.7b projections): 4 weight rows per program in 1024-wide tiles (many
    small programs keep the most loads in flight), 8 warps once rows are long."""
    return dict(BLOCK_N=4, BLOCK_K=1024, num_warps=8 if k >= 4096 else 4)


def gemv(x, weight, bias=None, config: dict | None = None, pdl: bool | None = None):
    """x (..., K) with one row, weight (N, K) with unit last stride -> (..., N) in x's dtype."""
    *pre, k = x.shape
    n = weight.shape[0]
    if x.numel() != k:
        raise ValueError(f"gemv takes one row of x, got shape {tuple(x.shape)}; use F.linear")
    x1 = x.reshape(k).contiguous()
    y = torch.empty(n, device=x.device, dtype=x.dtype)
    cfg = dict(config or pick_config(n, k))
    launch = pdl_kwargs(x.device) if pdl is None else dict(USE_PDL=pdl, launch_pdl=pdl)
    _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](x1, weight, bias if bias is not None else weight, y, n, k,
                                                   weight.stride(0), HAS_BIAS=bias is not None, **cfg, **launch)
    return y.reshape(*pre, n)


def linear(x, weight, bias=None):
    """Same contract as F.linear: the GEMV for one row (batch-1 decode), cuBLAS otherwise (with 4 or
    16 rows a tensor-core tile variant measured 1.5x slower than cuBLAS, so there is none)."""
    if (_gemv_on() and x.shape[-1] and x.numel() == x.shape[-1] and weight.dim() == 2 and weight.stride(-1) == 1
            and x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.is_cuda
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)
