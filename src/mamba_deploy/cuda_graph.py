"""Decode captured as CUDA graphs, one per batch bucket, over preallocated State buffers.

A decode step of a 64-layer model is a few hundred small kernels; launched from Python each
costs more host time than its GPU work. `CudaGraphRunner` records the whole step once per batch
bucket (1, 2, 4, ... 128) with `torch.cuda.CUDAGraph` and replays it. A graph replays fixed
addresses, so each bucket owns static buffers: token ids, the State (n_layer, bucket, ...) and the
logits. `new_state(batch)` lends a view of the bucket's State (rows [:batch]); stepping a lent
state replays with no copies. Any other State still works: copied in and out around the
replay, with a live lent state's rows saved and restored around it.

The captured step is `fast_decode_step`: the model's own weights, with the per-layer work fused
more than `MambaLM.step` does: A precomputed once; residual add + next RMSNorm in one kernel; for
Mamba2 with ngroups == 1, the whole mixer between in_proj and out_proj in one kernel
(`ssd_step_gated_`: conv, state update, gate, norm statistics; the norm's per-row 1/rms is applied
after out_proj, which is linear), so a layer is 4 launches: add+norm, in_proj, mixer, out_proj.
For Mamba1, dt_proj is folded into the state-update kernel (`selective_state_update_dt`) and, at
batch 1, the conv update into in_proj's GEMV as an epilogue, so a layer is 5 launches: add+norm,
in_proj + conv, x_proj, state update, out_proj (6 at batch 2-4, with the conv-update kernel).
At batch 1 the projections are the Triton GEMV (ops/triton_gemv.py), and on Hopper every launch
of a layer uses programmatic dependent launch: each starts reading its weights (and its layer's
state) while its predecessor finishes. Measured on an H200, mamba-2.8b batch 1 (interleaved,
`h200_mamba1_fused_dt_ab.log`): 2.17-2.29 ms unfused, 1.98 ms with dt_proj folded in, 1.83 ms
with the conv update and state update also launched with PDL, 1.81 ms with the conv in the GEMV.
Which fused ops a step uses, per batch, is decided where every other op choice is,
`ops.decode_fusion` (fused up to ops.FUSED_MAX_BATCH rows); MAMBA_DEPLOY_FUSED_DECODE=0 falls
back to the `ssd_step` + `rmsnorm_gated` kernels (Mamba2) and the unfused `Mamba1Mixer.step`
(Mamba1). The test suite compares its logits with the reference path's.
"""

from __future__ import annotations

import os
import threading
import weakref

import torch

from . import ops
from .errors import BackendUnavailableError, ConfigError, ShapeError
from .extras import install_hint
from .inputs import check_ids
from .runners.base import one_call_at_a_time
from .runners.torch_runner import TorchRunner
from .state import State, check_is_state

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# MiB of the next GEMV's weights that the norm / mixer kernel before it prefetches into L2
# (triton_gemv.l2_prefetch); MAMBA_DEPLOY_L2_PREFETCH_MB overrides (0: off). Measured on an H200
# (gpu_decode_sweep.py), batch-1 ms per token with the one-shot GEMV, 0 / 2 / 4 MiB: mamba2-2.7b
# 1.813 / 1.781 / 1.845, 1.3b 1.006 / 0.980 / 1.001, 130m 0.223 / 0.227 / 0.239. With the
# earlier looping GEMV, 0 / 1 / 2 / 4 / 8 / 16 MiB: 2.7b 2.019 / 1.972 / 1.950 / 1.945 / 2.017 /
# 2.189 (more than fits the gap between GEMVs competes with the GEMV before it).
PREFETCH_MB = 2


def prefetch_mb() -> float:
    """MiB of the next GEMV's weights to bring into L2: MAMBA_DEPLOY_L2_PREFETCH_MB, else PREFETCH_MB."""
    raw = os.environ.get("MAMBA_DEPLOY_L2_PREFETCH_MB")
    if raw is None:
        return PREFETCH_MB
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not 0 <= mb < 1024:  # NaN fails too
        raise ConfigError(f"MAMBA_DEPLOY_L2_PREFETCH_MB={raw!r} must be a number of MiB in [0, 1024) "
                          f"(0 = no prefetch; unset = {PREFETCH_MB})")
    return mb


