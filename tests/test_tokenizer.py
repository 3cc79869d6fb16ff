"""Loading a checkpoint's tokenizer: a folder without one is a typed error that names the folder
(transformers would hand back an empty GPT-NeoX tokenizer whose encode() is [] for any text),
and calibration falls back to UTF-8 bytes there. References: `tokenizers` itself and plain
Python byte arithmetic."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mamba_deploy import load_model
from mamba_deploy.cli import main
from mamba_deploy.errors import ModelNotFoundError
from mamba_deploy.tokenizer import load_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 10


@pytest.fixture
def bare(hf_checkpoint, tmp_path):
    """A copy of a tiny checkpoint as transformers saves it: config and weights, no tokenizer."""
    src, _ = hf_checkpoint("mamba")
    shutil.copytree(src, tmp_path / "bare")
    return tmp_path / "bare"


def _bpe(folder, vocab_size=100):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    return tok


def test_folder_without_tokenizer_is_a_clear_error(bare):
    assert not any(p.name.startswith(("tokenizer", "vocab", "merges")) for p in bare.iterdir())
    with pytest.raises(ModelNotFoundError, match=rf"no tokenizer in {bare}.*copy the model's tokenizer.json"):
        load_tokenizer(bare)
    with pytest.raises(ModelNotFoundError, match="no tokenizer in"):
        _ = load_model(bare).tokenizer


def test_config_only_tokenizer_that_encodes_nothing_is_rejected(bare):
    """tokenizer_config.json alone: transformers builds the model type's tokenizer with only its
    special tokens, which encodes every text to []."""
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    with pytest.raises(ModelNotFoundError, match=r"no tokenizer in .* of 2 tokens .* to no tokens"):
        load_tokenizer(bare)


def test_tokenizer_far_smaller_than_the_model_is_rejected(bare):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["def", "return", "[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(bare / "tokenizer.json"))
    assert tok.encode("def main():").ids  # it encodes text: only its size gives it away
    with pytest.raises(ModelNotFoundError, match=r"has 3 tokens, for a model of 128"):
        load_tokenizer(bare)


def test_real_tokenizer_loads_and_encode_batch_equals_encode(bare):
    ref = _bpe(bare)
    tok = load_tokenizer(bare)
    assert tok.vocab_size == ref.get_vocab_size() < 128
    assert tok.encode_batch(TEXTS[:2]) == [ref.encode(t).ids for t in TEXTS[:2]]
    assert tok.encode_batch(TEXTS[:2]) == [tok.encode(t) for t in TEXTS[:2]]
    assert tok.eos_token_id == ref.token_to_id("<|endoftext|>")


def test_cli_verbs_on_a_folder_without_tokenizer_exit_2(bare, capsys):
    assert main(["eval", str(bare), "--corpus", "stdlib-val", "--max-tokens", "50"]) == 2
    assert f"no tokenizer in {bare}" in capsys.readouterr().err
    assert main(["generate", str(bare), "--prompt", "hello", "--max-new-tokens", "2"]) == 2
    assert f"no tokenizer in {bare}" in capsys.readouterr().err


def test_calibration_falls_back_to_bytes_without_tokenizer(bare):
    from mamba_deploy.quant.calib import calibration_ids

    model = load_model(bare)
    text = "x = 'caf\u00e9'\n" * 40  # multi-byte UTF-8 too
    want = [b % model.config.vocab_size for b in text.encode("utf-8")]
    with pytest.warns(UserWarning, match="UTF-8 bytes.*no tokenizer in"):
        ids = calibration_ids(model, text, n_seq=1, seq_len=len(want))
    assert ids.tolist() == [want]
    _bpe(bare)  # with a tokenizer the same call uses its tokens instead
    model = load_model(bare)
    assert calibration_ids(model, text, n_seq=1, seq_len=32).tolist() == [model.tokenizer.encode(text)[:32]]


def test_quantize_cli_calibrates_without_tokenizer(bare, tmp_path):
    """Before: 'calibration data has 0 tokens' (the empty tokenizer raised nothing to fall back on)."""
    with pytest.warns(UserWarning, match="UTF-8 bytes"):
        assert main(["quantize", str(bare), str(tmp_path / "q"), "--method", "gptq", "--group-size", "32",
                     "--n-calib", "2", "--calib-len", "64"]) == 0
    q = load_model(tmp_path / "q")
    ids = torch.arange(10)[None]
    assert torch.isfinite(q(ids).logits).all()
