"""A batch-1 Mamba2 decode layer in three launches (graph decode, cuda_graph.py).

    in_proj_conv_    the in_proj GEMV; each program also runs the causal conv (and silu) of the
                     x, B, C channels among its rows and shifts their conv windows
    mixer_           SSD state update, D skip, gate and gated-norm statistics (no conv)
    out_proj_add_    the out_proj GEMV, its 1/rms, the residual add, and the next RMSNorm's
                     input times that norm's weight, with the norm's sum of squares

Why: batch-1 decode is a chain of dependent launches, and each boundary costs latency that no
weight streaming hides (the next kernel's wait, its first loads, its tail). The four-launch
layer (add+norm, in_proj, mixer with the conv, out_proj: cuda_graph.fast_decode_step at batch
> 1) spends ~1 us per layer on the add+norm launch and ~3.3 us on the mixer (mamba2-2.7b, H200,
benchmarks/gpu_decode_sweep.py ablations). Here:
- The add+norm launch is gone. An RMSNorm's 1/rms is a per-row scalar, so it commutes with the
  GEMV after it: out_proj_add_ writes the next norm's input times its weight and adds its sum
  of squares into a float32 slot; the next GEMV multiplies its dot products by
  rsqrt(sumsq / d + eps). (The gated norm before out_proj works the same way.)
- The mixer is shorter. The conv moved into in_proj's epilogue, where every channel's window
  belongs to exactly one program: the mixer no longer reads windows, and no longer needs the
  counter (an acq_rel round trip on the critical path) that decided which of the programs
  sharing B and C shifts their windows.
Fusing the mixer into the in_proj grid itself (mixer programs polling in_proj's rows) measured
slower: the mixer's registers (a state tile per program) cut the GEMV programs resident per SM,
hence the weight bytes in flight (benchmarks/results/README.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import triton_step
from .triton_gemv import (ONE_SHOT_MAX_K, SS_SLOTS, SS_STRIDE, gemv_dot, gemv_load, l2_prefetch, load_sumsq,
                          pdl_kwargs, prefetch_args)
from .triton_step import _shift_store, update_gate

# Registers per thread of in_proj_conv_: the conv epilogue took it from the plain GEMV's 113 to
# 138 (ptxas, sm_90, bf16, 4 warps), i.e. from 4 to 3 programs per SM and a quarter fewer weight
# bytes in flight; capped at 128 (4 per SM) it spills 16 bytes.
IN_PROJ_MAXNREG = 128
ROWS = 2  # GEMV rows per program, as in triton_gemv.pick_config's one-shot tile (the kernels' arange(0, 2))


def supported(d_model: int, d_inner: int, headdim: int, ngroups: int, d_conv: int) -> bool:
    return ngroups == 1 and 2 <= d_conv <= 4 and d_model <= ONE_SHOT_MAX_K and d_inner <= ONE_SHOT_MAX_K


def _warps(k: int) -> int:
    return 8 if triton.next_power_of_2(k) >= 8192 else 4  # triton_gemv.pick_config's


@triton.jit
def _in_proj_conv_kernel(X, W, SSX, ZX, CW, CBias, CS, K, swn, x_n, x_eps, d_inner, conv_dim, n_rows, scsc, scsk,
                         HAS_SCALE: tl.constexpr, KC: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr, SLOTS: tl.constexpr, STRIDE: tl.constexpr):
    if USE_PDL:  # see triton_gemv: a decode-chain kernel
        tl.extra.cuda.gdc_launch_dependents()
    rn = tl.program_id(0) * 2 + tl.arange(0, 2)
    nmask = rn < n_rows
    ch = rn - d_inner  # conv channel of the xBC rows; z and dt rows have none
    cm = nmask & (ch >= 0) & (ch < conv_dim)
    w = gemv_load(W, rn, nmask, K, swn, BLOCK_K)
    # then the conv's windows, weights and bias, used only after the dot product (see
    # gemv_load). The windows were last written by the previous token's step, two or more
    # launches back (the step begins with the ordinary-launch embedding lookup).
    s0, s1, s2, _ = _taps(CS, ch * scsc, cm, scsk, KC - 1)  # the window
    w0, w1, w2, w3 = _taps(CW, ch * KC, cm, 1, KC)  # the conv weight row
    bias = tl.zeros((2,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(CBias + ch, mask=cm, other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    ss = 0.0
    if HAS_SCALE:  # x is out_proj_add_'s output: the norm's 1/rms is still to apply
        ss = load_sumsq(SSX, SLOTS, STRIDE)
    acc = gemv_dot(X, w, K, BLOCK_K)
    if HAS_SCALE:
        acc = acc * tl.rsqrt(ss / x_n + x_eps)
    raw = acc.to(ZX.dtype.element_ty).to(tl.float32)  # in_proj's output, rounded as stored
    # conv over (window, raw) with weights w0.. (unused taps are 0 for KC < 4)
    cv = bias + s0.to(tl.float32) * w0.to(tl.float32)
    if KC == 2:
        cv += raw * w1.to(tl.float32)
    if KC == 3:
        cv += s1.to(tl.float32) * w1.to(tl.float32) + raw * w2.to(tl.float32)
    if KC == 4:
        cv += s1.to(tl.float32) * w1.to(tl.float32) + s2.to(tl.float32) * w2.to(tl.float32) + raw * w3.to(tl.float32)
    cv = (cv * tl.sigmoid(cv)).to(ZX.dtype.element_ty).to(tl.float32)
    tl.store(ZX + rn, tl.where(cm, cv, raw).to(ZX.dtype.element_ty), mask=nmask)
    tl.debug_barrier()  # every replica's window read is done before any shift writes (1-D tiles are replicated)
    _shift_store(CS, ch, cm, scsc, scsk, s1, s2, raw.to(CS.dtype.element_ty), KC)


@triton.jit
def _taps(S, base, mask, step, NT: tl.constexpr):
    """Raw loads S[base + j * step] for j < NT (<= 4); the rest are zeros."""
    t0 = tl.load(S + base, mask=mask, other=0.0)
    t1 = tl.zeros_like(t0)
    t2 = tl.zeros_like(t0)
    t3 = tl.zeros_like(t0)
    if NT > 1:
        t1 = tl.load(S + base + step, mask=mask, other=0.0)
    if NT > 2:
        t2 = tl.load(S + base + 2 * step, mask=mask, other=0.0)
    if NT > 3:
        t3 = tl.load(S + base + 3 * step, mask=mask, other=0.0)
    return t0, t1, t2, t3


def in_proj_conv_(x, in_weight, sumsq_x, x_eps, zx, conv_weight, conv_bias, conv_state, d_inner):
    """zx (n_in,) = in_proj(x) with the xBC part through the causal conv update and silu;
    conv_state (1, conv_dim, k-1) updated in place. x (1, d_model): an RMSNorm's output, or with
    sumsq_x (float32 partial sums, triton_gemv.SS_SLOTS x SS_STRIDE) that output without its
    rsqrt(sumsq_x / d_model + x_eps)."""
    n_rows, k = in_weight.shape
    conv_dim, kc = conv_weight.shape
    if x.numel() != k or conv_state.shape[0] != 1 or k > ONE_SHOT_MAX_K or not 2 <= kc <= 4:
        raise ValueError(f"in_proj_conv_ takes batch 1, rows <= {ONE_SHOT_MAX_K} and d_conv 2..4, got x "
                         f"{tuple(x.shape)}, conv state {tuple(conv_state.shape)}, conv weight {tuple(conv_weight.shape)}")
    cw = conv_weight.contiguous()
    _in_proj_conv_kernel[(triton.cdiv(n_rows, ROWS),)](
        x, in_weight, sumsq_x if sumsq_x is not None else zx, zx, cw, conv_bias if conv_bias is not None else cw,
        conv_state, k, in_weight.stride(0), float(k), float(x_eps), d_inner, conv_dim, n_rows,
        conv_state.stride(1), conv_state.stride(2), HAS_SCALE=sumsq_x is not None, KC=kc,
        HAS_BIAS=conv_bias is not None, BLOCK_K=triton.next_power_of_2(k), SLOTS=SS_SLOTS, STRIDE=SS_STRIDE,
        num_warps=_warps(k),
        **({"maxnreg": IN_PROJ_MAXNREG} if IN_PROJ_MAXNREG else {}), **pdl_kwargs(zx.device))
    return zx


@triton.jit
def _mixer_kernel(ZX, A, Dp, DTB, H, NW, U, SSU, PF, P, N, d_inner, shh, shp, dt_lo, dt_hi, PF_LINES,
                  CLAMP: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr, PF_PER_PROG: tl.constexpr,
                  SLOTS: tl.constexpr, STRIDE: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    hd = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    pm, nm = p < P, n < N
    cx = hd * P + p
    l2_prefetch(PF, PF_LINES, hd * tl.num_programs(1) + tl.program_id(1), tl.num_programs(0) * tl.num_programs(1),
                PF_PER_PROG)  # out_proj's weights
    # constants and the state tile before the wait (the state was last written by the previous
    # token's step, see in_proj_conv_)
    a_h = tl.load(A + hd).to(tl.float32)
    d_h = tl.load(Dp + hd).to(tl.float32)
    dtb = tl.load(DTB + hd).to(tl.float32)
    w = tl.load(NW + cx, mask=pm, other=0.0).to(tl.float32)
    hp = H + hd * shh + p[:, None] * shp + n[None, :]
    m2 = pm[:, None] & nm[None, :]
    h = tl.load(hp, mask=m2, other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    # zx rows: z (0..d_inner), conv'd x, B, C, then raw dt
    z = tl.load(ZX + cx, mask=pm, other=0.0).to(tl.float32)
    x = tl.load(ZX + d_inner + cx, mask=pm, other=0.0).to(tl.float32)
    Bv = tl.load(ZX + 2 * d_inner + n, mask=nm, other=0.0).to(tl.float32)
    Cv = tl.load(ZX + 2 * d_inner + N + n, mask=nm, other=0.0).to(tl.float32)
    dt = tl.load(ZX + 2 * d_inner + 2 * N + hd).to(tl.float32)
    slot = (hd * tl.num_programs(1) + tl.program_id(1)) % SLOTS
    update_gate(h, x, Bv, Cv, dt, z, dtb, a_h, d_h, w, hp, m2, cx, pm, U, SSU + slot * STRIDE, dt_lo, dt_hi, CLAMP,
                NORM_BEFORE_GATE)


def mixer_(zx, A, D, dt_bias, h, norm_weight, dt_limit, norm_before_gate, u, sumsq_u, prefetch=(None, 0)):
    """After in_proj_conv_ (ngroups == 1): h (1, nh, p, n) float32 updated in place; writes
    u (1, d_inner) = the gated norm's input times its weight without the 1/rms, and adds the sum
    of squares into sumsq_u (zero beforehand; SS_SLOTS partial sums), as
    triton_step.ssd_step_gated_ does. prefetch (weight, nbytes): bring the first nbytes of
    out_proj's weight into L2."""
    nh, p, n = h.shape[1], h.shape[2], h.shape[3]
    d_inner = nh * p
    if h.shape[0] != 1 or zx.numel() != 2 * d_inner + 2 * n + nh or h.dtype != torch.float32 or h.stride(-1) != 1:
        raise ValueError(f"mixer_ takes batch 1, ngroups 1 and a float32 state with unit last stride, got state "
                         f"{tuple(h.shape)} {h.dtype}, zx {tuple(zx.shape)}")
    tile = triton_step.step_config(nh, p, triton.next_power_of_2(n))  # via the module: the sweep patches it
    grid = (nh, triton.cdiv(p, tile["BLOCK_P"]))
    pf, pf_lines, pf_per = prefetch_args(*prefetch, nprog=grid[0] * grid[1], num_warps=tile["num_warps"], fallback=h)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    _mixer_kernel[grid](zx, A, D, dt_bias, h, norm_weight, u, sumsq_u, pf, p, n, d_inner, h.stride(1), h.stride(2),
                        lo, hi if hi != math.inf else 3.0e38, pf_lines, CLAMP=lo > 0.0 or hi != math.inf,
                        NORM_BEFORE_GATE=bool(norm_before_gate), BLOCK_P=tile["BLOCK_P"],
                        BLOCK_N=triton.next_power_of_2(n), PF_PER_PROG=pf_per, SLOTS=SS_SLOTS, STRIDE=SS_STRIDE,
                        num_warps=tile["num_warps"], **pdl_kwargs(h.device))
    return u