def graphs_enabled() -> bool:
    return os.environ.get("MAMBA_DEPLOY_CUDA_GRAPHS", "1") != "0"


class DecodePlan:
    """Per-layer constants for `fast_decode_step`, computed once (A = -exp(A_log) etc.)."""

    def __init__(self, model):
        self.model = model
        self.cfg = model.config
        self.A = [-torch.exp(layer.mixer.A_log.float()) for layer in model.backbone.layers]
        self.norms = [layer.norm for layer in model.backbone.layers] + [model.backbone.norm_f]
        self.residual_fp32 = self.cfg.residual_in_fp32
        from .model import Linear

        layers = model.backbone.layers
        mamba1 = self.cfg.arch == "mamba1"
        # what ops.decode_fusion needs to know of the modules: a folded dt_proj is read as a
        # weight, as Mamba1Mixer does (a quantized one with an input scale cannot be); the conv
        # epilogue is a GEMV's, so in_proj must be a plain Linear
        self.dt_plain = mamba1 and all(getattr(layer.mixer.dt_proj, "input_scale", None) is None for layer in layers)
        self.in_proj_plain = all(type(layer.mixer.in_proj) is Linear for layer in layers)
        # a tensor-parallel out_proj's output is summed over ranks (tp.py) before the fused
        # mixer's per-row norm scale would be applied to it
        self.out_proj_local = getattr(model, "tp", None) is None
        # dt_proj's weight for the folded state update: the parameter itself, or for a quantized
        # dt_proj its dequantized weight, made once here (d x dt_rank, 1/16 of in_proj) rather
        # than by `weight` inside every replay (mamba-2.8b int8, batch 1: 2.65 ms per step then)
        self.dt_weight = [layer.mixer.dt_proj.weight.detach() for layer in layers] if self.dt_plain else None
        dev = model.device
        self.sumsq = torch.zeros(max(BUCKETS), device=dev, dtype=torch.float32)  # stays zero between steps
        self.counter = torch.zeros(max(BUCKETS), device=dev, dtype=torch.int32)
        self.prefetch_bytes = int(prefetch_mb() * 2**20)

    def fusion(self, batch: int) -> ops.DecodeFusion:
        return ops.decode_fusion(self.cfg, batch, self.dt_plain, self.in_proj_plain, self.out_proj_local)

    def prefetch(self, linear, batch: int):
        """(weight, bytes) for a small kernel to bring into L2 ahead of the GEMV that reads
        linear's weight (batch 1 only: larger batches use cuBLAS, which is compute- not
        latency-bound). A quantized linear's kernels read other tensors, and its `weight` would
        dequantize the whole matrix inside the graph: nothing is prefetched for it."""
        from .model import Linear

        if type(linear) is not Linear:
            return (None, 0)
        return (linear.weight, self.prefetch_bytes if batch == 1 else 0)


def _mamba2_mixer_step(mixer, A, x, conv_state, ssm_state):
    """Mamba2Mixer.step with A precomputed; conv_state / ssm_state updated in place."""
    cfg = mixer.cfg
    z, xBC, dt = mixer._split(mixer.in_proj(x))  # (b, d), (b, conv_dim), (b, h)
    y, conv, ssm = ops.ssd_step(xBC, dt, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, conv_state,
                                A, mixer.D, mixer.dt_bias, ssm_state, cfg.dt_limit)
    conv_state.copy_(conv)  # no-op when the kernel updated in place
    ssm_state.copy_(ssm)
    y = mixer._gate(y.reshape(x.shape[0], cfg.d_inner), z)
    return mixer.out_proj(y)


