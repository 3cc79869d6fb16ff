"""Weight formats: the tables every other quant module reads, and the quantize / dequantize math.

A *format* is how one Linear's weight is stored; a *method* (int8, int4, gptq, awq, smoothquant,
fp8) is how the stored values are chosen. Several methods share a format (gptq and awq both
produce `int4` tensors), so the runtime only needs to know formats.

Stored tensors per quantized module `m` (names in the safetensors file):
    m.qweight  int8 (out, in) | uint8 (out, in/2) two 4-bit codes per byte, low nibble first
               | float8_e4m3fn (out, in) | float16 (out, in)
    m.scales   float16 (out, in/group) for int4, (out, 1) for int8 / w8a8 / fp8 per-channel,
               (1, 1) for fp8 per-tensor
    m.zeros    uint8 (out, in/group) zero points, asymmetric int4 only
    m.input_scale  float32 (in,) multiplies the activation first (AWQ / SmoothQuant smoothing)
    m.bias     kept in float
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch

from ..errors import QuantizationError

# format -> facts. `bits` is the code width; `group` False means one scale per output row.
FORMATS = {
    "int8": dict(bits=8, grouped=False, qdtype=torch.int8),
    "int4": dict(bits=4, grouped=True, qdtype=torch.uint8),
    "w8a8": dict(bits=8, grouped=False, qdtype=torch.int8),  # + dynamic per-token int8 activations
    "fp8": dict(bits=8, grouped=False, qdtype=torch.float8_e4m3fn),
    "fp16": dict(bits=16, grouped=False, qdtype=torch.float16),  # "keep in 16 bits" for mixed precision
}
GROUP_SIZES = (32, 64, 128)  # int4 groups offered (issue: 32/64/128); any divisor of the row also works
FP8_MAX = 448.0  # largest finite e4m3fn value
FP8_SCALINGS = ("tensor", "channel")
SCALE_DTYPE = torch.float16
# the stored codes' dtypes (safetensors' names): what identifies one quantization of a model (codes_digest)
CODE_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3"}
# smallest scale stored: float16's smallest subnormal (2**-24). A smaller floor rounds to 0 when
# stored, and a zero scale makes an all-zero row or group decode as 0/0 = NaN
SCALE_MIN = 2.0**-24


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: symmetric is [-(2^(b-1)-1), 2^(b-1)-1] (no -128 so +-amax map evenly);
    asymmetric is unsigned [0, 2^b - 1]."""
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def check_group(name: str, in_features: int, group_size: int, rule: str | None = None) -> None:
    """rule: the --config glob that set this group size (the fix is then in that rule, since a
    rule's group_size overrides --group-size)."""
    if group_size <= 0 or in_features % group_size:
        fit = ([g for g in GROUP_SIZES if in_features % g == 0] or [in_features])[-1]
        if in_features % 2:  # int4 packs two codes a byte: no group size makes an odd row int4
            fix = (f"make the format of rule {rule!r} int8" if rule is not None else
                   f'keep this layer in int8 through a --config rule ({{"quant_cfg": {{"{name}": {{"format": '
                   '"int8"}}}), or quantize with --method int8')
            raise QuantizationError(f"{name}: row length {in_features} is odd, which int4 cannot pack (two codes "
                                    f"a byte); {fix}")
        fix = (f"set the group_size of rule {rule!r} to {fit} (or make its format int8)" if rule is not None else
               f"use --group-size {fit} (group_size= in Python) or keep this layer in int8 through a --config rule")
        raise QuantizationError(f"{name}: row length {in_features} is not divisible by group size {group_size}; {fix}")


# ----------------------------------------------------------------------------- scale search

