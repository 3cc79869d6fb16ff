"""Mamba1 decode on CPUs, one C call per block (cpu_decode.c), over the model's own weights.

`MambaLM.step` asks `decode_plan(model, batch)` first; it returns a callable
`(ids, state) -> logits` when the fast path applies (float32 CPU Mamba1, unquantized
projections, the default ops backend, no autograd, a C compiler, batch <= MAX_BATCH) and None
otherwise, and the module path (the readable twin) runs. The plan holds the weight tensors it
points into, so their memory outlives it, and re-checks each step that the model still has
those same, unmodified tensors (a quantization swap or an in-place update rebuilds it).
"""

from __future__ import annotations

import ctypes

import torch

from . import get_backend
from .cpu_kernels import _lib

MAX_BATCH = 8  # the GEMV loops over batch rows inside each weight row


def _block_tensors(block) -> list:
    m = block.mixer
    return [block.norm.weight, m.in_proj.weight, m.in_proj.bias, m.conv1d.weight, m.conv1d.bias,
            m.x_proj.weight, m.dt_proj.weight, m.dt_proj.bias, m.A_log, m.D, m.out_proj.weight, m.out_proj.bias]


def _tensors(model) -> list:
    ts = [t for layer in model.backbone.layers for t in _block_tensors(layer)]
    return ts + [model.backbone.embeddings.weight, model.backbone.norm_f.weight, model.lm_head.weight]


def _key(model) -> tuple:
    return tuple((id(t), t.data_ptr(), t._version) if t is not None else None for t in _tensors(model))


class _Plan:
    def __init__(self, model):
        self.key = _key(model)
        self.cfg = cfg = model.config
        self.keep = []  # tensors the pointers point into
        ptrs = []
        for layer in model.backbone.layers:
            ts = _block_tensors(layer)
            ts[3] = ts[3].detach()[:, 0].contiguous()  # (d, 1, k) -> (d, k)
            ts[8] = -torch.exp(ts[8].detach().float())  # A
            ts = [None if t is None else t.detach().contiguous() for t in ts]
            self.keep += ts
            ptrs.append((ctypes.c_void_p * 12)(*[None if t is None else t.data_ptr() for t in ts]))
        self.ptrs = ptrs
        self.embed = model.backbone.embeddings.weight
        self.norm_f = model.backbone.norm_f.weight.detach().contiguous()
        self.head = model.lm_head.weight.detach().contiguous()
        self.keep += [self.norm_f, self.head]
        self.dims = (cfg.d_model, cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank, cfg.d_conv)

    def __call__(self, ids, state):
        lib = _lib()
        cfg = self.cfg
        dm, d, n, r, kc = self.dims
        state.check(cfg, ids.shape[0])
        b = ids.shape[0]
        nt = torch.get_num_threads()
        h = self.embed.detach()[ids].contiguous()  # (b, dm): the residual stream
        work = torch.empty(b * (2 * dm + 4 * d + r + 2 * n))
        conv, ssm = state.conv.data_ptr(), state.ssm.data_ptr()
        conv_stride, ssm_stride = state.conv[0].numel() * 4, state.ssm[0].numel() * 4  # bytes per layer
        eps, mixer_eps, bc_rms = cfg.rms_norm_eps, cfg.mixer_rms_eps, int(cfg.dt_bc_rms)
        for i, ptrs in enumerate(self.ptrs):
            lib.mamba1_block_step_f32(ptrs, h.data_ptr(), conv + i * conv_stride, ssm + i * ssm_stride,
                                      work.data_ptr(), b, dm, d, n, r, kc, eps, mixer_eps, bc_rms, nt)
        logits = torch.empty(b, self.head.shape[0])
        lib.lm_head_step_f32(self.norm_f.data_ptr(), self.head.data_ptr(), h.data_ptr(), logits.data_ptr(),
                             work.data_ptr(), b, dm, self.head.shape[0], eps, nt)
        return logits


def _applies(model, batch: int, state) -> bool:
    from ..model import Linear  # the quantized swaps are other classes

    cfg = model.config
    if (cfg.arch != "mamba1" or model.dtype != torch.float32 or model.device.type != "cpu"
            or get_backend() != "auto" or not 1 <= batch <= MAX_BATCH or _lib() is None):
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return False
    if state.conv.dtype != torch.float32 or state.ssm.dtype != torch.float32:
        return False
    if not (state.conv.is_contiguous() and state.ssm.is_contiguous()):
        return False
    if type(model.lm_head) is not Linear:
        return False
    return all(type(x) is Linear for layer in model.backbone.layers
               for x in (layer.mixer.in_proj, layer.mixer.x_proj, layer.mixer.dt_proj, layer.mixer.out_proj))


def decode_plan(model, batch: int, state):
    """The fast decode step for this model and batch, or None (see the module docstring)."""
    if not _applies(model, batch, state):
        return None
    plan = getattr(model, "_cpu_decode_plan", None)
    if plan is None or plan.key != _key(model):
        plan = _Plan(model)
        object.__setattr__(model, "_cpu_decode_plan", plan)  # not a submodule / parameter
    return plan
