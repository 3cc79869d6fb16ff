"""The memory an ONNX runner takes. ONNX Runtime's weight prepacking (`open_onnx(prepack=...)`)
peaks at ~2.6x the weights while loading, so the runner can turn it off, and does when that
would not fit in available memory.

Checked: without prepacking the runner's logits still match transformers (fp32, 1e-4 relative
to max |reference|, prefill lengths 1 / 7 / 257 at batch 1 and 3, then decode steps); the
option reaches the session; the automatic choice follows available memory and warns when it
turns prepacking off; and, in fresh processes, the memory the ONNX Runtime and OpenVINO runners
hold and peak at while loading, against bounds between the old and the new code's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import build_hf_model, rel_err
from mamba_deploy.errors import ConfigError
from mamba_deploy.runners import onnx_runner
from mamba_deploy.runners.onnx_runner import open_onnx

FP32_TOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]


def _disabled(runner) -> bool:
    try:
        return runner.session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    except RuntimeError:  # ORT: the entry was never set (its default: prepack)
        return False


@pytest.mark.parametrize("kind", ["mamba", "mamba2_g2"])
def test_without_prepacking_matches_transformers(onnx_export, kind):
    out, _, hf = onnx_export(kind)
    runner = open_onnx(out, threads=2, prepack=False)
    assert _disabled(runner)
    gen = torch.Generator().manual_seed(3)
    for batch in (1, 3):
        for length in (1, 7, 257):
            ids = torch.randint(0, hf.config.vocab_size, (batch, length + 4), generator=gen)
            with torch.no_grad():
                want = hf(ids, use_cache=False).logits.float()
            got, st = runner.prefill(ids[:, :length], runner.new_state(batch))
            errs = [rel_err(got, want[:, :length])]
            for t in range(length, length + 4):
                logits, st = runner.step(ids[:, t], st)
                errs.append(rel_err(logits, want[:, t]))
            assert max(errs) < FP32_TOL, (kind, batch, length, errs)


def test_option_reaches_the_session_and_bad_values_are_refused(onnx_export):
    out, _, _ = onnx_export("mamba")
    assert not _disabled(open_onnx(out, threads=1, prepack=True))
    assert _disabled(open_onnx(out, threads=1, prepack=False))
    for bad in ("no", 0, 1.0):
        with pytest.raises(ConfigError, match="prepack"):
            open_onnx(out, threads=1, prepack=bad)


def test_automatic_choice_follows_available_memory(onnx_export, monkeypatch):
    out, _, _ = onnx_export("mamba")
    weights = sum(p.stat().st_size for p in Path(out).glob("model.onnx*"))
    monkeypatch.setattr(onnx_runner, "available_memory", lambda: int(weights * onnx_runner.PREPACK_PEAK) + 1)
    assert not _disabled(open_onnx(out, threads=1))
    monkeypatch.setattr(onnx_runner, "available_memory", lambda: None)  # not Linux: ORT's default
    assert not _disabled(open_onnx(out, threads=1))
    monkeypatch.setattr(onnx_runner, "available_memory", lambda: weights)  # the packed copies do not fit
    with pytest.warns(UserWarning, match="prepacking is off") as record:
        runner = open_onnx(out, threads=1)
    assert _disabled(runner)
    assert str(out) in str(record[0].message) and "prepack=True" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # forced: no warning, whatever the memory
        assert not _disabled(open_onnx(out, threads=1, prepack=True))


_RSS_CHILD = """
import json, sys
sys.path.insert(0, {src!r})
from mamba_deploy.runners import open_runner
def rss(key="VmRSS"):  # VmHWM: this process's peak (ru_maxrss would start at the parent's, from fork)
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
import onnxruntime, onnx, {extra}  # imported before the first reading: only the runner is measured
before = rss()
runner = open_runner({out!r}, {backend!r}, threads=1, **{options!r})
peak = rss("VmHWM")
print(json.dumps([rss() - before, peak - before]))
"""


def _memory(out, backend, **options):
    """(bytes the process grew by opening the runner, its peak above the start), in a fresh process."""
    extra = "openvino" if backend == "openvino" else "json"
    code = _RSS_CHILD.format(src=str(ROOT / "src"), out=str(out), backend=backend, options=options, extra=extra)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
def test_memory_a_runner_holds(tmp_path):
    """A 20M-parameter Mamba (80 MB of fp32 weights, big enough to dwarf the runtimes' own
    allocations), each runner opened in a fresh process. Measured here, in multiples of the
    weights (held / peak while loading): ORT with prepacking 1.6 / 2.6 (2.3 held before freed
    pages were returned), without 1.1 / 1.6; OpenVINO 2.5 / 4.2 (3.9 / 6.1 before its proto
    was dropped before parsing and freed pages returned)."""
    from mamba_deploy.export.onnx import export_onnx

    hf = build_hf_model("mamba", hidden_size=512, num_hidden_layers=6, vocab_size=20000)
    hf.save_pretrained(tmp_path / "hf")
    out = export_onnx(tmp_path / "hf", tmp_path / "onnx", validate=False)
    weights = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    held, _ = _memory(out, "onnx", prepack=True)
    assert held < 1.9 * weights, (held, weights)
    held, peak = _memory(out, "onnx", prepack=False)
    assert held < 1.35 * weights and peak < 2.0 * weights, (held, peak, weights)
    pytest.importorskip("openvino", reason="the OpenVINO half needs the optional openvino package")
    held, peak = _memory(out, "openvino")
    assert held < 3.1 * weights and peak < 5.1 * weights, (held, peak, weights)


def test_with_a_gpu_provider_first_memory_decides_nothing(onnx_export, monkeypatch):
    """The automatic choice is the CPU provider's: with CUDA first (weights on the GPU) a host
    short of RAM must not turn prepacking off with a warning about CPU decode speed."""
    out, _, _ = onnx_export("mamba")
    monkeypatch.setattr(onnx_runner, "available_memory", lambda: 1)
    names = []

    class _Session:  # records the options; onnxruntime here has no CUDA provider to open for real
        def __init__(self, path, so, providers):
            names.append(_set(so))
            raise RuntimeError("stop after the options")

    def _set(so):
        try:
            return so.get_session_config_entry("session.disable_prepacking")
        except RuntimeError:
            return None

    import onnxruntime as ort

    monkeypatch.setattr(ort, "InferenceSession", _Session)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Exception, match="stop after the options"):
            open_onnx(out, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert names == [None]
    with pytest.warns(UserWarning, match="prepacking is off"), pytest.raises(Exception, match="stop after"):
        open_onnx(out, providers=["CPUExecutionProvider"])
    assert names[-1] == "1"
