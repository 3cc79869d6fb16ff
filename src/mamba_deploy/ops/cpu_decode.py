"""Mamba1 / Mamba2 decode on CPUs, one C call per block (cpu_decode.c), over the model's own weights.

`MambaLM.step` asks `ops.decode_plan(model, batch, state)` first, which comes here for a CPU
state under the default ops backend; `decode_plan` returns a callable `(ids, state) -> logits`
when the fast path applies (float32 CPU model whose projections and head are plain or
weight-only int8 / int4 linears, no autograd, a C compiler, batch <= MAX_BATCH) and None
otherwise, and the module path (the readable twin) runs. The plan
holds the tensors it points into, so their memory outlives it, and re-checks each step that the
model still has those same, unmodified tensors (a quantization swap or an in-place update
rebuilds it). Edits through `.data` do not move a tensor's version counter, so a plan (like the
cached A = -exp(A_log) of the module path) does not see them; edit weights in place under
torch.no_grad() instead.
"""

from __future__ import annotations

import ctypes

import torch

from .cpu_kernels import _lib, int4_groups_ok

MAX_BATCH = 8  # the GEMV loops over batch rows inside each weight row
PROJECTIONS = {"mamba1": ("in_proj", "x_proj", "dt_proj", "out_proj"), "mamba2": ("in_proj", "out_proj")}
LIN_KINDS = {None: 0, "int8": 1, "int4": 2}  # plain float32 Linear, then QuantLinear formats (cpu_common.h)


