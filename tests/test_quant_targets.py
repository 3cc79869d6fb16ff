"""The quantization issue's quality targets, on the shipped demo models (CPU, CI): int8 weight-only
within 0.5 % perplexity of the fp32 model, SmoothQuant W8A8 within 2 %, and int4 g128 through GPTQ
and AWQ within 3 % and below plain round-to-nearest int4 at the same group size.

Perplexity over the first 8192 tokens of the stdlib validation split (the split the models did
not train on), state carried across 512-token windows, scored here from the runner's logits in
float64. Measured on Python 3.11's stdlib (this session): demo-mamba1 int8 -0.01 %, SmoothQuant
-0.02 %, RTN +1.41 %, GPTQ +1.08 %, AWQ +1.04 %; demo-mamba2 -0.03 / +0.06 / +2.94 / +2.29 /
+1.66 %. README's table measures the same on 16384 tokens (`benchmarks/quant.py`).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mamba_deploy import data, load_model
from mamba_deploy.quant import quantize
from mamba_deploy.runners.torch_runner import TorchRunner

MODELS = Path(__file__).resolve().parents[1] / "models"
N_TOKENS, WINDOW = 8192, 512
# method -> (options, largest perplexity increase allowed, in percent)
TARGETS = {"int8": ({}, 0.5), "smoothquant": ({}, 2.0), "gptq": ({"group_size": 128}, 3.0),
           "awq": ({"group_size": 128}, 3.0)}


def perplexity(model, ids: torch.Tensor) -> float:
    """exp(mean NLL of tokens 1..n-1), the state carried from window to window."""
    runner = TorchRunner(model)
    state, nll, prev = runner.new_state(1), 0.0, None
    for s in range(0, ids.numel(), WINDOW):
        chunk = ids[s:s + WINDOW]
        logits, state = runner.prefill(chunk[None], state)
        logits = logits[0, :, :runner.vocab_size].double()
        pred = logits[:-1] if prev is None else torch.cat([prev[None], logits[:-1]])
        target = chunk[1:] if prev is None else chunk
        prev = logits[-1]
        nll -= float(torch.log_softmax(pred, -1).gather(1, target[:, None]).sum())
    return math.exp(nll / (ids.numel() - 1))


@pytest.mark.parametrize("name", ["demo-mamba1", "demo-mamba2"])
def test_quantized_demo_models_meet_the_perplexity_targets(name):
    folder = MODELS / name
    base = load_model(folder)
    ids = torch.as_tensor(data.encode_split(base.tokenizer, "val")[:N_TOKENS], dtype=torch.long)
    assert ids.numel() == N_TOKENS
    ppl0 = perplexity(base, ids)
    change = {"rtn": 100 * (perplexity(quantize(load_model(folder), "int4", group_size=128, progress=False), ids)
                            / ppl0 - 1)}
    for method, (opts, _) in TARGETS.items():
        change[method] = 100 * (perplexity(quantize(load_model(folder), method, progress=False, **opts), ids) / ppl0 - 1)
    print(f"{name}: fp32 ppl {ppl0:.3f}; " + ", ".join(f"{k} {v:+.2f}%" for k, v in change.items()))
    for method, (_, limit) in TARGETS.items():
        assert change[method] <= limit, (name, method, change)
    for method in ("gptq", "awq"):  # calibration must beat plain rounding to the same int4 grid
        assert change[method] < change["rtn"], (name, method, change)
