"""GGUF export / import and the llama.cpp backend.

References: transformers (the tiny checkpoints' own logits), the `gguf` package's reader, and
llama.cpp itself through llama-cpp-python (skipped, with the reason, when it is not installed).
Tolerances: llama.cpp F32 vs our PyTorch fp32 <= 1e-3 relative (llama.cpp's own kernels, float
accumulation order); F16 <= 1e-2; imported F32 GGUF vs transformers <= 1e-5; Q8_0 import <= 5e-2.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import rel_err
from mamba_deploy import load_model
from mamba_deploy.errors import (BackendUnavailableError, CheckpointError, MambaDeployError, ModelNotFoundError,
                                 UnsupportedArchitectureError)
from mamba_deploy.export.gguf import export_gguf

gguf = pytest.importorskip("gguf")
try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA = True
except ImportError:
    HAVE_LLAMA = False
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
         "hello world, hello mamba! state spaces are fun"] * 10
EOS = "<|endoftext|>"


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE small enough for the tiny models' 128-row vocab (so the GGUF vocab is
    padded with unused tokens up to the embedding rows)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=100, special_tokens=[EOS], show_progress=False))
    folder = tmp_path_factory.mktemp("tiny_tok")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    assert tok.get_vocab_size() < 128
    return folder


@pytest.fixture(scope="session")
def ckpt(hf_checkpoint, tiny_tokenizer, tmp_path_factory):
    """ckpt(kind) -> (folder with weights + tokenizer, transformers model)."""
    cache = {}

    def make(kind):
        if kind not in cache:
            src, hf = hf_checkpoint(kind)
            dst = tmp_path_factory.mktemp(f"gguf_src_{kind}") / "model"
            shutil.copytree(src, dst)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(tiny_tokenizer / f, dst / f)
            cache[kind] = (dst, hf)
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def exported(ckpt, tmp_path_factory):
    """exported(kind, outtype) -> path of the GGUF (cached)."""
    cache = {}
    out_dir = tmp_path_factory.mktemp("gguf_out")

    def make(kind, outtype="f32"):
        if (kind, outtype) not in cache:
            folder, _ = ckpt(kind)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fallback warnings are tested on their own
                cache[kind, outtype] = export_gguf(folder, out_dir / f"{kind}-{outtype}.gguf", outtype=outtype)
        return cache[kind, outtype]

    return make


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits.float()


def random_ids(b, l, vocab=100, seed=0):
    return torch.randint(0, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


def reader_tensors(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


# ----------------------------------------------------------------------------- format

@pytest.mark.parametrize("kind", ["mamba", "falcon_mamba", "mamba2_g2"])
def test_metadata_and_layout_match_llamacpp_conventions(kind, exported, ckpt):
    _, hf = ckpt(kind)
    c = hf.config
    r, ts = reader_tensors(exported(kind))
    arch = r.get_field("general.architecture").contents()
    assert arch == ("mamba2" if kind.startswith("mamba2") else "mamba")
    get = lambda k: r.get_field(f"{arch}.{k}").contents()  # noqa: E731
    assert get("embedding_length") == c.hidden_size and get("block_count") == c.num_hidden_layers
    assert get("ssm.conv_kernel") == c.conv_kernel and get("ssm.state_size") == c.state_size
    d_inner = c.expand * c.hidden_size
    assert get("ssm.inner_size") == d_inner
    sd = {k: v.detach().double() for k, v in hf.state_dict().items()}
    if arch == "mamba":
        assert get("ssm.time_step_rank") == c.time_step_rank
        assert get("ssm.dt_b_c_rms") == (kind == "falcon_mamba")
        conv_dim = d_inner
        a_ref = -torch.exp(sd["backbone.layers.0.mixer.A_log"])  # (d_inner, d_state) -> ne {d_state, d_inner}
    else:
        assert get("ssm.time_step_rank") == c.num_heads and get("ssm.group_count") == c.n_groups
        conv_dim = d_inner + 2 * c.n_groups * c.state_size
        a_ref = -torch.exp(sd["backbone.layers.0.mixer.A_log"])[:, None]  # ne {1, nheads}
        norm = ts["blk.0.ssm_norm.weight"]
        assert norm.shape.tolist() == [d_inner // c.n_groups, c.n_groups]  # grouped norm
    assert ts["blk.0.ssm_conv1d.weight"].shape.tolist() == [c.conv_kernel, conv_dim]
    a = ts["blk.0.ssm_a"]
    assert a.shape.tolist() == list(a_ref.shape[::-1])
    assert np.allclose(np.asarray(a.data, np.float64).reshape(a_ref.shape), a_ref.numpy(), rtol=1e-6)
    assert ts["token_embd.weight"].shape.tolist() == [c.hidden_size, c.vocab_size]
    assert ("output.weight" in ts) == (not c.tie_word_embeddings)


def test_vocab_metadata_padded_to_embedding_rows(exported, tiny_tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json"))
    r, _ = reader_tensors(exported("mamba"))
    tokens = r.get_field("tokenizer.ggml.tokens").contents()
    types = r.get_field("tokenizer.ggml.token_type").contents()
    assert r.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert r.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert len(tokens) == 128  # one per embedding row
    n = tok.get_vocab_size()
    assert all(tokens[i] == tok.id_to_token(i) for i in range(n))
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 128)] and set(types[n:]) == {gguf.TokenType.UNUSED}
    assert types[tok.token_to_id(EOS)] == gguf.TokenType.CONTROL
    assert r.get_field("tokenizer.ggml.eos_token_id").contents() == tok.token_to_id(EOS)
    assert len(r.get_field("tokenizer.ggml.merges").contents()) > 0


def test_small_tensors_stay_f32_and_fallback_warns(ckpt, tmp_path):
    folder, _ = ckpt("mamba")  # ssm_dt.weight rows have dt_rank = 4 columns: no Q8_0 block fits
    with pytest.warns(UserWarning, match=r"ssm_dt\.weight: row length 4 .*Q8_0.*using F16"):
        out = export_gguf(folder, tmp_path / "m.gguf", outtype="q8_0")
    _, ts = reader_tensors(out)
    QT = gguf.GGMLQuantizationType
    assert ts["blk.0.ssm_dt.weight"].tensor_type == QT.F16
    assert ts["blk.0.ssm_in.weight"].tensor_type == QT.Q8_0
    for name in ("blk.0.ssm_conv1d.weight", "blk.0.ssm_a", "blk.0.ssm_d", "blk.0.attn_norm.weight",
                 "blk.0.ssm_dt.bias", "output_norm.weight"):
        assert ts[name].tensor_type == QT.F32, name


# ----------------------------------------------------------------------------- import round trips

@pytest.mark.parametrize("kind", ["mamba", "falcon_mamba", "mamba2", "mamba2_g2"])
def test_f32_round_trip_identical_weights_and_logits(kind, exported, ckpt):
    folder, hf = ckpt(kind)
    ours = load_model(folder)
    back = load_model(exported(kind))
    assert back.config.to_dict() | {"source": None} == ours.config.to_dict() | {"source": None}
    sd0, sd1 = ours.state_dict(), back.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        if k.endswith("A_log"):
            # stored as A = -exp(A_log) (llama.cpp's form); log(-A) is back within float32 rounding:
            # |d A_log| = |dA| / |A| <= eps, plus rounding A_log itself
            eps = torch.finfo(torch.float32).eps
            assert torch.allclose(sd1[k], sd0[k], rtol=eps, atol=eps), k
        else:
            assert torch.equal(sd0[k], sd1[k]), k
    ids = random_ids(3, 37)
    with torch.no_grad():
        assert rel_err(back(ids).logits, hf_logits(hf, ids)) <= 1e-5


@pytest.mark.parametrize("outtype,tol", [("f16", 1e-2), ("bf16", 2e-2), ("q8_0", 5e-2)])
def test_quantized_import_close_to_transformers(outtype, tol, exported, ckpt):
    _, hf = ckpt("mamba2")
    back = load_model(exported("mamba2", outtype))
    ids = random_ids(2, 21, seed=1)
    with torch.no_grad():
        assert rel_err(back(ids).logits, hf_logits(hf, ids)) <= tol


# ----------------------------------------------------------------------------- errors

def test_missing_tokenizer_is_a_clear_error(hf_checkpoint, tiny_tokenizer, tmp_path):
    folder, _ = hf_checkpoint("mamba")  # transformers' save_pretrained: no tokenizer
    with pytest.raises(ModelNotFoundError, match="--tokenizer"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    out = export_gguf(folder, tmp_path / "x.gguf", tokenizer=tiny_tokenizer)
    assert gguf.GGUFReader(str(out)).get_field("tokenizer.ggml.tokens") is not None


def test_kquant_without_llamacpp_is_a_clear_error(ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(BackendUnavailableError, match=r"q4_k_m.*pip install llama-cpp-python"):
        export_gguf(ckpt("mamba")[0], tmp_path / "k.gguf", outtype="q4_k_m")
    assert list(tmp_path.iterdir()) == []  # nothing partial left behind


def test_unknown_outtype(ckpt, tmp_path):
    with pytest.raises(MambaDeployError, match="q3_x"):
        export_gguf(ckpt("mamba")[0], tmp_path / "k.gguf", outtype="q3_x")


def test_import_unknown_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="'llama'"):
        load_model(tmp_path / "llama.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_import_truncated_file(exported, tmp_path, keep):
    data = exported("mamba").read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(bad)


def test_import_not_a_gguf(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="junk.gguf"):
        load_model(bad)


# ----------------------------------------------------------------------------- Ollama, CLI

def test_ollama_modelfile_and_cli(ckpt, tmp_path):
    from mamba_deploy.cli import main

    folder, _ = ckpt("mamba2")
    out = tmp_path / "ol" / "tiny.gguf"
    assert main(["export", "gguf", str(folder), str(out), "--outtype", "f16", "--ollama"]) == 0
    text = (out.parent / "Modelfile").read_text()
    assert "FROM ./tiny.gguf" in text.splitlines()
    assert f'PARAMETER stop "{EOS}"' in text
    assert gguf.GGUFReader(str(out)).get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_F16
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "tiny.gguf"]
