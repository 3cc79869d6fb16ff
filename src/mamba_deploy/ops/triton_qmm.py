"""Triton weight-only int8 / int4 linears for a few rows (batched decode, 2..QMM_MAX_ROWS tokens).

Twins of `reference.int8_linear_ref` / `reference.int4_linear_ref` (layouts: quant/formats.py).
Decode at batch > 1 is still bound by the weight bytes, so the kernel reads the codes (1 or 1/2
byte per weight) and converts each tile in registers: the reference converts the whole matrix to
a 16-bit tensor first and then reads that (5 bytes moved per int8 weight instead of 1).
int8: acc (rows, out) = x @ codes^T in float32 (codes are exact in bf16 / fp16), times the row
scale. int4: per group, x's even and odd columns times the low and high nibbles (so the packed
bytes are never interleaved), minus the zero point, times the group's scale.
int8 at one row takes the PDL GEMV (triton_gemv); int4 prefers torch's tinygemm where it fits
(torch_fused.py); more than QMM_MAX_ROWS rows (prefill) take the reference: there
the matmul, not the bytes, costs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import QMM_MAX_ROWS, reference, torch_fused
from .triton_gemv import _gemv_on, gemv, gemv_applies

HALF = (torch.float16, torch.bfloat16)


@triton.jit
def _qmm_kernel(X, Q, S, Z, Y, M, N, K, GS, sxm, sqn, ssn, szn, sym,
                BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_Z: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
                SWAP: tl.constexpr):
    # SWAP: accumulate the transposed product (BN, BM) = W x^T, so the converted weight tile is the
    # dot's first operand (which Hopper's wgmma may take from registers) and x^T the second
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    mm, nm = rm < M, rn < N
    k_per = K // SPLIT_K  # the launcher checks K % (SPLIT_K * BK) == 0
    k_lo = tl.program_id(2) * k_per
    acc = tl.zeros((BN, BM) if SWAP else (BM, BN), dtype=tl.float32)
    if BITS == 8:
        rk = tl.arange(0, BK)
        for k0 in tl.range(k_lo, k_lo + k_per, BK, num_stages=STAGES):
            x = tl.load(X + rm[:, None] * sxm + (k0 + rk)[None, :], mask=mm[:, None], other=0.0)  # (BM, BK)
            q = tl.load(Q + rn[:, None] * sqn + (k0 + rk)[None, :], mask=nm[:, None], other=0)  # (BN, BK)
            if SWAP:
                acc = tl.dot(q.to(x.dtype), tl.trans(x), acc)
            else:
                acc = tl.dot(x, tl.trans(q.to(x.dtype)), acc)
        s = tl.load(S + rn * ssn, mask=nm, other=0.0).to(tl.float32)
        acc = acc * (s[:, None] if SWAP else s[None, :])
    else:
        rh = tl.arange(0, BK // 2)
        for k0 in tl.range(k_lo, k_lo + k_per, BK, num_stages=STAGES):
            xp = X + rm[:, None] * sxm + (k0 + 2 * rh)[None, :]
            xe = tl.load(xp, mask=mm[:, None], other=0.0)  # (BM, BK/2): columns k0, k0+2, ...
            xo = tl.load(xp + 1, mask=mm[:, None], other=0.0)
            p = tl.load(Q + rn[:, None] * sqn + (k0 // 2 + rh)[None, :], mask=nm[:, None], other=0)  # (BN, BK/2)
            lo = (p & 0xF).to(tl.int32)  # element 2j
            hi = (p >> 4).to(tl.int32)  # element 2j + 1
            if SIGNED:  # two's complement nibbles
                lo = (lo ^ 8) - 8
                hi = (hi ^ 8) - 8
            g = k0 // GS  # one group per tile (BK divides GS)
            if HAS_Z:
                z = tl.load(Z + rn * szn + g, mask=nm, other=0).to(tl.int32)[:, None]
                lo -= z
                hi -= z
            s = tl.load(S + rn * ssn + g, mask=nm, other=0.0).to(tl.float32)
            if SWAP:
                part = tl.dot(lo.to(xe.dtype), tl.trans(xe))
                part = tl.dot(hi.to(xe.dtype), tl.trans(xo), part)
                acc += part * s[:, None]
            else:
                part = tl.dot(xe, tl.trans(lo.to(xe.dtype)))
                part = tl.dot(xo, tl.trans(hi.to(xe.dtype)), part)
                acc += part * s[None, :]
    if SWAP:
        acc = tl.trans(acc)
    yp = Y + rm[:, None] * sym + rn[None, :]
    if SPLIT_K == 1:
        tl.store(yp, acc.to(Y.dtype.element_ty), mask=mm[:, None] & nm[None, :])
    else:  # Y is a float32 buffer of zeros
        tl.atomic_add(yp, acc, mask=mm[:, None] & nm[None, :], sem="relaxed")


def qmm_config(m: int, n: int, k: int, bits: int, group_size: int) -> dict:
    """Tile by shape, from benchmarks/gpu_qmm.py on an H200 (results/h200_qmm*.json). BK for int4 is
    one group (at most 128 columns, at least 32: tl.dot needs 16 along K for each nibble half).
    Split-K only where N alone gives too few programs to keep the SMs streaming (it adds a float32
    buffer and atomics)."""
    bm = max(16, min(QMM_MAX_ROWS, triton.next_power_of_2(m)))
    if bits == 8:
        bk, bn, want = (128 if k <= 4096 else 256), (32 if n > 4096 else 16), 128
        while k % bk:  # K is a multiple of 32 (qmm_applies), e.g. Mamba1's dt_proj reads dt_rank = 160
            bk //= 2
    else:
        bk, bn, want = min(group_size, 128), 64, 256
    split = 1
    while triton.cdiv(n, bn) * split < want and k % (2 * split * bk) == 0 and k // (2 * split) >= 4 * bk:
        split *= 2
    return dict(BM=bm, BN=bn, BK=bk, SPLIT_K=split, STAGES=4, num_warps=4, SWAP=False)


def _launch(x, q, scales, zeros, group_size, bits, signed, config):
    m, k = x.shape
    n = q.shape[0]
    cfg = dict(config or qmm_config(m, n, k, bits, group_size))
    bk, split = cfg["BK"], cfg["SPLIT_K"]
    if k % (bk * split) or (bits == 4 and group_size % bk):
        raise ValueError(f"qmm tile BK={bk} x SPLIT_K={split} does not divide the row ({k}) / group ({group_size})")
    y = (torch.zeros if split > 1 else torch.empty)((m, n), device=x.device,
                                                    dtype=torch.float32 if split > 1 else x.dtype)
    grid = (triton.cdiv(n, cfg["BN"]), triton.cdiv(m, cfg["BM"]), split)
    z = zeros if zeros is not None else scales
    _qmm_kernel[grid](x, q, scales, z, y, m, n, k, group_size, x.stride(0), q.stride(0), scales.stride(0),
                      z.stride(0), y.stride(0), BITS=bits, SIGNED=signed, HAS_Z=zeros is not None, **cfg)
    return y.to(x.dtype) if split > 1 else y


def qmm_applies(x, k: int, min_rows: int = 2) -> bool:
    """Whether the kernel takes these rows: min_rows..QMM_MAX_ROWS of a 16-bit x on CUDA, K a multiple of 32."""
    return bool(_gemv_on() and x.is_cuda and x.dim() == 2 and min_rows <= x.shape[0] <= QMM_MAX_ROWS
                and x.shape[1] == k and k % 32 == 0 and x.dtype in HALF and not x.requires_grad)


def int8_mm(x, qweight, scales, config=None):
    """x (m, k) fp16 / bf16; qweight (n, k) int8; scales (n, 1) -> (m, n) in x's dtype."""
    return _launch(x.contiguous(), qweight, scales.reshape(-1, 1).contiguous(), None, qweight.shape[1], 8, True,
                   config)


