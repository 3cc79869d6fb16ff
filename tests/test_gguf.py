"""GGUF export / import and the llama.cpp backend.

References: transformers (the tiny checkpoints' own logits), the `gguf` package's reader, and
llama.cpp itself through llama-cpp-python (skipped, with the reason, when it is not installed).
Tolerances: llama.cpp F32 vs our PyTorch fp32 <= 1e-5 relative (llama.cpp's own kernels, float
accumulation order), Falcon-Mamba <= 1e-3 (llama.cpp's dt/B/C norm eps); F16 <= 1e-2; imported F32 GGUF vs transformers <= 1e-5; Q8_0 import <= 5e-2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BPE_EOS, BPE_TEXTS, HAVE_LLAMA, finish_gguf, needs_llama, rel_err
from mamba_deploy import load_model
from mamba_deploy.errors import (BackendUnavailableError, CheckpointError, ExportError, MambaDeployError, ModelNotFoundError,
                                 OutputPathError, UnsupportedArchitectureError)
from mamba_deploy.export.gguf import export_gguf

gguf = pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[1]
TEXTS, EOS = BPE_TEXTS, BPE_EOS  # the tiny BPE (conftest.tiny_tokenizer) was trained on these


# ----------------------------------------------------------------------------- fixtures

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
    with pytest.warns(UserWarning) as record:
        out = export_gguf(folder, tmp_path / "m.gguf", outtype="q8_0")
    fallbacks = [str(w.message) for w in record if "row length" in str(w.message)]
    # one warning for the export, naming how many tensors and which
    assert len(fallbacks) == 1, fallbacks
    assert re.fullmatch(r"2 tensors \(blk\.0\.ssm_dt\.weight \.\.\. blk\.1\.ssm_dt\.weight\): row length 4 is not "
                        r"a multiple of the Q8_0 block \(32\); using F16, as llama\.cpp does", fallbacks[0]), fallbacks
    _, ts = reader_tensors(out)
    QT = gguf.GGMLQuantizationType
    assert ts["blk.0.ssm_dt.weight"].tensor_type == QT.F16
    assert ts["blk.0.ssm_in.weight"].tensor_type == QT.Q8_0
    for name in ("blk.0.ssm_conv1d.weight", "blk.0.ssm_a", "blk.0.ssm_d", "blk.0.attn_norm.weight",
                 "blk.0.ssm_dt.bias", "output_norm.weight"):
        assert ts[name].tensor_type == QT.F32, name


def test_cli_prints_the_fallback_warning_once_as_one_line(ckpt, tmp_path):
    import subprocess

    folder, _ = ckpt("mamba")
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "mamba_deploy", "export", "gguf", str(folder),
                          str(tmp_path / "m.gguf"), "--outtype", "q8_0"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(repo / "src")}, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "row length" in ln]
    assert lines == ["warning: 2 tensors (blk.0.ssm_dt.weight ... blk.1.ssm_dt.weight): row length 4 is not a "
                     "multiple of the Q8_0 block (32); using F16, as llama.cpp does"], res.stderr
    assert "gguf.py" not in res.stderr  # no source location in the CLI's warnings


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


def test_requantize_a_gguf_keeps_its_vocab(exported, tmp_path):
    src = exported("mamba2_g2")
    out = export_gguf(src, tmp_path / "re.gguf", outtype="q8_0")  # no tokenizer.json anywhere near
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.pre"):
        assert a.get_field(key).contents() == b.get_field(key).contents(), key
    assert b.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q8_0


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


@pytest.mark.parametrize("outtype, big, stored", [("f16", 1e5, "them"), ("q8_0", 1e7, "its block scales")])
def test_values_past_float16_range_are_refused_not_written_as_inf(ckpt, tmp_path, outtype, big, stored):
    """F16 and Q8_0's block scales are float16: before, the export wrote inf with only numpy's
    "overflow encountered in cast" warning, exited 0, and llama.cpp then generated nothing."""
    model = load_model(ckpt("mamba")[0])
    with torch.no_grad():
        model.backbone.layers[0].mixer.in_proj.weight[0, 0] = big
    msg = f"blk.0.ssm_in.weight has values up to {big:.4g}, beyond float16's range (65504), in which GGUF type"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's overflow warning is not printed either
        with pytest.raises(ExportError, match=re.escape(msg) + f".*stores {stored}.*--outtype bf16 or f32"):
            export_gguf(model, tmp_path / "x.gguf", outtype=outtype)
    assert list(tmp_path.iterdir()) == []  # nothing partial left behind
    # bfloat16 holds them: written, and read back as bfloat16's nearest value
    out = export_gguf(model, tmp_path / "b.gguf", outtype="bf16")
    w = load_model(out).backbone.layers[0].mixer.in_proj.weight
    assert w[0, 0].item() == torch.tensor(big).to(torch.bfloat16).item()


def test_values_past_float16_range_in_q8_0_blocks_whose_scale_fits_are_kept(ckpt, tmp_path):
    """1e6 / 127 fits a float16 scale: the tensor is written and reads back within Q8_0's step."""
    model = load_model(ckpt("mamba")[0])
    with torch.no_grad():
        model.backbone.layers[0].mixer.in_proj.weight[0, 0] = 1e6
    w = load_model(export_gguf(model, tmp_path / "q.gguf", outtype="q8_0")).backbone.layers[0].mixer.in_proj.weight
    assert abs(w[0, 0].item() - 1e6) <= 1e6 / 127 / 2 * 1.01


