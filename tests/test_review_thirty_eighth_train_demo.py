"""The thirty-eighth session's review of train and demo: a trailing slash on --out, --resume with
another tokenizer of the same size, the warmup note after --max-minutes cuts the schedule, and
demo on a mamba_ssm / sharded / quantized checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_review_thirty_fifth import _run_args

from mamba_deploy.errors import ConfigError

DEMO2 = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"


def test_a_trailing_slash_on_out_keeps_the_work_folder_beside_it(tmp_path):
    from mamba_deploy.train import check_outputs
    from mamba_deploy.train_outputs import work_dir as _work_dir

    assert _work_dir(SimpleNamespace(out="runs/m/", work_dir=None)) == Path("runs/m.work")
    args = SimpleNamespace(out=str(tmp_path / "m") + "/", work_dir=None, tokenizer=str(DEMO2), resume=False)
    assert check_outputs(args) == tmp_path / "m.work"  # was: "--work-dir runs/m/.work lies inside --out"


def test_resume_with_another_tokenizer_of_the_same_size_is_refused(tmp_path):
    from mamba_deploy import train

    train.train(_run_args(tmp_path, steps=2, save_every=1))
    swapped = tmp_path / "tok"
    shutil.copytree(DEMO2, swapped)
    t = json.loads((swapped / "tokenizer.json").read_text())
    vocab = t["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, other ids
    (swapped / "tokenizer.json").write_text(json.dumps(t))
    with pytest.raises(ConfigError, match="trained with another tokenizer.json than --tokenizer"):
        train.train(_run_args(tmp_path, steps=4, resume=True, tokenizer=str(swapped)))
    assert train.train(_run_args(tmp_path, steps=4, resume=True))["steps"] == 4  # its own tokenizer: resumes


def test_the_warmup_note_comes_when_max_minutes_cuts_the_schedule_below_it(tmp_path, monkeypatch, capsys):
    from mamba_deploy import train

    monkeypatch.setattr(train, "resolve_total_steps", lambda *a: 13)  # the budget leaves 13 of 40 steps
    train.train(_run_args(tmp_path, steps=40, warmup=20, max_minutes=1.0, eval_every=100))
    err = capsys.readouterr().err
    assert "note: --warmup 20 >= the 13 steps --max-minutes 1 leaves: the learning rate rises to" in err, err


@pytest.fixture(scope="module")
def float_model():
    from mamba_deploy import load_model

    return load_model(DEMO2)


@pytest.mark.parametrize("layout", ["mamba_ssm", "shards"])
def test_demo_takes_a_mamba_ssm_or_sharded_checkpoint(tmp_path, float_model, layout):
    from mamba_deploy.checkpoint import save_checkpoint, weight_files
    from mamba_deploy.demo import run_demo

    folder = tmp_path / layout
    if layout == "mamba_ssm":
        save_checkpoint(float_model, folder, fmt="mamba_ssm")
    else:
        save_checkpoint(float_model, folder, max_shard_bytes=400_000)
    files = weight_files(folder)
    assert len(files) > 1 if layout == "shards" else files[0].suffix == ".bin"
    rows, passed = run_demo([folder], only=[], log=lambda *a: None)
    assert passed and len(rows) == 1 and rows[0].size == sum(f.stat().st_size for f in files)
    assert rows[0].format.startswith("pytorch .bin" if layout == "mamba_ssm" else "safetensors")


def test_demo_refuses_a_quantized_checkpoint(tmp_path):
    from mamba_deploy import load_model
    from mamba_deploy.demo import run_demo
    from mamba_deploy.quant import quantize, save_quantized

    save_quantized(quantize(load_model(DEMO2), "int8"), tmp_path / "q")  # quantize swaps modules in place
    with pytest.raises(ConfigError, match="is a quantized checkpoint; the demo exports and checks float checkpoints"):
        run_demo([tmp_path / "q"], only=[], log=lambda *a: None)
