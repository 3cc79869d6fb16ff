"""Triton single-token (decode) kernels: Mamba1/Mamba2 state updates and the fused Mamba2 step.

Twins of `reference.selective_state_update_ref`, `ssd_state_update_ref` and `ssd_step_ref`.
Decode is memory-bound: the float32 state is read and written once per token, so each program
owns a tile of it, updates it in registers and writes it back IN PLACE (fast-path contract: the
returned state is the input tensor; the model's copy back into the same storage is skipped).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    # log(1 + e^x), linear above 20 like torch.nn.functional.softplus
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


# ----------------------------------------------------------------------------- Mamba1

@triton.jit
def _sel_update_kernel(X, DT, A, Bm, Cm, Dp, Z, DTB, H, Y, Dn, N,
                       sxb, sdtb, sbb, scb, szb, shb, shd, syb,
                       HAS_Z: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dm, nm = d < Dn, n < N
    m2 = dm[:, None] & nm[None, :]
    x = tl.load(X + b * sxb + d, mask=dm, other=0.0).to(tl.float32)
    dt = tl.load(DT + b * sdtb + d, mask=dm, other=0.0).to(tl.float32)
    dt = _softplus(dt + tl.load(DTB + d, mask=dm, other=0.0).to(tl.float32))
    a = tl.load(A + d[:, None] * N + n[None, :], mask=m2, other=0.0).to(tl.float32)
    Bv = tl.load(Bm + b * sbb + n, mask=nm, other=0.0).to(tl.float32)
    Cv = tl.load(Cm + b * scb + n, mask=nm, other=0.0).to(tl.float32)
    hp = H + b * shb + d[:, None] * shd + n[None, :]
    h = tl.load(hp, mask=m2, other=0.0)
    h = h * tl.exp(dt[:, None] * a) + (dt * x)[:, None] * Bv[None, :]
    tl.store(hp, h, mask=m2)
    y = tl.sum(h * Cv[None, :], axis=1) + x * tl.load(Dp + d, mask=dm, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(Z + b * szb + d, mask=dm, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(Y + b * syb + d, y.to(Y.dtype.element_ty), mask=dm)


def selective_state_update(x, dt, A, B, C, D, z, dt_bias, h):
    """x, dt, z (b, d); A (d, n); B, C (b, n); h (b, d, n) float32, updated in place."""
    b, dn = x.shape
    n = A.shape[1]
    if h.dtype != torch.float32 or h.stride(-1) != 1:
        raise ValueError("the Triton selective_state_update needs a float32 state with unit last stride")
    y = torch.empty_like(x)
    BN = triton.next_power_of_2(n)
    BD = max(1, min(64, 2048 // BN))
    xs, dts = x.contiguous(), dt.contiguous()
    Bc, Cc, Ac = B.contiguous(), C.contiguous(), A.contiguous()
    zc = z.contiguous() if z is not None else xs
    _sel_update_kernel[(b, triton.cdiv(dn, BD))](
        xs, dts, Ac, Bc, Cc, D, zc, dt_bias, h, y, dn, n,
        xs.stride(0), dts.stride(0), Bc.stride(0), Cc.stride(0), zc.stride(0), h.stride(0), h.stride(1),
        y.stride(0), HAS_Z=z is not None, BLOCK_D=BD, BLOCK_N=BN, num_warps=4)
    return y, h


# ----------------------------------------------------------------------------- Mamba2

@triton.jit
def _ssd_update_kernel(X, DT, A, Bm, Cm, Dp, DTB, H, Y, nheads, P, N, heads_per_group,
                       sxb, sxh, sdtb, sbb, sbg, scb, scg, shb, shh, shp, syb, syh,
                       dt_lo, dt_hi, CLAMP: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    hd = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    pm, nm = p < P, n < N
    g = hd // heads_per_group
    dt = tl.load(DT + b * sdtb + hd).to(tl.float32) + tl.load(DTB + hd).to(tl.float32)
    dt = _softplus(dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    decay = tl.exp(dt * tl.load(A + hd).to(tl.float32))
    x = tl.load(X + b * sxb + hd * sxh + p, mask=pm, other=0.0).to(tl.float32)
    Bv = tl.load(Bm + b * sbb + g * sbg + n, mask=nm, other=0.0).to(tl.float32)
    Cv = tl.load(Cm + b * scb + g * scg + n, mask=nm, other=0.0).to(tl.float32)
    hp = H + b * shb + hd * shh + p[:, None] * shp + n[None, :]
    m2 = pm[:, None] & nm[None, :]
    h = tl.load(hp, mask=m2, other=0.0)
    h = h * decay + (x * dt)[:, None] * Bv[None, :]
    tl.store(hp, h, mask=m2)
    y = tl.sum(h * Cv[None, :], axis=1) + x * tl.load(Dp + hd).to(tl.float32)
    tl.store(Y + b * syb + hd * syh + p, y.to(Y.dtype.element_ty), mask=pm)


def _launch_ssd_update(x, dt, A, B, C, D, dt_bias, h, dt_limit, y):
    """x (b, h, p) any strides with unit last; B, C (b, g, n) unit last stride; h in place."""
    b, nh, p = x.shape
    g, n = B.shape[1], B.shape[2]
    if h.dtype != torch.float32 or h.stride(-1) != 1:
        raise ValueError("the Triton SSD state update needs a float32 state with unit last stride")
    BN = triton.next_power_of_2(n)
    BP = max(1, min(triton.next_power_of_2(p), 4096 // BN))
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    clamp = lo > 0.0 or hi != math.inf
    _ssd_update_kernel[(b, nh, triton.cdiv(p, BP))](
        x, dt, A, B, C, D, dt_bias, h, y, nh, p, n, nh // g,
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        h.stride(0), h.stride(1), h.stride(2), y.stride(0), y.stride(1),
        lo, hi if hi != math.inf else 3.0e38, CLAMP=clamp, BLOCK_P=BP, BLOCK_N=BN, num_warps=4)
    return y, h


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def ssd_state_update(x, dt, A, B, C, D, dt_bias, h, dt_limit=(0.0, math.inf)):
    """x (b, h, p); dt (b, h); B, C (b, g, n); h (b, h, p, n) float32, updated in place."""
    x, dt, B, C = _unit_last(x), _unit_last(dt), _unit_last(B), _unit_last(C)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    return _launch_ssd_update(x, dt, A, B, C, D, dt_bias, h, dt_limit, y)


def ssd_step(xBC, dt, conv_weight, conv_bias, conv_state, A, D, dt_bias, h, dt_limit=(0.0, math.inf)):
    """Fused Mamba2 decode step: causal conv update of x, B, C, then the SSD state update.

    xBC (b, conv_dim) pre-conv; dt (b, h) raw; conv_weight (conv_dim, k); conv_state
    (b, conv_dim, k-1) and h (b, h, p, n) float32 are updated in place.
    Returns y (b, h, p) (with the D skip, without the gate), conv_state, h.

    Two launches: the conv over all channels (each program owns its channels, so the in-place
    window shift is race-free), then the state update reading the conv output. Folding the conv
    into the state-update programs would make several heads read B, C's window while one of
    them shifts it.
    """
    from .triton_conv import causal_conv1d_update

    b = xBC.shape[0]
    nh, p, n = h.shape[1], h.shape[2], h.shape[3]
    d = nh * p
    g = (xBC.shape[1] - d) // (2 * n)
    xbc, conv_state = causal_conv1d_update(xBC, conv_weight, conv_bias, conv_state, True)  # (b, conv_dim)
    x = xbc[:, :d].view(b, nh, p)
    B = xbc[:, d:d + g * n].view(b, g, n)
    C = xbc[:, d + g * n:].view(b, g, n)
    y = torch.empty((b, nh, p), device=xBC.device, dtype=xBC.dtype)
    _launch_ssd_update(x, _unit_last(dt), A, B, C, D, dt_bias, h, dt_limit, y)
    return y, conv_state, h