def test_unknown_outtype(ckpt, tmp_path):
    with pytest.raises(MambaDeployError, match="q3_x"):
        export_gguf(ckpt("mamba")[0], tmp_path / "k.gguf", outtype="q3_x")


def test_import_unknown_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    finish_gguf(w)
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
    # a re-export replaces its own Modelfile
    assert main(["export", "gguf", str(folder), str(out), "--outtype", "f32", "--ollama"]) == 0
    assert "FROM ./tiny.gguf" in (out.parent / "Modelfile").read_text().splitlines()


def test_ollama_keeps_a_modelfile_it_did_not_write(ckpt, tmp_path, capsys):
    """--ollama refuses, before writing anything, to replace a user's Modelfile or the one written
    for another GGUF of the same folder."""
    from mamba_deploy.cli import main

    folder, _ = ckpt("mamba2")
    out = tmp_path / "ol" / "other.gguf"
    out.parent.mkdir()
    mine = "FROM llama3\nSYSTEM you are helpful\n"
    (out.parent / "Modelfile").write_text(mine)
    assert main(["export", "gguf", str(folder), str(out), "--ollama"]) == 2
    err = capsys.readouterr().err
    assert "Modelfile already exists" in err and "FROM llama3" in err and "another folder" in err
    assert (out.parent / "Modelfile").read_text() == mine
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile"], "nothing written"
    # ours, but for another GGUF of the folder: kept too
    (out.parent / "Modelfile").unlink()
    assert main(["export", "gguf", str(folder), str(out.parent / "first.gguf"), "--ollama"]) == 0
    first = (out.parent / "Modelfile").read_text()
    with pytest.raises(OutputPathError, match="first.gguf"):
        export_gguf(folder, out, ollama=True)
    assert (out.parent / "Modelfile").read_text() == first and not out.exists()
    export_gguf(folder, out)  # without --ollama the GGUF alone is written
    assert out.exists() and (out.parent / "Modelfile").read_text() == first


# ----------------------------------------------------------------------------- llama.cpp

def open_llama(path, **kw):
    from mamba_deploy.runners import open_runner

    return open_runner(path, "llama.cpp", n_threads=2, **kw)


def torch_runner(folder):
    from mamba_deploy.runners.torch_runner import TorchRunner

    return TorchRunner(load_model(folder))


