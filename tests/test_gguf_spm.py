"""GGUF export of SentencePiece vocabularies (Mamba-Codestral's tokenizer.model.v3, Llama-style
tokenizer.model): llama.cpp's "llama" tokenizer, and the way back from such a GGUF to a tokenizer.

References: sentencepiece itself (pieces, scores, types, encode / decode of the model file),
llama.cpp through llama-cpp-python (skipped with the reason where it is not installed), and
transformers' Mamba2 on the same weights (logits; llama.cpp F32 vs transformers <= 1e-5, the F32
row of tests/test_gguf.py).
"""

from __future__ import annotations

import io
import json
import random
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import HAVE_LLAMA, build_hf_model, needs_llama, rel_err
from mamba_deploy.errors import ExportError, ModelNotFoundError
from mamba_deploy.export.gguf import export_gguf

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece", reason="SentencePiece vocabularies need sentencepiece")
pytest.importorskip("google.protobuf", reason="sentencepiece's model file is read through protobuf")

WORDS = ["def", "main", "return", "print", "hello", "world", "mamba", "state", "space", "model", "code", "Zürich",
         "naïve", "日本"]
CONTROL, USER = ["[INST]", "[/INST]"], ["<tool>"]
PIECES = 400
# a Mamba-Codestral-shaped folder at toy size (see tests/test_mistral.py): 2 groups, untied head,
# vocab padded to 416 rows
PARAMS = {"dim": 64, "n_layers": 2, "vocab_size": PIECES, "n_groups": 2, "rms_norm": True, "residual_in_fp32": True,
          "fused_add_norm": True, "pad_vocab_size_multiple": 32, "tie_embeddings": False, "model_type": "mamba"}
HF_SHAPE = dict(hidden_size=64, state_size=128, head_dim=64, num_heads=2, n_groups=2, chunk_size=256,
                vocab_size=416, num_hidden_layers=2, tie_word_embeddings=False)
# texts without control / user-defined pieces: llama.cpp must encode them exactly as sentencepiece
PLAIN = ["hello world", " def main():\n    return 0", "Zürich naïve 日本 ☃ emoji 🐍 (byte fallback)",
         "  two  spaces and a tab\tand\r\nCRLF", "", "x"]
# texts with them: llama.cpp matches them as tokens (parse_special), so must our tokenizer
SPECIAL = ["[INST] print [/INST] code</s>", "<tool>x<tool> y", "a<unk>b", "[INST][/INST]"]


def _train(**kw) -> bytes:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    buf = io.BytesIO()
    args = dict(vocab_size=PIECES, model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                remove_extra_whitespaces=False, user_defined_symbols=USER, control_symbols=CONTROL, minloglevel=2)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, **{**args, **kw})
    return buf.getvalue()


@pytest.fixture(scope="module")
def blob():
    return _train()


@pytest.fixture(scope="module")
def sp(blob):
    return spm.SentencePieceProcessor(model_proto=blob)


@pytest.fixture(scope="module")
def codestral(blob, tmp_path_factory):
    """(mistral_inference folder with tokenizer.model.v3, its transformers model, its GGUF)."""
    from safetensors.torch import save_file

    hf = build_hf_model("mamba2_g2", seed=4, **HF_SHAPE)
    folder = tmp_path_factory.mktemp("codestral")
    (folder / "params.json").write_text(json.dumps(PARAMS))
    save_file({"model." + k.replace("backbone.embeddings.", "backbone.embedding."): v.contiguous()
               for k, v in hf.state_dict().items()}, str(folder / "consolidated.safetensors"))
    (folder / "tokenizer.model.v3").write_bytes(blob)
    out = export_gguf(folder, tmp_path_factory.mktemp("gguf") / "codestral.gguf")
    return folder, hf, out


def _field(path, key):
    f = gguf.GGUFReader(str(path)).get_field(key)
    return None if f is None else f.contents()


# ----------------------------------------------------------------------------- the file

