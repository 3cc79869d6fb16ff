"""Every weight-quantization method end to end against its dequantized float64
reference. Before, a quantized model's prefill (parallel path) was compared with itself
(save/reload) and with transformers' float model at 5-45% of max |logit| (test_quant.py
ERR_TOL / INT4_TOL), and its decode with the module path on the reference ops, which runs the
same QuantLinear code. A wrong input_scale (AWQ), zero point (asymmetric int4), group layout,
fp8 scale or a tied quantized head could hide under 45%.

Reference: a float64 MambaLM whose every linear / embedding weight is formats.decode of the stored
codes (times AWQ's input_scale, column-wise), every other parameter copied, run on the reference
ops. Checked: fp32 prefill logits of lengths 1, 7, chunk+1 and 40 at batch 2, 3 decode steps after
each (the C decode plan on CPU) and the final states, <= 1e-4 relative (fp32 row: the weights
are the same numbers, only the arithmetic differs). SmoothQuant (W8A8: activations rounded to int8
per token) is left out: its reference would round activations too, and a 1-ulp difference in x
flips a rounding; QuantLinear's W8A8 is checked against float64 emulation in test_quant.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import rel_err
from mamba_deploy import load_model, ops
from mamba_deploy.model import MambaLM
from mamba_deploy.quant import formats, quantize
from mamba_deploy.quant.modules import QuantEmbedding, QuantLinear

CALIB = dict(calib_ids=torch.arange(4096) * 7919 % 128, n_calib=4, calib_len=64, progress=False)
CASES = [
    ("int8", dict(include=("embeddings", "lm_head"))),
    ("int4", dict(group_size=32)),
    ("int4", dict(group_size=32, symmetric=False, include=("lm_head",))),
    ("gptq", dict(group_size=32, act_order=True)),
    ("awq", dict(group_size=32)),
    ("fp8", dict(fp8_scaling="tensor")),
    ("fp8", dict(fp8_scaling="channel", include=("embeddings",))),
]
TOL = 1e-4


def dequantized_float64(qmodel) -> MambaLM:
    cfg = qmodel.config
    gold = MambaLM(cfg).double().eval()
    if cfg.tie_embeddings:  # a head quantized apart from a float embedding: two matrices
        gold.lm_head.weight = nn.Parameter(gold.lm_head.weight.detach().clone())
    n_quant = 0
    with torch.no_grad():
        for name, p in gold.named_parameters():
            mod_name, attr = name.rsplit(".", 1)
            q = qmodel.get_submodule(mod_name)
            if isinstance(q, QuantLinear) and attr == "weight":
                w = formats.decode(q.stored(), q.fmt, q.group_size, q.symmetric, torch.float64)
                if q.input_scale is not None:  # y = (x * s) @ W^T = x @ (W * s)^T
                    w = w * q.input_scale.double()[None, :]
                p.copy_(w)
                n_quant += 1
            elif isinstance(q, QuantEmbedding):
                p.copy_(formats.decode(dict(q._buffers), q.fmt, q.group_size, q.symmetric, torch.float64))
                n_quant += 1
            else:
                p.copy_(getattr(q, attr).double())
    assert n_quant >= 2 * cfg.n_layer, n_quant
    return gold


@pytest.mark.parametrize("kind", ["mamba", "falcon_mamba", "mamba2", "mamba2_g2"])
@pytest.mark.parametrize("method,opts", CASES, ids=lambda v: str(v))
def test_quantized_model_vs_its_dequantized_float64_reference(hf_checkpoint, kind, method, opts):
    folder, _ = hf_checkpoint(kind)
    qmodel = quantize(load_model(folder), method, **CALIB, **opts)
    gold = dequantized_float64(qmodel)
    g = torch.Generator().manual_seed(43)
    for length in (1, 7, 17, 40):
        ids = torch.randint(0, 128, (2, length + 3), generator=g)
        with torch.inference_mode():
            with ops.use_backend("ref"):
                ref = gold(ids)
            st = qmodel.new_state(2)
            got = [qmodel(ids[:, :length], state=st).logits]
            got += [qmodel.step(ids[:, t], st)[:, None] for t in range(length, length + 3)]
        got = torch.cat(got, 1)
        what = (kind, method, opts, length)
        assert rel_err(got[:, :length], ref.logits[:, :length]) <= TOL, (*what, "prefill")
        assert rel_err(got[:, length:], ref.logits[:, length:]) <= TOL, (*what, "decode")
        assert rel_err(st.ssm, ref.state.ssm) <= TOL and rel_err(st.conv, ref.state.conv) <= TOL, (*what, "state")
    assert getattr(qmodel, "_cpu_decode_plan", None) is not None or method == "fp8"


def test_the_reference_sees_a_wrong_input_scale(hf_checkpoint):
    """The check is not blind to AWQ's input scales: a reference built without them is far off."""
    folder, _ = hf_checkpoint("mamba")
    qmodel = quantize(load_model(folder), "awq", group_size=32, **CALIB)
    scaled = [m for m in qmodel.modules() if isinstance(m, QuantLinear) and m.input_scale is not None]
    assert scaled
    gold = dequantized_float64(qmodel)
    for m in scaled:
        m.input_scale = None
    blind = dequantized_float64(qmodel)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), ops.use_backend("ref"):
        assert rel_err(blind(ids).logits, gold(ids).logits) > 1e-3