@needs_llama
@pytest.mark.parametrize("kind", ["mamba", "mamba2", "mamba2_g2"])
# f32: llama.cpp's float32 kernels sum in another order than torch (measured 2e-7..8e-7 on these
# kinds; Falcon-Mamba's eps difference, ~1e-3, has its own test below)
@pytest.mark.parametrize("outtype,tol", [("f32", 1e-5), ("f16", 1e-2), ("bf16", 2e-2)])
def test_llamacpp_logits_match_pytorch(kind, outtype, tol, exported, ckpt):
    folder, _ = ckpt(kind)
    ref = torch_runner(folder)
    with open_llama(exported(kind, outtype)) as lr:
        ids = random_ids(3, 29, seed=2)  # batch > 1, odd length, every position's logits
        got, _ = lr.prefill(ids, lr.new_state(3))
        want, _ = ref.prefill(ids, ref.new_state(3))
        assert got.shape == want.shape
        assert rel_err(got, want) <= tol


@needs_llama
def test_llamacpp_falcon_mamba_dt_bc_rms(exported, ckpt):
    """Falcon-Mamba: llama.cpp applies the dt/B/C RMSNorm with the layer eps (1e-5) where
    transformers uses mixer_rms_eps (1e-6); that difference stays far below the tolerance."""
    folder, _ = ckpt("falcon_mamba")
    ref = torch_runner(folder)
    with open_llama(exported("falcon_mamba")) as lr:
        ids = random_ids(2, 17, seed=3)
        got, _ = lr.prefill(ids, lr.new_state(2))
        want, _ = ref.prefill(ids, ref.new_state(2))
        assert rel_err(got, want) <= 1e-3


@needs_llama
@pytest.mark.parametrize("kind", ["mamba", "mamba2_g2"])
def test_llamacpp_state_carried_and_left_padding(kind, exported, ckpt):
    folder, _ = ckpt(kind)
    ref = torch_runner(folder)
    prompts = [[5, 9, 33, 2, 71, 40, 8], [17, 3, 99], [60, 61, 62, 63, 64]]
    from mamba_deploy.generation import left_pad

    ids, mask = left_pad(prompts)
    with open_llama(exported(kind)) as lr:
        st, rst = lr.new_state(3), ref.new_state(3)
        got, st = lr.prefill(ids, st, attention_mask=mask, last_only=True)
        want, rst = ref.prefill(ids, rst, attention_mask=mask, last_only=True)
        assert rel_err(got, want) <= 1e-5  # F32 (measured: logits <= 8e-7, state <= 2.6e-6)
        mine, theirs = lr.to_torch_state(st), ref.to_torch_state(rst)  # llama.cpp's own state buffers
        assert rel_err(mine.conv, theirs.conv) <= 1e-5 and rel_err(mine.ssm, theirs.ssm) <= 1e-5
        for t in range(6):  # state carried across step calls
            nxt = want[:, -1].argmax(-1) if t == 0 else want.argmax(-1)
            got, st = lr.step(nxt, st)
            want, rst = ref.step(nxt, rst)
            assert rel_err(got, want) <= 1e-5
        # a second prefill call continues the same sequences
        more = random_ids(3, 4, seed=4)
        got, _ = lr.prefill(more, st)
        want, _ = ref.prefill(more, rst)
        assert rel_err(got, want) <= 1e-5


@needs_llama
def test_llamacpp_runner_input_errors(exported, ckpt):
    from mamba_deploy.errors import ShapeError

    with pytest.raises(ModelNotFoundError, match="export gguf"):
        open_llama(ckpt("mamba")[0])  # a checkpoint folder, not a .gguf
    with open_llama(exported("mamba")) as lr:
        st = lr.new_state(2)
        with pytest.raises(ShapeError, match="batch 2"):
            lr.prefill(random_ids(3, 4), st)
        with pytest.raises(ShapeError, match="integer tensor"):
            lr.step(torch.zeros(2), st)
        big = lr.new_state(9)  # more rows than slots: the context grows, older handles move along
        assert big.batch_size == 9
        assert lr.step(torch.tensor([1, 2]), st)[0].shape == (2, lr.n_vocab)


