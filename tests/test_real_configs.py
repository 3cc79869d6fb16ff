"""The config.json files of real published checkpoints, every key kept and only the sizes shrunk,
load and compute what transformers computes on the same folder (fp32 logits <= 1e-4, prefill and
prefill + decode steps). The key sets were read from public copies of the hub files (a review of
2026-11-24): state-spaces/mamba-130m-hf, state-spaces/mamba-2.8b-hf (no d_model / ssm_cfg),
tiiuae/falcon-mamba-7b (expand 16 beside intermediate_size, bf16 torch_dtype, untied),
an AntonV/mamba2-*-hf Mamba2 (time_step_limit with a bare Infinity) and
mistralai/Mamba-Codestral-7B-v0.1 (8 groups, norm_before_gate true, which transformers ignores)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import rel_err
from mamba_deploy import load_model
from mamba_deploy.checkpoint import stored_dtype
from mamba_deploy.runners.torch_runner import TorchRunner

INF = math.inf
_MAMBA_HF = {
    "architectures": ["MambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4, "d_inner": 128, "d_model": 64,
    "eos_token_id": 0, "expand": 2, "fused_add_norm": True, "hidden_act": "silu", "hidden_size": 64,
    "initializer_range": 0.1, "intermediate_size": 128, "layer_norm_epsilon": 1e-05, "model_type": "mamba",
    "n_layer": 2, "num_hidden_layers": 2, "pad_token_id": 0, "pad_vocab_size_multiple": 8,
    "rescale_prenorm_residual": False, "residual_in_fp32": True, "rms_norm": True, "ssm_cfg": {},
    "state_size": 16, "time_step_floor": 0.0001, "time_step_init_scheme": "random", "time_step_max": 0.1,
    "time_step_min": 0.001, "time_step_rank": 4, "time_step_scale": 1.0, "torch_dtype": "float32",
    "transformers_version": "4.39.0.dev0", "use_bias": False, "use_cache": True, "use_conv_bias": True,
    "vocab_size": 256,
}
# name -> (transformers class, its config class, the real key set at tiny sizes)
REAL = {
    "state-spaces/mamba-130m-hf": ("MambaForCausalLM", "MambaConfig", _MAMBA_HF),
    "state-spaces/mamba-2.8b-hf": ("MambaForCausalLM", "MambaConfig",
                                   {k: v for k, v in _MAMBA_HF.items() if k not in ("d_inner", "d_model", "ssm_cfg")}),
    "tiiuae/falcon-mamba-7b": ("FalconMambaForCausalLM", "FalconMambaConfig", {
        "_name_or_path": "./", "architectures": ["FalconMambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4,
        "eos_token_id": 11, "expand": 16, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.1,
        "intermediate_size": 128, "layer_norm_epsilon": 1e-05, "model_type": "falcon_mamba",
        "num_hidden_layers": 2, "pad_token_id": 11, "rescale_prenorm_residual": False, "residual_in_fp32": True,
        "state_size": 16, "tie_word_embeddings": False, "time_step_floor": 0.0001,
        "time_step_init_scheme": "random", "time_step_max": 0.1, "time_step_min": 0.001, "time_step_rank": 4,
        "time_step_scale": 1.0, "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0",
        "use_bias": False, "use_cache": True, "use_conv_bias": True, "vocab_size": 256}),
    "AntonV/mamba2-hf": ("Mamba2ForCausalLM", "Mamba2Config", {
        "bos_token_id": 0, "chunk_size": 256, "conv_kernel": 4, "eos_token_id": 0, "expand": 2, "head_dim": 32,
        "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.1, "layer_norm_epsilon": 1e-05,
        "model_type": "mamba2", "n_groups": 1, "num_heads": 4, "num_hidden_layers": 2, "pad_token_id": 0,
        "rescale_prenorm_residual": False, "residual_in_fp32": True, "rms_norm": True, "state_size": 16,
        "tie_word_embeddings": True, "time_step_floor": 0.0001, "time_step_limit": [0.0, INF],
        "time_step_max": 0.1, "time_step_min": 0.001, "time_step_rank": 4, "use_bias": False, "use_cache": True,
        "use_conv_bias": True, "vocab_size": 256}),
    "mistralai/Mamba-Codestral-7B-v0.1": ("Mamba2ForCausalLM", "Mamba2Config", {
        "_name_or_path": "/raid/pablo/codestral-hf-good/", "architectures": ["Mamba2ForCausalLM"],
        "bos_token_id": 0, "chunk_size": 256, "conv_kernel": 4, "eos_token_id": 0, "expand": 2, "head_dim": 16,
        "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.1, "intermediate_size": 128,
        "layer_norm_epsilon": 1e-05, "model_type": "mamba2", "n_groups": 8, "norm_before_gate": True,
        "num_heads": 8, "num_hidden_layers": 2, "pad_token_id": 0, "rescale_prenorm_residual": False,
        "residual_in_fp32": True, "rms_norm": True, "state_size": 16, "tie_word_embeddings": False,
        "time_step_floor": 0.0001, "time_step_init_scheme": "random", "time_step_limit": [0.0, INF],
        "time_step_max": 0.1, "time_step_min": 0.001, "time_step_rank": 4, "time_step_scale": 1.0,
        "torch_dtype": "bfloat16", "transformers_version": "4.44.0.dev0", "use_bias": False, "use_cache": True,
        "use_conv_bias": True, "vocab_size": 256}),
}
META = ("architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype")
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", list(REAL))
def test_a_real_config_loads_and_matches_transformers(name, tmp_path):
    import transformers

    cls, cfg_cls, real = REAL[name]
    version = tuple(int(v) for v in transformers.__version__.split(".")[:2] if v.isdigit())
    if real.get("n_groups", 1) > 1 and version < (5, 24):
        pytest.skip(f"transformers {transformers.__version__} computes Mamba2 with n_groups > 1 differently from "
                    "5.24, which this case is checked against (the GPU machine's 5.17: 1.07 relative)")
    torch.manual_seed(0)
    hf = getattr(transformers, cls)(getattr(transformers, cfg_cls)(
        **{k: v for k, v in real.items() if k not in META})).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():  # away from init, so A, D, dt_bias and the norms count
            p.add_(torch.randn_like(p) * (0.3 if "A_log" in pname or "dt" in pname else 0.05))
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(real))  # the real key set (Infinity written bare)
    ref = getattr(transformers, cls).from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(IDS).logits.double()
    model = load_model(tmp_path)
    # float32 weights under the real config's torch_dtype (bfloat16 for Falcon and Codestral): the
    # weights decide what convert keeps and which tolerance row verify uses
    assert stored_dtype(tmp_path) == torch.float32
    runner = TorchRunner(model)
    logits, _ = runner.prefill(IDS, runner.new_state(2))
    assert rel_err(logits, want) <= 1e-4
    state = runner.new_state(2)  # prefill 8, then the other 12 tokens one step at a time
    got, state = runner.prefill(IDS[:, :8], state)
    steps = [got]
    for t in range(8, IDS.shape[1]):
        out, state = runner.step(IDS[:, t], state)
        steps.append(out.reshape(2, 1, -1))
    assert rel_err(torch.cat(steps, 1), want) <= 1e-4