def _mamba2_fused_step(plan, mixer, A, x, conv_state, ssm_state):
    """in_proj, one fused op (conv, SSD update, gate, norm statistics), out_proj; the norm's
    per-row 1/rms is applied after out_proj by the next add_rmsnorm_ (the `scale` kwargs)."""
    cfg = mixer.cfg
    b = x.shape[0]
    z, xBC, dt = mixer._split(mixer.in_proj(x))  # (b, d), (b, conv_dim), (b, h)
    u = torch.empty((b, cfg.d_inner), device=x.device, dtype=x.dtype)
    ssq = plan.sumsq[:b]
    ops.ssd_step_gated_(xBC, dt, z, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, conv_state, A, mixer.D,
                        mixer.dt_bias, ssm_state, mixer.norm.weight, cfg.dt_limit, cfg.norm_before_gate,
                        u, ssq, plan.counter, state_early=True,  # the step begins with the embedding lookup
                        prefetch=plan.prefetch(mixer.out_proj, b))
    return mixer.out_proj(u), dict(sumsq=ssq, scale_n=cfg.d_inner, scale_eps=mixer.norm.eps)


def _mamba1_fused_step(mixer, A, dt_weight, conv_in_gemv, x, conv_state, ssm_state):
    """Mamba1Mixer.step with dt_proj folded into the state update and, with conv_in_gemv, the
    conv update inside in_proj (at batch 1 on CUDA one launch, the GEMV's epilogue);
    conv_state and ssm_state are updated in place. Both states were last written
    by the previous token's step, and the step begins with the embedding lookup, an ordinary
    launch, so the kernels may read them before their PDL wait (the state_early hint)."""
    w, cb = mixer.conv1d.weight[:, 0], mixer.conv1d.bias  # (d, k)
    ip = mixer.in_proj
    if conv_in_gemv:
        xs, z, conv = ops.linear_conv1d_update(x, ip.weight, ip.bias, w, cb, conv_state, state_early=True)
    else:
        xs, z = ip(x).chunk(2, dim=-1)  # (b, d)
        xs, conv = ops.causal_conv1d_update(xs, w, cb, conv_state, state_early=True, pdl=True)
    conv_state.copy_(conv)
    dt, B, C = mixer._dt_in_B_C(xs)  # dt_proj's input (b, r)
    y, ssm = ops.selective_state_update_dt(xs, dt, dt_weight, A, B, C, mixer.D, z, mixer.dt_proj.bias,
                                           ssm_state, state_early=True)
    ssm_state.copy_(ssm)
    return mixer.out_proj(y)


def fast_decode_step(plan: DecodePlan, ids, state: State):
    """ids (b,) -> logits (b, vocab) float32; state updated in place. Made of the fused decode
    ops (ops/__init__.py), so it runs wherever they do: the Triton kernels on CUDA, their
    reference twins elsewhere (the CPU tests compare it with MambaLM.step there)."""
    model = plan.model
    h = model.backbone.embeddings(ids)  # (b, d_model)
    residual = h.float() if plan.residual_fp32 else h.clone()
    x = plan.norms[0](h.to(plan.norms[0].weight.dtype))
    scale = {}
    b = ids.shape[0]
    fusion = plan.fusion(b)  # which fused ops (ops.decode_fusion decides)
    layers = model.backbone.layers
    for i, layer in enumerate(layers):
        if fusion.gated_mixer:
            y, scale = _mamba2_fused_step(plan, layer.mixer, plan.A[i], x, state.conv[i], state.ssm[i])
        elif fusion.dt_folded:
            y = _mamba1_fused_step(layer.mixer, plan.A[i], plan.dt_weight[i], fusion.conv_in_gemv, x, state.conv[i],
                                   state.ssm[i])
        elif plan.cfg.arch == "mamba2":
            y = _mamba2_mixer_step(layer.mixer, plan.A[i], x, state.conv[i], state.ssm[i])
        else:
            y, conv, ssm = layer.mixer.step(x, state.conv[i], state.ssm[i], A=plan.A[i])
            state.conv[i].copy_(conv)  # no-op when the kernel updated in place
            state.ssm[i].copy_(ssm)
        nxt = plan.norms[i + 1]
        nxt_linear = layers[i + 1].mixer.in_proj if i + 1 < len(layers) else model.lm_head
        # residual += y; x = norm(residual)
        x = ops.add_rmsnorm_(y, residual, nxt.weight, nxt.eps, prefetch=plan.prefetch(nxt_linear, b), **scale)
    return model.lm_head(x.to(model.dtype)).float()


