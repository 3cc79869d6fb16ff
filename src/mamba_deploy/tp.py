"""Tensor parallelism, applied to a built model (as gpt-fast does): every rank loads the model,
then keeps its slice of each mixer's heads (Mamba2) or channels (Mamba1) and sums the partial
outputs of the projections that read a sliced input. Embeddings, the block norms and lm_head are
replicated, so every rank ends each block with the same hidden state and the same logits.

Per mixer, W ranks, rank r, d = d_inner split into W slices of d / W:
- Mamba2: in_proj's rows [z (d) | x (d) | B (g n) | C (g n) | dt (h)] keep this rank's heads of
  z, x and dt and the groups its heads read of B and C; conv1d's channels [x | B | C] likewise;
  dt_bias, A_log, D and the gated norm's weight by head. out_proj keeps its input columns and its
  output is summed over ranks. With fewer groups than ranks (ngroups 1: every Mamba2 checkpoint
  of mamba_ssm) B and C are replicated and the gated norm's group spans ranks: its sum of squares
  is summed over ranks before the rsqrt.
- Mamba1: in_proj's rows [x (d) | z (d)], conv1d, dt_proj's rows, A_log and D by channel; x_proj
  keeps its input columns and its output (dt, B, C, which every channel reads) is summed over
  ranks, as is out_proj's.
So a token costs one all-reduce of (b, d_model) per Mamba2 layer, plus one of (b, dt_rank + 2 n)
per Mamba1 layer, plus a (b, ngroups) one where the norm spans ranks.

Run one process per rank under torchrun: `init_distributed()` joins the group the launcher
describes, `apply_tensor_parallel(model)` shards a loaded model, and `load_sharded(path)` reads
only this rank's slices from the checkpoint (both from one table, `mixer_slices`). The State a sharded model allocates holds only
this rank's heads / channels (model.config is the rank's config; model.tp keeps the whole one).
"""

from __future__ import annotations

import atexit
import os
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MambaConfig
from .errors import BackendUnavailableError, ConfigError
from .ops.reference import _up

# what torchrun (torch.distributed.run) sets in every process it starts
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class TensorParallel:
    """What a sharded model keeps of its sharding (model.tp)."""
    group: Any  # the torch.distributed process group (None: the default group)
    rank: int
    world: int
    config: MambaConfig  # the whole model's config; model.config is this rank's


def init_distributed(device: str = "cpu") -> tuple[int, int, str]:
    """Join the process group torchrun describes (NCCL for CUDA, gloo for CPU) -> (rank, world,
    this rank's device: cuda:LOCAL_RANK for device "cuda")."""
    import torch.distributed as dist

    missing = [k for k in LAUNCH_ENV if k not in os.environ]
    if missing:
        raise ConfigError(f"tensor parallelism runs one process per rank, and {', '.join(missing)} is not set: start "
                          "the command with `torchrun --nproc-per-node N -m mamba_deploy ...` (N ranks)")
    if not dist.is_available():
        raise BackendUnavailableError("this torch build has no torch.distributed; tensor parallelism needs it")
    try:
        rank, world, local = (int(os.environ[k]) for k in LAUNCH_ENV)
    except ValueError:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got "
                          f"{[os.environ[k] for k in LAUNCH_ENV]}; let torchrun set them") from None
    from .checkpoint import check_device

    dev = check_device(device)  # a typed error for a device this machine lacks, before any group
    if dev.type == "cuda" and dev.index is not None:  # every rank would be told the same GPU
        raise ConfigError(f"device {device!r}: under tensor parallelism each rank runs on the GPU of its LOCAL_RANK "
                          "(cuda:0, cuda:1, ... on each node); pass --device cuda (device='cuda'), and choose the "
                          "GPUs with CUDA_VISIBLE_DEVICES")
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} but this machine sees {torch.cuda.device_count()} GPU(s); start at "
                              f"most that many ranks per node (torchrun --nproc-per-node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # device_id binds NCCL to this rank's GPU: else its barrier guesses the GPU from the global
        # rank, which is another node's numbering past the first node (NCCL warns it can hang)
        try:
            if dev.type == "cuda":
                dist.init_process_group("nccl", device_id=dev)
            else:
                dist.init_process_group("gloo")
        except (ValueError, RuntimeError) as e:  # a launcher's variable missing, a rank that never came
            raise ConfigError(f"rank {rank} of {world} cannot join the process group: {e}; start every rank with "
                              "`torchrun --nproc-per-node N -m mamba_deploy ...`, which sets MASTER_ADDR / "
                              "MASTER_PORT too") from e
        _group["opened"] = _group["joined"] = True
        atexit.register(close_group, wait=False)  # a script that ends without closing its runners
    if (dist.get_rank(), dist.get_world_size()) != (rank, world):  # a group made by the caller
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, str(dev)


