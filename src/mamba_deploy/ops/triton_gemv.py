"""Triton GEMV for batch-1 decode (one row times a weight matrix), launched with programmatic
dependent launch (PDL) on Hopper.

Twin of `torch.nn.functional.linear` for x with one row. Why not cuBLAS: batch-1
decode of a 64-layer model is ~256 dependent launches whose GPU work is a few microseconds each,
so the gap between kernels costs as much as the weight streaming. With PDL a kernel is launched
while its predecessor still runs: it loads its weights (the whole slab of its rows, or the
first tile of rows longer than ONE_SHOT_MAX_K; weights never depend on the predecessor), then
`gdc_wait`s for the predecessor's results. cuBLAS kernels cannot join such a
chain. The other decode kernels (add_rmsnorm_, ssd_step_gated_) take the same `USE_PDL` switch.

Rules every PDL kernel here keeps: `gdc_launch_dependents` first (the next kernel may then start
its own weight loads); before `gdc_wait`, write nothing and read only what no launch since the
last ordinary (non-PDL) launch can have written: weights, and in graph decode this layer's
state (since every kernel triggers its dependents first, several PDL kernels can be in flight
at once, so "not written by the previous launch" is not enough).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_taps import _conv_begin, _conv_end


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
def l2_prefetch(P, n_lines, pid, nprog, PER_PROG: tl.constexpr):
    """Prefetch the 128-byte lines pid, pid + nprog, ... (< n_lines) of P into L2
    (`prefetch.global.L2`: no registers, no wait). Why: between two GEMVs of the decode chain
    DRAM idles while the small kernels run; a small kernel that prefetches the head of the next
    GEMV's weights (before its gdc_wait) keeps DRAM busy. Changes no values. (The sm_90 bulk
    `cp.async.bulk.prefetch.L2` measured the same at 1-4 MiB, and issued from one program it
    was ~20x slower: one SM's copy engine serialises it.)"""
    if PER_PROG > 0:
        idx = pid + nprog * tl.arange(0, PER_PROG)
        ok = (idx < n_lines).to(tl.int32)
        ptr = P.to(tl.pointer_type(tl.int8)) + idx.to(tl.int64) * 128
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
            "=r,l,r", [ptr, ok], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_args(weight, nbytes: int, nprog: int, num_warps: int, fallback):
    """(pointer, n_lines, per_prog) for `l2_prefetch` of the first nbytes of weight, spread over
    nprog programs; weight None or nbytes 0: off (per_prog 0 compiles it out; fallback is any
    tensor to pass as the unused pointer). per_prog is at least the thread count: a smaller
    tensor is replicated over threads, and each replica would issue its own prefetch."""
    n = 0 if weight is None else min(int(nbytes), weight.numel() * weight.element_size()) // 128
    per = triton.next_power_of_2(max(triton.cdiv(n, nprog), 32 * num_warps)) if n else 0
    return (weight if n else fallback), n, per


