"""The thirty-eighth session's review of hostile model folders: a file linked out of the folder
(copied into outputs), linked to /dev/zero (an endless copy) or made a pipe (a read that never
returns), and JSON nested past the parser."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mamba_deploy.errors import CheckpointError, ConfigError

DEMO2 = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"


@pytest.fixture
def model_copy(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(DEMO2, folder)
    return folder


def test_a_tokenizer_file_linked_outside_the_folder_is_not_copied_into_a_convert(model_copy, tmp_path):
    from mamba_deploy.cli import main

    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    (model_copy / "merges.txt").symlink_to(secret)
    assert main(["convert", str(model_copy), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()  # before: merges.txt held "top secret"


@pytest.mark.parametrize("special", ["dev_zero", "fifo"])
def test_a_tokenizer_config_that_is_a_device_or_a_pipe_is_a_checkpoint_error(model_copy, tmp_path, special):
    from mamba_deploy import load_model

    cfg = model_copy / "tokenizer_config.json"
    cfg.unlink()
    if special == "fifo":
        os.mkfifo(cfg)
    else:
        cfg.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="is a pipe or device, not a file"):
        load_model(model_copy).tokenizer  # a FIFO: the read never returned; /dev/zero: until memory ran out


def test_a_weight_file_that_is_a_pipe_is_refused_and_one_linked_elsewhere_loads(model_copy, tmp_path):
    """Linking files in from elsewhere assembles a folder without copying: reading goes on; a pipe
    would never answer."""
    from mamba_deploy import load_model

    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(str(model_copy / "model.safetensors"), outside)
    (model_copy / "model.safetensors").symlink_to(outside)
    assert load_model(model_copy).config.vocab_size == load_model(DEMO2).config.vocab_size
    (model_copy / "model.safetensors").unlink()
    os.mkfifo(model_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="is a pipe or device, not a file"):
        load_model(model_copy)


def test_a_hub_cache_snapshot_linking_into_its_blobs_still_loads(tmp_path):
    """The hub cache's layout: snapshots/REV/file -> ../../blobs/HASH."""
    from mamba_deploy import load_model

    repo = tmp_path / "models--x--y"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in DEMO2.iterdir():
        if f.is_file():
            shutil.copy2(f, blobs / f.name)
            (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    model = load_model(snap)
    assert model.tokenizer.encode("def f") == load_model(DEMO2).tokenizer.encode("def f")


def test_json_nested_past_the_parser_is_a_typed_error(model_copy):
    from mamba_deploy import load_model

    (model_copy / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nested too deep"):
        load_model(model_copy)


def test_a_gguf_whose_tensor_type_was_edited_is_corrupt_not_loaded(tmp_path):
    """F32 -> Q4_0 in one tensor info: fewer bytes, so the tensors no longer follow each other;
    llama.cpp refuses the file ("has offset ..., expected ..."), the importer loaded other bytes
    as that tensor's weights (embeddings up to 4096 instead of 0.17) without a word."""
    import gguf

    from mamba_deploy import load_model
    from mamba_deploy.cli import main

    path = tmp_path / "m.gguf"
    assert main(["export", "gguf", str(DEMO2), str(path)]) == 0
    reader = gguf.GGUFReader(path, "r+")
    t = reader.tensors[0]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32
    t.field.parts[-2][0] = int(gguf.GGMLQuantizationType.Q4_0)  # the info's type code, in the file
    del reader
    with pytest.raises(CheckpointError, match=r"is corrupt: tensor .* starts at data offset \d+, where the tensors "
                                              r"before it end at \d+"):
        load_model(path)


@pytest.mark.parametrize("template, says", [
    # the output cap (64 Mi characters) or, on a slow machine, the 5 s deadline stops it first
    ("{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
     "wrote more than|ran past 5 s"),
    ("{{ 'x' * 10**10 }}", "past"),
    ("{{ 9 ** 100000000 }}", "to the power"),  # Jinja's ** is left-associative: no 10**9 here
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
])
def test_a_chat_template_that_runs_away_is_a_chat_template_error(template, says):
    """Its output grew 200 MB/s until the process was killed; a recursive macro was a traceback."""
    from mamba_deploy.chat import ChatTemplateError, render_chat

    with pytest.raises(ChatTemplateError, match=says):
        render_chat(template, [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("name", ["/etc/hostname", "../secret.txt"])
def test_an_onnx_manifest_naming_files_outside_its_folder_is_refused(tmp_path, name):
    """They were stat'ed (the error told whether a host file exists and its size) and, with
    check_hash, read and hashed (/dev/zero: never returned)."""
    import json

    from mamba_deploy.cli import main
    from mamba_deploy.errors import ExportError
    from mamba_deploy.runners import open_runner

    out = tmp_path / "onnx"
    assert main(["export", "onnx", str(DEMO2), str(out), "--no-validate"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="outside the export folder"):
        open_runner(out, "onnx")


def test_the_openvino_runner_refuses_a_manifest_that_disagrees_with_the_graph(tmp_path):
    """A manifest edited to another d_state: the ONNX runner refused it, OpenVINO ran it (all-zero
    logits past the graph's vocabulary; a raw error at prefill for d_state)."""
    import json

    pytest.importorskip("openvino")
    from mamba_deploy.cli import main
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.onnx import io_spec
    from mamba_deploy.runners import open_runner

    out = tmp_path / "onnx"
    assert main(["export", "onnx", str(DEMO2), str(out), "--no-validate"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["d_state"] *= 2  # the config and the io shapes edited together: self-consistent
    manifest.update(io_spec(MambaConfig.from_own_dict(manifest["config"])))
    (out / "manifest.json").write_text(json.dumps(manifest))
    for backend in ("onnx", "openvino"):
        with pytest.raises(ExportError, match="but manifest.json says"):
            open_runner(out, backend)
