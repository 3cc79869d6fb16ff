"""Triton helpers for the decode conv window (d_conv 2..4) held in registers.

Shared by the conv update (triton_conv), the fused Mamba2 mixer (triton_step) and the in_proj
GEMV with the Mamba1 conv as epilogue (triton_gemv). The window of a channel is its last k-1
inputs, conv_state (..., c, k-1) with tap stride scsk; reading all taps into registers first lets
a kernel read them before a PDL wait and write the shifted window after it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _window(S, ch, mask, scsc, scsk, CW, K: tl.constexpr, acc):
    """Read the conv window (K-1 <= 3 taps) of channels ch; acc += taps . weights[:K-1]."""
    s0 = tl.load(S + ch * scsc, mask=mask, other=0.0)
    acc += s0.to(tl.float32) * tl.load(CW + ch * K, mask=mask, other=0.0).to(tl.float32)
    s1 = s0
    s2 = s0
    if K > 2:
        s1 = tl.load(S + ch * scsc + scsk, mask=mask, other=0.0)
        acc += s1.to(tl.float32) * tl.load(CW + ch * K + 1, mask=mask, other=0.0).to(tl.float32)
    if K > 3:
        s2 = tl.load(S + ch * scsc + 2 * scsk, mask=mask, other=0.0)
        acc += s2.to(tl.float32) * tl.load(CW + ch * K + 2, mask=mask, other=0.0).to(tl.float32)
    return s0, s1, s2, acc


@triton.jit
def _shift_store(S, ch, mask, scsc, scsk, s1, s2, new, K: tl.constexpr):
    """Window <- (taps 1.., new input), from values already in registers."""
    if K == 2:
        tl.store(S + ch * scsc, new, mask=mask)
    if K == 3:
        tl.store(S + ch * scsc, s1, mask=mask)
        tl.store(S + ch * scsc + scsk, new, mask=mask)
    if K == 4:
        tl.store(S + ch * scsc, s1, mask=mask)
        tl.store(S + ch * scsc + scsk, s2, mask=mask)
        tl.store(S + ch * scsc + 2 * scsk, new, mask=mask)


@triton.jit
def _conv_begin(S, ch, mask, scsc, scsk, CW, CBias, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK: tl.constexpr):
    """Everything of a decode conv that does not need the new input (so a PDL kernel can do it
    before its wait): the taps kept for the shift, the partial sum taps . weights[:K-1] + bias,
    and the last tap's weight. Channels ch (BLOCK,)."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(CBias + ch, mask=mask, other=0.0).to(tl.float32)
    _, s1, s2, acc = _window(S, ch, mask, scsc, scsk, CW, K, acc)
    w_last = tl.load(CW + ch * K + (K - 1), mask=mask, other=0.0).to(tl.float32)
    return s1, s2, acc, w_last


@triton.jit
def _conv_end(S, ch, mask, scsc, scsk, s1, s2, acc, w_last, x, K: tl.constexpr):
    """With the new input x: shift the window in place (x stored in the state's dtype) and return
    the conv output before its activation, float32."""
    _shift_store(S, ch, mask, scsc, scsk, s1, s2, x.to(S.dtype.element_ty), K)
    return acc + x.to(tl.float32) * w_last

