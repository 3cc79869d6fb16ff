"""The Runner interface: one implementation per backend; generate / verify / bench / serve use
nothing else, so a new backend gets all of them for free.

Token ids and logits cross this boundary as CPU torch tensors (ids int64, logits float32);
the state object is the backend's own and opaque to callers except through `to_torch_state`.
"""

from __future__ import annotations

import numbers
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from ..config import MambaConfig
from ..errors import ConfigError
from ..state import State


def default_threads(cpus=None, sysfs: str = "/sys/devices/system/cpu",
                    cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPU threads a backend uses when not told: one per physical core among the CPUs this
    process may run on (llama.cpp's own default; a second hyperthread per core adds little to
    bandwidth-bound decoding), and no more than a container's CPU quota (cgroup v2 cpu.max)
    allows. Falls back to the number of usable CPUs where the topology is not readable.
    cpus / sysfs / cpu_max: for tests."""
    return max(1, min(_physical_cores(cpus, sysfs), _cpu_quota(cpu_max) or 1 << 30))


def _cpu_quota(cpu_max: str) -> int | None:
    """ceil(quota / period) from a cgroup v2 cpu.max file ("max 100000" = no limit), else None."""
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        return None if quota == "max" else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


def _physical_cores(cpus, sysfs: str) -> int:
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        topo = Path(sysfs) / f"cpu{c}" / "topology"
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def check_threads(threads) -> int | None:
    """A backend's `threads` option: None (the backend's default) or an int >= 1."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ConfigError(f"threads must be an integer >= 1 (or None for the backend's default), got {threads!r}")
    return int(threads)


class Runner(ABC):
    name: str = "?"
    config: MambaConfig
    source_path: Path | None = None  # folder with tokenizer files
    supports_attention_mask: bool = True  # left-padded batched prefill

    @abstractmethod
    def new_state(self, batch: int):
        """A zeroed state for `batch` sequences."""

    @abstractmethod
    def prefill(self, ids: torch.Tensor, state, attention_mask: torch.Tensor | None = None,
                last_only: bool = False):
        """ids (b, l) -> (logits (b, l or 1, vocab) float32, state)."""

    @abstractmethod
    def step(self, ids: torch.Tensor, state):
        """ids (b,) -> (logits (b, vocab) float32, state)."""

    def to_torch_state(self, state) -> State:
        """The state as a torch `State` (conv, ssm) for verification."""
        raise NotImplementedError(f"{self.name} runner does not expose its state")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def tokenizer(self):
        from ..tokenizer import load_tokenizer

        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = load_tokenizer(self.source_path)
        return self._tokenizer

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


