"""Fixes of the twenty-sixth session (a review of output paths that overlap or exist); each test
fails on the code before its fix.

`train` kept only its own files in --out (a README, notes, an exported GGUF were deleted at the
first save) and replaced a model there in a fresh run; a work folder inside --out went with each
save; `verify --json` / `demo --json` could replace a file of their inputs; an existing empty
output folder was removed and replaced (a mount point failed, `.` failed, a shared folder lost its
mode); a killed writer's temporaries were never removed; two demo models with one folder name
mixed their outputs; a TensorRT engine path could name the ONNX model it is built from.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamba_deploy import atomic, cli, train
from mamba_deploy.errors import OutputPathError

MODELS = Path(__file__).resolve().parents[1] / "models"


def _args(tmp_path, **kw):
    base = dict(preset="tiny-mamba2", tokenizer=str(MODELS / "demo-mamba2"), out=str(tmp_path / "out"),
                work_dir=str(tmp_path / "work"), resume=False, overwrite=False)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture
def model_folder(tmp_path):
    """A copy of the demo model with a user's notes and a file exported into it."""
    m = tmp_path / "mymodel"
    shutil.copytree(MODELS / "demo-mamba2", m)
    (m / "NOTES.md").write_text("my notes")
    (m / "exports").mkdir()
    (m / "exports" / "m.gguf").write_bytes(b"GGUF" + bytes(1000))
    return m


def test_fresh_train_refuses_an_out_that_holds_a_model(tmp_path, model_folder):
    with pytest.raises(OutputPathError, match="--overwrite"):
        train.check_outputs(_args(tmp_path, out=str(model_folder), tokenizer=str(model_folder)))
    for ok in (dict(resume=True), dict(overwrite=True)):
        train.check_outputs(_args(tmp_path, out=str(model_folder), tokenizer=str(model_folder), **ok))


