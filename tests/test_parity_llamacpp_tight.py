"""llama.cpp F32 checks that were written at 1e-3 (100x the F32 row of tests/test_gguf.py,
1e-5; measured ~1e-7 here) re-checked at 1e-5, and llama.cpp's Q8_0 on the tiny models against
the PyTorch model on the very same (dequantized) weights at every length class.

- prompts longer than n_batch (test_review_gaps_export.py::test_llamacpp_prompt_longer_than_n_batch,
  1e-3): a state handed between llama_decode calls wrong by less than 1e-3 passed;
- conv_bias=False (test_review_gaps_export.py::test_gguf_without_conv_bias_matches_transformers,
  1e-3 for llama.cpp);
- Q8_0: only the demo models (top-1 / perplexity, verify at lengths 1 and 24) checked llama.cpp's
  Q8_0; here lengths 1, 7, 17, 257 at batch 2 and 6 decode steps, logits and states against
  load_model(the same GGUF) at the int8 row of tolerances.py (llama.cpp rounds activations to 8
  bits inside its Q8_0 dot products).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import build_hf_model, needs_llama, rel_err
from mamba_deploy import load_model
from mamba_deploy.export.gguf import export_gguf
from mamba_deploy.runners import open_runner
from mamba_deploy.tolerances import TOLERANCES

pytestmark = needs_llama
F32_TOL = 1e-5


def _export(src, dst, tokenizer, outtype="f32"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_gguf(src, dst, tokenizer=tokenizer, outtype=outtype)


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids, use_cache=False).logits.float()


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "mamba2_g2"])
def test_prompt_longer_than_n_batch_at_f32_tolerance(kind, ckpt, tmp_path):
    folder, hf = ckpt(kind)
    path = _export(folder, tmp_path / "m.gguf", None)
    ids = torch.randint(0, 100, (2, 29 + 4), generator=torch.Generator().manual_seed(2))
    want = _hf_logits(hf, ids)
    with open_runner(path, "llama.cpp", n_threads=1, n_batch=8) as lr:  # 29 tokens: 4 llama_decode calls
        got, st = lr.prefill(ids[:, :29], lr.new_state(2))
        errs = [rel_err(got, want[:, :29])]
        for t in range(29, 33):
            step, st = lr.step(ids[:, t], st)
            errs.append(rel_err(step, want[:, t]))
        last, _ = lr.prefill(ids[:, :29], lr.new_state(2), last_only=True)
        errs.append(rel_err(last[:, 0], want[:, 28]))
    print(kind, [f"{e:.1e}" for e in errs])
    assert max(errs) <= F32_TOL, errs


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_no_conv_bias_in_llamacpp_at_f32_tolerance(kind, tiny_tokenizer, tmp_path):
    hf = build_hf_model(kind, use_conv_bias=False)
    hf.save_pretrained(tmp_path / "hf")
    path = _export(tmp_path / "hf", tmp_path / "m.gguf", tiny_tokenizer)
    ids = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(4))
    with open_runner(path, "llama.cpp", n_threads=1) as lr:
        got, _ = lr.prefill(ids, lr.new_state(2))
    err = rel_err(got, _hf_logits(hf, ids))
    print(kind, f"{err:.1e}")
    assert err <= F32_TOL


@pytest.mark.parametrize("kind", ["mamba", "mamba2_g2"])
def test_llamacpp_q8_0_vs_same_weights_every_length(kind, ckpt, tmp_path):
    folder, _ = ckpt(kind)
    path = _export(folder, tmp_path / "q8.gguf", None, outtype="q8_0")
    model = load_model(path)  # the Q8_0 weights, dequantized (float32)
    row = TOLERANCES["int8"]
    report = []
    with open_runner(path, "llama.cpp", n_threads=1) as lr:
        for length in (1, 7, 17, 257):
            ids = torch.randint(0, 100, (2, length + 6), generator=torch.Generator().manual_seed(length))
            with torch.no_grad():
                ref = model(ids)
            got, st = lr.prefill(ids[:, :length], lr.new_state(2))
            errs = [rel_err(got, ref.logits[:, :length])]
            for t in range(length, length + 6):
                step, st = lr.step(ids[:, t], st)
                errs.append(rel_err(step, ref.logits[:, t]))
            s = lr.to_torch_state(st)
            report.append((length, max(errs), rel_err(s.ssm, ref.state.ssm), rel_err(s.conv, ref.state.conv)))
    print(kind, [(n, *(f"{x:.1e}" for x in e)) for n, *e in report])
    assert all(e[0] <= row["logits_rel"] and max(e[1:]) <= row["state_rel"] for _, *e in report), report
    assert max(e[0] for _, *e in report) > 0  # really quantized activations