# opened: init_distributed's group is open; joined: it was opened in this process (entry.main
# ends such a process itself)
_group = {"opened": False, "joined": False}
# open sharded runners (open_torch) that use the group; weak, so that a runner a script drops
# without closing does not stay alive for the group's sake
_holders: weakref.WeakSet = weakref.WeakSet()


def joined() -> bool:
    return _group["joined"]


def hold(runner) -> None:
    """A sharded runner starts using the group (open_torch)."""
    _holders.add(runner)


def release(runner, wait: bool = True) -> None:
    """A sharded runner is done with the group (TorchRunner.close); the last one closes it
    (close_group's wait)."""
    _holders.discard(runner)
    if not _holders:
        close_group(wait)


def close_group(wait: bool = True) -> None:
    """Close the group init_distributed opened (a group the caller made is left open). wait:
    first wait until every rank is done with it, so that none closes its connections while
    another still reads from them; only for ranks that all finished their work (a rank that
    failed must not wait for the others, which may be blocked in an all-reduce it never joins:
    it exits, and torchrun then stops them). Left to interpreter exit, the group's teardown
    aborted 2-5 of 20 CPU runs of `generate --tensor-parallel` after their output was complete
    ("terminate called without an active exception") and torchrun reported a failure; closed
    first, 2 of 20 still did, so the console script ends such a process with os._exit
    (entry.main). Runners still holding the group (a script that never closed them, or one an
    uncaught error's traceback keeps alive: this runs at exit then) first drop their captured
    all-reduces (CudaGraphRunner), which must not outlive the group."""
    import torch.distributed as dist

    for runner in list(_holders):
        runner._drop_captures(sync=wait)
    _holders.clear()
    if _group["opened"] and dist.is_initialized():
        _group["opened"] = False
        if wait:
            dist.barrier()
            dist.destroy_process_group()
        else:
            _abandon_group()


def _abandon_group() -> None:
    """A failing rank's group: NCCL's is aborted, not destroyed. Destroying finalizes its
    communicators (torch >= 2.6), which waits for queued collectives, and this rank's last one
    may be an all-reduce that another rank never joins: it would then never exit for torchrun
    to notice. Gloo's (CPU) is destroyed, as its connections close without waiting."""
    import torch.distributed as dist

    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)  # torch's, marked experimental
    if abort is not None and dist.get_backend() == "nccl":
        abort()
    else:
        dist.destroy_process_group()


def refuse_sharded(model, action: str, fix: str, error=ConfigError) -> None:
    """Raise `error` when `model` is sharded: `action` (quantizing, exporting, saving) reads the
    whole model, and this rank holds only its slice, so it would write a smaller, wrong model."""
    tp = getattr(model, "tp", None)
    if tp is not None:
        raise error(f"this is a tensor-parallel model (rank {tp.rank} of {tp.world} holds a slice of it); {action} "
                    f"needs the whole model: {fix}")


