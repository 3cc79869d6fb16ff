"""Triton Mamba1 selective scan, parallel over time by chunks.

Twin of `reference.selective_scan_ref`, same signature. The recurrence h_t = a_t h_{t-1} + u_t is
linear, so time is cut into chunks of T steps that run in parallel:
  1. _scan_chunk (from zero)   each chunk's final state and its summed dt (the chunk's decay is
                               exp(A * sum dt), per channel and state)
  2. _scan_pass                sequential over chunks only: the state at each chunk start, from h0
  3. _scan_chunk (from starts) re-run each chunk from its true start state and write y
Step 3 repeats step 1's work instead of storing (b, l, d, n) intermediates: the scan is cheap
arithmetic on a (BLOCK_D, n) register tile, while the intermediates would be n times the size of x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_step import softplus


@triton.jit
def _scan_chunk_kernel(X, DT, A, Bm, Cm, Dp, Z, DTB, HIN, HOUT, SDT, Y, L, Dn, N, nchunks,
                       sxb, sxl, sdb, sdl, sbb, sbl, scb, scl, szb, szl, syb, syl,
                       T: tl.constexpr, FROM_START: tl.constexpr, HAS_Z: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c = tl.program_id(2)
    n = tl.arange(0, BLOCK_N)
    dm, nm = d < Dn, n < N
    m2 = dm[:, None] & nm[None, :]
    a = tl.load(A + d[:, None] * N + n[None, :], mask=m2, other=0.0).to(tl.float32)
    dtb = tl.load(DTB + d, mask=dm, other=0.0).to(tl.float32)
    hoff = ((b * nchunks + c) * Dn + d[:, None]) * N + n[None, :]  # (b, c, d, n)
    if FROM_START:
        h = tl.load(HIN + hoff, mask=m2, other=0.0)
        dskip = tl.load(Dp + d, mask=dm, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    sdt = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t0 = c * T
    for i in range(0, T):
        t = t0 + i
        ok = t < L  # past the end: dt = 0, so the state is unchanged
        x = tl.load(X + b * sxb + t * sxl + d, mask=dm & ok, other=0.0).to(tl.float32)
        dt = softplus(tl.load(DT + b * sdb + t * sdl + d, mask=dm & ok, other=0.0).to(tl.float32) + dtb)
        dt = tl.where(ok, dt, 0.0)
        Bv = tl.load(Bm + b * sbb + t * sbl + n, mask=nm & ok, other=0.0).to(tl.float32)
        h = h * tl.exp(dt[:, None] * a) + (dt * x)[:, None] * Bv[None, :]
        if FROM_START:
            Cv = tl.load(Cm + b * scb + t * scl + n, mask=nm & ok, other=0.0).to(tl.float32)
            y = tl.sum(h * Cv[None, :], axis=1) + x * dskip
            if HAS_Z:
                z = tl.load(Z + b * szb + t * szl + d, mask=dm & ok, other=0.0).to(tl.float32)
                y = y * z * tl.sigmoid(z)
            tl.store(Y + b * syb + t * syl + d, y.to(Y.dtype.element_ty), mask=dm & ok)
        else:
            sdt += dt
    if not FROM_START:
        tl.store(HOUT + hoff, h, mask=m2)
        tl.store(SDT + (b * nchunks + c) * Dn + d, sdt, mask=dm)


@triton.jit
def _scan_pass_kernel(HEND, SDT, A, H0, HS, HL, Dn, N, nchunks, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dm, nm = d < Dn, n < N
    m2 = dm[:, None] & nm[None, :]
    a = tl.load(A + d[:, None] * N + n[None, :], mask=m2, other=0.0).to(tl.float32)
    h = tl.load(H0 + (b * Dn + d[:, None]) * N + n[None, :], mask=m2, other=0.0).to(tl.float32)
    for c in range(nchunks):
        hoff = ((b * nchunks + c) * Dn + d[:, None]) * N + n[None, :]
        tl.store(HS + hoff, h, mask=m2)
        sdt = tl.load(SDT + (b * nchunks + c) * Dn + d, mask=dm, other=0.0)
        h = h * tl.exp(sdt[:, None] * a) + tl.load(HEND + hoff, mask=m2, other=0.0)
    tl.store(HL + (b * Dn + d[:, None]) * N + n[None, :], h, mask=m2)


def selective_scan(x, dt, A, B, C, D, z, dt_bias, h0, chunk_size=64):
    """x, dt, z (b, l, d); A (d, n); B, C (b, l, n); D, dt_bias (d,); h0 (b, d, n).
    Returns y (b, l, d) and h_last (b, d, n) float32."""
    b, l, dn = x.shape
    n = A.shape[1]
    T = int(chunk_size)
    nchunks = max(1, triton.cdiv(l, T))
    dev = x.device
    x, dt, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, dt, B, C))
    zz = x if z is None else (z if z.stride(-1) == 1 else z.contiguous())
    Af = A.float().contiguous()
    BN = triton.next_power_of_2(n)
    BD = max(1, min(64, 1024 // BN))
    hend = torch.empty((b, nchunks, dn, n), device=dev, dtype=torch.float32)
    hs = torch.empty_like(hend)
    sdt = torch.empty((b, nchunks, dn), device=dev, dtype=torch.float32)
    h_last = torch.empty((b, dn, n), device=dev, dtype=torch.float32)
    y = torch.empty((b, l, dn), device=dev, dtype=x.dtype)
    strides = (x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), B.stride(0), B.stride(1),
               C.stride(0), C.stride(1), zz.stride(0), zz.stride(1), y.stride(0), y.stride(1))
    grid = (b, triton.cdiv(dn, BD), nchunks)
    common = dict(T=T, HAS_Z=z is not None, BLOCK_D=BD, BLOCK_N=BN, num_warps=4)
    _scan_chunk_kernel[grid](x, dt, Af, B, C, D, zz, dt_bias, hs, hend, sdt, y, l, dn, n, nchunks,
                             *strides, FROM_START=False, **common)
    _scan_pass_kernel[(b, triton.cdiv(dn, BD))](hend, sdt, Af, h0.contiguous(), hs, h_last, dn, n, nchunks,
                                                BLOCK_D=BD, BLOCK_N=BN, num_warps=4)
    _scan_chunk_kernel[grid](x, dt, Af, B, C, D, zz, dt_bias, hs, hend, sdt, y, l, dn, n, nchunks,
                             *strides, FROM_START=True, **common)
    return y, h_last
