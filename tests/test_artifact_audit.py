"""Adversarial audit of the artifacts the toolkit reads: checkpoint folders (weights, shard
indexes, .bin pickles, config dialects), GGUF files, quantized checkpoints, ONNX export folders
and chat templates, each broken as a user (or a bad download, or a hand edit) could break it.

Each case must end in a typed error from mamba_deploy.errors naming the offending value or file
and the fix: never a raw exception from deep inside (AttributeError, TypeError, numpy's reshape,
torch's allocator), never a silent wrong model, and never an allocation of the size an edited
number asks for before the weights have been checked against it.

NaN / inf weights are refused (not warned about) in every format, as the HF loader already did:
a Mamba layer carries its state from token to token, so one non-finite value turns every later
logit into NaN; no usable checkpoint has one. Values that become infinite only in the dtype the
model is loaded in (float32 weights past 65504 loaded as float16) are refused the same way, with
the dtypes that hold them as the fix.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import rewrite_gguf
from mamba_deploy import load_model
from mamba_deploy.cli import main as cli_main
from mamba_deploy.errors import (CheckpointError, ConfigError, ExportError, ModelNotFoundError, QuantizationError,
                                 UnsupportedArchitectureError)

gguf = pytest.importorskip("gguf")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder, fn, name="model.safetensors"):
    path = folder / name
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(folder, fn, name="config.json"):
    path = folder / name
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def _logits(model, seed=0):
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------------------- weights in HF folders

D = "backbone.layers.0.mixer.D"
IN_PROJ = "backbone.layers.0.mixer.in_proj.weight"


@pytest.mark.parametrize("key,dtype", [(D, torch.int64), (D, torch.bool), (IN_PROJ, torch.uint8),
                                       (D, torch.float8_e4m3fn), (D, torch.complex64)],
                         ids=["int64", "bool", "uint8", "fp8", "complex"])
def test_weights_stored_as_non_floats_are_refused(hf_checkpoint, tmp_path, capsys, key, dtype):
    """Integer codes (another tool's quantization), booleans, fp8 without scales or complex values
    were cast to float and loaded as weights (fp8: a NotImplementedError from torch.isfinite)."""
    folder = _copy(hf_checkpoint("mamba")[0], tmp_path / "m")
    _edit_weights(folder, lambda sd: sd.__setitem__(key, sd[key].to(dtype)))
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"{key} \({name}\), not as floats.*float16, bfloat16 or float32"):
        load_model(folder)
    assert cli_main(["inspect", str(folder)]) == 2  # the header check sees the stored dtype too
    assert f"{key} ({name})" in capsys.readouterr().err


def test_float64_weights_still_load(hf_checkpoint, tmp_path):
    src, hf = hf_checkpoint("mamba")
    folder = _copy(src, tmp_path / "m")
    _edit_weights(folder, lambda sd: sd.update({k: v.double() for k, v in sd.items()}))
    assert torch.allclose(_logits(load_model(folder)), _logits(load_model(src)), atol=1e-6)


def test_values_beyond_the_load_dtype_are_refused(hf_checkpoint, tmp_path, capsys):
    """A float32 weight of 1e5 loaded in float16 became inf (every logit NaN), silently; convert
    --dtype float16 wrote it so."""
    folder = _copy(hf_checkpoint("mamba")[0], tmp_path / "m")
    _edit_weights(folder, lambda sd: sd[D].__setitem__(0, 1e5))
    assert torch.isfinite(_logits(load_model(folder))).all()  # fine in float32
    with pytest.raises(CheckpointError, match=rf"{D} beyond float16's range.*float32 or bfloat16"):
        load_model(folder, dtype=torch.float16)
    assert cli_main(["convert", str(folder), str(tmp_path / "half"), "--dtype", "float16"]) == 2
    assert "float16's range" in capsys.readouterr().err and not (tmp_path / "half").exists()
    _edit_weights(folder, lambda sd: sd.__setitem__(D, sd[D].double() * 1e300))  # past float32 as well
    with pytest.raises(CheckpointError, match=rf"{D} beyond float32's range.*corrupt"):
        load_model(folder)


def test_tied_config_with_a_different_lm_head_is_refused(hf_checkpoint, tmp_path):
    """config.json ties the head to the embeddings but the file holds its own lm_head.weight: it
    was copied over the shared embeddings (whichever came last won), silently."""
    src, _ = hf_checkpoint("mamba")
    assert load_model(src).config.tie_embeddings
    same = _copy(src, tmp_path / "same")  # a saver that writes the tied copy too: fine
    _edit_weights(same, lambda sd: sd.__setitem__("lm_head.weight", sd["backbone.embeddings.weight"].clone()))
    assert torch.equal(_logits(load_model(same)), _logits(load_model(src)))
    other = _copy(src, tmp_path / "other")
    _edit_weights(other, lambda sd: sd.__setitem__("lm_head.weight", torch.randn(128, 32)))
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings=true.*lm_head\.weight that differs.*set "
                                              r"tie_word_embeddings to false"):
        load_model(other)


@pytest.mark.parametrize("content,named", [
    ([1, 2], "is a list"),
    ({1: torch.zeros(1)}, "is a dict holding other things than name -> tensor"),
    ({D: [1.0, 2.0]}, "is a dict holding other things than name -> tensor"),
    ({"state_dict": {D: torch.zeros(64)}}, "is a training checkpoint with the weights under 'state_dict'"),
], ids=["list", "int-keys", "non-tensor", "nested"])
def test_bin_that_is_not_a_state_dict_is_refused(hf_checkpoint, tmp_path, content, named):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(hf_checkpoint("mamba")[0] / "config.json", folder)
    torch.save(content, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"pytorch_model\.bin {named}.*model\.state_dict\(\)"):
        load_model(folder)


# ----------------------------------------------------------------------------- shard indexes

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded(hf_checkpoint, tmp_path_factory):
    from mamba_deploy import save_checkpoint

    src, _ = hf_checkpoint("mamba")
    out = save_checkpoint(load_model(src), tmp_path_factory.mktemp("sharded") / "m", max_shard_bytes=20_000)
    return out, _logits(load_model(src))


def _index_edit(fn):
    def edit(folder):
        path = folder / INDEX
        path.write_text(json.dumps(fn(json.loads(path.read_text()))))
    return edit


def _replace(folder, name, make):
    (folder / name).unlink()
    make(folder / name)


@pytest.mark.parametrize("damage", [
    _index_edit(lambda j: [j]),
    _index_edit(lambda j: {"weight_map": None}),
    _index_edit(lambda j: {"weight_map": list(j["weight_map"].items())}),
    _index_edit(lambda j: {"weight_map": {k: 1 for k in j["weight_map"]}}),
    lambda f: (f / INDEX).write_bytes(b"\xff\xfe{}"),
    lambda f: _replace(f, INDEX, lambda p: p.mkdir()),
], ids=["list", "map-null", "map-list", "map-ints", "not-utf8", "folder"])
def test_malformed_shard_index_is_a_checkpoint_error(sharded, tmp_path, damage):
    """Each was an AttributeError, TypeError, UnicodeDecodeError or IsADirectoryError."""
    folder = _copy(sharded[0], tmp_path / "m")
    assert torch.equal(_logits(load_model(folder)), sharded[1])  # the copy itself is fine
    damage(folder)
    with pytest.raises(CheckpointError, match=rf"{INDEX} is not a valid shard index.*re-save the checkpoint"):
        load_model(folder)


@pytest.mark.parametrize("where", ["/abs", "../up"])
def test_shard_index_naming_files_outside_its_folder_is_refused(sharded, hf_checkpoint, tmp_path, where):
    """It read the weights of whatever file the index pointed to, anywhere on the disk."""
    folder = _copy(sharded[0], tmp_path / "m")
    elsewhere = _copy(hf_checkpoint("mamba")[0], tmp_path / "elsewhere") / "model.safetensors"
    name = str(elsewhere) if where == "/abs" else "../elsewhere/model.safetensors"
    _index_edit(lambda j: {"weight_map": {k: name for k in j["weight_map"]}})(folder)
    with pytest.raises(CheckpointError, match=rf"names files outside {folder}.*model\.safetensors"):
        load_model(folder)


def test_shard_index_is_what_is_read(sharded, tmp_path):
    """The index decides which shard a tensor is read from: a stale second copy in another shard
    was loaded over the indexed one (whichever came last), and an index entry its shard does not
    hold went unnoticed."""
    folder = _copy(sharded[0], tmp_path / "m")
    index = json.loads((folder / INDEX).read_text())["weight_map"]
    shards = sorted(set(index.values()))
    key = next(k for k, f in index.items() if f == shards[0])
    _edit_weights(folder, lambda sd: sd.__setitem__(key, torch.full_like(load_file(folder / shards[0])[key], 7.0)),
                  name=shards[1])  # a stale copy of `key` in another shard
    assert torch.equal(_logits(load_model(folder)), sharded[1])
    _index_edit(lambda j: {**j, "weight_map": {**j["weight_map"], "backbone.extra.x": shards[0]}})(folder)
    with pytest.raises(CheckpointError, match=rf"assigns backbone\.extra\.x to {shards[0]}, which does not hold"):
        load_model(folder)


# ----------------------------------------------------------------------------- sizes before allocation

LAYERS = 20_000  # the old loaders built this many layers (~20 s) before reporting missing tensors


@pytest.mark.parametrize("how", ["load", "inspect", "quantized"])
def test_config_deeper_than_its_weights_fails_before_building(hf_checkpoint, tmp_path, capsys, how):
    """An edited num_hidden_layers (a typo of 10**9 took all the memory) is refused from the
    weights' tensor names before any model of that depth is built."""
    src, _ = hf_checkpoint("mamba")
    if how == "quantized":
        from mamba_deploy.quant import quantize, save_quantized

        folder = save_quantized(quantize(load_model(src), "int8", progress=False), tmp_path / "q")
    else:
        folder = _copy(src, tmp_path / "m")
    _edit_config(folder, lambda c: c.update(num_hidden_layers=LAYERS))
    start = time.monotonic()
    needle = f"num_hidden_layers={LAYERS}, but the weights hold 2 layers"
    if how == "inspect":
        assert cli_main(["inspect", str(folder)]) == 2
        assert needle in capsys.readouterr().err
    else:
        with pytest.raises(CheckpointError, match=needle):
            load_model(folder)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("path", ["~no_such_user_0x7f/model", "/tmp/" + "a" * 5000],
                         ids=["unknown-user", "name-too-long"])
def test_model_path_that_cannot_be_a_path_is_typed(path):
    """RuntimeError from Path.expanduser, OSError (ENAMETOOLONG) from Path.exists."""
    with pytest.raises(ModelNotFoundError, match="cannot use the model path"):
        load_model(path)


# ----------------------------------------------------------------------------- config dialects

def test_mamba_ssm_d_ssm_narrower_than_the_layer_is_unsupported(hf_checkpoint, tmp_path):
    """mamba_ssm's Mamba2 d_ssm < d_inner (SSM on part of the width, a gated MLP on the rest) was
    ignored: the weights then failed as 'does not match its config.json' (or a matching file
    loaded as another model)."""
    from mamba_deploy import save_checkpoint

    out = save_checkpoint(load_model(hf_checkpoint("mamba2")[0]), tmp_path / "ssm", fmt="mamba_ssm")
    _edit_config(out, lambda c: c["ssm_cfg"].update(d_ssm=64))  # = expand * d_model: the plain layer
    want = _logits(load_model(out))
    _edit_config(out, lambda c: c["ssm_cfg"].update(d_ssm=32))
    with pytest.raises(UnsupportedArchitectureError, match=r"ssm_cfg\.d_ssm=32 .* not supported"):
        load_model(out)
    assert want.shape == (2, 9, 128)


def test_config_messages_name_the_file_and_the_fix(hf_checkpoint, tmp_path):
    folder = _copy(hf_checkpoint("mamba2")[0], tmp_path / "m")
    _edit_config(folder, lambda c: c.update(time_step_limit=[0.0, {"__float__": "abc"}]))
    with pytest.raises(ConfigError, match=rf"{folder / 'config.json'}: cannot read float encoding.*re-download"):
        load_model(folder)
    _edit_config(folder, lambda c: c.update(time_step_limit=[0.0, {"__float__": "Infinity"}], n_groups=3))
    with pytest.raises(ConfigError, match=r"not a multiple of ngroups=3; check n_groups"):
        load_model(folder)


# ----------------------------------------------------------------------------- GGUF

T = None if gguf is None else gguf.GGUFValueType


@pytest.fixture(scope="module")
def gguf_file(ckpt, tmp_path_factory):
    from mamba_deploy.export.gguf import export_gguf

    cache = {}

    def make(kind="mamba2"):
        if kind not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[kind] = export_gguf(ckpt(kind)[0], tmp_path_factory.mktemp("gguf") / f"{kind}.gguf")
        return cache[kind]

    return make


def _bad_gguf(gguf_file, tmp_path, kind="mamba2", **kw):
    (tmp_path / "g").mkdir(exist_ok=True)
    return rewrite_gguf(gguf_file(kind), tmp_path / "g" / "m.gguf", **kw)


@pytest.mark.parametrize("value", [(["mamba2"], "ARRAY", "STRING"), ([1], "ARRAY", "UINT32")],
                         ids=["str-array", "int-array"])
def test_gguf_architecture_that_is_not_a_string(gguf_file, tmp_path, value):
    """general.architecture stored as an array: TypeError (unhashable list)."""
    arch = (value[0], getattr(T, value[1]), getattr(T, value[2]))
    path = _bad_gguf(gguf_file, tmp_path, arch=arch)
    with pytest.raises(UnsupportedArchitectureError, match=rf"GGUF architecture {value[0]!r}".replace("[", r"\[")):
        load_model(path)


@pytest.mark.parametrize("key,value,needle", [
    ("mamba2.block_count", LAYERS, f"mamba2.block_count={LAYERS}, but the weights hold 2 layers"),
    ("mamba2.embedding_length", 2**30, rf"token_embd\.weight: file \(128, 32\) vs config \(128, {2**30}\)"),
    ("mamba2.ssm.inner_size", 2**30, r"blk\.0\.ssm_in\.weight: file \(164, 32\) vs config"),
], ids=["block_count", "embedding_length", "inner_size"])
def test_gguf_sizes_are_checked_before_allocating(gguf_file, tmp_path, key, value, needle):
    """The model was allocated at the metadata's sizes before any tensor was compared: 2**30
    wide was a RuntimeError from torch's allocator, 20000 layers ~20 s of building (10**9: all
    the memory)."""
    path = _bad_gguf(gguf_file, tmp_path, edit={key: value})
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=needle):
        load_model(path)
    assert time.monotonic() - start < 10


