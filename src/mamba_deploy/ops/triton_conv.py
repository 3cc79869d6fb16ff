"""Triton depthwise causal conv1d: prefill over a sequence, and the single-step update.

Twins of `reference.causal_conv1d_ref` / `causal_conv1d_update_ref`. Channels are the
contiguous axis of x (b, l, c), so a (BLOCK_L, BLOCK_C) tile loads coalesced rows; the taps
re-read neighbouring rows, which stay in L1/L2. The k-1 inputs before the sequence come from
conv_state. Arithmetic in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gemv import pdl_kwargs
from .triton_taps import _conv_begin, _conv_end


@triton.jit
def _conv_fwd_kernel(X, W, Bias, S, Y, L, C,
                     sxb, sxl, sxc, ssb, ssc, ssk, syb, syl, syc,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)  # (BL,) output times
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BC,)
    cm = c < C
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        # y[t] = sum_j w[j] * xt[t + j], xt = cat(state (K-1), x)
        src = t + j - (K - 1)  # time index into x; < 0 means it lives in the state
        in_x = (src >= 0) & (src < L)
        xv = tl.load(X + b * sxb + src[:, None] * sxl + c[None, :] * sxc,
                     mask=in_x[:, None] & cm[None, :], other=0.0).to(tl.float32)
        sidx = src + (K - 1)
        in_s = (src < 0) & (sidx >= 0)
        sv = tl.load(S + b * ssb + c[None, :] * ssc + sidx[:, None] * ssk,
                     mask=in_s[:, None] & cm[None, :], other=0.0).to(tl.float32)
        w = tl.load(W + c * K + j, mask=cm, other=0.0).to(tl.float32)
        acc += (xv + sv) * w[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(Y + b * syb + t[:, None] * syl + c[None, :] * syc, acc.to(Y.dtype.element_ty),
             mask=(t < L)[:, None] & cm[None, :])


def causal_conv1d(x, weight, bias, conv_state, activation=True):
    """x (b, l, c); weight (c, k); bias (c,) | None; conv_state (b, c, k-1).
    -> y (b, l, c), new conv_state (b, c, k-1) (a new tensor, in x's dtype)."""
    b, l, c = x.shape
    k = weight.shape[1]
    w = weight.contiguous()
    y = torch.empty((b, l, c), device=x.device, dtype=x.dtype)
    if l:
        BL, BC = 32, 128
        grid = (b, triton.cdiv(l, BL), triton.cdiv(c, BC))
        _conv_fwd_kernel[grid](x, w, bias if bias is not None else w, conv_state, y, l, c,
                               *x.stride(), *conv_state.stride(), *y.stride(),
                               K=k, HAS_BIAS=bias is not None, SILU=bool(activation),
                               BLOCK_L=BL, BLOCK_C=BC, num_warps=4)
    # the last k-1 inputs (tiny; torch is fine): from the state when l < k-1
    xt = torch.cat([conv_state.to(x.dtype), x[:, max(0, l - (k - 1)):].transpose(1, 2)], dim=-1)
    return y, xt[..., xt.shape[-1] - (k - 1):].contiguous()


@triton.jit
def _conv_update_kernel(X, W, Bias, S, Y, C, sxb, sxc, ssb, ssc, ssk, syb, syc,
                        K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                        BLOCK_C: tl.constexpr, WINDOW: tl.constexpr, USE_PDL: tl.constexpr,
                        STATE_EARLY: tl.constexpr):
    # WINDOW (2 <= K <= 4): the taps are held in registers (triton_taps._window), so the state
    # can be read before the PDL wait (STATE_EARLY, as in triton_step._ssd_step_gated_kernel)
    if USE_PDL:  # see triton_gemv
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    sb = S + b * ssb
    if WINDOW and STATE_EARLY:
        s1, s2, acc, w_last = _conv_begin(sb, c, cm, ssc, ssk, W, Bias, K, HAS_BIAS, BLOCK_C)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    if WINDOW and not STATE_EARLY:
        s1, s2, acc, w_last = _conv_begin(sb, c, cm, ssc, ssk, W, Bias, K, HAS_BIAS, BLOCK_C)
    x = tl.load(X + b * sxb + c * sxc, mask=cm, other=0.0)
    if WINDOW:
        acc = _conv_end(sb, c, cm, ssc, ssk, s1, s2, acc, w_last, x, K)
    else:
        acc = x.to(tl.float32) * tl.load(W + c * K + (K - 1), mask=cm, other=0.0).to(tl.float32)
        for j in tl.static_range(K - 1):
            s = tl.load(sb + c * ssc + j * ssk, mask=cm, other=0.0)
            acc += s.to(tl.float32) * tl.load(W + c * K + j, mask=cm, other=0.0).to(tl.float32)
            # shift the window left by one, in place: each program owns its channels, and with
            # BLOCK_C = 256 over 4 warps each element lives in exactly one thread (no replicas), so
            # the read of tap j+1 below never races with a write of it
            if j > 0:
                tl.store(sb + c * ssc + (j - 1) * ssk, s, mask=cm)
        if K > 1:  # d_conv 1 keeps no window
            tl.store(sb + c * ssc + (K - 2) * ssk, x.to(S.dtype.element_ty), mask=cm)
        if HAS_BIAS:
            acc += tl.load(Bias + c, mask=cm, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(Y + b * syb + c * syc, acc.to(Y.dtype.element_ty), mask=cm)


def causal_conv1d_update(x, weight, bias, conv_state, activation=True, state_early=False, pdl=False):
    """x (b, c); conv_state (b, c, k-1) -> y (b, c), conv_state.

    Fast-path contract: conv_state is updated IN PLACE and returned (the model copies the
    result back into the same storage, which torch skips), so no new state is allocated.
    pdl / state_early (graph decode, d_conv 2..4): launch as a PDL kernel, and read the state
    before the wait (the caller guarantees that no launch since the last ordinary one wrote it;
    see triton_gemv's module docstring)."""
    b, c = x.shape
    k = weight.shape[1]
    w = weight.contiguous()
    y = torch.empty((b, c), device=x.device, dtype=x.dtype)
    BC = 256
    window = 2 <= k <= 4
    launch = pdl_kwargs(x.device) if pdl and window else dict(USE_PDL=False)
    _conv_update_kernel[(b, triton.cdiv(c, BC))](
        x, w, bias if bias is not None else w, conv_state, y, c,
        *x.stride(), *conv_state.stride(), *y.stride(),
        K=k, HAS_BIAS=bias is not None, SILU=bool(activation), BLOCK_C=BC, WINDOW=window,
        STATE_EARLY=bool(state_early) and window, num_warps=4, **launch)
    return y, conv_state
