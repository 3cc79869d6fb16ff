"""Regression tests for what the forty-third session found; each fails on the code before its fix."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mamba_deploy import atomic


def _slow_renames(monkeypatch, delay: float = 0.15):
    """Path.rename sleeps before it renames, so a second writer checks the folder while the
    first is still moving its entries in (the window a real race has, made wide)."""
    real = Path.rename

    def rename(self, target):
        time.sleep(delay)
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)


def test_two_writers_into_one_empty_folder_never_mix(tmp_path, monkeypatch):
    """_move_into checked that the folder held nothing of another writer's and then moved its
    entries one by one: two writers that both checked before either moved both succeeded, and the
    folder held a mix of their files. With the folder locked over check and moves, one wins whole
    and the other is refused."""
    out = tmp_path / "shared"
    out.mkdir()
    _slow_renames(monkeypatch)
    ready = threading.Barrier(2)
    real_prepare = atomic.prepare_output_dir

    def prepare(*args, **kwargs):  # both find the folder empty before either puts its temporary there
        folder = real_prepare(*args, **kwargs)
        ready.wait(timeout=10)
        return folder

    monkeypatch.setattr(atomic, "prepare_output_dir", prepare)
    results = {}

    def writer(tag: str) -> None:
        try:
            with atomic.atomic_dir(out) as tmp:
                for i in range(3):
                    (tmp / f"{tag}{i}.bin").write_text(tag)
            results[tag] = "ok"
        except FileExistsError as e:
            results[tag] = e

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    oks = [tag for tag, r in results.items() if r == "ok"]
    assert len(oks) == 1, results
    refused = next(r for r in results.values() if r != "ok")
    assert "written by another process" in str(refused)
    assert sorted(p.name for p in out.iterdir()) == [f"{oks[0]}{i}.bin" for i in range(3)]


def _interrupt_self() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_renames_together_holds_a_ctrl_c_until_the_block_ends():
    """From hold() on, a SIGINT waits for the block's end and is raised there; before hold() it
    interrupts at once; after the block the default handler is back."""
    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with atomic.renames_together() as hold:
            hold()
            _interrupt_self()
            time.sleep(0.05)  # a handler that raised would have raised by now
            done.append("renamed")
    assert done == ["renamed"]
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):
        with atomic.renames_together():
            _interrupt_self()
            time.sleep(0.05)
            done.append("not held")
    assert done == ["renamed"]


def test_renames_together_lets_the_blocks_own_error_through():
    """An error inside the held part (a full disk on a rename) is what propagates, and the
    handler is put back even then."""
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(OSError, match="disk"):
        with atomic.renames_together() as hold:
            hold()
            raise OSError("disk full")
    assert signal.getsignal(signal.SIGINT) is before


def test_write_files_renames_every_file_or_none_on_ctrl_c(tmp_path, monkeypatch):
    """A Ctrl-C between two of write_files' renames left a new file beside an old one."""
    folder = tmp_path / "set"
    folder.mkdir()
    atomic.write_files(folder, {"a.json": b"old a", "b.json": b"old b"})
    real = os.replace
    calls = []

    def replace(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            _interrupt_self()
            time.sleep(0.05)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_files(folder, {"a.json": b"new a", "b.json": b"new b"})
    assert len(calls) == 2
    assert sorted(p.read_bytes() for p in folder.iterdir()) == [b"new a", b"new b"]


def test_gguf_and_modelfile_are_renamed_together_on_ctrl_c(ckpt, tmp_path, monkeypatch):
    """export gguf --ollama renamed the GGUF and then the Modelfile: a Ctrl-C between the two left
    the new GGUF without its Modelfile."""
    from mamba_deploy.export import gguf as gguf_export

    folder, _ = ckpt("mamba")
    out = tmp_path / "m.gguf"
    real = os.replace
    calls = []

    def replace(src, dst):
        real(src, dst)
        calls.append(Path(dst).name)
        if len(calls) == 1:
            _interrupt_self()
            time.sleep(0.05)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        gguf_export.export_gguf(folder, out, ollama=True)
    assert sorted(calls) == ["Modelfile", "m.gguf"]
    assert f"FROM ./{out.name}" in (tmp_path / "Modelfile").read_text()
    assert out.stat().st_size > 0


def test_an_unopenable_weight_file_is_not_called_missing_or_corrupt(hf_checkpoint, tmp_path, monkeypatch):
    """safetensors reports every failure to open as "No such file or directory", so an unreadable
    model.safetensors was reported as missing and "truncated or corrupt"."""
    import shutil

    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.errors import CheckpointError

    src, _ = hf_checkpoint("mamba")
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    weights = folder / "model.safetensors"
    real_open = open

    def guarded_open(file, *args, **kwargs):  # what open() does for a file of mode 000, as any non-root user
        if str(file) == str(weights):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    if hasattr(os, "geteuid") and os.geteuid() != 0:
        weights.chmod(0)  # the real thing
    else:  # root reads a mode-000 file
        monkeypatch.setattr("builtins.open", guarded_open)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert "Permission denied" in str(e.value) and "chmod" in str(e.value)
    assert "corrupt" not in str(e.value)