class _Bucket:
    def __init__(self, model, size: int):
        self.size = size
        self.state = model.new_state(size)
        self.ids = torch.zeros(size, dtype=torch.long, device=model.device)
        self.graph = None
        self.logits = None
        self.lent = None  # weakref to the State view handed out by new_state

    def owns(self, state: State) -> bool:
        return (state.conv.data_ptr() == self.state.conv.data_ptr()
                and state.ssm.data_ptr() == self.state.ssm.data_ptr())


class CudaGraphRunner(TorchRunner):
    """TorchRunner whose `step` replays a captured CUDA graph (prefill stays eager)."""

    name = "torch-cudagraph"

    def __init__(self, model, buckets=BUCKETS):
        super().__init__(model)
        if model.device.type != "cuda":
            raise ConfigError(f"CudaGraphRunner needs a model on CUDA, got {model.device}; use TorchRunner")
        if ops.fast_ops().get("ssd_step") is None:
            raise BackendUnavailableError("CudaGraphRunner captures the Triton kernels, and Triton is not installed "
                                          f"(or sees no GPU): {install_hint('triton')}; use TorchRunner")
        if model.dtype not in ops.TRITON_DTYPES:
            raise ConfigError(f"CudaGraphRunner captures the Triton kernels, which compute in "
                              f"{', '.join(str(d).replace('torch.', '') for d in ops.TRITON_DTYPES)}, not {model.dtype}; "
                              "use TorchRunner (make_runner picks it), whose ops run the reference twins")
        self.buckets = tuple(sorted(buckets))
        # one call at a time: threads sharing the runner share its buckets (ids, lent views, the
        # rows a plain state is copied through), and got each other's tokens without it
        self.call_lock = threading.RLock()
        self._plan = DecodePlan(model)
        self._b: dict[int, _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle()

    # ---- buckets -------------------------------------------------------------
    def _bucket_size(self, batch: int):
        return next((s for s in self.buckets if s >= batch), None)

    def _bucket(self, size: int) -> _Bucket:
        if size not in self._b:
            # normal tensors even when first made under inference_mode (in step): new_state zeroes
            # the bucket's rows outside it, which an inference tensor refuses
            with torch.inference_mode(False):
                self._b[size] = _Bucket(self.model, size)
        return self._b[size]

    @torch.inference_mode()
    def _capture(self, bk: _Bucket):
        saved = bk.state.clone()  # warm-up steps advance the state; capture itself runs nothing
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles the Triton kernels outside the capture
                fast_decode_step(self._plan, bk.ids, bk.state)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            bk.logits = fast_decode_step(self._plan, bk.ids, bk.state)
        bk.state.copy_(saved)
        bk.graph = graph

    # ---- Runner --------------------------------------------------------------
    @one_call_at_a_time
    def prefill(self, ids, state, attention_mask=None, last_only=False):
        return super().prefill(ids, state, attention_mask, last_only)

    @one_call_at_a_time
    def gather_states(self, parts):
        return super().gather_states(parts)

    @one_call_at_a_time
    def clone_state(self, state):
        return super().clone_state(state)

    @one_call_at_a_time
    def load_torch_state(self, state, src: State) -> None:
        super().load_torch_state(state, src)

    @one_call_at_a_time
    def to_torch_state(self, state) -> State:
        return super().to_torch_state(state)

    @one_call_at_a_time
    def new_state(self, batch: int) -> State:
        size = self._bucket_size(batch)
        if size is None:
            return super().new_state(batch)
        bk = self._bucket(size)
        if bk.lent is not None and bk.lent() is not None:
            return super().new_state(batch)  # bucket busy: a plain state (copied around replays)
        view = State(bk.state.conv[:, :batch], bk.state.ssm[:, :batch])
        view.zero_()
        bk.lent = weakref.ref(view)
        return view

    def _adopt(self, state: State, consumed) -> State:
        """Gathered rows into a bucket's lent view (replayed with no copies); a bucket lent to a
        consumed state is free again, its rows already copied out."""
        ids = {id(s) for s in consumed}
        for bk in self._b.values():
            if bk.lent is not None and id(bk.lent()) in ids:
                bk.lent = None
        out = self.new_state(state.conv.shape[1])
        return out.copy_(state)

    @one_call_at_a_time
    @torch.inference_mode()
    def step(self, ids, state):
        ids = check_ids(ids, 1, self.config.padded_vocab_size, on_device=True)  # CPU ids: no sync
        batch = ids.shape[0]
        size = self._bucket_size(batch)
        if size is None or not graphs_enabled() or ops.get_backend() == "ref":
            return super().step(ids, state)  # under the reference backend: its ops, eagerly (nothing captured)
        bk = self._bucket(size)
        if bk.graph is None:
            self._capture(bk)
        check_is_state(state)  # a consumed state may view the bucket the gathered one now owns
        bk.ids[:batch].copy_(ids, non_blocking=True)
        if bk.owns(state):
            if state.conv.shape[1] != batch:  # the only check of the rows on this path (a shape: no sync)
                raise ShapeError(f"ids have {batch} rows and the state {state.conv.shape[1]}; step one id per row "
                                 "of the state runner.new_state(batch) made")
            bk.graph.replay()
        else:
            state.check(self.config, batch, self.model.dtype, self.model.device)
            lent = bk.lent() if bk.lent is not None else None
            # a live lent state views the bucket's first rows, and the replay steps every row:
            # keep all of its rows (not only the first `batch`) across this state's replay
            n = 0 if lent is None else lent.conv.shape[1]
            kept = (bk.state.conv[:, :n].clone(), bk.state.ssm[:, :n].clone()) if n else None
            bk.state.conv[:, :batch].copy_(state.conv)
            bk.state.ssm[:, :batch].copy_(state.ssm)
            bk.graph.replay()
            state.conv.copy_(bk.state.conv[:, :batch])
            state.ssm.copy_(bk.state.ssm[:, :batch])
            if kept is not None:
                bk.state.conv[:, :n].copy_(kept[0])
                bk.state.ssm[:, :n].copy_(kept[1])
        return bk.logits[:batch].cpu(), state

    @one_call_at_a_time
    def close(self) -> None:
        super().close()
        self._plan = None  # it holds the model too (TorchRunner.close lets the model go)

    def _drop_captures(self, sync: bool = True) -> None:
        """The graphs go before the process group: a sharded model's graphs hold its captured NCCL
        all-reduces, and `generate --tensor-parallel --device cuda` on 2 GPUs printed its text and
        then never exited while they outlived the group (benchmarks/gpu_tp.py, which dropped its
        runner first, ended normally). A graph still running is freed when it completes (CUDA's
        cudaGraphExecDestroy), so the error path need not wait (sync=False; tp then aborts the
        group rather than destroying it)."""
        if self._b:
            if sync:
                torch.cuda.synchronize(self.model.device)
            self._b.clear()
            self._pool = None

    # for benchmarks: replay without the host copy of the logits
    def replay(self, batch: int):
        bk = self._bucket(self._bucket_size(batch))
        if bk.graph is None:
            self._capture(bk)
        bk.graph.replay()
        return bk.logits


def make_runner(model):
    """CudaGraphRunner where ops.graph_decode_available (CUDA, Triton, not the reference backend, a
    dtype the kernels compute in) and graphs are enabled, else TorchRunner (eager, the ops'
    dispatch picks per call: a float64 model on CUDA runs the reference twins)."""
    if graphs_enabled() and ops.graph_decode_available(model):
        return CudaGraphRunner(model)
    return TorchRunner(model)


__all__ = ["CudaGraphRunner", "DecodePlan", "fast_decode_step", "make_runner", "BUCKETS"]
