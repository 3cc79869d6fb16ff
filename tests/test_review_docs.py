"""Checks found by walking README.md / docs/cli.md literally (docs review)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mamba_deploy.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO_MAMBA1 = ROOT / "models" / "demo-mamba1"  # shipped; its safetensors are stored in fp16


def readme_tolerance_rows() -> dict:
    """README's verify table (| row | logits_rel <= | state_rel <= | top1 >= | ppl_rel <= |): the
    documented default limits, read from the docs rather than from verify.TOLERANCES."""
    rows = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*(fp32|fp16|bf16|int8|q6|q5|int4|q3|q2)(?: \([^)]*\))?\s*\|\s*([\d.e-]+)\s*\|\s*([\d.e-]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.e-]+)\s*\|$", line)
        if m:
            rows[m.group(1)] = dict(zip(("logits_rel", "state_rel", "top1", "ppl_rel"), map(float, m.groups()[1:])))
    assert {"fp32", "fp16", "bf16", "int8", "int4"} <= set(rows), rows
    return rows


@pytest.mark.parametrize("artifact_dtype, row", [("bf16", "bf16"), ("fp32", "fp16")])
def test_verify_artifact_dtype_uses_the_looser_row(tmp_path, artifact_dtype, row):
    """`verify --artifact-dtype bf16` of an fp16-stored checkpoint computes in bf16, so it gets
    the bf16 limits (it got the fp16 ones: the run dtype was only used for fp32 checkpoints, and a
    healthy bf16 run failed state_rel); run in fp32 it keeps its stored type's fp16 limits."""
    out = tmp_path / "report.json"
    rc = main(["verify", str(DEMO_MAMBA1), str(DEMO_MAMBA1), "--artifact-dtype", artifact_dtype,
               "--lengths", "1,7", "--batch", "1,3", "--decode-steps", "8", "--threads", "1", "--quiet",
               "--json", str(out)])
    report = json.loads(out.read_text())
    tol = report["tolerance"]
    assert tol["label"] == row
    assert {k: tol[k] for k in readme_tolerance_rows()[row]} == readme_tolerance_rows()[row]
    assert rc == 0 and report["passed"], report["failures"]


def test_quantize_refuses_calibration_flags_a_method_does_not_read(hf_checkpoint, tmp_path, capsys, monkeypatch):
    """README: "a flag the method does not take is refused, not ignored". `quantize --method int8
    --calib FILE` wrote the checkpoint without reading FILE. Which methods read calibration data is
    observed through quantize() itself; the CLI must refuse --calib / --n-calib / --calib-len for
    the others (before writing anything) and, with --auto, drop them with a note."""
    import torch

    from mamba_deploy import load_model
    from mamba_deploy.quant import quantizer
    from mamba_deploy.quant.plan import METHODS

    folder, _ = hf_checkpoint("mamba")
    readers, real = set(), quantizer.calibration_ids
    for method in METHODS:
        def spy(*a, method=method, **k):
            readers.add(method)
            return real(*a, **k)
        monkeypatch.setattr(quantizer, "calibration_ids", spy)
        ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
        rows = {"group_size": 32} if METHODS[method]["format"] == "int4" else {}  # the tiny model's rows are 32
        quantizer.quantize(load_model(folder), method, calib_ids=ids, n_calib=2, calib_len=16, progress=False, **rows)
    monkeypatch.setattr(quantizer, "calibration_ids", real)
    ignorers = sorted(set(METHODS) - readers)
    assert readers and ignorers, (readers, ignorers)
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x\n" * 50)
    for method in ignorers:
        for flag, value in [("--calib", str(text)), ("--n-calib", "2"), ("--calib-len", "16")]:
            out = tmp_path / f"{method}{flag}"
            assert main(["quantize", str(folder), str(out), "--method", method, flag, value]) == 2
            err = capsys.readouterr().err
            assert f"{flag} does not apply to --method {method}" in err, err
            assert all(m in err.split("applies to", 1)[1] for m in readers), err
            assert not out.exists()
    assert main(["quantize", str(folder), str(tmp_path / "auto"), "--auto", "--calib", str(text)]) == 0
    picked = load_model(tmp_path / "auto").quantization_config["method"]
    if picked in ignorers:
        assert "--calib does not apply to" in capsys.readouterr().out
