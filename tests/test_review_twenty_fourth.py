"""Review (twenty-fourth session): user-level findings, each a test that failed before its fix."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from mamba_deploy import load_model

REPO = Path(__file__).resolve().parents[1]
DEMO2 = REPO / "models" / "demo-mamba2"


def test_a_short_calibration_text_says_it_gives_fewer_sequences_than_n_calib():
    """A --calib text too short for --n-calib sequences silently calibrated on fewer; now a
    warning names how many were taken and what to change. Enough text: no warning."""
    from mamba_deploy.quant.calib import calibration_ids

    model = load_model(DEMO2)
    text = (REPO / "README.md").read_text()
    n_tokens = len(model.tokenizer.encode(text))
    seq_len = n_tokens // 3  # room for 3 sequences
    with pytest.warns(UserWarning, match=r"3 sequence\(s\) of calib_len=%d instead of n_calib=8 \(--n-calib\)"
                      % seq_len):
        ids = calibration_ids(model, text, 8, seq_len)
    assert ids.shape == (3, seq_len)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert calibration_ids(model, text, 3, seq_len).shape == (3, seq_len)
