"""Training: corpus split rule, shipped tokenizer, schedule, init, training forward, a CPU smoke
run whose loss falls, resume, and the errors a user can cause."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from mamba_deploy import data, train
from mamba_deploy.errors import ConfigError, MambaDeployError

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def _is_val(relpath: str) -> bool:
    """The documented rule, written out independently of data.split_of."""
    first8 = hashlib.sha256(relpath.encode()).hexdigest()[:16]
    return int(first8, 16) * 100 < 10 * 2**64


def test_split_rule_matches_documented_hash_and_is_disjoint():
    tr, va = data.corpus_files("train"), data.corpus_files("val")
    tr_rel, va_rel = {r for r, _ in tr}, {r for r, _ in va}
    assert not tr_rel & va_rel
    assert all(not _is_val(r) for r in tr_rel) and all(_is_val(r) for r in va_rel)
    assert 0.05 < len(va_rel) / (len(va_rel) + len(tr_rel)) < 0.15
    banned = {"test", "tests", "site-packages", "encodings", "idle_test"}
    assert not any(set(r.split("/")[:-1]) & banned for r in tr_rel | va_rel)
    # the rule sees only the path string: same answer on any machine / Python version
    for rel in ("json/decoder.py", "asyncio/tasks.py", "a/b/c.py", "os.py"):
        assert (data.split_of(rel) == "val") == _is_val(rel)


def test_split_is_independent_of_the_root(tmp_path):
    """Files present under another root (another Python version) land on the same side."""
    for rel in ("pkg/x.py", "pkg/sub/y.py", "z.py", "w.py", "q/r.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text("pass\n")
    got = {}
    for split in ("train", "val"):
        try:
            got.update({r: split for r, _ in data.corpus_files(split, tmp_path)})
        except MambaDeployError:  # one side may be empty for five files
            pass
    assert set(got) == {"pkg/x.py", "pkg/sub/y.py", "z.py", "w.py", "q/r.py"}
    assert all((s == "val") == _is_val(r) for r, s in got.items())


@pytest.mark.parametrize("name", ["demo-mamba1", "demo-mamba2"])
def test_shipped_tokenizer_loads_in_transformers_and_ours(name):
    from transformers import AutoTokenizer

    from mamba_deploy.tokenizer import load_tokenizer

    folder = MODELS / name
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert hf.eos_token == data.EOS and hf.bos_token == data.EOS
    assert ours.eos_token_id == hf.eos_token_id == hf.convert_tokens_to_ids(data.EOS)
    assert ours.vocab_size == len(hf) == 4096
    text = 'def f(x):\n    """Dölt ∑ 🙂"""\n\treturn {x: [1, 2]}  # end\n'
    ids = ours.encode(text)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == text == hf.decode(ids)
    assert len(ids) < len(text.encode()) / 1.5  # BPE merges actually compress code
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["eos_token_id"] == ours.eos_token_id


def test_train_tokenizer_writes_loadable_files(tmp_path):
    """train-tokenizer writes files AutoTokenizer loads, with the special tokens named."""
    from transformers import AutoTokenizer

    out = data.train_tokenizer(tmp_path / "tok", vocab_size=512)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 512 and tok.eos_token == data.EOS and tok.pad_token == data.PAD
    with pytest.raises(ConfigError, match="vocab_size=100"):
        data.train_tokenizer(tmp_path / "bad", vocab_size=100)


def test_lr_schedule_closed_form():
    peak, warm, total = 1e-3, 10, 110
    assert train.lr_at(0, total, peak, warm) == pytest.approx(peak / warm)
    assert train.lr_at(9, total, peak, warm) == pytest.approx(peak)
    assert train.lr_at(10, total, peak, warm) == pytest.approx(peak)
    assert train.lr_at(60, total, peak, warm) == pytest.approx(peak * (0.1 + 0.9 * 0.5))
    assert train.lr_at(110, total, peak, warm) == pytest.approx(0.1 * peak)
    lrs = [train.lr_at(s, total, peak, warm) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("preset", ["tiny-mamba1", "tiny-mamba2"])
def test_init_weights_follow_mamba_init(preset):
    from mamba_deploy.model import MambaLM

    cfg = train.build_config(preset, 256, 0, 1)
    model = MambaLM(cfg)
    train.init_weights(model, seed=0)
    for layer in model.backbone.layers:
        m = layer.mixer
        bias = m.dt_proj.bias if cfg.arch == "mamba1" else m.dt_bias
        dt = torch.log1p(torch.exp(bias.detach().double()))  # softplus, float64
        assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
        if cfg.arch == "mamba1":
            want = torch.arange(1, cfg.d_state + 1, dtype=torch.float64).expand(cfg.d_inner, -1)
            assert torch.allclose(torch.exp(m.A_log.double()), want)
        else:
            assert 1 <= float(torch.exp(m.A_log.detach()).min()) and float(torch.exp(m.A_log.detach()).max()) <= 16


@pytest.mark.parametrize("kind", ["mamba", "mamba2_g2"])
def test_training_forward_matches_transformers(hf_checkpoint, kind):
    from mamba_deploy import load_model

    folder, hf = hf_checkpoint(kind)
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        got = train.lm_logits(load_model(folder), ids)
    assert rel_err(got, ref) < 1e-4


def test_mamba1_gradients_fit_one_batch():
    """Gradient flow through the Mamba1 path: repeating one batch must drive its loss down."""
    from mamba_deploy.model import MambaLM

    torch.manual_seed(0)
    cfg = train.build_config("tiny-mamba1", 64, 0, 1)
    model = MambaLM(cfg)
    train.init_weights(model, 0)
    opt = train.make_optimizer(model, 1e-2, 0.0)
    args = argparse.Namespace(lr=1e-2, warmup=1, clip=1.0)
    batch = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = [train.train_step(model, opt, batch, torch.device("cpu"), None, args, s, 1000)[0] for s in range(15)]
    assert losses[0] == pytest.approx(math.log(64), abs=0.1)  # starts near uniform
    assert losses[-1] < losses[0] - 1.0


def _args(tmp_path, **kw):
    base = dict(preset="tiny-mamba2", tokenizer=str(MODELS / "demo-mamba2"), out=str(tmp_path / "out"),
                work_dir=str(tmp_path / "work"), data_cache=str(tmp_path.parent / "stdlib-cache"), steps=40,
                max_minutes=None, batch=8, seq_len=64, lr=3e-3, warmup=5, weight_decay=0.1, clip=1.0,
                amp=None, device="cpu", eval_every=10, eval_batch=8, eval_tokens=0, save_every=20, seed=0,
                resume=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_cpu_training_smoke_loss_decreases(tmp_path):
    from transformers import AutoModelForCausalLM

    from mamba_deploy import load_model

    metrics = train.train(_args(tmp_path))
    log = metrics["log"]
    assert [e["step"] for e in log] == [10, 20, 30, 40]
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 0.3
    assert log[-1]["loss"] < math.log(4096) - 0.7  # well below the uniform-guess loss
    assert metrics["tokens_seen"] == 40 * 8 * 64
    out = Path(tmp_path / "out")
    saved = json.loads((out / "train_log.json").read_text())
    assert saved["steps"] == 40 and (out / "tokenizer.json").exists()
    # the fp16 snapshot loads in ours and in transformers and they agree
    ids = torch.randint(0, 4096, (1, 50), generator=torch.Generator().manual_seed(0))
    ours = load_model(out)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) < 1e-4
    # resume continues from the saved state instead of starting over
    assert (tmp_path / "work" / "train_state.pt").exists()
    more = train.train(_args(tmp_path, steps=44, resume=True, eval_every=2))
    assert more["steps"] == 44 and [e["step"] for e in more["log"]][:4] == [10, 20, 30, 40]
    assert more["log"][-1]["val_loss"] < log[0]["val_loss"]


def test_user_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        train.build_config("huge", 100, 0, 1)
    with pytest.raises(ConfigError, match="tokenizer.json"):
        train.train(_args(tmp_path, tokenizer=str(tmp_path)))
    with pytest.raises(ConfigError, match="fewer than --seq-len"):
        import numpy as np

        train.sample_batch(np.arange(10), 2, 64, np.random.default_rng(0))


# ----------------------------------------------------------------------------- review fixes

def _tiny_corpus(root: Path, n: int = 60) -> Path:
    """A small stdlib-like tree with files on both sides of the split, varied enough that BPE
    tokenizers of different sizes encode it differently."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 9))) for _ in range(200)]
    for i in range(n):
        p = root / f"pkg{i % 3}" / f"mod{i}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(f"def {rng.choice(words)}({rng.choice(words)}, {rng.choice(words)}={i}):\n"
                             f"    return {rng.choice(words)}.{rng.choice(words)}({rng.choice(words)})\n"
                             for _ in range(20)))
    assert data.corpus_files("train", root) and data.corpus_files("val", root)
    return root


