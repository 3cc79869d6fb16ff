"""`mamba-deploy verify` with one model in memory at a time: the reference runner's answers to
verify's calls are recorded first (against a stand-in artifact), the reference is closed, and
the recording then plays the reference against the real artifact. Both open at once held 7.5x
the weights against an ONNX export (a 210M Mamba2: 6.0 GB), as both models, ORT's prepacked copy
and both sides' logits were alive together.

verify's calls on the reference never depend on the artifact's answers (decoding is fed the
reference's own tokens), so the two passes make the same reference calls in the same order;
only `to_torch_state` is skipped when an artifact hides its state, so states are keyed by the
state and the calls it had seen, not by order.

The recording itself stays small in memory: an answer of SPILL_BYTES or more (the logits of a
long prefill, a large model's state) goes to a file in a temporary folder (under TMPDIR) and is
read back memory-mapped. In memory, every recorded state of mamba2-2.7b held 172 MB per sequence,
and the logits of `--lengths 4096 --batch 8` with a 50k vocabulary 6.6 GB.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import types
import weakref
from pathlib import Path

import torch

from .atomic import remove_stale_temps, temp_owner
from .errors import OutputPathError
from .runners.base import Runner
from .state import State
from .verify import NOT_RUN

SPILL_BYTES = 8 << 20  # answers this large go to disk; smaller ones stay in memory
SPILL_NAME = "mamba-deploy-verify"  # the temporary folder of one verify run: .NAME.p<pid>h<host>-XXXX in TMPDIR


class _OnDisk:
    def __init__(self, path: str, is_state: bool):
        self.path, self.is_state = path, is_state


class _Spill:
    """The temporary folder of a recording's large answers; removed by close() or when the
    recording and its replay are gone (or the process exits)."""

    def __init__(self):
        self.folder, self._n, self._remove = None, 0, None

    def keep(self, value):
        """`value` (logits or a State) as it is when small, else as an _OnDisk of its file."""
        is_state = isinstance(value, State)
        tensors = {"conv": value.conv, "ssm": value.ssm} if is_state else {"t": value}
        if not all(torch.is_tensor(t) for t in tensors.values()) \
                or sum(t.numel() * t.element_size() for t in tensors.values()) < SPILL_BYTES:
            return value
        if self.folder is None:
            # the writer's pid in the name: a verify killed outright (the OOM killer, on a large
            # model) left its folder of reference answers in TMPDIR for good; the next one removes it
            remove_stale_temps(Path(tempfile.gettempdir()), SPILL_NAME)
            self.folder = tempfile.mkdtemp(prefix=f".{SPILL_NAME}.{temp_owner()}-")
            self._remove = weakref.finalize(self, shutil.rmtree, self.folder, True)
        path = os.path.join(self.folder, f"{self._n}.pt")
        self._n += 1
        try:
            torch.save({k: t.detach().cpu() for k, t in tensors.items()}, path)
        except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError from its writer
            total = sum(f.stat().st_size for f in os.scandir(self.folder))
            raise OutputPathError(f"verify keeps the reference's large answers in {self.folder} until the artifact's "
                                  f"pass ({total / 2**20:.0f} MiB written so far) and could not write more: {e}. "
                                  "Set TMPDIR to a folder with room, or verify fewer / shorter cases "
                                  "(--lengths, --batch)") from e
        return _OnDisk(path, is_state)

    @staticmethod
    def load(value):
        if not isinstance(value, _OnDisk):
            return value
        try:
            d = torch.load(value.path, mmap=True, weights_only=True)
        except (OSError, RuntimeError) as e:  # torch reports a truncated file as a RuntimeError
            raise OutputPathError(f"verify could not read back the reference's answer {value.path}: {e}. Something "
                                  "removed or changed that temporary folder during the run (a tmp cleaner?): run "
                                  "again with TMPDIR set to a folder nothing else cleans") from e
        return State(d["conv"], d["ssm"]) if value.is_state else d["t"]

    def close(self) -> None:
        if self._remove is not None:
            self._remove()


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
        self.states: dict[tuple[int, int], State | _OnDisk] = {}
        self._made = 0
        self.spill = _Spill()

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
        self.answers[kind].append(self.spill.keep(logits))
        return logits, token

    def prefill(self, ids, state, attention_mask=None, last_only=False):
        return self._call("prefill", state, ids, attention_mask=attention_mask, last_only=last_only)

    def step(self, ids, state):
        return self._call("step", state, ids)

    def to_torch_state(self, state: _Token) -> State:
        out = self.ref.to_torch_state(state.state)
        self.states[(state.index, state.calls)] = self.spill.keep(out)
        return out


class Replay(_Reference):
    """Pass two: the recorded answers, in the order verify asks for them again."""

    def __init__(self, recording: Recording):
        for key in ("name", "config", "artifact_path", "_vocab", "model", "answers", "states", "spill"):
            setattr(self, key, getattr(recording, key))
        self._made = 0
        self._next = {kind: iter(answers) for kind, answers in self.answers.items()}

    def _answer(self, kind: str, token: _Token):
        logits = next(self._next[kind], None)
        assert logits is not None, f"verify asked the reference for more {kind} calls than were recorded"
        token.calls += 1
        return self.spill.load(logits), token

    def prefill(self, ids, state, attention_mask=None, last_only=False):
        return self._answer("prefill", state)

    def step(self, ids, state):
        return self._answer("step", state)

    def to_torch_state(self, state: _Token) -> State:
        return self.spill.load(self.states[(state.index, state.calls)])


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
