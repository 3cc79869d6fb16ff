"""`train` inputs a user can get wrong: --device, --seed, --resume state files, a corrupt
--tokenizer; each is a typed error (or a warning) and a failed run leaves no empty folders."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from mamba_deploy import train
from mamba_deploy.errors import BackendUnavailableError, CheckpointError, ConfigError

MODELS = Path(__file__).resolve().parents[1] / "models"


def _args(tmp_path, **kw):
    base = dict(preset="tiny-mamba1", tokenizer=str(MODELS / "demo-mamba1"), out=str(tmp_path / "new" / "out"),
                work_dir=None, data_cache=str(tmp_path / "cache"), steps=1, max_minutes=None, batch=2, seq_len=16,
                lr=3e-3, warmup=1, weight_decay=0.1, clip=1.0, amp=None, device="cpu", eval_every=1, eval_batch=2,
                eval_tokens=0, save_every=1, seed=0, resume=False)
    base.update(kw)
    return argparse.Namespace(**base)


def _no_outputs(tmp_path):
    """Neither OUT, OUT.work nor the parent folder `train` had to create is left behind."""
    assert not (tmp_path / "new").exists(), sorted(str(p) for p in (tmp_path / "new").rglob("*"))


def _fake_data(monkeypatch, n=2000):
    monkeypatch.setattr(train, "load_data", lambda args: (np.arange(n) % 4096, np.arange(n) % 4096))


def test_unknown_device_is_a_config_error(tmp_path, capsys):
    from mamba_deploy.cli import main

    with pytest.raises(ConfigError, match="unknown device 'foo'"):
        train.train(_args(tmp_path, device="foo"))
    assert main(["train", "--tokenizer", str(MODELS / "demo-mamba1"), "--out", str(tmp_path / "new" / "out"),
                 "--steps", "1", "--device", "foo"]) == 2
    assert "error: unknown device 'foo'" in capsys.readouterr().err
    _no_outputs(tmp_path)


def test_cuda_without_a_gpu_is_a_typed_error_before_any_folder(tmp_path, monkeypatch):
    _fake_data(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="device 'cuda'"):
        train.train(_args(tmp_path, device="cuda"))
    _no_outputs(tmp_path)


def test_corrupt_tokenizer_leaves_no_folders(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{bad")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        train.train(_args(tmp_path, tokenizer=str(tok)))
    _no_outputs(tmp_path)


def test_seq_len_beyond_the_corpus_leaves_no_folders(tmp_path, monkeypatch):
    _fake_data(monkeypatch, n=100)
    with pytest.raises(ConfigError, match="fewer than --seq-len 500"):
        train.train(_args(tmp_path, seq_len=500))
    _no_outputs(tmp_path)
    # a folder that was there before is not ours to remove
    work = tmp_path / "new" / "out.work"
    work.mkdir(parents=True)
    with pytest.raises(ConfigError, match="fewer than --seq-len"):
        train.train(_args(tmp_path, seq_len=500))
    assert work.is_dir() and not (tmp_path / "new" / "out").exists()


def test_resume_with_a_corrupt_state_is_a_checkpoint_error_naming_it(tmp_path, monkeypatch):
    _fake_data(monkeypatch)
    work = tmp_path / "new" / "out.work"
    work.mkdir(parents=True)
    state = work / "train_state.pt"
    state.write_bytes(b"garbage, not a pickle")
    with pytest.raises(CheckpointError, match=f"{state}.*delete it"):
        train.train(_args(tmp_path, resume=True))
    torch.save({"step": 3}, state)  # loads, but is not a training state
    with pytest.raises(CheckpointError, match="lacks model, opt"):
        train.train(_args(tmp_path, resume=True))


def test_resume_without_a_state_warns_naming_the_path(tmp_path):
    path = tmp_path / "work" / "train_state.pt"
    with pytest.warns(UserWarning, match=f"no training state at {path}"):
        assert train.load_resume_state(_args(tmp_path, resume=True), path, torch.device("cpu")) is None


def test_seed_takes_the_torch_range(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(train, "train", lambda args: seen.append(args.seed))
    argv = ["train", "--tokenizer", str(MODELS / "demo-mamba1"), "--out", str(tmp_path / "o"), "--seed"]
    for value in ("0", str(2**64 - 1)):
        train.main([*argv, value])
    assert seen == [0, 2**64 - 1]
    for value in (str(2**64), "-1", "1.5"):
        with pytest.raises(SystemExit) as e:
            train.main([*argv, value])
        assert e.value.code == 2 and "--seed" in capsys.readouterr().err
    assert len(seen) == 2