def test_gguf_vocab_larger_than_its_embedding_is_refused(gguf_file, tmp_path):
    """mamba_deploy.vocab_size 200 over 128 embedding rows: ids 128..199 got zero rows (logits of
    exactly 0), silently; the HF loader refuses the same case."""
    path = _bad_gguf(gguf_file, tmp_path, edit={"mamba_deploy.vocab_size": 200})
    with pytest.raises(CheckpointError, match=r"vocab_size=200\).*token_embd\.weight: file \(128, 32\) vs config "
                                              r"\(200, 32\)"):
        load_model(path)


@pytest.mark.parametrize("backend", ["torch", "llama.cpp"])
def test_gguf_vocab_smaller_than_its_embedding_is_refused_on_every_backend(gguf_file, tmp_path, backend):
    """mamba_deploy.vocab_size 100 over 128 embedding rows: the torch backend refused it, while the
    llama.cpp runner took the metadata's vocabulary and masked the logits past id 100, so it
    generated other text from the same file."""
    if backend == "llama.cpp":
        pytest.importorskip("llama_cpp")
    from mamba_deploy.runners import open_runner

    path = _bad_gguf(gguf_file, tmp_path, edit={"mamba_deploy.vocab_size": 100})
    with pytest.raises(CheckpointError, match=r"vocab_size=100\).*token_embd\.weight: file \(128, 32\) vs config "
                                              r"\(10\d, 32\)"):
        open_runner(path, backend)


