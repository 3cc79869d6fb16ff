"""Runtime modules swapped in for nn.Linear / nn.Embedding: they hold the stored tensors of
`formats.py` as buffers and compute with them.

int8, int4 and W8A8 compute through `ops.int8_linear` / `ops.int4_linear` / `ops.w8a8_linear`,
which pick the kernel by device and shape (CPU: a C GEMV over the codes at decode; CUDA: the
Triton GEMV and qmm kernels, torch's tinygemm for int4; `torch._int_mm` for W8A8 where shapes
allow; each op's reference twin otherwise). fp8 dequantizes on the fly (the weight is never kept
in float). The `weight` property gives the dequantized weight, so code that reads
`module.weight` (Mamba1's dt_proj) keeps working unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from . import formats


class _Stored(nn.Module):
    """Keeps the stored buffers (codes, scales, zeros, input_scale) in their format's dtypes:
    `.float()`, `.half()` or `.to(dtype)` on the model move them between devices only. Cast with
    the rest, fp8 codes became float32 (4x the memory) and a checkpoint load_model refuses, and a
    bf16 cast rounded the fp16 scales for good."""

    def _apply(self, fn, recurse=True):
        kept = {k: v for k, v in self._buffers.items() if v is not None}
        self._buffers.update(dict.fromkeys(kept))
        try:
            super()._apply(fn, recurse)
        except BaseException:
            self._buffers.update(kept)
            raise
        for k, v in kept.items():
            new = fn(v)  # a device move, to_empty, ...: taken as is when it keeps the dtype
            self._buffers[k] = new if new.dtype == v.dtype else v.to(new.device)
        return self


class QuantLinear(_Stored):
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
            y = ops.w8a8_linear(x2, self.qweight, self.scales)
        elif self.fmt == "int8":
            y = ops.int8_linear(x2, self.qweight, self.scales)
        elif self.fmt == "int4":
            y = ops.int4_linear(x2, self.qweight, self.scales, getattr(self, "zeros", None), self.group_size,
                                self.symmetric)
        else:
            y = F.linear(x2, self.weight.to(x2.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, group={self.group_size}, sym={self.symmetric}"


class QuantEmbedding(_Stored):
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
