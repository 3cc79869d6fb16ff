"""Findings of the thirtieth session's reviews (real-width models through every verb; README walk)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from mamba_deploy.tokenizer import load_tokenizer

DEMO2 = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"


def _demo_tokenizer_for(tmp_path: Path, vocab_size: int) -> Path:
    folder = tmp_path / f"vocab{vocab_size}"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO2 / name, folder / name)
    cfg = json.loads((DEMO2 / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": vocab_size}))
    return folder


def test_a_tokenizer_far_smaller_than_the_vocabulary_is_named(tmp_path):
    """The 4096-token demo tokenizer beside a 50288-row model (the review copied it into a random
    mamba2-130m-width checkpoint): every sampled id past 4095 decoded to nothing, `generate`
    printed only the prompt, and a GGUF export padded 46184 unused tokens, with no message. Now a
    warning names both sizes and the fix; a few padding rows (mamba-130m's 3, the tiny test
    models' tens) stay silent."""
    with pytest.warns(UserWarning, match=r"4096 tokens for a model of 50288 embedding rows.*--tokenizer PATH"):
        tok = load_tokenizer(_demo_tokenizer_for(tmp_path, 50288))
    assert tok.vocab_size == 4096
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tokenizer(DEMO2)
        load_tokenizer(_demo_tokenizer_for(tmp_path, 4096 + 1024))  # padded, within the allowance
