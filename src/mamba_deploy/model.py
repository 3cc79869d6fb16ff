"""Mamba1 / Mamba2 language models in PyTorch.

Each mixer has `forward` (parallel over the sequence, from a given state) and `step` (one token)
side by side; both return the new (conv_state, ssm_state) and share every sub-computation that
can differ between them (dt discretisation, gated norm) through `ops`.
Parameter names equal the HF checkpoint keys.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import MambaConfig
from .errors import ConfigError, ShapeError
from .inputs import check_ids, check_mask, check_padding_fresh
from .ops.reference import _up, weightless_rms
from .state import DTYPE_NAMES, State, batch_first, check_is_state, ssm_dtypes


class Linear(nn.Linear):
    """nn.Linear whose matmul goes through the op dispatcher (a faster small-batch path on CPU).
    Quantization swaps these modules out whole."""

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)


def tensor_version(t: torch.Tensor) -> int:
    """t's in-place version counter, which the decode caches key on; -1 for an inference tensor
    (a model loaded under torch.inference_mode()), which has none: in-place edits to those are
    not seen by the caches."""
    return -1 if t.is_inference() else t._version


def neg_exp(A_log: nn.Parameter) -> torch.Tensor:
    """A = -exp(A_log), cached on the parameter until the parameter changes (its version counter
    moves on any in-place update): eager decode and prefill would otherwise recompute it per layer
    and call (on CUDA three small launches per layer; mamba-2.8b prefill 1x2048 on an H200
    49.7-50.2 ms cached vs 50.3-50.7 recomputed, 1x512 lost in host noise). Never made during
    CUDA graph capture, where the value would exist only inside the graph."""
    if torch.is_grad_enabled():
        return -torch.exp(_up(A_log))
    key = (tensor_version(A_log), A_log.data_ptr(), A_log.dtype)
    cached = getattr(A_log, "_neg_exp_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = -torch.exp(_up(A_log))
    if not (A_log.is_cuda and torch.cuda.is_current_stream_capturing()):
        A_log._neg_exp_cache = (key, value)
    return value


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return ops.rmsnorm(x, self.weight, self.eps)


class Mamba1Mixer(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        d, n, r = cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank
        self.in_proj = Linear(cfg.d_model, 2 * d, bias=cfg.bias)
        self.conv1d = nn.Conv1d(d, d, cfg.d_conv, groups=d, bias=cfg.conv_bias, padding=cfg.d_conv - 1)
        self.x_proj = Linear(d, r + 2 * n, bias=False)
        self.dt_proj = Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.zeros(d, n))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = Linear(d, cfg.d_model, bias=cfg.bias)

    def _dt_in_B_C(self, x):
        """x (..., d) -> dt_proj's input (..., r), B, C (..., n)."""
        cfg = self.cfg
        dt, B, C = self.x_proj(x).split([cfg.resolved_dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        if cfg.dt_bc_rms:
            dt, B, C = (weightless_rms(t, cfg.mixer_rms_eps) for t in (dt, B, C))
        return dt, B, C

    def _dt_B_C(self, x):
        """x (..., d) -> raw dt (..., d) without bias, B, C (..., n)."""
        dt, B, C = self._dt_in_B_C(x)
        return ops.linear(dt, self.dt_proj.weight), B, C

    def forward(self, u, conv_state, ssm_state, mask=None):
        """u (b, l, d_model); conv_state (b, d, k-1); ssm_state (b, d, n); mask (b, l) or None."""
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (b, l, d) each
        if mask is not None:
            x = x * mask.unsqueeze(-1)
        x, conv_state = ops.causal_conv1d(x, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state)
        if mask is not None:
            x = x * mask.unsqueeze(-1)
        dt, B, C = self._dt_B_C(x)
        A = neg_exp(self.A_log)  # (d, n)
        y, ssm_state = ops.selective_scan(x, dt, A, B, C, self.D, z, self.dt_proj.bias, ssm_state)
        return self.out_proj(y), conv_state, ssm_state

    def step(self, u, conv_state, ssm_state, A=None):
        """u (b, d_model) -> (b, d_model), one token. A: -exp(A_log) when the caller keeps it
        (graph decode: three fewer launches per layer and token)."""
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (b, d)
        x, conv_state = ops.causal_conv1d_update(x, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state)
        dt, B, C = self._dt_B_C(x)
        A = neg_exp(self.A_log) if A is None else A
        y, ssm_state = ops.selective_state_update(x, dt, A, B, C, self.D, z, self.dt_proj.bias, ssm_state)
        return self.out_proj(y), conv_state, ssm_state


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        d, gn, h = cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.nheads
        self.in_proj = Linear(cfg.d_model, 2 * d + 2 * gn + h, bias=cfg.bias)  # z, xBC, dt
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim,
                                bias=cfg.conv_bias, padding=cfg.d_conv - 1)
        self.dt_bias = nn.Parameter(torch.zeros(h))
        self.A_log = nn.Parameter(torch.zeros(h))
        self.D = nn.Parameter(torch.ones(h))
        if cfg.rmsnorm:
            self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.out_proj = Linear(d, cfg.d_model, bias=cfg.bias)
        self.split_norm = None  # tensor parallel: tp.SplitGatedNorm where the norm's groups span ranks

    def _split(self, zxbcdt):
        cfg = self.cfg
        return zxbcdt.split([cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)

    def _split_xBC(self, xBC):
        cfg = self.cfg
        gn = cfg.ngroups * cfg.d_state
        x, B, C = xBC.split([cfg.d_inner, gn, gn], dim=-1)
        *pre, _ = x.shape
        return (x.reshape(*pre, cfg.nheads, cfg.headdim),
                B.reshape(*pre, cfg.ngroups, cfg.d_state),
                C.reshape(*pre, cfg.ngroups, cfg.d_state))

    def _gate(self, y, z):
        """y, z (..., d): gated RMSNorm (or plain silu gate)."""
        cfg = self.cfg
        if cfg.rmsnorm and self.split_norm is not None:
            return self.split_norm(y, z, self.norm.weight, self.norm.eps, cfg.norm_before_gate)
        if cfg.rmsnorm:
            return ops.rmsnorm_gated(y, z, self.norm.weight, self.norm.eps,
                                     cfg.d_inner // cfg.ngroups, cfg.norm_before_gate)
        return y * F.silu(z)

    def forward(self, u, conv_state, ssm_state, mask=None):
        """u (b, l, d_model); conv_state (b, conv_dim, k-1); ssm_state (b, h, p, n)."""
        cfg = self.cfg
        b, l, _ = u.shape
        z, xBC, dt = self._split(self.in_proj(u))  # (b, l, d), (b, l, conv_dim), (b, l, h)
        if mask is not None:
            xBC = xBC * mask.unsqueeze(-1)
        xBC, conv_state = ops.causal_conv1d(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state)
        if mask is not None:
            xBC = xBC * mask.unsqueeze(-1)
        x, B, C = self._split_xBC(xBC)  # (b, l, h, p), (b, l, g, n), (b, l, g, n)
        A = neg_exp(self.A_log)  # (h,)
        y, ssm_state = ops.ssd(x, dt, A, B, C, self.D, self.dt_bias, ssm_state, cfg.chunk_size, cfg.dt_limit)
        y = self._gate(y.reshape(b, l, cfg.d_inner), z)
        return self.out_proj(y), conv_state, ssm_state

    def step(self, u, conv_state, ssm_state):
        """u (b, d_model) -> (b, d_model), one token."""
        cfg = self.cfg
        z, xBC, dt = self._split(self.in_proj(u))  # (b, d), (b, conv_dim), (b, h)
        A = neg_exp(self.A_log)
        # conv update + SSD state update in one op (one fused kernel pair on CUDA)
        y, conv_state, ssm_state = ops.ssd_step(xBC, dt, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state,
                                                A, self.D, self.dt_bias, ssm_state, cfg.dt_limit)
        y = self._gate(y.reshape(u.shape[0], cfg.d_inner), z)
        return self.out_proj(y), conv_state, ssm_state


class Block(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mixer = Mamba1Mixer(cfg) if cfg.arch == "mamba1" else Mamba2Mixer(cfg)
        self.residual_in_fp32 = cfg.residual_in_fp32

    def _pre(self, h):
        residual = h.float() if self.residual_in_fp32 else h
        return self.norm(h.to(self.norm.weight.dtype)), residual

    def forward(self, h, conv_state, ssm_state, mask=None):
        x, residual = self._pre(h)
        y, conv_state, ssm_state = self.mixer(x, conv_state, ssm_state, mask)
        return residual + y, conv_state, ssm_state

    def step(self, h, conv_state, ssm_state):
        x, residual = self._pre(h)
        y, conv_state, ssm_state = self.mixer.step(x, conv_state, ssm_state)
        return residual + y, conv_state, ssm_state


class Backbone(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (b, l, vocab) float32
    state: State


def _refuse_grad(state: State) -> None:
    """The model updates a state in place, which autograd refuses on a leaf that requires grad
    (forward raised a raw RuntimeError, step took it)."""
    if state.conv.requires_grad or state.ssm.requires_grad:
        raise ShapeError("state tensors require grad; the model updates them in place. Pass detached ones "
                         "(State(state.conv.detach(), state.ssm.detach())), or create it with model.new_state(batch)")


def _writing(state: State):
    """Where the state's in-place updates run: a state made under torch.inference_mode takes them
    only there (outside it, "Inplace update to inference tensor outside InferenceMode")."""
    return torch.inference_mode() if state.conv.is_inference() else contextlib.nullcontext()


class MambaLM(nn.Module):
    """`model(input_ids, state=None)` -> ModelOutput(logits, state); the state is updated in place."""

    def __init__(self, cfg: MambaConfig):
        if not isinstance(cfg, MambaConfig):
            hint = "mamba_deploy.load_model(path) loads a checkpoint" if isinstance(cfg, (str, os.PathLike)) else \
                "MambaConfig.from_dict(d) reads a config.json's contents"
            raise ConfigError(f"MambaLM takes a MambaConfig, got {type(cfg).__name__} {cfg!r:.60}; {hint}")
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.source_path = None  # set by load_model; where tokenizer files live
        self._tokenizer = None
        self.ssm_state_dtype = None  # None: float32 (float64 for a float64 model); see set_state_dtype
        self.tp = None  # tp.TensorParallel once apply_tensor_parallel sharded this model

    def set_state_dtype(self, dtype) -> "MambaLM":
        """dtype of the SSM state that new_state allocates: float32 (default) keeps the recurrence
        in full precision; bfloat16 / float16 halve the state's memory and its bytes per decode
        step (what mamba_ssm does by default), at the cost of one rounding of h per token. Every
        update is still computed in float32; only the stored state is rounded."""
        self.ssm_state_dtype = None if dtype is None else self._state_dtype(dtype)
        return self

    def _state_dtype(self, dtype) -> torch.dtype:
        """A torch dtype or its name (bf16, bfloat16, ...) -> the dtype, if this model runs with it."""
        dtype = DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        ok = ssm_dtypes(self.dtype)
        if dtype not in ok:
            also = ("" if torch.float64 in ok
                    else "; float64 needs a float64 model (load_model(..., dtype=torch.float64))")
            raise ConfigError(f"SSM state dtype {dtype!r} is not supported for this {self.dtype} model; pass one of "
                              f"{', '.join(str(d) for d in ok)} or its name (bf16, fp16, fp32){also}")
        return dtype

    @property
    def full_ssm_dtype(self) -> torch.dtype:
        """The default, full-precision SSM state dtype: float32 (float64 for a float64 model)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def ssm_dtype(self) -> torch.dtype:
        """The SSM state dtype new_state allocates (set_state_dtype's, else full_ssm_dtype)."""
        return self.full_ssm_dtype if self.ssm_state_dtype is None else self.ssm_state_dtype

    # norm_f is never quantized: a quantized embedding's `weight` would dequantize the whole table
    @property
    def device(self):
        return self.backbone.norm_f.weight.device

    @property
    def dtype(self):
        return self.backbone.norm_f.weight.dtype

    def new_state(self, batch: int, ssm_dtype: torch.dtype | None = None) -> State:
        """ssm_dtype: override the SSM state dtype (default: self.ssm_dtype)."""
        ssm_dtype = self.ssm_dtype if ssm_dtype is None else self._state_dtype(ssm_dtype)
        return State.zeros(self.config, batch, self.device, self.dtype, ssm_dtype)

    def _head(self, h):
        h = self.backbone.norm_f(h.to(self.dtype))
        return self.lm_head(h).float()

    def forward(self, input_ids, state: State | None = None, attention_mask=None,
                num_logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (b, l). attention_mask (b, l), 1 = token, 0 = left padding (zero state only).
        num_logits_to_keep > 0 computes logits for the last positions only."""
        input_ids = check_ids(input_ids, 2, self.config.padded_vocab_size, on_device=True).to(self.device)
        b, l = input_ids.shape
        if not isinstance(num_logits_to_keep, numbers.Integral) or num_logits_to_keep < 0:
            raise ShapeError(f"num_logits_to_keep must be an int >= 0 (0 = every position), got {num_logits_to_keep!r}")
        if state is None:
            state = self.new_state(b)
        check_is_state(state)
        state.check(self.config, b, self.dtype, self.device)
        _refuse_grad(state)
        if l == 1 and attention_mask is None:
            return ModelOutput(self._step(input_ids[:, 0], state).unsqueeze(1), state)  # checked above
        mask = check_mask(attention_mask, (b, l))  # 0/1 left padding, as every Runner checks it
        if mask is not None:
            check_padding_fresh(mask, batch_first(state), "model.new_state")
            mask = mask.to(device=self.device, dtype=self.dtype)
        h = self.backbone.embeddings(input_ids)  # (b, l, d_model)
        writing = _writing(state)
        for i, layer in enumerate(self.backbone.layers):
            h, conv, ssm = layer(h, state.conv[i], state.ssm[i], mask)
            with writing:
                state.conv[i].copy_(conv)
                state.ssm[i].copy_(ssm)
        if num_logits_to_keep:
            h = h[:, -num_logits_to_keep:]
        return ModelOutput(self._head(h), state)

    def step(self, ids, state: State) -> torch.Tensor:
        """ids (b,) -> logits (b, vocab); state updated in place."""
        w = self.backbone.norm_f.weight  # one module lookup for device and dtype: this runs per token
        # CPU ids (what the runners pass) are checked without a sync; ids already on the GPU are
        # checked there (one sync): an out-of-range id would end in a device-side assert that
        # poisons the CUDA context for the rest of the process
        ids = check_ids(ids, 1, self.config.padded_vocab_size, on_device=True).to(w.device)
        check_is_state(state)
        state.check(self.config, ids.shape[0], w.dtype, w.device)
        _refuse_grad(state)
        return self._step(ids, state)

    def _step(self, ids, state: State) -> torch.Tensor:
        """`step` on checked inputs: the state is on the model's device."""
        if state.conv.is_cuda and (state.conv.stride(-1) != 1 or state.ssm.stride(-1) != 1):  # the Triton step's layout
            raise ShapeError(f"the CUDA decode step needs states whose last dimension is contiguous; got strides "
                             f"{state.conv.stride()} / {state.ssm.stride()}: pass State(state.conv.contiguous(), "
                             "state.ssm.contiguous()), or create it with model.new_state(batch)")
        fast = ops.decode_plan(self, ids.shape[0], state)  # CPU: one C call per block where it applies
        if fast is not None:
            return fast(ids, state)
        h = self.backbone.embeddings(ids)  # (b, d_model)
        writing = _writing(state)
        for i, layer in enumerate(self.backbone.layers):
            h, conv, ssm = layer.step(h, state.conv[i], state.ssm[i])
            with writing:
                state.conv[i].copy_(conv)
                state.ssm[i].copy_(ssm)
        return self._head(h)

    # ---- conveniences --------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.source_path)
        return self._tokenizer

    def generate(self, prompts, **kwargs):
        """See `mamba_deploy.generation.generate`; prompts are strings or lists of token ids."""
        from .generation import generate
        from .runners.torch_runner import TorchRunner

        return generate(TorchRunner(self), prompts, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
