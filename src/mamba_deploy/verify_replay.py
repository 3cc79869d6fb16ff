"""`mamba-deploy verify` with one model in memory at a time: the reference runner's answers to
verify's calls are recorded first (against a stand-in artifact), the reference is closed, and
the recording then plays the reference against the real artifact. Both open at once held 7.5x
the weights against an ONNX export (a 210M Mamba2: 6.0 GB), as both models, ORT's prepacked copy
and both sides' logits were alive together.

verify's calls on the reference never depend on the artifact's answers (decoding is fed the
reference's own tokens), so the two passes make the same reference calls in the same order;
only `to_torch_state` is skipped when an artifact hides its state, so states are keyed by the
state and the calls it had seen, not by order.
"""

from __future__ import annotations

import types

from .runners.base import Runner
from .state import State
from .verify import NOT_RUN


class _Token:
    """A reference state as the recording hands it out: its number and the calls it has seen."""

    def __init__(self, index: int, batch: int, state=None):
        self.index, self.batch, self.calls, self.state = index, batch, 0, state


class _Reference(Runner):
    """What verify reads of the reference runner besides its answers: name, config, path, dtype."""

    def __init__(self, ref):
        self.name, self.config, self.artifact_path = ref.name, ref.config, ref.artifact_path
        self._vocab = ref.vocab_size
        dtype = getattr(getattr(ref, "model", None), "dtype", None)
        self.model = types.SimpleNamespace(dtype=dtype) if dtype is not None else None
        self.answers: dict[str, list] = {"prefill": [], "step": []}
        self.states: dict[tuple[int, int], State] = {}
        self._made = 0

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def new_state(self, batch: int) -> _Token:
        self._made += 1
        return _Token(self._made - 1, batch)


class Recording(_Reference):
    """Pass one: runs the real reference and keeps every answer."""

    def __init__(self, ref):
        super().__init__(ref)
        self.ref = ref

    def new_state(self, batch: int) -> _Token:
        token = super().new_state(batch)
        token.state = self.ref.new_state(batch)
        return token

    def _call(self, kind: str, token: _Token, *args, **kw):
        logits, token.state = getattr(self.ref, kind)(*args, token.state, **kw)
        token.calls += 1
        self.answers[kind].append(logits)
        return logits, token

    def prefill(self, ids, state, attention_mask=None, last_only=False):
        return self._call("prefill", state, ids, attention_mask=attention_mask, last_only=last_only)

    def step(self, ids, state):
        return self._call("step", state, ids)

    def to_torch_state(self, state: _Token) -> State:
        out = self.states[(state.index, state.calls)] = self.ref.to_torch_state(state.state)
        return out


class Replay(_Reference):
    """Pass two: the recorded answers, in the order verify asks for them again."""

    def __init__(self, recording: Recording):
        for key in ("name", "config", "artifact_path", "_vocab", "model", "answers", "states"):
            setattr(self, key, getattr(recording, key))
        self._made = 0
        self._next = {kind: iter(answers) for kind, answers in self.answers.items()}

    def _answer(self, kind: str, token: _Token):
        logits = next(self._next[kind], None)
        assert logits is not None, f"verify asked the reference for more {kind} calls than were recorded"
        token.calls += 1
        return logits, token

    def prefill(self, ids, state, attention_mask=None, last_only=False):
        return self._answer("prefill", state)

    def step(self, ids, state):
        return self._answer("step", state)

    def to_torch_state(self, state: _Token) -> State:
        return self.states[(state.index, state.calls)]


class StandIn(Runner):
    """Pass one's artifact: answers NOT_RUN, which verify compares with nothing (no comparison
    is computed, no logits allocated), while the reference's side runs in full."""

    name = "reference pass"

    def __init__(self, ref):
        self.config, self._vocab = ref.config, ref.vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def new_state(self, batch: int) -> _Token:
        return _Token(0, batch)

    def prefill(self, ids, state, attention_mask=None, last_only=False):
        return NOT_RUN, state

    def step(self, ids, state):
        return NOT_RUN, state

    def to_torch_state(self, state: _Token):
        return NOT_RUN
