"""Calibration-based weight choices: GPTQ, AWQ and SmoothQuant, one function each.

Each takes the float weight (out, in) and the input statistics of its layer (calib.Stats) and
returns what `QuantLinear` stores: either ready tensors (GPTQ picks the codes itself) or a
rescaled weight plus a per-input-channel `input_scale` to encode with plain rounding.
"""

from __future__ import annotations

import math

import torch

from ..errors import QuantizationError
from . import formats


def _hessian_inverse_factor(H, damp: float, name: str):
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; the damping grows 10x (up to 3
    times) where H is not positive definite in float32 (nearly dependent inputs)."""
    if not bool(torch.isfinite(H).all()):
        raise QuantizationError(f"{name}: the calibration activations of this layer are not finite; "
                                "check the float model's outputs on the calibration text")
    eye = torch.eye(H.shape[0], device=H.device)
    for k in range(4):
        try:
            Hd = H + damp * 10**k * torch.mean(torch.diag(H)) * eye
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise QuantizationError(f"{name}: GPTQ's Hessian stays singular with damping up to {damp * 1000:g}; "
                            "use more calibration text (--n-calib) or quantize with --method int4 / awq")


def gptq(w: torch.Tensor, H: torch.Tensor, group_size: int, symmetric: bool, act_order=False,
         damp=0.01, block_size=128, name: str = "linear") -> dict:
    """GPTQ (Frantar et al. 2022): quantize columns one at a time and push each column's
    rounding error onto the not-yet-quantized columns through the inverse Hessian of the layer's
    reconstruction loss ||X W^T - X Q^T||^2, H = 2 X^T X / n. Returns int4 stored tensors."""
    W = w.detach().float().clone()  # (out, in)
    out_f, in_f = W.shape
    dev = W.device  # a model on a GPU is quantized there; the calibration statistics come from the CPU
    H = H.to(dev, torch.float32, copy=True)
    dead = torch.diag(H) == 0  # inputs that never fire: any value is free, use 0
    H[dead, dead] = 1
    W[:, dead] = 0
    # act-order: groups stay contiguous in the original order, so their grids are fixed up front,
    # from the weights as quantized (dead inputs' zeros, not their stored values)
    grids = formats.group_params(W, 4, symmetric, group_size) if act_order else None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f, device=dev)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _hessian_inverse_factor(H, damp, name)
    n_groups = in_f // group_size
    scales = torch.zeros(out_f, n_groups, device=dev)
    zeros = torch.zeros(out_f, n_groups, device=dev)
    if act_order:
        scales, zeros = grids
    block = max(group_size, block_size // group_size * group_size)  # groups never straddle blocks
    lo, hi = formats.qrange(4, symmetric)
    Q = torch.zeros(out_f, in_f, dtype=torch.int32, device=dev)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1, device=dev), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(perm[col]) // group_size
            if not act_order and col % group_size == 0:
                s, z = formats.group_params(W1[:, i:i + group_size], 4, symmetric, group_size)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            q = (torch.round(W1[:, i] / scales[:, g]) + zeros[:, g]).clamp(lo, hi)
            err = (W1[:, i] - (q - zeros[:, g]) * scales[:, g]) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
            Q[:, col] = q.to(torch.int32)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    out = {"qweight": formats.pack_int4(Q), "scales": scales.to(formats.SCALE_DTYPE)}
    if not symmetric:
        out["zeros"] = zeros.to(torch.uint8)
    return out


def awq(w: torch.Tensor, X: torch.Tensor, mean_abs: torch.Tensor, group_size: int, symmetric: bool,
        grid: int = 20, clip: bool = True):
    """AWQ (Lin et al. 2023): scale input channel j by s_j = mean|x_j|^alpha before rounding, so
    salient channels (large activations) get finer steps; the activation is multiplied by 1/s.
    alpha is searched on a grid in [0, 1) for the lowest output error on calibration rows X;
    alpha = 0 is plain rounding, so the result is never worse than it on X.
    -> (weight to encode (out, in), input_scale (in,))."""
    W = w.detach().float()
    X = X.to(W.device, torch.float32)  # gathered on the CPU: to the weight's device (a model quantized on a GPU)
    ref = X @ W.T  # (t, out)
    a = mean_abs.to(W.device, torch.float32).clamp_min(1e-5)
    best = (math.inf, torch.ones_like(a))
    for k in range(grid):
        s = a.pow(k / grid)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (keeps fp16 scales in range)
        Wq = formats.fake_quant(W * s, 4, symmetric, group_size) / s
        err = float((X @ Wq.T - ref).pow(2).mean())
        if err < best[0]:
            best = (err, s)
    s = best[1]
    Ws = W * s
    if clip:
        Ws = _clip_search(Ws, X / s, group_size, symmetric)
    return Ws, 1.0 / s


CLIP_RATIOS = [1.0 - 0.05 * i for i in range(10)]  # 1.0 .. 0.55 of each group's range
CLIP_ROWS = 1024  # calibration rows used for the clipping search


@torch.no_grad()
def _clip_search(W, X, group_size: int, symmetric: bool):
    """AWQ's second step: per (output row, group) shrink the quantization range to the ratio
    whose rounding error, seen through the calibration activations of that group, is smallest
    (clipping a few outliers buys finer steps for all other weights). Ratio 1.0 is a candidate,
    so no group gets worse on its own. W (out, in) -> clipped W."""
    out_f, in_f = W.shape
    G = in_f // group_size
    Xg = X[:CLIP_ROWS].reshape(-1, G, group_size)  # (t, G, gs)
    Wg = W.reshape(out_f, G, group_size)
    hi, lo = Wg.amax(-1, keepdim=True), Wg.amin(-1, keepdim=True)
    if symmetric:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    best_err = torch.full((out_f, G), math.inf, device=W.device)
    best = Wg.clone()
    for r in CLIP_RATIOS:
        Wc = torch.minimum(torch.maximum(Wg, lo * r), hi * r)  # (out, G, gs)
        dq = formats.fake_quant(Wc.reshape(out_f, in_f), 4, symmetric, group_size).reshape(out_f, G, group_size)
        err = torch.einsum("tgk,ogk->tog", Xg, dq - Wg).pow(2).sum(0)  # (out, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), Wc, best)
    return best.reshape(out_f, in_f)


def smoothquant(w: torch.Tensor, act_absmax: torch.Tensor, alpha: float = 0.5):
    """SmoothQuant (Xiao et al. 2022): move activation outliers into the weight,
    s_j = max|x_j|^alpha / max|W_:j|^(1-alpha); x' = x / s, W' = W * s, so both quantize to int8
    with less error. -> (weight to encode, input_scale = 1/s)."""
    W = w.detach().float()
    wmax = W.abs().amax(0).clamp_min(1e-5)
    amax = act_absmax.to(W.device, torch.float32).clamp_min(1e-5)  # gathered on the CPU
    s = (amax.pow(alpha) / wmax.pow(1 - alpha)).clamp(1e-4, 1e4)
    return W * s, 1.0 / s