def _tiny_tokenizer(tmp_path, name: str, vocab: int, corpus: Path) -> Path:
    return data.train_tokenizer(tmp_path / name, vocab_size=vocab, root=corpus)


def test_load_split_cache_switching_tokenizers_reencodes_both_splits(tmp_path):
    """A cache filled with tokenizer A, then used with B (train first, as `train` does), must give
    B's encoding of both splits, never A's stale val.npy."""
    from mamba_deploy.tokenizer import load_tokenizer

    corpus = _tiny_corpus(tmp_path / "corpus")
    tok_a = _tiny_tokenizer(tmp_path, "tokA", 300, corpus)
    tok_b = _tiny_tokenizer(tmp_path, "tokB", 400, corpus)
    assert data.tokenizer_digest(tok_a) != data.tokenizer_digest(tok_b)
    enc_a, enc_b = (data.encode_split(load_tokenizer(t), "val", corpus).tolist() for t in (tok_a, tok_b))
    assert enc_a != enc_b  # so a stale val stream would be noticed
    cache = tmp_path / "cache"
    for split in ("train", "val"):
        data.load_split(tok_a, split, cache, corpus)
    for tok in (tok_b, tok_a, tok_b):
        for split in ("train", "val"):
            got = data.load_split(tok, split, cache, corpus)
            want = data.encode_split(load_tokenizer(tok), split, corpus)
            assert got.tolist() == want.tolist(), (tok.name, split)
        # and read back from the cache
        for split in ("train", "val"):
            want = data.encode_split(load_tokenizer(tok), split, corpus)
            assert data.load_split(tok, split, cache, corpus).tolist() == want.tolist()
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["train_tokenizer_digest"] == meta["val_tokenizer_digest"] == data.tokenizer_digest(tok_b)