def test_train_overwrite_flag_is_parsed(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(train, "train", lambda args: seen.update(vars(args)))
    train.main(["train", "--tokenizer", str(MODELS / "demo-mamba2"), "--out", str(tmp_path / "o"), "--overwrite"])
    assert seen["overwrite"] is True


def test_snapshot_keeps_the_other_files_of_out(model_folder):
    from conftest import random_lm
    from mamba_deploy import load_model
    from mamba_deploy.config import MambaConfig

    gguf_inode = (model_folder / "exports" / "m.gguf").stat().st_ino
    cfg = MambaConfig(arch="mamba2", d_model=32, n_layer=2, vocab_size=4096, d_state=16, headdim=8, chunk_size=16)
    model = random_lm(cfg)
    model.source_path = model_folder  # the tokenizer files come from here, as in train
    train.save_snapshot(model, model_folder, torch.float16, {"step": 1})
    assert (model_folder / "NOTES.md").read_text() == "my notes"
    assert (model_folder / "README.md").exists()
    assert (model_folder / "exports" / "m.gguf").stat().st_ino == gguf_inode, "kept as a hard link, not copied"
    assert load_model(model_folder).config.n_layer == 2, "the model itself is replaced"
    assert not list(model_folder.parent.glob(".mymodel.*")), "no temporaries left"


@pytest.mark.parametrize("inside", ["out", "out/state"])
def test_work_dir_inside_out_is_refused(tmp_path, inside):
    with pytest.raises(OutputPathError, match="--work-dir"):
        train.check_outputs(_args(tmp_path, work_dir=str(tmp_path / inside)))


def test_verify_json_refuses_a_file_of_its_inputs(model_folder, capsys):
    before = (model_folder / "config.json").read_bytes()
    code = cli.main(["verify", str(model_folder), str(model_folder), "--json", str(model_folder / "config.json")])
    assert code == 2 and "--json" in capsys.readouterr().err
    assert (model_folder / "config.json").read_bytes() == before


def test_demo_json_refuses_a_file_of_its_models(model_folder, capsys):
    before = (model_folder / "config.json").read_bytes()
    code = cli.main(["demo", "--models", str(model_folder), "--json", str(model_folder / "config.json")])
    assert code == 2 and "--json" in capsys.readouterr().err
    assert (model_folder / "config.json").read_bytes() == before


def test_refuse_input_file_allows_new_files(model_folder, tmp_path):
    atomic.refuse_input_file(model_folder / "verify.json", [model_folder], "--json", "v.json")  # new: fine
    atomic.refuse_input_file(tmp_path / "other.json", [model_folder], "--json", "v.json")
    with pytest.raises(OutputPathError):
        atomic.refuse_input_file(model_folder / "exports" / "m.gguf", [model_folder], "--json", "v.json")


def test_demo_models_with_one_folder_name_get_their_own_labels():
    from mamba_deploy.demo import unique_labels

    dirs = [Path("runA/ckpt"), Path("runB/ckpt"), Path("x/other"), Path("runC/ckpt")]
    assert unique_labels(dirs) == ["ckpt", "ckpt-2", "other", "ckpt-3"]


def test_atomic_dir_fills_the_current_folder_in_place(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    inode = os.stat(".").st_ino
    with atomic.atomic_dir(".") as tmp:
        (tmp / "a.txt").write_text("a")
    assert os.stat(here).st_ino == inode and (here / "a.txt").read_text() == "a"
    assert sorted(p.name for p in here.iterdir()) == ["a.txt"]


def test_atomic_dir_keeps_an_existing_empty_folder_and_its_mode(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    inode = shared.stat().st_ino
    with atomic.atomic_dir(shared) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    assert shared.stat().st_ino == inode and stat.S_IMODE(shared.stat().st_mode) == 0o2775
    assert (shared / "sub" / "b.bin").read_bytes() == b"b" and len(list(shared.iterdir())) == 1


def test_atomic_dir_in_place_refuses_what_another_writer_put_there(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError, match="another process"):
        with atomic.atomic_dir(out) as tmp:
            (tmp / "mine").write_text("x")
            (out / "theirs").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_killed_writers_temporaries_are_removed(tmp_path):
    owner_dead = f"p{_dead_pid()}h{atomic._host()}"
    stale_file = tmp_path / f".x.gguf.{owner_dead}.abc123.tmp"
    stale_file.write_bytes(bytes(100))
    stale_scratch = tmp_path / f".x.gguf.f32.{owner_dead}.q1.tmp"
    stale_scratch.write_bytes(bytes(100))
    live = tmp_path / f".x.gguf.{atomic.temp_owner()}.zz.tmp"  # this process: alive, kept
    live.write_bytes(b"")
    other_output = tmp_path / f".y.gguf.{owner_dead}.abc.tmp"  # another output's: not this writer's business
    other_output.write_bytes(b"")
    with pytest.warns(UserWarning, match="killed"):
        with atomic.atomic_file(tmp_path / "x.gguf") as tmp:
            assert atomic.temp_owner() in tmp.name
            tmp.write_bytes(b"new")
    assert not stale_file.exists() and not stale_scratch.exists()
    assert live.exists() and other_output.exists() and (tmp_path / "x.gguf").read_bytes() == b"new"


def test_a_killed_folder_writers_temporary_is_removed(tmp_path):
    stale = tmp_path / f".out.tmp-p{_dead_pid()}h{atomic._host()}-abc"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(bytes(10))
    with pytest.warns(UserWarning, match="killed"):
        with atomic.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("f")
    assert not stale.exists() and (tmp_path / "out" / "f").exists()


def test_export_gguf_says_it_replaces_an_existing_file(tmp_path):
    from mamba_deploy.export.gguf import export_gguf

    out = tmp_path / "prod.gguf"
    out.write_bytes(b"GGUF" + bytes(2 << 20))
    with pytest.warns(UserWarning, match="prod.gguf exists"):
        export_gguf(MODELS / "demo-mamba2", out, outtype="q8_0")
    assert out.stat().st_size != 4 + (2 << 20)


def test_engine_path_never_names_a_file_of_the_onnx_export(onnx_export):
    from mamba_deploy.export.tensorrt import build_engine

    folder = onnx_export("mamba")[0]
    before = (folder / "model.onnx").stat().st_mtime_ns
    with pytest.raises(OutputPathError, match="ONNX export"):  # before TensorRT is needed at all
        build_engine(folder, folder / "model.onnx")
    assert (folder / "model.onnx").stat().st_mtime_ns == before


def test_every_runner_names_what_it_was_opened_from(onnx_export, ckpt, tmp_path):
    """Runner.artifact_path, which verify's report and the server's model name read (they probed
    backend attributes before): the .gguf file, the ONNX folder, the checkpoint folder."""
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.runners import open_runner
    from mamba_deploy.serve import default_model_name
    from test_gguf import HAVE_LLAMA

    folder = ckpt("mamba")[0]
    onnx_dir = onnx_export("mamba")[0]
    gg = export_gguf(folder, tmp_path / "tiny-f32.gguf")
    cases = [(folder, "torch"), (gg, "torch"), (onnx_dir, "onnx")] + ([(gg, "llama.cpp")] if HAVE_LLAMA else [])
    for path, backend in cases:
        with open_runner(path, backend) as r:
            assert Path(r.artifact_path).resolve() == Path(path).resolve(), (path, backend)
            want = Path(path).stem if str(path).endswith(".gguf") else Path(path).name
            assert default_model_name(r) == want


def test_snapshot_that_cannot_carry_a_file_is_a_typed_error_and_keeps_out(model_folder, monkeypatch):
    """A file of --out that cannot be linked or copied (unreadable, another user's): a typed
    error naming it, and the previous snapshot as it was (no traceback after hours of training)."""
    from conftest import random_lm
    from mamba_deploy.config import MambaConfig

    before = {p.name: p.read_bytes() for p in model_folder.iterdir() if p.is_file()}

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(src))

    from mamba_deploy import train_outputs

    monkeypatch.setattr(train_outputs, "_link_or_copy", refuse)
    model = random_lm(MambaConfig(arch="mamba2", d_model=32, n_layer=2, vocab_size=4096, d_state=16, headdim=8,
                                  chunk_size=16))
    model.source_path = model_folder
    with pytest.raises(OutputPathError, match="cannot carry"):
        train.save_snapshot(model, model_folder, torch.float16, {"step": 1})
    assert {p.name: p.read_bytes() for p in model_folder.iterdir() if p.is_file()} == before
    assert not list(model_folder.parent.glob(".mymodel.*")), "no temporaries left"
