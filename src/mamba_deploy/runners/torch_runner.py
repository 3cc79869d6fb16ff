"""The PyTorch backend: our `MambaLM` behind the Runner interface."""

from __future__ import annotations

import torch

from ..argtypes import check_switch
from ..errors import ShapeError
from ..inputs import check_ids, check_mask
from ..state import State, batch_first, check_is_state
from .base import Runner, check_parts, check_threads, checked_source, consume, part_rows


class TorchRunner(Runner):
    name = "torch"
    _holds_group = False  # open_torch(tensor_parallel=True): this runner keeps tp's process group open

    def __init__(self, model):
        self.model = model.eval()
        self.config = model.config
        self.source_path = getattr(model, "source_path", None)
        self.artifact_path = getattr(model, "gguf_path", None)  # a .gguf is named as the file (else source_path)

    def new_state(self, batch: int) -> State:
        return self.model.new_state(batch)

    @torch.inference_mode()
    def prefill(self, ids, state, attention_mask=None, last_only=False):
        dev = self.model.device
        ids = check_ids(ids, 2, self.config.padded_vocab_size)
        mask = check_mask(attention_mask, ids.shape)
        check_is_state(state, "runner.new_state(batch)")  # the model's own None (a fresh state) is not the contract
        # the model checks the state, and that padded rows start from a fresh one
        out = self.model(ids.to(dev), state, attention_mask=mask, num_logits_to_keep=1 if last_only else 0)
        return out.logits.cpu(), out.state

    @torch.inference_mode()
    def step(self, ids, state):
        ids = check_ids(ids, 1, self.config.padded_vocab_size)
        return self.model.step(ids, state).cpu(), state  # CPU ids: the model moves them after its check

    def state_arrays(self, state) -> list:
        return batch_first(state)

    def to_torch_state(self, state) -> State:
        """A float32 CPU copy (never the live tensors, which later steps update in place)."""
        check_is_state(state, "runner.new_state(batch)")
        state.check(self.config, state.conv.shape[1], state.conv.dtype, self.model.device)
        return State(state.conv.float().cpu().clone(), state.ssm.float().cpu().clone())

    @torch.no_grad()
    def gather_states(self, parts):
        """Rows gathered where the states live (no trip through the CPU); see Runner.gather_states.
        Not under inference_mode: its tensors could not be updated in place outside it later
        (a caller's state.zero_(), a graph bucket's)."""
        parts = check_parts(parts)
        dev = self.model.device
        for st, _ in parts:
            check_is_state(st, "runner.new_state(batch)")
            st.check(self.config, st.conv.shape[1], self.model.dtype, dev)
        rows = [torch.tensor(r, dtype=torch.long, device=dev) for r in part_rows(parts, [s.conv.shape[1] for s, _ in parts])]
        empty = self.model.new_state(0)
        conv = torch.cat([empty.conv] + [s.conv[:, r] for (s, _), r in zip(parts, rows)], 1)  # copies
        ssm = torch.cat([empty.ssm] + [s.ssm[:, r].to(empty.ssm.dtype) for (s, _), r in zip(parts, rows)], 1)
        return consume(parts, self._adopt(State(conv, ssm), [s for s, _ in parts]))

    def _adopt(self, state: State, consumed) -> State:
        """The gathered rows as this runner's state (CudaGraphRunner copies them into a bucket)."""
        return state

    def load_torch_state(self, state, src: State) -> None:
        src = checked_source(src, self.config, self.model.device)
        check_is_state(state, "runner.new_state(batch)")
        rows = state.conv.shape[1] if isinstance(state.conv, torch.Tensor) and state.conv.dim() > 1 else None
        if rows is not None and rows != src.conv.shape[1]:  # as the other runners say it: the target is not at fault
            raise ShapeError(f"the source state's rows have batch {src.conv.shape[1]} but the state was made for batch "
                             f"{rows}; load a source of {rows} rows, or create the state with runner.new_state("
                             f"{src.conv.shape[1]})")
        state.check(self.config, src.conv.shape[1], self.model.dtype, self.model.device)
        state.conv.copy_(src.conv)
        state.ssm.copy_(src.ssm)

    def clone_state(self, state):
        """As Runner.clone_state, without the float32 round trip of to_torch_state: a float64
        (or 16-bit) state forks exactly. new_state, so the graph runner lends a bucket."""
        check_is_state(state, "runner.new_state(batch)")
        state.check(self.config, state.conv.shape[1], state.conv.dtype, self.model.device)
        out = self.new_state(state.conv.shape[1])
        return out.copy_(state)

    @property
    def tokenizer(self):
        # the model's own: a model loaded from a GGUF carries the GGUF's tokenizer, which no file
        # in source_path holds (kept by close(), which lets the model go)
        return self.model.tokenizer if self.model is not None else super().tokenizer

    def set_tokenizer(self, tokenizer) -> None:
        super().set_tokenizer(tokenizer)  # checked there
        if self.model is not None:  # closed: the model is gone
            self.model._tokenizer = self._tokenizer  # the model's, so model.generate uses it too

    def close(self) -> None:
        self._let_go(wait=True)
        if self.model is None:  # closed already
            return
        self._drop_captures()
        super().close()
        # the weights go with the runner, as the other backends free theirs: `for p in paths: with
        # open_runner(p) as r:` held two models until the next open had rebound r
        loaded = getattr(self.model, "_tokenizer", None)
        if loaded is not None:
            self._tokenizer = loaded
        self.model = None

    def _drop_captures(self, sync: bool = True) -> None:
        """Work captured on the device that refers to the process group (CudaGraphRunner's graphs).
        sync False: a rank leaving on an error does not wait for its queued work, which may be an
        all-reduce that another rank will never join."""

    def __exit__(self, *exc):
        # leaving on an error: this rank must not wait for ranks that may be blocked in an
        # all-reduce it will not join (tp.close_group)
        self._let_go(wait=exc[0] is None)
        self.close()

    def _let_go(self, wait: bool) -> None:
        """A sharded runner's share of tp's process group: the last one let go closes it, after
        this runner's own handles on it are gone (_drop_captures)."""
        if not self.closed and self._holds_group:
            from ..tp import release

            self._holds_group = False
            try:
                self._drop_captures(sync=wait)
            except BaseException:  # an interrupt in the synchronize: the group is still let go
                release(self, wait=False)
                raise
            release(self, wait)


def open_torch(path, device="cpu", dtype=torch.float32, state_dtype=None, threads: int | None = None,
               tensor_parallel: bool = False, **_) -> TorchRunner:
    """threads: torch's intra-op CPU threads (torch.set_num_threads, which is process-wide);
    None leaves torch's setting as it is. tensor_parallel: this process is one rank of a
    torchrun launch (tp.py); the model is sharded over the ranks, on cuda:LOCAL_RANK for device
    "cuda", and every rank must make the same calls."""
    from ..checkpoint import load_model

    threads = check_threads(threads)
    check_switch("tensor_parallel", tensor_parallel)
    if threads is not None:
        torch.set_num_threads(threads)
    if tensor_parallel:
        from .. import tp

        model = tp.load_sharded(path, tp.init_distributed(device)[2], dtype, state_dtype)
    else:
        model = load_model(path, device=device, dtype=dtype, state_dtype=state_dtype)
    if model.device.type == "cuda":  # graph-captured decode (Triton kernels) where available
        from ..cuda_graph import make_runner

        runner = make_runner(model)
    else:
        runner = TorchRunner(model)
    if tensor_parallel:
        tp.hold(runner)
        runner._holds_group = True  # close() lets go of the group (tp.release)
    return runner
