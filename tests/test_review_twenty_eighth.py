"""Twenty-eighth session: the CLI verify's reference pass compares nothing (it used to compare the
reference with a stand-in's zeros and throw the result away), ..."""

from __future__ import annotations

import json

import pytest
from test_runners import export_artifacts


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return export_artifacts(tmp_path_factory.mktemp("runners28"))


def test_cli_verify_compares_each_logit_once(artifacts, tmp_path, monkeypatch):
    """Reference: verify() with both runners open compares every logit row once; the CLI's two
    passes (record the reference, then replay it against the artifact) must compare no more."""
    from mamba_deploy import verify as V
    from mamba_deploy.cli import main

    pytest.importorskip("onnxruntime")
    rows = []
    real = V._Diff._add_rows

    def counted(self, ref, art):
        rows.append(ref.shape[0])
        return real(self, ref, art)

    monkeypatch.setattr(V._Diff, "_add_rows", counted)
    args = ["--lengths", "1,9", "--batch", "1,2", "--decode-steps", "3"]
    main(["verify", str(artifacts["torch"]), str(artifacts["onnx"]), *args, "--quiet",
          "--json", str(tmp_path / "v.json")])
    cli_rows, rows[:] = sum(rows), []
    ref, art, label = V.open_pair(artifacts["torch"], artifacts["onnx"])
    want = V.verify(ref, art, (1, 9), (1, 2), 3, label=label, progress=False).to_dict()
    assert cli_rows == sum(rows) > 0
    got = json.loads((tmp_path / "v.json").read_text())
    assert got["checks"] == json.loads(json.dumps(want["checks"])) and got["passed"] is True


def test_a_runner_returning_no_logits_fails_verification(artifacts):
    """NOT_RUN skips comparison for the CLI's stand-in only: a runner whose answer is not a tensor
    is a VerificationError naming what it returned (it was an AttributeError from inside verify)."""
    from mamba_deploy import verify as V
    from mamba_deploy.errors import VerificationError
    from mamba_deploy.runners import open_runner

    ref, art = open_runner(artifacts["torch"], "torch"), open_runner(artifacts["torch"], "torch")

    class Broken(type(art)):
        def prefill(self, ids, state, attention_mask=None, last_only=False):
            return None, super().prefill(ids, state, attention_mask=attention_mask, last_only=last_only)[1]

    art.__class__ = Broken
    with pytest.raises(VerificationError, match="returned NoneType where the reference has logits"):
        V.verify(ref, art, (3,), (1,), 1, progress=False)


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_hf_pad_vocab_size_multiple_is_ignored_as_transformers_does(ckpt, tmp_path, arch):
    """transformers builds vocab_size rows whatever pad_vocab_size_multiple says (older versions
    saved 8 in every config): a resized vocabulary of 101 ids gave 104 logit columns here
    (128 padded to 48s: 144).
    Reference: transformers' logits, shape and values."""
    import shutil

    import torch
    import transformers

    from mamba_deploy import load_model

    folder = shutil.copytree(ckpt(arch)[0], tmp_path / arch)
    cfg = json.loads((folder / "config.json").read_text())
    vocab = cfg["vocab_size"]
    assert vocab % 48, "the test model's vocabulary must not be a multiple of 48"
    (folder / "config.json").write_text(json.dumps({**cfg, "pad_vocab_size_multiple": 48}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
    got = load_model(folder)(ids).logits
    assert got.shape == want.shape == (2, 7, vocab)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