def test_load_split_drops_stale_split_left_by_a_previous_cache(tmp_path):
    """A cache written before per-split digests, where val.npy is another tokenizer's leftover
    (meta has no val count), is re-encoded; a consistent one (counts match) is still used."""
    import numpy as np

    from mamba_deploy.tokenizer import load_tokenizer

    corpus = _tiny_corpus(tmp_path / "corpus")
    tok = _tiny_tokenizer(tmp_path, "tok", 300, corpus)
    cache = tmp_path / "cache"
    cache.mkdir()
    train_ids = data.encode_split(load_tokenizer(tok), "train", corpus)
    np.save(cache / "train.npy", train_ids)
    np.save(cache / "val.npy", np.full(7, 999, dtype=np.int32))  # stale, ids beyond the vocab
    (cache / "meta.json").write_text(json.dumps({"tokenizer_digest": data.tokenizer_digest(tok),
                                                 "train_tokens": int(train_ids.size)}))
    want_val = data.encode_split(load_tokenizer(tok), "val", corpus)
    assert data.load_split(tok, "val", cache, corpus).tolist() == want_val.tolist()
    assert data.load_split(tok, "train", cache, corpus).tolist() == train_ids.tolist()


def test_load_split_checks_the_cache_folder_before_encoding(tmp_path, monkeypatch):
    from mamba_deploy.errors import OutputPathError

    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(data, "encode_split", lambda *a, **k: pytest.fail("encoded before checking the cache"))
    with pytest.raises(OutputPathError, match="afile"):
        data.load_split(MODELS / "demo-mamba1", "val", tmp_path / "afile" / "cache")


