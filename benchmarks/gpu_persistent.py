"""Prototype: batch-1 decode's GEMV chain as ONE persistent kernel with grid barriers.

Question it answers: can one kernel whose programs stay resident across all layers, separated by
software grid barriers, stream the in_proj / out_proj weights faster than the chain of PDL
launches (ops/triton_gemv.py; 1.360 ms for the mamba2-2.7b chain, floor 1.234 ms)? Each program
owns a contiguous slice of every projection's rows, prefetches the next tiles of its slice into
L2 (`prefetch.global.L2`) while it works and before each barrier, so DRAM keeps streaming across
the barriers. 2 or 3 barriers per layer (3: what a whole Mamba2 layer needs: after in_proj,
after the mixer, after out_proj).

    python benchmarks/gpu_persistent.py [--models mamba2-2.7b,mamba2-1.3b] [--out p.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu import copy_bandwidth, graph_time  # noqa: E402
from gpu_gemv import chain, interleaved, shapes  # noqa: E402

from mamba_deploy.atomic import write_json  # noqa: E402
from mamba_deploy.ops.triton_gemv import pick_config  # noqa: E402


@triton.jit
def _grid_sync(CNT, ERR, target):
    """All programs arrive, each waits until target arrivals (target = k * nprog at the k-th
    barrier of a launch). bar.sync + one thread's release / acquire, as cooperative groups do."""
    tl.debug_barrier()
    tl.atomic_add(CNT, 1, sem="release")
    it = 0
    # (a barrier that polls 2^20 times gives up and flags ERR, and later ones do not wait:
    # a bug or a grid that is not all resident must not hang the GPU)
    while (tl.load(CNT, volatile=True) < target) & (it < 1048576) & (tl.load(ERR, volatile=True) == 0):
        it += 1
    if it >= 1048576:
        tl.atomic_add(ERR, 1)
    tl.atomic_add(CNT, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _pf_bytes(P, start, nbytes, CH: tl.constexpr):
    """prefetch.global.L2 the 128-byte lines covering bytes [start, start + nbytes) of P."""
    base = P.to(tl.pointer_type(tl.int8))
    first = start // 128
    last = (start + nbytes + 127) // 128
    for c in range(first, last, CH):
        idx = c + tl.arange(0, CH)
        ok = (idx < last).to(tl.int32)
        ptr = base + idx.to(tl.int64) * 128
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
            "=r,l,r", [ptr, ok], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gemv_rows(W, X, Y, r0, r1, K, BR: tl.constexpr, BK: tl.constexpr, LOOK: tl.constexpr, CH: tl.constexpr):
    """Y[r0:r1] = W[r0:r1] @ X (one row), BR rows per tile, the next tile loaded while this one
    is reduced, the tile LOOK ahead prefetched into L2."""
    rk = tl.arange(0, BK)
    km = rk < K
    ar = tl.arange(0, BR)
    x = tl.load(X + rk, mask=km, other=0.0, cache_modifier=".cg").to(tl.float32)
    rows = r0 + ar
    w = tl.load(W + rows[:, None] * K + rk[None, :], mask=(rows < r1)[:, None] & km[None, :], other=0.0)
    for r in range(r0, r1, BR):
        pf0 = r + LOOK * BR
        _pf_bytes(W, pf0 * K * 2, (tl.minimum(pf0 + BR, r1) - pf0) * K * 2, CH)
        rn = r + BR + ar
        wn = tl.load(W + rn[:, None] * K + rk[None, :], mask=(rn < r1)[:, None] & km[None, :], other=0.0)
        acc = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        tl.store(Y + r + ar, acc.to(Y.dtype.element_ty), mask=(r + ar) < r1)
        w = wn


@triton.jit
def _chain_kernel(X, Yin, Win, Wout, CNT, ERR, L, N1, K1, N2, K2, per1, per2,
                  BR1: tl.constexpr, BK1: tl.constexpr, BR2: tl.constexpr, BK2: tl.constexpr,
                  LOOK: tl.constexpr, NBAR: tl.constexpr, CH: tl.constexpr, GEMV: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    a1 = pid * per1
    b1 = tl.minimum(a1 + per1, N1)
    a2 = pid * per2
    b2 = tl.minimum(a2 + per2, N2)
    _pf_bytes(Win, a1 * K1 * 2, (tl.minimum(a1 + LOOK * BR1, b1) - a1) * K1 * 2, CH)
    for i in range(L):
        wi = Win + i.to(tl.int64) * N1 * K1
        wo = Wout + i.to(tl.int64) * N2 * K2
        yl = Yin + i * N1
        if GEMV:
            _gemv_rows(wi, X + i * K1, yl, a1, b1, K1, BR1, BK1, LOOK, CH)
        _pf_bytes(wo, a2 * K2 * 2, (tl.minimum(a2 + LOOK * BR2, b2) - a2) * K2 * 2, CH)
        _grid_sync(CNT, ERR, (i * NBAR + 1) * nprog)
        if NBAR == 3:
            _grid_sync(CNT, ERR, (i * NBAR + 2) * nprog)
        if GEMV:
            _gemv_rows(wo, yl, X + (i + 1) * K1, a2, b2, K2, BR2, BK2, LOOK, CH)
        if i + 1 < L:
            _pf_bytes(wi + N1 * K1, a1 * K1 * 2, (tl.minimum(a1 + LOOK * BR1, b1) - a1) * K1 * 2, CH)
        _grid_sync(CNT, ERR, (i * NBAR + NBAR) * nprog)


def run_chain(w_in, w_out, x0, cfg):
    """fn() running the persistent chain; X (L+1, K1) holds every layer's input, X[L] the output."""
    L, (n1, k1), (n2, k2) = w_in.shape[0], w_in.shape[1:], w_out.shape[1:]
    nprog = cfg["nprog"]
    X = torch.zeros(L + 1, k1, device="cuda", dtype=torch.bfloat16)
    X[0] = x0
    Y = torch.zeros(L, n1, device="cuda", dtype=torch.bfloat16)
    cnt = torch.zeros(1, device="cuda", dtype=torch.int32)
    err = torch.zeros(1, device="cuda", dtype=torch.int32)
    per1, per2 = triton.cdiv(n1, nprog), triton.cdiv(n2, nprog)
    args = (X, Y, w_in, w_out, cnt, err, L, n1, k1, n2, k2, per1, per2)
    kw = dict(BR1=cfg["br1"], BK1=triton.next_power_of_2(k1), BR2=cfg["br2"], BK2=triton.next_power_of_2(k2),
              LOOK=cfg["look"], NBAR=cfg["nbar"], CH=cfg["ch"], num_warps=cfg["warps"],
              GEMV=cfg.get("gemv", True))
    info = resident(_chain_kernel.warmup(*args, grid=(nprog,), **kw), nprog, cfg["warps"])

    def fn():
        cnt.zero_()
        _chain_kernel[(nprog,)](*args, **kw)
        return X[L]
    return fn, X, err, info


def resident(compiled, nprog, warps):
    """Raise unless nprog programs of this compiled kernel fit on the GPU at once (a grid barrier
    with programs still waiting to start would never open); returns the kernel's registers."""
    props = torch.cuda.get_device_properties(0)
    if hasattr(compiled, "_init_handles"):
        compiled._init_handles()  # loads the binary; sets n_regs / n_spills
    regs = compiled.n_regs
    per_warp = -(-regs * 32 // 256) * 256
    shared = compiled.metadata.shared
    per_sm = min(64 // warps, 65536 // (per_warp * warps), (228 * 1024) // max(shared, 1))
    if nprog > per_sm * props.multi_processor_count:
        raise ValueError(f"{nprog} programs of {regs} registers x {warps} warps, {shared} B shared: only "
                         f"{per_sm} per SM fit")
    return dict(regs=regs, shared=shared, spills=getattr(compiled, "n_spills", None))


def check(w_in, w_out, x0, out):
    """Relative error of the persistent chain's output vs the same chain in float32 torch."""
    x = x0.float()
    for i in range(w_in.shape[0]):
        y = (w_in[i].float() @ x).to(torch.bfloat16).float()
        x = (w_out[i].float() @ y[:w_out.shape[2]]).to(torch.bfloat16).float()
    return ((out.float() - x).norm() / x.norm()).item()


def run_model(name, bw, sms):
    n_layer, (n1, k1), (n2, k2) = shapes(name)
    torch.manual_seed(0)
    w_in = torch.randn(n_layer, n1, k1, device="cuda", dtype=torch.bfloat16) / k1 ** 0.5
    w_out = torch.randn(n_layer, n2, k2, device="cuda", dtype=torch.bfloat16) / k2 ** 0.5
    x0 = torch.randn(k1, device="cuda", dtype=torch.bfloat16)
    floor = (w_in.numel() + w_out.numel()) * 2 / bw * 1e3
    ws = interleaved(list(w_in.unbind(0)), list(w_out.unbind(0)))
    base = graph_time(chain(ws, x0[None], "triton", [pick_config(n1, k1), pick_config(n2, k2)], feed=True), reps=30)
    print(f"{name}: floor {floor:.3f} ms, PDL GEMV chain {base:.3f} ms", flush=True)
    rows = []
    # measured on an H200 (results/h200_persistent_chain.json): 1 program per SM (2 do not fit),
    # 8 warps, 8 / 2 rows per tile, LOOK 2 is the best of the 2.7b sweep; here its barrier costs
    grid = [(nbar, gemv, look, br1) for nbar in (2, 3) for gemv in (True, False) for look in (1, 2)
            for br1 in (8, 16)]
    for nbar, gemv, look, br1 in grid:
        if True:
            cfg = dict(nprog=sms, warps=8, br1=br1, br2=2 * (1 if k2 > 4096 else 2), look=look,
                       nbar=nbar, ch=256, gemv=gemv)
            try:
                fn, X, err, info = run_chain(w_in, w_out, x0, cfg)
                fn()
                torch.cuda.synchronize()
                if err.item():
                    print(f"  {cfg}: barrier timed out ({err.item()})", flush=True)
                    continue
                rel = check(w_in, w_out, x0, X[n_layer])
                ms = graph_time(fn, reps=30)
            except Exception as e:  # noqa: BLE001 (resources a config cannot have)
                print(f"  {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rows.append(dict(cfg=cfg, ms=ms, rel_err=rel, **info))
            print(f"  {cfg}: {ms:.3f} ms  rel err {rel:.2e}  {info}", flush=True)
    rows.sort(key=lambda r: r["ms"])
    return dict(floor_ms=floor, pdl_chain_ms=base, sweep=rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mamba2-2.7b")
    ap.add_argument("--out", default="persistent.json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = {"device": torch.cuda.get_device_name(), "copy_bw": bw, "sms": sms, "results": {}}
    for name in args.models.split(","):
        out["results"][name] = run_model(name, bw, sms)
        torch.cuda.empty_cache()
    write_json(args.out, out, indent=1)
    for name, r in out["results"].items():
        print(f"{name}: floor {r['floor_ms']:.3f}  PDL chain {r['pdl_chain_ms']:.3f}")
        for row in r["sweep"][:8]:
            print(f"   {row['ms']:.3f} ms  {row['cfg']}")


if __name__ == "__main__":
    main()
