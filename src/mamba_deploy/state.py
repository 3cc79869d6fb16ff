"""The one recurrent state every backend carries: fixed size, allocated once.

Per layer and sequence a Mamba model needs only
- conv_state: the last d_conv - 1 inputs of the causal conv,  (conv_dim, d_conv - 1)
- ssm_state:  the SSM hidden state h,                          (d_inner, d_state)  Mamba1
                                                               (nheads, headdim, d_state)  Mamba2
Layers are stacked on dim 0 so one tensor per kind can be preallocated, updated in place
(CUDA graphs) and split per layer (ONNX `past_conv.{i}` / `past_ssm.{i}`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .argtypes import is_whole
from .config import MambaConfig
from .errors import ShapeError


# dtype names the CLI's --dtype / --state-dtype and set_state_dtype / new_state take besides torch dtypes
DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
               "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

# what every backend's state check says of a state that gather_states took in
CONSUMED = ("this state was consumed by gather_states (its rows moved into the state it returned, which may reuse "
            "its memory); use the returned state")


@dataclass
class State:
    conv: torch.Tensor  # (n_layer, b, conv_dim, d_conv - 1)
    ssm: torch.Tensor  # (n_layer, b, *ssm_state_shape), float32 by default
    consumed = False  # not a field: set by a runner's gather_states on the states it took in

    @classmethod
    def zeros(cls, cfg: MambaConfig, batch: int, device="cpu", dtype=torch.float32,
              ssm_dtype=torch.float32) -> "State":
        batch = check_batch(batch)
        if not isinstance(cfg, MambaConfig):
            raise ShapeError(f"State.zeros takes a MambaConfig (model.config), got {type(cfg).__name__} {cfg!r:.60}; "
                             "or call model.new_state(batch)")
        conv = torch.zeros(cfg.n_layer, batch, *cfg.conv_state_shape, device=device, dtype=dtype)
        ssm = torch.zeros(cfg.n_layer, batch, *cfg.ssm_state_shape, device=device, dtype=ssm_dtype)
        return cls(conv, ssm)

    @property
    def batch_size(self) -> int:
        return self.conv.shape[1]

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()

    def clone(self) -> "State":
        return State(self.conv.clone(), self.ssm.clone())

    def __copy__(self) -> "State":
        # a shallow copy shared the tensors every step updates in place: two branches of a fork
        # overwrote each other silently. A copy is a fork, so it gets its own tensors.
        return self.clone()

    def zero_(self) -> "State":
        self.conv.zero_()
        self.ssm.zero_()
        return self

    def copy_(self, other: "State") -> "State":
        check_is_state(other)
        for name in ("conv", "ssm"):
            mine, theirs = tuple(getattr(self, name).shape), tuple(getattr(other, name).shape)
            if mine != theirs:
                raise ShapeError(f"copy_: the other state's {name} is {theirs}, this one's {mine}; copy a state of "
                                 "the same model and batch (select rows first: state.select(rows))")
        self.conv.copy_(other.conv)
        self.ssm.copy_(other.ssm)
        return self

    def select(self, idx) -> "State":
        """Rows of the batch (a new State, batch axis kept): a row index, a slice, or a list /
        tensor of row indices."""
        b = self.conv.shape[1]
        if isinstance(idx, slice):
            idx = torch.arange(b)[idx]
        try:
            if isinstance(idx, numbers.Integral):
                idx = [idx]
            # an empty list is float32 to as_tensor, and no rows is a valid selection
            empty = isinstance(idx, (list, tuple)) and not idx
            rows = torch.as_tensor(idx, dtype=torch.long if empty else None).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ShapeError(f"select takes row indices (an int, a slice, a list), got {idx!r:.60}") from e
        if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
            raise ShapeError(f"select takes integer row indices, got {rows.dtype}")
        bad = [int(r) for r in rows if not -b <= int(r) < b]
        if bad:
            raise ShapeError(f"select: row {bad[0]} is outside this state's batch of {b}; give rows in 0..{b - 1}")
        rows = rows.to(self.conv.device)
        return State(self.conv[:, rows].clone(), self.ssm[:, rows].clone())

    def check(self, cfg: MambaConfig, batch: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Shapes for `batch`; with dtype / device: conv in the model's dtype, ssm floating
        point (its dtype may differ: `set_state_dtype`), both on the model's device."""
        fix = "create it with model.new_state(batch) (or State.zeros(config, batch))"
        if self.consumed:
            raise ShapeError(CONSUMED)
        if not isinstance(self.conv, torch.Tensor) or not isinstance(self.ssm, torch.Tensor):
            raise ShapeError(f"state.conv / state.ssm must be tensors; {fix}")
        want_conv = (cfg.n_layer, batch, *cfg.conv_state_shape)
        want_ssm = (cfg.n_layer, batch, *cfg.ssm_state_shape)
        if tuple(self.conv.shape) != want_conv or tuple(self.ssm.shape) != want_ssm:
            raise ShapeError(
                f"state has conv {tuple(self.conv.shape)} / ssm {tuple(self.ssm.shape)}, expected "
                f"{want_conv} / {want_ssm} for batch {batch}; {fix}"
            )
        if dtype is not None and (self.conv.dtype != dtype or self.ssm.dtype not in ssm_dtypes(dtype)):
            names = ", ".join(str(d).removeprefix("torch.") for d in ssm_dtypes(dtype))
            raise ShapeError(f"state has conv {self.conv.dtype} / ssm {self.ssm.dtype}; the model needs conv {dtype} "
                             f"and an ssm in {names}; {fix}")
        if device is not None:
            device = torch.device(device)
            if not (_on(self.conv, device) and _on(self.ssm, device)):
                raise ShapeError(f"state is on {self.conv.device} / {self.ssm.device}, the model on {device}; {fix}")

    @classmethod
    def stack(cls, conv_layers, ssm_layers) -> "State":
        """Per-layer conv / ssm tensors, each (b, ...) of one shape -> a State (n_layer, b, ...)."""
        parts = {"conv": list(conv_layers), "ssm": list(ssm_layers)}
        for name, layers in parts.items():
            if not layers or len(layers) != len(parts["conv"]):
                raise ShapeError(f"a state needs one {name} tensor per layer, as many as conv's; got {len(layers)} "
                                 f"(conv {len(parts['conv'])}); State.layer_shapes(config, batch) lists them")
            if not all(isinstance(t, torch.Tensor) for t in layers) or len({t.shape for t in layers}) != 1:
                found = sorted({str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in layers})
                raise ShapeError(f"every layer's {name} must be a tensor of one shape, got {', '.join(found)}; "
                                 "State.layer_shapes(config, batch) lists them")
        return cls(torch.stack(parts["conv"]), torch.stack(parts["ssm"]))

    @classmethod
    def from_layers(cls, arrays) -> "State":
        """From a runner's per-layer list [conv.0, ssm.0, conv.1, ...] (tensors; see layer_shapes)."""
        return cls.stack(arrays[0::2], arrays[1::2])

    @staticmethod
    def layer_shapes(cfg: MambaConfig, batch: int) -> list[tuple]:
        """Shapes of a runner's per-layer state list [conv.0, ssm.0, conv.1, ...], the order of the
        ONNX graph's past / present names (onnx_meta.state_names)."""
        return [(batch, *cfg.conv_state_shape), (batch, *cfg.ssm_state_shape)] * cfg.n_layer

    def layers(self):
        """[(conv_i, ssm_i)] views, one per layer."""
        return list(zip(self.conv.unbind(0), self.ssm.unbind(0)))