def _groups(cfg: MambaConfig, world: int) -> int:
    """Mamba2: how many of B / C's groups each rank keeps (1 where a group spans ranks)."""
    g = cfg.ngroups
    if g % world and world % g:
        raise ConfigError(f"ngroups={g} cannot be split over {world} ranks: each rank's heads must read whole groups; "
                          f"use a number of ranks that divides ngroups or that ngroups divides "
                          f"({', '.join(str(w) for w in _fitting_worlds(cfg))})")
    return max(1, g // world)


def _fitting_worlds(cfg: MambaConfig, most: int = 16) -> list[int]:
    return [w for w in range(1, most + 1) if _fits(cfg, w)]


def _fits(cfg: MambaConfig, world: int) -> bool:
    if cfg.arch == "mamba1":
        return cfg.d_inner % world == 0
    return cfg.nheads % world == 0 and not (cfg.ngroups % world and world % cfg.ngroups)


def local_config(cfg: MambaConfig, world: int) -> MambaConfig:
    """The config of one rank's slice: d_inner / world channels (nheads / world heads) and the
    groups those heads read. ConfigError naming the sizes when the model does not split."""
    if not isinstance(world, int) or world < 1:
        raise ConfigError(f"the number of ranks must be an int >= 1, got {world!r}")
    what = "d_inner" if cfg.arch == "mamba1" else "nheads"
    size = cfg.d_inner if cfg.arch == "mamba1" else cfg.nheads
    if size % world:
        raise ConfigError(f"{what}={size} cannot be split over {world} ranks; use a number of ranks that divides it "
                          f"({', '.join(str(w) for w in _fitting_worlds(cfg))})")
    d = cfg.d_inner // world
    if cfg.arch == "mamba1":
        return replace(cfg, d_inner_override=d)
    return replace(cfg, d_inner_override=d, ngroups=_groups(cfg, world))


def _keep(t: torch.Tensor, dim: int, spans) -> torch.Tensor:
    """t's slices [a, b) along dim, concatenated, as a new tensor (the full one can be freed)."""
    return torch.cat([t.narrow(dim, a, b - a) for a, b in spans], dim).contiguous()


class _SumOverRanks:
    """Forward hook: the module's output is this rank's partial sum; make it the whole one."""

    def __init__(self, group):
        self.group = group

    def __call__(self, module, inputs, output):
        import torch.distributed as dist

        dist.all_reduce(output, group=self.group)
        return output


class SplitGatedNorm:
    """Mamba2's gated RMSNorm where each norm group spans W / ngroups ranks: a rank holds d / W of
    its group's d / ngroups channels, so the sum of squares is summed over ranks. The (..., ngroups)
    all-reduce carries each rank's sum in its group's column and zeros elsewhere."""

    def __init__(self, group, ngroups: int, my_group: int, group_size: int):
        self.group, self.ngroups, self.my_group, self.group_size = group, ngroups, my_group, group_size

    def __call__(self, y, z, weight, eps, norm_before_gate):
        """y, z (..., d / W) -> (..., d / W); what ops.rmsnorm_gated computes on the whole row."""
        import torch.distributed as dist

        yf, zf = _up(y), _up(z)
        if not norm_before_gate:
            yf = yf * F.silu(zf)
        ss = yf.pow(2).sum(-1)  # (...)
        cols = torch.zeros(*ss.shape, self.ngroups, device=ss.device, dtype=ss.dtype)  # (..., ngroups)
        cols[..., self.my_group] = ss
        dist.all_reduce(cols, group=self.group)
        rstd = torch.rsqrt(cols[..., self.my_group:self.my_group + 1] / self.group_size + eps)  # (..., 1)
        out = yf * rstd * _up(weight)
        if norm_before_gate:
            out = out * F.silu(zf)
        return out.to(y.dtype)


# the mixer's parameters whose output is summed over ranks (they keep their input columns)
ROW_PARALLEL = {"mamba1": ("x_proj", "out_proj"), "mamba2": ("out_proj",)}


def _first_group(cfg: MambaConfig, rank: int, world: int) -> int:
    """The first B/C group that rank's heads read (Mamba2: heads split evenly over the ranks)."""
    return rank * (cfg.nheads // world) // (cfg.nheads // cfg.ngroups)


def mixer_slices(cfg: MambaConfig, rank: int, world: int) -> dict[str, tuple[int, list[tuple[int, int]]]]:
    """A mixer's parameter name -> (dim, spans [a, b) along dim) that rank keeps, concatenated.
    The one table both sharding paths read: slicing a loaded model (apply_tensor_parallel) and
    reading each slice from the checkpoint (load_sharded)."""
    d = cfg.d_inner
    dl = d // world
    x = (rank * dl, (rank + 1) * dl)
    cols = {f"{name}.weight": (1, [x]) for name in ROW_PARALLEL[cfg.arch]}
    if cfg.arch == "mamba1":
        xz = [x, (d + x[0], d + x[1])]  # in_proj's rows [x | z]
        return {"in_proj.weight": (0, xz), "in_proj.bias": (0, xz), "conv1d.weight": (0, [x]),
                "conv1d.bias": (0, [x]), "dt_proj.weight": (0, [x]), "dt_proj.bias": (0, [x]),
                "A_log": (0, [x]), "D": (0, [x]), **cols}
    h, n, G = cfg.nheads, cfg.d_state, cfg.ngroups
    hl, gl = h // world, _groups(cfg, world)
    g0 = _first_group(cfg, rank, world)
    bc = [(g0 * n, (g0 + gl) * n), (G * n + g0 * n, G * n + (g0 + gl) * n)]  # within [B | C]
    heads = [(rank * hl, (rank + 1) * hl)]
    shift = lambda spans, by: [(a + by, b + by) for a, b in spans]  # noqa: E731
    rows = [x] + shift([x], d) + shift(bc, 2 * d) + shift(heads, 2 * d + 2 * G * n)  # z | x | B C | dt
    chans = [x] + shift(bc, d)  # conv channels x | B C
    out = {"in_proj.weight": (0, rows), "in_proj.bias": (0, rows), "conv1d.weight": (0, chans),
           "conv1d.bias": (0, chans), "dt_bias": (0, heads), "A_log": (0, heads), "D": (0, heads), **cols}
    if cfg.rmsnorm:
        out["norm.weight"] = (0, [x])
    return out


QUANTIZED_FIX = "load the unquantized checkpoint, or run the quantized one in one process"


class Slicer:
    """checkpoint.load_model's _slicer: builds the model at rank's size (config) and hands each
    file tensor's slice to load_weights (take); applied: whether it did (a GGUF or quantized
    model loads whole instead)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.whole, self.applied = rank, world, None, False
        self.slices = {}

    def config(self, cfg: MambaConfig) -> MambaConfig:
        local = local_config(cfg, self.world)  # its error for sizes that do not split, before any slicing
        self.whole = cfg
        self.slices = mixer_slices(cfg, self.rank, self.world)
        return local

    def refuse_quantized(self, path) -> None:
        """Said before the quantized model would load whole on every rank, only to be refused."""
        raise ConfigError(f"tensor parallelism shards unquantized models; {path} is a quantized checkpoint: "
                          f"{QUANTIZED_FIX}")

    def take(self, name: str, t: torch.Tensor) -> torch.Tensor:
        head, sep, rest = name.partition(".mixer.")
        if not sep or not head.startswith("backbone.layers."):
            return t  # replicated: embeddings, block norms, lm_head
        if rest in self.slices:
            return _keep(t, *self.slices[rest])
        if self.rank != 0 and rest.endswith(".bias") and rest[:-5] in ROW_PARALLEL[self.whole.arch]:
            return torch.zeros_like(t)  # summed over ranks: rank 0 adds the bias
        return t


def _shard(mixer, cfg: MambaConfig, rank: int, world: int) -> None:
    """Slice a loaded mixer's parameters in place (mixer_slices)."""
    for name, (dim, spans) in mixer_slices(cfg, rank, world).items():
        owner, _, attr = name.rpartition(".")
        module = mixer.get_submodule(owner) if owner else mixer
        p = getattr(module, attr)
        if p is not None:
            setattr(module, attr, nn.Parameter(_keep(p.detach(), dim, spans), requires_grad=p.requires_grad))
    for name in ROW_PARALLEL[cfg.arch]:
        linear = getattr(mixer, name)
        if linear.bias is not None and rank != 0:  # a new tensor: a model made under inference_mode refuses zero_()
            linear.bias = nn.Parameter(torch.zeros_like(linear.bias), requires_grad=linear.bias.requires_grad)


def _connect(mixer, cfg: MambaConfig, rank: int, world: int, group) -> None:
    """A sliced mixer's sums over ranks: a forward hook on each row-parallel projection, and the
    split gated norm where a norm group spans ranks."""
    for name in ROW_PARALLEL[cfg.arch]:
        getattr(mixer, name).register_forward_hook(_SumOverRanks(group))
    if cfg.arch == "mamba2" and cfg.rmsnorm and cfg.ngroups < world:  # each group spread over world / G ranks
        mixer.split_norm = SplitGatedNorm(group, cfg.ngroups, _first_group(cfg, rank, world),
                                          cfg.d_inner // cfg.ngroups)


def _sync_shapes(module: nn.Module) -> None:
    """nn.Linear / nn.Conv1d's size attributes after their parameters were sliced."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.Conv1d):
            m.in_channels = m.out_channels = m.groups = m.weight.shape[0]


def apply_tensor_parallel(model, group=None):
    """Shard `model` (a MambaLM) in place over the ranks of `group` (default: the whole
    torch.distributed world, see init_distributed) and return it. Every rank must call this on
    the same model; the ranks then run it in lockstep (the same ids in every call). Every rank's
    global torch generator is seeded with rank 0's seed (see _same_seed)."""
    import torch.distributed as dist

    from .model import Linear, MambaLM

    if not isinstance(model, MambaLM):
        raise ConfigError(f"apply_tensor_parallel takes a MambaLM (load_model's), got {type(model).__name__}")
    _require_group()
    if model.tp is not None:
        raise ConfigError(f"this model is already sharded over {model.tp.world} ranks")
    names = ("in_proj", "x_proj", "dt_proj", "out_proj")
    odd = sorted({type(getattr(layer.mixer, k)).__name__ for layer in model.backbone.layers for k in names
                  if hasattr(layer.mixer, k) and type(getattr(layer.mixer, k)) is not Linear})
    if odd:
        raise ConfigError(f"tensor parallelism shards unquantized models; this one has {', '.join(odd)} projections: "
                          f"{QUANTIZED_FIX}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    local = local_config(model.config, world)
    for layer in model.backbone.layers:
        _shard(layer.mixer, model.config, rank, world)
    return _finish(model, model.config, local, group)


def _require_group() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("torch.distributed is not initialized: call mamba_deploy.tp.init_distributed() in each "
                          "process started by `torchrun --nproc-per-node N`")


def _finish(model, cfg: MambaConfig, local: MambaConfig, group):
    """A model whose mixers hold this rank's slices (of `cfg`, the whole model's config) becomes
    the rank's sharded model: its sums over ranks connected, its config the rank's."""
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for layer in model.backbone.layers:
        _connect(layer.mixer, cfg, rank, world, group)
        layer.mixer.cfg = local
        _sync_shapes(layer.mixer)
    model.config = local
    model.tp = TensorParallel(group, rank, world, cfg)
    _same_seed(group)
    return model


def load_sharded(path, device="cpu", dtype=torch.float32, state_dtype=None, group=None):
    """load_model(path)'s MambaLM sharded over the ranks of `group`, as apply_tensor_parallel
    shards it, on `device`. A checkpoint folder is built at this rank's size on the device and
    filled with its slices, read from the files one tensor at a time: neither the GPU nor host
    memory holds the whole model. A GGUF file loads whole on the CPU, is sliced there and then
    moved; a quantized checkpoint is refused, as apply_tensor_parallel refuses it."""
    import torch.distributed as dist

    from .checkpoint import load_model

    _require_group()
    slicer = Slicer(dist.get_rank(group), dist.get_world_size(group))
    model = load_model(path, device=device, dtype=dtype, state_dtype=state_dtype, _slicer=slicer)
    if not slicer.applied:
        return apply_tensor_parallel(model, group).to(device)
    return _finish(model, slicer.whole, model.config, group)


def _comm_device(group) -> torch.device:
    """Where a tensor must be for the group's collectives: NCCL takes CUDA tensors only."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _same_seed(group) -> None:
    """Seed every rank's global torch generator with rank 0's seed. Unseeded sampling draws from
    it, and each process seeds its own at random: ranks that drew different tokens would feed
    their all-reduces different inputs (and one could stop while the others wait for it)."""
    import torch.distributed as dist

    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(_comm_device(group))
    dist.broadcast(seed, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    torch.manual_seed(int(seed.item()))


__all__ = ["Slicer", "SplitGatedNorm", "TensorParallel", "apply_tensor_parallel", "close_group", "init_distributed",
           "load_sharded", "local_config", "mixer_slices"]
