"""Pure-PyTorch reference ops. Every fast kernel in `ops/` has its twin here, same signature.

Conventions (mamba2-minimal letters):
  b batch, l sequence, d d_inner (Mamba1 channels), n d_state, h nheads, p headdim,
  g ngroups, c chunks, k d_conv.
All recurrences run in float32 whatever the input dtype; outputs are cast back.
No op loops over time steps in Python: scans are chunked and log-depth within a chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

def _up(t):
    """Compute dtype: at least float32 (float64 stays float64, for float64 references)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# ----------------------------------------------------------------------------- dt

def discretize_dt(dt, dt_bias, dt_limit=(0.0, math.inf)):
    """dt -> softplus(dt + dt_bias), clamped to dt_limit. The one place both the parallel
    and the recurrent paths turn raw dt into a step size (a classic source of mismatch)."""
    dt = F.softplus(_up(dt) + _up(dt_bias))
    lo, hi = dt_limit
    if lo > 0.0 or hi != math.inf:
        dt = dt.clamp(min=lo, max=hi)
    return dt


# ----------------------------------------------------------------------------- conv

def causal_conv1d_ref(x, weight, bias, conv_state, activation=True):
    """Depthwise causal conv over time, continuing from conv_state.

    x (b, l, c); weight (c, k); bias (c,) or None; conv_state (b, c, k-1): previous inputs.
    Returns y (b, l, c) and the new conv_state (b, c, k-1).
    """
    c, k = weight.shape
    xt = torch.cat([conv_state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # (b, c, k-1+l)
    y = F.conv1d(xt, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype), groups=c)
    if activation:
        y = F.silu(y)
    return y.transpose(1, 2), xt[..., xt.shape[-1] - (k - 1):]


def causal_conv1d_update_ref(x, weight, bias, conv_state, activation=True):
    """One step of causal_conv1d_ref: x (b, c) -> y (b, c), conv_state (b, c, k-1)."""
    xt = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (b, c, k)
    y = (xt * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    if activation:
        y = F.silu(y)
    return y, xt[..., 1:]


# ----------------------------------------------------------------------------- norms

def rmsnorm_ref(x, weight, eps):
    """x (..., d): HF/mamba_ssm RMSNorm, statistics in float32."""
    dtype = x.dtype
    xf = _up(x)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rmsnorm_gated_ref(x, z, weight, eps, group_size, norm_before_gate=False):
    """Mamba2's gated, group-wise RMSNorm. x, z (..., d); groups of `group_size` channels.

    norm_before_gate=False (mamba_ssm default, the only one transformers implements):
        norm(x * silu(z)) * weight
    norm_before_gate=True:
        norm(x) * weight * silu(z)
    """
    dtype = x.dtype
    xf, zf = _up(x), _up(z)
    if not norm_before_gate:
        xf = xf * F.silu(zf)
    *pre, d = xf.shape
    xg = xf.reshape(*pre, d // group_size, group_size)
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    out = xg.reshape(*pre, d) * _up(weight)
    if norm_before_gate:
        out = out * F.silu(zf)
    return out.to(dtype)


def weightless_rms(x, eps):
    """Falcon-Mamba's RMSNorm on dt, B, C (no weight), in float32."""
    xf = _up(x)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rmsnorm_ref(y, residual, weight, eps, out=None, sumsq=None, scale_n=1, scale_eps=0.0):
    """residual += y in place (residual's dtype); returns rmsnorm_ref(residual.to(weight.dtype)).

    The residual add of one block fused with the pre-norm of the next (graph decode). y (b, d)
    or None (the norm only); residual (b, d). sumsq (b,) float32: y is first scaled per row by
    rsqrt(sumsq / scale_n + scale_eps), the 1/rms that ssd_step_gated_ref left out, and sumsq
    is zeroed for the next layer. out (b, d) in weight's dtype: written and returned if given.
    Twin of triton_norm.add_rmsnorm_."""
    if y is not None:
        yf = _up(y)
        if sumsq is not None:  # rounded to y's dtype, as out_proj of the normed input would be
            yf = _up((yf * torch.rsqrt(sumsq.float() / scale_n + scale_eps)[:, None]).to(y.dtype))
        residual.copy_(_up(residual) + yf)
    if sumsq is not None:
        sumsq.zero_()
    x = rmsnorm_ref(residual.to(weight.dtype), weight, eps)
    return x if out is None else out.copy_(x)


# ----------------------------------------------------------------------------- Mamba1 scan

def _linear_scan(a, u):
    """Inclusive scan of h_t = a_t * h_{t-1} + u_t along dim 1 from h = 0, log-depth
    (Hillis-Steele). Returns (P, H): P_t = prod a_1..t, H_t = h_t. Only products of decays
    (<= 1) and sums are formed, so it cannot overflow."""
    T = a.shape[1]
    k = 1
    while k < T:
        u = torch.cat([u[:, :k], torch.addcmul(u[:, k:], a[:, k:], u[:, :-k])], 1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], 1)
        k *= 2
    return a, u


def _scan_chunk(dt_c, x_c, B_c, C_c, A, h):
    """One chunk of selective_scan_ref: dt_c, x_c (b, T, d); B_c, C_c (b, T, n); A (d, n); h (b, d, n)
    the carried state. Returns y (b, T, d) without the D skip and gate, and the chunk's last state."""
    a = torch.exp(dt_c.unsqueeze(-1) * A)  # (b, T, d, n)
    u = (dt_c * x_c).unsqueeze(-1) * B_c.unsqueeze(2)  # (b, T, d, n)
    P, H = _linear_scan(a, u)
    H = torch.addcmul(H, P, h.unsqueeze(1))  # add the carried state, decayed
    return torch.einsum("btdn,btn->btd", H, C_c), H[:, -1]


def selective_scan_ref(x, dt, A, B, C, D, z, dt_bias, h0, chunk_size=32):
    """Mamba1 selective scan, parallel over time.

    x, dt, z (b, l, d); A (d, n); B, C (b, l, n); D, dt_bias (d,); h0 (b, d, n).
    dt is raw (before bias and softplus). Returns y (b, l, d) and h_last (b, d, n).

    Time is cut into chunks of `chunk_size` so the (b, T, d, n) working set stays in cache;
    each chunk is a log-depth scan, and only the chunk's final state is carried to the next.
    z=None skips the gate.

    When gradients are needed each chunk is checkpointed: autograd keeps the chunk's (b, T, d)
    inputs and recomputes its ~15 (b, T, d, n) intermediates in backward, one chunk at a time.
    Kept, they cost n * 15 floats per channel and token (2.9 MB per token for the demo-mamba1
    preset: training at 32 x 512 tokens needed ~48 GB).
    """
    dtype = x.dtype
    b, l, d = x.shape
    dtf = discretize_dt(dt, dt_bias)  # (b, l, d)
    A = _up(A)
    xf, Bf, Cf = _up(x), _up(B), _up(C)
    h = _up(h0)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (dtf, A, xf, Bf, Cf, h))
    ys = []
    for s in range(0, l, chunk_size):
        e = min(s + chunk_size, l)
        chunk = (dtf[:, s:e], xf[:, s:e], Bf[:, s:e], Cf[:, s:e], A, h)
        if grad:
            y_c, h = torch.utils.checkpoint.checkpoint(_scan_chunk, *chunk, use_reentrant=False)
        else:
            y_c, h = _scan_chunk(*chunk)
        ys.append(y_c)
    y = torch.cat(ys, 1) + xf * _up(D)
    if z is not None:
        y = y * F.silu(_up(z))
    return y.to(dtype), h


def selective_state_update_ref(x, dt, A, B, C, D, z, dt_bias, h):
    """One recurrent step of selective_scan_ref. x, dt, z (b, d); B, C (b, n); h (b, d, n)."""
    dtype = x.dtype
    dtf = discretize_dt(dt, dt_bias)  # (b, d)
    a = torch.exp(dtf.unsqueeze(-1) * _up(A))  # (b, d, n)
    h = _up(h) * a + (dtf * _up(x)).unsqueeze(-1) * _up(B).unsqueeze(1)
    y = torch.einsum("bdn,bn->bd", h, _up(C)) + _up(x) * _up(D)
    if z is not None:
        y = y * F.silu(_up(z))
    return y.to(dtype), h


def selective_state_update_dt_ref(x, dt_in, dt_weight, A, B, C, D, z, dt_bias, h):
    """selective_state_update_ref after dt_proj: dt = dt_in @ dt_weight^T in x's dtype.
    dt_in (b, r), dt_weight (d, r). Twin of triton_step.selective_state_update_dt."""
    return selective_state_update_ref(x, F.linear(dt_in, dt_weight).to(x.dtype), A, B, C, D, z, dt_bias, h)


# ----------------------------------------------------------------------------- Mamba2 SSD

def segsum(x):
    """x (..., T) -> (..., T, T) with out[i, j] = sum_{k=j+1..i} x_k for j <= i, -inf above.
    Summed directly (no difference of cumsums), so exp(out) is accurate and <= 1 for x <= 0."""
    T = x.shape[-1]
    xr = x.unsqueeze(-1).expand(*x.shape, T)  # (..., T_i, T_j) holding x_i
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    xr = xr.masked_fill(~strict, 0.0)
    out = torch.cumsum(xr, dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    return out.masked_fill(~keep, -math.inf)


def ssd_ref(x, dt, A, B, C, D, dt_bias, h0, chunk_size, dt_limit=(0.0, math.inf)):
    """Mamba2 state-space duality, chunked, from an initial state.

    x (b, l, h, p); dt (b, l, h) raw; A, D, dt_bias (h,); B, C (b, l, g, n); h0 (b, h, p, n).
    Any l: the tail is padded with dt = 0 (decay 1, no input), which leaves the state unchanged.
    Returns y (b, l, h, p) (with the D skip, without the gate) and h_last (b, h, p, n).
    Heads are kept as (g, r) with r = h // g heads per group, so C @ B^T is formed once per group.
    """
    dtype = x.dtype
    b, l, nh, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r, Q = nh // g, chunk_size
    dtf = discretize_dt(dt, dt_bias, dt_limit)  # (b, l, h)
    xf, Bf, Cf = _up(x), _up(B), _up(C)
    pad = (-l) % Q
    if pad:
        xf, Bf, Cf = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xf, Bf, Cf))
        dtf = F.pad(dtf, (0, 0, 0, pad))
    c = (l + pad) // Q
    X = (xf * dtf.unsqueeze(-1)).reshape(b, c, Q, g, r, p).permute(0, 3, 4, 1, 2, 5)  # (b, g, r, c, Q, p)
    Bg = Bf.reshape(b, c, Q, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2)  # (b, g, 1, c, Q, n)
    Cg = Cf.reshape(b, c, Q, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2)  # (b, g, 1, c, Q, n)
    Adt = (dtf * _up(A)).reshape(b, c, Q, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, c, Q)

    # 1. within each chunk (the quadratic, attention-like part)
    y = (Cg @ Bg.transpose(-1, -2)) * torch.exp(segsum(Adt))  # (b, g, r, c, Q, Q)
    y = y @ X  # (b, g, r, c, Q, p)

    # 2. each chunk's final state from zero; decay to the chunk end summed directly (no differences)
    revcum = torch.flip(torch.cumsum(torch.flip(Adt, [-1]), -1), [-1])  # sum_{k>=t}
    to_end = torch.exp(F.pad(revcum[..., 1:], (0, 1)))  # sum_{k>t}, (b, g, r, c, Q)
    states = (X * to_end.unsqueeze(-1)).transpose(-1, -2) @ Bg  # (b, g, r, c, p, n)

    # 3. pass states across chunks, starting from h0
    states = torch.cat([_up(h0).reshape(b, g, r, 1, p, n), states], dim=3)  # (b, g, r, c+1, p, n)
    chunk_decay = torch.exp(segsum(F.pad(Adt.sum(-1), (1, 0))))  # (b, g, r, c+1, c+1)
    states = (chunk_decay @ states.flatten(-2)).unflatten(-1, (p, n))
    states, h_last = states[:, :, :, :-1], states[:, :, :, -1]

    # 4. state at each chunk start -> outputs inside the chunk
    from_start = torch.exp(torch.cumsum(Adt, -1)).unsqueeze(-1)  # (b, g, r, c, Q, 1)
    y = y + (Cg @ states.transpose(-1, -2)) * from_start  # (b, g, r, c, Q, p)

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, c * Q, nh, p)[:, :l]
    y = y + _up(x) * _up(D).unsqueeze(-1)
    return y.to(dtype), h_last.reshape(b, nh, p, n)