def group_params(w: torch.Tensor, bits: int, symmetric: bool, group_size: int):
    """w (out, in) -> scales (out, in/g) and zeros (out, in/g) (float, zeros in code units).
    group_size == in gives per-row parameters."""
    out_f, in_f = w.shape
    wg = w.reshape(out_f, in_f // group_size, group_size).float()
    lo, hi = qrange(bits, symmetric)
    if symmetric:
        amax = wg.abs().amax(-1)
        scales = (amax / hi).clamp_min(SCALE_MIN)
        zeros = torch.zeros_like(scales)
    else:  # include 0 in the range so exact zeros stay exact
        wmin = wg.amin(-1).clamp_max(0)
        wmax = wg.amax(-1).clamp_min(0)
        scales = ((wmax - wmin) / (hi - lo)).clamp_min(SCALE_MIN)
        zeros = torch.round(-wmin / scales).clamp(lo, hi)
    # round the scale to its stored dtype first so quantize and dequantize see the same value
    return scales.to(SCALE_DTYPE).float(), zeros


def quantize_codes(w, scales, zeros, bits: int, symmetric: bool, group_size: int):
    """w (out, in) float -> integer codes (out, in) int32, given per-group scales / zeros."""
    out_f, in_f = w.shape
    lo, hi = qrange(bits, symmetric)
    wg = w.reshape(out_f, in_f // group_size, group_size).float()
    q = torch.round(wg / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)
    return q.clamp(lo, hi).to(torch.int32).reshape(out_f, in_f)


def dequantize_codes(q, scales, zeros, group_size: int, dtype=torch.float32):
    """codes (out, in) -> weight (out, in) in `dtype`."""
    out_f, in_f = q.shape
    qg = q.reshape(out_f, in_f // group_size, group_size).to(dtype)
    w = (qg - zeros.to(dtype).unsqueeze(-1)) * scales.to(dtype).unsqueeze(-1)
    return w.reshape(out_f, in_f)


def fake_quant(w, bits: int, symmetric: bool, group_size: int):
    """Round trip w through the integer grid (what the runtime will compute), in float32."""
    scales, zeros = group_params(w, bits, symmetric, group_size)
    return dequantize_codes(quantize_codes(w, scales, zeros, bits, symmetric, group_size), scales, zeros, group_size)


# ----------------------------------------------------------------------------- packing

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """codes (out, in) in [0, 15] or [-7, 7] -> uint8 (out, in/2); element 2k in the low nibble
    (the order ONNX Runtime's MatMulNBits expects, so export copies bytes)."""
    u = (q & 0xF).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """uint8 (out, in/2) -> codes (out, in) int32 (signed when symmetric)."""
    # nibble work stays in uint8 (int32 elementwise ops are ~10x slower on CPU for this)
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    if symmetric:  # two's complement nibble -> signed: flip the sign bit, then shift by 8
        return (q ^ 8).to(torch.int32) - 8
    return q.to(torch.int32)


# ----------------------------------------------------------------------------- whole-tensor encoders

def encode(w: torch.Tensor, fmt: str, name: str, group_size: int = 128, symmetric: bool = True,
           fp8_scaling: str = "channel") -> dict:
    """w (out, in) float -> the tensors stored for `fmt` (see module docstring); QuantizationError
    where a stored float16 tensor (fp16 weights, any format's scales) would overflow to inf."""
    out = _encode(w, fmt, name, group_size, symmetric, fp8_scaling)
    for k, t in out.items():
        if t.dtype == torch.float16 and not bool(torch.isfinite(t).all()):
            raise QuantizationError(
                f"{name}: weights up to {float(w.detach().abs().max()):.4g} overflow the float16 {k} of format "
                f"{fmt!r} (largest 65504); quantize this layer to int8 (a --config rule) or keep it in float "
                '({"enable": false})')
    return out


def _encode(w: torch.Tensor, fmt: str, name: str, group_size: int, symmetric: bool, fp8_scaling: str) -> dict:
    if fmt not in FORMATS:
        raise QuantizationError(f"{name}: unknown weight format {fmt!r}; choose one of {sorted(FORMATS)}")
    w = w.detach().float()
    out_f, in_f = w.shape
    if fmt == "fp16":
        return {"qweight": w.to(torch.float16)}
    if fmt == "fp8":
        if fp8_scaling not in FP8_SCALINGS:
            raise QuantizationError(f"fp8 scaling {fp8_scaling!r} unknown; choose one of {FP8_SCALINGS}")
        amax = w.abs().amax() if fp8_scaling == "tensor" else w.abs().amax(1)
        scales = (amax / FP8_MAX).clamp_min(SCALE_MIN).to(SCALE_DTYPE).float().reshape(-1, 1)
        return {"qweight": (w / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn),
                "scales": scales.to(SCALE_DTYPE)}
    if fmt in ("int8", "w8a8"):  # per output channel, symmetric
        scales, zeros = group_params(w, 8, True, in_f)
        q = quantize_codes(w, scales, zeros, 8, True, in_f)
        return {"qweight": q.to(torch.int8), "scales": scales.to(SCALE_DTYPE)}
    check_group(name, in_f, group_size)
    if in_f % 2:
        raise QuantizationError(f"{name}: int4 packing needs an even row length, got {in_f}; use int8 for it")
    scales, zeros = group_params(w, 4, symmetric, group_size)
    q = quantize_codes(w, scales, zeros, 4, symmetric, group_size)
    out = {"qweight": pack_int4(q), "scales": scales.to(SCALE_DTYPE)}
    if not symmetric:
        out["zeros"] = zeros.to(torch.uint8)
    return out


def decode(t: dict, fmt: str, group_size: int, symmetric: bool, dtype=torch.float32) -> torch.Tensor:
    """Stored tensors -> weight (out, in) in `dtype`; exact inverse of the runtime's view."""
    qw = t["qweight"]
    if fmt == "fp16":
        return qw.to(dtype)
    if fmt == "fp8":
        return (qw.to(torch.float32) * t["scales"].float()).to(dtype)
    if fmt in ("int8", "w8a8"):
        return (qw.to(dtype) * t["scales"].to(dtype))
    q = unpack_int4(qw, symmetric)
    zeros = t["zeros"].float() if "zeros" in t else torch.zeros_like(t["scales"], dtype=torch.float32)
    return dequantize_codes(q, t["scales"], zeros, group_size, dtype)


def stored_shapes(fmt: str, out_f: int, in_f: int, group_size: int, symmetric: bool, fp8_scaling="channel"):
    """name -> (shape, dtype) of what `encode` writes; the runtime allocates these before loading."""
    if fmt == "fp16":
        return {"qweight": ((out_f, in_f), torch.float16)}
    if fmt == "int4":
        s = {"qweight": ((out_f, in_f // 2), torch.uint8), "scales": ((out_f, in_f // group_size), SCALE_DTYPE)}
        if not symmetric:
            s["zeros"] = ((out_f, in_f // group_size), torch.uint8)
        return s
    rows = 1 if (fmt == "fp8" and fp8_scaling == "tensor") else out_f
    return {"qweight": ((out_f, in_f), FORMATS[fmt]["qdtype"]), "scales": ((rows, 1), SCALE_DTYPE)}


def codes_digest(named_tensors) -> str | None:
    """sha256 over the stored codes ((name, tensor) pairs of CODE_DTYPES: qweight codes, int4 zero
    points), in name order; None where there are none. Two quantized models with one digest hold
    the same codes, so their float functions differ only where their scales do (an export of a
    checkpoint against the checkpoint: verify then holds it to the export's compute error)."""
    h, n = hashlib.sha256(), 0
    for name, t in sorted(((k, v) for k, v in named_tensors if v.dtype in CODE_DTYPES), key=lambda kv: kv[0]):
        h.update(f"{name}:{CODE_DTYPES[t.dtype]}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        n += 1
    return h.hexdigest() if n else None


def folder_codes_digest(folder) -> str | None:
    """codes_digest of a quantized checkpoint folder's safetensors files (only the codes are read),
    None where it has none or they cannot be read."""
    from safetensors import SafetensorError, safe_open

    from ..pathnames import text_path

    files = sorted(Path(folder).glob("*.safetensors"))
    wanted = set(CODE_DTYPES.values())
    try:
        with contextlib.ExitStack() as stack:
            names = [stack.enter_context(text_path(f)) for f in files]  # safetensors takes UTF-8 names only
            handles = [stack.enter_context(safe_open(n, framework="pt")) for n in names]
            named = ((k, h.get_tensor(k)) for h in handles for k in h.keys() if h.get_slice(k).get_dtype() in wanted)
            return codes_digest(named)
    # a corrupt shard (safetensors' own error is none of the others): no claim, verify keeps the
    # looser row and loading the reference then names the file
    except (OSError, ValueError, RuntimeError, SafetensorError):
        return None
