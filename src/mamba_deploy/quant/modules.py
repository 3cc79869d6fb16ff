"""Runtime modules swapped in for nn.Linear / nn.Embedding: they hold the stored tensors of
`formats.py` as buffers and compute with them.

CPU: int8 and int4 go through `ops.int8_linear` / `ops.int4_linear`: at decode a C GEMV that
reads only the codes, else the codes converted on the fly with the scales applied after the
matmul (per row / per group); W8A8 uses `torch._int_mm`; fp8 dequantizes on the fly (the weight
is never kept in float). CUDA: int8 the Triton GEMV over the codes at one row and the Triton
qmm kernel (ops/triton_qmm.py) at 2..64 rows; int4 torch's tinygemm `_weight_int4pack_mm`, and
the qmm kernel for shapes tinygemm refuses; W8A8 `_int_mm`, where shapes allow; fallbacks otherwise. The `weight`
property gives the dequantized weight, so code that reads `module.weight` (Mamba1's dt_proj) keeps
working unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from . import formats


@functools.lru_cache(maxsize=None)
def _kernel_ok(name: str, device_type: str) -> bool:
    """Probe once per (kernel, device) whether torch's fused op runs here."""
    try:
        if name == "int_mm":
            a = torch.ones(32, 32, device=device_type, dtype=torch.int8)  # CUDA needs > 16 rows
            torch._int_mm(a, torch.ones(32, 16, device=device_type, dtype=torch.int8))
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


class QuantLinear(nn.Module):
    """y = (x * input_scale) @ W^T + bias, W stored in `fmt`."""

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int | None = None,
                 symmetric: bool = True, bias: bool = False, fp8_scaling: str = "channel",
                 input_scale: bool = False, compute_dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.symmetric, self.fp8_scaling = fmt, symmetric, fp8_scaling
        self.group_size = group_size or in_features
        self.compute_dtype = compute_dtype
        for name, (shape, dtype) in formats.stored_shapes(fmt, out_features, in_features, self.group_size,
                                                          symmetric, fp8_scaling).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        self.register_buffer("input_scale", torch.ones(in_features) if input_scale else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, fmt: str, name: str, group_size=None, symmetric=True,
                    fp8_scaling="channel", input_scale=None, weight=None):
        """Quantize `weight` (default lin.weight, already multiplied by 1/input_scale's inverse
        when smoothing) and wrap it."""
        w = lin.weight if weight is None else weight
        m = cls(lin.in_features, lin.out_features, fmt, group_size, symmetric, lin.bias is not None,
                fp8_scaling, input_scale is not None, lin.weight.dtype)
        m.to(lin.weight.device)
        for k, t in formats.encode(w, fmt, name, m.group_size, symmetric, fp8_scaling).items():
            getattr(m, k).copy_(t)
        if input_scale is not None:
            m.input_scale.copy_(input_scale)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.data)
        return m

    def stored(self) -> dict:
        return {k: v for k, v in self._buffers.items() if v is not None and k != "input_scale"}

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized (out, in) in the compute dtype."""
        return formats.decode(self.stored(), self.fmt, self.group_size, self.symmetric, self.compute_dtype)

    def forward(self, x):
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        if self.fmt == "w8a8":
            y = _w8a8_mm(x2, self.qweight, self.scales)
        elif self.fmt == "int8":  # a GEMV over the codes at decode (ops.int8_linear: C on CPU, Triton on CUDA)
            y = ops.int8_linear(x2, self.qweight, self.scales)
        elif self.fmt == "int4" and x2.is_cuda and _tinygemm_fits(self):
            y = self._int4_cuda(x2)
        elif self.fmt == "int4":
            y = ops.int4_linear(x2, self.qweight, self.scales, getattr(self, "zeros", None), self.group_size,
                                self.symmetric)
        else:
            y = F.linear(x2, self.weight.to(x2.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _int4_cuda(self, x2):
        """torch's tinygemm int4 kernel (CUDA, bf16 activations), on the codes repacked once
        (tinygemm_pack) and kept while the buffers stay the same."""
        key = (self.qweight.data_ptr(), self.scales.data_ptr())
        if getattr(self, "_tiny", (None,))[0] != key:
            self._tiny = (key, *tinygemm_pack(self.qweight, self.scales, getattr(self, "zeros", None),
                                              self.symmetric))
        _, packed, sz = self._tiny
        y = torch._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), packed, self.group_size, sz)
        return y.to(x2.dtype)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, group={self.group_size}, sym={self.symmetric}"


TINYGEMM_INNER_K_TILES = 8
TINYGEMM_GROUPS = (32, 64, 128, 256)


def tinygemm_pack(qweight, scales, zeros, symmetric: bool):
    """Our int4 layout (quant/formats.py) -> (packed codes, (G, N, 2) scales and zeros) for
    torch._weight_int4pack_mm. tinygemm computes w = (u - 8) * scale + zero per group with
    unsigned codes u, so our symmetric codes map to u = q + 8, zero = 0 and asymmetric ones to
    zero = (8 - z) * scale."""
    q = formats.unpack_int4(qweight, symmetric)  # (N, K)
    u = (q + 8) if symmetric else q
    u8 = ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8)  # tinygemm: even element in the high nibble
    packed = torch._convert_weight_to_int4pack(u8.contiguous(), TINYGEMM_INNER_K_TILES)
    s = scales.float()  # (N, G)
    z = torch.zeros_like(s) if symmetric else (8 - zeros.float()) * s
    return packed, torch.stack([s, z], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


def _tinygemm_fits(m) -> bool:
    """Shapes torch's CUDA int4 kernel accepts; others fall back to dequantize + matmul."""
    return (m.group_size in TINYGEMM_GROUPS and m.in_features % (TINYGEMM_INNER_K_TILES * 16) == 0
            and m.out_features % 8 == 0 and hasattr(torch, "_weight_int4pack_mm"))