@triton.jit
def _gemv_kernel(X, W, Bias, Y, Scale, N, K, swn, CW, CBias, CS, C_CONV, scsc, scsk,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_SHOT: tl.constexpr,
                 USE_PDL: tl.constexpr, CONV_K: tl.constexpr, CONV_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr):
    # one program: BLOCK_N output features, streaming its (BLOCK_N, K) weight slab; ONE_SHOT
    # (BLOCK_K >= K): the whole slab in one load, issued before the PDL wait.
    # CONV_K > 0 (Mamba1 in_proj): outputs rn < C_CONV are conv channels; their decode conv
    # (weights CW (C_CONV, CONV_K), window CS) is applied here, replacing the conv-update launch.
    # HAS_SCALE: W holds int8 codes with one scale per row (weight-only int8, quant/formats.py)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    w_ptrs = W + rn[:, None] * swn + rk[None, :]  # (BN, BK)
    w = tl.load(w_ptrs, mask=nmask[:, None] & (rk[None, :] < K), other=0.0)  # constant: before the wait
    if CONV_K > 0:  # conv weights and the window (see the module docstring's rules)
        cm = nmask & (rn < C_CONV)
        s1, s2, cacc, w_last = _conv_begin(CS, rn, cm, scsc, scsk, CW, CBias, CONV_K, CONV_BIAS, BLOCK_N)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    if ONE_SHOT:
        x = tl.load(X + rk, mask=rk < K, other=0.0).to(tl.float32)
        acc = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(X + kk, mask=kk < K, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            w = tl.load(w_ptrs + (k0 + BLOCK_K), mask=nmask[:, None] & ((kk + BLOCK_K)[None, :] < K), other=0.0)
    if HAS_SCALE:
        acc *= tl.load(Scale + rn, mask=nmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=nmask, other=0.0).to(tl.float32)
    if CONV_K > 0:
        xin = acc.to(Y.dtype.element_ty)  # rounded as in_proj's output is in the unfused path
        # the (BLOCK_N,) tiles are replicated across threads: every replica has read the window
        # before any thread shifts it
        tl.debug_barrier()
        cv = _conv_end(CS, rn, cm, scsc, scsk, s1, s2, cacc, w_last, xin, CONV_K)
        acc = tl.where(rn < C_CONV, cv * tl.sigmoid(cv), acc)
    tl.store(Y + rn, acc.to(Y.dtype.element_ty), mask=nmask)


ONE_SHOT_MAX_K = 8192


def pick_config(n: int, k: int) -> dict:
    """Launch configuration by shape, from sweeps on an H200 (bf16, mamba2 1.3b / 2.7b in_proj and
    out_proj chains; benchmarks/gpu_gemv.py and results/h200_gemv_oneshot.*): 2 weight rows per
    program, each program loading its whole slab at once (so every resident program has all its
    bytes in flight before the PDL wait, and a program lives for one memory latency, which keeps
    the tail of each launch short). The 2.7b chain: 1.36 ms vs 1.59 ms for 4-row programs looping
    over 1024-wide tiles (floor 1.22 ms). Rows longer than ONE_SHOT_MAX_K loop over 1024-wide tiles.
    int8 codes (weight-only int8) use the same tiles: 4, 8 or 16 rows per program (as many bytes
    in flight per program as the 16-bit tiles, or more) were no faster (h200_int8_gemv_sweep.log)."""
    if k <= ONE_SHOT_MAX_K:
        bk = triton.next_power_of_2(k)
        return dict(BLOCK_N=2, BLOCK_K=bk, num_warps=8 if bk >= 8192 else 4)
    return dict(BLOCK_N=4, BLOCK_K=1024, num_warps=8)


def gemv(x, weight, bias=None, config: dict | None = None, pdl: bool | None = None, conv=None, scale=None):
    """x (..., K) with one row, weight (N, K) with unit last stride -> (..., N) in x's dtype.
    scale (N,): weight holds int8 codes and row i is scaled by scale[i] (weight-only int8).
    conv (weight (c, k), bias | None, conv_state (1, c, k-1)), k in 2..4: outputs [0, c) are
    conv channels, returned after the decode conv + SiLU (causal_conv1d_update's math), and
    conv_state is shifted in place; it is read before the PDL wait, so no launch since the last
    ordinary one may have written it (graph decode; see the module docstring)."""
    *pre, k = x.shape
    n = weight.shape[0]
    if x.numel() != k:
        raise ValueError(f"gemv takes one row of x, got shape {tuple(x.shape)}; use F.linear")
    x1 = x.reshape(k).contiguous()
    y = torch.empty(n, device=x.device, dtype=x.dtype)
    cfg = dict(config or pick_config(n, k))
    launch = pdl_kwargs(x.device) if pdl is None else dict(USE_PDL=pdl, launch_pdl=pdl)
    if conv is not None:
        cw, cb, cs = conv
        c, kc = cw.shape
        if not 2 <= kc <= 4 or c > n or tuple(cs.shape) != (1, c, kc - 1) or cs.stride(-1) != 1:
            raise ValueError(f"gemv's conv epilogue needs d_conv in 2..4, c <= N = {n} and a (1, c, d_conv-1) "
                             f"window with unit last stride; got weight {tuple(cw.shape)}, window {tuple(cs.shape)}")
        cw = cw.contiguous()
        conv_args = (cw, cb if cb is not None else cw, cs, cw.shape[0], cs.stride(1), cs.stride(2))
        conv_kw = dict(CONV_K=cw.shape[1], CONV_BIAS=cb is not None)
    else:
        conv_args, conv_kw = (weight, weight, weight, 0, 0, 0), dict(CONV_K=0, CONV_BIAS=False)
    if scale is not None and (weight.dtype != torch.int8 or scale.numel() != n):
        raise ValueError(f"a scaled GEMV takes int8 codes and one scale per row; got {weight.dtype} weight "
                         f"{tuple(weight.shape)} and {scale.numel()} scales")
    _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](x1, weight, bias if bias is not None else weight, y,
                                                   scale if scale is not None else weight, n, k,
                                                   weight.stride(0), *conv_args, HAS_BIAS=bias is not None,
                                                   ONE_SHOT=cfg["BLOCK_K"] >= k, HAS_SCALE=scale is not None,
                                                   **cfg, **launch, **conv_kw)
    return y.reshape(*pre, n)


def gemv_applies(x, weight, scaled: bool = False) -> bool:
    """Whether the GEMV takes these operands (one row on CUDA, a supported dtype): weight in x's
    dtype (`linear`), or scaled: int8 codes with a scale per row (weight-only int8)."""
    same = weight.dtype == torch.int8 if scaled else x.dtype == weight.dtype
    return bool(_gemv_on() and x.shape[-1] and x.numel() == x.shape[-1] and weight.dim() == 2
                and weight.shape[-1] == x.shape[-1] and weight.stride(-1) == 1 and same
                and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.is_cuda
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x, weight, bias=None):
    """Same contract as F.linear: the GEMV for one row (batch-1 decode), cuBLAS otherwise (with 4 or
    16 rows a tensor-core tile variant measured 1.5x slower than cuBLAS, so there is none)."""
    if gemv_applies(x, weight):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_conv1d_update(x, weight, bias, conv_weight, conv_bias, conv_state, state_early=False):
    """Same contract as reference.linear_conv1d_update_ref, conv_state updated in place and
    returned. state_early (graph decode: no launch since the last ordinary one wrote the state),
    one row and d_conv 2..4: one launch, the GEMV with the conv as its epilogue (which reads the
    window before its PDL wait); otherwise the linear, then the conv-update kernel."""
    from .triton_conv import causal_conv1d_update

    c, k = conv_weight.shape
    if (state_early and 2 <= k <= 4 and gemv_applies(x, weight) and conv_state.shape[0] == 1
            and conv_state.stride(-1) == 1):
        y = gemv(x, weight, bias, conv=(conv_weight, conv_bias, conv_state))
        return y[:, :c], y[:, c:], conv_state
    y = linear(x, weight, bias)
    yc, _ = causal_conv1d_update(y[:, :c], conv_weight, conv_bias, conv_state, state_early=state_early,
                                 pdl=state_early)
    return yc, y[:, c:], conv_state
