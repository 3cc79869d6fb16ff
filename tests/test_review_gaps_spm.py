"""Gaps found by a mutation review of the SentencePiece GGUF commit (62cb697): each test fails on
a planted bug that tests/test_gguf_spm.py let through, and passes on the reviewed code.

References, never the code under test: sentencepiece itself (pieces, scores, ids, encode),
llama.cpp through llama-cpp-python (skipped with the reason where it is not installed), and
hand-written expectations (llama.cpp's converter conventions, the file a folder holds).

The last three tests were real bugs of the reviewed code, fixed with them: a GGUF's BOS / EOS pieces
not named <s> / </s> were lost on the way back to a SentencePiece model; add_bos_token false was
ignored there; overlapping special pieces split leftmost-first instead of llama.cpp's longest-first.
"""
# ruff: noqa: F811  (the tests take the fixtures blob / sp imported from test_gguf_spm as arguments)

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from conftest import build_hf_model

from mamba_deploy.errors import ExportError, ModelNotFoundError
from mamba_deploy.export.gguf import export_gguf

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece", reason="SentencePiece vocabularies need sentencepiece")
pytest.importorskip("google.protobuf", reason="sentencepiece's model file is read through protobuf")
from test_gguf_spm import (HAVE_LLAMA, HF_SHAPE, PARAMS, PIECES, _train, blob, needs_llama,  # noqa: E402, F401
                           sp)  # the same toy model; blob and sp are fixtures

TEXTS = ["hello world", " def main():\n    return 0", "  two  spaces", "x", "Zürich 🐍"]
VT = gguf.GGUFValueType


def _codestral(folder, blob, name="tokenizer.model.v3"):
    """A mistral_inference-layout folder (params.json, consolidated.safetensors, the SentencePiece
    model) at toy size, and its GGUF beside it (not inside: the folder's model file stays the only
    tokenizer there)."""
    from safetensors.torch import save_file

    hf = build_hf_model("mamba2_g2", seed=4, **HF_SHAPE)
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(PARAMS))
    save_file({"model." + k.replace("backbone.embeddings.", "backbone.embedding."): v.contiguous()
               for k, v in hf.state_dict().items()}, str(folder / "consolidated.safetensors"))
    (folder / name).write_bytes(blob)
    return export_gguf(folder, folder.parent / f"{folder.name}.gguf")


def _field(path, key):
    f = gguf.GGUFReader(str(path)).get_field(key)
    return None if f is None else f.contents()


def _rewrite(src, dst, drop=(), new=None):
    """A copy of the GGUF `src` (gguf-py only, as its gguf_new_metadata script does) without the
    keys in `drop` and with `new` = {key: (value, GGUFValueType, array sub-type or None)}."""
    new = dict(new or {})
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch=r.get_field("general.architecture").contents(), endianess=r.endianess)
    for f in r.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF.") or f.name in drop:
            continue
        if f.name in new:
            value, vt, sub = new.pop(f.name)
        else:
            value, vt = f.contents(), f.types[0]
            sub = f.types[-1] if vt == VT.ARRAY else None
        w.add_key_value(f.name, value, vt, sub_type=sub)
    for key, (value, vt, sub) in new.items():
        w.add_key_value(key, value, vt, sub_type=sub)
    for t in r.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        w.write_tensor_data(t.data, tensor_endianess=r.endianess)
    w.close()
    return dst


def _lone(gguf_path, tmp_path, name="lone"):
    """The GGUF alone in a folder: the torch backend then has only its vocabulary."""
    d = tmp_path / name
    d.mkdir()
    return shutil.copy(gguf_path, d / "m.gguf")


def _torch_tokenizer(path):
    from mamba_deploy.runners import open_runner

    return open_runner(path, "torch").tokenizer


def _encode_all(path, texts):
    tok = _torch_tokenizer(path)
    return [tok.encode(t) for t in texts]


