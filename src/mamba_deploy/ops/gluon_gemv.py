"""A batch-1 GEMV whose whole weight is in flight before its PDL wait (Gluon, sm_90).

Twin of `torch.nn.functional.linear` for x with one row (like `triton_gemv.gemv`).
Why: in graph decode, out_proj follows the fused mixer, whose work is a chain of latencies
(wait for in_proj, conv, state update, gate), not bytes. `triton_gemv.gemv` keeps its slab in
registers, so only its first wave (a fifth to two fifths of out_proj) can load during the mixer;
the rest streams after it. Here every program copies its rows into shared memory with cp.async
before `griddepcontrol.wait`, and the grid is sized so that all programs are resident at once
(rows per program R, 227 KB of shared memory per SM): the whole matrix streams while the mixer
runs, and after the wait each program reads x and its rows from on-chip memory.

Layout: program p owns rows [p R, p R + R), copied as (4, CK) tiles (4 rows = one per warp,
CK = 1024 or 512 columns) into a (R / 4 * K / CK, 4, CK) buffer; the compute reads each tile back
with the same register layout it was copied with, so each thread reads only bytes it copied.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

SMEM_PER_SM = 227 * 1024  # sm_90: the most one program may allocate (228 KB per SM, 1 KB reserved)
ROWS_PER_TILE = 4  # = num_warps: one row per warp


@gluon.jit
def _gdc_launch_dependents():
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _gdc_wait():
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _gemv_preload_kernel(X, W, Bias, Y, N, K: gl.constexpr, R: gl.constexpr, CK: gl.constexpr,
                         HAS_BIAS: gl.constexpr, USE_PDL: gl.constexpr):
    NW: gl.constexpr = gl.num_warps()
    L: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [NW, 1], [1, 0])  # (NW rows, CK), 16 B per thread
    S: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    NG: gl.constexpr = R // NW  # row tiles
    NCH: gl.constexpr = K // CK  # column tiles per row
    if USE_PDL:
        _gdc_launch_dependents()
    buf = gl.allocate_shared_memory(W.dtype.element_ty, [NG * NCH, NW, CK], S)
    r0 = gl.program_id(0) * R
    ri = gl.arange(0, NW, layout=gl.SliceLayout(1, L))
    ci = gl.arange(0, CK, layout=gl.SliceLayout(0, L))
    # -- the weights never depend on the predecessor: all of them in flight before the wait
    for g in range(NG):
        rows = r0 + g * NW + ri
        src = W + rows[:, None].to(gl.int64) * K + ci[None, :]  # (NW, CK)
        m = (rows < N)[:, None] & (ci < CK)[None, :]
        for c in range(NCH):
            async_copy.async_copy_global_to_shared(buf.index(g * NCH + c), src + c * CK, mask=m)
    async_copy.commit_group()
    if USE_PDL:
        _gdc_wait()
    async_copy.wait_group(0)
    for g in range(NG):
        acc = gl.zeros([NW, CK], gl.float32, L)
        for c in range(NCH):
            w = buf.index(g * NCH + c).load(L).to(gl.float32)
            x = gl.load(X + c * CK + ci).to(gl.float32)
            acc += w * x[None, :]
        rows = r0 + g * NW + ri
        out = gl.sum(acc, axis=1)  # (NW,): one row per warp, a warp-local reduction
        if HAS_BIAS:
            out += gl.load(Bias + rows, mask=rows < N, other=0.0).to(gl.float32)
        gl.store(Y + rows, out.to(Y.dtype.element_ty), mask=rows < N)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def preload_config(n: int, k: int, element_size: int, n_sm: int, rows: int | None = None) -> dict | None:
    """Rows per program R (a multiple of 4) and the column tile, or None where the whole matrix
    cannot be resident at once (then the caller keeps triton_gemv.gemv). The smallest R whose
    programs all fit: n_sm x (programs per SM by shared memory) >= cdiv(n, R)."""
    ck = 1024 if k % 1024 == 0 else 512 if k % 512 == 0 else 0
    if not ck:
        return None
    cands = [rows] if rows else range(ROWS_PER_TILE, n + ROWS_PER_TILE, ROWS_PER_TILE)
    for r in cands:
        if r % ROWS_PER_TILE:
            return None
        smem = r * k * element_size
        if smem > SMEM_PER_SM:
            return None
        if triton.cdiv(n, r) <= n_sm * (SMEM_PER_SM // smem):
            return dict(R=r, CK=ck)
    return None


def preload_applies(x, weight, rows: int | None = None) -> bool:
    """One row of a 16-bit x on an sm_90+ GPU, weight (N, K) contiguous in x's dtype, and a shape
    whose whole matrix fits the GPU's shared memory (preload_config)."""
    if not (x.is_cuda and x.numel() == x.shape[-1] and weight.dim() == 2 and weight.is_contiguous()
            and weight.dtype == x.dtype and x.dtype in (torch.float16, torch.bfloat16)
            and weight.shape[1] == x.shape[-1]):
        return False
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if torch.cuda.get_device_capability(dev)[0] < 9:
        return False
    return preload_config(weight.shape[0], weight.shape[1], weight.element_size(), _sm_count(dev), rows) is not None


def gemv_preload(x, weight, bias=None, rows: int | None = None, pdl: bool | None = None):
    """x (..., K) with one row, weight (N, K) -> (..., N) in x's dtype; see the module doc.
    Raises ValueError where preload_applies is False."""
    from .triton_gemv import pdl_kwargs

    *pre, k = x.shape
    n = weight.shape[0]
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    cfg = preload_config(n, k, weight.element_size(), _sm_count(dev), rows) if preload_applies(x, weight, rows) else None
    if cfg is None:
        raise ValueError(f"gemv_preload cannot hold weight {tuple(weight.shape)} {weight.dtype} on chip "
                         f"for x {tuple(x.shape)} {x.dtype}; use triton_gemv.gemv")
    x1 = x.reshape(k).contiguous()
    y = torch.empty(n, device=x.device, dtype=x.dtype)
    launch = pdl_kwargs(x.device) if pdl is None else dict(USE_PDL=pdl, launch_pdl=pdl)
    _gemv_preload_kernel[(triton.cdiv(n, cfg["R"]),)](x1, weight, bias if bias is not None else weight, y, n,
                                                      K=k, HAS_BIAS=bias is not None, num_warps=ROWS_PER_TILE,
                                                      **cfg, **launch)
    return y.reshape(*pre, n)
