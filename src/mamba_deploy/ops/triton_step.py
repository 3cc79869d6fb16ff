"""Triton single-token (decode) kernels: Mamba1/Mamba2 state updates and the fused Mamba2 step.

Twins of `reference.selective_state_update_ref`, `ssd_state_update_ref` and `ssd_step_ref`.
Decode is memory-bound: the state (float32 by default, or 16-bit: see MambaLM.set_state_dtype)
is read and written once per token, so each program owns a tile of it, updates it in float32
registers and writes it back IN PLACE (fast-path contract: the
returned state is the input tensor; the model's copy back into the same storage is skipped).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_gemv import l2_prefetch, pdl_kwargs, prefetch_args
from .triton_taps import _shift_store, _window

STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_state(h, what: str) -> None:
    """The decode kernels update the SSM state in place: float32, or a 16-bit state (each update
    computed in float32, the stored state rounded once)."""
    if h.dtype not in STATE_DTYPES or h.stride(-1) != 1:
        raise ValueError(f"the Triton {what} needs a float32 / bfloat16 / float16 state with unit last stride, "
                         f"got {h.dtype} with strides {tuple(h.stride())}")


@triton.jit
def softplus(x):
    # log(1 + e^x), linear above 20 like torch.nn.functional.softplus; shared by the scan and SSD kernels
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


# ----------------------------------------------------------------------------- Mamba1

@triton.jit
def _sel_update_kernel(X, DT, A, Bm, Cm, Dp, Z, DTB, H, Y, WDT, Dn, N, R,
                       sxb, sdtb, sbb, scb, szb, shb, shd, syb,
                       HAS_Z: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       FUSE_DT: tl.constexpr, BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr,
                       STATE_EARLY: tl.constexpr):
    # FUSE_DT: DT is dt_proj's input (b, R) and WDT its weight (Dn, R): each program forms the dt
    # of its own channels (a BLOCK_D x R slice of the GEMV), one launch fewer per decode layer
    if USE_PDL:  # see triton_gemv; STATE_EARLY as in _ssd_step_gated_kernel
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dm, nm = d < Dn, n < N
    m2 = dm[:, None] & nm[None, :]
    a = tl.load(A + d[:, None] * N + n[None, :], mask=m2, other=0.0).to(tl.float32)
    dtb = tl.load(DTB + d, mask=dm, other=0.0).to(tl.float32)
    dsk = tl.load(Dp + d, mask=dm, other=0.0).to(tl.float32)
    if FUSE_DT:
        r = tl.arange(0, BLOCK_R)
        wdt = tl.load(WDT + d[:, None] * R + r[None, :], mask=dm[:, None] & (r < R)[None, :], other=0.0)
    hp = H + b * shb + d[:, None] * shd + n[None, :]
    if STATE_EARLY:
        h = tl.load(hp, mask=m2, other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    if not STATE_EARLY:
        h = tl.load(hp, mask=m2, other=0.0).to(tl.float32)
    x = tl.load(X + b * sxb + d, mask=dm, other=0.0).to(tl.float32)
    if FUSE_DT:
        dtl = tl.load(DT + b * sdtb + r, mask=r < R, other=0.0).to(tl.float32)
        # rounded like dt_proj's output in the unfused path
        dt = tl.sum(wdt.to(tl.float32) * dtl[None, :], axis=1).to(X.dtype.element_ty).to(tl.float32)
    else:
        dt = tl.load(DT + b * sdtb + d, mask=dm, other=0.0).to(tl.float32)
    dt = softplus(dt + dtb)
    Bv = tl.load(Bm + b * sbb + n, mask=nm, other=0.0).to(tl.float32)
    Cv = tl.load(Cm + b * scb + n, mask=nm, other=0.0).to(tl.float32)
    h = h * tl.exp(dt[:, None] * a) + (dt * x)[:, None] * Bv[None, :]
    tl.store(hp, h.to(H.dtype.element_ty), mask=m2)
    y = tl.sum(h * Cv[None, :], axis=1) + x * dsk
    if HAS_Z:
        z = tl.load(Z + b * szb + d, mask=dm, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(Y + b * syb + d, y.to(Y.dtype.element_ty), mask=dm)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_sel_update(x, dt, A, B, C, D, z, dt_bias, h, dt_weight=None, state_early=False):
    """x, z (b, d); dt (b, d), or dt_proj's input (b, r) with dt_weight (d, r); h in place."""
    b, dn = x.shape
    n = A.shape[1]
    _check_state(h, "selective_state_update")
    y = torch.empty_like(x)
    BN = triton.next_power_of_2(n)
    fuse = dt_weight is not None
    BR = triton.next_power_of_2(dt_weight.shape[1]) if fuse else 1
    # fused: the dt_proj slice (BLOCK_D, BR) shares the program's registers with the state tile
    BD = max(1, min(64, 2048 // BN, 4096 // BR if fuse else 64))
    if fuse and (dt_weight.shape != (dn, dt.shape[1]) or dt.shape[0] != b):
        raise ValueError(f"dt_proj weight {tuple(dt_weight.shape)} does not match x {tuple(x.shape)} and "
                         f"dt_proj's input {tuple(dt.shape)}: want ({dn}, r) and ({b}, r)")
    # rows may be strided (slices of the projections' outputs): only the last axis must be unit
    xs, dts, Bc, Cc = _unit_last(x), _unit_last(dt), _unit_last(B), _unit_last(C)
    Ac = A.contiguous()
    zc = _unit_last(z) if z is not None else xs
    wdt = dt_weight.contiguous() if fuse else xs
    launch = pdl_kwargs(h.device) if fuse else dict(USE_PDL=False)
    _sel_update_kernel[(b, triton.cdiv(dn, BD))](
        xs, dts, Ac, Bc, Cc, D, zc, dt_bias, h, y, wdt, dn, n, dt_weight.shape[1] if fuse else 1,
        xs.stride(0), dts.stride(0), Bc.stride(0), Cc.stride(0), zc.stride(0), h.stride(0), h.stride(1),
        y.stride(0), HAS_Z=z is not None, BLOCK_D=BD, BLOCK_N=BN, FUSE_DT=fuse, BLOCK_R=BR,
        STATE_EARLY=bool(state_early), num_warps=4, **launch)
    return y, h


def selective_state_update(x, dt, A, B, C, D, z, dt_bias, h):
    """x, dt, z (b, d); A (d, n); B, C (b, n); h (b, d, n) float32, updated in place."""
    return _launch_sel_update(x, dt, A, B, C, D, z, dt_bias, h)


def selective_state_update_dt(x, dt_in, dt_weight, A, B, C, D, z, dt_bias, h, state_early=False):
    """selective_state_update with dt_proj folded in: dt = dt_in @ dt_weight^T (rounded to x's
    dtype, as the unfused linear outputs it). dt_in (b, r), dt_weight (d, r); the rest as there.
    state_early (graph decode): h may be read before the PDL wait (see ssd_step_gated_)."""
    return _launch_sel_update(x, dt_in, A, B, C, D, z, dt_bias, h, dt_weight=dt_weight, state_early=state_early)


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
    dt = softplus(dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    decay = tl.exp(dt * tl.load(A + hd).to(tl.float32))
    x = tl.load(X + b * sxb + hd * sxh + p, mask=pm, other=0.0).to(tl.float32)
    Bv = tl.load(Bm + b * sbb + g * sbg + n, mask=nm, other=0.0).to(tl.float32)
    Cv = tl.load(Cm + b * scb + g * scg + n, mask=nm, other=0.0).to(tl.float32)
    hp = H + b * shb + hd * shh + p[:, None] * shp + n[None, :]
    m2 = pm[:, None] & nm[None, :]
    h = tl.load(hp, mask=m2, other=0.0).to(tl.float32)
    h = h * decay + (x * dt)[:, None] * Bv[None, :]
    tl.store(hp, h.to(H.dtype.element_ty), mask=m2)
    y = tl.sum(h * Cv[None, :], axis=1) + x * tl.load(Dp + hd).to(tl.float32)
    tl.store(Y + b * syb + hd * syh + p, y.to(Y.dtype.element_ty), mask=pm)


def _launch_ssd_update(x, dt, A, B, C, D, dt_bias, h, dt_limit, y):
    """x (b, h, p) any strides with unit last; B, C (b, g, n) unit last stride; h in place."""
    b, nh, p = x.shape
    g, n = B.shape[1], B.shape[2]
    _check_state(h, "SSD state update")
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


# ----------------------------------------------------------------------------- fused decode layer

@triton.jit
def _windows(sbase, cx, cB, cC, pm, nm, scsc, scsk, CW, CBias, K: tl.constexpr, HAS_BIAS: tl.constexpr,
             BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The conv windows of the x, B and C channels: taps 1.. (kept for the shift) and the partial
    conv sums (taps . weights[:K-1] + bias). Every tap is read into registers before any is
    written: the 1-D tiles are replicated across threads, so a read-shift-write loop could let one
    thread's write overtake a replica's read of the same tap."""
    _, x1, x2, ax = _window(sbase, cx, pm, scsc, scsk, CW, K, tl.zeros((BLOCK_P,), dtype=tl.float32))
    _, b1, b2, aB = _window(sbase, cB, nm, scsc, scsk, CW, K, tl.zeros((BLOCK_N,), dtype=tl.float32))
    _, c1, c2, aC = _window(sbase, cC, nm, scsc, scsk, CW, K, tl.zeros((BLOCK_N,), dtype=tl.float32))
    if HAS_BIAS:
        ax += tl.load(CBias + cx, mask=pm, other=0.0).to(tl.float32)
        aB += tl.load(CBias + cB, mask=nm, other=0.0).to(tl.float32)
        aC += tl.load(CBias + cC, mask=nm, other=0.0).to(tl.float32)
    return x1, x2, ax, b1, b2, aB, c1, c2, aC


@triton.jit
def _ssd_step_gated_kernel(XBC, DT, Z, CW, CBias, CS, A, Dp, DTB, H, NW, U, SS, CNT, PF,
                           P, N, G, d_inner, heads_per_group, PF_LINES,
                           sxb, sdtb, szb, scsb, scsc, scsk, shb, shh, shp, sub,
                           dt_lo, dt_hi, CLAMP: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                           NORM_BEFORE_GATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                           USE_PDL: tl.constexpr, STATE_EARLY: tl.constexpr, PF_PER_PROG: tl.constexpr):
    # Longer than the other kernels on purpose: the conv, state update, gate and norm statistics
    # share registers in one launch (the whole mixer of a decode step; a launch costs ~2 us).
    b = tl.program_id(0)
    hd = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    pm, nm = p < P, n < N
    g = hd // heads_per_group
    cx = hd * P + p
    cB = d_inner + g * N + n
    cC = d_inner + G * N + g * N + n
    # -- first what the previous kernel (in_proj) does not write, so that under PDL these loads
    # overlap its tail: weights, and with STATE_EARLY the conv windows and the SSM state. Every
    # PDL kernel here triggers its dependents at its start, so a kernel may run alongside any
    # PDL launch back to the last ordinary one: the caller sets STATE_EARLY only when nothing
    # since the last ordinary launch wrote the state (graph decode: the previous token's step
    # wrote it, then the step's embedding lookup, an ordinary launch, waited for all of that).
    if USE_PDL:  # see triton_gemv
        tl.extra.cuda.gdc_launch_dependents()
    pid = (b * tl.num_programs(1) + hd) * tl.num_programs(2) + tl.program_id(2)
    l2_prefetch(PF, PF_LINES, pid, tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2),
                PF_PER_PROG)  # out_proj's weights
    a_h = tl.load(A + hd).to(tl.float32)
    d_h = tl.load(Dp + hd).to(tl.float32)
    dtb = tl.load(DTB + hd).to(tl.float32)
    w = tl.load(NW + cx, mask=pm, other=0.0).to(tl.float32)
    sbase = CS + b * scsb
    hp = H + b * shb + hd * shh + p[:, None] * shp + n[None, :]
    m2 = pm[:, None] & nm[None, :]
    if STATE_EARLY:
        x1, x2, ax, b1, b2, aB, c1, c2, aC = _windows(sbase, cx, cB, cC, pm, nm, scsc, scsk, CW, CBias, K, HAS_BIAS,
                                                      BLOCK_P, BLOCK_N)
        h = tl.load(hp, mask=m2, other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    if not STATE_EARLY:
        x1, x2, ax, b1, b2, aB, c1, c2, aC = _windows(sbase, cx, cB, cC, pm, nm, scsc, scsk, CW, CBias, K, HAS_BIAS,
                                                      BLOCK_P, BLOCK_N)
        h = tl.load(hp, mask=m2, other=0.0).to(tl.float32)
    # -- conv of this program's x channels (owned: shifted in place) and of its group's B, C
    xin = tl.load(XBC + b * sxb + cx, mask=pm, other=0.0).to(tl.float32)
    bin_ = tl.load(XBC + b * sxb + cB, mask=nm, other=0.0).to(tl.float32)
    cin = tl.load(XBC + b * sxb + cC, mask=nm, other=0.0).to(tl.float32)
    dt = tl.load(DT + b * sdtb + hd).to(tl.float32)
    z = tl.load(Z + b * szb + cx, mask=pm, other=0.0).to(tl.float32)
    ax += xin * tl.load(CW + cx * K + (K - 1), mask=pm, other=0.0).to(tl.float32)
    aB += bin_ * tl.load(CW + cB * K + (K - 1), mask=nm, other=0.0).to(tl.float32)
    aC += cin * tl.load(CW + cC * K + (K - 1), mask=nm, other=0.0).to(tl.float32)
    # -- B, C conv windows are shared by the group's programs: the last of them to have read the
    # window shifts it. The barrier completes every warp's reads before the counter moves (a
    # release by one thread orders only that thread's accesses).
    tl.debug_barrier()
    _shift_store(sbase, cx, pm, scsc, scsk, x1, x2, xin.to(CS.dtype.element_ty), K)
    total = heads_per_group * tl.num_programs(2)
    cnt = tl.atomic_add(CNT + b * G + g, 1, sem="acq_rel")
    last = cnt == total - 1
    _shift_store(sbase, cB, nm & last, scsc, scsk, b1, b2, bin_.to(CS.dtype.element_ty), K)
    _shift_store(sbase, cC, nm & last, scsc, scsk, c1, c2, cin.to(CS.dtype.element_ty), K)
    tl.store(CNT + b * G + g, 0, mask=last)
    # round like the unfused path, whose conv output is stored in the model dtype
    x = (ax * tl.sigmoid(ax)).to(XBC.dtype.element_ty).to(tl.float32)
    Bv = (aB * tl.sigmoid(aB)).to(XBC.dtype.element_ty).to(tl.float32)
    Cv = (aC * tl.sigmoid(aC)).to(XBC.dtype.element_ty).to(tl.float32)
    # -- SSD state update
    dt = softplus(dt + dtb)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    h = h * tl.exp(dt * a_h) + (x * dt)[:, None] * Bv[None, :]
    tl.store(hp, h.to(H.dtype.element_ty), mask=m2)
    y = tl.sum(h * Cv[None, :], axis=1) + x * d_h
    y = y.to(U.dtype.element_ty).to(tl.float32)
    # -- gate and the weighted, un-normalised norm input; the 1/rms factor is a per-row scalar,
    # so it is applied after out_proj (by add_rmsnorm_), from the sum of squares gathered here
    gate = z * tl.sigmoid(z)
    if NORM_BEFORE_GATE:
        sq = tl.sum(y * y, axis=0)
        u = y * w * gate
    else:
        y = y * gate
        sq = tl.sum(y * y, axis=0)
        u = y * w
    tl.store(U + b * sub + cx, u.to(U.dtype.element_ty), mask=pm)
    # relaxed: the consumer is the next kernel launch; a release here would wait for the stores
    tl.atomic_add(SS + b, sq, sem="relaxed")


def step_config(nheads: int, headdim: int, block_n: int) -> dict:
    """Tile of the fused decode mixer: BLOCK_P rows of headdim per program (each program holds a
    (BLOCK_P, d_state) float32 state tile). Swept in benchmarks/gpu_decode_sweep.py."""
    return dict(BLOCK_P=max(1, min(triton.next_power_of_2(headdim), 4096 // block_n)), num_warps=4)


def ssd_step_gated_(xBC, dt, z, conv_weight, conv_bias, conv_state, A, D, dt_bias, h, norm_weight,
                    dt_limit, norm_before_gate, out, sumsq, counter, state_early=False, prefetch=(None, 0)):
    """One Mamba2 mixer decode step up to out_proj's input, in one launch (ngroups == 1).

    Writes out (b, d_inner) = gate/weight-applied y *without* the 1/rms factor, and adds each
    row's sum of squares into sumsq (b,) float32 (which must start at zero; add_rmsnorm_ reads it
    and zeroes it again). counter (>= b) int32 zeros, left at zero. conv_state, h in place.
    rmsnorm_gated(y, z, w) == out * rsqrt(sumsq / d_inner + eps), so out_proj(normed) equals
    out_proj(out) times that per-row scalar. state_early: the caller guarantees conv_state and h
    were not written by the previous launch (see STATE_EARLY in the kernel). prefetch (weight,
    nbytes): bring the first nbytes of out_proj's weight into L2 (triton_gemv.l2_prefetch).
    """
    b = xBC.shape[0]
    nh, p, n = h.shape[1], h.shape[2], h.shape[3]
    d = nh * p
    g = (xBC.shape[1] - d) // (2 * n)
    k = conv_weight.shape[1]
    if g != 1 or not 2 <= k <= 4:
        raise ValueError("ssd_step_gated_ needs ngroups == 1 and d_conv in 2..4")
    _check_state(h, "ssd_step_gated_")
    BN = triton.next_power_of_2(n)
    tile = step_config(nh, p, BN)
    BP = tile["BLOCK_P"]
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    w = conv_weight.contiguous()
    grid = (b, nh, triton.cdiv(p, BP))
    pf, pf_lines, pf_per = prefetch_args(*prefetch, nprog=grid[0] * grid[1] * grid[2],
                                          num_warps=tile["num_warps"], fallback=w)
    _ssd_step_gated_kernel[grid](
        xBC, dt, z, w, conv_bias if conv_bias is not None else w, conv_state, A, D, dt_bias, h, norm_weight,
        out, sumsq, counter, pf, p, n, g, d, nh // g, pf_lines,
        xBC.stride(0), dt.stride(0), z.stride(0), *conv_state.stride(), h.stride(0), h.stride(1), h.stride(2),
        out.stride(0), lo, hi if hi != math.inf else 3.0e38, CLAMP=lo > 0.0 or hi != math.inf, K=k,
        HAS_BIAS=conv_bias is not None, NORM_BEFORE_GATE=bool(norm_before_gate),
        BLOCK_P=BP, BLOCK_N=BN, num_warps=tile["num_warps"], STATE_EARLY=bool(state_early), PF_PER_PROG=pf_per,
        **pdl_kwargs(h.device))
    return out
