"""Findings of the thirtieth session's reviews (real-width models through every verb; README walk)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from mamba_deploy.tokenizer import load_tokenizer

DEMO2 = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"


def _demo_tokenizer_for(tmp_path: Path, vocab_size: int) -> Path:
    folder = tmp_path / f"vocab{vocab_size}"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO2 / name, folder / name)
    cfg = json.loads((DEMO2 / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": vocab_size}))
    return folder


def test_a_tokenizer_far_smaller_than_the_vocabulary_is_named(tmp_path):
    """The 4096-token demo tokenizer beside a 50288-row model (the review copied it into a random
    mamba2-130m-width checkpoint): every sampled id past 4095 decoded to nothing, `generate`
    printed only the prompt, and a GGUF export padded 46184 unused tokens, with no message. Now a
    warning names both sizes and the fix; a few padding rows (mamba-130m's 3, the tiny test
    models' tens) stay silent."""
    with pytest.warns(UserWarning, match=r"4096 tokens for a model of 50288 embedding rows.*--tokenizer PATH"):
        tok = load_tokenizer(_demo_tokenizer_for(tmp_path, 50288))
    assert tok.vocab_size == 4096
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tokenizer(DEMO2)
        load_tokenizer(_demo_tokenizer_for(tmp_path, 4096 + 1024))  # padded, within the allowance


# ---- rules review: dispatch, typed errors, verify's engine limits --------------------------------

class _FakeCuda:
    """Stands for a CUDA tensor / model where none exists: pick and graph_decode_available read
    only these attributes."""

    def __init__(self, dtype):
        import torch

        self.device, self.is_cuda, self.dtype = torch.device("cuda"), True, dtype


def test_float64_on_cuda_runs_the_reference_twins_not_triton(monkeypatch):
    """A float64 model on a GPU (`verify --reference-dtype float64 --device cuda`) was sent to
    the Triton kernels: prefill computed in float32 (6.9e-7 off the float64 reference on an H200)
    and the first decode step crashed in graph capture with a ValueError from the kernel. The
    dispatch now sends dtypes the kernels do not compute in to the reference twins, and no CUDA
    graph is captured for such a model, nor under the reference backend."""
    import torch

    from mamba_deploy import ops

    kernel = object()
    monkeypatch.setattr(ops, "fast_ops", lambda: {"ssd_step": kernel, "rmsnorm": kernel})
    assert ops.pick("rmsnorm", _FakeCuda(torch.float64)) is ops.REFERENCE["rmsnorm"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert ops.pick("rmsnorm", _FakeCuda(dtype)) is kernel
    assert not ops.graph_decode_available(_FakeCuda(torch.float64))
    assert ops.graph_decode_available(_FakeCuda(torch.bfloat16))
    with ops.use_backend("ref"):
        assert not ops.graph_decode_available(_FakeCuda(torch.bfloat16))
        assert ops.pick("rmsnorm", _FakeCuda(torch.bfloat16)) is ops.REFERENCE["rmsnorm"]
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="float64"):  # the strict switch says so
        ops.pick("rmsnorm", _FakeCuda(torch.float64))


def test_bad_ops_backend_prefetch_size_and_graph_runner_on_cpu_are_typed(monkeypatch):
    """Three user mistakes that raised bare ValueErrors (not caught by `except MambaDeployError`;
    a malformed MAMBA_DEPLOY_L2_PREFETCH_MB crashed every CUDA decode with a traceback)."""
    from mamba_deploy import load_model, ops
    from mamba_deploy.cuda_graph import PREFETCH_MB, CudaGraphRunner, prefetch_mb
    from mamba_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown ops backend 'cuda'"):
        ops.set_backend("cuda")
    for bad in ("2MB", "-1", "nan", "4096"):
        monkeypatch.setenv("MAMBA_DEPLOY_L2_PREFETCH_MB", bad)
        with pytest.raises(ConfigError, match=f"MAMBA_DEPLOY_L2_PREFETCH_MB='{bad}'.*0 = no prefetch"):
            prefetch_mb()
    monkeypatch.setenv("MAMBA_DEPLOY_L2_PREFETCH_MB", "0.5")
    assert prefetch_mb() == 0.5
    monkeypatch.delenv("MAMBA_DEPLOY_L2_PREFETCH_MB")
    assert prefetch_mb() == PREFETCH_MB
    with pytest.raises(ConfigError, match="needs a model on CUDA, got cpu; use TorchRunner"):
        CudaGraphRunner(load_model(DEMO2))


@pytest.mark.parametrize("where", ["elsewhere/m.engine", "plan/m.plan", "folder/model.engine"])
@pytest.mark.parametrize("fp16,want", [(True, "fp16"), (False, "fp32")])
def test_verify_takes_a_tensorrt_engines_limits_from_its_build(tmp_path, fp16, want, where):
    """verify chose an engine's tolerance row from the ONNX folder's manifest beside it and never
    read the engine's sidecar, so an engine built with --fp16 from an fp32 export was held to fp32's
    limits (1e-4) wherever it lay. The sidecar records the build (and the export's manifest); an
    engine is named as a .engine or .plan file, or as the folder holding model.engine (the diff
    review found the first fix read only the first of those)."""
    from mamba_deploy.export.tensorrt import SIDECAR_SUFFIX
    from mamba_deploy.runners import guess_backend
    from mamba_deploy.verify import artifact_labels

    engine = tmp_path / where
    engine.parent.mkdir()
    engine.write_bytes(b"\0" * 16)
    manifest = {"format": "mamba-deploy-onnx", "dtype": "fp32", "source_weights": "q8_0"}
    Path(str(engine) + SIDECAR_SUFFIX).write_text(json.dumps({"manifest": manifest, "build": {"fp16": fp16}}))
    named = engine.parent if where.startswith("folder") else engine
    assert guess_backend(named) == "tensorrt"
    assert artifact_labels(named) == (want, "q8_0")
