"""Coverage review (forty-fifth, part A): user-facing behaviour that no test reached.

A coverage run of the whole suite left these lines of checkpoint / config / data / inputs / state /
tokenizer / export.onnx / export.gguf / export.gguf_import / export.gguf_vocab / quant unexecuted.
Each test here pins one such behaviour (a typed refusal naming the bad value, a format branch, a
fallback) and checks it against something independent of the code under test: the file or value the
test itself planted, sentencepiece's own encoder, onnx's own graph builder, the gguf package's writer.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from conftest import edited_copy, finish_gguf, rewrite_gguf


# ----------------------------------------------------------------------------- checkpoint.py

def test_tensorrt_engine_folder_is_named_as_such(tmp_path):
    """checkpoint._not_a_checkpoint's engine branch (lines 58-59): a folder holding only model.engine
    is refused naming it a TensorRT engine folder, not the generic 'is this a Mamba checkpoint'."""
    from mamba_deploy import load_model
    from mamba_deploy.errors import ModelNotFoundError

    (tmp_path / "model.engine").write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match="TensorRT engine folder"):
        load_model(tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ModelNotFoundError, match="is this a Mamba checkpoint folder") as e:
        load_model(plain)
    assert "TensorRT" not in str(e.value)


def test_generation_config_holding_a_list_is_refused(hf_checkpoint, tmp_path):
    """checkpoint line 115: a generation_config.json that parses to a JSON array (not an object) is a
    ConfigError naming the type when its end ids are read (GGUF export's eot / eom), not an
    AttributeError from .get on a list; a good one gives its ids."""
    from mamba_deploy.checkpoint import generation_end_ids
    from mamba_deploy.errors import ConfigError

    dst = tmp_path / "m"
    shutil.copytree(hf_checkpoint("mamba")[0], dst)
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    assert generation_end_ids(dst) == [0, 7]
    (dst / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds a list, not a JSON object"):
        generation_end_ids(dst)


def test_shard_index_naming_a_missing_shard_is_refused(hf_checkpoint, tmp_path):
    """checkpoint line 179: a model.safetensors.index.json whose weight_map names a shard file that is
    absent is a CheckpointError listing that file."""
    from mamba_deploy import load_model
    from mamba_deploy.errors import CheckpointError
    from safetensors import safe_open

    src = hf_checkpoint("mamba")[0]
    dst = tmp_path / "m"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    shutil.copy(src / "model.safetensors", dst / "model-00001-of-00002.safetensors")
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    wm = {k: "model-00001-of-00002.safetensors" for k in keys}
    wm[keys[-1]] = "model-00002-of-00002.safetensors"
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pytest.raises(CheckpointError, match="names missing files") as e:
        load_model(dst)
    assert "model-00002-of-00002.safetensors" in str(e.value)


def test_embedding_with_more_rows_than_the_config_allows_is_refused(hf_checkpoint, tmp_path):
    """checkpoint._pad_vocab line 487: embeddings of 128 rows under a config.json saying vocab_size 100
    (no padding multiple) are refused naming both numbers, not silently truncated."""
    from mamba_deploy import load_model
    from mamba_deploy.errors import CheckpointError

    dst = edited_copy(hf_checkpoint("mamba")[0], tmp_path / "m", "config.json", vocab_size=100)
    with pytest.raises(CheckpointError, match="has 128 vocab rows but config allows 100"):
        load_model(dst)


def test_save_checkpoint_refuses_an_unknown_format(hf_checkpoint, tmp_path):
    """checkpoint line 518: save_checkpoint(fmt='safetensors') is a ConfigError naming the bad format
    and the choices, and writes nothing."""
    from mamba_deploy import load_model
    from mamba_deploy.checkpoint import SAVE_FORMATS, save_checkpoint
    from mamba_deploy.errors import ConfigError

    m = load_model(hf_checkpoint("mamba")[0])
    with pytest.raises(ConfigError, match="unknown checkpoint format 'safetensors'") as e:
        save_checkpoint(m, tmp_path / "out", fmt="safetensors")
    assert all(f in str(e.value) for f in SAVE_FORMATS)
    assert not (tmp_path / "out").exists()


def test_revision_with_a_local_path_is_refused(hf_checkpoint):
    """checkpoint line 716: load_model(local_folder, revision='main') is a ConfigError (a revision
    means a hub id), not a silent load of the local folder."""
    from mamba_deploy import load_model
    from mamba_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="revision='main' applies to a hub id"):
        load_model(hf_checkpoint("mamba")[0], revision="main")


def test_load_model_of_a_weights_file_says_pass_the_folder(hf_checkpoint):
    """checkpoint line 757: load_model('.../model.safetensors') (a file that is neither config.json nor a
    GGUF) is a ModelNotFoundError telling to pass the folder."""
    from mamba_deploy import load_model
    from mamba_deploy.errors import ModelNotFoundError

    f = hf_checkpoint("mamba")[0] / "model.safetensors"
    with pytest.raises(ModelNotFoundError, match="is a file; pass the checkpoint folder"):
        load_model(f)


# ----------------------------------------------------------------------------- config.py

def test_unknown_arch_is_refused():
    """config.MambaConfig.__post_init__ line 143: arch='mamba3' is an UnsupportedArchitectureError
    naming it."""
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match="unknown arch 'mamba3'"):
        MambaConfig(arch="mamba3", d_model=32, n_layer=1, vocab_size=16)


@pytest.mark.parametrize("text, error, pattern", [
    ("{not json", "ConfigError", "is not valid JSON"),
    ("[1, 2, 3]", "ConfigError", "holds a list, expected a JSON object"),
    (None, "ModelNotFoundError", "no such config file"),
])
def test_config_file_errors(tmp_path, text, error, pattern):
    """config.MambaConfig.from_file lines 246, 252, 258: bad JSON, a JSON array, and a missing file are
    each refused with their own typed error naming the path."""
    from mamba_deploy import errors
    from mamba_deploy.config import MambaConfig

    path = tmp_path / "config.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(getattr(errors, error), match=pattern) as e:
        MambaConfig.from_file(path)
    assert str(path) in str(e.value)


def test_hf_config_without_hidden_size_names_the_key(hf_checkpoint, tmp_path):
    """config._from_hf line 295: an HF config.json lacking hidden_size is a ConfigError naming the key,
    not a bare KeyError."""
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import ConfigError

    d = json.loads((hf_checkpoint("mamba")[0] / "config.json").read_text())
    del d["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="lacks required key 'hidden_size'"):
        MambaConfig.from_file(tmp_path / "config.json")


def test_mamba_ssm_config_with_an_unknown_layer_is_refused(tmp_path):
    """config line 337: a mamba_ssm config.json with ssm_cfg.layer 'Mamba3' is an
    UnsupportedArchitectureError naming the layer."""
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import UnsupportedArchitectureError

    (tmp_path / "config.json").write_text(json.dumps(
        {"d_model": 32, "n_layer": 2, "vocab_size": 128, "ssm_cfg": {"layer": "Mamba3"}}))
    with pytest.raises(UnsupportedArchitectureError, match="ssm_cfg.layer 'Mamba3'"):
        MambaConfig.from_file(tmp_path / "config.json")


def test_falcon_mamba_cannot_be_saved_as_mamba_ssm(hf_checkpoint, tmp_path):
    """config.to_mamba_ssm_dict line 463: a Falcon-Mamba (dt/B/C RMSNorm) saved with fmt='mamba_ssm'
    is a ConfigError pointing at --format hf (mamba_ssm has no such layer), and no folder is left."""
    from mamba_deploy import load_model
    from mamba_deploy.checkpoint import save_checkpoint
    from mamba_deploy.errors import ConfigError

    m = load_model(hf_checkpoint("falcon_mamba")[0])
    assert m.config.dt_bc_rms
    with pytest.raises(ConfigError, match="no Falcon-Mamba"):
        save_checkpoint(m, tmp_path / "out", fmt="mamba_ssm")
    assert not (tmp_path / "out" / "config.json").exists()


# ----------------------------------------------------------------------------- data.py

def test_corpus_files_refusals(tmp_path):
    """data.corpus_files lines 63, 66, 78: an unknown split, a root folder that does not exist, and a
    root with no .py files are each refused naming the value."""
    from mamba_deploy.data import corpus_files
    from mamba_deploy.errors import ConfigError, ModelNotFoundError

    with pytest.raises(ConfigError, match="unknown split 'test'"):
        corpus_files("test", tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        corpus_files("train", tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="no .py files for split 'train'"):
        corpus_files("train", tmp_path)


def test_encode_split_needs_an_eos(tmp_path):
    """data.encode_split line 160: a tokenizer without an eos token (nothing to separate the files with)
    is a ConfigError naming the tokenizer, not a corpus joined with None."""
    from mamba_deploy.data import encode_split, split_of
    from mamba_deploy.errors import ConfigError

    name = next(f"m{i}.py" for i in range(100) if split_of(f"m{i}.py") == "train")
    (tmp_path / name).write_text("x = 1\n")

    class NoEos:
        eos_token_id = None

        def encode(self, text):
            return [1]

    with pytest.raises(ConfigError, match="NoEos has no eos"):
        encode_split(NoEos(), "train", root=tmp_path, progress=False)


# ----------------------------------------------------------------------------- inputs.py / state.py

def test_check_ids_refuses_float_arrays_and_ragged_lists():
    """inputs.check_ids lines 24, 30-33: a float numpy array is a ShapeError naming its dtype, a ragged
    list (no tensor) a ShapeError naming its type; a good int32 array passes as int64."""
    from mamba_deploy.errors import ShapeError
    from mamba_deploy.inputs import check_ids

    with pytest.raises(ShapeError, match="float32"):
        check_ids(np.zeros((1, 3), np.float32), 2, 16)
    with pytest.raises(ShapeError, match="got list"):
        check_ids([[1, 2], [3]], 2, 16)
    out = check_ids(np.array([[1, 2, 3]], np.int32), 2, 16)
    assert out.dtype == torch.int64 and out.tolist() == [[1, 2, 3]]


def test_state_select_refusals_and_check():
    """state.State lines 51, 93-96, 108-110: batch_size reads dim 1; select('a') and select([0.5]) /
    select(True) are ShapeErrors naming the index or its dtype; check() on a consumed state and on a
    state whose fields are not tensors is a ShapeError."""
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import ShapeError
    from mamba_deploy.state import CONSUMED, State

    cfg = MambaConfig(arch="mamba1", d_model=8, n_layer=2, vocab_size=16, d_state=4)
    s = State.zeros(cfg, 3)
    assert s.batch_size == 3
    with pytest.raises(ShapeError, match="select takes row indices"):
        s.select("a")
    with pytest.raises(ShapeError, match="integer row indices, got torch.float32"):
        s.select([0.5])
    with pytest.raises(ShapeError, match="integer row indices, got torch.bool"):
        s.select(True)
    assert s.select([2, 0]).conv.shape[1] == 2
    s.check(cfg, 3)
    s.consumed = True
    with pytest.raises(ShapeError) as e:
        s.check(cfg, 3)
    assert str(e.value) == CONSUMED
    with pytest.raises(ShapeError, match="must be tensors"):
        State(s.conv.tolist(), s.ssm).check(cfg, 3)


# ----------------------------------------------------------------------------- tokenizer.py

def test_load_tokenizer_of_no_folder():
    """tokenizer.load_tokenizer line 327: a model with no source folder (None) is a ModelNotFoundError
    saying to give token ids."""
    from mamba_deploy.errors import ModelNotFoundError
    from mamba_deploy.tokenizer import load_tokenizer

    with pytest.raises(ModelNotFoundError, match="no source folder"):
        load_tokenizer(None)


def test_sentencepiece_encode_batch_and_add_eos():
    """tokenizer line 493 (add_eos): a SentencePiece tokenizer's encode_batch equals
    sentencepiece's own encode of each text with the BOS; with add_eos=True the EOS is appended (as
    llama.cpp does for add_eos_token) and only when special tokens are added."""
    spm = pytest.importorskip("sentencepiece")
    from test_gguf_spm import _train

    from mamba_deploy.tokenizer import sentencepiece_tokenizer

    blob = _train()
    sp = spm.SentencePieceProcessor(model_proto=blob)
    texts = ["the cat sat", "a dog ran far"]
    tok = sentencepiece_tokenizer(blob)
    want = [[sp.bos_id()] + sp.encode(t) for t in texts]
    assert tok.encode_batch(texts) == want
    tok_eos = sentencepiece_tokenizer(blob, add_eos=True)
    assert sp.eos_id() >= 0
    assert tok_eos.encode_batch(texts) == [w + [sp.eos_id()] for w in want]
    assert tok_eos.encode(texts[0], add_special_tokens=False) == sp.encode(texts[0])


# ----------------------------------------------------------------------------- export/onnx.py

def _onnx_model(nodes, inputs, outputs, **graph_kw):
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in outputs], **graph_kw)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_check_graph_finds_a_disallowed_op_inside_an_if_branch(tmp_path):
    """export.onnx.check_graph lines 215-220 (graph_op_types' subgraph walk): an op outside the allow-list (Tanh)
    hidden in an If node's branch subgraph is found and named; the same graph with Relu -> an allowed
    op in the branch passes. A graph onnx.checker rejects (an undefined input) is refused (216)."""
    import onnx
    from onnx import TensorProto, helper

    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.onnx import ALLOWED_OPS, check_graph

    assert "Tanh" not in ALLOWED_OPS and "Sigmoid" in ALLOWED_OPS

    def with_branch(op):
        branch = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "b", [],
                                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
        g = helper.make_graph([helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=branch)], "g",
                              [cond, helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    bad, good = tmp_path / "bad.onnx", tmp_path / "good.onnx"
    onnx.save(with_branch("Tanh"), bad)
    onnx.save(with_branch("Sigmoid"), good)
    check_graph(good)
    with pytest.raises(ExportError, match="outside the allow-list") as e:
        check_graph(bad)
    assert "Tanh" in str(e.value)
    broken = tmp_path / "broken.onnx"
    onnx.save(_onnx_model([helper.make_node("Add", ["a", "nope"], ["b"])], ["a"], ["b"]), broken)
    with pytest.raises(ExportError, match="fails onnx.checker"):
        check_graph(broken)


def test_onnx_export_folder_without_its_manifest(onnx_export, tmp_path):
    """export.onnx.read_manifest line 411: an export folder whose manifest.json was deleted is a
    ModelNotFoundError saying to export it, not a FileNotFoundError; the intact copy opens."""
    from mamba_deploy.errors import ModelNotFoundError
    from mamba_deploy.export.onnx import open_export_folder

    dst = tmp_path / "exp"
    shutil.copytree(onnx_export("mamba")[0], dst)
    open_export_folder(dst)  # intact: opens
    (dst / "manifest.json").unlink()
    with pytest.raises(ModelNotFoundError, match="no manifest.json; export it"):
        open_export_folder(dst)


# ----------------------------------------------------------------------------- export/gguf.py

@pytest.mark.parametrize("kw, words", [
    (dict(arch="mamba1", bias=True), "in_proj/out_proj biases"),
    (dict(arch="mamba2", rmsnorm=False, headdim=16), "without the gated RMSNorm"),
    (dict(arch="mamba2", norm_before_gate=True, headdim=16), "norm_before_gate=True"),
])
def test_gguf_export_refuses_variants_llamacpp_cannot_run(kw, words):
    """export.gguf.check_exportable lines 175, 179, 181: biases, a Mamba2 without the gated norm and a
    Mamba2 norming before the gate are ExportErrors naming the variant; the plain configs pass."""
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.gguf import check_exportable

    base = dict(d_model=32, n_layer=1, vocab_size=16)
    check_exportable(MambaConfig(**base, **{k: v for k, v in kw.items() if k in ("arch", "headdim")}))
    with pytest.raises(ExportError, match="llama.cpp cannot run") as e:
        check_exportable(MambaConfig(**base, **kw))
    assert words in str(e.value)


# ----------------------------------------------------------------------------- export/gguf_import.py

def _copy_without(src, dst, skip):
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch=r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name != skip:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    finish_gguf(w)
    return dst


def test_gguf_without_token_embd_is_refused(tiny_gguf, tmp_path):
    """export.gguf_import line 108: a GGUF (written here with the gguf package) lacking token_embd.weight
    is a CheckpointError naming the tensor."""
    from mamba_deploy import load_model
    from mamba_deploy.errors import CheckpointError

    dst = _copy_without(tiny_gguf, tmp_path / "noembd.gguf", "token_embd.weight")
    with pytest.raises(CheckpointError, match="no token_embd.weight tensor"):
        load_model(dst)


@pytest.mark.parametrize("rows, pattern", [(100, "token_embd.weight: file \\(100, 32\\) vs config \\(128, 32\\)"),
                                           (140, "token_embd.weight: file \\(140, 32\\) vs config \\(128, 32\\)")])
def test_gguf_embedding_rows_against_the_vocabulary(tiny_gguf, tmp_path, rows, pattern):
    """export.gguf_import's shape check (line 297; it runs before _fit_rows, whose lines 304 / 309 it
    makes unreachable for a file's own vocabulary): an embedding tensor (written here with the gguf
    package) with fewer or more rows than the file's vocabulary metadata is a CheckpointError naming
    the tensor and both shapes, not a silently padded or truncated embedding."""
    import gguf

    from mamba_deploy import load_model
    from mamba_deploy.errors import CheckpointError

    r = gguf.GGUFReader(str(tiny_gguf))
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    d = int(emb.shape[0])  # gguf shapes are innermost-first: (d_model, vocab)
    arr = np.random.default_rng(0).standard_normal((rows, d)).astype(np.float32)
    dst = rewrite_gguf(tiny_gguf, tmp_path / "e.gguf", tensors={"token_embd.weight": arr})
    with pytest.raises(CheckpointError, match=pattern):
        load_model(dst)


def test_gguf_tensor_of_the_wrong_shape_is_named(tiny_gguf, tmp_path):
    """export.gguf_import lines 242-249: a layer tensor whose size does not fit the config (blk.0.ssm_d
    with 3 values) is a CheckpointError naming the tensor and both shapes."""
    import gguf

    from mamba_deploy import load_model
    from mamba_deploy.errors import CheckpointError

    names = [t.name for t in gguf.GGUFReader(str(tiny_gguf)).tensors]
    assert "blk.0.ssm_d" in names
    dst = rewrite_gguf(tiny_gguf, tmp_path / "d.gguf", tensors={"blk.0.ssm_d": np.ones(3, np.float32)})
    with pytest.raises(CheckpointError) as e:
        load_model(dst)
    assert "ssm_d" in str(e.value) or "D" in str(e.value)
    assert "3" in str(e.value)


# ----------------------------------------------------------------------------- export/gguf_vocab.py

def test_read_vocab_warns_about_normalizer_and_prefix_space(tiny_tokenizer, tmp_path):
    """export.gguf_vocab._llamacpp_gaps lines 184-192: a tokenizer.json with a Lowercase normalizer (in
    a Sequence with NFC) and a ByteLevel pre-tokenizer adding a prefix space warns naming both; NFC
    alone (what text nearly always is) stays quiet."""
    from mamba_deploy.export.gguf_vocab import read_vocab

    tj = json.loads((tiny_tokenizer / "tokenizer.json").read_text())

    def vocab_warnings(edit):
        d = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "tokenizer.json").write_text(json.dumps({**tj, **edit}))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            read_vocab(d / "tokenizer.json", 128)
        return " | ".join(str(x.message) for x in w)

    pre = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    said = vocab_warnings({"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]},
                           "pre_tokenizer": pre})
    assert "normalizer Lowercase" in said and "NFC" not in said.split("normalizer")[1].split(",")[0]
    assert "add_prefix_space" in said
    quiet = vocab_warnings({"normalizer": {"type": "NFC"}, "pre_tokenizer": {**pre, "add_prefix_space": False}})
    assert "normalizer" not in quiet and "add_prefix_space" not in quiet


# ----------------------------------------------------------------------------- quant/

def _tiny_model(hf_checkpoint):
    from mamba_deploy import load_model

    return load_model(hf_checkpoint("mamba")[0])


@pytest.mark.parametrize("kw, pattern", [
    (dict(method="int8", group_size=32), "group_size=32 applies to the 4-bit methods"),
    (dict(method="fp8", fp8_scaling="row"), "fp8_scaling 'row' unknown"),
    (dict(method="int8", include=["conv1d"]), "cannot include \\['conv1d'\\]"),
])
def test_quantize_option_refusals(hf_checkpoint, kw, pattern):
    """quant.plan lines 77, 80, 110: group_size with a per-channel method, an unknown fp8 scaling and an
    unknown optional module are QuantizationErrors naming the value."""
    from mamba_deploy.errors import QuantizationError
    from mamba_deploy.quant import quantize

    with pytest.raises(QuantizationError, match=pattern):
        quantize(_tiny_model(hf_checkpoint), **kw)


def test_rules_must_be_objects_and_already_quantized_is_refused(hf_checkpoint, tmp_path):
    """quant.plan lines 160, 173 and quantizer line 41: a rules file that is a JSON array, and a rule
    that is not an object with known keys, are QuantizationErrors; quantizing an already quantized model
    is refused; exporting a float model as quantized ONNX is refused (onnx_nbits line 79)."""
    from mamba_deploy.errors import QuantizationError
    from mamba_deploy.quant import quantize

    m = _tiny_model(hf_checkpoint)
    with pytest.raises(QuantizationError, match="must be a JSON object"):
        quantize(m, method="int8", rules=[1, 2])
    with pytest.raises(QuantizationError, match="must be an object with keys enable"):
        quantize(m, method="int8", rules={"quant_cfg": {"*in_proj": {"bits": 4}}})
    q = quantize(m, method="int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(q, method="int8")
    from mamba_deploy.quant.onnx_nbits import export_quantized_onnx

    with pytest.raises(QuantizationError, match="needs a quantized model"):
        export_quantized_onnx(_tiny_model(hf_checkpoint), tmp_path / "o")
