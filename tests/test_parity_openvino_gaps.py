"""OpenVINO paths no test compared with an independent reference.

- Falcon-Mamba (the weightless dt/B/C RMSNorm inside the mixer) never ran through OpenVINO: the
  OpenVINO tests take mamba / mamba2 / mamba2_g2 / mamba2_dtlimit only. Against transformers fp32,
  prefill 1, 7, 33 (Mamba1 scan chunk + 1) and 257 at batch 3, then 8 decode steps; states against
  the PyTorch model; fp32 1e-4.
- The fp16 ONNX export under OpenVINO (f32 inference precision, fp16 weights), against
  transformers fp32 at the fp16 row (1e-2) and >= 99% top-1.
"""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from mamba_deploy import load_model

pytest.importorskip("openvino", reason="openvino is not installed: pip install -r requirements-ci.txt")
from mamba_deploy.runners.openvino_runner import open_openvino  # noqa: E402

STEPS = 8


def _run(runner, ids, length, batch):
    got, st = runner.prefill(ids[:, :length], runner.new_state(batch))
    out = [got]
    for t in range(length, ids.shape[1]):
        logits, st = runner.step(ids[:, t], st)
        out.append(logits[:, None])
    return torch.cat(out, 1), st


def test_openvino_falcon_mamba_vs_transformers(onnx_export):
    out, folder, hf = onnx_export("falcon_mamba")
    runner, model = open_openvino(out), load_model(folder)
    g = torch.Generator().manual_seed(43)
    report = []
    for length in (1, 7, 33, 257):
        ids = torch.randint(0, 128, (3, length + STEPS), generator=g)
        with torch.no_grad():
            want = hf(ids).logits.float()
            ref_state = model(ids).state
        got, st = _run(runner, ids, length, 3)
        mine = runner.to_torch_state(st)
        report.append((length, rel_err(got, want), rel_err(mine.ssm, ref_state.ssm),
                       rel_err(mine.conv, ref_state.conv)))
    print("openvino falcon_mamba", [(n, *(f"{x:.1e}" for x in e)) for n, *e in report])
    assert all(max(e) <= 1e-4 for _, *e in report), report


@pytest.mark.parametrize("kind", ["mamba", "mamba2_g2"])
def test_openvino_fp16_export_vs_transformers(onnx_export, kind):
    out, _, hf = onnx_export(kind, "fp16")
    runner = open_openvino(out)
    ids = torch.randint(0, 128, (3, 300), generator=torch.Generator().manual_seed(5))
    got, _ = _run(runner, ids, 292, 3)
    with torch.no_grad():
        want = hf(ids).logits.float()
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    err = rel_err(got, want)
    print(f"openvino fp16 {kind}: {err:.2e}, top-1 {agree:.4f}")
    assert err <= 1e-2 and agree >= 0.99, (err, agree)
