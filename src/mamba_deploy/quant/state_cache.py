"""A quantized recurrent-state cache: the ssm_state kept between calls in int8 (one scale per
state row of d_state values) or fp16, instead of float32. The conv state (tiny) stays in the
model dtype. Computation inside a call is unchanged (float32 recurrences); the state is rounded
once per call, which is what a serving cache holding many sequences would do.

`QuantizedStateRunner(model, "int8")` is a Runner, so perplexity / generate / verify can
measure its quality impact directly (see benchmarks/quant.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QuantizationError, ShapeError
from ..inputs import check_ids, check_mask
from ..runners.base import Runner, check_parts, check_state, part_rows
from ..state import State, batch_first
from .formats import SCALE_MIN

F16_MAX = float(torch.finfo(torch.float16).max)

STATE_DTYPES = {"int8": torch.int8, "fp16": torch.float16}


@dataclass
class QuantState:
    conv: torch.Tensor  # (n_layer, b, conv_dim, k-1) model dtype
    ssm: torch.Tensor  # (n_layer, b, *ssm_shape) int8 codes or fp16
    scales: torch.Tensor | None  # (n_layer, b, *ssm_shape[:-1], 1) fp16, int8 only

    @property
    def batch(self) -> int:
        return self.conv.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm, self.scales) if t is not None)


def encode_ssm(h: torch.Tensor, kind: str):
    """h (..., d_state) float -> (stored, scales or None)."""
    if kind == "fp16":
        return h.to(torch.float16), None
    # within float16's range: a zero row gets the smallest scale, not 0 (0/0 = NaN)
    scales = (h.abs().amax(-1, keepdim=True).float() / 127).clamp(SCALE_MIN, F16_MAX).to(torch.float16)
    q = torch.round(h.float() / scales.float()).clamp(-127, 127).to(torch.int8)
    return q, scales


def decode_ssm(q: torch.Tensor, scales, dtype=torch.float32) -> torch.Tensor:
    return q.to(dtype) if scales is None else q.to(dtype) * scales.to(dtype)


def _check_like(st: QuantState, empty: QuantState, name: str) -> None:
    """`st` holds what this runner's states hold (shapes but the batch, dtypes, scales or none):
    another model's state, or one of the other cache kind (int8 codes read as fp16 values), would
    otherwise be joined as if it were this runner's."""
    def desc(q):
        return [None if t is None else (t.dtype, t.shape[:1] + t.shape[2:]) for t in (q.conv, q.ssm, q.scales)]

    if desc(st) != desc(empty):
        raise ShapeError(f"gather_states: the state holds {desc(st)} (conv, ssm, scales: dtype and shape but the "
                         f"batch), the {name} runner's hold {desc(empty)}: it was made by another runner; create it "
                         "with this runner's new_state(batch)")


class QuantizedStateRunner(Runner):
    """Wraps a MambaLM (quantized weights or not); its state object is a QuantState."""

    def __init__(self, model, kind: str = "int8"):
        if kind not in STATE_DTYPES:
            raise QuantizationError(f"state cache dtype {kind!r} unknown; choose one of {sorted(STATE_DTYPES)}")
        self.model, self.kind = model.eval(), kind
        self.config = model.config
        self.source_path = getattr(model, "source_path", None)
        self.name = f"torch+{kind}-state"

    def new_state(self, batch: int) -> QuantState:
        st = self.model.new_state(batch)
        q, s = encode_ssm(st.ssm, self.kind)
        return QuantState(st.conv, q, s)

    def _unpack(self, qs: QuantState) -> State:
        check_state(qs, QuantState, None)  # the batch is the model's to check
        return State(qs.conv, decode_ssm(qs.ssm, qs.scales, torch.float32).to(self.model.new_state(0).ssm.dtype))

    def _pack(self, st: State, qs: QuantState) -> QuantState:
        q, s = encode_ssm(st.ssm, self.kind)
        qs.conv.copy_(st.conv)
        qs.ssm.copy_(q)
        if s is not None:
            qs.scales.copy_(s)
        return qs

    @torch.inference_mode()
    def prefill(self, ids, state, attention_mask=None, last_only=False):
        ids = check_ids(ids, 2, self.config.padded_vocab_size)
        mask = check_mask(attention_mask, ids.shape)
        st = self._unpack(state)
        dev = self.model.device
        if mask is not None:  # the model checks that padded rows start from a fresh state
            mask = mask.to(dev)
        out = self.model(ids.to(dev), st, attention_mask=mask, num_logits_to_keep=1 if last_only else 0)
        return out.logits.cpu(), self._pack(out.state, state)

    @torch.inference_mode()
    def step(self, ids, state):
        st = self._unpack(state)
        logits = self.model.step(ids, st)  # the model checks the ids, then moves them
        return logits.cpu(), self._pack(st, state)

    def gather_states(self, parts):
        """The codes and scales gathered as they are (no decode / re-encode); see Runner.gather_states."""
        parts = check_parts(parts)
        empty = self.new_state(0)
        for st, _ in parts:
            check_state(st, QuantState, None)
            _check_like(st, empty, self.name)
        rows = part_rows(parts, [st.batch for st, _ in parts])
        pick = [(st, torch.tensor(r, dtype=torch.long, device=st.conv.device)) for (st, _), r in zip(parts, rows)]
        cat = lambda name: torch.cat([getattr(empty, name)] + [getattr(st, name)[:, r] for st, r in pick], 1)  # noqa: E731
        return QuantState(cat("conv"), cat("ssm"), None if empty.scales is None else cat("scales"))

    def state_arrays(self, state) -> list:
        return batch_first(state)  # a zero state codes to 0

    def to_torch_state(self, state) -> State:
        return State(state.conv.float().cpu(), decode_ssm(state.ssm, state.scales).cpu())
