"""Adversarial audit of the writers: interrupted writes, odd output paths, racing writers."""

import json
import random
import threading
from pathlib import Path

import pytest

from mamba_deploy import data
from mamba_deploy.atomic import atomic_dir


def _leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _run_both(fn, *argsets):
    results = [None] * len(argsets)

    def go(i, args):
        try:
            results[i] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            results[i] = e

    threads = [threading.Thread(target=go, args=(i, a)) for i, a in enumerate(argsets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def _fail_writing(monkeypatch, name: str, exc=KeyboardInterrupt):
    """Path.write_bytes raises for the file `name` (or its temporary): an interrupt mid-set."""
    real = Path.write_bytes

    def write_bytes(self, data):
        if name in self.name:
            raise exc()
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


# ------------------------------------------------------------------ GGUF: two threads, one file

def test_gguf_two_threads_exporting_to_one_file_both_finish_with_one_complete_file(ckpt, tmp_path, monkeypatch):
    from mamba_deploy.export import gguf as G
    src, _ = ckpt("mamba")
    (tmp_path / "ref").mkdir()
    ref = G.export_gguf(str(src), tmp_path / "ref" / "m.gguf").read_bytes()  # one writer alone
    out = tmp_path / "m.gguf"
    barrier = threading.Barrier(2, timeout=30)
    real = G.write_gguf

    def write_gguf(*a, **k):  # both writers are past writing their temporary when either renames it
        r = real(*a, **k)
        barrier.wait()
        return r

    monkeypatch.setattr(G, "write_gguf", write_gguf)
    results = _run_both(G.export_gguf, (str(src), out), (str(src), out))
    assert all(r == out for r in results), results
    assert _leftovers(tmp_path) == []
    assert out.read_bytes() == ref


# ------------------------------------------------------------------ folders: two writers racing

def test_atomic_dir_race_the_loser_gets_a_typed_error_and_the_winner_set_stays_whole(tmp_path):
    from mamba_deploy.errors import CheckpointError

    out = tmp_path / "out"
    barrier = threading.Barrier(2, timeout=30)

    def writer(tag):
        with atomic_dir(out, CheckpointError) as tmp:
            (tmp / "a.txt").write_text(tag)
            (tmp / "b.txt").write_text(tag)
            barrier.wait()  # both checked `out` and filled their temporaries before either renames
        return tag

    results = _run_both(writer, ("one",), ("two",))
    won = [r for r in results if isinstance(r, str)]
    lost = [r for r in results if not isinstance(r, str)]
    assert len(won) == 1 and len(lost) == 1, results
    assert isinstance(lost[0], CheckpointError) and str(out) in str(lost[0]) and "choose" in str(lost[0])
    assert (out / "a.txt").read_text() == (out / "b.txt").read_text() == won[0]
    assert _leftovers(tmp_path) == []


def test_convert_into_a_symlink_to_an_empty_folder_writes_the_target(hf_checkpoint, tmp_path):
    from mamba_deploy.checkpoint import load_model, save_checkpoint

    src, _ = hf_checkpoint("mamba")
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    out = save_checkpoint(load_model(src), link)
    assert link.is_symlink() and (target / "config.json").is_file()
    assert load_model(out) is not None
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------ file sets: bench, train-tokenizer

def _tiny_corpus(root: Path) -> Path:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 9))) for _ in range(200)]
    for i in range(30):
        p = root / f"pkg{i % 3}" / f"mod{i}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(f"def {rng.choice(words)}({rng.choice(words)}, {rng.choice(words)}={i}):\n"
                             f"    return {rng.choice(words)}.{rng.choice(words)}()\n" for _ in range(20)))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _tiny_corpus(tmp_path_factory.mktemp("corpus"))


def test_train_tokenizer_interrupted_between_files_leaves_no_partial_folder(corpus, tmp_path, monkeypatch):
    out = tmp_path / "tok"
    _fail_writing(monkeypatch, "tokenizer_config.json")
    with pytest.raises(KeyboardInterrupt):
        data.train_tokenizer(out, vocab_size=300, root=corpus)
    assert not out.exists()  # neither a tokenizer.json without its config nor an empty folder
    assert _leftovers(tmp_path) == []


def test_train_tokenizer_overwrite_interrupted_keeps_the_previous_set_whole(corpus, tmp_path, monkeypatch):
    out = data.train_tokenizer(tmp_path / "tok", vocab_size=300, root=corpus)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_writing(monkeypatch, "special_tokens_map.json")
    with pytest.raises(KeyboardInterrupt):
        data.train_tokenizer(out, vocab_size=320, root=corpus, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not the new tokenizer.json with old maps
    monkeypatch.undo()
    data.train_tokenizer(out, vocab_size=320, root=corpus, overwrite=True)
    assert (out / "tokenizer.json").read_bytes() != before["tokenizer.json"]
    assert _leftovers(out) == []


def test_bench_outputs_write_failure_keeps_the_previous_run_whole(hf_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from mamba_deploy import bench as B
    from mamba_deploy.cli import main

    m1, _ = hf_checkpoint("mamba")
    out = tmp_path / "bench"
    assert main(["bench", str(m1), "--out", str(out), "--batch", "1", "--prompt-len", "3", "--gen-len", "2",
                 "--warmup", "0", "--repeats", "1", "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    run = json.loads((out / "results.json").read_text())
    run["settings"]["gen_len"] = 99  # a different run, so a rewrite would show
    _fail_writing(monkeypatch, "results.md", OSError)  # e.g. the disk fills after results.json
    with pytest.raises(OSError):
        B.write_outputs(run, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not new results.json beside old tables
    assert _leftovers(out) == []