def ssd_state_update_ref(x, dt, A, B, C, D, dt_bias, h, dt_limit=(0.0, math.inf)):
    """One recurrent step of ssd_ref. x (b, h, p); dt (b, h); B, C (b, g, n); h (b, h, p, n)."""
    dtype = x.dtype
    nh = x.shape[1]
    g = B.shape[1]
    dtf = discretize_dt(dt, dt_bias, dt_limit)  # (b, h)
    a = torch.exp(dtf * _up(A))  # (b, h)
    Bh = _up(B).repeat_interleave(nh // g, dim=1)  # (b, h, n)
    Ch = _up(C).repeat_interleave(nh // g, dim=1)
    xdt = _up(x) * dtf.unsqueeze(-1)  # (b, h, p)
    h = _up(h) * a[..., None, None] + xdt.unsqueeze(-1) * Bh.unsqueeze(2)
    y = torch.einsum("bhpn,bhn->bhp", h, Ch) + _up(x) * _up(D).unsqueeze(-1)
    return y.to(dtype), h


def ssd_step_ref(xBC, dt, conv_weight, conv_bias, conv_state, A, D, dt_bias, h, dt_limit=(0.0, math.inf)):
    """One fused Mamba2 decode step: causal_conv1d_update_ref on x|B|C, split, ssd_state_update_ref.

    xBC (b, conv_dim) before the conv; dt (b, h) raw; conv_state (b, conv_dim, k-1); h (b, h, p, n).
    Returns y (b, h, p) (with the D skip, without the gate), the new conv_state and h.
    """
    b = xBC.shape[0]
    nh, p, n = h.shape[1], h.shape[2], h.shape[3]
    d = nh * p
    g = (xBC.shape[1] - d) // (2 * n)
    xBC, conv_state = causal_conv1d_update_ref(xBC, conv_weight, conv_bias, conv_state, True)
    x, B, C = xBC.split([d, g * n, g * n], dim=-1)
    y, h = ssd_state_update_ref(x.reshape(b, nh, p), dt, A, B.reshape(b, g, n), C.reshape(b, g, n),
                                D, dt_bias, h, dt_limit)
    return y, conv_state, h


def ssd_step_gated_ref(xBC, dt, z, conv_weight, conv_bias, conv_state, A, D, dt_bias, h, norm_weight,
                       dt_limit, norm_before_gate, out, sumsq, counter):
    """ssd_step_ref, then the gate and the norm weight without the norm's 1/rms: the whole
    Mamba2 mixer of a decode step between in_proj and out_proj. conv_state and h are updated in
    place; out (b, d) gets the un-normalised gated-norm output and sumsq (b,) float32 gains each
    row's sum of squares, so rmsnorm_gated_ref(y, z, w, eps, d) == out * rsqrt(sumsq / d + eps)
    (the norm spans the whole row: one group). counter: the kernel's scratch, unused here.
    Twin of triton_step.ssd_step_gated_ (which also needs ngroups == 1 and d_conv 2..4)."""
    b = xBC.shape[0]
    y, cs, hn = ssd_step_ref(xBC, dt, conv_weight, conv_bias, conv_state, A, D, dt_bias, h, dt_limit)
    conv_state.copy_(cs)
    h.copy_(hn)
    y, gate = _up(y.reshape(b, -1)), F.silu(_up(z))  # (b, d)
    if not norm_before_gate:
        y = y * gate
    sumsq.add_(y.pow(2).sum(-1))  # in sumsq's dtype (float32 for the kernel)
    u = y * _up(norm_weight)
    return out.copy_(u * gate if norm_before_gate else u)


def linear_conv1d_update_ref(x, weight, bias, conv_weight, conv_bias, conv_state):
    """Mamba1's decode in_proj with the conv update of its first c outputs: y = linear(x), then
    y[:, :c] -> causal_conv1d_update_ref (SiLU). x (b, K); weight (N, K); conv_weight (c, k),
    c <= N; conv_state (b, c, k-1). Returns the conv'd y[:, :c], the rest y[:, c:] and the new
    conv_state. Twin of triton_gemv.linear_conv1d_update (the GEMV with the conv as its epilogue)."""
    y = F.linear(x, weight, bias)
    c = conv_weight.shape[0]
    yc, conv_state = causal_conv1d_update_ref(y[:, :c], conv_weight, conv_bias, conv_state, True)
    return yc, y[:, c:], conv_state


# ----------------------------------------------------------------------------- weight-only quantized linears

def int8_linear_ref(x, qweight, scales):
    """x (t, in) float; qweight (out, in) int8; scales (out, 1) -> (t, out) in x's dtype. The
    per-row scale commutes with the matmul, so it scales the output. In float16 the unscaled
    product (codes up to 127 times x) overflows where the scaled one does not: float32 there."""
    if x.dtype == torch.float16:
        return (F.linear(x.float(), qweight.float()) * scales.view(1, -1).float()).to(x.dtype)
    return F.linear(x, qweight.to(x.dtype)) * scales.view(1, -1).to(x.dtype)


def int4_linear_ref(x, qweight, scales, zeros, group_size, symmetric):
    """x (t, in) float; qweight (out, in/2) uint8, two 4-bit codes per byte (element 2k in the
    low nibble); scales (out, G) and zeros (out, G) (None when symmetric) per group of
    `group_size` columns -> (t, out): the weight decoded as quant/formats.py stores it, then one
    matmul. (A batched matmul per group that never forms the weight was 2.1x slower for a
    512-token prefill on CPU, and it converted the codes to a float (out, in) tensor anyway.)"""
    from ..quant.formats import decode  # the layout's one decoder (quant imports ops, so not at the top)

    stored = {"qweight": qweight, "scales": scales}
    if not symmetric:
        stored["zeros"] = zeros
    return F.linear(x, decode(stored, "int4", group_size, symmetric, x.dtype))


def w8a8_linear_ref(x, qweight, scales):
    """x (t, in) float; qweight (out, in) int8; scales (out, 1) -> (t, out) in x's dtype: x
    quantized per token to int8 (symmetric, dynamic), the int8 products summed, both scales
    applied after. The sums are floats: exact while |sum| < 2^24 in float32 (up to 1024 columns
    at the worst case, 127 * 127 each), float64 beyond. Twin of torch_fused.w8a8_linear
    (torch._int_mm, exact int32 sums)."""
    xq, xs = quantize_rows_int8(x)
    if x.shape[1] > 1024:
        acc = (xq.double() @ qweight.double().t()).float()
    else:
        acc = xq.float() @ qweight.float().t()
    return (acc * xs * scales.float().view(1, -1)).to(x.dtype)


def quantize_rows_int8(x):
    """x (t, in) -> int8 codes (t, in) and float32 scales (t, 1): per-token absmax / 127."""
    xs = (x.abs().amax(-1, keepdim=True).float() / 127).clamp_min(1e-8)
    return torch.round(x.float() / xs).clamp(-127, 127).to(torch.int8), xs