@triton.jit
def _out_proj_add_kernel(U, W, SSU, R, NW, XN, SSR, N, K, swn, u_n, u_eps,
                         BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr, SLOTS: tl.constexpr, STRIDE: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rn = tl.program_id(0) * 2 + tl.arange(0, 2)
    nmask = rn < N
    w = gemv_load(W, rn, nmask, K, swn, BLOCK_K)
    wn = tl.load(NW + rn, mask=nmask, other=0.0).to(tl.float32)  # constant: before the wait
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    # issued with U's load, not after the dot product (see gemv_load)
    ssu = load_sumsq(SSU, SLOTS, STRIDE)
    r = tl.load(R + rn, mask=nmask, other=0.0).to(tl.float32)
    acc = gemv_dot(U, w, K, BLOCK_K)
    # out_proj's output (rounded to the model dtype like F.linear's), then residual += it
    r += (acc * tl.rsqrt(ssu / u_n + u_eps)).to(XN.dtype.element_ty).to(tl.float32)
    tl.store(R + rn, r.to(R.dtype.element_ty), mask=nmask)
    # the next block's norm input, rounded like Block._pre: residual.to(weight dtype)
    r = r.to(R.dtype.element_ty).to(XN.dtype.element_ty).to(tl.float32)
    tl.store(XN + rn, (r * wn).to(XN.dtype.element_ty), mask=nmask)
    # relaxed: the consumer is the next launch, which waits for this whole grid
    tl.atomic_add(SSR + (tl.program_id(0) % SLOTS) * STRIDE, tl.sum(r * r, axis=0), sem="relaxed")


def out_proj_add_(u, out_weight, sumsq_u, u_n, u_eps, residual, norm_weight, xn, sumsq_r):
    """residual (1, d_model) += out_proj(u * rsqrt(sumsq_u / u_n + u_eps)); writes
    xn = residual.to(norm dtype) * norm_weight and adds sum(residual ** 2) into sumsq_r (zero
    beforehand): the next GEMV takes (xn, sumsq_r) as its scaled input (in_proj_conv_'s sumsq_x,
    triton_gemv.gemv's scale). Sums of squares are SS_SLOTS partial sums. Returns xn."""
    n, k = out_weight.shape
    if u.numel() != k or residual.numel() != n or k > ONE_SHOT_MAX_K:
        raise ValueError(f"out_proj_add_ takes batch 1 and rows <= {ONE_SHOT_MAX_K}, got u {tuple(u.shape)}, "
                         f"residual {tuple(residual.shape)}, weight {tuple(out_weight.shape)}")
    _out_proj_add_kernel[(triton.cdiv(n, ROWS),)](
        u, out_weight, sumsq_u, residual, norm_weight, xn, sumsq_r, n, k, out_weight.stride(0), float(u_n),
        float(u_eps), BLOCK_K=triton.next_power_of_2(k), SLOTS=SS_SLOTS, STRIDE=SS_STRIDE, num_warps=_warps(k),
        **pdl_kwargs(u.device))
    return xn
