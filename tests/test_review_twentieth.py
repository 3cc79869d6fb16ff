"""Review (twentieth session): cases the session's own tests did not cover."""

from __future__ import annotations

import pytest

from test_load_no_init import inits  # noqa: F401  (the fixture, for the quantized-load checks)
from test_gguf_stream import test_streamed_file_holds_the_converted_tensors_in_the_standard_layout as _streamed

pytest.importorskip("gguf")


@pytest.mark.parametrize("kind", ["mamba", "mamba2_g2", "falcon_mamba"])
@pytest.mark.parametrize("outtype", ["bf16", "q4_1", "q5_0", "q5_1"])
def test_streamed_gguf_other_python_outtypes(ckpt, tmp_path, kind, outtype):
    _streamed(ckpt, tmp_path, kind, outtype)


def _fake_files(monkeypatch, files: dict):
    """onnx_runner's `open` reads `files` (path -> text); any other path does not exist."""
    import io

    from mamba_deploy.runners import onnx_runner

    def fake_open(path, *a, **k):
        if str(path) not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[str(path)])

    monkeypatch.setattr(onnx_runner, "open", fake_open, raising=False)


GiB = 2**30


@pytest.mark.parametrize("cgroup", [
    {"/sys/fs/cgroup/memory.max": f"{4 * GiB}\n", "/sys/fs/cgroup/memory.current": f"{GiB}\n",
     "/sys/fs/cgroup/memory.stat": "anon 1\ninactive_file 0\n"},  # cgroup v2 (Docker, Kubernetes)
    {"/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{4 * GiB}\n",
     "/sys/fs/cgroup/memory/memory.usage_in_bytes": f"{GiB}\n",
     "/sys/fs/cgroup/memory/memory.stat": "cache 0\ntotal_inactive_file 0\n"},  # cgroup v1
])
def test_available_memory_respects_a_container_limit(monkeypatch, cgroup):
    """In a container limited to 4 GiB (1 GiB used) on a host with 64 GiB free, /proc/meminfo's
    MemAvailable is the host's: prepacking a 2 GiB graph (5.2 GiB peak) would be kept on and the
    container OOM-killed while loading, which the automatic choice exists to prevent."""
    from mamba_deploy.runners import onnx_runner

    _fake_files(monkeypatch, {"/proc/meminfo": f"MemTotal: {128 * 2**20} kB\nMemAvailable: {64 * 2**20} kB\n",
                              **cgroup})
    assert onnx_runner.available_memory() == 3 * GiB
    with pytest.warns(UserWarning, match="prepacking is off"):
        assert onnx_runner.use_prepacking(None, 2 * GiB, "m") is False


def test_available_memory_without_a_limit_is_the_hosts(monkeypatch):
    from mamba_deploy.runners import onnx_runner

    _fake_files(monkeypatch, {"/proc/meminfo": f"MemAvailable: {64 * 2**20} kB\n",
                              "/sys/fs/cgroup/memory.max": "max\n", "/sys/fs/cgroup/memory.current": f"{GiB}\n",
                              "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes": f"{GiB}\n"})
    assert onnx_runner.available_memory() == 64 * GiB


@pytest.mark.parametrize("kind,method,opts", [
    ("mamba", "fp8", dict(fp8_scaling="tensor", include=("embeddings", "lm_head"))),
    ("mamba2_g2", "fp8", dict(fp8_scaling="channel", include=("embeddings", "lm_head"))),
    ("mamba", "int4", dict(group_size=32, symmetric=False, include=("embeddings", "lm_head"))),
    ("falcon_mamba", "int8", dict(include=("embeddings", "lm_head"))),
    ("mamba", "smoothquant", dict(n_calib=2, calib_len=16)),  # w8a8 with input_scale buffers
])
def test_load_quantized_other_formats_fill_every_tensor(hf_checkpoint, tmp_path, kind, method, opts, request):
    import torch

    from test_load_no_init import test_load_quantized_runs_no_init_and_fills_every_tensor as _check

    _check(hf_checkpoint, tmp_path, kind, method, opts, torch.float32, request)
