"""Gaps found by a mutation review of export, runners, checkpoint and config (each test fails on the
one-line bug it was written for): ONNX num_logits_to_keep and logits buffers, llama.cpp prompts longer
than a batch, GGUF vocab / conv bias / residual_in_fp32 round trips, HF config defaults against
transformers (found: n_groups defaulted to 1, transformers says 8), use_bias step graph, fp16 weights,
padded vocabularies through mamba_ssm and HF layouts."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import build_hf_model, rel_err

from mamba_deploy import load_model
from mamba_deploy.config import MambaConfig


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids, use_cache=False).logits.float()


# ---- P3: num_logits_to_keep larger than the sequence (M3) -------------------------------
def test_onnx_num_logits_to_keep_any_value(onnx_export):
    from mamba_deploy.runners.onnx_runner import open_onnx

    out, _, hf = onnx_export("mamba2")
    runner = open_onnx(out)
    cfg = runner.config
    ids = torch.randint(0, 128, (2, 3), generator=torch.Generator().manual_seed(0))
    want = hf_logits(hf, ids)
    base = {"input_ids": ids.numpy()}
    for i in range(cfg.n_layer):
        base[f"past_conv.{i}"] = np.zeros((2, *cfg.conv_state_shape), np.float32)
        base[f"past_ssm.{i}"] = np.zeros((2, *cfg.ssm_state_shape), np.float32)
    for keep in (1, 2, 3, 5, 100):
        got = runner.run({**base, "num_logits_to_keep": np.array([keep], np.int64)})["logits"]
        n = min(keep, 3)
        assert got.shape == (2, n, 128), keep
        assert rel_err(torch.from_numpy(got), want[:, 3 - n:]) < 1e-4, keep


# ---- P5: decode logits are a snapshot (M5) ------------------------------------------------
def test_onnx_step_logits_survive_the_next_step(onnx_export):
    from mamba_deploy.runners.onnx_runner import open_onnx

    out, _, hf = onnx_export("mamba")
    runner = open_onnx(out)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    want = hf_logits(hf, ids)
    st = runner.new_state(2)
    last, st = runner.prefill(ids[:, :3], st, last_only=True)
    kept = [last[:, 0]]
    for t in range(3, 6):
        logits, st = runner.step(ids[:, t], st)
        kept.append(logits)
    for j, logits in enumerate(kept):  # compared only after all steps ran
        assert rel_err(logits, want[:, 2 + j]) < 1e-4, j


# ---- P7: llama.cpp prompts longer than n_batch (M7) ---------------------------------------
def test_llamacpp_prompt_longer_than_n_batch(tmp_path, hf_checkpoint):
    pytest.importorskip("llama_cpp")
    from test_gguf import TEXTS  # noqa: F401

    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.runners import open_runner

    src, hf = hf_checkpoint("mamba2")
    tok = _tiny_tok(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_gguf(src, tmp_path / "m.gguf", tokenizer=tok)
    ids = torch.randint(0, 100, (2, 29), generator=torch.Generator().manual_seed(2))
    want = hf_logits(hf, ids)
    with open_runner(path, "llama.cpp", n_threads=2, n_batch=8) as lr:  # 29 tokens = 4 llama_decode calls
        got, _ = lr.prefill(ids, lr.new_state(2))
        assert rel_err(got, want) <= 1e-5  # the F32 row (tests/test_gguf.py); measured ~2e-7..6e-7
        last, _ = lr.prefill(ids, lr.new_state(2), last_only=True)
        assert rel_err(last[:, 0], want[:, -1]) <= 1e-5


def _tiny_tok(tmp_path):
    from test_gguf import EOS, TEXTS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=100, special_tokens=[EOS], show_progress=False))
    (tmp_path / "tok").mkdir()
    t.save(str(tmp_path / "tok" / "tokenizer.json"))
    return tmp_path / "tok"


# ---- P8: GGUF round trip of a padded vocab (M8) -------------------------------------------
def test_gguf_round_trip_keeps_the_real_vocab_size(tmp_path, hf_checkpoint):
    from mamba_deploy import save_checkpoint
    from mamba_deploy.export.gguf import export_gguf

    src, hf = hf_checkpoint("mamba")
    out = save_checkpoint(load_model(src), tmp_path / "ssm", fmt="mamba_ssm")
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"], cfg["pad_vocab_size_multiple"] = 125, 8  # 125 real tokens, 128 rows
    (out / "config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = export_gguf(out, tmp_path / "m.gguf", tokenizer=_tiny_tok(tmp_path))
    back = load_model(g)
    assert back.config.vocab_size == 125 and back.config.padded_vocab_size == 128
    ids = torch.randint(0, 125, (2, 9), generator=torch.Generator().manual_seed(3))
    assert rel_err(back(ids).logits, hf_logits(hf, ids)) <= 1e-5


# ---- P9: conv_bias=False models in GGUF / llama.cpp (M9) ----------------------------------
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_gguf_without_conv_bias_matches_transformers(kind, tmp_path):
    from mamba_deploy.export.gguf import export_gguf

    hf = build_hf_model(kind, use_conv_bias=False)
    hf.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", tokenizer=_tiny_tok(tmp_path))
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(4))
    want = hf_logits(hf, ids)
    assert rel_err(load_model(g)(ids).logits, want) <= 1e-5
    try:
        import llama_cpp  # noqa: F401

        from mamba_deploy.runners import open_runner
    except ImportError:
        return
    with open_runner(g, "llama.cpp", n_threads=2) as lr:
        got, _ = lr.prefill(ids, lr.new_state(2))
        assert rel_err(got, want) <= 1e-5  # F32; measured 2.1e-7 / 5.1e-7


# ---- P10: residual_in_fp32=False survives GGUF (M10) --------------------------------------
def test_gguf_round_trip_residual_in_fp32_false(tmp_path, hf_checkpoint):
    from mamba_deploy.export.gguf import export_gguf

    src, _ = hf_checkpoint("mamba2")
    m = load_model(src)
    m.config.residual_in_fp32 = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = export_gguf(m, tmp_path / "m.gguf", tokenizer=_tiny_tok(tmp_path))
    assert load_model(g).config.residual_in_fp32 is False


# ---- P11/P12: HF config defaults = transformers' defaults (M11, M12, + n_groups finding) ---
@pytest.mark.parametrize("model_type", ["mamba", "falcon_mamba", "mamba2"])
def test_hf_config_defaults_match_transformers(model_type):
    import transformers

    C = {"mamba": transformers.MambaConfig, "falcon_mamba": transformers.FalconMambaConfig,
         "mamba2": transformers.Mamba2Config}[model_type]
    d = {"model_type": model_type, "hidden_size": 4096, "num_hidden_layers": 2, "vocab_size": 100}
    hc, c = C(**d), MambaConfig.from_dict(d)
    want = dict(d_state=hc.state_size, d_conv=hc.conv_kernel, expand=hc.expand,
                tie_embeddings=hc.tie_word_embeddings, rms_norm_eps=hc.layer_norm_epsilon,
                residual_in_fp32=hc.residual_in_fp32, conv_bias=hc.use_conv_bias, bias=hc.use_bias)
    if model_type == "mamba2":
        want.update(ngroups=hc.n_groups, headdim=hc.head_dim, chunk_size=hc.chunk_size, nheads=hc.num_heads)
    else:
        want.update(resolved_dt_rank=hc.time_step_rank, d_inner=hc.intermediate_size)
    got = {k: getattr(c, k) for k in want}
    assert got == want


# ---- P15: in_proj / out_proj biases (use_bias=True) through ONNX (M15) --------------------
def test_onnx_use_bias_step_matches_transformers(tmp_path):
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners.onnx_runner import open_onnx

    hf = build_hf_model("mamba", use_bias=True)
    hf.save_pretrained(tmp_path / "hf")
    out = export_onnx(tmp_path / "hf", tmp_path / "onnx", validate=False)
    runner = open_onnx(out)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(5))
    want = hf_logits(hf, ids)
    got, st = runner.prefill(ids[:, :5], runner.new_state(2))
    errs = [rel_err(got, want[:, :5])]
    for t in range(5, 8):
        logits, st = runner.step(ids[:, t], st)
        errs.append(rel_err(logits, want[:, t]))
    assert max(errs) < 1e-4, errs


# ---- P17: --dtype fp16 really stores float16 weights (M17) ----------------------------------
def test_onnx_fp16_export_stores_float16_weights(onnx_export):
    import onnx

    out16, _, _ = onnx_export("mamba2_g2", "fp16")
    out32, _, _ = onnx_export("mamba2_g2")
    inits = {t.name: t.data_type for t in onnx.load(str(out16 / "model.onnx")).graph.initializer}
    F16 = onnx.TensorProto.FLOAT16
    for name in ("lm_head.weight", "backbone.embeddings.weight", "backbone.layers.0.mixer.in_proj.weight",
                 "backbone.layers.1.mixer.out_proj.weight"):
        assert inits[name] == F16, name
    assert inits["backbone.layers.0.mixer.A"] == onnx.TensorProto.FLOAT  # recurrences stay float32
    assert (out16 / "model.onnx").stat().st_size < 0.7 * (out32 / "model.onnx").stat().st_size


# ---- P18: a padded-vocab mamba_ssm checkpoint converts to HF that transformers loads (M18) ---
def test_padded_vocab_mamba_ssm_to_hf_loads_in_transformers(tmp_path, hf_checkpoint):
    import transformers

    from mamba_deploy import save_checkpoint

    src, hf = hf_checkpoint("mamba2_g2")  # untied: lm_head rows too
    out = save_checkpoint(load_model(src), tmp_path / "ssm", fmt="mamba_ssm")
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"], cfg["pad_vocab_size_multiple"] = 125, 8
    (out / "config.json").write_text(json.dumps(cfg))
    save_checkpoint(load_model(out), tmp_path / "hf", fmt="hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 125, (2, 9), generator=torch.Generator().manual_seed(7))
    assert rel_err(hf_logits(back, ids), hf_logits(hf, ids)) <= 1e-5


# ---- P13: mamba_ssm config without pad_vocab_size_multiple (M13) -----------------------------
def test_mamba_ssm_config_default_pad_multiple_is_8(tmp_path, hf_checkpoint):
    from mamba_deploy import save_checkpoint

    src, hf = hf_checkpoint("mamba")
    out = save_checkpoint(load_model(src), tmp_path / "ssm", fmt="mamba_ssm")
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] = 125  # 128 rows in the file, as mamba_ssm pads them (its default multiple: 8)
    del cfg["pad_vocab_size_multiple"]
    (out / "config.json").write_text(json.dumps(cfg))
    m = load_model(out)
    assert m.config.padded_vocab_size == 128
    ids = torch.randint(0, 125, (2, 9), generator=torch.Generator().manual_seed(8))
    assert rel_err(m(ids).logits, hf_logits(hf, ids)) <= 1e-5