@pytest.mark.parametrize("shape", [(96,), (96, 2, 4)], ids=["1d", "3d"])
def test_gguf_tensor_of_an_impossible_shape(gguf_file, tmp_path, shape):
    """A conv tensor of another rank: numpy's 'cannot reshape array' ValueError."""
    path = _bad_gguf(gguf_file, tmp_path, tensors={"blk.0.ssm_conv1d.weight": np.zeros(shape, np.float32)})
    with pytest.raises(CheckpointError, match=r"blk\.0\.ssm_conv1d\.weight: file .* vs config \(96, 1, 4\)"):
        load_model(path)


@pytest.mark.parametrize("name,value,needle", [
    ("blk.0.ssm_in.weight", np.full((164, 32), np.nan, np.float32), r"\['blk\.0\.ssm_in\.weight'\]: the file is"),
    ("blk.0.ssm_a", np.ones((4, 1), np.float32), r"\['blk\.0\.ssm_a'\] \(an ssm_a holds -exp"),
], ids=["nan", "positive-A"])
def test_gguf_non_finite_weights_are_refused(gguf_file, tmp_path, name, value, needle):
    """Both loaded silently: NaN weights, and a positive ssm_a whose log is NaN (every logit NaN)."""
    path = _bad_gguf(gguf_file, tmp_path, tensors={name: value})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's 'invalid value encountered in log' stays inside
        with pytest.raises(CheckpointError, match=needle + ".*corrupt"):
            load_model(path)


