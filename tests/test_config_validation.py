"""Bad values in the files a user hands us (config.json in every dialect, GGUF metadata, ONNX
manifests, tokenizer files) are typed errors naming the key / file and the fix, found before
any arithmetic on them: never a ZeroDivisionError, TypeError or a crash deep inside torch."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from mamba_deploy.config import MambaConfig
from mamba_deploy.errors import ConfigError, ExportError

MODELS = Path(__file__).resolve().parents[1] / "models"


def _config(name: str) -> dict:
    return json.loads((MODELS / name / "config.json").read_text())


def _write(tmp_path, d) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return path


DELETE = object()
# (model, edits, what the message must name)
BAD_HF = [
    ("demo-mamba2", dict(head_dim=0, num_heads=DELETE), "head_dim=0"),
    ("demo-mamba2", dict(n_groups=0), "n_groups=0"),
    ("demo-mamba1", dict(expand=0), "expand=0"),
    ("demo-mamba1", dict(hidden_size="abc"), "hidden_size='abc'"),
    ("demo-mamba1", dict(hidden_size=None), "hidden_size=None"),
    ("demo-mamba1", dict(hidden_size=256.5), "hidden_size=256.5"),
    ("demo-mamba1", dict(hidden_size="256"), "hidden_size='256'"),
    ("demo-mamba1", dict(hidden_size=True), "hidden_size=True"),
    ("demo-mamba1", dict(time_step_rank="xyz"), "time_step_rank='xyz'"),
    ("demo-mamba2", dict(time_step_limit=5), "time_step_limit=5"),
    ("demo-mamba2", dict(time_step_limit=[1]), "time_step_limit=[1]"),
    ("demo-mamba1", dict(layer_norm_epsilon="x"), "layer_norm_epsilon='x'"),
    ("demo-mamba2", dict(chunk_size=0), "chunk_size=0"),
    ("demo-mamba1", dict(eos_token_id="x"), "eos_token_id='x'"),
]


@pytest.mark.parametrize("model,edits,named", BAD_HF, ids=[n for _, _, n in BAD_HF])
def test_bad_hf_config_values_are_config_errors_naming_the_key(tmp_path, model, edits, named):
    d = _config(model)
    for k, v in edits.items():
        if v is DELETE:
            del d[k]
        else:
            d[k] = v
    path = _write(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        MambaConfig.from_file(path)
    assert named in str(e.value) and str(path) in str(e.value)


def test_bad_config_value_through_the_cli_is_an_error_line(tmp_path, capsys):
    from mamba_deploy.cli import main

    folder = tmp_path / "m"
    shutil.copytree(MODELS / "demo-mamba2", folder)
    d = _config("demo-mamba2")
    d["head_dim"] = 0
    del d["num_heads"]
    (folder / "config.json").write_text(json.dumps(d))
    assert main(["inspect", str(folder)]) == 2
    assert "error: " in capsys.readouterr().err


def test_int_valued_float_sizes_are_accepted_as_ints(tmp_path):
    d = _config("demo-mamba1")
    d["hidden_size"], d["num_hidden_layers"] = 256.0, 6.0
    cfg = MambaConfig.from_file(_write(tmp_path, d))
    assert (cfg.d_model, cfg.n_layer) == (256, 6)
    assert type(cfg.d_model) is int and type(cfg.n_layer) is int


MAMBA_SSM = {"d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {"layer": "Mamba2", "headdim": 16}}


@pytest.mark.parametrize("edit,named", [
    (lambda d: d.pop("vocab_size"), "'vocab_size'"),
    (lambda d: d.update(ssm_cfg=[1]), "ssm_cfg=[1]"),
    (lambda d: d["ssm_cfg"].update(ngroups=0), "ssm_cfg.ngroups=0"),
    (lambda d: d["ssm_cfg"].update(dt_limit=[0.5, 0.1]), "ssm_cfg.dt_limit=[0.5, 0.1]"),
    (lambda d: d.update(d_model="64"), "d_model='64'"),
], ids=["no-vocab", "ssm_cfg-list", "ngroups0", "dt_limit-reversed", "d_model-str"])
def test_bad_mamba_ssm_config_values_are_config_errors(edit, named):
    d = json.loads(json.dumps(MAMBA_SSM))
    assert MambaConfig.from_dict(json.loads(json.dumps(MAMBA_SSM))).nheads == 8  # the good one reads
    edit(d)
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("(", r"\(")):
        MambaConfig.from_dict(d)


def test_unreadable_config_files_are_config_errors(tmp_path):
    bad = tmp_path / "bad" / "config.json"
    bad.parent.mkdir()
    bad.write_bytes(b'{"model_type": "mamba\xff"}')
    with pytest.raises(ConfigError, match=r"config.json is not UTF-8"):
        MambaConfig.from_file(bad)
    folder = tmp_path / "dir" / "config.json"
    folder.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"config.json is a folder"):
        MambaConfig.from_file(folder)


def test_own_dict_and_direct_construction_are_checked():
    good = MambaConfig(arch="mamba2", d_model=64, n_layer=2, vocab_size=100, headdim=16, chunk_size=16)
    d = good.to_dict()
    assert MambaConfig.from_own_dict(d) == good
    with pytest.raises(ConfigError, match="chunk_size=0"):
        MambaConfig.from_own_dict({**d, "chunk_size": 0})
    with pytest.raises(ConfigError, match="rms_norm_eps=nan"):
        MambaConfig.from_own_dict({**d, "rms_norm_eps": math.nan})
    with pytest.raises(ConfigError, match="pad_token_id=-1"):
        MambaConfig.from_own_dict({**d, "pad_token_id": -1})
    with pytest.raises(ConfigError, match="ngroups=0"):
        good.replace(ngroups=0)


# ----------------------------------------------------------------------------- GGUF metadata

class _FakeReader:
    """Just the GGUFReader surface read_config uses: get_field(key).contents()."""

    def __init__(self, fields: dict):
        self.fields = fields

    def get_field(self, key):
        if key not in self.fields:
            return None
        return SimpleNamespace(contents=lambda: self.fields[key])


GGUF_MAMBA = {"general.architecture": "mamba", "mamba.embedding_length": 32, "mamba.block_count": 2,
              "mamba.ssm.conv_kernel": 4, "mamba.ssm.inner_size": 64, "mamba.ssm.state_size": 8,
              "mamba.ssm.time_step_rank": 4, "mamba.attention.layer_norm_rms_epsilon": 1e-5}


@pytest.mark.parametrize("key,value", [("mamba.embedding_length", 0), ("mamba.ssm.inner_size", 0),
                                       ("mamba.block_count", "2"), ("mamba.attention.layer_norm_rms_epsilon", 0.0),
                                       ("mamba_deploy.chunk_size", 0)])
def test_bad_gguf_metadata_is_a_config_error_naming_the_key(key, value):
    from mamba_deploy.export.gguf_import import read_config

    shapes = {"token_embd.weight": (128, 32)}
    assert read_config(_FakeReader(GGUF_MAMBA), shapes).d_inner == 64  # the fake reader is right
    with pytest.raises(ConfigError, match=f"{key}={value!r}"):
        read_config(_FakeReader({**GGUF_MAMBA, key: value}), shapes)


# ----------------------------------------------------------------------------- ONNX manifest

@pytest.mark.parametrize("edit,named", [
    (lambda m: m.update(files="x"), "'files'"),
    (lambda m: m.update(files=[1]), "'files'"),
    (lambda m: m.update(files={"model.onnx": {}}), "files['model.onnx']"),
    (lambda m: m.update(files={"model.onnx": 5}), "files['model.onnx']"),
    (lambda m: m.pop("files"), "no 'files' key"),
    (lambda m: m.update(inputs="x"), "'inputs'"),
    (lambda m: m.update(inputs=[1, 2]), "'inputs'"),
    (lambda m: m.update(outputs={"a": 1}), "'outputs'"),
], ids=["files-str", "files-list", "files-empty-info", "files-int-info", "no-files", "inputs-str", "inputs-ints",
        "outputs-dict"])
def test_edited_onnx_manifest_is_an_export_error_naming_the_key(onnx_export, tmp_path, edit, named):
    from mamba_deploy.export.onnx import open_export_folder

    src, _, _ = onnx_export("mamba")
    folder = tmp_path / "copy"
    shutil.copytree(src, folder)
    open_export_folder(folder)  # the copy itself is fine
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError) as e:
        open_export_folder(folder)
    assert named in str(e.value) and "re-export" in str(e.value)


# ----------------------------------------------------------------------------- tokenizer files

def _tokenizer_copy(tmp_path) -> Path:
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MODELS / "demo-mamba1" / name, folder / name)
    return folder


@pytest.mark.parametrize("damage", ["garbage", "empty", "folder"])
def test_corrupt_tokenizer_json_is_a_config_error_naming_it(tmp_path, damage):
    from mamba_deploy.tokenizer import load_tokenizer

    folder = _tokenizer_copy(tmp_path)
    assert load_tokenizer(folder).vocab_size == 4096
    path = folder / "tokenizer.json"
    path.unlink()
    if damage == "folder":
        path.mkdir()
    else:
        path.write_text("{bad" if damage == "garbage" else "")
    with pytest.raises(ConfigError, match=r"tokenizer\.json .*copy it again"):
        load_tokenizer(folder)


@pytest.mark.parametrize("with_tokenizer_json", [True, False])
def test_corrupt_tokenizer_config_is_a_config_error_naming_it(tmp_path, with_tokenizer_json):
    from mamba_deploy.tokenizer import load_tokenizer

    folder = _tokenizer_copy(tmp_path)
    if not with_tokenizer_json:
        (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").write_text("{bad")
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json .*copy it again"):
        load_tokenizer(folder)


@pytest.mark.parametrize("content", ["[]", '{"model": {"type": "BPE"}}', '{"model": {"type": "BPE", "vocab": []}}',
                                     b"\xff\xfe not utf-8"])
def test_gguf_export_of_a_corrupt_tokenizer_json_is_a_typed_error(tmp_path, content):
    pytest.importorskip("gguf")
    from mamba_deploy.errors import MambaDeployError
    from mamba_deploy.export.gguf import export_gguf

    src = tmp_path / "m"
    shutil.copytree(Path(__file__).resolve().parents[1] / "models" / "demo-mamba1", src)
    (src / "tokenizer.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(MambaDeployError, match="tokenizer"):
        export_gguf(src, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_export_names_a_corrupt_tokenizer_config(tmp_path):
    pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import export_gguf

    src = tmp_path / "m"
    shutil.copytree(Path(__file__).resolve().parents[1] / "models" / "demo-mamba1", src)
    (src / "tokenizer_config.json").write_text("{bad")
    with pytest.raises(ConfigError, match="tokenizer_config.json"):
        export_gguf(src, tmp_path / "m.gguf")