@needs_llama
def test_llamacpp_generate_cli(exported, capsys):
    from mamba_deploy.cli import main
    from mamba_deploy.generation import generate

    path = exported("mamba2")
    assert main(["generate", str(path), "--backend", "llama.cpp", "--prompt", "hello world",
                 "--prompt", "the quick", "--max-new-tokens", "5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and all(len(r["tokens"]) <= 5 for r in rows)
    # same greedy tokens as the torch model imported from the same GGUF
    from mamba_deploy.runners.torch_runner import TorchRunner

    with open_llama(path) as lr:
        ours = generate(TorchRunner(load_model(path)), [[5, 9, 33], [17, 3, 99, 1, 2]], max_new_tokens=8)
        theirs = generate(lr, [[5, 9, 33], [17, 3, 99, 1, 2]], max_new_tokens=8)
    assert ours.tokens == theirs.tokens


@needs_llama
def test_llamacpp_tokenizer_matches_tokenizers(exported, tiny_tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json"))
    with open_llama(exported("mamba")) as lr:
        # special tokens written in the text are those tokens, as in `tokenizers` (was: their characters)
        for text in ["hello world, the lazy fox", "a stitch in time!", " quick  brown", f"a{EOS}b", EOS]:
            assert lr.tokenizer.encode(text) == tok.encode(text).ids
            assert lr.tokenizer.decode(tok.encode(text).ids) == tok.decode(tok.encode(text).ids)  # skips specials
        assert lr.tokenizer.eos_token_id == tok.token_to_id(EOS)


@needs_llama
def test_kquant_export_loads_in_llamacpp(ckpt, exported, tmp_path):
    """q4_k_m through llama.cpp's quantizer: tiny rows (32) fit no 256-block, so every tensor
    falls back (warned) to Q5_0 / Q8_0-style types; llama.cpp loads the file and runs it."""
    folder, _ = ckpt("mamba2")
    with pytest.warns(UserWarning, match="Q4_K"):
        out = export_gguf(folder, tmp_path / "k.gguf", outtype="q4_k_m", n_threads=2)
    r, ts = reader_tensors(out)
    assert r.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert ts["blk.0.ssm_conv1d.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # reference: our model with the very same (dequantized) weights; llama.cpp also quantizes
    # activations to 8 bits inside its quantized dot products, hence 3e-2
    same_weights = torch_runner(out)
    with open_llama(out) as lr:
        ids = random_ids(2, 16, seed=5)
        got, _ = lr.prefill(ids, lr.new_state(2))
        want, _ = same_weights.prefill(ids, same_weights.new_state(2))
        assert torch.isfinite(got).all() and rel_err(got, want) <= 3e-2


# ----------------------------------------------------------------------------- demo model

DEMOS = [REPO / "models" / "demo-mamba1", REPO / "models" / "demo-mamba2"]


def _demo_ready(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


@needs_llama
@pytest.mark.parametrize("DEMO", [pytest.param(d, id=d.name, marks=pytest.mark.skipif(
    not _demo_ready(d), reason=f"demo model {d} not built yet (config.json + weights absent)")) for d in DEMOS])
def test_demo_q8_0_top1_and_perplexity(DEMO, tmp_path):
    """Q8_0 in llama.cpp vs our fp32 PyTorch model on real text: >= 95% top-1 agreement and
    perplexity within 2%."""
    import inspect

    from tokenizers import Tokenizer

    text = inspect.getsource(json.decoder) + inspect.getsource(shutil)
    all_ids = Tokenizer.from_file(str(DEMO / "tokenizer.json")).encode(text).ids
    ids = torch.tensor([all_ids[:1025]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Mamba1's dt_rank (16) rows fall back to F16, tested above
        out = export_gguf(DEMO, tmp_path / "demo-q8_0.gguf", outtype="q8_0")
    ref = torch_runner(DEMO)
    with open_llama(out) as lr:
        assert lr.tokenizer.encode(text) == all_ids  # llama.cpp's BPE on real code == tokenizers'
        got, _ = lr.prefill(ids[:, :-1], lr.new_state(1))
    want, _ = ref.prefill(ids[:, :-1], ref.new_state(1))
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    target = ids[0, 1:]

    def ppl(logits):
        return float(torch.exp(torch.nn.functional.cross_entropy(logits[0, :, : ref.vocab_size], target)))

    assert agree >= 0.95
    assert abs(ppl(got) / ppl(want) - 1) <= 0.02


# ----------------------------------------------------------------------------- llama.cpp's converter

def _converter():
    """llama.cpp's convert_hf_to_gguf.py: $LLAMA_CPP_DIR (a llama.cpp source tree), else the copy
    `make install` fetches (tools/fetch_llama_converter.py, from the installed llama-cpp-python's
    source package: the converter of the llama.cpp the llama.cpp backend runs)."""
    root = os.environ.get("LLAMA_CPP_DIR") or Path(sys.prefix) / "share" / "llama.cpp"
    conv = Path(root) / "convert_hf_to_gguf.py"
    return conv if conv.exists() else None


# every kind in f32; the other outtypes the converter writes on one model per architecture
CONVERTER_CASES = [(k, "f32") for k in ("mamba", "falcon_mamba", "mamba2", "mamba2_g2")] + \
    [(k, t) for k in ("mamba", "mamba2_g2") for t in ("f16", "bf16", "q8_0")]


@pytest.mark.skipif(_converter() is None, reason="llama.cpp's converter not found: run `make install` (it fetches "
                    "it with tools/fetch_llama_converter.py) or set LLAMA_CPP_DIR to a llama.cpp source tree")
@pytest.mark.parametrize("kind,outtype", CONVERTER_CASES)
def test_same_file_as_llamacpp_converter_and_import(kind, outtype, tiny_tokenizer, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py is the reference for names, shapes, per-tensor types,
    bytes, transforms and keys; and `load_model` reads its file. (Its tokenizer-less path uses the
    built-in GPT-NeoX vocab, hence vocab_size=50280.)"""
    import subprocess

    from conftest import build_hf_model
    from mamba_deploy.export.gguf_tables import CONFIG_KEYS

    # Falcon-Mamba: llama.cpp normalises dt/B/C with the layer eps (no key for mixer_rms_eps), so the
    # reference model gets that eps too (the export warns about it; tested in the next test)
    extra = {"mixer_rms_eps": 1e-5, "layer_norm_epsilon": 1e-5} if kind == "falcon_mamba" else {}
    hf = build_hf_model(kind, vocab_size=50280, **extra)
    hf.save_pretrained(tmp_path / "hf")
    conv = _converter()
    env = {**os.environ, "PYTHONPATH": str(conv.parent / "gguf-py")}
    run = subprocess.run([sys.executable, str(conv), str(tmp_path / "hf"), "--outfile", str(tmp_path / "theirs.gguf"),
                          "--outtype", outtype], cwd=conv.parent, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = export_gguf(tmp_path / "hf", tmp_path / "ours.gguf", outtype=outtype, tokenizer=tiny_tokenizer)
    r_t, t_t = reader_tensors(tmp_path / "theirs.gguf")
    r_o, t_o = reader_tensors(ours)
    assert sorted(t_t) == sorted(t_o)
    for name, t in t_t.items():
        o = t_o[name]
        assert (o.shape.tolist(), o.tensor_type.name) == (t.shape.tolist(), t.tensor_type.name), name
        if name.endswith("ssm_a"):  # they compute -exp in float32, we in float64: <= 1 ulp apart
            assert np.allclose(o.data, t.data, rtol=2.5e-7, atol=0), name
        else:
            assert np.array_equal(o.data, t.data), name
    arch = r_t.get_field("general.architecture").contents()
    assert r_o.get_field("general.architecture").contents() == arch
    assert r_o.get_field("general.file_type").contents() == r_t.get_field("general.file_type").contents()
    for key, *_ in CONFIG_KEYS:
        f = r_t.get_field(key.format(arch=arch))
        if f is not None:
            assert r_o.get_field(key.format(arch=arch)).contents() == pytest.approx(f.contents()), key
    if outtype == "f32":
        ids = random_ids(2, 23, vocab=50000, seed=6)
        with torch.no_grad():
            assert rel_err(load_model(tmp_path / "theirs.gguf")(ids).logits, hf_logits(hf, ids)) <= 1e-5


def test_imported_model_is_inference_only_and_falcon_eps_warns(exported, ckpt, tmp_path):
    """A GGUF-loaded model needs no grad (else every call outside inference_mode chains an
    autograd graph through the state). Exporting a Falcon-Mamba whose dt/B/C eps differs from
    the layer eps warns: llama.cpp normalises them with the layer eps."""
    model = load_model(exported("mamba2"))
    assert not any(p.requires_grad for p in model.parameters())
    st = model.new_state(1)
    model.step(torch.tensor([3]), st)
    assert st.ssm.grad_fn is None
    folder, hf = ckpt("falcon_mamba")
    assert hf.config.mixer_rms_eps != hf.config.layer_norm_epsilon
    with pytest.warns(UserWarning, match="mixer_rms_eps"):
        export_gguf(folder, tmp_path / "f.gguf")


@needs_llama
def test_llamacpp_runner_out_of_vocab_ids(exported):
    from mamba_deploy.errors import ShapeError

    with open_llama(exported("mamba")) as lr:
        st = lr.new_state(1)
        with pytest.raises(ShapeError, match="outside the vocabulary"):
            lr.prefill(torch.tensor([[1, lr.n_vocab]]), st)
        with pytest.raises(ShapeError, match="length 0"):
            lr.prefill(torch.zeros(1, 0, dtype=torch.long), st)


# ----------------------------------------------------------------------------- a GGUF's own tokenizer

@pytest.fixture
def lone_gguf(exported, tmp_path):
    """The mamba GGUF copied alone into a folder: no tokenizer files beside it."""
    dst = tmp_path / "lone" / "m.gguf"
    dst.parent.mkdir()
    shutil.copy(exported("mamba"), dst)
    return dst


@needs_llama
def test_eval_gguf_on_the_corpus_with_llamacpp_tokenizer(lone_gguf, capsys):
    """Before: AttributeError, encode_split reached into our Tokenizer's private `_tok`."""
    from mamba_deploy.cli import main
    from mamba_deploy.data import corpus_texts
    from mamba_deploy.eval import perplexity

    assert main(["eval", str(lone_gguf), "--corpus", "stdlib-val", "--max-tokens", "300", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    with open_llama(lone_gguf) as lr:
        tok, ids = lr.tokenizer, []
        for text in corpus_texts("val"):  # the stream built here file by file: tokens, then EOS
            ids += tok.encode(text) + [tok.eos_token_id]
            if len(ids) >= 300:
                break
        want = perplexity(lr, ids[:300])
    assert res["backend"] == "llama.cpp" and res["tokens"] == 299
    assert res["ppl"] == pytest.approx(want["ppl"], rel=1e-9)


@needs_llama
def test_torch_backend_on_a_lone_gguf_uses_its_tokenizer(lone_gguf, tiny_tokenizer, capsys):
    """Before: 'no tokenizer in <folder>': the torch runner looked for files beside the GGUF."""
    from tokenizers import Tokenizer

    from mamba_deploy.cli import main
    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner

    ref = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json"))
    prompts = ["hello world, the lazy fox", "a stitch in time"]
    tr = open_runner(lone_gguf, "torch")
    with open_llama(lone_gguf) as lr:
        for p in prompts:
            assert tr.tokenizer.encode(p) == lr.tokenizer.encode(p) == ref.encode(p).ids
        assert tr.tokenizer.eos_token_id == lr.tokenizer.eos_token_id == ref.token_to_id(EOS)
        llama_ids = [lr.tokenizer.encode(p) for p in prompts]
    argv = ["generate", str(lone_gguf), "--backend", "torch", "--max-new-tokens", "6", "--json"]
    assert main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
    rows = json.loads(capsys.readouterr().out)
    want = generate(tr, llama_ids, max_new_tokens=6, stop_token_ids=[ref.token_to_id(EOS)])
    assert [r["tokens"] for r in rows] == want.tokens


@pytest.mark.parametrize("added", [[], ["  ", "mamba!"]], ids=["plain", "user_defined"])
def test_onnx_export_of_a_lone_gguf_writes_its_tokenizer(added, ckpt, tiny_tokenizer, tmp_path):
    """The GGUF's vocabulary written back as tokenizer.json encodes as the tokenizer.json it came
    from (and as llama.cpp), non-special added tokens (GGUF user-defined) included."""
    pytest.importorskip("onnx")
    from tokenizers import AddedToken, Tokenizer

    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.tokenizer import load_tokenizer

    ref = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json"))
    ref.add_tokens([AddedToken(t, normalized=False) for t in added])
    src = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer, src)
    ref.save(str(src / "tokenizer.json"))
    (tmp_path / "lone").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gg = export_gguf(ckpt("mamba")[0], tmp_path / "lone" / "m.gguf", tokenizer=src)
    out = export_onnx(gg, tmp_path / "onnx", validate=False)
    tok = load_tokenizer(out)
    texts = TEXTS[:3] + ["the  quick   mamba!mamba! dog", " quick  brown"]
    for text in texts + [f"a {EOS} b"]:
        assert tok.encode(text) == ref.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text).ids)
    assert tok.eos_token_id == ref.token_to_id(EOS) and tok.vocab_size == ref.get_vocab_size()
    if HAVE_LLAMA:  # llama.cpp matches control tokens only with parse_special, so no EOS text here
        with open_llama(gg) as lr:
            assert [lr.tokenizer.encode(t) for t in texts] == [tok.encode(t) for t in texts]


def test_a_stray_tokenizer_beside_a_gguf_is_not_used(exported, tiny_tokenizer, tmp_path):
    """Before: a tokenizer.json of another model beside the GGUF was what the torch backend encoded
    with and what exports copied, while llama.cpp used the GGUF's vocabulary: the same prompt
    became different ids. Now it is warned about and the GGUF's own vocabulary is used; one that
    matches the GGUF id for id is still used (and copied) as it is."""
    pytest.importorskip("onnx")
    from tokenizers import Tokenizer

    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners import open_runner
    from mamba_deploy.tokenizer import load_tokenizer

    ref = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json"))
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_tokenizer, folder)
    gg = folder / "m.gguf"
    shutil.copy(exported("mamba"), gg)
    tj = json.loads((folder / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    text = "the quick brown fox"
    a, b = ref.encode(text).tokens[0], ref.encode(text).tokens[-1]
    assert a != b
    vocab[a], vocab[b] = vocab[b], vocab[a]  # another model's tokenizer: two ids swapped
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    assert Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids != ref.encode(text).ids
    with pytest.warns(UserWarning, match=re.escape(f"tokenizer.json has token {min(vocab[a], vocab[b])} = ")):
        runner = open_runner(gg, "torch")
    assert runner.tokenizer.encode(text) == ref.encode(text).ids
    with pytest.warns(UserWarning, match="belongs to another model"):
        out = export_onnx(gg, tmp_path / "onnx", validate=False)
    assert load_tokenizer(out).encode(text) == ref.encode(text).ids
    # the model's own tokenizer.json beside it: used and copied byte for byte, no warning
    shutil.copy(tiny_tokenizer / "tokenizer.json", folder / "tokenizer.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = export_onnx(gg, tmp_path / "onnx2", validate=False)
    assert (out2 / "tokenizer.json").read_bytes() == (tiny_tokenizer / "tokenizer.json").read_bytes()


@pytest.mark.filterwarnings("ignore:.*no equivalent outside llama.cpp")  # load_model's own warning
def test_onnx_export_of_a_gguf_without_tokenizer_json_equivalent_warns(lone_gguf, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    import dataclasses

    from mamba_deploy.export import gguf_vocab
    from mamba_deploy.export.onnx import export_onnx

    real = gguf_vocab.vocab_from_gguf
    monkeypatch.setattr(gguf_vocab, "vocab_from_gguf", lambda p, r=None: dataclasses.replace(real(p, r), pre="llama-bpe"))
    with pytest.warns(UserWarning, match=r"gets no tokenizer: .*pre-tokenizer 'llama-bpe'"):
        out = export_onnx(lone_gguf, tmp_path / "onnx", validate=False)
    assert (out / "model.onnx").is_file() and not (out / "tokenizer.json").exists()


def test_serve_names_a_torch_runner_of_a_gguf_after_its_file(exported):
    from mamba_deploy.runners.torch_runner import TorchRunner
    from mamba_deploy.serve import default_model_name

    path = exported("mamba")
    assert default_model_name(TorchRunner(load_model(path))) == Path(path).stem


def test_convert_and_quantize_of_a_lone_gguf_keep_its_tokenizer(lone_gguf, tmp_path):
    """The GGUF's vocabulary is the tokenizer: a checkpoint saved from it carries tokenizer.json,
    which encodes prompts as the GGUF-loaded model does."""
    from mamba_deploy.cli import main
    from mamba_deploy.quant import quantize, save_quantized

    assert main(["convert", str(lone_gguf), str(tmp_path / "c")]) == 0
    src, out = load_model(lone_gguf), load_model(tmp_path / "c")
    text = "hello world, the quick brown fox"
    assert (tmp_path / "c" / "tokenizer.json").exists()
    assert out.tokenizer.encode(text) == src.tokenizer.encode(text) != []
    q = save_quantized(quantize(load_model(lone_gguf), "int8", progress=False), tmp_path / "q")
    assert load_model(q).tokenizer.encode(text) == src.tokenizer.encode(text)


@pytest.mark.parametrize("pre", ["olmo", "mpt", "jais"])
def test_gpt2_regex_pre_tokenizers_have_a_tokenizer(exported, pre):
    """llama.cpp splits these pre-tokenizer names with GPT-2's regex: the same ids as 'gpt-2'."""
    import dataclasses

    from mamba_deploy.export.gguf_vocab import tokenizer_from_vocab, vocab_from_gguf

    vocab = vocab_from_gguf(exported("mamba"))
    text = "hello world,  the quick\nbrown fox 123"
    want = tokenizer_from_vocab(dataclasses.replace(vocab, pre="gpt-2")).encode(text).ids
    assert tokenizer_from_vocab(dataclasses.replace(vocab, pre=pre)).encode(text).ids == want != []


def _without_tokenizer_keys(src, dst):
    """A copy of the GGUF `src` with every tokenizer.* metadata key left out (weights-only GGUFs)."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch=r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith(("GGUF.", "tokenizer.")) or name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    finish_gguf(w)
    return dst


@pytest.mark.filterwarnings("ignore:.*no equivalent outside llama.cpp")  # convert's own load
def test_gguf_without_tokenizer_metadata_loads_and_saves_with_a_warning(exported, ckpt, tmp_path):
    """Its weights still load (token ids work) and convert still writes them; only the tokenizer
    is missing, which each step says, instead of failing on the missing metadata key."""
    from mamba_deploy.cli import main

    (tmp_path / "g").mkdir()
    path = _without_tokenizer_keys(exported("mamba"), tmp_path / "g" / "m.gguf")
    with pytest.warns(UserWarning, match="no equivalent outside llama.cpp"):
        model = load_model(path)
    ids = random_ids(1, 7)
    assert rel_err(model(ids).logits, load_model(exported("mamba"))(ids).logits) == 0
    with pytest.warns(UserWarning, match="gets no tokenizer"):
        assert main(["convert", str(path), str(tmp_path / "c")]) == 0
    assert not (tmp_path / "c" / "tokenizer.json").exists()
    assert rel_err(load_model(tmp_path / "c")(ids).logits, model(ids).logits) == 0
