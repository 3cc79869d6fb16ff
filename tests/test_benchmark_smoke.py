"""The issues' benchmark scripts run end to end (on tiny settings) and write what their tables say.

Speed is measured by the scripts, not asserted here (a CI machine is noisy); these tests catch a
script broken by a change elsewhere (an API it calls, a row it drops), which nothing else ran:
benchmarks/cpu_forward.py (the Foundation issue), benchmarks/cpu_backends.py (the ONNX and GGUF
issues: every CPU backend in one run) and benchmarks/quant.py --speed-only (the quantization issue).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args, timeout=600) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                         text=True, env=env, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_cpu_forward_runs_both_architectures(tmp_path):
    out = tmp_path / "f.json"
    _run("cpu_forward.py", "--threads", "1", "--layers", "1", "--prompt-len", "8", "--decode", "2", "--repeats", "1",
         "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["mamba1-130m (1 layers)", "mamba2-130m (1 layers)"]
    for r in rows:
        assert all(_positive(r[k]) for k in ("transformers_prefill_s", "ours_prefill_s", "prefill_speedup")), r


def test_cpu_backends_measures_every_backend_and_variant(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the `onnx` extra)")
    out = tmp_path / "b.json"
    backends = "onnxruntime,torch" + (",llama.cpp" if _has("llama_cpp") else "")
    _run("cpu_backends.py", "--threads", "1", "--layers", "1", "--prefill", "8", "--decode", "2", "--skip-transformers",
         "--backends", backends, "--out", str(out))
    report = json.loads(out.read_text())
    assert report["meta"]["layers"] == 1
    got = {(r["arch"], r["backend"], r["variant"]) for r in report["rows"]}
    want = {(a, "onnxruntime", "fp32") for a in ("mamba1", "mamba2")}
    want |= {(a, "torch", v) for a in ("mamba1", "mamba2") for v in ("fp32", "int8", "int4-g128")}
    if _has("llama_cpp"):
        want |= {(a, "llama.cpp", v) for a in ("mamba1", "mamba2") for v in ("F32", "Q8_0", "Q4_K_M")}
    assert got == want, got ^ want
    for r in report["rows"]:
        assert _positive(r["prefill_s"]) and _positive(r["decode_ms_per_token"]), r


def test_quant_speed_table_on_a_demo_model(tmp_path):
    out = tmp_path / "q.json"
    _run("quant.py", "--speed-only", "--models", str(ROOT / "models" / "demo-mamba1"), "--no-onnx", "--threads", "1",
         "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp32", "int8", "int4-g128 (RTN)"]
    assert rows[1]["bytes"] < rows[0]["bytes"] and rows[2]["bytes"] < rows[1]["bytes"]  # the codes are smaller
    assert all(_positive(r["torch_ms"]) for r in rows), rows


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