def test_train_tokenizer_checks_the_output_before_training(tmp_path, monkeypatch, capsys):
    from mamba_deploy.errors import OutputPathError

    corpus = _tiny_corpus(tmp_path / "corpus")
    existing = _tiny_tokenizer(tmp_path, "model", 300, corpus)
    before = (existing / "tokenizer.json").read_bytes()
    (tmp_path / "afile").write_text("x")
    real_texts = data.corpus_texts
    monkeypatch.setattr(data, "corpus_texts", lambda *a, **k: pytest.fail("trained before checking the output"))
    with pytest.raises(OutputPathError, match="afile"):
        data.train_tokenizer(tmp_path / "afile" / "tok", vocab_size=300, root=corpus)
    with pytest.raises(OutputPathError, match="is a file"):
        data.train_tokenizer(tmp_path / "afile", vocab_size=300, root=corpus)
    with pytest.raises(OutputPathError, match="already has a tokenizer.json.*--overwrite"):
        data.train_tokenizer(existing, vocab_size=320, root=corpus)
    assert (existing / "tokenizer.json").read_bytes() == before
    # through the CLI: a typed error (exit 2, as the mamba-deploy command gives), before any training
    assert train.main(["train-tokenizer", str(existing), "--vocab-size", "320"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite replaces the tokenizer files on purpose
    monkeypatch.setattr(data, "corpus_texts", real_texts)
    out = data.train_tokenizer(existing, vocab_size=320, root=corpus, overwrite=True)
    assert (out / "tokenizer.json").read_bytes() != before
    from mamba_deploy.tokenizer import load_tokenizer

    assert load_tokenizer(out).vocab_size == 320


def test_train_checks_outputs_before_any_work(tmp_path, monkeypatch):
    from mamba_deploy.errors import OutputPathError

    monkeypatch.setattr(train, "load_data", lambda args: pytest.fail("loaded data before checking outputs"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match="afile"):
        train.train(_args(tmp_path, out=str(tmp_path / "afile" / "m"), work_dir=None))
    with pytest.raises(OutputPathError, match="is a file"):
        train.train(_args(tmp_path, out=str(tmp_path / "afile")))
    with pytest.raises(OutputPathError, match="afile"):
        train.train(_args(tmp_path, work_dir=str(tmp_path / "afile" / "work")))
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.jpg").write_text("precious")
    with pytest.raises(OutputPathError, match="not a `mamba-deploy train` output"):
        train.train(_args(tmp_path, out=str(foreign)))
    assert (foreign / "keep.jpg").read_text() == "precious"
    if Path("/proc/self").is_dir():
        with pytest.raises(OutputPathError):
            train.train(_args(tmp_path, out="/proc/mamba-deploy-out", work_dir=None))


@pytest.mark.parametrize("argv", [
    ["--eval-every", "0"], ["--save-every", "0"], ["--batch", "0"], ["--eval-batch", "0"], ["--seq-len", "0"],
    ["--steps", "-1"], ["--steps", "0"], ["--lr", "0"], ["--lr", "nan"], ["--warmup", "-1"], ["--clip", "0"],
    ["--weight-decay", "-0.1"], ["--max-minutes", "0"], ["--eval-tokens", "-5"], ["--seed", "-1"],
])
def test_train_numeric_flags_are_range_checked(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.setattr(train, "train", lambda args: pytest.fail(f"ran with {argv}"))
    with pytest.raises(SystemExit) as e:
        train.main(["train", "--tokenizer", str(MODELS / "demo-mamba1"), "--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_train_tokenizer_vocab_size_is_range_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["train-tokenizer", str(tmp_path / "t"), "--vocab-size", "-3"])
    assert e.value.code == 2 and "--vocab-size" in capsys.readouterr().err


def _tiny_run(tmp_path, **kw):
    base = dict(steps=2, batch=2, seq_len=16, eval_every=1, save_every=1, eval_batch=2, warmup=1)
    return _args(tmp_path, **{**base, **kw})


def test_resume_with_another_preset_is_a_typed_error(tmp_path):
    train.train(_tiny_run(tmp_path, preset="tiny-mamba2"))
    with pytest.raises(ConfigError, match="preset 'tiny-mamba2', not --preset 'tiny-mamba1'"):
        train.train(_tiny_run(tmp_path, preset="tiny-mamba1", steps=3, resume=True))
    # a state saved before the preset was recorded: still a typed error naming the preset
    state = tmp_path / "work" / "train_state.pt"
    st = torch.load(state, weights_only=False)
    del st["preset"]
    torch.save(st, state)
    with pytest.raises(ConfigError, match="does not fit --preset 'tiny-mamba1'"):
        train.train(_tiny_run(tmp_path, preset="tiny-mamba1", steps=3, resume=True))
    assert train.train(_tiny_run(tmp_path, preset="tiny-mamba2", steps=3, resume=True))["steps"] == 3


def test_saved_vocab_is_the_tokenizers_not_padded(tmp_path):
    """A 300-token tokenizer gives a checkpoint with vocab_size 300 and 300-wide logits (no untrained
    padded rows in the softmax); a 4096 one (the demo models) is unchanged."""
    from mamba_deploy import load_model
    from mamba_deploy.eval import perplexity
    from mamba_deploy.runners.torch_runner import TorchRunner
    from mamba_deploy.tokenizer import load_tokenizer

    for preset in ("tiny-mamba1", "tiny-mamba2"):
        cfg = train.build_config(preset, 300, 0, 1)
        assert cfg.to_hf_dict()["vocab_size"] == 300
        assert train.build_config(preset, 4096, 0, 1).to_hf_dict()["vocab_size"] == 4096
    corpus = _tiny_corpus(tmp_path / "corpus")
    tok = _tiny_tokenizer(tmp_path, "tok300", 300, corpus)
    assert load_tokenizer(tok).vocab_size == 300
    metrics = train.train(_tiny_run(tmp_path, tokenizer=str(tok), data_cache=str(tmp_path / "cache"),
                                    eval_tokens=300))
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 300 == metrics["config"]["vocab_size"]
    model = load_model(out)
    with torch.no_grad():
        logits = model(torch.tensor([[0, 5, 7, 299]])).logits
    assert logits.shape[-1] == 300
    val_ids = data.load_split(tok, "val", tmp_path / "cache")
    res = perplexity(TorchRunner(model), val_ids[:300], window=512)
    assert res["ppl"] == pytest.approx(metrics["validation"]["ppl"], rel=1e-4)


@pytest.mark.parametrize("batch,seq_len,micro,noted", [(2, 4096, 1, True), (8, 64, 8, False), (8, 512, 4, False)])
def test_cpu_training_splits_the_batch_into_micro_batches(tmp_path, capsys, batch, seq_len, micro, noted):
    """The demo presets' defaults (32 x 512 tokens in one pass) were killed by the OOM killer on a
    23 GB CPU machine without a word. On a CPU the step's gradients are now accumulated over
    micro-batches of at most CPU_MICRO_TOKENS tokens (one sequence at least), said on stdout and
    recorded in the metrics; a single sequence longer than that still gets the memory note."""
    metrics = train.train(_args(tmp_path, steps=1, batch=batch, seq_len=seq_len, eval_every=1, eval_batch=1,
                                save_every=1))
    out, err = capsys.readouterr()
    assert metrics["micro_batch"] == micro
    assert (f"micro-batches of {micro} sequences" in out) == (micro != batch)
    assert ("lower --micro-batch or --seq-len" in err) == noted


def test_micro_batch_larger_than_batch_is_refused_before_any_output(tmp_path):
    with pytest.raises(ConfigError, match=r"--micro-batch 9 is larger than --batch 8"):
        train.train(_args(tmp_path, steps=1, micro_batch=9))
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize("preset", ["tiny-mamba1", "tiny-mamba2"])
@pytest.mark.parametrize("micro", [1, 4])
def test_micro_batches_accumulate_the_whole_batch_gradient(preset, micro):
    """train_step with micro-batches (4 + 2 sequences: uneven) leaves the gradient of the whole
    batch's mean next-token cross entropy, computed here on a copy in one pass with autograd and
    clipped by hand (1e-5 relative per parameter), and returns that mean as its loss."""
    from mamba_deploy.model import MambaLM

    torch.manual_seed(0)
    model = MambaLM(train.build_config(preset, 64, 0, 1))
    train.init_weights(model, 0)
    ref = copy.deepcopy(model)
    batch = torch.randint(0, 64, (6, 40), generator=torch.Generator().manual_seed(3))
    loss = F.cross_entropy(train.lm_logits(ref, batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    clip = 0.5
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref.parameters()))
    scale = min(1.0, clip / float(norm))
    opt = train.make_optimizer(model, 1e-3, 0.0)
    args = argparse.Namespace(lr=1e-3, warmup=1, clip=clip, micro_batch=micro)
    got_loss, _ = train.train_step(model, opt, batch, torch.device("cpu"), None, args, 0, 10)
    assert got_loss == pytest.approx(float(loss.detach()), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad * scale) <= 1e-5, name




def test_snapshot_interrupted_between_its_renames_keeps_the_previous_one(tmp_path, monkeypatch):
    """save_snapshot moves the previous snapshot aside, then the new one in: an interrupt between the
    two renames used to leave no OUT folder (the previous snapshot under .OUT.old). Now OUT holds
    the previous snapshot, loadable, and no temporary folder is left."""
    from pathlib import Path as P

    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.model import MambaLM

    model = MambaLM(train.build_config("tiny-mamba2", 64, 0, 1))
    train.init_weights(model, 0)
    model.source_path = MODELS / "demo-mamba2"
    out = tmp_path / "out"
    train.save_snapshot(model, out, torch.float16, {"step": 1})
    real = P.rename

    def rename(self, target):
        if P(target) == out and self.name.startswith(".out.snap-"):
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(P, "rename", rename)
    with torch.no_grad():
        model.backbone.embeddings.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        train.save_snapshot(model, out, torch.float16, {"step": 2})
    monkeypatch.undo()
    assert json.loads((out / "train_log.json").read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    load_model(out)


def test_a_spent_time_budget_still_evaluates_and_saves_the_last_step(tmp_path):
    """--max-minutes already spent when the budget is first resolved (after 12 steps): the new
    total fell below the steps done, `step == total` never held, and the run ended with no
    last-step evaluation and no resumable state."""
    metrics = train.train(_args(tmp_path, steps=1000, max_minutes=1e-6, batch=2, seq_len=32, eval_batch=2,
                                eval_every=1000, save_every=1000))
    assert metrics["steps"] == 12
    assert [e["step"] for e in metrics["log"]] == [12]
    assert list((tmp_path / "work").glob("*.pt")), list((tmp_path / "work").iterdir())


def test_resume_without_its_state_does_not_replace_the_model_in_out(tmp_path):
    """--resume that finds no training state (the first run had another --work-dir) trained from
    scratch and replaced the finished model in --out, which a fresh run refuses to do without
    --overwrite: now a typed error naming the missing state, and the model is kept."""
    from mamba_deploy.errors import CheckpointError

    train.train(_tiny_run(tmp_path, work_dir=str(tmp_path / "elsewhere")))
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match=r"no training state at .*work.*--work-dir"):
        train.train(_tiny_run(tmp_path, steps=3, resume=True))
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert train.train(_tiny_run(tmp_path, steps=3, resume=True, work_dir=str(tmp_path / "elsewhere")))["steps"] == 3


def test_resume_writes_the_final_snapshot_a_failed_save_left_out(tmp_path, monkeypatch):
    """The last step's training state is saved before its snapshot; when that snapshot write failed
    (disk full, Ctrl-C), --resume refused (the state had done --steps) and --out kept an older
    model, recoverable only by training further (another learning-rate schedule). Now --resume
    with the same --steps writes the final model from the state: the model an uninterrupted run
    writes."""
    from mamba_deploy.errors import OutputPathError

    full = train.train(_tiny_run(tmp_path / "a", steps=4, save_every=2))
    real = train.save_snapshot
    calls = []

    def fail_last(model, out, dtype, metrics):
        calls.append(metrics["steps"])
        if metrics["steps"] == 4:
            raise OutputPathError("disk full (simulated)")
        return real(model, out, dtype, metrics)

    monkeypatch.setattr(train, "save_snapshot", fail_last)
    with pytest.raises(OutputPathError):
        train.train(_tiny_run(tmp_path / "b", steps=4, save_every=2))
    monkeypatch.setattr(train, "save_snapshot", real)
    assert json.loads((tmp_path / "b" / "out" / "train_log.json").read_text())["steps"] == 2
    again = train.train(_tiny_run(tmp_path / "b", steps=4, save_every=2, resume=True))
    strip = lambda log: [{k: v for k, v in e.items() if k != "elapsed_s"} for e in log]  # noqa: E731
    assert again["steps"] == 4 and strip(again["log"]) == strip(full["log"])
    assert (tmp_path / "b" / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "a" / "out" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="has already done 4 steps"):  # now saved: nothing left to do
        train.train(_tiny_run(tmp_path / "b", steps=4, save_every=2, resume=True))