def test_vocabulary_metadata_is_the_sentencepiece_model(codestral, sp):
    _, _, out = codestral
    n = sp.get_piece_size()
    tokens, scores, types = (_field(out, f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    assert _field(out, "tokenizer.ggml.model") == "llama" and _field(out, "tokenizer.ggml.merges") is None
    assert len(tokens) == len(scores) == len(types) == HF_SHAPE["vocab_size"]  # one per embedding row
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert np.allclose(scores[:n], [sp.get_score(i) for i in range(n)], rtol=0, atol=1e-6)
    T = gguf.TokenType

    def kind(i):
        for test, t in ((sp.is_control, T.CONTROL), (sp.is_unknown, T.UNKNOWN), (sp.is_byte, T.BYTE),
                        (sp.is_unused, T.UNUSED)):
            if test(i):
                return t
        return T.USER_DEFINED if sp.id_to_piece(i) in USER else T.NORMAL

    assert types[:n] == [int(kind(i)) for i in range(n)]
    assert sum(t == T.BYTE for t in types) == 256  # byte fallback
    assert types[n:] == [int(T.UNUSED)] * (len(types) - n)  # the padded rows
    assert (_field(out, "tokenizer.ggml.bos_token_id"), _field(out, "tokenizer.ggml.eos_token_id"),
            _field(out, "tokenizer.ggml.unknown_token_id")) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert _field(out, "tokenizer.ggml.add_bos_token") is True
    assert _field(out, "tokenizer.ggml.add_space_prefix") is True


def test_requantizing_keeps_the_sentencepiece_vocabulary(codestral, tmp_path):
    _, _, out = codestral
    re_out = export_gguf(out, tmp_path / "re.gguf", outtype="q8_0")  # no tokenizer file anywhere near
    for key in ("model", "tokens", "scores", "token_type", "add_bos_token", "add_space_prefix", "bos_token_id"):
        assert _field(re_out, f"tokenizer.ggml.{key}") == _field(out, f"tokenizer.ggml.{key}"), key


# ----------------------------------------------------------------------------- llama.cpp

@needs_llama
def test_llamacpp_encodes_as_sentencepiece_and_as_our_tokenizer(codestral, sp):
    from mamba_deploy.runners import open_runner
    from mamba_deploy.tokenizer import load_tokenizer

    folder, _, out = codestral
    ours = load_tokenizer(folder)  # the folder's tokenizer.model.v3 through sentencepiece
    with open_runner(out, "llama.cpp", n_threads=2) as lr:
        for text in PLAIN:
            want = [sp.bos_id()] + sp.encode(text)
            assert lr.tokenizer.encode(text) == want == ours.encode(text), text
            assert lr.tokenizer.decode(want) == sp.decode(want) == ours.decode(want), text
        for text in SPECIAL:
            got = lr.tokenizer.encode(text)
            assert ours.encode(text) == got, text
            assert sp.piece_to_id("[INST]") in got or "<tool>" not in text or sp.piece_to_id("<tool>") in got
        assert (lr.tokenizer.bos_token_id, lr.tokenizer.eos_token_id) == (sp.bos_id(), sp.eos_id())


@needs_llama
def test_llamacpp_logits_and_text_generation_match(codestral, sp, capsys):
    """The Codestral-layout folder -> GGUF: llama.cpp's logits against transformers', and greedy
    generation from a text prompt through llama.cpp against the torch backend on the folder."""
    from mamba_deploy.cli import main
    from mamba_deploy.runners import open_runner

    folder, hf, out = codestral
    ids = torch.tensor([[sp.bos_id()] + sp.encode("hello mamba world def main"),
                        [sp.bos_id()] + sp.encode("print state space model code")])[:, :7]
    with open_runner(out, "llama.cpp", n_threads=2) as lr, torch.no_grad():
        got, _ = lr.prefill(ids, lr.new_state(2))
        want = hf(ids).logits
        assert rel_err(got[..., :PIECES], want[..., :PIECES]) <= 1e-5
    rows = []
    for backend, model in (("llama.cpp", out), ("torch", folder)):
        argv = ["generate", str(model), "--backend", backend, "--prompt", "hello mamba world", "--max-new-tokens", "6",
                "--json"]
        assert main(argv) == 0
        rows.append(json.loads(capsys.readouterr().out)[0])
    assert rows[0]["tokens"] == rows[1]["tokens"] and len(rows[0]["tokens"]) == 6
    assert rows[0]["completion"] == rows[1]["completion"]


# ----------------------------------------------------------------------------- back from the GGUF

@pytest.fixture
def lone(codestral, tmp_path):
    dst = tmp_path / "lone" / "m.gguf"
    dst.parent.mkdir()
    shutil.copy(codestral[2], dst)
    return dst


def test_torch_backend_on_a_lone_gguf_encodes_as_sentencepiece(lone, sp):
    from mamba_deploy.runners import open_runner

    runner = open_runner(lone, "torch")
    tok = runner.tokenizer
    for text in PLAIN:
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text
    assert (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id())
    if HAVE_LLAMA:
        with open_runner(lone, "llama.cpp", n_threads=2) as lr:
            for text in PLAIN + SPECIAL:
                assert tok.encode(text) == lr.tokenizer.encode(text), text


def test_onnx_export_of_a_lone_gguf_writes_a_sentencepiece_model(lone, sp, tmp_path):
    pytest.importorskip("onnx")
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.tokenizer import load_tokenizer

    out = export_onnx(lone, tmp_path / "onnx", validate=False)
    assert (out / "tokenizer.model").is_file() and not (out / "tokenizer.json").exists()
    rebuilt = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert [rebuilt.id_to_piece(i) for i in range(sp.get_piece_size())] == \
        [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    tok = load_tokenizer(out)
    for text in PLAIN:
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text), text


# ----------------------------------------------------------------------------- which tokenizer file

def _hf_folder(tmp_path, blob, tokenizer_json=None):
    hf = build_hf_model("mamba2", seed=1, vocab_size=416)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(blob)
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    return folder


def _converted_tokenizer_json(blob) -> dict:
    """What transformers writes for a Llama-style SentencePiece model: BPE with byte fallback."""
    transformers = pytest.importorskip("transformers")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tokenizer.model").write_bytes(blob)
        # through tokenizer_config.json, as a Llama checkpoint names its class (transformers 5's
        # LlamaTokenizerFast(vocab_file=...) converts to a 3-token vocabulary)
        (Path(d) / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "legacy": False, "bos_token": "<s>", "eos_token": "</s>",
             "unk_token": "<unk>"}))
        tok = transformers.AutoTokenizer.from_pretrained(d)
        tok.save_pretrained(d)
        tj = json.loads((Path(d) / "tokenizer.json").read_text())
    assert len(tj["model"]["vocab"]) == PIECES, "the conversion lost the vocabulary"
    return tj