def _w8a8_mm(x, qweight, w_scales):
    """x (t, in) float, qweight (out, in) int8, w_scales (out, 1): dynamic per-token symmetric
    int8 activations, int32 accumulation, float rescale."""
    xs = (x.abs().amax(-1, keepdim=True).float() / 127).clamp_min(1e-8)  # (t, 1)
    xq = torch.round(x.float() / xs).clamp(-127, 127).to(torch.int8)
    # CUDA's kernel needs > 16 rows and K, N multiples of 8; decode (1 row) takes the fallback
    if x.shape[0] > 16 and x.shape[1] % 8 == 0 and qweight.shape[0] % 8 == 0 \
            and _kernel_ok("int_mm", x.device.type):
        acc = torch._int_mm(xq, qweight.t()).float()  # (t, out) exact int32 sums
    else:  # float sums of int8 products: exact while |sum| < 2^24 (rows up to ~1000 at worst case)
        acc = xq.double() @ qweight.double().t() if x.shape[1] > 1024 else xq.float() @ qweight.float().t()
        acc = acc.float()
    return (acc * xs * w_scales.float().view(1, -1)).to(x.dtype)


class QuantEmbedding(nn.Module):
    """Rows of a quantized (vocab, d) table, dequantized per looked-up token. Every stored tensor
    is row-indexed (scales / zeros per row), so a lookup just selects rows before decoding."""

    def __init__(self, num_embeddings: int, dim: int, fmt: str, group_size=None, symmetric=True,
                 fp8_scaling="channel", compute_dtype=torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, dim
        self.fmt, self.symmetric, self.fp8_scaling = fmt, symmetric, fp8_scaling
        self.group_size = group_size or dim
        self.compute_dtype = compute_dtype
        for name, (shape, dtype) in formats.stored_shapes(fmt, num_embeddings, dim, self.group_size,
                                                          symmetric, fp8_scaling).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, fmt: str, name: str, group_size=None, symmetric=True,
                       fp8_scaling="channel"):
        m = cls(emb.num_embeddings, emb.embedding_dim, fmt, group_size, symmetric, fp8_scaling, emb.weight.dtype)
        m.to(emb.weight.device)
        for k, t in formats.encode(emb.weight, fmt, name, m.group_size, symmetric, fp8_scaling).items():
            getattr(m, k).copy_(t)
        return m

    @property
    def weight(self):
        return formats.decode(dict(self._buffers), self.fmt, self.group_size, self.symmetric, self.compute_dtype)

    def forward(self, ids):
        flat = ids.reshape(-1)
        rows = {k: (v[flat] if v.shape[0] == self.num_embeddings else v) for k, v in self._buffers.items()}
        out = formats.decode(rows, self.fmt, self.group_size, self.symmetric, self.compute_dtype)
        return out.reshape(*ids.shape, self.embedding_dim)


def tie_head(head: QuantLinear, emb: QuantEmbedding) -> None:
    """Tied embeddings: the head reads the embedding's buffers (one copy in memory and on disk)."""
    for k in list(head.stored()):
        head._buffers[k] = emb._buffers[k]
