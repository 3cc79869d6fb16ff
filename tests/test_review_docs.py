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