class Lin(ctypes.Structure):
    """cpu_common.h's Lin: one projection's weights for the C GEMVs."""

    _fields_ = [("kind", ctypes.c_int), ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("zeros", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("in_scale", ctypes.c_void_p),
                ("gs", ctypes.c_long)]


def _fmt(module):
    """None for a plain float32 Linear, the format for a float32 QuantLinear, "other" for anything
    the C GEMVs do not read (other types or dtypes; int4 groups of an odd size, which split a byte)."""
    from ..model import Linear
    from ..quant.modules import QuantLinear

    if type(module) is Linear and module.weight.dtype == torch.float32:
        return None
    if type(module) is QuantLinear and module.compute_dtype == torch.float32:
        if module.fmt == "int4" and not int4_groups_ok(module.group_size, module.in_features):
            return "other"
        return module.fmt
    return "other"


def _lin(module, keep: list) -> Lin:
    """The Lin for a projection; the float32 copies of scales / zero points go to keep."""
    def ptr(t):
        if t is None:
            return None
        t = t.detach().float().contiguous()
        keep.append(t)
        return t.data_ptr()

    fmt = _fmt(module)
    if fmt is None:
        return Lin(0, ptr(module.weight), None, None, ptr(module.bias), None, 0)
    codes = module.qweight.contiguous()  # int8 (n, k) or packed uint8 (n, k/2): read as stored
    keep.append(codes)
    zeros = getattr(module, "zeros", None) if fmt == "int4" else None
    return Lin(LIN_KINDS[fmt], codes.data_ptr(), ptr(module.scales.reshape(module.out_features, -1)), ptr(zeros),
               ptr(module.bias), ptr(module.input_scale), module.group_size if fmt == "int4" else 0)


def _block_parts(block, arch: str) -> list:
    """In the order of the P arrays in cpu_decode.c: tensors, and modules for the projections."""
    m = block.mixer
    if arch == "mamba1":
        return [block.norm.weight, m.in_proj, m.conv1d.weight, m.conv1d.bias, m.x_proj, m.dt_proj, m.A_log, m.D,
                m.out_proj]
    return [block.norm.weight, m.in_proj, m.conv1d.weight, m.conv1d.bias, m.dt_bias, m.A_log, m.D,
            m.norm.weight if hasattr(m, "norm") else None, m.out_proj]


A_INDEX = {"mamba1": 6, "mamba2": 5}


def _tensors(model) -> list:
    """Every tensor the plan reads (a projection's: what it stores, never its dequantized weight)."""
    out = []
    parts = [p for layer in model.backbone.layers for p in _block_parts(layer, model.config.arch)]
    for p in parts + [model.backbone.embeddings, model.backbone.norm_f.weight, model.lm_head]:
        if isinstance(p, torch.nn.Module):
            out += list(p.parameters(recurse=False)) + [b for b in p.buffers(recurse=False)]
        else:
            out.append(p)
    return out


def _key(model) -> tuple:
    from ..model import tensor_version

    return tuple((id(t), t.data_ptr(), tensor_version(t)) if t is not None else None for t in _tensors(model))


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
        # the C code reads every float tensor as float32; a model with another dtype somewhere
        # (one cast layer) takes the module path, which converts or raises as it should
        self.float32 = all(p.dtype == torch.float32 for p in model.parameters())
        if not self.float32:
            return
        self.keep = []  # tensors the pointers point into
        self.lins = []  # the Lin structs the P arrays point to
        ptrs = []
        ai = A_INDEX[cfg.arch]
        for layer in model.backbone.layers:
            parts = _block_parts(layer, cfg.arch)
            parts[2] = parts[2].detach()[:, 0]  # conv weight (channels, 1, k) -> (channels, k)
            parts[ai] = -torch.exp(parts[ai].detach().float())  # A
            slots = []
            for p in parts:
                if isinstance(p, torch.nn.Module):
                    self.lins.append(_lin(p, self.keep))
                    slots.append(ctypes.addressof(self.lins[-1]))
                elif p is None:
                    slots.append(None)
                else:
                    self.keep.append(p.detach().contiguous())
                    slots.append(self.keep[-1].data_ptr())
            ptrs.append((ctypes.c_void_p * len(slots))(*slots))
        self.ptrs = ptrs
        self.embed = model.backbone.embeddings
        self.norm_f = model.backbone.norm_f.weight.detach().contiguous()
        self.head = _lin(model.lm_head, self.keep)
        self.vocab = model.lm_head.out_features
        self.keep.append(self.norm_f)

    def _block_call(self, b: int, nt: int):
        """-> (the C block step, its trailing arguments, work floats) for this config and batch."""
        cfg, lib = self.cfg, _lib()
        dm, d, n, kc = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv
        scratch = 3 * b * max(dm, d)  # lin_apply: smoothed x and int4's split x
        if cfg.arch == "mamba1":
            r = cfg.resolved_dt_rank
            return (lib.mamba1_block_step_f32, (b, dm, d, n, r, kc, cfg.rms_norm_eps, cfg.mixer_rms_eps,
                                                int(cfg.dt_bc_rms), nt), b * (2 * dm + 4 * d + r + 2 * n) + scratch)
        g, nh = cfg.ngroups, cfg.nheads
        width = 2 * d + 2 * g * n + nh  # in_proj's output: z | xBC | dt
        lo, hi = cfg.dt_limit
        return (lib.mamba2_block_step_f32, (b, dm, nh, cfg.headdim, g, n, kc, cfg.rms_norm_eps, cfg.rms_norm_eps,
                                            lo, hi, int(cfg.norm_before_gate), nt), b * (2 * dm + width + d) + scratch)

    def __call__(self, ids, state):
        lib = _lib()
        cfg = self.cfg
        state.check(cfg, ids.shape[0])
        b = ids.shape[0]
        nt = torch.get_num_threads()
        h = self.embed(ids).detach().float().contiguous()  # (b, dm): the residual stream
        step, args, work_floats = self._block_call(b, nt)
        work = torch.empty(work_floats, dtype=torch.float32)
        conv, ssm = state.conv.data_ptr(), state.ssm.data_ptr()
        conv_stride, ssm_stride = state.conv[0].numel() * 4, state.ssm[0].numel() * 4  # bytes per layer
        for i, ptrs in enumerate(self.ptrs):
            step(ptrs, h.data_ptr(), conv + i * conv_stride, ssm + i * ssm_stride, work.data_ptr(), *args)
        logits = torch.empty(b, self.vocab, dtype=torch.float32)
        lib.lm_head_step_f32(self.norm_f.data_ptr(), ctypes.byref(self.head), h.data_ptr(), logits.data_ptr(),
                             work.data_ptr(), b, cfg.d_model, self.vocab, cfg.rms_norm_eps, nt)
        return logits


def _applies(model, batch: int, state) -> bool:
    cfg = model.config
    if (cfg.arch not in A_INDEX or model.dtype != torch.float32 or model.device.type != "cpu"
            or not 1 <= batch <= MAX_BATCH or _lib() is None):
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return False
    if state.conv.dtype != torch.float32 or state.ssm.dtype != torch.float32:
        return False
    if state.conv.device.type != "cpu" or state.ssm.device.type != "cpu":
        return False  # the module path gives the device error
    if not (state.conv.is_contiguous() and state.ssm.is_contiguous()):
        return False
    linears = [model.lm_head] + [getattr(layer.mixer, name) for layer in model.backbone.layers
                                 for name in PROJECTIONS[cfg.arch]]
    return all(_fmt(m) in LIN_KINDS for m in linears)


def decode_plan(model, batch: int, state):
    """The fast decode step for this model and batch, or None (see the module docstring)."""
    if not _applies(model, batch, state):
        return None
    plan = getattr(model, "_cpu_decode_plan", None)
    if plan is None or plan.key != _key(model):
        plan = _Plan(model)
        object.__setattr__(model, "_cpu_decode_plan", plan)  # not a submodule / parameter
    return plan if plan.float32 else None
