"""llama.cpp's extra weight buffers (AMX tiles / repacking) are off by default on AMX CPUs:
llama-cpp-python 0.3.36's AMX matmul crashed the whole process on a quantized GGUF as soon as
one llama_decode held two tokens (llama.cpp issue #20824). The quantized runs below are checked
against the torch reference and, on an AMX host, would have crashed the test process."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from mamba_deploy.errors import ConfigError
from mamba_deploy.runners.llamacpp_runner import _cpu_has_amx, use_extra_buffers

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.parametrize("given, amx, expected", [(None, True, False), (None, False, True),
                                                  (True, True, True), (False, False, False)])
def test_default_is_off_on_amx_cpus_and_an_explicit_choice_wins(given, amx, expected):
    assert use_extra_buffers(given, amx) is expected


@pytest.mark.parametrize("bad", [1, "no", 0.0])
def test_a_non_bool_choice_is_refused(bad):
    with pytest.raises(ConfigError, match="extra_buffers"):
        use_extra_buffers(bad, amx=False)


@pytest.mark.parametrize("name, outtype", [("demo-mamba1", "q8_0"), ("demo-mamba2", "q4_0")])
def test_quantized_gguf_at_batch_two_passes_verify(name, outtype, tmp_path):
    """verify's prefills (lengths 1 and 24) and batched steps at batch 2: every multi-token or
    two-row llama_decode; judged by the file type's row (int8 / int4) against the torch model."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from mamba_deploy import verify as V
    from mamba_deploy.export.gguf import export_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rows too short for the block size fall back to F16, by design
        g = export_gguf(MODELS / name, tmp_path / f"m.{outtype}.gguf", outtype=outtype)
    ref, art, label = V.open_pair(MODELS / name, g, backend="llama.cpp")
    assert art.extra_buffers is (not _cpu_has_amx())
    report = V.verify(ref, art, lengths=(1, 24), batches=(2,), decode_steps=3, label=label, progress=False)
    assert report.passed, report.table()
    assert 0 < report.checks[0].value  # really quantized: not bit-identical to the reference
