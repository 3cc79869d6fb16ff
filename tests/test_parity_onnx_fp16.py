"""The fp16 ONNX export at every length class. test_onnx.py checks fp16 on one prefill
length (292) then 8 steps, logits only; the fp16 row of tolerances.py bounds states too. Here:
prefill 1, 7, chunk+1 (17 for Mamba2's 16, 33 for Mamba1's 32-token scan chunk) and 257 at
batch 3, then 8 decode steps, logits against transformers fp32 and the final conv / SSM state
against the PyTorch fp32 model fed the same tokens, <= the fp16 row (1e-2 / 1e-2)."""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from mamba_deploy import load_model
from mamba_deploy.runners.onnx_runner import open_onnx
from mamba_deploy.tolerances import TOLERANCES

pytest.importorskip("onnxruntime")
ROW = TOLERANCES["fp16"]


@pytest.mark.parametrize("kind", ["mamba", "falcon_mamba", "mamba2", "mamba2_g2"])
def test_fp16_export_lengths_steps_and_states(onnx_export, kind):
    out, folder, hf = onnx_export(kind, "fp16")
    runner, model = open_onnx(out, threads=1), load_model(folder)
    chunk_plus_1 = 33 if kind in ("mamba", "falcon_mamba") else 17
    g = torch.Generator().manual_seed(43)
    report = []
    for length in (1, 7, chunk_plus_1, 257):
        ids = torch.randint(0, 128, (3, length + 8), generator=g)
        with torch.no_grad():
            want = hf(ids, use_cache=False).logits.float()
            ref_state = model(ids).state
        got, st = runner.prefill(ids[:, :length], runner.new_state(3))
        errs = [rel_err(got, want[:, :length])]
        for t in range(length, length + 8):
            logits, st = runner.step(ids[:, t], st)
            errs.append(rel_err(logits, want[:, t]))
        mine = runner.to_torch_state(st)
        report.append((length, max(errs), rel_err(mine.ssm, ref_state.ssm), rel_err(mine.conv, ref_state.conv)))
    print(kind, [(n, *(f"{x:.1e}" for x in e)) for n, *e in report])
    assert all(e[0] <= ROW["logits_rel"] and max(e[1:]) <= ROW["state_rel"] for _, *e in report), report
