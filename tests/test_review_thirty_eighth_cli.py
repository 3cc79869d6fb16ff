"""Thirty-eighth review (CLI): outputs through symbolic links, pipes and /dev/stdout; file names
that are not UTF-8 handed to native libraries; llama.cpp's quantizer log kept off the terminal;
verify's checks of the artifact before its reference pass."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

# a folder name of bytes that are not UTF-8 (Latin-1 "modèl"), as Python holds it: surrogate escapes
NOT_UTF8 = os.fsdecode(b"mod\xe9l")


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


# ----------------------------------------------------------------------------- 1. outputs through links

def test_output_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path):
    """os.replace onto the link replaced the link itself by a regular file; the file it pointed
    to kept its old content. A failed write still leaves the target as it was, with no temporary."""
    from mamba_deploy.atomic import atomic_file, write_json

    real = tmp_path / "data" / "real.json"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "out.json"
    link.symlink_to(real)
    write_json(link, {"a": 1})
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads(real.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(link) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert link.is_symlink() and json.loads(real.read_text()) == {"a": 1}
    assert sorted(p.name for p in real.parent.iterdir()) == ["real.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out.json"]


def test_output_through_a_dangling_symlink_creates_its_target(tmp_path):
    from mamba_deploy.atomic import write_text

    link = tmp_path / "out.txt"
    link.symlink_to(tmp_path / "made.txt")
    write_text(link, "new")
    assert link.is_symlink() and (tmp_path / "made.txt").read_text() == "new"


def test_a_fifo_output_is_written_through_not_replaced(tmp_path):
    """A FIFO (`--json >(jq .)`, mkfifo) was replaced by a regular file its reader never saw."""
    from mamba_deploy.atomic import write_json

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader present: the writer's open does not block
    try:
        write_json(fifo, {"b": 2})
        got = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    assert json.loads(got) == {"b": 2}
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_link_to_dev_null_stays_a_link(tmp_path):
    """A device (/dev/null here, through a link made for the test) is written, never renamed over."""
    from mamba_deploy.atomic import write_json

    link = tmp_path / "null.json"
    link.symlink_to("/dev/null")
    write_json(link, {"c": 3})
    assert link.is_symlink() and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null.json"]


def test_dev_stdout_names_descriptor_one():
    """/dev/stdout links to /proc/self/fd/1: recognised as this process's descriptor 1."""
    from mamba_deploy.atomic import own_descriptor, write_in_place

    assert own_descriptor(Path("/dev/stdout")) == 1 and write_in_place(Path("/dev/stdout"))
    assert own_descriptor(Path("/dev/null")) is None


def test_a_descriptor_name_writes_through_the_descriptor(tmp_path, capfd):
    """--json /dev/stdout: here a link of the test's own to /proc/self/fd/1, as /dev/stdout is."""
    from mamba_deploy.atomic import write_json

    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    write_json(link, {"d": 4})
    assert json.loads(capfd.readouterr().out) == {"d": 4}
    assert link.is_symlink()


def test_stdout_redirected_to_a_file_keeps_what_was_printed_first(tmp_path):
    """`--json /dev/stdout > log`: the report printed before the JSON stays before it (reopening the
    name truncated the log; a rename replaced the link and the log got nothing)."""
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    code = ("import sys; from mamba_deploy.atomic import write_json; print('table'); "
            "write_json(sys.argv[1], {'e': 5}); print('after')")
    log = tmp_path / "log.txt"
    with open(log, "wb") as out:
        subprocess.run([sys.executable, "-c", code, str(link)], stdout=out, check=True, env=os.environ)
    text = log.read_text()
    assert text.startswith("table\n") and text.endswith("after\n") and "\0" not in text
    assert json.loads(text[len("table\n"):-len("after\n")]) == {"e": 5}


def test_an_output_folder_link_that_loops_is_a_typed_error(tmp_path):
    """prepare_output_dir resolved a link with Path.resolve, whose RuntimeError (a loop) escaped."""
    from mamba_deploy.atomic import prepare_output_dir, write_text
    from mamba_deploy.errors import OutputPathError

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(OutputPathError, match="loop"):
        prepare_output_dir(loop, OutputPathError)
    with pytest.raises(OutputPathError, match="never reaches a file"):
        write_text(loop, "x")


# ----------------------------------------------------------------------------- 2. names that are not UTF-8

@pytest.fixture
def odd_folder(tmp_path):
    folder = tmp_path / NOT_UTF8
    folder.mkdir()
    return folder


def test_llamacpp_opens_a_gguf_whose_path_is_not_utf8(tiny_gguf, odd_folder):
    """str(path).encode() raised UnicodeEncodeError for such a name (a C/POSIX locale, a Latin-1 archive)."""
    pytest.importorskip("llama_cpp")
    from mamba_deploy.runners import open_runner

    path = Path(shutil.copy(tiny_gguf, odd_folder / "m.gguf"))
    r = _quiet(open_runner, path, "llama.cpp", n_threads=1)
    try:
        logits, _ = r.prefill(torch.tensor([[3, 4]]), r.new_state(1))
        assert torch.isfinite(logits).all()
    finally:
        r.close()


def test_kquant_export_to_a_path_that_is_not_utf8(ckpt, odd_folder):
    pytest.importorskip("llama_cpp")
    from mamba_deploy.export.gguf import export_gguf

    out = _quiet(export_gguf, ckpt("mamba")[0], odd_folder / "k.gguf", outtype="q4_k_m")
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"


def test_onnx_export_to_a_path_that_is_not_utf8(ckpt, odd_folder):
    """onnx.checker takes the path as UTF-8 text only: a TypeError before."""
    pytest.importorskip("onnx")
    from mamba_deploy.export.onnx import export_onnx

    out = _quiet(export_onnx, ckpt("mamba")[0], odd_folder / "onnx")
    assert (out / "model.onnx").is_file()


