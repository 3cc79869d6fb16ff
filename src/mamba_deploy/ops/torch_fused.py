"""torch's own fused kernels behind op names: tinygemm int4 (`_weight_int4pack_mm`, CUDA) and
int8 x int8 -> int32 matmul (`_int_mm`, W8A8). Each falls back to its `reference` twin for shapes
the kernel refuses, so callers (quant/modules.py) never choose.

tinygemm reads its own packing of the codes; it is made on first use and kept per weight tensor
until that tensor is freed or changed in place (its version counter moves).
"""

from __future__ import annotations

import functools
import weakref

import torch

from . import reference

TINYGEMM_INNER_K_TILES = 8
TINYGEMM_GROUPS = (32, 64, 128, 256)
_packed: dict[int, tuple] = {}  # id(qweight) -> (key, packed codes, scales and zeros)


@functools.lru_cache(maxsize=None)
def int_mm_runs(device_type: str) -> bool:
    """Probe once per device type whether torch._int_mm runs here."""
    try:
        a = torch.ones(32, 32, device=device_type, dtype=torch.int8)  # CUDA needs > 16 rows
        torch._int_mm(a, torch.ones(32, 16, device=device_type, dtype=torch.int8))
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def w8a8_linear(x, qweight, scales):
    """Same contract as reference.w8a8_linear_ref, the int8 products summed by torch._int_mm in
    int32 where it takes the shapes (more than 16 rows, K and N multiples of 8; decode's one row
    takes the reference)."""
    if x.shape[0] > 16 and x.shape[1] % 8 == 0 and qweight.shape[0] % 8 == 0 and int_mm_runs(x.device.type):
        xq, xs = reference.quantize_rows_int8(x)
        acc = torch._int_mm(xq, qweight.t()).float()  # (t, out) exact int32 sums
        return (acc * xs * scales.float().view(1, -1)).to(x.dtype)
    return reference.w8a8_linear_ref(x, qweight, scales)


def tinygemm_fits(x, qweight, group_size: int) -> bool:
    """Shapes torch's CUDA int4 kernel accepts (K = in_features, N = out_features)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    return bool(x.is_cuda and group_size in TINYGEMM_GROUPS and k % (TINYGEMM_INNER_K_TILES * 16) == 0
                and n % 8 == 0 and hasattr(torch, "_weight_int4pack_mm"))


def tinygemm_pack(qweight, scales, zeros, symmetric: bool):
    """Our int4 layout (quant/formats.py) -> (packed codes, (G, N, 2) scales and zeros) for
    torch._weight_int4pack_mm. tinygemm computes w = (u - 8) * scale + zero per group with
    unsigned codes u, so our symmetric codes map to u = q + 8, zero = 0 and asymmetric ones to
    zero = (8 - z) * scale."""
    from ..quant.formats import unpack_int4  # the layout's one decoder (quant imports ops)

    q = unpack_int4(qweight, symmetric)  # (N, K)
    u = (q + 8) if symmetric else q
    u8 = ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8)  # tinygemm: even element in the high nibble
    packed = torch._convert_weight_to_int4pack(u8.contiguous(), TINYGEMM_INNER_K_TILES)
    s = scales.float()  # (N, G)
    z = torch.zeros_like(s) if symmetric else (8 - zeros.float()) * s
    return packed, torch.stack([s, z], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


def tinygemm_linear(x, qweight, scales, zeros, group_size, symmetric):
    """Same contract as reference.int4_linear_ref for shapes where tinygemm_fits: bf16
    activations (the kernel's only dtype), the output cast back to x's dtype."""
    from ..model import tensor_version  # as cpu_decode's plan keys its tensors

    key = (*(None if t is None else (t.data_ptr(), tensor_version(t)) for t in (qweight, scales, zeros)), symmetric)
    entry = _packed.get(id(qweight))
    if entry is None or entry[0] != key:
        if entry is None:  # forget the packing with the tensor (its id may be reused after)
            weakref.finalize(qweight, _packed.pop, id(qweight), None)
        entry = _packed[id(qweight)] = (key, *tinygemm_pack(qweight, scales, zeros, symmetric))
    _, packed, sz = entry
    y = torch._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), packed, group_size, sz)
    return y.to(x.dtype)