def test_a_converted_tokenizer_json_defers_to_the_sentencepiece_model_beside_it(blob, tmp_path):
    tj = _converted_tokenizer_json(blob)
    assert tj["model"]["type"] == "BPE" and tj["model"]["byte_fallback"]
    folder = _hf_folder(tmp_path, blob, tj)
    out = export_gguf(folder, tmp_path / "m.gguf")
    assert _field(out, "tokenizer.ggml.model") == "llama"
    (folder / "tokenizer.model").unlink()  # now only the conversion, which lacks the scores
    with pytest.raises(ExportError, match="SentencePiece tokenizer converted.*tokenizer.model"):
        export_gguf(folder, tmp_path / "n.gguf")
    assert not (tmp_path / "n.gguf").exists()


def test_byte_level_tokenizer_json_still_wins_over_a_sentencepiece_model(blob, tmp_path):
    from mamba_deploy.export.gguf_vocab import find_tokenizer_file

    byte_level = json.loads((__import__("pathlib").Path(__file__).parents[1] / "models" / "demo-mamba2" /
                             "tokenizer.json").read_text())
    folder = _hf_folder(tmp_path, blob, byte_level)
    assert find_tokenizer_file(None, folder) == folder / "tokenizer.json"
    assert find_tokenizer_file(folder / "tokenizer.model", None) == folder / "tokenizer.model"  # --tokenizer FILE


# ----------------------------------------------------------------------------- errors

