"""Triton RMSNorm kernels: plain, gated group-wise (Mamba2), and residual-add + norm (decode).

Twins of `reference.rmsnorm_ref` / `reference.rmsnorm_gated_ref`. One program per row (or per
row and group): a row is at most a few thousand channels, so it fits in one block and the
statistics need no second pass. Statistics are float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gemv import l2_prefetch, pdl_kwargs, prefetch_args

PREFETCH_PROGRAMS = 128  # programs per row of add_rmsnorm_ when it prefetches (one per SM or so)


@triton.jit
def _rmsnorm_kernel(X, W, Y, stride_x, stride_y, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    # the reference rounds the normalised x to the input dtype before the weight multiply
    xn = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xn * w).to(Y.dtype.element_ty), mask=mask)


def rmsnorm(x, weight, eps):
    """x (..., d) -> weight * norm(x); same contract as rmsnorm_ref."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x2.shape, device=x.device, dtype=out_dtype)
    if x2.shape[0]:
        block = triton.next_power_of_2(d)
        _rmsnorm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), d, eps,
                                        BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return y.reshape(x.shape)


@triton.jit
def _rmsnorm_gated_kernel(X, Z, W, Y, stride_x, stride_z, stride_y, G, eps,
                          NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    grp = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < G
    off = grp * G + cols
    x = tl.load(X + row * stride_x + off, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(Z + row * stride_z + off, mask=mask, other=0.0).to(tl.float32)
    gate = z * tl.sigmoid(z)  # silu(z)
    if not NORM_BEFORE_GATE:
        x = x * gate
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / G + eps)
    w = tl.load(W + off, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * w
    if NORM_BEFORE_GATE:
        y = y * gate
    tl.store(Y + row * stride_y + off, y.to(Y.dtype.element_ty), mask=mask)


def rmsnorm_gated(x, z, weight, eps, group_size, norm_before_gate=False):
    """x, z (..., d); groups of `group_size` channels; same contract as rmsnorm_gated_ref."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    z2 = z.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    if x2.shape[0]:
        block = triton.next_power_of_2(group_size)
        grid = (x2.shape[0], d // group_size)
        _rmsnorm_gated_kernel[grid](x2, z2, weight, y, x2.stride(0), z2.stride(0), y.stride(0),
                                    group_size, eps, NORM_BEFORE_GATE=bool(norm_before_gate),
                                    BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return y.reshape(x.shape)


@triton.jit
def _add_rmsnorm_kernel(Y, R, W, X, SS, PF, stride_y, stride_r, stride_x, D, eps, scale_n, scale_eps, PF_LINES,
                        HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
                        PF_PER_PROG: tl.constexpr):
    if USE_PDL:  # see triton_gemv: a decode-chain kernel
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    # the next GEMV's weights, spread over the extra programs along axis 1 (one SM alone issues
    # prefetches too slowly), which then exit
    l2_prefetch(PF, PF_LINES, row * tl.num_programs(1) + tl.program_id(1), tl.num_programs(0) * tl.num_programs(1),
                PF_PER_PROG)
    if tl.program_id(1) == 0:
        _add_rmsnorm_row(Y, R, W, X, SS, stride_y, stride_r, stride_x, D, eps, scale_n, scale_eps, row,
                         HAS_SCALE, BLOCK, USE_PDL)


@triton.jit
def _add_rmsnorm_row(Y, R, W, X, SS, stride_y, stride_r, stride_x, D, eps, scale_n, scale_eps, row,
                     HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # constant: before the wait
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        # y was computed from an un-normalised gated-norm input (ssd_step_gated_): apply the
        # row's 1/rms now, then zero the sum of squares for the next layer
        ss = tl.load(SS + row)
        y = (y * tl.rsqrt(ss / scale_n + scale_eps)).to(Y.dtype.element_ty).to(tl.float32)
        tl.store(SS + row, 0.0)
    r = r + y
    tl.store(R + row * stride_r + cols, r.to(R.dtype.element_ty), mask=mask)
    # Block._pre: norm(h.to(weight dtype)); round like the unfused path does
    r = r.to(R.dtype.element_ty).to(X.dtype.element_ty).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(r * r, axis=0) / D + eps)
    xn = (r * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(X + row * stride_x + cols, (xn * w).to(X.dtype.element_ty), mask=mask)


def add_rmsnorm_warps(block: int) -> int:
    """Warps of the decode add+norm kernel (swept in benchmarks/gpu_decode_sweep.py)."""
    return min(16, max(1, block // 256))


def add_rmsnorm_(y, residual, weight, eps, out=None, sumsq=None, scale_n=1, scale_eps=0.0, prefetch=(None, 0)):
    """residual += y (in place, residual's dtype); returns rmsnorm(residual.to(weight.dtype)).

    y (b, d) or None (then only the norm); residual (b, d) contiguous. Used by the graph-captured
    decode to fuse the residual add of one layer with the pre-norm of the next.
    sumsq (b,) float32: y is first scaled by rsqrt(sumsq / scale_n + scale_eps) per row, and
    sumsq is zeroed (see triton_step.ssd_step_gated_).
    prefetch (weight, nbytes): bring the first nbytes of the next GEMV's weight into L2 (decode).
    """
    b, d = residual.shape
    if out is None:
        out = torch.empty((b, d), device=residual.device, dtype=weight.dtype)
    yy = torch.zeros_like(residual) if y is None else y
    block = triton.next_power_of_2(d)
    warps = add_rmsnorm_warps(block)
    pf, pf_lines, pf_per = prefetch_args(*prefetch, nprog=b * PREFETCH_PROGRAMS, num_warps=warps, fallback=residual)
    _add_rmsnorm_kernel[(b, PREFETCH_PROGRAMS if pf_lines else 1)](
        yy, residual, weight, out, sumsq if sumsq is not None else residual, pf, yy.stride(0), residual.stride(0),
        out.stride(0), d, eps, float(scale_n), float(scale_eps), pf_lines, HAS_SCALE=sumsq is not None, BLOCK=block,
        num_warps=warps, PF_PER_PROG=pf_per, **pdl_kwargs(residual.device))
    return out
