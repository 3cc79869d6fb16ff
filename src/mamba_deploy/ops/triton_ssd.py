"""Triton Mamba2 chunked SSD forward (state-space duality), from an initial state.

Twin of `reference.ssd_ref`, same signature. Three launches, each a plain tile program:
  1. _chunk_state_pass  per (b, h, state tile), sequential over chunks from h0, in blocks of BK steps:
                        dt -> softplus(dt + bias) (clamped), cs = cumsum of dt * A from the chunk start,
                        h = h * exp(sum dA) + x^T @ (decay * dt * B)  (a matmul per block);
                        stores the state at each chunk start, and dt and cs for step 3
  2. _chunk_bmm         CB = C @ B^T per chunk and group          (shared by the heads of a group)
  3. _chunk_scan        y = (CB * decay * dt) @ x  +  exp(cs) * (C @ h_c^T)  +  D * x
Step 1 replaced three launches (dt cumsum, a per-chunk state kernel, a pass over fp32 chunk states
in memory): at (4, 8192, 80 heads, 64, 128) on an H200, 0.31 ms vs 0.011 + 0.290 + 0.134 ms, and
each launch removed starts the GPU earlier (Triton's launch path costs host time). Cumsums are
kept in log2 units (dA * log2(e)), so each decay is one exp2.
Padded tail positions get dt = 0 (decay 1, no input), so any length works and the final state
is the state after the last real token. Decays are exp of differences of float32 cumsums
inside one chunk (at most chunk_size terms), masked to -inf above the diagonal before the exp.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .triton_step import softplus

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(options):
    """Autotune candidates (kwargs, num_warps, num_stages[, maxnreg]); the CPU interpreter (tests)
    keeps only the first."""
    cfgs = [triton.Config(o[0], num_warps=o[1], num_stages=o[2], maxnreg=o[3] if len(o) > 3 else None)
            for o in options]
    return cfgs[:1] if _INTERPRET else cfgs


_BEST: dict = {}  # (kernel name, Q, P, N, tensor dtypes) -> the autotuner's pick


def _tuned_launch(kernel, shape_key, grid, args, consts):
    """Launch an autotuned kernel; grid(config kwargs) -> tuple; shape_key: the values of the
    autotuner's key (tensor dtypes are added here, as the autotuner does). The first call per key goes
    through the autotuner; later calls launch its pick with a tuple grid directly. Measured on the
    H200 host (Triton 3.6): 72 us of host time per launch through the autotuner with a callable
    grid, 28 us this way, and the GPU cannot start the SSD before its first launch returns."""
    dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
    key = (kernel.fn.__name__, *shape_key, dtypes)
    cfg = _BEST.get(key)
    if cfg is None:
        kernel[grid](*args, **consts)
        _BEST[key] = kernel.best_config
        return
    kw = cfg.all_kwargs()
    kernel.fn[grid(kw)](*args, **consts, **kw)


@triton.autotune(configs=_configs([({"BM": 64, "BN": 64}, 4, 3), ({"BM": 128, "BN": 128}, 8, 3)]),
                 key=["Q", "N"])
@triton.jit
def _chunk_bmm_kernel(Cm, Bm, CB, L, G, N, nchunks, scb, scl, scg, sbb, sbl, sbg,
                      Q: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
    pid_bc = tl.program_id(1)
    g = tl.program_id(2)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    nblk_n = tl.cdiv(Q, BN)
    pm, pn = tl.program_id(0) // nblk_n, tl.program_id(0) % nblk_n
    m = pm * BM + tl.arange(0, BM)
    s = pn * BN + tl.arange(0, BN)
    tm, ts = c * Q + m, c * Q + s
    mm, sm = (m < Q) & (tm < L), (s < Q) & (ts < L)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, N, BK):
        k = k0 + tl.arange(0, BK)
        km = k < N
        cv = tl.load(Cm + b * scb + tm[:, None] * scl + g * scg + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        bv = tl.load(Bm + b * sbb + ts[None, :] * sbl + g * sbg + k[:, None], mask=sm[None, :] & km[:, None], other=0.0)
        acc += tl.dot(cv, bv, input_precision="ieee" if IEEE else "tf32")
    # CB (b, c, g, Q, Q) in CB's dtype
    base = ((b * nchunks + c) * G + g) * Q * Q
    tl.store(CB + base + m[:, None] * Q + s[None, :], acc.to(CB.dtype.element_ty),
             mask=(m < Q)[:, None] & (s < Q)[None, :])


# (BP, BN, BK, num_warps, num_stages, maxnreg). The grid is only b * h * (P/BP) * (N/BN) long
# programs (640 at the shape below), so how many fit on an SM at once (shared memory, registers)
# decides whether the last wave is a long tail. At (4, 8192, 80, 64, 128) on an H200: BK 64,
# 2 stages, registers capped at 96 (5 per SM, one wave) 0.314 ms; BK 128 (3 per SM) 0.356 ms;
# BK 64, 3 stages, uncapped (4 per SM, 1.2 waves) 0.46 ms.
_STATE_TILES = [(64, 64, 64, 4, 2, 96), (64, 64, 64, 4, 2, 80), (64, 64, 128, 4, 2, None),
                (64, 64, 128, 8, 2, None), (64, 64, 32, 4, 3, 96), (64, 64, 64, 4, 3, None),
                (32, 64, 64, 2, 2, None), (32, 64, 64, 2, 3, 96)]
LOG2E = tl.constexpr(1.4426950408889634)


@triton.autotune(configs=_configs([({"BP": bp, "BN": bn, "BK": bk}, w, st, r)
                                   for bp, bn, bk, w, st, r in _STATE_TILES]),
                 key=["Q", "P", "N"])
@triton.jit
def _chunk_state_pass_kernel(X, DT, DTB, A, Bm, DTO, DACS, H0, HS, HL, L, H, P, N, nchunks, heads_per_group,
                             sxb, sxl, sxh, sdb, sdl, sdh, sbb, sbl, sbg, dt_lo, dt_hi,
                             CLAMP: tl.constexpr, Q: tl.constexpr, IEEE: tl.constexpr,
                             BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # One program walks all chunks of one (b, h, p-block, n-block) tile of the state in blocks of
    # BK steps, so per-chunk states never go to memory. Per block, with cs the cumsum of dA from
    # the chunk start (log2 units: dA * log2(e), so every decay is one exp2) and e = cs at the
    # block end: h = h * 2^(e - e_prev) + x^T @ (2^(e - cs) * dt * B), exps of differences
    # inside one chunk only. The first tile of each (b, h) also writes dt and cs for _chunk_scan
    # (no separate launch: each one costs host time before the GPU can start).
    b = tl.program_id(1)
    hd = tl.program_id(2)
    g = hd // heads_per_group
    nblk_n = tl.cdiv(N, BN)
    p = (tl.program_id(0) // nblk_n) * BP + tl.arange(0, BP)
    n = (tl.program_id(0) % nblk_n) * BN + tl.arange(0, BN)
    writer = tl.program_id(0) == 0
    pm, nm = p < P, n < N
    pn = p[:, None] * N + n[None, :]  # (BP, BN) offsets in a (P, N) state
    m2 = pm[:, None] & nm[None, :]
    a_h = tl.load(A + hd).to(tl.float32) * LOG2E
    dtb = tl.load(DTB + hd).to(tl.float32)
    h = tl.load(H0 + (b * H + hd) * P * N + pn, mask=m2, other=0.0).to(tl.float32)
    for c in range(nchunks):
        # HS (b, c, h, p, n): the state at the chunk start
        tl.store(HS + ((b * nchunks + c) * H + hd) * P * N + pn, h.to(HS.dtype.element_ty), mask=m2)
        dbase = ((b * H + hd) * nchunks + c) * Q
        run = a_h * 0.0  # float32 scalar: e_prev, the cumsum at the previous block's end
        for k0 in range(0, Q, BK):
            q = k0 + tl.arange(0, BK)
            t = c * Q + q
            tm = (q < Q) & (t < L)
            dt = softplus(tl.load(DT + b * sdb + t * sdl + hd * sdh, mask=tm, other=0.0).to(tl.float32) + dtb)
            if CLAMP:
                dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
            dt = tl.where(tm, dt, 0.0)  # padded tail: no input, no decay
            cs = run + tl.cumsum(dt * a_h, axis=0)  # (BK,)
            end = tl.sum(tl.where(q == k0 + BK - 1, cs, 0.0), axis=0)
            tl.store(DTO + dbase + q, dt, mask=writer & (q < Q))  # (b, h, c, Q) float32, cs in log2 units
            tl.store(DACS + dbase + q, cs, mask=writer & (q < Q))
            xv = tl.load(X + b * sxb + t[None, :] * sxl + hd * sxh + p[:, None],
                         mask=pm[:, None] & tm[None, :], other=0.0)  # (BP, BK) = x^T
            bv = tl.load(Bm + b * sbb + t[:, None] * sbl + g * sbg + n[None, :],
                         mask=tm[:, None] & nm[None, :], other=0.0).to(tl.float32)  # (BK, BN)
            bv = (bv * (dt * tl.exp2(end - cs))[:, None]).to(xv.dtype)
            h = tl.dot(xv, bv, acc=h * tl.exp2(end - run), input_precision="ieee" if IEEE else "tf32")
            run = end
    tl.store(HL + (b * H + hd) * P * N + pn, h, mask=m2)


@triton.jit
def _intra_block(acc, CB, DTO, DACS, Xb, k0, m, da_m, p, pmask, t0, L, Q: tl.constexpr, sxl,
                 CAUSAL: tl.constexpr, IEEE: tl.constexpr, BK: tl.constexpr):
    """acc (BM, BP) += (CB[m, k] * 2^(cs_m - cs_k) * dt_k) @ x_k for the BK steps from k0 of one chunk
    (CB, DTO, DACS, Xb offset to the chunk / head). CAUSAL: the block may cross the diagonal."""
    k = k0 + tl.arange(0, BK)
    tk = t0 + k
    km = (k < Q) & (tk < L)
    cb = tl.load(CB + m[:, None] * Q + k[None, :], mask=(m < Q)[:, None] & (k < Q)[None, :], other=0.0)
    diff = da_m[:, None] - tl.load(DACS + k, mask=k < Q, other=0.0)[None, :]
    if CAUSAL:
        diff = tl.where((k[None, :] <= m[:, None]) & km[None, :], diff, -float("inf"))
    w = cb.to(tl.float32) * tl.exp2(diff) * tl.load(DTO + k, mask=k < Q, other=0.0)[None, :]
    xk = tl.load(Xb + tk[:, None] * sxl + p[None, :], mask=km[:, None] & pmask[None, :], other=0.0)  # (BK, BP)
    return acc + tl.dot(w.to(xk.dtype), xk, input_precision="ieee" if IEEE else "tf32")


# (BM, BP, BK, num_warps, num_stages, maxnreg), from sweeps at (4, 8192, 80, 64, 128) on an H200.
# The kernel is latency-bound with 2 programs per SM (ncu: 82 KB shared memory, 159 registers at
# BM 128 / 3 stages); BM 64 / 3 stages with registers capped at 128 measured best, 0.799 ms (BM 128:
# 0.813). Loading C, h and x_m before the intra-chunk loop and multiplying C . h after it (loads
# in flight during the loop) measured no faster (0.837 ms) and was dropped.
_SCAN_TILES = [(64, 64, 32, 4, 3, 128), (128, 64, 32, 4, 3, None), (128, 64, 32, 8, 3, None),
               (64, 64, 64, 4, 2, 128), (64, 64, 32, 4, 4, None), (32, 64, 32, 2, 3, None),
               (32, 64, 32, 2, 4, None), (64, 64, 64, 4, 2, None), (128, 64, 32, 4, 2, None),
               (128, 64, 32, 4, 2, 128)]


@triton.autotune(configs=_configs([({"BM": bm, "BP": bp, "BK": bk}, w, st, r)
                                   for bm, bp, bk, w, st, r in _SCAN_TILES]),
                 key=["Q", "P", "N"])
@triton.jit
def _chunk_scan_kernel(X, Cm, CB, HS, DTO, DACS, Dp, Y, L, H, P, N, G, nchunks, heads_per_group,
                       sxb, sxl, sxh, scb, scl, scg, syb, syl, syh,
                       Q: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                       BM: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr):
    hd = tl.program_id(0)  # heads vary fastest so the heads of one chunk share CB and C in L2
    pid_bc = tl.program_id(2)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    g = hd // heads_per_group
    nblk_p = tl.cdiv(P, BP)
    pm_id = tl.program_id(1) // nblk_p
    m = pm_id * BM + tl.arange(0, BM)
    p = (tl.program_id(1) % nblk_p) * BP + tl.arange(0, BP)
    tmm = c * Q + m
    mm = (m < Q) & (tmm < L)
    pmask = p < P
    dbase = ((b * H + hd) * nchunks + c) * Q
    da_m = tl.load(DACS + dbase + m, mask=m < Q, other=0.0)
    # -- from the state at the chunk start: exp(dA_m) * C_m . h
    n = tl.arange(0, BLOCK_N)
    cv = tl.load(Cm + b * scb + tmm[:, None] * scl + g * scg + n[None, :],
                 mask=mm[:, None] & (n < N)[None, :], other=0.0)  # (BM, N)
    hbase = ((b * nchunks + c) * H + hd) * P * N
    hv = tl.load(HS + hbase + p[None, :] * N + n[:, None],
                 mask=pmask[None, :] & (n < N)[:, None], other=0.0)  # (N, BP) = h^T
    acc = tl.dot(cv, hv.to(cv.dtype), input_precision="ieee" if IEEE else "tf32")
    acc = acc * tl.exp2(da_m)[:, None]
    # -- inside the chunk: causal (CB * decay * dt) @ x; blocks left of the first row need no causal mask
    cbbase = ((b * nchunks + c) * G + g) * Q * Q
    xbase = X + b * sxb + hd * sxh
    for k0 in range(0, pm_id * BM, BK):
        acc = _intra_block(acc, CB + cbbase, DTO + dbase, DACS + dbase, xbase, k0, m, da_m, p, pmask,
                           c * Q, L, Q, sxl, False, IEEE, BK)
    for k0 in range(pm_id * BM, tl.minimum((pm_id + 1) * BM, Q), BK):
        acc = _intra_block(acc, CB + cbbase, DTO + dbase, DACS + dbase, xbase, k0, m, da_m, p, pmask,
                           c * Q, L, Q, sxl, True, IEEE, BK)
    xm = tl.load(X + b * sxb + tmm[:, None] * sxl + hd * sxh + p[None, :],
                 mask=mm[:, None] & pmask[None, :], other=0.0).to(tl.float32)
    acc += xm * tl.load(Dp + hd).to(tl.float32)
    tl.store(Y + b * syb + tmm[:, None] * syl + hd * syh + p[None, :], acc.to(Y.dtype.element_ty),
             mask=mm[:, None] & pmask[None, :])


def ssd(x, dt, A, B, C, D, dt_bias, h0, chunk_size, dt_limit=(0.0, math.inf)):
    """x (b, l, h, p); dt (b, l, h) raw; A, D, dt_bias (h,); B, C (b, l, g, n); h0 (b, h, p, n).
    Returns y (b, l, h, p) (with D skip, no gate) and h_last (b, h, p, n) float32."""
    b, l, nh, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Q = int(chunk_size)
    nchunks = max(1, triton.cdiv(l, Q))
    dev = x.device
    x = x if x.stride(-1) == 1 else x.contiguous()
    B = B if B.stride(-1) == 1 else B.contiguous()
    C = C if C.stride(-1) == 1 else C.contiguous()
    ieee = x.dtype == torch.float32  # tf32 would miss the fp32 tolerance
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    clamp = lo > 0.0 or hi != math.inf

    dto = torch.empty((b, nh, nchunks, Q), device=dev, dtype=torch.float32)
    dacs = torch.empty_like(dto)
    h_start = torch.empty((b, nchunks, nh, p, n), device=dev, dtype=x.dtype)
    h_last = torch.empty((b, nh, p, n), device=dev, dtype=torch.float32)
    _tuned_launch(_chunk_state_pass_kernel, (Q, p, n),
                  lambda kw: (triton.cdiv(p, kw["BP"]) * triton.cdiv(n, kw["BN"]), b, nh),
                  (x, dt, dt_bias, A, B, dto, dacs, h0.contiguous(), h_start, h_last, l, nh, p, n, nchunks, nh // g,
                   x.stride(0), x.stride(1), x.stride(2), *dt.stride(), B.stride(0), B.stride(1), B.stride(2),
                   lo, hi if hi != math.inf else 3.0e38), dict(CLAMP=clamp, Q=Q, IEEE=ieee))

    # CB in x's dtype: chunk_scan rounds CB * decay * dt to it for the matmul anyway
    cb = torch.empty((b, nchunks, g, Q, Q), device=dev, dtype=torch.float32 if ieee else x.dtype)
    _tuned_launch(_chunk_bmm_kernel, (Q, n),
                  lambda kw: (triton.cdiv(Q, kw["BM"]) * triton.cdiv(Q, kw["BN"]), b * nchunks, g),
                  (C, B, cb, l, g, n, nchunks, C.stride(0), C.stride(1), C.stride(2), B.stride(0), B.stride(1),
                   B.stride(2)), dict(Q=Q, BK=max(16, min(64, triton.next_power_of_2(n))), IEEE=ieee))

    y = torch.empty((b, l, nh, p), device=dev, dtype=x.dtype)
    _tuned_launch(_chunk_scan_kernel, (Q, p, n),
                  lambda kw: (nh, triton.cdiv(Q, kw["BM"]) * triton.cdiv(p, kw["BP"]), b * nchunks),
                  (x, C, cb, h_start, dto, dacs, D, y, l, nh, p, n, g, nchunks, nh // g,
                   x.stride(0), x.stride(1), x.stride(2), C.stride(0), C.stride(1), C.stride(2),
                   y.stride(0), y.stride(1), y.stride(2)),
                  dict(Q=Q, BLOCK_N=max(16, triton.next_power_of_2(n)), IEEE=ieee))
    return y, h_last
