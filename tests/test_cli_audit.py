"""User errors that a CLI audit (2026-11-23) found handled badly: flags that conflict or do
nothing were silently dropped, a binary --calib file was read with its bytes replaced, and
messages named internal variables instead of the flag or file to change. Each test fails on
the code before the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from mamba_deploy.cli import main
from mamba_deploy.errors import QuantizationError

DEMO = str(Path(__file__).resolve().parents[1] / "models" / "demo-mamba1")


@pytest.fixture
def files(tmp_path):
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(128, 256)) * 20)  # not UTF-8
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    return {"binary": str(binary), "empty": str(empty)}


def _fails(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("flags,needles", [
    (["--method", "int4", "--auto"], ["--method int4 and --auto exclude each other", "drop one"]),
    (["--method", "int4", "--target", "gpu"], ["--target gpu applies with --auto only"]),
])
def test_quantize_refuses_flags_it_would_ignore(flags, needles, tmp_path, capsys):
    """--auto used to override --method without a word, and --target without --auto did nothing."""
    _fails(["quantize", DEMO, str(tmp_path / "q"), *flags], capsys, *needles)
    assert not (tmp_path / "q").exists()


def test_quantize_auto_still_defaults_to_the_cpu_target(tmp_path, capsys):
    assert main(["quantize", DEMO, str(tmp_path / "q"), "--auto"]) == 0
    assert "--auto picked" in capsys.readouterr().out and (tmp_path / "q").is_dir()


def test_a_calibration_file_that_is_not_utf8_is_refused(files, tmp_path, capsys):
    """It was read with errors="replace": GPTQ calibrated on U+FFFD characters and wrote a checkpoint."""
    _fails(["quantize", DEMO, str(tmp_path / "q"), "--method", "gptq", "--calib", files["binary"]], capsys,
           f"cannot read calibration file {files['binary']!r} as UTF-8 text", "iconv")
    assert not (tmp_path / "q").exists()
    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.quant.calib import calibration_ids

    with pytest.raises(QuantizationError, match="as UTF-8 text"):
        calibration_ids(load_model(DEMO), calib=files["binary"])


def test_a_calib_len_longer_than_the_text_names_calib_len(tmp_path, capsys):
    """The message said "use a longer --calib file" when no --calib was given."""
    _fails(["quantize", DEMO, str(tmp_path / "q"), "--method", "gptq", "--calib-len", "100000000"], capsys,
           "calib_len=100000000 (--calib-len)", "lower --calib-len")


def test_verify_text_too_short_names_the_file(files, capsys):
    """It said "the text (text_ids) has 0 token(s)"."""
    _fails(["verify", DEMO, DEMO, "--text", files["empty"], "--lengths", "1", "--batch", "1", "--quiet"], capsys,
           f"--text {files['empty']!r} is 0 token(s)", "give a longer text")


@pytest.mark.parametrize("how,needle", [
    ("max_tokens", "--max-tokens 1 leaves 1; raise it"),
    ("empty", "has 0; give a longer text"),
    ("binary", "as UTF-8 text"),
])
def test_eval_too_few_tokens_names_what_to_change(how, needle, files, capsys):
    """--max-tokens 1 was told to "give a longer text"."""
    src = ["--corpus", "stdlib-val", "--max-tokens", "1"] if how == "max_tokens" else ["--text", files[how]]
    _fails(["eval", DEMO, *src], capsys, needle)


@pytest.mark.parametrize("field,value,needle", [
    ("presence_penalty", 1.0, "presence_penalty is not supported; use `repetition_penalty`"),
    ("frequency_penalty", -0.5, "frequency_penalty is not supported; use `repetition_penalty`"),
    ("logit_bias", {"5": 3}, "logit_bias is not supported"),
    ("top_k", -2, "`top_k` must be >= 0 (0 or -1 = off, as in vLLM), got -2"),
    ("temperature", -0.5, "`temperature` must be >= 0 (0 = greedy), got -0.5"),
    ("top_p", 0, "`top_p` must be in (0, 1], got 0"),
    ("min_p", 1.5, "`min_p` must be in [0, 1], got 1.5"),
    ("repetition_penalty", 0, "`repetition_penalty` must be > 0 (1 = off), got 0"),
])
def test_serve_refuses_sampling_fields_it_would_ignore_or_misread(field, value, needle):
    """presence / frequency penalties and logit_bias were accepted and not applied (a 200 for a
    request the server did not honour); out-of-range sampling values were a 400 without `param`
    and with the internal SamplingConfig(...) text."""
    from mamba_deploy.serve_request import RequestError, parse_completion_request

    with pytest.raises(RequestError) as e:
        parse_completion_request({"prompt": "x", field: value}, 8, 100, 100)
    assert needle in str(e.value) and e.value.param == field and e.value.status == 400


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_serve_takes_the_zero_penalties_openai_clients_send(field):
    from mamba_deploy.serve_request import parse_completion_request

    for v in (0, 0.0, None):
        parse_completion_request({"prompt": "x", field: v}, 8, 100, 100)


@pytest.mark.parametrize("key,value,needle", [
    ("dtype", "int8", "dtype must be one of ['fp32', 'fp16'], not 'int8'"),
    ("state_dtype", "weird", "state_dtype must be one of ['float32']"),
    ("graph", "/etc/passwd", "graph must be one of ['model.onnx']"),
    ("version", 99, "is version 99, newer than this mamba-deploy reads (1); upgrade mamba-deploy"),
    ("version", "1", "version must be an integer >= 1"),
    ("source_weights", "../q8", "source_weights must be a weight type such as q8_0"),
])
def test_an_edited_manifest_field_is_refused(onnx_export, tmp_path, capsys, key, value, needle):
    """These fields were read unchecked: "dtype": "int8" made verify hold an fp32 graph to int8's
    limits (logits 5e-2 instead of 1e-4) and pass it."""
    import json
    import shutil

    from mamba_deploy.errors import ExportError
    from mamba_deploy.runners import open_runner

    src, hf_folder, _ = onnx_export("mamba")
    folder = tmp_path / "edited"
    shutil.copytree(src, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest[key] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError) as e:
        open_runner(folder, "onnx")
    assert needle in str(e.value) and "manifest.json" in str(e.value)
    if key == "dtype":
        _fails(["verify", str(hf_folder), str(folder), "--lengths", "1", "--batch", "1", "--quiet"], capsys, needle)


def test_small_messages_name_the_value_and_the_fix(tmp_path, capsys):
    """Each said less: "has no weights" without a fix, "this model is already quantized" without
    the path, "." for an empty path, and a .gguf-named folder as if it were not a .gguf name."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(Path(DEMO) / "config.json", bare / "config.json")
    _fails(["inspect", str(bare)], capsys, f"{bare} has no weights", "put the weight files beside its config.json")
    _fails(["inspect", ""], capsys, "the model path is empty ('')")
    folder = tmp_path / "dir.gguf"
    folder.mkdir()
    _fails(["generate", str(folder), "--prompt", "x"], capsys, f"got {str(folder)!r} (a folder)")
    q = tmp_path / "q8"
    assert main(["quantize", DEMO, str(q), "--method", "int8"]) == 0
    capsys.readouterr()
    _fails(["quantize", str(q), str(tmp_path / "again"), "--method", "int8"], capsys,
           f"{q} is already quantized (int8)", "quantize the float checkpoint")
    assert not (tmp_path / "again").exists()


def test_train_tokenizer_vocab_size_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-tokenizer", str(tmp_path / "tok"), "--vocab-size", "10"])
    assert e.value.code == 2 and "argument --vocab-size: 10 must be >= 300" in capsys.readouterr().err


def test_train_device_default_is_not_baked_into_the_parser():
    """It was "cuda" when torch saw a GPU: docs/cli.md (generated from the parser) then differed
    on a GPU machine and tests/test_cli_doc.py failed there."""
    from mamba_deploy.cli import build_parser

    assert build_parser().parse_args(["train", "--tokenizer", "t", "--out", "o"]).device is None