def test_onnx_runner_opens_an_export_whose_path_is_not_utf8(onnx_export, odd_folder):
    """ONNX Runtime takes the path as UTF-8 text only: an ExportError "cannot load" before."""
    pytest.importorskip("onnxruntime")
    from mamba_deploy.runners import open_runner

    folder = shutil.copytree(onnx_export("mamba")[0], odd_folder / "onnx")
    r = open_runner(folder, "onnx", threads=1)
    try:
        logits, _ = r.prefill(torch.tensor([[3, 4]]), r.new_state(1))
        assert torch.isfinite(logits).all()
    finally:
        r.close()


@pytest.fixture
def odd_tokenizer(ckpt, odd_folder):
    src = ckpt("mamba")[0]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, odd_folder / name)
    return src, odd_folder


def test_tokenizer_in_a_folder_that_is_not_utf8(odd_tokenizer):
    """tokenizers' from_file takes UTF-8 text only; the file's bytes are read instead."""
    from mamba_deploy.tokenizer import load_tokenizer

    src, folder = odd_tokenizer
    assert load_tokenizer(folder).encode("hello") == load_tokenizer(src).encode("hello")


def test_gguf_export_takes_a_tokenizer_whose_path_is_not_utf8(odd_tokenizer, tmp_path):
    from mamba_deploy.export.gguf import export_gguf

    src, folder = odd_tokenizer
    out = _quiet(export_gguf, src, tmp_path / "t.gguf", tokenizer=folder / "tokenizer.json")
    assert out.is_file()


# ----------------------------------------------------------------------------- 3. llama.cpp's quantizer log

@pytest.fixture
def fresh_llama_logger(monkeypatch):
    """llama-cpp-python's logger as in a fresh `mamba-deploy export` process (no runner has called
    set_verbose yet): it prints every llama.cpp line."""
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(logging.getLogger("llama-cpp-python"), "level", logging.NOTSET)


def test_kquant_export_prints_nothing_of_llamacpps_log(ckpt, tmp_path, capfd, fresh_llama_logger):
    from mamba_deploy.export.gguf import export_gguf

    capfd.readouterr()
    _quiet(export_gguf, ckpt("mamba")[0], tmp_path / "k.gguf", outtype="q4_k_m")
    err = capfd.readouterr().err
    assert "llama_model_loader" not in err and "llama_model_quantize" not in err and "blk." not in err


def test_failed_kquant_export_says_llamacpps_last_log_lines(ckpt, tmp_path, capfd, fresh_llama_logger, monkeypatch):
    """The F32 file llama.cpp reads is made corrupt: its error is in the ExportError, not on stderr."""
    from mamba_deploy.errors import ExportError
    from mamba_deploy.export import gguf as G

    def corrupt(model, vocab, path, *a, **kw):
        Path(path).write_bytes(b"GGUF" + bytes(60))

    monkeypatch.setattr(G, "write_gguf", corrupt)
    capfd.readouterr()
    with pytest.raises(ExportError, match="its log ended: .*(GGUF|header)"):
        _quiet(G.export_gguf, ckpt("mamba")[0], tmp_path / "k.gguf", outtype="q4_k_m")
    assert "gguf_init_from" not in capfd.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 4. verify's early checks

@pytest.fixture
def reference_pass(monkeypatch):
    """Each call of verify() (the reference pass is the first), recorded."""
    from mamba_deploy import verify as V

    calls, real = [], V.verify
    monkeypatch.setattr(V, "verify", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    return calls


def _cmd_verify(*argv):
    from mamba_deploy.cli import build_parser

    args = build_parser().parse_args(["verify", *map(str, argv), "--lengths", "1", "--batch", "1",
                                      "--decode-steps", "0", "--quiet"])
    return args.func(args)


def test_verify_refuses_another_models_artifact_before_the_reference_pass(hf_checkpoint, tiny_gguf, reference_pass):
    """A Mamba1 GGUF against a Mamba2 checkpoint: said after the reference pass before."""
    pytest.importorskip("llama_cpp")
    from mamba_deploy.errors import VerificationError

    with pytest.raises(VerificationError, match="not the same model"):
        _quiet(_cmd_verify, hf_checkpoint("mamba2")[0], tiny_gguf)
    assert reference_pass == []


def test_verify_refuses_an_artifact_of_unknown_kind_before_the_reference_pass(hf_checkpoint, tmp_path,
                                                                               reference_pass):
    from mamba_deploy.errors import ModelNotFoundError

    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        _cmd_verify(hf_checkpoint("mamba")[0], notes)
    assert reference_pass == []


def test_verify_refuses_a_backend_that_cannot_open_the_artifact_before_the_reference_pass(
        hf_checkpoint, onnx_export, reference_pass):
    """--backend llama.cpp for an ONNX export folder."""
    pytest.importorskip("llama_cpp")
    from mamba_deploy.errors import ModelNotFoundError

    folder = onnx_export("mamba")[0]
    with pytest.raises(ModelNotFoundError, match="runs .gguf files"):
        _cmd_verify(hf_checkpoint("mamba")[0], folder, "--backend", "llama.cpp")
    assert reference_pass == []


def test_verify_refuses_a_missing_backend_package_before_the_reference_pass(hf_checkpoint, onnx_export,
                                                                           reference_pass, monkeypatch):
    from mamba_deploy.errors import BackendUnavailableError

    folder = onnx_export("mamba")[0]
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    with pytest.raises(BackendUnavailableError, match="openvino"):
        _cmd_verify(hf_checkpoint("mamba")[0], folder, "--backend", "openvino")
    assert reference_pass == []
