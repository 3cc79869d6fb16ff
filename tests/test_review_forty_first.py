"""Forty-first session: the last note's leftovers and this session's reviews, each test failing on
the code before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO1, DEMO2 = ROOT / "models" / "demo-mamba1", ROOT / "models" / "demo-mamba2"


# ----------------------------------------------------------------------------- CLI spelling

@pytest.mark.parametrize("argv, said", [
    (["generate", "m", "--prompt", "x", "--temprature", "1"], "did you mean --temperature?"),
    (["genrate", "m"], "did you mean 'generate'?"),
    (["export", "onnxx", "a", "b"], "did you mean 'onnx'?"),
    (["export", "onnx", "a", "b", "--opsett=17"], "did you mean --opset?"),
])
def test_a_mistyped_verb_or_flag_gets_a_did_you_mean_from_its_own_verb(argv, said, capsys):
    """A mistyped flag was reported under the top-level usage (the verb list) with no suggestion;
    it is now reported by the verb it was given to, with the closest flag it has."""
    from mamba_deploy.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert said in err, err
    if argv[0] == "generate":  # the verb's usage, which lists its flags, not the verb list
        assert "usage: mamba-deploy generate" in err and "{inspect,generate" not in err, err


def test_choice_flags_take_any_case():
    """`--outtype Q8_0` (llama.cpp's own spelling) and `--dtype BF16` were refused as invalid
    choices."""
    from mamba_deploy.cli import build_parser

    p = build_parser()
    assert p.parse_args(["export", "gguf", "m", "o.gguf", "--outtype", "Q8_0"]).outtype == "q8_0"
    assert p.parse_args(["export", "onnx", "m", "o", "--dtype", "FP16"]).dtype == "fp16"
    assert p.parse_args(["quantize", "m", "o", "--method", "INT8"]).method == "int8"


def test_sampling_flags_at_temperature_zero_are_said_to_be_ignored():
    """--top-p / --seed with the default greedy temperature changed nothing, silently."""
    import warnings

    from mamba_deploy.cli import main

    argv = ["generate", str(DEMO1), "--prompt", "Once", "--max-new-tokens", "2", "--top-p", "0.5", "--seed", "3"]
    with pytest.warns(UserWarning, match=r"--top-p, --seed only apply when sampling.*--temperature > 0"):
        assert main(argv) == 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(argv + ["--temperature", "0.7"]) == 0
    assert not [w for w in seen if "only apply" in str(w.message)]


def test_export_gguf_prints_sizes_in_one_unit(ckpt, tmp_path, capsys):
    """The existing file was shown in MiB and the written one in decimal MB."""
    from mamba_deploy.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", str(ckpt("mamba")[0]), str(out)]) == 0
    said = capsys.readouterr().out
    size = out.stat().st_size
    from mamba_deploy.progress import human_bytes

    assert f"({human_bytes(size)}, f32)" in said and " MB," not in said, said
    assert human_bytes(3 * 2**20) == "3.0 MiB" and human_bytes(512) == "512 B"


# ----------------------------------------------------------------------------- bench

def test_bench_with_a_failed_target_writes_the_rest_and_exits_1(hf_checkpoint, tmp_path, capsys):
    """One failed target of several exited 0, so a script took a table with a gap for a full one."""
    from mamba_deploy.cli import main

    m1 = hf_checkpoint("mamba")[0]
    out = tmp_path / "b"
    rc = main(["bench", str(m1), str(tmp_path / "missing"), "--out", str(out), "--batch", "1", "--prompt-len", "3",
               "--gen-len", "1", "--warmup", "0", "--repeats", "1", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "1 of 2 targets could not be measured" in err and "missing" in err, err
    data = json.loads((out / "results.json").read_text())
    assert len(data["results"]) == 1 and data["targets"][1]["error"]


# ----------------------------------------------------------------------------- chat template

def test_named_chat_templates_without_a_default_are_not_guessed(tmp_path):
    """With named templates and none called "default", the first was used (transformers refuses
    to guess, and the first may be a tool-use one)."""
    from mamba_deploy.chat import read_chat_template

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "{{ 'TOOLS' }}"}, {"name": "rag", "template": "{{ 'RAG' }}"}]}))
    with pytest.warns(UserWarning, match=r"none named 'default'.*--chat-template FILE"):
        assert read_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "{{ 'TOOLS' }}"}, {"name": "default", "template": "{{ 'D' }}"}]}))
    assert read_chat_template(tmp_path) == "{{ 'D' }}"


# ----------------------------------------------------------------------------- verify Python API

def test_open_pair_with_an_export_as_reference_says_so(onnx_export):
    """The CLI said an ONNX REFERENCE looks swapped; verify.open_pair / open_reference from Python
    failed later with "no config.json"."""
    from mamba_deploy.errors import ConfigError
    from mamba_deploy.verify import open_pair, open_reference

    out, folder, _ = onnx_export("mamba")
    with pytest.raises(ConfigError, match="is an ONNX export, not a checkpoint.*look swapped"):
        open_pair(out, folder)
    with pytest.raises(ConfigError, match="is an ONNX export, not a checkpoint"):
        open_reference(out)
