"""Mamba1 / Mamba2 decode on CPUs, one C call per block (cpu_decode.c), over the model's own weights.

`MambaLM.step` asks `decode_plan(model, batch)` first; it returns a callable
`(ids, state) -> logits` when the fast path applies (float32 CPU model, unquantized
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


def _block_tensors(block, arch: str) -> list:
    """In the order of the P arrays in cpu_decode.c; A_log is at index A_INDEX[arch]."""
    m = block.mixer
    if arch == "mamba1":
        return [block.norm.weight, m.in_proj.weight, m.in_proj.bias, m.conv1d.weight, m.conv1d.bias,
                m.x_proj.weight, m.dt_proj.weight, m.dt_proj.bias, m.A_log, m.D, m.out_proj.weight,
                m.out_proj.bias]
    return [block.norm.weight, m.in_proj.weight, m.in_proj.bias, m.conv1d.weight, m.conv1d.bias, m.dt_bias,
            m.A_log, m.D, m.norm.weight if hasattr(m, "norm") else None, m.out_proj.weight, m.out_proj.bias]


A_INDEX = {"mamba1": 8, "mamba2": 6}
PROJECTIONS = {"mamba1": ("in_proj", "x_proj", "dt_proj", "out_proj"), "mamba2": ("in_proj", "out_proj")}


def _tensors(model) -> list:
    ts = [t for layer in model.backbone.layers for t in _block_tensors(layer, model.config.arch)]
    return ts + [model.backbone.embeddings.weight, model.backbone.norm_f.weight, model.lm_head.weight]


def _key(model) -> tuple:
    return tuple((id(t), t.data_ptr(), t._version) if t is not None else None for t in _tensors(model))


def _no_plan():
    return None


class _Plan:
    def __reduce__(self):
        # copy.deepcopy(model) and pickling copy the model's __dict__, where the plan is kept; its
        # ctypes pointers point into the original's tensors, so a copy gets no plan (rebuilt on use)
        return _no_plan, ()

    def __init__(self, model):
        self.key = _key(model)
        self.cfg = cfg = model.config
        self.keep = []  # tensors the pointers point into
        ptrs = []
        ai = A_INDEX[cfg.arch]
        for layer in model.backbone.layers:
            ts = _block_tensors(layer, cfg.arch)
            ts[3] = ts[3].detach()[:, 0].contiguous()  # (channels, 1, k) -> (channels, k)
            ts[ai] = -torch.exp(ts[ai].detach().float())  # A
            ts = [None if t is None else t.detach().contiguous() for t in ts]
            self.keep += ts
            ptrs.append((ctypes.c_void_p * len(ts))(*[None if t is None else t.data_ptr() for t in ts]))
        self.ptrs = ptrs
        self.embed = model.backbone.embeddings.weight
        self.norm_f = model.backbone.norm_f.weight.detach().contiguous()
        self.head = model.lm_head.weight.detach().contiguous()
        self.keep += [self.norm_f, self.head]

    def _block_call(self, b: int, nt: int):
        """-> (the C block step, its trailing arguments, work floats) for this config and batch."""
        cfg, lib = self.cfg, _lib()
        dm, d, n, kc = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv
        if cfg.arch == "mamba1":
            r = cfg.resolved_dt_rank
            return (lib.mamba1_block_step_f32, (b, dm, d, n, r, kc, cfg.rms_norm_eps, cfg.mixer_rms_eps,
                                                int(cfg.dt_bc_rms), nt), b * (2 * dm + 4 * d + r + 2 * n))
        g, nh = cfg.ngroups, cfg.nheads
        width = 2 * d + 2 * g * n + nh  # in_proj's output: z | xBC | dt
        lo, hi = cfg.dt_limit
        return (lib.mamba2_block_step_f32, (b, dm, nh, cfg.headdim, g, n, kc, cfg.rms_norm_eps, cfg.rms_norm_eps,
                                            lo, hi, int(cfg.norm_before_gate), nt), b * (2 * dm + width + d))

    def __call__(self, ids, state):
        lib = _lib()
        cfg = self.cfg
        state.check(cfg, ids.shape[0])
        b = ids.shape[0]
        nt = torch.get_num_threads()
        h = self.embed.detach()[ids].contiguous()  # (b, dm): the residual stream
        step, args, work_floats = self._block_call(b, nt)
        work = torch.empty(max(work_floats, b * cfg.d_model))
        conv, ssm = state.conv.data_ptr(), state.ssm.data_ptr()
        conv_stride, ssm_stride = state.conv[0].numel() * 4, state.ssm[0].numel() * 4  # bytes per layer
        for i, ptrs in enumerate(self.ptrs):
            step(ptrs, h.data_ptr(), conv + i * conv_stride, ssm + i * ssm_stride, work.data_ptr(), *args)
        eps, dm = cfg.rms_norm_eps, cfg.d_model
        logits = torch.empty(b, self.head.shape[0])
        lib.lm_head_step_f32(self.norm_f.data_ptr(), self.head.data_ptr(), h.data_ptr(), logits.data_ptr(),
                             work.data_ptr(), b, dm, self.head.shape[0], eps, nt)
        return logits


def _applies(model, batch: int, state) -> bool:
    from ..model import Linear  # the quantized swaps are other classes

    cfg = model.config
    if (cfg.arch not in A_INDEX or model.dtype != torch.float32 or model.device.type != "cpu"
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
    return all(type(getattr(layer.mixer, name)) is Linear for layer in model.backbone.layers
               for name in PROJECTIONS[cfg.arch])


def decode_plan(model, batch: int, state):
    """The fast decode step for this model and batch, or None (see the module docstring)."""
    if not _applies(model, batch, state):
        return None
    plan = getattr(model, "_cpu_decode_plan", None)
    if plan is None or plan.key != _key(model):
        plan = _Plan(model)
        object.__setattr__(model, "_cpu_decode_plan", plan)  # not a submodule / parameter
    return plan