def test_unigram_model_is_refused_by_type(tmp_path):
    folder = _hf_folder(tmp_path, _train(model_type="unigram", vocab_size=295))
    with pytest.raises(ExportError, match="UNIGRAM.*BPE models only"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_corrupt_or_oversized_sentencepiece_model(blob, tmp_path):
    folder = _hf_folder(tmp_path, blob)
    (folder / "tokenizer.model").write_bytes(b"\x0a\xff\xff not a model")
    with pytest.raises(ExportError, match=r"tokenizer.model: not a SentencePiece model.*copy it again"):
        export_gguf(folder, tmp_path / "m.gguf")
    small = build_hf_model("mamba2", seed=1, vocab_size=256)
    small.save_pretrained(tmp_path / "small")
    (tmp_path / "small" / "tokenizer.model").write_bytes(blob)
    with pytest.raises(ExportError, match="400 pieces but the model's embedding has only 256 rows"):
        export_gguf(tmp_path / "small", tmp_path / "m.gguf")
    with pytest.raises(ModelNotFoundError, match="no tokenizer.json or SentencePiece model"):
        export_gguf(tmp_path / "small", tmp_path / "m.gguf", tokenizer=tmp_path)  # a folder without one


def test_without_protobuf_the_error_says_how_to_install(blob, tmp_path, monkeypatch):
    folder = _hf_folder(tmp_path, blob)
    monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)
    monkeypatch.delattr(sys.modules["sentencepiece"], "sentencepiece_model_pb2", raising=False)
    with pytest.raises(ExportError, match=r"pip install 'mamba-deploy\[sentencepiece\]'"):
        export_gguf(folder, tmp_path / "m.gguf")


def test_normalizing_model_warns_that_llamacpp_does_not_normalize(tmp_path):
    folder = _hf_folder(tmp_path, _train(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gguf(folder, tmp_path / "m.gguf")
    assert any("not applied by llama.cpp" in str(w.message) for w in caught)


def test_model_without_eos_warns_which_token_llamacpp_will_stop_at(tmp_path):
    blob = _train(eos_id=-1)
    sp_ = spm.SentencePieceProcessor(model_proto=blob)
    assert sp_.eos_id() == -1
    folder = _hf_folder(tmp_path, blob)
    import re

    want = f"no end-of-text piece; llama.cpp will take token 2 ({sp_.id_to_piece(2)!r})"
    with pytest.warns(UserWarning, match=re.escape(want)):
        out = export_gguf(folder, tmp_path / "m.gguf")
    assert _field(out, "tokenizer.ggml.eos_token_id") is None
    if HAVE_LLAMA:  # what the warning says llama.cpp does
        from mamba_deploy.runners import open_runner

        with open_runner(out, "llama.cpp", n_threads=2) as lr:
            assert lr.tokenizer.eos_token_id == 2


def test_byte_fallback_tokenizer_json_decodes_as_sentencepiece(blob, tmp_path):
    """A Llama / Mistral-style tokenizer.json (BPE with byte fallback, what transformers converts a
    SentencePiece model to) decodes cut and invalid byte runs as sentencepiece does: `tokenizers`'
    ByteFallback turned a whole run that is not valid UTF-8 into U+FFFD, so "日" followed by the
    first byte of "本" (a completion cut by max_new_tokens) lost its "日", and the streamed text
    (which had printed "日") and generate's text disagreed. Random completions: sentencepiece's
    text, the streamed text and the completion text are one string."""
    from mamba_deploy.generation import TextStream, context_ids, decode_after
    from mamba_deploy.tokenizer import load_tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(_converted_tokenizer_json(blob)))
    tok, sp = load_tokenizer(folder), spm.SentencePieceProcessor(model_proto=blob)
    byte = {b: sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    cut = [byte[b] for b in "日本".encode()][:4]
    assert tok.decode(cut) == sp.decode(cut) == "日\ufffd"
    lone = sp.encode("w") + [byte[0x47], byte[0xB7]]  # a valid byte, then one that starts nothing
    assert tok.decode(lone) == sp.decode(lone)
    rng = random.Random(0)
    pieces = list(range(3, sp.get_piece_size()))
    for _ in range(200):
        prompt = sp.encode(rng.choice(["hello", "def main", "Zürich", "x = 1", "naïve 日"]))
        comp = [rng.choice(pieces) if rng.random() < 0.5 else byte[rng.randrange(128, 256)]
                for _ in range(rng.randint(1, 10))]
        want = sp.decode(prompt + comp)[len(sp.decode(prompt)):]
        ctx = context_ids(tok, prompt)
        stream = TextStream(tok, prompt=prompt)
        streamed = "".join(stream.push(t) for t in comp) + stream.finish()
        assert decode_after(tok, ctx + comp, len(ctx)) == streamed == want, (prompt, comp)