def int4_mm(x, qweight, scales, zeros, group_size, symmetric, config=None):
    """x (m, k) fp16 / bf16; qweight (n, k/2) uint8 (element 2j in the low nibble); scales (n, k/g),
    zeros (n, k/g) uint8 or None when symmetric -> (m, n) in x's dtype."""
    return _launch(x.contiguous(), qweight, scales.contiguous(), None if symmetric else zeros.contiguous(),
                   group_size, 4, bool(symmetric), config)


def int8_linear(x, qweight, scales):
    """Same contract as reference.int8_linear_ref: one row through the GEMV over the codes (half the
    bytes of a 16-bit weight), 2..QMM_MAX_ROWS rows through int8_mm, the reference otherwise. (A
    GEMV whose programs keep their slab for 2..8 rows was slower than int8_mm from 2 rows on: 24.7
    vs 12.3 us for mamba2-2.7b's in_proj at 2 rows, results/h200_qmm.log.)
    torch._weight_int8pack_mm, used before, took 24 ms per token for mamba2-2.7b on an H200 at
    batch 1 and 212 ms at batch 32 (benchmarks/results/h200_quant_decode.json)."""
    n, k = qweight.shape
    if x.dim() == 2 and gemv_applies(x, qweight, scaled=True):
        return gemv(x, qweight, scale=scales.reshape(n).contiguous())
    if qmm_applies(x, k) and qweight.stride(-1) == 1:
        return int8_mm(x, qweight, scales)
    return reference.int8_linear_ref(x, qweight, scales)


def int4_linear(x, qweight, scales, zeros, group_size, symmetric):
    """Same contract as reference.int4_linear_ref: torch's tinygemm where its shapes fit (faster
    at every row count measured, bf16 activations); else 1..QMM_MAX_ROWS rows through int4_mm when
    a group is 32..128 columns or a multiple of 128 (e.g. rows not a multiple of 128 columns,
    which the reference served by converting the whole matrix per call: mamba2-2.7b in_proj, 32
    rows, 423 us vs 101 us here); the reference otherwise."""
    if torch_fused.tinygemm_fits(x, qweight, group_size):
        return torch_fused.tinygemm_linear(x, qweight, scales, zeros, group_size, symmetric)
    k = qweight.shape[1] * 2
    ok_group = group_size % 128 == 0 or group_size in (32, 64)
    if qmm_applies(x, k, min_rows=1) and ok_group and k % group_size == 0 and qweight.stride(-1) == 1:
        return int4_mm(x, qweight, scales, zeros, group_size, symmetric)
    return reference.int4_linear_ref(x, qweight, scales, zeros, group_size, symmetric)