def test_gguf_values_beyond_float16_are_refused(gguf_file, tmp_path):
    value = np.ones((4, 1), np.float32)
    value[0] = 1e5
    path = _bad_gguf(gguf_file, tmp_path, tensors={"blk.0.ssm_d": value})
    assert torch.isfinite(_logits(load_model(path))).all()
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.0\.mixer\.D'\] beyond float16's range.*bfloat16"):
        load_model(path, dtype=torch.float16)


@pytest.mark.parametrize("key,value", [("tokenizer.ggml.merges", ([1, 2], "ARRAY", "UINT32")),
                                       ("tokenizer.ggml.tokens", (["a", "b"], "ARRAY", "STRING"))],
                         ids=["merges-ints", "tokens-short"])
def test_gguf_tokenizer_metadata_of_the_wrong_kind(gguf_file, tmp_path, key, value):
    """Integer merges were an AttributeError ('int' has no split) from load_model; now, as for any
    tokenizer without a tokenizers equivalent, the model loads with a warning naming the key, and
    re-exporting the file (which copies its vocabulary) is an ExportError writing nothing."""
    path = _bad_gguf(gguf_file, tmp_path, edit={key: (value[0], getattr(T, value[1]), getattr(T, value[2]))})
    with pytest.warns(UserWarning, match=key.split(".")[-1]):
        model = load_model(path)
    assert model.config.n_layer == 2
    from mamba_deploy.export.gguf import export_gguf

    with pytest.raises(ExportError, match=rf"tokenizer\.ggml\.{key.split('.')[-1]}.*re-export"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the load's warning, as above
        export_gguf(path, tmp_path / "again.gguf")
    assert not (tmp_path / "again.gguf").exists()


# ----------------------------------------------------------------------------- quantized checkpoints

@pytest.fixture(scope="module")
def quantized(hf_checkpoint, tmp_path_factory):
    from mamba_deploy.quant import quantize, save_quantized

    src, _ = hf_checkpoint("mamba2")
    return save_quantized(quantize(load_model(src), "int4", group_size=32, progress=False),
                          tmp_path_factory.mktemp("quant") / "q")


@pytest.mark.parametrize("module", ["backbone.layers.0.mixer", "backbone.layers.0.mixer.conv1d", "backbone.norm_f",
                                    ""], ids=["mixer", "conv1d", "norm", "root"])
def test_quantization_config_naming_a_layer_that_is_not_linear(quantized, tmp_path, module):
    """An AttributeError ('Mamba2Mixer' object has no attribute 'in_features')."""
    folder = _copy(quantized, tmp_path / "q")
    _edit_config(folder, lambda c: c["quantization_config"]["modules"].update({module: {"format": "int8"}}))
    with pytest.raises(QuantizationError, match=rf"module {module!r} is not a Linear or Embedding layer.*"
                                                "mamba-deploy quantize"):
        load_model(folder)


@pytest.mark.parametrize("edit,needle", [
    (lambda q: q.update(method=["int4"]), r"method=\['int4'\] unknown"),
    (lambda q: q["modules"]["backbone.layers.0.mixer.in_proj"].update(format=["int4"]), r"'format': one of"),
], ids=["method-list", "format-list"])
def test_quantization_config_values_of_the_wrong_type(quantized, tmp_path, edit, needle):
    """TypeError: unhashable type: 'list'."""
    folder = _copy(quantized, tmp_path / "q")
    _edit_config(folder, lambda c: edit(c["quantization_config"]))
    with pytest.raises(QuantizationError, match=needle):
        load_model(folder)


def test_quantized_float_tensor_stored_as_integers_is_refused(quantized, tmp_path):
    """D (a float parameter) stored as int64, or int4 scales as int32, were cast and loaded."""
    folder = _copy(quantized, tmp_path / "q")
    _edit_weights(folder, lambda sd: sd.__setitem__(D, sd[D].long()))
    with pytest.raises(CheckpointError, match=rf"{D}: file \(4,\) torch\.int64 vs expected \(4,\) torch\.float32"):
        load_model(folder)


def test_quantized_config_sizes_are_checked_before_allocating(hf_checkpoint, tmp_path):
    """A quantized checkpoint built its model at the config's sizes before comparing any tensor:
    hidden_size 2**30 was a RuntimeError from torch's allocator (and a size that fits the
    address space but not the memory, the OOM killer). Now the file headers are checked first.
    (Past 2**31 - 1 a size is refused as such, by the config check.)"""
    from mamba_deploy.quant import quantize, save_quantized

    folder = save_quantized(quantize(load_model(hf_checkpoint("mamba")[0]), "int8", progress=False), tmp_path / "q")
    _edit_config(folder, lambda c: c.update(hidden_size=2**30))
    with pytest.raises(CheckpointError, match=r"backbone\.embeddings\.weight: file \(128, 32\) .* vs expected "
                                              rf"\(128, {2**30}\)"):
        load_model(folder)


# ----------------------------------------------------------------------------- ONNX export folders

@pytest.mark.parametrize("damage", [lambda p: (p.unlink(), p.mkdir()), lambda p: p.write_bytes(b"\xff\xfe{}")],
                         ids=["folder", "not-utf8"])
def test_onnx_manifest_that_cannot_be_read(onnx_export, tmp_path, damage):
    """IsADirectoryError / UnicodeDecodeError from read_text."""
    from mamba_deploy.runners import open_runner

    folder = _copy(onnx_export("mamba")[0], tmp_path / "o")
    damage(folder / "manifest.json")
    with pytest.raises(ExportError, match=r"manifest\.json .*re-export the model"):
        open_runner(folder)


# ----------------------------------------------------------------------------- chat templates

def test_broken_chat_template_of_the_model_names_its_source(ckpt, tmp_path, capsys):
    """'the chat template failed: TemplateSyntaxError ...' named neither where the template came
    from nor what to do; a template the caller gave stays reported as before."""
    from mamba_deploy.chat import ChatTemplateError, chat_ids
    from mamba_deploy.tokenizer import load_tokenizer

    folder = _copy(ckpt("mamba")[0], tmp_path / "m")
    _edit_config(folder, lambda c: c.update(chat_template="{% for m in messages %}"), name="tokenizer_config.json")
    tok = load_tokenizer(folder)  # plain prompts still work
    assert tok.encode("hello")
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match=rf"TemplateSyntaxError.*\(the chat template of {folder}: "
                                                r"tokenizer_config\.json.*--chat-template FILE"):
        chat_ids(tok, messages)
    with pytest.raises(ChatTemplateError) as e:
        chat_ids(tok, messages, "{% if %}")
    assert "--chat-template" not in str(e.value)
    assert cli_main(["generate", str(folder), "--chat", "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert f"the chat template of {folder}" in capsys.readouterr().err