def ssm_dtypes(model_dtype: torch.dtype) -> tuple:
    """SSM state dtypes a model of this dtype runs with: float32 and the two 16-bit ones (the
    update is computed in float32 and stored rounded), float64 only for a float64 model (the
    kernels compute in the state's dtype, which must then match the model's)."""
    base = (torch.float32, torch.bfloat16, torch.float16)
    return base + (torch.float64,) if model_dtype == torch.float64 else base


def check_batch(batch) -> int:
    """A state's batch (new_state, State.zeros): an int >= 0; ShapeError otherwise."""
    if not is_whole(batch, 0):
        raise ShapeError(f"batch must be an integer >= 0 (the number of sequences), got {batch!r}")
    return int(batch)


def check_is_state(state, make: str = "model.new_state(batch)") -> None:
    """ShapeError for anything that is not a State (None, a tuple, another backend's state)."""
    if not isinstance(state, State):
        raise ShapeError(f"state is a {type(state).__name__}, not a State; create it with {make}")
    if state.consumed:
        raise ShapeError(CONSUMED)


def batch_first(state) -> list:
    """[conv, ssm] of a layer-stacked state (a State or a quantized one) as views with the batch
    first, (b, n_layer, ...): for checks of rows where the state lives, without a copy."""
    return [state.conv.transpose(0, 1), state.ssm.transpose(0, 1)]


def _on(t: torch.Tensor, device: torch.device) -> bool:
    """t lives on `device`; "cuda" (no index) means any CUDA device, as torch.device("cuda") does."""
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)