def _llama_encode(path, texts):
    from mamba_deploy.runners import open_runner

    with open_runner(path, "llama.cpp", n_threads=1) as lr:
        return [lr.tokenizer.encode(t) for t in texts], (lr.tokenizer.bos_token_id, lr.tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def base(blob, tmp_path_factory):
    return _codestral(tmp_path_factory.mktemp("base") / "codestral", blob)


# ----------------------------------------------------------------------------- the GGUF file

def test_padded_rows_score_minus_1000_as_llamacpps_converter(base, sp):
    """convert_hf_to_gguf.py pads a SentencePiece vocabulary with [PAD{i}] / -1000.0 / UNUSED."""
    scores = _field(base, "tokenizer.ggml.scores")
    n = sp.get_piece_size()
    assert len(scores) == HF_SHAPE["vocab_size"]
    assert np.array_equal(np.asarray(scores[n:], dtype=np.float32), np.full(HF_SHAPE["vocab_size"] - n, -1000.0,
                                                                            dtype=np.float32))


def test_model_without_dummy_prefix_writes_add_space_prefix_false(tmp_path):
    blob = _train(add_dummy_prefix=False)
    sp = spm.SentencePieceProcessor(model_proto=blob)
    out = _codestral(tmp_path / "nodummy", blob)
    assert _field(out, "tokenizer.ggml.add_space_prefix") is False
    want = [[sp.bos_id()] + sp.encode(t) for t in TEXTS]
    assert _encode_all(_lone(out, tmp_path), TEXTS) == want  # GGUF -> sentencepiece
    if HAVE_LLAMA:
        assert _llama_encode(out, TEXTS)[0] == want


def test_model_without_bos_and_eos_writes_no_bos(tmp_path):
    blob = _train(bos_id=-1, eos_id=-1)
    sp = spm.SentencePieceProcessor(model_proto=blob)
    assert (sp.bos_id(), sp.eos_id()) == (-1, -1)
    out = _codestral(tmp_path / "nobos", blob)
    assert _field(out, "tokenizer.ggml.add_bos_token") is False
    assert _field(out, "tokenizer.ggml.bos_token_id") is None and _field(out, "tokenizer.ggml.eos_token_id") is None
    if HAVE_LLAMA:
        assert _llama_encode(out, TEXTS)[0] == [sp.encode(t) for t in TEXTS]


def test_special_ids_sentencepiece_does_not_have_are_not_written(blob, tmp_path):
    """A trainer_spec pad_id past the pieces (sentencepiece: no pad, pad_id() == -1) is no padding
    token: a GGUF naming one of the padded rows would be wrong."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(blob)
    proto.trainer_spec.pad_id = PIECES + 5
    edited = proto.SerializeToString()
    assert spm.SentencePieceProcessor(model_proto=edited).pad_id() == -1
    out = _codestral(tmp_path / "pad", edited)
    assert _field(out, "tokenizer.ggml.padding_token_id") is None


def test_folder_with_v3_and_tokenizer_model_exports_the_v3(blob, tmp_path):
    """mistral_inference (and load_tokenizer) read tokenizer.model.v3 before tokenizer.model: the GGUF
    must carry the same vocabulary as the other backends."""
    from mamba_deploy.export.gguf_vocab import find_tokenizer_file

    other = _train(vocab_size=350, add_dummy_prefix=False)
    folder = tmp_path / "both"
    out = _codestral(folder, blob)
    (folder / "tokenizer.model").write_bytes(other)
    assert find_tokenizer_file(None, folder) == folder / "tokenizer.model.v3"
    out = export_gguf(folder, tmp_path / "both2.gguf")
    sp3 = spm.SentencePieceProcessor(model_proto=blob)
    assert _field(out, "tokenizer.ggml.tokens")[:PIECES] == [sp3.id_to_piece(i) for i in range(PIECES)]


def test_tokenizer_argument_with_a_model_suffix_is_sentencepiece(blob, sp, tmp_path):
    hf = build_hf_model("mamba2", seed=1, vocab_size=416)
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "spm" / "mine.model"
    path.parent.mkdir()
    path.write_bytes(blob)
    out = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", tokenizer=path)
    assert _field(out, "tokenizer.ggml.model") == "llama"
    assert _field(out, "tokenizer.ggml.tokens")[:PIECES] == [sp.id_to_piece(i) for i in range(PIECES)]


def test_whitespace_only_normalization_warns(tmp_path):
    """remove_extra_whitespaces alone (identity rule) changes "a  b"; llama.cpp keeps both spaces."""
    blob = _train(remove_extra_whitespaces=True)
    sp = spm.SentencePieceProcessor(model_proto=blob)
    assert sp.encode("a  b") == sp.encode("a b")  # sentencepiece collapses the spaces
    folder = tmp_path / "ws"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _codestral(folder, blob)
    assert any("not applied by llama.cpp" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- GGUF -> tokenizer

def test_gguf_without_add_space_prefix_key_prefixes_a_space(base, sp, tmp_path):
    """llama.cpp's converter writes no add_space_prefix for Llama-style models: llama.cpp then
    prepends the space (llama-vocab.cpp's default for SPM), so must our tokenizer."""
    bare = _rewrite(base, tmp_path / "bare.gguf", drop=("tokenizer.ggml.add_space_prefix",))
    want = [[sp.bos_id()] + sp.encode(t) for t in TEXTS]
    assert _encode_all(_lone(bare, tmp_path), TEXTS) == want
    if HAVE_LLAMA:
        assert _llama_encode(bare, TEXTS)[0] == want


def test_gguf_with_add_space_prefix_false(base, blob, tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    nospace = _rewrite(base, tmp_path / "ns.gguf", new={"tokenizer.ggml.add_space_prefix": (False, VT.BOOL, None)})
    proto = sentencepiece_model_pb2.ModelProto()  # the reference: sentencepiece without its dummy prefix
    proto.ParseFromString(blob)
    proto.normalizer_spec.add_dummy_prefix = False
    ref = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    want = [[ref.bos_id()] + ref.encode(t) for t in TEXTS]
    assert want[0] != [ref.bos_id()] + spm.SentencePieceProcessor(model_proto=blob).encode(TEXTS[0])
    assert _encode_all(_lone(nospace, tmp_path), TEXTS) == want
    if HAVE_LLAMA:
        assert _llama_encode(nospace, TEXTS)[0] == want


def test_lone_gguf_tokenizer_does_not_normalize(base, sp, tmp_path):
    """The GGUF came from an identity-normalized model and llama.cpp normalizes nothing: compatibility
    characters stay what they are (NFKC would make "ﬁ" "fi", full-width letters ASCII)."""
    texts = ["ﬁle ｈｅｌｌｏ", "① ™ ＡＢＣ"]
    tok = _torch_tokenizer(_lone(base, tmp_path))
    assert [tok.encode(t) for t in texts] == [[sp.bos_id()] + sp.encode(t) for t in texts]


@needs_llama
def test_requantizing_a_gguf_without_add_bos_key_keeps_llamacpps_bos(base, sp, tmp_path):
    """A 'llama' GGUF without tokenizer.ggml.add_bos_token: llama.cpp adds the BOS (its default for
    SPM); the re-quantized GGUF must ask for it explicitly, not write False."""
    bare = _rewrite(base, tmp_path / "bare.gguf", drop=("tokenizer.ggml.add_bos_token",))
    assert _llama_encode(bare, ["hello world"])[0] == [[sp.bos_id()] + sp.encode("hello world")]
    re_out = export_gguf(bare, tmp_path / "re.gguf", outtype="q8_0")
    assert _field(re_out, "tokenizer.ggml.add_bos_token") is True
    assert _llama_encode(re_out, ["hello world"])[0] == [[sp.bos_id()] + sp.encode("hello world")]


def test_gguf_vocabulary_sentencepiece_refuses_is_a_warning_not_a_crash(base, tmp_path):
    """Duplicate pieces: sentencepiece refuses the model ("... is already defined"); loading the
    GGUF for the torch backend warns and leaves the tokenizer to llama.cpp."""
    from mamba_deploy.checkpoint import load_model

    tokens = list(_field(base, "tokenizer.ggml.tokens"))
    tokens[PIECES + 3] = tokens[300]
    dup = _rewrite(base, tmp_path / "dup.gguf", new={"tokenizer.ggml.tokens": (tokens, VT.ARRAY, VT.STRING)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(_lone(dup, tmp_path))
    assert any("no equivalent outside llama.cpp" in str(w.message) for w in caught)
    assert model._tokenizer is None


def test_gguf_with_an_undefined_token_type_is_a_warning_not_a_crash(base, tmp_path):
    """GGUF token type 0 (UNDEFINED) has no SentencePiece type: a warning, not a KeyError."""
    from mamba_deploy.checkpoint import load_model

    types = [int(t) for t in _field(base, "tokenizer.ggml.token_type")]
    types[PIECES + 3] = 0
    odd = _rewrite(base, tmp_path / "odd.gguf", new={"tokenizer.ggml.token_type": (types, VT.ARRAY, VT.INT32)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(_lone(odd, tmp_path))
    assert any("no equivalent outside llama.cpp" in str(w.message) and "type 0" in str(w.message) for w in caught)
    assert model._tokenizer is None


def test_onnx_export_of_a_gguf_beside_its_sentencepiece_model_copies_that_model(blob, tmp_path):
    """A GGUF exported into the Codestral folder: the ONNX folder gets the original tokenizer.model.v3
    (byte for byte), not a rebuild from the GGUF."""
    pytest.importorskip("onnx")
    from mamba_deploy.export.onnx import export_onnx

    folder = tmp_path / "codestral"
    _codestral(folder, blob)
    inside = export_gguf(folder, folder / "m.gguf")
    out = export_onnx(inside, tmp_path / "onnx", validate=False)
    assert (out / "tokenizer.model.v3").read_bytes() == blob


# ----------------------------------------------------------------------------- control pieces in the text

def test_bos_id_zero_is_still_added(tmp_path):
    blob = _train(unk_id=3, bos_id=0, eos_id=1, pad_id=2)
    sp = spm.SentencePieceProcessor(model_proto=blob)
    assert (sp.bos_id(), sp.unk_id()) == (0, 3)
    from mamba_deploy.tokenizer import load_tokenizer

    out = _codestral(tmp_path / "bos0", blob)
    ours = load_tokenizer(tmp_path / "bos0")
    want = [sp.encode(t, add_bos=True) for t in TEXTS]
    assert [ours.encode(t) for t in TEXTS] == want
    assert _encode_all(_lone(out, tmp_path), TEXTS) == want
    if HAVE_LLAMA:
        assert _llama_encode(out, TEXTS)[0] == want


def test_whitespace_between_control_pieces_is_encoded(blob, sp, tmp_path):
    """Each text segment between control pieces is encoded, whitespace-only ones too (llama.cpp:
    a raw-text fragment " " after a special becomes "▁▁")."""
    from mamba_deploy.tokenizer import load_tokenizer

    out = _codestral(tmp_path / "ws", blob)
    ours = load_tokenizer(tmp_path / "ws")
    inst, end = sp.piece_to_id("[INST]"), sp.piece_to_id("[/INST]")
    texts = ["[INST] [/INST]", "[INST]\n[/INST]", "[INST]  [/INST]"]
    want = [[sp.bos_id(), inst] + sp.encode(t[6:-7]) + [end] for t in texts]
    assert all(len(w) > 3 for w in want)
    assert [ours.encode(t) for t in texts] == want
    if HAVE_LLAMA:
        assert _llama_encode(out, texts)[0] == want


def test_control_piece_that_extends_another_matches_whole(tmp_path):
    """"<ctl>x" and its prefix "<ctl>" both control pieces: the longer one is the token (llama.cpp
    tries special tokens longest first)."""
    from mamba_deploy.tokenizer import load_tokenizer

    blob = _train(control_symbols=["<ctl>", "<ctl>x"])
    sp = spm.SentencePieceProcessor(model_proto=blob)
    out = _codestral(tmp_path / "ctl", blob)
    ours = load_tokenizer(tmp_path / "ctl")
    long_, short = sp.piece_to_id("<ctl>x"), sp.piece_to_id("<ctl>")
    texts = ["<ctl>x", "a<ctl>xb<ctl>"]
    want = [[sp.bos_id(), long_], [sp.bos_id()] + sp.encode("a") + [long_] + sp.encode("b") + [short]]
    assert [ours.encode(t) for t in texts] == want
    if HAVE_LLAMA:
        assert _llama_encode(out, texts)[0] == want


# ----------------------------------------------------------------------------- real bugs (fixed)

def test_lone_gguf_with_custom_bos_eos_names_keeps_them(tmp_path):
    blob = _train(bos_piece="<BOS>", eos_piece="<EOS>")
    sp = spm.SentencePieceProcessor(model_proto=blob)
    assert (sp.bos_id(), sp.eos_id()) == (1, 2)
    out = _codestral(tmp_path / "names", blob)
    tok = _torch_tokenizer(_lone(out, tmp_path))
    assert (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id())  # eos: where generation stops
    assert [tok.encode(t) for t in TEXTS] == [[sp.bos_id()] + sp.encode(t) for t in TEXTS]
    if HAVE_LLAMA:
        assert _llama_encode(out, TEXTS)[0] == [[sp.bos_id()] + sp.encode(t) for t in TEXTS]


def test_lone_gguf_with_add_bos_false_adds_no_bos(base, sp, tmp_path):
    nobos = _rewrite(base, tmp_path / "nobos.gguf", new={"tokenizer.ggml.add_bos_token": (False, VT.BOOL, None)})
    want = [sp.encode(t) for t in TEXTS]
    if HAVE_LLAMA:
        assert _llama_encode(nobos, TEXTS)[0] == want
    assert _encode_all(_lone(nobos, tmp_path), TEXTS) == want


@needs_llama
def test_overlapping_control_pieces_split_as_llamacpp(tmp_path):
    from mamba_deploy.tokenizer import load_tokenizer

    blob = _train(control_symbols=["QQ", "QZZ"])
    out = _codestral(tmp_path / "ov", blob)
    ours = load_tokenizer(tmp_path / "ov")
    texts = ["QQZZ", "xQQZZ y"]
    assert [ours.encode(t) for t in texts] == _llama_encode(out, texts)[0]


def test_byte_and_unused_piece_names_in_the_text_are_text(base, blob, sp, tmp_path):
    """Only control / unknown / user-defined pieces are tokens when written in the text: "<0x41>"
    (a byte piece) and "[PAD405]" (a padded row, UNUSED) are plain text to sentencepiece and llama.cpp."""
    from mamba_deploy.tokenizer import sentencepiece_tokenizer

    texts = ["<0x41>", "a <0x0A> b", "[PAD405] x"]
    want = [[sp.bos_id()] + sp.encode(t) for t in texts]
    assert sp.piece_to_id("<0x41>") not in want[0][1:]
    assert [sentencepiece_tokenizer(blob).encode(t) for t in texts] == want
    assert _encode_all(_lone(base, tmp_path), texts) == want
    if HAVE_LLAMA:
        assert _llama_encode(base, texts)[0] == want


def test_unreadable_tokenizer_json_beside_a_sentencepiece_model_is_reported(blob, tmp_path):
    """A corrupt tokenizer.json is an error (as load_tokenizer makes it for the other backends), not
    silently replaced by the tokenizer.model beside it."""
    hf = build_hf_model("mamba2", seed=1, vocab_size=416)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(blob)
    (folder / "tokenizer.json").write_text("{ not json")
    with pytest.raises((ExportError, ModelNotFoundError), match=r"hf/tokenizer\.json"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
